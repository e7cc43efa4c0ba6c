//! The dashboard in a real headless Chromium, against a real tensor-parallel cluster: two
//! `lockstep node` processes (TP = 2) on loopback serving stories260K, the ops router around the
//! service, the determinism canary checking every second and background traffic. The page must
//! load, name the cluster's nodes, and update itself: its poll counter and the server time it
//! shows advance between two loads, and the token counter grows. A screenshot is kept at
//! `target/test-artifacts/dashboard.png` for people to look at.
//!
//! Skipped visibly when the model (`../shared`) or Chromium is missing (`.ci/run` installs
//! Chromium). Chromium runs with a fresh profile, no network beyond loopback, and a time limit.

mod ops_common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_coordinator::cluster::{Cluster, ClusterOptions, NodesMode};
use lockstep_coordinator::ops::canary::Canary;
use lockstep_coordinator::ops::metrics::Metrics;
use lockstep_coordinator::service::{Service, ServiceOptions};
use lockstep_test_env::{missing, stories260k};
use ops_common::*;

const NODE_NAMES: [&str; 2] = ["dash-node-0", "dash-node-1"];

/// Node processes: given a moment to exit on the cluster's Shutdown, then killed (the cluster of
/// `--nodes static` may close its endpoint before that frame is out, and a node that misses it
/// would wait for its 5 s idle timeout).
struct Nodes(Vec<Child>);
impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TP = 2 cluster of real `lockstep node` processes, started the way an operator would
/// (`--nodes static`): the coordinator listens, the nodes dial it with certificates from the
/// cluster CA.
fn tp2_cluster(model: &Path, scratch: &Path) -> (Cluster, Nodes) {
    let tls = scratch.join("tls");
    lockstep_transport::certs::init_ca(&tls).unwrap();
    lockstep_transport::certs::issue(&tls, "coordinator").unwrap();
    for n in NODE_NAMES {
        lockstep_transport::certs::issue(&tls, n).unwrap();
    }
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = ClusterOptions {
        listen,
        tls_dir: Some(tls.clone()),
        join_timeout: Duration::from_secs(60),
        ..ClusterOptions::new(model.to_path_buf(), vec![2], 1, NodesMode::Static, engine_options())
    };
    let starting = std::thread::spawn(move || Cluster::start(opts));
    // Dial only once the coordinator's endpoint holds the port.
    let deadline = Instant::now() + Duration::from_secs(30);
    while UdpSocket::bind(listen).is_ok() {
        assert!(Instant::now() < deadline, "the coordinator never bound {listen}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let nodes = Nodes(
        NODE_NAMES
            .iter()
            .map(|name| {
                Command::new(env!("CARGO_BIN_EXE_lockstep"))
                    .args(["node", "--coordinator", &listen.to_string(), "--tls-dir"])
                    .arg(&tls)
                    .args(["--name", name, "--threads", "1", "--listen", "127.0.0.1:0"])
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("spawn lockstep node")
            })
            .collect(),
    );
    let cluster = starting.join().unwrap().expect("cluster start");
    (cluster, nodes)
}

#[test]
fn dashboard_renders_a_live_tp2_cluster_in_headless_chromium() {
    let Some(model) = stories260k() else { return };
    let Some(chrome) = chromium() else {
        return missing("chromium not installed (.ci/run installs it; or set LOCKSTEP_CHROMIUM)");
    };
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf();
    let scratch = target.join("tmp").join(format!("ops-dashboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();

    let (cluster, _nodes) = tp2_cluster(&model, &scratch);
    let metrics = Arc::new(Metrics::new());
    let info = cluster.info.clone();
    let sched = info.scheduler_config(&engine_options());
    // The cluster's group joins the service as it attaches.
    let service = Arc::new(
        Service::start(info, Vec::new(), Some(cluster), sched, ServiceOptions::default(), metrics.clone()).unwrap(),
    );
    let canary = Canary::start(service.clone(), metrics.clone(), Duration::from_secs(1));
    let server = serve(app_state(service.clone(), metrics.clone(), canary.clone(), &[]));
    // A soak summary as `lockstep soak` posts it, so the soak panel has something to show.
    let soak = serde_json::json!({
        "finished_unix": 0, "url": format!("http://{}", server.addr), "model": "stories260K", "requests": 1000,
        "completed": 1000, "errors": 0, "max_tokens": 64, "temperature": 0.8, "seed": 7,
        "concurrency_ramp": [1, 8, 32], "unique_completions": [1], "logprob_bit_mismatches": 0,
        "fingerprints": [service.info().system_fingerprint], "completion_tokens_per_s": 2400.5,
        "latency_p50_s": 0.21, "latency_p99_s": 0.64, "verdict": "deterministic: 1 unique completion",
    });
    let r = http(server.addr, "POST", "/ops/soak", None, Some(soak.to_string().as_bytes()));
    assert_eq!(r.status, 200);
    assert!(canary.wait_for_checks(1, Duration::from_secs(60)), "{:?}", canary.status());
    let load = Background::start(&service, 3);

    let url = format!("http://{}/dashboard", server.addr);
    let profile = scratch.join("chromium-profile");
    // Virtual time runs the page's 1 s poll loop several times; it pauses while fetches are
    // in flight, so every poll sees a real answer.
    let budget = ["--dump-dom", "--virtual-time-budget=6000"];
    let dom1 = run_chromium(&chrome, &profile, &url, &budget);
    // Load the page again once the server has generated more than the first load showed.
    let g1 = number(attr(&dom1, "kpi-tokens", "data-value"));
    wait_until(Duration::from_secs(60), "the background load to generate more tokens", || {
        series(&parse_prometheus(&get(server.addr, "/metrics").body), "lockstep_generation_tokens_total") > Some(g1)
    });
    let dom2 = run_chromium(&chrome, &profile, &url, &budget);

    for dom in [&dom1, &dom2] {
        for n in NODE_NAMES {
            assert!(dom.contains(n), "node {n} not on the page");
        }
        assert_eq!(element_text(dom, "fingerprint"), service.info().system_fingerprint);
        assert_eq!(element_text(dom, "model"), "stories260K");
        let polls = number(attr(dom, "poll-count", "data-polls"));
        assert!(polls >= 2.0, "the page polled {polls} times: it must refresh itself");
        // (The page's script is in the DOM too: look at rendered elements, not at any text.)
        assert_eq!(dom.matches("✓ match</td>").count(), 2, "both nodes' fingerprints are checked");
        assert_eq!(element_text(dom, "soak-verdict"), "deterministic", "the soak panel shows the posted report");
        assert_eq!(element_text(dom, "conn-text"), "live", "the last poll succeeded");
        assert_eq!(element_text(dom, "error-line"), "", "no poll error shown");
    }
    let (t1, t2) = (number(attr(&dom1, "server-time", "data-unix")), number(attr(&dom2, "server-time", "data-unix")));
    assert!(t2 > t1, "the server time shown must advance between loads ({t1} → {t2})");
    let g2 = number(attr(&dom2, "kpi-tokens", "data-value"));
    assert!(g2 > g1, "generated tokens must grow under load ({g1} → {g2})");
    let canary_kpi = element_text(&dom2, "canary-matches");
    assert!(number(canary_kpi) >= 1.0, "the canary panel shows matches: {canary_kpi}");
    assert_eq!(element_text(&dom2, "canary-state"), "MATCH", "the canary panel's verdict");
    assert_eq!(element_text(&dom2, "canary-mismatches"), "0");

    let artifacts = target.join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(&chrome, &profile, &url, &[&format!("--screenshot={}", png.display()), "--virtual-time-budget=8000"]);
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000, "a real screenshot ({} bytes)", bytes.len());
    eprintln!("dashboard screenshot: {}", png.display());

    drop(load);
    let s = canary.status();
    assert_eq!(s.mismatches, 0, "{s:?}");
    drop(server);
    drop(canary);
    // Shut the cluster down between steps, so the nodes see a clean Shutdown, not a lost peer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.replicas().iter().any(|r| r.running + r.waiting > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(service);
    let _ = std::fs::remove_dir_all(&scratch);
}
