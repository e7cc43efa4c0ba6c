//! Shared by the `ops_*` tests: a real [`Service`] on stories260K with the ops router served on
//! loopback, a tiny HTTP/1.1 client, background traffic, and a strict parser of the Prometheus
//! text format.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use lockstep_coordinator::engine::EngineEvent;
use lockstep_coordinator::engine::{EngineOptions, GenerateRequest, LocalExecutor, ModelInfo, StepExecutor};
use lockstep_coordinator::ops::canary::Canary;
use lockstep_coordinator::ops::metrics::Metrics;
use lockstep_coordinator::service::{Service, ServiceOptions};
use lockstep_coordinator::state::{AppState, Auth};
use lockstep_kernels::{CpuBackend, SamplingParams};

pub fn engine_options() -> EngineOptions {
    // A small KV cache so the dashboard's KV gauge visibly moves under load.
    EngineOptions { threads: 1, num_blocks: Some(512), ..EngineOptions::default() }
}

pub fn local_service(model: &std::path::Path, metrics: Arc<Metrics>) -> Arc<Service> {
    let opts = engine_options();
    let info = ModelInfo::load(model, &opts, CpuBackend::fingerprint_name_for(opts.mode)).expect("model info");
    let exec: Box<dyn StepExecutor> = Box::new(LocalExecutor::load(&info, &opts).expect("executor"));
    let sched = info.scheduler_config(&opts);
    Arc::new(Service::start(info, vec![exec], None, sched, ServiceOptions::default(), metrics).expect("service"))
}

/// The whole router (ops routes with their authentication) around `state`, served on 127.0.0.1 by a runtime that lives as long as the
/// returned value.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    _rt: tokio::runtime::Runtime,
}

pub fn serve(state: Arc<AppState>) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = lockstep_coordinator::api::router(state.clone());
    rt.spawn(async move { axum::serve(listener, app).await });
    Server { addr, state, _rt: rt }
}

