//! The official `openai` Python package as a real client: `lockstep serve` runs as a process on
//! 127.0.0.1 with stories260K and `tests/python/openai_client.py` drives it through the SDK
//! (completions, chat, streaming, `n = 2`, logprobs, seeds, typed errors); with SmolLM2's GGUF file
//! `tests/python/openai_chat_gguf.py` chats with a real instruct model. Skipped visibly when the
//! model or the package is absent; `.ci/run` installs the package and fetches the model so CI runs
//! it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lockstep_test_env::{missing, smollm2_gguf, stories260k};

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
    serve_and_run_client(&model, "openai_client.py", "stories260K");
}

/// `serve --model <file>.gguf` answers the SDK's chat call with the real instruct model.
#[test]
fn the_official_openai_python_client_chats_with_a_gguf_model() {
    let Some(model) = smollm2_gguf() else { return };
    serve_and_run_client(&model, "openai_chat_gguf.py", "SmolLM2-135M-Instruct.Q4_1");
}

/// Start `lockstep serve --model <model>` on 127.0.0.1 and run `tests/python/<script>` against
/// it; the script prints `checks passed` when every check holds.
fn serve_and_run_client(model: &std::path::Path, script: &str, model_name: &str) {
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
        .arg(model)
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

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python").join(script);
    let mut py = Command::new("python3")
        .arg(script)
        .args(["--base-url", &format!("http://{addr}/v1"), "--api-key", key, "--model", model_name])
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
