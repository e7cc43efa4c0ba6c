//! End to end, as an operator runs it: `lockstep serve --tp 2` (two embedded node processes on
//! loopback serving stories260K, the determinism canary every second, an ops key), and the
//! dashboard opened in real headless Chromium with the key as Basic credentials in the URL — the
//! browser then sends them on the page's own polling requests. The page must show the cluster's
//! nodes, the canary's matches, and advance between two loads. Without the key the ops routes
//! answer 401. A screenshot is kept at `target/test-artifacts/dashboard-serve.png`.
//!
//! Skipped visibly when the model (`../shared`) or Chromium is missing.

mod ops_common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_test_env::{missing, stories260k};
use ops_common::*;

const OPS_KEY: &str = "dash-key-7";

/// The `lockstep serve` process: SIGTERM (it shuts its nodes down), then SIGKILL after a grace.
struct Serve(Child);
impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn lockstep_serve_tp2_dashboard_in_headless_chromium() {
    let Some(model) = stories260k() else { return };
    let Some(chrome) = chromium() else {
        return missing("chromium not installed (.ci/run installs it; or set LOCKSTEP_CHROMIUM)");
    };
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf();
    let scratch = target.join("tmp").join(format!("ops-serve-dashboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["serve", "--model", model.to_str().unwrap(), "--listen", &listen, "--no-h3"])
            .args(["--tp", "2", "--node-threads", "1", "--canary-every", "1", "--ops-key", OPS_KEY])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn lockstep serve"),
    );
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let bearer = format!("Bearer {OPS_KEY}");
    // Up once the cluster document answers (the nodes have joined by then); the canary has
    // recorded its reference and made a check once it reports a match.
    let start = Instant::now();
    loop {
        let ready = std::net::TcpStream::connect(addr).is_ok()
            && http(addr, "GET", "/ops/canary", Some(&bearer), None).status == 200
            && http(addr, "GET", "/ops/canary", Some(&bearer), None).json()["matches"].as_u64() >= Some(1);
        if ready {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "lockstep serve never became ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(addr, "/dashboard").status, 401, "the ops key is required");
    assert_eq!(get(addr, "/metrics").status, 401);
    let c = http(addr, "GET", "/ops/cluster", Some(&bearer), None).json();
    let names: Vec<String> =
        c["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap().into()).collect();
    assert_eq!(names.len(), 2, "{c}");
    assert!(c["nodes"].as_array().unwrap().iter().all(|n| n["fingerprint_matches"] == true && n["state"] == "ready"));
    assert_eq!(c["groups"][0]["tp"], 2);

    let url = format!("http://ops:{OPS_KEY}@{listen}/dashboard");
    let profile = scratch.join("chromium-profile");
    let budget = ["--dump-dom", "--virtual-time-budget=5000"];
    let dom1 = run_chromium(&chrome, &profile, &url, &budget);
    // Load the page again once the canary has checked more often than the first load showed.
    let c1 = number(element_text(&dom1, "canary-checks"));
    wait_until(Duration::from_secs(60), "the canary to check again", || {
        http(addr, "GET", "/ops/canary", Some(&bearer), None).json()["checks"].as_f64() > Some(c1)
    });
    let dom2 = run_chromium(&chrome, &profile, &url, &budget);
    for dom in [&dom1, &dom2] {
        let error = element_text(dom, "error-line");
        assert_eq!(element_text(dom, "conn-text"), "live", "the page's polls are authorized and answered: {error}");
        for n in &names {
            assert!(dom.contains(&format!("<b>{n}</b>")), "node {n} is not in the nodes table");
        }
        assert_eq!(element_text(dom, "fingerprint"), c["system_fingerprint"].as_str().unwrap());
        assert!(number(attr(dom, "poll-count", "data-polls")) >= 2.0, "the page refreshes itself");
        assert_eq!(element_text(dom, "canary-state"), "MATCH");
    }
    let (t1, t2) = (number(attr(&dom1, "server-time", "data-unix")), number(attr(&dom2, "server-time", "data-unix")));
    assert!(t2 > t1, "the server time shown advances ({t1} → {t2})");
    let c2 = number(element_text(&dom2, "canary-checks"));
    assert!(c2 > c1, "the canary keeps checking, and the page shows it ({c1} → {c2})");

    let artifacts = target.join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("dashboard-serve.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(&chrome, &profile, &url, &[&format!("--screenshot={}", png.display()), "--virtual-time-budget=5000"]);
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000, "a real screenshot ({} bytes)", bytes.len());
    eprintln!("dashboard screenshot: {}", png.display());

    // The canary never disagreed with itself.
    let k = http(addr, "GET", "/ops/canary", Some(&bearer), None).json();
    assert_eq!(k["mismatches"], 0, "{k}");
    drop(serve);
    let _ = std::fs::remove_dir_all(&scratch);
}
