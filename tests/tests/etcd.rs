//! etcd discovery and coordinator fail-over, tried as an operator would: a real `etcd` on
//! loopback ports (started here, with a scratch data directory), two `lockstep serve
//! --membership etcd` coordinators and three `lockstep node --membership etcd` nodes on stories260K.
//! The leader is killed with SIGKILL mid-load, etcd is restarted under load; no request may be
//! lost and every answer must keep its bytes. A machine without the `etcd` binary skips these
//! tests (and fails them under CI, whose `.ci/run` installs Debian's `etcd-server`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_test_env::{missing, stories260k};
use lockstep_tests::{
    get_json, greedy_and_seeded, run_lockstep, scratch, try_complete, try_http, wait_until, Answer, Watched,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

/// A free loopback TCP port (released again for the process that will bind it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A single-member etcd on loopback ports, killed when dropped; its data (a preallocated 64 MB WAL
/// among it, ~123 MB a test) goes with it unless the test failed, so a failure can be looked at.
struct Etcd {
    child: Option<Child>,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// `None` (after `missing`) when there is no `etcd` binary.
    fn start(dir: &Path) -> Option<Etcd> {
        if Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            missing("no `etcd` binary (Debian: apt-get install etcd-server)");
            return None;
        }
        let mut etcd =
            Etcd { child: None, data_dir: dir.join("etcd-data"), client_port: free_port(), peer_port: free_port() };
        etcd.launch();
        Some(etcd)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Start (or restart) the process on the same ports and data, and wait until it answers.
    fn launch(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "lockstep-test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.url(), "--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("lockstep-test={peer}")])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.client_port);
        wait_until("etcd answers /health", Duration::from_secs(30), || {
            try_http(&addr, "GET", "/health", None, LIMIT).is_ok_and(|(_, _, body)| body.contains("true"))
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// The TLS directory of a cluster: its CA and certificates for `names`.
fn certs(dir: &Path, names: &[&str]) -> PathBuf {
    let tls = dir.join("tls");
    let tls_s = tls.to_str().unwrap();
    let out = run_lockstep(&["certs", "init", "--dir", tls_s], LIMIT);
    assert!(out.status.success());
    for n in names {
        assert!(run_lockstep(&["certs", "issue", "--dir", tls_s, "--name", n], LIMIT).status.success());
    }
    tls
}

/// A coordinator `name` of cluster `cluster` on etcd: the process and its HTTP address (from its
/// standby line).
fn coordinator(model: &Path, tls: &Path, etcd: &Etcd, cluster: &str, name: &str, extra: &[&str]) -> (Watched, String) {
    let shared = etcd_flags(etcd, cluster, tls);
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    let args = ["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--no-h3"];
    let quiet = ["--canary-every", "0", "--max-context", "512", "--cluster-listen", "127.0.0.1:0", "--name", name];
    let mut w = Watched::lockstep(&[&args[..], &quiet, &shared, extra].concat());
    let addr = w.wait_for_stderr(LIMIT, |line| {
        line.split("standby on http://").nth(1).map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
    });
    (w, addr)
}

/// The flags every member of cluster `cluster` on `etcd` shares.
fn etcd_flags(etcd: &Etcd, cluster: &str, tls: &Path) -> Vec<String> {
    let flags = ["--membership", "etcd", "--etcd-endpoints", &etcd.url(), "--cluster-name", cluster, "--tls-dir"];
    flags.iter().map(|f| f.to_string()).chain([tls.to_str().unwrap().to_string()]).collect()
}

/// A node `name` following cluster `cluster`'s leader.
fn node(tls: &Path, etcd: &Etcd, cluster: &str, name: &str) -> Watched {
    let shared = etcd_flags(etcd, cluster, tls);
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    let own = ["node", "--name", name, "--threads", "1", "--step-delay-ms", "10"];
    Watched::lockstep(&[&own[..], &shared].concat())
}

/// Greedy and seeded requests, streamed and not.
fn bodies() -> Vec<Value> {
    greedy_and_seeded(&["Once upon a time", "The little dog ran"], 64, 7)
}

/// A client that retries on every coordinator in turn until one answers (bounded by `limit`):
/// what a client of a fail-over cluster does.
fn complete_retrying(addrs: &[String], body: &Value, limit: Duration) -> Answer {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    for addr in addrs.iter().cycle() {
        assert!(Instant::now() < deadline, "no coordinator answered within {limit:?}; last: {last}");
        match try_complete(addr, body) {
            Ok(a) => return a,
            Err(e) => last = format!("{addr}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!("cycle never ends")
}

fn all_retrying(addrs: &[String], bodies: &[Value]) -> Vec<Answer> {
    std::thread::scope(|s| {
        let handles: Vec<_> = bodies.iter().map(|b| s.spawn(move || complete_retrying(addrs, b, LIMIT))).collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    })
}

/// Which of `addrs` serves (`/health` 200), waiting up to `limit`.
fn leader_of(addrs: &[String], limit: Duration) -> usize {
    let mut found = None;
    wait_until("a coordinator serves", limit, || {
        found = addrs.iter().position(|a| get_json_or_down(a, "/health").0 == 200);
        found.is_some()
    });
    found.unwrap()
}

/// `get_json`, with a coordinator that is not answering as status 0: not listening (killed, or
/// between servers), or — in the instant a stepping-down leader hands its socket from the
/// serving server to the standby one — closing a just-accepted connection without an answer.
/// Pollers ask again.
fn get_json_or_down(addr: &str, path: &str) -> (u16, Value) {
    match try_http(addr, "GET", path, None, LIMIT) {
        Ok((status, _, body)) => (status, serde_json::from_str(&body).unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

/// Guards issue 10's coordinator fail-over: two coordinators and three nodes meet in etcd; the
/// standby answers /health 503 naming the leader and /v1/* 503 with Retry-After; the leader is
/// killed with SIGKILL while requests run; the standby serves within 20 s; and clients that retry
/// their requests (same seeds) get exactly the bytes the first leader gave.
#[test]
fn killing_the_leader_hands_over_to_the_standby_with_identical_bytes() {
    let Some(model) = stories260k() else { return };
    let dir = scratch("etcd-failover");
    let Some(etcd) = Etcd::start(&dir) else { return };
    let tls = certs(&dir, &["coord-a", "coord-b", "node-0", "node-1", "node-2"]);
    let cluster = "failover";
    let tp = ["--tp", "2", "--node-threads", "1"];
    let (a, a_addr) = coordinator(&model, &tls, &etcd, cluster, "coord-a", &tp);
    let (b, b_addr) = coordinator(&model, &tls, &etcd, cluster, "coord-b", &tp);
    let _nodes: Vec<Watched> = (0..3).map(|i| node(&tls, &etcd, cluster, &format!("node-{i}"))).collect();
    let addrs = vec![a_addr, b_addr];
    let first = leader_of(&addrs, LIMIT);
    let mut procs = [Some(a), Some(b)];
    let (leader_addr, standby_addr) = (addrs[first].clone(), addrs[1 - first].clone());
    let leader_name = ["coord-a", "coord-b"][first];

    // The standby says so, names the leader, and refuses the API with Retry-After.
    // (It looks the leader up once per lease refresh, so it may take a moment to name it.)
    let mut health = Value::Null;
    wait_until("the standby names the leader", Duration::from_secs(30), || {
        let (status, h) = get_json(&standby_addr, "/health");
        assert_eq!(status, 503, "{h}");
        assert_eq!(h["status"], "standby", "{h}");
        health = h;
        health["leader"] == leader_name
    });
    assert_eq!(health["leader_http"], leader_addr.as_str(), "{health}");
    let body = json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 4}).to_string();
    let (status, head, refusal) = try_http(&standby_addr, "POST", "/v1/completions", Some(&body), LIMIT).unwrap();
    assert_eq!(status, 503, "{refusal}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert!(refusal.contains(leader_name), "the refusal names the leader: {refusal}");
    // The leader shows the election and a live etcd in /ops/cluster.
    let (_, ops) = get_json(&leader_addr, "/ops/cluster");
    assert_eq!(ops["discovery"]["role"], "leader", "{ops}");
    assert_eq!(ops["discovery"]["etcd"]["state"], "up", "{ops}");
    // Every node registered under its lease, and the serving ones with their fingerprint.
    wait_until("the leader lists the registered nodes", Duration::from_secs(30), || {
        let (_, ops) = get_json(&leader_addr, "/ops/cluster");
        let nodes = ops["discovery"]["registered_nodes"].as_array().cloned().unwrap_or_default();
        let fingerprint = ops["system_fingerprint"].clone();
        nodes.len() == 3 && nodes.iter().filter(|n| n["fingerprint"] == fingerprint).count() == 2
    });

    let bodies = bodies();
    let reference = all_retrying(&addrs, &bodies);
    assert!(reference.iter().all(|a| a.token_ids.len() == 64));
    let killed = std::thread::scope(|s| {
        let answers = s.spawn(|| all_retrying(&addrs, &bodies));
        std::thread::sleep(Duration::from_millis(400));
        let mut leader = procs[first].take().unwrap();
        leader.kill();
        let killed_at = Instant::now();
        wait_until("the standby serves", Duration::from_secs(20), || {
            get_json_or_down(&standby_addr, "/health").0 == 200
        });
        let took = killed_at.elapsed();
        (answers.join().unwrap(), took)
    });
    let (got, took) = killed;
    eprintln!("the standby served {took:?} after the leader was killed");
    assert_eq!(got, reference, "every retried request gives the bytes of the first leader");
    let (_, ops) = get_json(&standby_addr, "/ops/cluster");
    assert_eq!(ops["discovery"]["role"], "leader", "{ops}");
    let again = all_retrying(std::slice::from_ref(&standby_addr), &bodies);
    assert_eq!(again, reference);
    if let Some(p) = procs[1 - first].take() {
        p.terminate(LIMIT);
    }
}

/// Guards issue 10's "etcd unavailable": etcd is killed and restarted while requests run; the
/// leader keeps serving with the nodes it has (showing etcd down in /ops/cluster meanwhile), no
/// request is lost, and every answer keeps its bytes.
#[test]
fn restarting_etcd_under_load_loses_no_request() {
    let Some(model) = stories260k() else { return };
    let dir = scratch("etcd-restart");
    let Some(mut etcd) = Etcd::start(&dir) else { return };
    let tls = certs(&dir, &["coord-a", "node-0", "node-1"]);
    let cluster = "restart";
    let (leader, addr) = coordinator(&model, &tls, &etcd, cluster, "coord-a", &["--tp", "2", "--node-threads", "1"]);
    let _nodes: Vec<Watched> = (0..2).map(|i| node(&tls, &etcd, cluster, &format!("node-{i}"))).collect();
    let addrs = vec![addr.clone()];
    leader_of(&addrs, LIMIT);
    let bodies = bodies();
    let reference = all_retrying(&addrs, &bodies);
    let restarted = std::sync::atomic::AtomicBool::new(false);
    // Rounds of every request at once, without retries, until etcd is back: each answer must be
    // the reference's.
    let rounds = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut rounds = 0;
            while !restarted.load(std::sync::atomic::Ordering::SeqCst) {
                let got: Vec<Result<Answer, String>> = std::thread::scope(|s2| {
                    let hs: Vec<_> = bodies.iter().map(|b| s2.spawn(|| try_complete(&addr, b))).collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                for (i, g) in got.into_iter().enumerate() {
                    assert_eq!(g.as_ref(), Ok(&reference[i]), "round {rounds} request {i} through the etcd restart");
                }
                rounds += 1;
            }
            rounds
        });
        std::thread::sleep(Duration::from_millis(300));
        etcd.kill();
        wait_until("/ops/cluster shows etcd down", Duration::from_secs(30), || {
            get_json(&addr, "/ops/cluster").1["discovery"]["etcd"]["state"] == "down"
        });
        let (status, health) = get_json(&addr, "/health");
        assert_eq!(status, 200, "the leader serves while etcd is down: {health}");
        etcd.launch();
        restarted.store(true, std::sync::atomic::Ordering::SeqCst);
        load.join().unwrap()
    });
    assert!(rounds >= 1);
    wait_until("/ops/cluster shows etcd up again", Duration::from_secs(30), || {
        get_json(&addr, "/ops/cluster").1["discovery"]["etcd"]["state"] == "up"
    });
    let (_, ops) = get_json(&addr, "/ops/cluster");
    assert_eq!(ops["discovery"]["role"], "leader", "the lease survived the restart: {ops}");
    assert_eq!(all_retrying(&addrs, &bodies), reference);
    leader.terminate(LIMIT);
}

/// Guards issue 10's step-down: a leader whose lease etcd no longer has (revoked here through
/// etcd's JSON gateway, as an expiry would) stops serving and stands by naming the new leader,
/// the standby is elected and serves, and the bytes do not change.
#[test]
fn a_leader_that_loses_its_lease_steps_down() {
    let Some(model) = stories260k() else { return };
    let dir = scratch("etcd-step-down");
    let Some(etcd) = Etcd::start(&dir) else { return };
    let tls = certs(&dir, &["coord-a", "coord-b", "node-0", "node-1"]);
    let cluster = "step-down";
    let tp = ["--tp", "2", "--node-threads", "1"];
    let (_a, a_addr) = coordinator(&model, &tls, &etcd, cluster, "coord-a", &tp);
    let (_b, b_addr) = coordinator(&model, &tls, &etcd, cluster, "coord-b", &tp);
    let _nodes: Vec<Watched> = (0..2).map(|i| node(&tls, &etcd, cluster, &format!("node-{i}"))).collect();
    let addrs = vec![a_addr, b_addr];
    let first = leader_of(&addrs, LIMIT);
    let (old, new) = (addrs[first].clone(), addrs[1 - first].clone());
    let bodies = bodies();
    let reference = all_retrying(&addrs, &bodies);

    let (_, ops) = get_json(&old, "/ops/cluster");
    let lease = i64::from_str_radix(ops["discovery"]["lease"].as_str().expect("the leader's lease"), 16).unwrap();
    let etcd_addr = format!("127.0.0.1:{}", etcd.client_port);
    let revoke = json!({ "ID": lease.to_string() }).to_string();
    let (status, _, answer) = try_http(&etcd_addr, "POST", "/v3/lease/revoke", Some(&revoke), LIMIT).unwrap();
    assert_eq!(status, 200, "{answer}");

    wait_until("the old leader stands by", Duration::from_secs(30), || {
        let (status, health) = get_json_or_down(&old, "/health");
        status == 503 && health["status"] == "standby"
    });
    wait_until("the standby leads", LIMIT, || get_json_or_down(&new, "/health").0 == 200);
    wait_until("the old leader names the new one", Duration::from_secs(30), || {
        get_json_or_down(&old, "/health").1["leader"] == ["coord-a", "coord-b"][1 - first]
    });
    assert_eq!(all_retrying(&[new], &bodies), reference);
}
