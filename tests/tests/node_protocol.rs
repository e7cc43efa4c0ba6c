//! The node's side of the control protocol, against real `lockstep node` processes on 127.0.0.1,
//! with this test playing the coordinator frame by frame: nodes answer heartbeats while they
//! form a ring, drop an assignment on `Release` and take another on the same connection (new
//! ranks, new ring) with identical answers, report a panicking step at once — the panicking
//! node by the panic's message, its ring neighbour by the name of the node that went away — and
//! reject a step delta that does not fit their session, then run the step sent whole with the
//! bits the delta would have given.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lockstep_kernels::sampling::merge_shard_samples;
use lockstep_kernels::{CpuBackend, KernelMode, SampleRequest, SampledToken, SamplingParams, ShardSample};
use lockstep_node::fingerprint::deployment_fingerprint;
use lockstep_node::shard::auto_reduce_segments;
use lockstep_node::{ModelConfig, WeightStore};
use lockstep_proto::session::{SessionMirror, SessionState};
use lockstep_proto::step::{SeqChunk, StepPlan};
use lockstep_proto::wire::{Assignment, Frame, Message, RefuseCode};
use lockstep_tests::{lockstep_bin, scratch};
use lockstep_transport::certs::{init_ca, issue, TlsIdentity};
use lockstep_transport::{Conn, Endpoint};

/// Hang guard for any one answer from a node (loading stories260K takes milliseconds).
const ANSWER_LIMIT: Duration = Duration::from_secs(60);
/// Hang guard for the answers to a step that fails because a rank panicked: below the ring's
/// all-reduce timeout (30 s), so a neighbour that notices only by timing out fails the test.
const FAILED_STEP_LIMIT: Duration = Duration::from_secs(20);
const BLOCK_SIZE: u32 = 16;

/// A `lockstep node` process, killed if the test ends without it having exited.
struct NodeProcess {
    child: Child,
    log: PathBuf,
}

