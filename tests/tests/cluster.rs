//! Tensor-parallel clusters of real node processes on 127.0.0.1: the answer does not change by a
//! bit with the TP degree, the replica count or the load; bad joiners are refused with clear
//! errors while the cluster serves; a node killed mid-generation loses no request and no byte; a
//! rank that rejects a step's delta gets the step whole and the group serves on unchanged.

use std::path::Path;
use std::time::Duration;

use lockstep_test_env::{shared_model, smollm2_gguf, stories260k};
use lockstep_tests::{prompts_file, run_lockstep, scratch, stderr, stdout, Watched};

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
    generate_logged(model, prompts, extra).0
}

/// [`generate`]'s answers, and what the run wrote to stderr.
fn generate_logged(model: &Path, prompts: &Path, extra: &[&str]) -> (Vec<serde_json::Value>, String) {
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
    let err = stderr(&out);
    assert!(out.status.success(), "generate {extra:?} failed: {err}");
    (stdout(&out).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect(), err)
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
    let Some(model) = stories260k() else {
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

/// Guards GGUF on node processes: each rank of a TP=2 cluster loads its shard of stories260K's
/// GGUF file (q/k rows un-permuted, then sliced) and the answers equal the HF directory's, run in
/// process (the fingerprints differ: the files do).
#[test]
fn stories260k_gguf_on_a_tp_2_cluster_answers_like_the_hf_directory() {
    let Some(hf) = stories260k() else { return };
    let Some(gguf) = shared_model("stories260K/stories260K.gguf") else { return };
    let dir = scratch("cluster-gguf");
    let prompts = prompts_file(&dir, &PROMPTS[..3]);
    let sampling = ["--temperature", "0.8", "--seed", "7"];
    let want = generate(&hf, &prompts, &sampling);
    let mut args = sampling.to_vec();
    args.extend_from_slice(&["--tp", "2", "--node-threads", "1"]);
    let got = generate(&gguf, &prompts, &args);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(answer(g), answer(w), "prompt {i}");
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

/// Item 4 of issue 12: heads that are not a power of two. The `tiny-smollm2` preset has
/// SmolLM2-135M's 9 query / 3 KV heads, so its segment count is 6 (`3·2^k`) and TP 3 must give
/// TP 1's bits, greedy and seeded, alone and with staggered load; TP 2 must be refused clearly.
#[test]
fn nine_heads_tp_3_equals_tp_1_and_tp_2_is_refused() {
    let dir = scratch("cluster-tp3");
    let model = dir.join("tiny-smollm2");
    let out = run_lockstep(
        &[
            "model",
            "synth",
            "--preset",
            "tiny-smollm2",
            "--seed",
            "5",
            "--dtype",
            "bf16",
            "--out",
            model.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let prompts = prompts_file(&dir, &PROMPTS[..4]);
    for sampling in
        [&["--temperature", "0", "--ignore-eos"][..], &["--temperature", "0.7", "--seed", "3", "--ignore-eos"]]
    {
        let local = generate(&model, &prompts, sampling);
        let mut args = sampling.to_vec();
        args.extend_from_slice(&["--tp", "3", "--stagger-steps", "1", "--node-threads", "1"]);
        assert_same(&format!("TP 3 {sampling:?}"), &generate(&model, &prompts, &args), &local);
    }
    let args = ["generate", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--tp", "2"];
    let out = run_lockstep(&args, LIMIT);
    assert!(!out.status.success(), "TP 2 of 9 heads must be refused");
    assert!(stderr(&out).contains("tensor-parallel degree 2"), "unclear refusal: {}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The real SmolLM2-135M-Instruct GGUF, its Q4_1 weights kept in their blocks: three node
/// processes (9 query / 3 KV heads, a third each; row-parallel shares cut on whole blocks) give the
/// bits of one process, greedy and seeded, chat-templated, under staggered load.
#[test]
fn smollm2_gguf_q4_1_at_tp_3_equals_tp_1() {
    let Some(model) = smollm2_gguf() else { return };
    let dir = scratch("cluster-smollm2-tp3");
    let prompts =
        prompts_file(&dir, &["What is the capital of France?", "Write a haiku about rivers.", "Name three colors."]);
    for sampling in [&["--chat", "--temperature", "0"][..], &["--chat", "--temperature", "0.8", "--seed", "7"]] {
        let local = generate(&model, &prompts, sampling);
        let mut args = sampling.to_vec();
        args.extend_from_slice(&["--tp", "3", "--stagger-steps", "1", "--node-threads", "1"]);
        assert_same(&format!("SmolLM2 TP 3 {sampling:?}"), &generate(&model, &prompts, &args), &local);
        if sampling[2] == "0" {
            assert!(local[0]["text"].as_str().unwrap().contains("Paris"), "{}", local[0]["text"]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_replicas_of_tp_2_under_mixed_load_equal_tp_1() {
    let Some(model) = stories260k() else { return };
    let dir = scratch("cluster-replicas");
    let prompts = prompts_file(&dir, PROMPTS);
    let sampling = ["--temperature", "0.8", "--seed", "99"];
    let local = generate(&model, &prompts, &sampling);
    let mut args = sampling.to_vec();
    args.extend_from_slice(&["--tp", "2", "--replicas", "2", "--stagger-steps", "2", "--node-threads", "1"]);
    assert_same("R=2 x TP=2", &generate(&model, &prompts, &args), &local);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seconds any one process of these tests may take to start, join or finish.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// Create a cluster CA in `tls` with certificates for the coordinator and `nodes`.
fn certs(tls: &Path, nodes: &[&str]) {
    let tls = tls.to_str().unwrap();
    let mut calls =
        vec![vec!["certs", "init", "--dir", tls], vec!["certs", "issue", "--dir", tls, "--name", "coordinator"]];
    calls.extend(nodes.iter().map(|n| vec!["certs", "issue", "--dir", tls, "--name", n]));
    for args in calls {
        let o = run_lockstep(&args, LIMIT);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
}

/// Wait for a `--nodes static` coordinator to say where it listens; its QUIC address.
fn coordinator_addr(coordinator: &mut Watched) -> String {
    coordinator.wait_for_stderr(STEP_LIMIT, |line| {
        let (_, rest) = line.split_once("waiting for ")?;
        let addr = rest.split(" on ").nth(1)?.split_whitespace().next()?;
        Some(addr.trim_end_matches(':').to_string())
    })
}

#[test]
fn bad_joiners_are_refused_with_clear_errors_and_the_cluster_keeps_serving() {
    let Some(model) = stories260k() else {
        return;
    };
    let dir = scratch("cluster-bad-joiners");
    let (tls, other_ca) = (dir.join("tls"), dir.join("other-ca"));
    certs(&tls, &["good", "other-weights", "old-protocol"]);
    certs(&other_ca, &["intruder"]);
    let (tls_s, other_s) = (tls.to_str().unwrap(), other_ca.to_str().unwrap());
    let other_model = dir.join("other-model");
    let o = run_lockstep(&["model", "synth", "--preset", "tiny", "--out", other_model.to_str().unwrap()], LIMIT);
    assert!(o.status.success());
    let model_s = model.to_str().unwrap();
    let mut coordinator = Watched::lockstep(&[
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
        "127.0.0.1:0",
        "--join-timeout",
        "120",
    ]);
    let addr = coordinator_addr(&mut coordinator);

    // 1. A certificate from another CA never gets past the handshake.
    let (ok, _, err) = Watched::lockstep(&["node", "--coordinator", &addr, "--tls-dir", other_s, "--name", "intruder"])
        .wait(STEP_LIMIT);
    assert!(!ok && err.to_lowercase().contains("certificate"), "intruder: {err}");

    // 2. Other weights: the node recomputes the fingerprint and refuses its assignment.
    let (ok, _, err) = Watched::lockstep(&[
        "node",
        "--coordinator",
        &addr,
        "--tls-dir",
        tls_s,
        "--name",
        "other-weights",
        "--model",
        other_model.to_str().unwrap(),
    ])
    .wait(STEP_LIMIT);
    assert!(!ok && err.contains("fingerprint"), "other weights: {err}");

    // 3. Another protocol version: refused by the coordinator with a message saying so.
    let refusal = old_protocol_hello(&tls, &addr);
    assert!(refusal.contains("protocol version 0") && refusal.contains("ProtocolVersion"), "old protocol: {refusal}");

    // 4. A good node joins; the cluster serves, and the answer equals the in-process one.
    let good = Watched::lockstep(&["node", "--coordinator", &addr, "--tls-dir", tls_s, "--name", "good"]);
    let (ok, out, err) = coordinator.wait(STEP_LIMIT);
    assert!(ok, "coordinator: {err}");
    assert!(err.contains("refused"), "the coordinator logs its refusals: {err}");
    let _ = good.wait(Duration::from_secs(30));
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

/// Guards request migration across real processes: a node killed mid-generation takes its group
/// down, and that group's requests finish on the other replica with the bytes of a run without
/// the kill — greedy and seeded — and nothing fails.
#[test]
fn a_node_killed_mid_generation_loses_no_request_and_changes_no_byte() {
    let Some(model) = stories260k() else {
        return;
    };
    let dir = scratch("cluster-kill");
    let prompts = prompts_file(&dir, &PROMPTS[..6]);
    let tls = dir.join("tls");
    certs(&tls, &["node-a", "node-b"]);
    let tls_s = tls.to_str().unwrap();
    let (model_s, prompts_s) = (model.to_str().unwrap(), prompts.to_str().unwrap());
    for sampling in [&["--temperature", "0"][..], &["--temperature", "0.8", "--seed", "5"]] {
        let generate = ["generate", "--model", model_s, "--prompts", prompts_s, "--json", "--ignore-eos"];
        let sizes = ["--max-tokens", "200", "--max-context", "512"];
        let reference = {
            let out = run_lockstep(&[&generate[..], &sizes, sampling].concat(), LIMIT);
            assert!(out.status.success(), "{}", stderr(&out));
            stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<serde_json::Value>>()
        };
        let cluster = ["--replicas", "2", "--nodes", "static", "--tls-dir", tls_s, "--cluster-listen", "127.0.0.1:0"];
        let mut coordinator = Watched::lockstep(&[&generate[..], &sizes, sampling, &cluster].concat());
        let addr = coordinator_addr(&mut coordinator);
        // Every step takes at least 25 ms, so generating 200 tokens takes seconds: long enough for
        // the kill below to land while the groups generate.
        let node = |name: &str| {
            let delay = ["--step-delay-ms", "25", "--threads", "1"];
            Watched::lockstep(
                &[&["node", "--coordinator", &addr, "--tls-dir", tls_s, "--name", name][..], &delay].concat(),
            )
        };
        let (mut victim, survivor) = (node("node-a"), node("node-b"));
        coordinator.wait_for_stderr(STEP_LIMIT, |line| line.contains("group(s) ready").then_some(()));
        // Generation starts once both groups are ready; let a few of its steps run first.
        std::thread::sleep(Duration::from_millis(300));
        victim.kill();
        let (ok, out, err) = coordinator.wait(STEP_LIMIT);
        assert!(ok, "no request fails: {err}");
        assert!(err.contains("node node-a is down"), "the loss is reported: {err}");
        let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_same(&format!("kill {sampling:?}"), &lines, &reference);
        // The surviving node is shut down with its group when the coordinator exits.
        let _ = survivor.wait(STEP_LIMIT);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Guards the session step protocol's resync: a rank that rejects a step's delta (its session was
/// lost) gets the step again as a full snapshot, the group keeps serving, and every byte equals a
/// one-process run.
#[test]
fn a_rejected_step_delta_is_resent_whole_and_changes_no_byte() {
    let Some(model) = stories260k() else {
        return;
    };
    let dir = scratch("cluster-resync");
    let prompts = prompts_file(&dir, &PROMPTS[..3]);
    let tls = dir.join("tls");
    certs(&tls, &["node-a", "node-b"]);
    let tls_s = tls.to_str().unwrap();
    let reference = generate(&model, &prompts, &[]);
    let generate = ["generate", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--json"];
    let cluster =
        ["--max-tokens", "24", "--tp", "2", "--nodes", "static", "--tls-dir", tls_s, "--cluster-listen", "127.0.0.1:0"];
    let mut coordinator = Watched::lockstep(&[&generate[..], &cluster].concat());
    let addr = coordinator_addr(&mut coordinator);
    let node = |name: &str, extra: &[&str]| {
        let base = ["node", "--coordinator", &addr, "--tls-dir", tls_s, "--name", name, "--threads", "1"];
        Watched::lockstep(&[&base[..], extra].concat())
    };
    let _a = node("node-a", &["--forget-session-at-step", "5"]);
    let _b = node("node-b", &[]);
    let (ok, out, err) = coordinator.wait(LIMIT);
    assert!(ok, "generation succeeds: {err}");
    assert!(
        err.contains("rejected step 5") && err.contains("sending it as a full snapshot"),
        "the resync is logged: {err}"
    );
    assert!(!err.contains("stopped serving"), "the group keeps serving: {err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_same("resync", &lines, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A static node that dies and is restarted under the same name (as systemd would) rejoins: the
/// coordinator reports 503 with the reason while no group serves, and serves again once it is
/// back — nobody restarts the coordinator.
#[test]
fn a_static_node_restarted_under_the_same_name_rejoins() {
    let Some(model) = stories260k() else {
        return;
    };
    let dir = scratch("cluster-rejoin");
    let tls = dir.join("tls");
    certs(&tls, &["node-a"]);
    let tls_s = tls.to_str().unwrap();
    let serve = ["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--no-h3"];
    let cluster = ["--nodes", "static", "--tls-dir", tls_s, "--cluster-listen", "127.0.0.1:0", "--canary-every", "0"];
    let timing = ["--node-timeout-ms", "1000", "--queue-timeout-s", "60"];
    let mut coordinator = Watched::lockstep(&[&serve[..], &cluster, &timing].concat());
    let addr = coordinator_addr(&mut coordinator);
    let node = || {
        Watched::lockstep(&["node", "--coordinator", &addr, "--tls-dir", tls_s, "--name", "node-a", "--threads", "1"])
    };
    let mut first = node();
    let http_addr = coordinator.wait_for_stderr(STEP_LIMIT, |line| {
        line.split("listening on http://").nth(1).map(|r| r.split_whitespace().next().unwrap_or("").to_string())
    });
    let health = || lockstep_tests::http(&http_addr, "GET", "/health", None, LIMIT);
    let complete = || {
        let body = r#"{"model":"stories260K","prompt":"Once upon a time","max_tokens":12,"temperature":0}"#;
        lockstep_tests::http(&http_addr, "POST", "/v1/completions", Some(body), LIMIT)
    };
    assert_eq!(health().0, 200);
    let (status, before) = complete();
    assert_eq!(status, 200, "{before}");
    first.kill();
    let deadline = std::time::Instant::now() + STEP_LIMIT;
    loop {
        let (status, body) = health();
        if status == 503 {
            assert!(body.contains("node-a"), "the reason names the lost node: {body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "/health never said the group was gone");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _second = node();
    // A request sent while no group serves waits for the node to come back.
    let (status, after) = complete();
    assert_eq!(status, 200, "{after}");
    let text = |b: &str| serde_json::from_str::<serde_json::Value>(b).unwrap()["choices"][0]["text"].clone();
    assert_eq!(text(&after), text(&before), "the same answer from the rejoined node");
    assert_eq!(health().0, 200);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ring lines of `stderr` that say how a rank's frames travel (one per rank per formation).
fn ring_paths(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("frames to successor")).collect()
}

/// Guards the same-host ring path (issue #11): a TP 2 group of embedded nodes on one machine moves
/// both ring directions onto same-host sockets under the default `--ring-transport auto`, stays
/// on QUIC under `quic`, and both give exactly the one-process answers.
#[test]
fn a_tp_2_group_on_one_host_rings_over_same_host_sockets_with_tp_1_bits() {
    let Some(model) = stories260k() else {
        return;
    };
    let dir = scratch("cluster-same-host");
    let prompts = prompts_file(&dir, &PROMPTS[..4]);
    let sampling = ["--temperature", "0.8", "--seed", "7"];
    let local = generate(&model, &prompts, &sampling);
    for (transport, path, other) in [("auto", "on same-host socket", "on QUIC"), ("quic", "on QUIC", "on same-host")] {
        let tp2 = [&sampling[..], &["--tp", "2", "--node-threads", "1", "--ring-transport", transport]].concat();
        let (got, err) = generate_logged(&model, &prompts, &tp2);
        let lines = ring_paths(&err);
        assert_eq!(lines.len(), 2, "one ring line per rank: {err}");
        for l in lines {
            assert!(l.contains(path) && !l.contains(other), "--ring-transport {transport}: {l}");
        }
        assert_same(&format!("TP 2 --ring-transport {transport}"), &got, &local);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Guards pinning (issue #11): embedded TP 2 nodes get CPUs of their own under the default
/// `--pin-nodes auto` where two fit, none under `off`, and both give exactly the one-process
/// answers.
#[test]
fn a_tp_2_group_pinned_or_left_to_the_scheduler_gives_tp_1_bits() {
    let Some(model) = stories260k() else {
        return;
    };
    let dir = scratch("cluster-pinned");
    let prompts = prompts_file(&dir, &PROMPTS[..3]);
    let sampling = ["--temperature", "0.8", "--seed", "11"];
    let local = generate(&model, &prompts, &sampling);
    // The CPUs the coordinator may use, as it counts them.
    let cpus = lockstep_node::affinity::allowed_cpus().unwrap().len();
    for (pin, pinned) in [("auto", cpus >= 2), ("off", false)] {
        let tp2 = [&sampling[..], &["--tp", "2", "--node-threads", "1", "--pin-nodes", pin]].concat();
        let (got, err) = generate_logged(&model, &prompts, &tp2);
        assert_eq!(err.contains("pinning 2 embedded nodes"), pinned, "--pin-nodes {pin} on {cpus} CPUs: {err}");
        assert_same(&format!("TP 2 --pin-nodes {pin}"), &got, &local);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Guards failing fast by name on the same-host path: a rank killed mid-generation closes its
/// sockets in the kernel, and the survivor's step fails on the socket, naming it. The node timeout
/// is a minute, so only the ring can have reported the loss (the kill may land between the
/// victim's last ring frame of a step and its answer: the next test pins that moment).
#[test]
fn a_rank_killed_mid_step_fails_its_same_host_neighbour_by_name() {
    survivor_names_its_lost_same_host_neighbour("cluster-same-host-kill", &[], true);
}

/// Guards the report between steps: a rank that dies after its last ring frame of a step, before
/// answering it, leaves its neighbour idle and the coordinator waiting on that step. The survivor
/// must notice the closed socket while it waits for the next plan and report it, rather than the
/// group waiting for the transport's idle timeout on the dead node's connection (the CI failure of
/// stop 22 was that race, hit by a random kill).
#[test]
fn a_rank_dead_after_its_last_ring_frame_is_named_by_its_idle_neighbour() {
    survivor_names_its_lost_same_host_neighbour("cluster-same-host-die", &["--die-after-step", "4"], false);
}

/// A TP 2 group of two nodes on same-host sockets; node-a (`victim_aids`) is lost, by a kill when
/// `kill`, and the coordinator must stop the group on node-b's report naming node-a.
fn survivor_names_its_lost_same_host_neighbour(scratch_name: &str, victim_aids: &[&str], kill: bool) {
    let Some(model) = stories260k() else {
        return;
    };
    let dir = scratch(scratch_name);
    let prompts = prompts_file(&dir, &PROMPTS[..4]);
    let tls = dir.join("tls");
    certs(&tls, &["node-a", "node-b"]);
    let tls_s = tls.to_str().unwrap();
    let generate = ["generate", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()];
    let sizes = ["--max-tokens", "200", "--max-context", "512", "--ignore-eos", "--tp", "2"];
    let cluster = ["--nodes", "static", "--tls-dir", tls_s, "--cluster-listen", "127.0.0.1:0"];
    let timing = ["--node-timeout-ms", "60000"];
    let mut coordinator = Watched::lockstep(&[&generate[..], &sizes, &cluster, &timing].concat());
    let addr = coordinator_addr(&mut coordinator);
    let node = |name: &str, aids: &[&str]| {
        let delay = ["--step-delay-ms", "25", "--threads", "1"];
        let args = [&["node", "--coordinator", &addr, "--tls-dir", tls_s, "--name", name][..], &delay, aids].concat();
        Watched::lockstep(&args)
    };
    let (mut victim, mut survivor) = (node("node-a", victim_aids), node("node-b", &[]));
    let formed =
        survivor.wait_for_stderr(STEP_LIMIT, |line| line.contains("frames to successor").then(|| line.to_owned()));
    assert!(formed.contains("on same-host socket"), "{formed}");
    coordinator.wait_for_stderr(STEP_LIMIT, |line| line.contains("group(s) ready").then_some(()));
    if kill {
        std::thread::sleep(Duration::from_millis(300));
        victim.kill();
    }
    let stopped =
        coordinator.wait_for_stderr(STEP_LIMIT, |line| line.contains("stopped serving").then(|| line.to_owned()));
    assert!(
        stopped.contains("node node-b (rank") && stopped.contains("node-a is gone") && stopped.contains("socket"),
        "the survivor's step failed on the socket, naming the lost node: {stopped}"
    );
    drop(survivor);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
}