pub fn app_state(
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    canary: Arc<Canary>,
    ops_keys: &[&str],
) -> Arc<AppState> {
    let auth = Auth { api_keys: vec![], ops_keys: ops_keys.iter().map(|s| s.to_string()).collect() };
    Arc::new(AppState::new(service, metrics, canary, auth))
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`; the answer is read to the end.
pub fn http(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>, body: Option<&[u8]>) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = auth {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // The server may answer (413) and close before reading everything.
        let _ = s.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    Response { status, headers, body: body.to_string() }
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    http(addr, "GET", path, None, None)
}

/// One metric family from the exposition: its type and samples (series text → value).
#[derive(Debug, Default)]
pub struct Family {
    pub kind: String,
    pub help: String,
    pub samples: Vec<(String, f64)>,
}

/// Parse the Prometheus text format strictly: HELP then TYPE before samples, valid names,
/// samples named after their family (with `_bucket`/`_sum`/`_count` for histograms), counters
/// ending in `_total`, numeric values, no family twice.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, Family> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    let mut pending_help: Option<(String, String)> = None;
    let mut current: Option<String> = None;
    let valid = |n: &str| {
        n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP text");
            assert!(valid(name), "invalid metric name {name:?}");
            assert!(!help.trim().is_empty(), "{name}: empty HELP");
            pending_help = Some((name.into(), help.into()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE kind");
            let (hname, help) = pending_help.take().unwrap_or_else(|| panic!("TYPE {name} without HELP"));
            assert_eq!(hname, name, "HELP and TYPE name differ");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{name}: type {kind}");
            assert!(!fams.contains_key(name), "family {name} declared twice");
            fams.insert(name.into(), Family { kind: kind.into(), help, samples: vec![] });
            current = Some(name.into());
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let name = series.split('{').next().unwrap();
            let fam = current.clone().unwrap_or_else(|| panic!("sample {name} before any TYPE"));
            let f = fams.get_mut(&fam).unwrap();
            let ok = match f.kind.as_str() {
                "histogram" => {
                    [format!("{fam}_bucket"), format!("{fam}_sum"), format!("{fam}_count")].iter().any(|n| n == name)
                }
                "counter" => name == fam && fam.ends_with("_total"),
                _ => name == fam,
            };
            assert!(ok, "sample {name} under {} family {fam}", f.kind);
            let labels = &series[name.len()..];
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "labels of {line:?}");
            }
            f.samples.push((series.to_string(), value));
        }
    }
    fams
}

/// The value of one exact series (`name{labels}` as printed), if present.
pub fn series(fams: &BTreeMap<String, Family>, s: &str) -> Option<f64> {
    fams.values().flat_map(|f| f.samples.iter()).find(|(k, _)| k == s).map(|(_, v)| *v)
}

const WORDS: &[&str] = &[
    "the", "little", "dog", "ran", "to", "park", "and", "saw", "a", "big", "red", "ball", "Lily", "said", "happy",
    "sun", "tree", "friend", "mom", "cat", "jumped", "over", "fence", "played", "all", "day",
];

/// Other traffic: `threads` clients each sending random prompts back to back until dropped.
pub struct Background {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
    pub completed: Arc<AtomicU64>,
}

impl Background {
    pub fn start(service: &Arc<Service>, threads: usize) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let handles = (0..threads)
            .map(|t| {
                let (svc, stop, done) = (service.clone(), stop.clone(), completed.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    let mut next = move |n: u64| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % n
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let words = 1 + next(30) as usize;
                        let text: Vec<&str> = (0..words).map(|_| WORDS[next(WORDS.len() as u64) as usize]).collect();
                        let req = GenerateRequest {
                            prompt_ids: svc.info().tokenizer.encode(&text.join(" "), true).unwrap(),
                            sampling: SamplingParams { temperature: 0.7, seed: next(1 << 30), ..Default::default() },
                            max_tokens: 8 + next(48) as u32,
                            stop: vec![],
                            stop_token_ids: vec![],
                            ignore_eos: true,
                            skip_special_tokens: true,
                        };
                        let Ok(mut sub) = svc.submit(req) else {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        };
                        while !sub.blocking_next().is_last() {}
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Background { stop, handles, completed }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Poll `done` until it holds, instead of sleeping for a guess; panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "gave up after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run one request to the end; (token ids, finish reason).
pub fn generate(service: &Service, prompt: &str, max_tokens: u32) -> (Vec<u32>, String) {
    let req = GenerateRequest {
        prompt_ids: service.info().tokenizer.encode(prompt, true).unwrap(),
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        stop_token_ids: vec![],
        ignore_eos: true,
        skip_special_tokens: true,
    };
    let mut sub = service.submit(req).expect("submit");
    let mut ids = Vec::new();
    loop {
        match sub.blocking_next() {
            EngineEvent::Token { token_id, .. } => ids.push(token_id),
            EngineEvent::Finished { reason, .. } => return (ids, reason.as_str().to_string()),
            EngineEvent::Rejected { error, .. } => panic!("rejected: {error}"),
        }
    }
}

/// Every `lockstep_*` name in the dashboard page (it keeps them in one `METRICS` table).
pub fn dashboard_metric_names() -> Vec<String> {
    let html = lockstep_coordinator::ops::DASHBOARD_HTML;
    let mut names: Vec<String> = Vec::new();
    let bytes = html.as_bytes();
    let mut i = 0;
    while let Some(off) = html[i..].find("lockstep_") {
        let start = i + off;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = html[start..end].to_string();
        if !names.contains(&name) {
            names.push(name);
        }
        i = end;
    }
    names
}

/// Longest one Chromium run may take.
pub const CHROMIUM_LIMIT: Duration = Duration::from_secs(90);

/// Chromium's binary: `$LOCKSTEP_CHROMIUM`, else the first of the usual names on `PATH`.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LOCKSTEP_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .flat_map(|b| std::env::split_paths(&path).map(move |d| d.join(b)))
        .find(|p| p.is_file())
}

/// Run Chromium headless on `url` with `extra` flags; stdout (the DOM for `--dump-dom`).
pub fn run_chromium(bin: &Path, profile: &Path, url: &str, extra: &[&str]) -> String {
    let _ = std::fs::remove_dir_all(profile);
    std::fs::create_dir_all(profile).unwrap();
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    // Read both pipes on threads so a chatty Chromium never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > CHROMIUM_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium ran past {CHROMIUM_LIMIT:?}: {}", err_t.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    assert!(status.success(), "chromium failed ({status}): {stderr}");
    stdout
}

/// The text of the element with `id` (first `>` after the id up to the next `<`).
pub fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("#{id} missing from the DOM"));
    let rest = &dom[at..];
    let open = rest.find('>').unwrap() + 1;
    let close = rest[open..].find('<').unwrap();
    &rest[open..open + close]
}

pub fn attr<'a>(dom: &'a str, id: &str, name: &str) -> &'a str {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("#{id} missing"));
    let tag = &dom[dom[..at].rfind('<').unwrap()..at + dom[at..].find('>').unwrap()];
    let k = format!("{name}=\"");
    let v = &tag[tag.find(&k).unwrap_or_else(|| panic!("{name} missing on #{id}: {tag}")) + k.len()..];
    &v[..v.find('"').unwrap()]
}

pub fn number(s: &str) -> f64 {
    s.replace(',', "").trim().parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}