impl NodeProcess {
    fn spawn(dir: &Path, coordinator: &str, name: &str, extra: &[&str]) -> NodeProcess {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(lockstep_bin())
            .args(["node", "--coordinator", coordinator, "--tls-dir", dir.join("tls").to_str().unwrap()])
            .args(["--name", name, "--threads", "1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn lockstep node");
        NodeProcess { child, log }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the process to exit.
    async fn exited(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < ANSWER_LIMIT, "node did not exit; its log:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node as the coordinator sees it.
struct Node {
    name: String,
    ring_addr: String,
    conn: Conn,
    process: NodeProcess,
}

impl Node {
    async fn send(&self, m: Message) {
        self.conn.send(&Frame::Control(m)).await.unwrap_or_else(|e| panic!("send to {}: {e}", self.name));
    }

    async fn recv_within(&self, limit: Duration) -> Message {
        match tokio::time::timeout(limit, self.conn.recv()).await {
            Ok(Ok(Frame::Control(m))) => m,
            other => panic!("{}: expected a message, got {other:?}; its log:\n{}", self.name, self.process.stderr()),
        }
    }

    async fn recv(&self) -> Message {
        self.recv_within(ANSWER_LIMIT).await
    }

    async fn heartbeat(&self, seq: u64) {
        self.send(Message::Heartbeat { seq, sent_unix_ns: seq * 1000 }).await;
    }

    async fn expect_ack(&self, seq: u64) {
        let m = self.recv().await;
        assert_eq!(m, Message::HeartbeatAck { seq, sent_unix_ns: seq * 1000 }, "{}", self.name);
    }

    async fn expect_ready(&self, rank: u32, fingerprint: &str) {
        match self.recv().await {
            Message::Ready { rank: r, fingerprint: f, .. } => {
                assert_eq!((r, f.as_str()), (rank, fingerprint), "{}", self.name)
            }
            other => panic!("{}: expected Ready, got {other:?}; its log:\n{}", self.name, self.process.stderr()),
        }
    }

    async fn expect_step_done(&self, step_id: u64) -> Vec<(u64, ShardSample)> {
        match self.recv().await {
            Message::StepDone { step_id: s, samples } if s == step_id => samples,
            other => {
                panic!("{}: expected StepDone {step_id}, got {other:?}; its log:\n{}", self.name, self.process.stderr())
            }
        }
    }

    async fn expect_step_rejected(&self, step_id: u64) -> String {
        match self.recv().await {
            Message::StepRejected { step_id: s, message } if s == step_id => message,
            other => panic!("{}: expected StepRejected {step_id}, got {other:?}", self.name),
        }
    }

    async fn expect_step_failed(&self, step_id: u64) -> String {
        match self.recv_within(FAILED_STEP_LIMIT).await {
            Message::StepFailed { step_id: s, message } if s == step_id => message,
            other => panic!("{}: expected StepFailed {step_id}, got {other:?}", self.name),
        }
    }
}

/// The test's coordinator: a CA, an endpoint, the model and its fingerprint.
struct Coordinator {
    dir: PathBuf,
    endpoint: Endpoint,
    model: PathBuf,
    fingerprint: String,
    reduce_segments: u32,
}

impl Coordinator {
    fn new(dir: PathBuf, model: PathBuf, nodes: &[&str]) -> Coordinator {
        let tls = dir.join("tls");
        init_ca(&tls).unwrap();
        for name in nodes.iter().chain(&["coordinator"]) {
            issue(&tls, name).unwrap();
        }
        let cfg = ModelConfig::from_dir(&model).unwrap();
        let reduce_segments = auto_reduce_segments(&cfg);
        let repo = WeightStore::open(&model).unwrap();
        let (fingerprint, _) = deployment_fingerprint(
            &repo,
            &cfg,
            CpuBackend::fingerprint_name_for(KernelMode::Invariant),
            reduce_segments,
            lockstep_kernels::DEFAULT_KV_CHUNK,
        )
        .unwrap();
        let endpoint =
            Endpoint::bind("127.0.0.1:0".parse().unwrap(), &TlsIdentity::load(&tls, "coordinator").unwrap()).unwrap();
        Coordinator { dir, endpoint, model, fingerprint, reduce_segments: reduce_segments as u32 }
    }

    /// Starts `lockstep node` processes, accepts them, reads their hellos and welcomes them.
    async fn join(&self, nodes: &[(&str, &[&str])]) -> Vec<Node> {
        let addr = self.endpoint.local_addr().unwrap().to_string();
        let mut processes: Vec<Option<NodeProcess>> =
            nodes.iter().map(|(name, extra)| Some(NodeProcess::spawn(&self.dir, &addr, name, extra))).collect();
        let mut joined: Vec<Option<Node>> = nodes.iter().map(|_| None).collect();
        for _ in nodes {
            let conn = tokio::time::timeout(ANSWER_LIMIT, self.endpoint.accept())
                .await
                .expect("a node connects")
                .expect("endpoint open")
                .expect("node accepted");
            let i = nodes.iter().position(|(n, _)| *n == conn.peer_name()).expect("a node of this test");
            let hello = match tokio::time::timeout(ANSWER_LIMIT, conn.recv()).await {
                Ok(Ok(Frame::Control(Message::Hello(h)))) => h,
                other => panic!("expected Hello, got {other:?}"),
            };
            assert_eq!(hello.node_id, nodes[i].0);
            conn.send(&Frame::Control(Message::Welcome { coordinator_id: "test".into() })).await.unwrap();
            let process = processes[i].take().unwrap();
            joined[i] = Some(Node { name: hello.node_id, ring_addr: hello.ring_addr, conn, process });
        }
        joined.into_iter().map(Option::unwrap).collect()
    }

    /// Rank `rank` of a TP group whose members are `ring` in rank order.
    fn assignment(&self, group: u32, ring: &[&Node], rank: usize) -> Assignment {
        let tp = ring.len();
        Assignment {
            group,
            rank: rank as u32,
            tp: tp as u32,
            model_dir: self.model.to_string_lossy().into_owned(),
            reduce_segments: self.reduce_segments,
            kv_chunk: lockstep_kernels::DEFAULT_KV_CHUNK as u32,
            kernel_mode: KernelMode::Invariant,
            block_size: BLOCK_SIZE,
            num_blocks: 8,
            max_context: 128,
            expected_fingerprint: self.fingerprint.clone(),
            ring_next: ring[(rank + 1) % tp].ring_addr.clone(),
            ring_prev_node: ring[(rank + tp - 1) % tp].name.clone(),
        }
    }

    /// Forms group `group` of `ring` (rank order). Each member gets a heartbeat right after its
    /// assignment; rank 0 is assigned alone first, and since its ring cannot form before the
    /// others are assigned, its acknowledgement must come while it is still preparing.
    async fn form(&self, group: u32, ring: &[&Node], seq: u64) {
        ring[0].send(Message::Assign(self.assignment(group, ring, 0))).await;
        ring[0].heartbeat(seq).await;
        ring[0].expect_ack(seq).await;
        for (rank, node) in ring.iter().enumerate().skip(1) {
            node.send(Message::Assign(self.assignment(group, ring, rank))).await;
            node.heartbeat(seq).await;
        }
        for (rank, node) in ring.iter().enumerate() {
            if rank > 0 {
                // Either order: this rank's ring may already be complete.
                let mut got = [node.recv().await, node.recv().await];
                got.sort_by_key(|m| m.name() != "HeartbeatAck");
                assert_eq!(got[0], Message::HeartbeatAck { seq, sent_unix_ns: seq * 1000 }, "{}", node.name);
                assert!(
                    matches!(&got[1], Message::Ready { rank: r, fingerprint, .. } if *r == rank as u32 && *fingerprint == self.fingerprint),
                    "{}: {:?}",
                    node.name,
                    got[1]
                );
            } else {
                node.expect_ready(0, &self.fingerprint).await;
            }
        }
    }
}

/// A one-sequence prefill of a few tokens, sampled greedily.
fn prefill(step_id: u64) -> StepPlan {
    StepPlan {
        step_id,
        chunks: vec![SeqChunk {
            seq_id: 7,
            tokens: vec![1, 403, 407, 261, 378, 29],
            first_pos: 0,
            block_table: vec![0],
            sample: Some(SampleRequest { params: SamplingParams::greedy(), step: 0 }),
        }],
    }
}

/// The decode step after [`prefill`]: `token` at position 6, the sequence's second sample.
fn decode(step_id: u64, token: u32) -> StepPlan {
    let chunk = prefill(step_id).chunks.remove(0);
    StepPlan {
        step_id,
        chunks: vec![SeqChunk {
            tokens: vec![token],
            first_pos: 6,
            sample: Some(SampleRequest { params: SamplingParams::greedy(), step: 1 }),
            ..chunk
        }],
    }
}

/// Runs `plan` on every rank of `ring`, sent whole; returns each rank's report, in rank order.
async fn step(ring: &[&Node], plan: &StepPlan) -> Vec<Vec<(u64, ShardSample)>> {
    for node in ring {
        node.send(Message::Step(SessionState::snapshot(plan))).await;
    }
    answers(ring, plan).await
}

/// Each rank's report on `plan`, in rank order.
async fn answers(ring: &[&Node], plan: &StepPlan) -> Vec<Vec<(u64, ShardSample)>> {
    let mut out = Vec::new();
    for node in ring {
        out.push(node.expect_step_done(plan.step_id).await);
    }
    out
}

/// The token the coordinator would pick from the ranks' reports.
fn merged(reports: &[Vec<(u64, ShardSample)>], plan: &StepPlan) -> SampledToken {
    let req = plan.chunks[0].sample.unwrap();
    let shards: Vec<&ShardSample> = reports.iter().map(|r| &r[0].1).collect();
    assert!(reports.iter().all(|r| r.len() == 1 && r[0].0 == plan.chunks[0].seq_id));
    merge_shard_samples(&shards, &req)
}

/// Every test body is bounded: a hang is a failure, not a stuck CI job.
async fn bounded<F: std::future::Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(240), body).await.expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_answer_heartbeats_while_forming_and_reform_on_release_with_identical_answers() {
    let Some(model) = lockstep_test_env::stories260k() else {
        return;
    };
    let dir = scratch("node-protocol-reform");
    let coordinator = Coordinator::new(dir.clone(), model, &["node-a", "node-b"]);
    bounded(async {
        let mut nodes = coordinator.join(&[("node-a", &[]), ("node-b", &[])]).await;
        let (a, b) = (&nodes[0], &nodes[1]);

        // A formation abandoned half way: node-a is assigned, dials node-b and waits for it,
        // answering heartbeats; released, it waits again, still answering.
        a.send(Message::Assign(coordinator.assignment(1, &[a, b], 0))).await;
        a.heartbeat(1).await;
        a.expect_ack(1).await;
        a.send(Message::Release { reason: "group 1 stopped: the test abandons it".into() }).await;
        a.heartbeat(2).await;
        a.expect_ack(2).await;

        // TP 2 with node-a as rank 0 (node-b may still hold node-a's connection for group 1).
        coordinator.form(2, &[a, b], 3).await;
        let plan = prefill(1);
        let first = step(&[a, b], &plan).await;

        // Release both; they stay connected and answer nothing but heartbeats.
        for n in [a, b] {
            n.send(Message::Release { reason: "group 2 stopped: re-forming".into() }).await;
            n.heartbeat(4).await;
            n.expect_ack(4).await;
        }

        // Ranks swapped: a new ring in the other direction, the same answer bit for bit.
        coordinator.form(3, &[b, a], 5).await;
        let plan2 = StepPlan { step_id: 2, ..plan.clone() };
        let second = step(&[b, a], &plan2).await;
        assert_eq!(second, first, "each rank's shard report is identical after re-forming with swapped ranks");
        let (t1, t2) = (merged(&first, &plan), merged(&second, &plan2));
        assert_eq!((t1.id, t1.logprob.to_bits()), (t2.id, t2.logprob.to_bits()));

        for n in &nodes {
            n.send(Message::Shutdown).await;
        }
        for n in &mut nodes {
            let status = n.process.exited().await;
            assert!(status.success(), "{} exits 0 on Shutdown: {status}; its log:\n{}", n.name, n.process.stderr());
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_fails_at_once_on_every_rank_and_the_nodes_serve_again() {
    let Some(model) = lockstep_test_env::stories260k() else {
        return;
    };
    let dir = scratch("node-protocol-panic");
    let coordinator = Coordinator::new(dir.clone(), model, &["node-a", "node-b"]);
    bounded(async {
        let mut nodes = coordinator.join(&[("node-a", &["--panic-at-step", "2"]), ("node-b", &[])]).await;
        let (a, b) = (&nodes[0], &nodes[1]);
        coordinator.form(1, &[a, b], 1).await;
        let first = step(&[a, b], &prefill(1)).await;

        // Step 2 panics on node-a: it says so, and node-b, blocked in the all-reduce, fails as
        // soon as node-a drops the ring, naming node-a rather than waiting for a timeout.
        for n in [a, b] {
            n.send(Message::Step(SessionState::snapshot(&prefill(2)))).await;
        }
        let panicked = a.expect_step_failed(2).await;
        assert!(panicked.starts_with("panic: ") && panicked.contains("--panic-at-step 2"), "node-a: {panicked}");
        let neighbour = b.expect_step_failed(2).await;
        assert!(neighbour.contains("node-a") && !neighbour.contains("within"), "node-b: {neighbour}");

        // node-a released itself: it is alive, and a Step now is refused, not left hanging.
        a.heartbeat(2).await;
        a.expect_ack(2).await;
        a.send(Message::Step(SessionState::snapshot(&prefill(3)))).await;
        assert!(a.expect_step_failed(3).await.contains("no ready assignment"));

        // The coordinator releases the failed group (a no-op for node-a) and forms a new one.
        for n in [a, b] {
            n.send(Message::Release { reason: "group 1 stopped: node-a failed a step".into() }).await;
        }
        coordinator.form(2, &[a, b], 3).await;
        let again = step(&[a, b], &prefill(4)).await;
        assert_eq!(again, first, "the nodes serve again, with the same answer");

        // Closing the coordinator connection ends the node processes.
        coordinator.endpoint.close("test over");
        for n in &mut nodes {
            n.process.exited().await;
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Guards the numerics in the fingerprint: a node assigned native numerics (AMX, `native-amx`)
/// while the coordinator expects the portable deployment's fingerprint refuses with
/// `Fingerprint` on any CPU, so a group never mixes native and portable ranks; assigned native
/// numerics under the native fingerprint, it serves where the CPU has AMX and elsewhere refuses,
/// naming what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_assigned_native_numerics_never_answers_to_the_portable_fingerprint() {
    let Some(model) = lockstep_test_env::stories260k() else {
        return;
    };
    let dir = scratch("node-protocol-native");
    let coordinator = Coordinator::new(dir.clone(), model.clone(), &["node-n", "node-m"]);
    let cfg = ModelConfig::from_dir(&model).unwrap();
    let (native_fingerprint, _) = deployment_fingerprint(
        &WeightStore::open(&model).unwrap(),
        &cfg,
        CpuBackend::fingerprint_name_for(KernelMode::Native),
        coordinator.reduce_segments as usize,
        lockstep_kernels::DEFAULT_KV_CHUNK,
    )
    .unwrap();
    assert_ne!(native_fingerprint, coordinator.fingerprint, "a native class names its own deployment");
    bounded(async {
        let mut nodes = coordinator.join(&[("node-n", &[]), ("node-m", &[])]).await;
        let (n, m) = (&nodes[0], &nodes[1]);

        let mixed = Assignment { kernel_mode: KernelMode::Native, ..coordinator.assignment(1, &[n], 0) };
        n.send(Message::Assign(mixed)).await;
        match n.recv().await {
            Message::Refused { code: RefuseCode::Fingerprint, message } => {
                assert!(message.contains(&coordinator.fingerprint), "node-n: {message}")
            }
            other => panic!("node-n: expected Refused(Fingerprint), got {other:?}"),
        }

        let native = Assignment {
            kernel_mode: KernelMode::Native,
            expected_fingerprint: native_fingerprint.clone(),
            ..coordinator.assignment(2, &[m], 0)
        };
        m.send(Message::Assign(native)).await;
        match lockstep_kernels::cpu::native_exec() {
            Ok(_) => m.expect_ready(0, &native_fingerprint).await,
            Err(_) => match m.recv().await {
                Message::Refused { code: RefuseCode::BadRequest, message } => {
                    assert!(message.contains("cpu native numerics need AMX"), "node-m: {message}");
                    assert!(message.contains("--numerics portable"), "node-m: {message}");
                }
                other => panic!("node-m: expected Refused(BadRequest), got {other:?}"),
            },
        }

        coordinator.endpoint.close("test over");
        for node in &mut nodes {
            node.process.exited().await;
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_that_does_not_fit_the_session_is_rejected_and_the_snapshot_gives_the_same_bits() {
    let Some(model) = lockstep_test_env::stories260k() else {
        return;
    };
    let dir = scratch("node-protocol-session");
    let coordinator = Coordinator::new(dir.clone(), model, &["node-a", "node-b"]);
    bounded(async {
        let nodes = coordinator.join(&[("node-a", &[]), ("node-b", &[])]).await;
        let (a, b) = (&nodes[0], &nodes[1]);

        // Reference: prefill, then the decode step as a delta that both ranks accept.
        coordinator.form(1, &[a, b], 1).await;
        let mut mirror = SessionMirror::new();
        let p1 = prefill(1);
        let d1 = mirror.delta(&p1);
        for n in [a, b] {
            n.send(Message::Step(d1.clone())).await;
        }
        let token = merged(&answers(&[a, b], &p1).await, &p1).id;
        let p2 = decode(2, token);
        let d2 = mirror.delta(&p2);
        assert!(!d2.is_snapshot() && d2.chunks[0].tokens == [token]);
        for n in [a, b] {
            n.send(Message::Step(d2.clone())).await;
        }
        let want = answers(&[a, b], &p2).await;

        // A fresh group: node-a gets a delta built on a step it never saw, node-b the right one.
        for n in [a, b] {
            n.send(Message::Release { reason: "group 1 stopped: the test re-forms".into() }).await;
        }
        coordinator.form(2, &[a, b], 2).await;
        let mut mirror = SessionMirror::new();
        let p1 = prefill(11);
        let d1 = mirror.delta(&p1);
        for n in [a, b] {
            n.send(Message::Step(d1.clone())).await;
        }
        answers(&[a, b], &p1).await;
        let p2 = decode(12, token);
        let d2 = mirror.delta(&p2);
        let gap = lockstep_proto::session::PlanDelta { base_step: Some(10), ..d2.clone() };
        a.send(Message::Step(gap)).await;
        b.send(Message::Step(d2)).await;
        let why = a.expect_step_rejected(12).await;
        assert!(why.contains("builds on step 10") && why.contains("11"), "node-a: {why}");
        // node-b waits in the step's first all-reduce; node-a gets the step whole and joins it.
        a.send(Message::Step(SessionState::snapshot(&p2))).await;
        let got = answers(&[a, b], &p2).await;
        assert_eq!(got, want, "the resent step gives each rank the report of the accepted delta");
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
