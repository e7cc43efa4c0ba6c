//! Helpers for lockstep's system-level tests: the `lockstep` binary, scratch directories and
//! processes watched while they run. (The shared test models come from `lockstep_test_env`.) Tests here run real processes on loopback only, each bounded in time.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace's `lockstep` binary, built next to this test's executable.
pub fn lockstep_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/lockstep
    let profile_dir = exe.parent().and_then(Path::parent).expect("target profile dir").to_path_buf();
    let bin = profile_dir.join(format!("lockstep{}", std::env::consts::EXE_SUFFIX));
    // `cargo test --workspace` builds it (the coordinator package has integration tests); a
    // nested `cargo build` here would wait forever on the lock the running `cargo test` holds.
    assert!(bin.exists(), "{} not built: run the suite with `cargo test --workspace`", bin.display());
    bin
}

/// A fresh scratch directory under the target dir, unique to this process and name.
pub fn scratch(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.parent().and_then(Path::parent).expect("target profile dir");
    let dir = target.join("lockstep-scratch").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Run `lockstep args…`, killing it after `limit`.
pub fn run_lockstep(args: &[&str], limit: Duration) -> Output {
    run_lockstep_with_env(args, &[], limit)
}

/// Run `lockstep args…` with extra environment variables, killing it after `limit`.
pub fn run_lockstep_with_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = Command::new(lockstep_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lockstep");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("lockstep {args:?} ran past {limit:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running `lockstep` process whose stdout and stderr are drained by threads while it runs, so a
/// test can wait for a line it prints (its address, "ready") instead of sleeping, and still get
/// everything at the end. Killed if dropped while running (a failed test leaves nothing behind).
/// The output ends when every holder of the pipes has exited, so `wait` is for processes whose own
/// children (embedded nodes) exit with them, as `lockstep`'s do.
pub struct Watched {
    child: Child,
    stderr_lines: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Watched {
    /// Start `lockstep args…`.
    pub fn lockstep(args: &[&str]) -> Watched {
        Self::lockstep_with_env(args, &[])
    }

    /// Start `lockstep args…` with extra environment variables.
    pub fn lockstep_with_env(args: &[&str], env: &[(&str, &str)]) -> Watched {
        let mut child = Command::new(lockstep_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lockstep");
        let (tx, stderr_lines) = mpsc::channel();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut out = child.stdout.take().expect("piped stdout");
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Watched { child, stderr_lines, stderr_seen: Vec::new(), stdout: Some(stdout) }
    }

    /// Wait for the first stderr line (from now on) that `found` accepts, and return what it
    /// extracts. Panics with the stderr so far if the process closes stderr or `limit` passes.
    pub fn wait_for_stderr<T>(&mut self, limit: Duration, mut found: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = found(&line);
                    self.stderr_seen.push(line);
                    if let Some(t) = hit {
                        return t;
                    }
                }
                Err(e) => panic!(
                    "lockstep (pid {}) never printed the awaited line ({e}); stderr so far:\n{}",
                    self.child.id(),
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    /// Ask the process to shut down (SIGTERM), so it stops its own children, and wait for it
    /// within `limit` (then kill it).
    pub fn terminate(mut self, limit: Duration) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill the process outright (SIGKILL on Unix).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Wait for the process to exit within `limit` (else kill it and panic); returns (success,
    /// stdout, all of stderr).
    pub fn wait(mut self, limit: Duration) -> (bool, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "lockstep (pid {}) ran past {limit:?}; stderr:\n{}",
                    self.child.id(),
                    self.stderr_seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader threads stop at end of file, so every line is in the channel once they do.
        let stdout = self.stdout.take().expect("stdout reader").join().unwrap_or_default();
        self.stderr_seen.extend(self.stderr_lines.iter());
        (status.success(), stdout, self.stderr_seen.join("\n"))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Write `lines` as a prompts file in `dir`.
pub fn prompts_file(dir: &Path, lines: &[&str]) -> PathBuf {
    let p = dir.join("prompts.txt");
    std::fs::write(&p, lines.join("\n")).expect("write prompts");
    p
}

/// `GET path` as JSON (`null` when the body is not JSON): (status, value).
pub fn get_json(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, "GET", path, None, HTTP_LIMIT);
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

/// Polls `ok` every 50 ms until it holds; panics naming `what` past `limit`.
pub fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` (`-KILL`, `-STOP`, …) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill(1)").success();
    assert!(ok, "kill {sig} {pid}");
}

/// How long one completion or ops request of a system test may take.
pub const HTTP_LIMIT: Duration = Duration::from_secs(120);

/// Requests for fault tests: for each prompt, greedy and seeded (T=0.8, seeds from
/// `first_seed`), streamed and not, each `max_tokens` long.
pub fn greedy_and_seeded(prompts: &[&str], max_tokens: u64, first_seed: u64) -> Vec<serde_json::Value> {
    use serde_json::json;
    let mut out = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for stream in [false, true] {
            let base = json!({"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": stream});
            let mut greedy = base.clone();
            greedy["temperature"] = json!(0);
            let mut seeded = base;
            seeded["temperature"] = json!(0.8);
            seeded["seed"] = json!(first_seed + i as u64);
            out.push(greedy);
            out.push(seeded);
        }
    }
    out
}

/// A completion as the client sees it: text and token ids, whichever way it came.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub text: String,
    pub token_ids: Vec<u64>,
}

/// `POST /v1/completions` with `body` (streamed or not), which must answer 200 with no error
/// event; the text and token ids it returned.
pub fn complete(addr: &str, body: &serde_json::Value) -> Answer {
    try_complete(addr, body).unwrap_or_else(|e| panic!("{e}"))
}

/// [`complete`], with a refusal or a broken answer as an error instead of a panic (for clients
/// that retry).
pub fn try_complete(addr: &str, body: &serde_json::Value) -> Result<Answer, String> {
    use serde_json::Value;
    let (status, _, text) = try_http(addr, "POST", "/v1/completions", Some(&body.to_string()), HTTP_LIMIT)?;
    if status != 200 {
        return Err(format!("HTTP {status}: {text}"));
    }
    if body["stream"] == Value::Bool(true) {
        let mut answer = Answer { text: String::new(), token_ids: Vec::new() };
        let mut done = false;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value =
                serde_json::from_str(data).map_err(|e| format!("an SSE event that is not JSON ({e}): {data}"))?;
            if v.get("error").is_some() {
                return Err(format!("an error event in the stream: {v}"));
            }
            for c in v["choices"].as_array().into_iter().flatten() {
                answer.text.push_str(c["text"].as_str().unwrap_or(""));
                answer.token_ids.extend(c["token_ids"].as_array().into_iter().flatten().filter_map(Value::as_u64));
            }
        }
        if !done {
            return Err(format!("the stream does not end with [DONE]: {text}"));
        }
        Ok(answer)
    } else {
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))?;
        let c = &v["choices"][0];
        Ok(Answer {
            text: c["text"].as_str().ok_or_else(|| format!("no text: {v}"))?.to_string(),
            token_ids: c["token_ids"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect(),
        })
    }
}

/// One HTTP/1.1 exchange on loopback with `Connection: close`: (status, body). A chunked body is
/// de-chunked; an SSE stream therefore comes back whole once the server ends it.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>, limit: Duration) -> (u16, String) {
    let (status, _, body) = try_http(addr, method, path, body, limit).unwrap_or_else(|e| panic!("{e}"));
    (status, body)
}

/// [`http`] returning the response head too (`Retry-After`, …), and a refused connection or a
/// reply cut short as an error instead of a panic: (status, head, body).
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    limit: Duration,
) -> Result<(u16, String, String), String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(limit)).expect("read timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).map_err(|e| format!("write to {addr}: {e}"))?;
    if let Some(b) = body {
        s.write_all(b.as_bytes()).map_err(|e| format!("write to {addr}: {e}"))?;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr} closed the connection without an HTTP head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("no status: {head}"))?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, head, String::from_utf8(body).map_err(|e| format!("a body that is not UTF-8: {e}"))?))
}

/// The payload of a chunked HTTP/1.1 body (what a body is without its chunk framing).
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || b.len() < size {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}
