//! Shared by the `api_*` tests: an in-process API server on stories260K, bound to 127.0.0.1.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use lockstep_coordinator::api::{EdgeLimits, H3Options, ServeOptions, Server, TlsSource};
use lockstep_coordinator::engine::{EngineOptions, ExecError, LocalExecutor, ModelInfo, StepExecutor};
use lockstep_coordinator::ops::canary::Canary;
use lockstep_coordinator::ops::metrics::Metrics;
use lockstep_coordinator::service::{Service, ServiceOptions};
use lockstep_coordinator::state::{AppState, Auth, Limits};
use lockstep_kernels::CpuBackend;
use lockstep_proto::step::{StepPlan, StepResult};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

pub struct Options {
    pub api_keys: Vec<String>,
    pub ops_keys: Vec<String>,
    pub max_waiting: usize,
    pub h3: bool,
    pub edge: EdgeLimits,
    pub body_timeout: Duration,
    /// Every engine step first sleeps this long (so a test can catch a request mid-stream).
    pub step_delay: Option<Duration>,
    /// Most sequences running at once (the engine's default when `None`).
    pub max_running: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            api_keys: Vec::new(),
            ops_keys: Vec::new(),
            max_waiting: 256,
            h3: false,
            edge: EdgeLimits::default(),
            body_timeout: Limits::default().body_timeout,
            step_delay: None,
            max_running: None,
        }
    }
}

/// An executor that sleeps before every step.
struct Slow {
    inner: Box<dyn StepExecutor>,
    delay: Duration,
}

impl StepExecutor for Slow {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError> {
        std::thread::sleep(self.delay);
        self.inner.execute(plan)
    }
}

pub struct TestServer {
    pub state: Arc<AppState>,
    pub server: Server,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.server.http_addr)
    }

    /// Waits until no sequence runs or waits and no KV block is in use, or panics after `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let r = self.state.service.replicas();
            if r.iter().all(|r| r.running == 0 && r.waiting == 0 && r.kv_used_blocks == 0) {
                return;
            }
            assert!(start.elapsed() < limit, "the service did not become idle: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts the API on 127.0.0.1 (ephemeral ports) over stories260K, in this process.
pub async fn start(model: &std::path::Path, opts: Options) -> TestServer {
    let d = EngineOptions::default();
    let eopts = EngineOptions { threads: 1, max_running: opts.max_running.unwrap_or(d.max_running), ..d };
    let info = ModelInfo::load(model, &eopts, CpuBackend::fingerprint_name_for(eopts.mode)).expect("model");
    let mut exec: Box<dyn StepExecutor> = Box::new(LocalExecutor::load(&info, &eopts).expect("executor"));
    if let Some(delay) = opts.step_delay {
        exec = Box::new(Slow { inner: exec, delay });
    }
    let metrics = Arc::new(Metrics::new());
    let sched = info.scheduler_config(&eopts);
    let service = Service::start(
        info,
        vec![exec],
        None,
        sched,
        ServiceOptions { max_waiting: opts.max_waiting, ..ServiceOptions::default() },
        metrics.clone(),
    )
    .expect("service");
    let auth = Auth { api_keys: opts.api_keys, ops_keys: opts.ops_keys };
    let mut state = AppState::new(Arc::new(service), metrics, Arc::new(Canary::new()), auth);
    state.limits = Limits { body_timeout: opts.body_timeout };
    let state = Arc::new(state);
    let h3 = opts.h3.then(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("api-h3-{}", std::process::id()));
        H3Options {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            tls: TlsSource::SelfSigned { pem_out: dir.join(format!("cert-{:?}.pem", std::thread::current().id())) },
        }
    });
    let opts = ServeOptions { listen: "127.0.0.1:0".parse().unwrap(), h3, edge: opts.edge };
    let server = Server::start(state.clone(), opts).await.expect("server");
    TestServer { state, server }
}

/// The f32 bits of each logprob of a JSON list (the server writes each f32 exactly).
pub fn logprob_bits(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| a.iter().map(|x| (x.as_f64().expect("a number") as f32).to_bits()).collect())
        .unwrap_or_default()
}

/// Token ids of a JSON list.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().map(|x| x.as_u64().expect("an id") as u32).collect()).unwrap_or_default()
}

/// An HTTP/3 connection to the test server.
pub struct H3Client {
    _endpoint: quinn::Endpoint,
    pub send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    pub port: u16,
}

impl H3Client {
    pub async fn connect(addr: SocketAddr, cert_pem: &std::path::Path) -> H3Client {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(cert_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint.connect(addr, "localhost").unwrap().await.expect("QUIC handshake with the served cert");
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        H3Client { _endpoint: endpoint, send, port: addr.port() }
    }

    /// One request; returns the status, the headers and the whole body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, http::HeaderMap, Vec<u8>) {
        let mut req = http::Request::builder().method(method).uri(format!("https://localhost:{}{path}", self.port));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let mut stream = self.send.send_request(req.body(()).unwrap()).await.unwrap();
        if let Some(b) = body {
            stream.send_data(Bytes::from(b.to_string())).await.unwrap();
        }
        stream.finish().await.unwrap();
        let resp = stream.recv_response().await.unwrap();
        let mut out = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.unwrap() {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        (resp.status().as_u16(), resp.headers().clone(), out)
    }
}
