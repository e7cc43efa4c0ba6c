//! Tensor-parallel clusters of real node processes on 127.0.0.1: the answer does not change by a
//! bit with the TP degree, the replica count or the load; bad joiners are refused with clear
//! errors while the cluster serves; a node killed mid-generation fails only its group's requests.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_tests::{
    child_pids, free_udp_port, lockstep_bin, prompts_file, run_lockstep, scratch, stderr, stdout, stories_dir,
};

const LIMIT: Duration = Duration::from_secs(180);

const PROMPTS: &[&str] = &[
    "Once upon a time",
    "The little dog ran to the park and",
    "Lily and Ben",
    "One day, a big red ball",
    "Tom was sad because",
    "The sun was shining and the birds",
    "Mom said",
    "There was a cat named Tim. Tim liked to",
    "A boy found a shiny stone",
    "The tree was very tall",
];

fn generate(model: &Path, prompts: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--json",
        "--max-tokens",
        "24",
    ];
    args.extend_from_slice(extra);
    let out = run_lockstep(&args, LIMIT);
    assert!(out.status.success(), "generate {extra:?} failed: {}", stderr(&out));
    stdout(&out).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect()
}

/// The part of an answer that must be identical: ids, logprob bits (as printed), text.
fn answer(v: &serde_json::Value) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    (v["token_ids"].clone(), v["logprobs"].clone(), v["text"].clone())
}

fn assert_same(name: &str, got: &[serde_json::Value], want: &[serde_json::Value]) {
    assert_eq!(got.len(), want.len(), "{name}: number of answers");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(answer(g), answer(w), "{name}: prompt {i} differs");
        assert_eq!(g["system_fingerprint"], w["system_fingerprint"]);
    }
}

