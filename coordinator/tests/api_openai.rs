//! The official `openai` Python package as a real client: `lockstep serve` runs as a process on
//! 127.0.0.1 with stories260K and `tests/python/openai_client.py` drives it through the SDK
//! (completions, chat, streaming, `n = 2`, logprobs, seeds, typed errors). Skipped visibly when the
//! model or the package is absent; `.ci/run` installs the package so CI runs it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lockstep_test_env::{missing, stories260k};

const LIMIT: Duration = Duration::from_secs(60);

/// Kills the server when the test ends, however it ends.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_official_openai_python_client_works_against_lockstep_serve() {
    let Some(model) = stories260k() else { return };
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        return missing("python openai package not installed (pip install openai; .ci/run does)");
    }
    let key = "sk-lockstep-openai-test";
    let cert = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("openai-{}.pem", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--model"])
        .arg(&model)
        .args(["--listen", "127.0.0.1:0", "--h3-listen", "127.0.0.1:0", "--api-key", key, "--canary-every", "0"])
        .args(["--threads", "1", "--h3-cert-out"])
        .arg(&cert)
        // The readiness line below is an info-level text log line, whatever the caller's setting.
        .env("RUST_LOG", "info")
        .env("LOCKSTEP_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lockstep serve");
    let stderr = child.stderr.take().unwrap();
    let server = Killed(child);
    // Keep draining the server's stderr; hand over the lines.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut log = Vec::new();
    let addr = loop {
        let left = LIMIT.checked_sub(start.elapsed()).expect("the server did not start in time");
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("the server exited or hung: {log:#?}"));
        // A log line: the message follows the timestamp, level and target.
        if let Some((_, rest)) = line.split_once("listening on http://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        log.push(line);
    };
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/openai_client.py");
    let mut py = Command::new("python3")
        .arg(script)
        .args(["--base-url", &format!("http://{addr}/v1"), "--api-key", key, "--model", "stories260K"])
        // Loopback only: never through a proxy from the environment.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    loop {
        if py.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > LIMIT {
            let _ = py.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = py.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "the openai client failed ({:?}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("checks passed"), "{stdout}");
    drop(server);
}