#[test]
fn stories260k_tp_1_2_4_are_identical_greedy_and_seeded_alone_and_under_load() {
    let Some(model) = stories_dir("stories260k_tp_1_2_4_are_identical_greedy_and_seeded_alone_and_under_load") else {
        return;
    };
    let dir = scratch("cluster-tp");
    let batch = prompts_file(&dir, PROMPTS);
    let alone_dir = dir.join("alone");
    std::fs::create_dir_all(&alone_dir).unwrap();
    let alone = prompts_file(&alone_dir, &PROMPTS[..1]);
    for sampling in [&["--temperature", "0"][..], &["--temperature", "0.8", "--seed", "7"][..]] {
        let local = generate(&model, &batch, sampling);
        let local_alone = generate(&model, &alone, sampling);
        assert_same("alone vs batch (local)", &local_alone, &local[..1]);
        for tp in ["2", "4"] {
            let mut args = sampling.to_vec();
            args.extend_from_slice(&["--tp", tp, "--stagger-steps", "1"]);
            assert_same(&format!("TP {tp} under load {sampling:?}"), &generate(&model, &batch, &args), &local);
            let mut args = sampling.to_vec();
            args.extend_from_slice(&["--tp", tp]);
            assert_same(&format!("TP {tp} alone {sampling:?}"), &generate(&model, &alone, &args), &local_alone);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn synthetic_llama_tp_1_2_4_8_are_identical() {
    let dir = scratch("cluster-tp8");
    let model = dir.join("tiny");
    let out = run_lockstep(
        &["model", "synth", "--preset", "tiny", "--seed", "11", "--dtype", "bf16", "--out", model.to_str().unwrap()],
        LIMIT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let prompts = prompts_file(&dir, &PROMPTS[..4]);
    let sampling = ["--temperature", "0.7", "--seed", "3", "--ignore-eos"];
    let local = generate(&model, &prompts, &sampling);
    for tp in ["1", "2", "4", "8"] {
        let mut args = sampling.to_vec();
        args.extend_from_slice(&["--tp", tp, "--cluster", "--node-threads", "1"]);
        assert_same(&format!("synthetic TP {tp}"), &generate(&model, &prompts, &args), &local);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_replicas_of_tp_2_under_mixed_load_equal_tp_1() {
    let Some(model) = stories_dir("two_replicas_of_tp_2_under_mixed_load_equal_tp_1") else { return };
    let dir = scratch("cluster-replicas");
    let prompts = prompts_file(&dir, PROMPTS);
    let sampling = ["--temperature", "0.8", "--seed", "99"];
    let local = generate(&model, &prompts, &sampling);
    let mut args = sampling.to_vec();
    args.extend_from_slice(&["--tp", "2", "--replicas", "2", "--stagger-steps", "2", "--node-threads", "1"]);
    assert_same("R=2 x TP=2", &generate(&model, &prompts, &args), &local);
    let _ = std::fs::remove_dir_all(&dir);
}

fn spawn(args: &[&str]) -> Child {
    Command::new(lockstep_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Wait for a process to exit within `limit`; returns (success, stdout, stderr).
fn wait(mut c: Child, limit: Duration) -> (bool, String, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let (mut o, mut e) = (String::new(), String::new());
            c.stdout.take().unwrap().read_to_string(&mut o).unwrap();
            c.stderr.take().unwrap().read_to_string(&mut e).unwrap();
            return (status.success(), o, e);
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            panic!("process ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_joiners_are_refused_with_clear_errors_and_the_cluster_keeps_serving() {
    let Some(model) = stories_dir("bad_joiners_are_refused_with_clear_errors_and_the_cluster_keeps_serving") else {
        return;
    };
    let dir = scratch("cluster-bad-joiners");
    let (tls, other_ca) = (dir.join("tls"), dir.join("other-ca"));
    let (tls_s, other_s) = (tls.to_str().unwrap(), other_ca.to_str().unwrap());
    for args in [
        vec!["certs", "init", "--dir", tls_s],
        vec!["certs", "issue", "--dir", tls_s, "--name", "coordinator"],
        vec!["certs", "issue", "--dir", tls_s, "--name", "good"],
        vec!["certs", "issue", "--dir", tls_s, "--name", "other-weights"],
        vec!["certs", "issue", "--dir", tls_s, "--name", "old-protocol"],
        vec!["certs", "init", "--dir", other_s],
        vec!["certs", "issue", "--dir", other_s, "--name", "intruder"],
    ] {
        let o = run_lockstep(&args, LIMIT);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let other_model = dir.join("other-model");
    let o = run_lockstep(&["model", "synth", "--preset", "tiny", "--out", other_model.to_str().unwrap()], LIMIT);
    assert!(o.status.success());
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let model_s = model.to_str().unwrap();
    let coordinator = spawn(&[
        "generate",
        "--model",
        model_s,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "16",
        "--json",
        "--seed",
        "1",
        "--nodes",
        "static",
        "--tp",
        "1",
        "--tls-dir",
        tls_s,
        "--cluster-listen",
        &addr,
        "--join-timeout",
        "120",
    ]);
    std::thread::sleep(Duration::from_millis(500));

    // 1. A certificate from another CA never gets past the handshake.
    let (ok, _, err) = wait(
        spawn(&["node", "--coordinator", &addr, "--tls-dir", other_s, "--name", "intruder"]),
        Duration::from_secs(60),
    );
    assert!(!ok && err.to_lowercase().contains("certificate"), "intruder: {err}");

    // 2. Other weights: the node recomputes the fingerprint and refuses its assignment.
    let (ok, _, err) = wait(
        spawn(&[
            "node",
            "--coordinator",
            &addr,
            "--tls-dir",
            tls_s,
            "--name",
            "other-weights",
            "--model",
            other_model.to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
    assert!(!ok && err.contains("fingerprint"), "other weights: {err}");

    // 3. Another protocol version: refused by the coordinator with a message saying so.
    let refusal = old_protocol_hello(&tls, &addr);
    assert!(refusal.contains("protocol version 0") && refusal.contains("ProtocolVersion"), "old protocol: {refusal}");

    // 4. A good node joins; the cluster serves, and the answer equals the in-process one.
    let good = spawn(&["node", "--coordinator", &addr, "--tls-dir", tls_s, "--name", "good"]);
    let (ok, out, err) = wait(coordinator, Duration::from_secs(120));
    assert!(ok, "coordinator: {err}");
    assert!(err.contains("refused"), "the coordinator logs its refusals: {err}");
    let _ = wait(good, Duration::from_secs(30));
    let local = run_lockstep(
        &[
            "generate",
            "--model",
            model_s,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "16",
            "--json",
            "--seed",
            "1",
        ],
        LIMIT,
    );
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let want: serde_json::Value = serde_json::from_str(stdout(&local).trim()).unwrap();
    assert_eq!(answer(&got), answer(&want));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Join as a node that says it speaks protocol version 0; return what the coordinator answers.
fn old_protocol_hello(tls: &Path, addr: &str) -> String {
    use lockstep_proto::wire::{Frame, Hello, Message};
    use lockstep_transport::certs::TlsIdentity;
    use lockstep_transport::{resolve, Endpoint, DEFAULT_SERVER_NAME};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let id = TlsIdentity::load(tls, "old-protocol").unwrap();
        let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &id).unwrap();
        let conn = ep.connect(resolve(addr).await.unwrap(), DEFAULT_SERVER_NAME).await.unwrap();
        let hello = Hello {
            protocol_version: 0,
            node_id: "old-protocol".into(),
            ring_addr: "127.0.0.1:9".into(),
            threads: 1,
            build: "old".into(),
        };
        conn.send(&Frame::Control(Message::Hello(hello))).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(20), conn.recv()).await {
            Ok(Ok(f)) => format!("{f:?}"),
            other => format!("no answer: {other:?}"),
        }
    })
}

#[test]
fn a_node_killed_mid_generation_fails_only_its_group_and_nothing_hangs() {
    let Some(model) = stories_dir("a_node_killed_mid_generation_fails_only_its_group_and_nothing_hangs") else {
        return;
    };
    let dir = scratch("cluster-kill");
    let prompts = prompts_file(&dir, &PROMPTS[..6]);
    let mut cmd = Command::new(lockstep_bin());
    cmd.args(["generate", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--json"])
        .args(["--max-tokens", "200", "--ignore-eos", "--max-context", "512", "--replicas", "2", "--node-threads", "1"])
        .env("LOCKSTEP_TEST_STEP_DELAY_MS", "15")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    // Wait for both nodes, let generation run a little, then kill one node outright.
    let start = Instant::now();
    let nodes = loop {
        let kids = child_pids(pid);
        if kids.len() >= 2 || start.elapsed() > Duration::from_secs(60) {
            break kids;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(nodes.len(), 2, "two node processes");
    std::thread::sleep(Duration::from_millis(1500));
    Command::new("kill").args(["-9", &nodes[0].to_string()]).status().unwrap();
    let (ok, out, err) = wait(child, Duration::from_secs(120));
    assert!(!ok, "a failed group makes the command fail");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6, "every prompt gets an answer line: {err}");
    let failed: Vec<usize> = (0..6).filter(|&i| lines[i]["finish_reason"] == "error").collect();
    let completed: Vec<usize> = (0..6).filter(|&i| lines[i]["finish_reason"] == "length").collect();
    assert_eq!(failed.len(), 3, "one replica's prompts fail: {out}");
    assert_eq!(completed.len(), 3, "the other replica's prompts complete");
    for &i in &failed {
        let e = lines[i]["error"].as_str().unwrap();
        assert!(e.contains("node-"), "the error names the failed node: {e}");
    }
    for &i in &completed {
        assert_eq!(lines[i]["token_ids"].as_array().unwrap().len(), 200);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
