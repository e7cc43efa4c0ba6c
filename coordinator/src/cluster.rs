//! The tensor-parallel cluster as the coordinator sees it.
//!
//! Nodes dial the coordinator over mutual-TLS QUIC and say `Hello`. A *registrar* task admits
//! them into tensor-parallel groups in arrival order (rank = order of arrival within the group),
//! and once a group is full sends every member its `Assign`ment: the model, its rank, the
//! numerics and its ring neighbours. Each node loads only its shard, forms the ring, recomputes
//! the determinism fingerprint from the files it actually has and answers `Ready` — or refuses,
//! and is dropped with the reason logged on both sides. A node speaking another protocol version,
//! or joining when every slot is taken, is refused; a peer without a certificate from the cluster
//! CA never gets past the TLS handshake. The registrar keeps running after start-up, so bad
//! joiners are turned away while the cluster serves.
//!
//! Each ready group is driven through a [`GroupExecutor`], the [`StepExecutor`] of the engine
//! loop: a step goes to every rank, every rank answers with its vocab shard's sampling report,
//! and the coordinator merges them in rank order (never seeing logits). A node that disconnects
//! or fails a step takes its group down: the step fails with an error naming the node, and the
//! engine fails that group's requests. Other groups keep serving.
//!
//! `--nodes embedded` (the default) spawns the `T × R` node processes itself on loopback, with a
//! throwaway cluster CA; `--nodes static` waits for nodes started elsewhere with `lockstep node`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use lockstep_kernels::{merge_shard_samples, ShardSample};
use lockstep_node::certs::{init_ca, issue, TlsIdentity};
use lockstep_node::net::{Conn, ConnSender, Endpoint};
use lockstep_proto::step::{StepPlan, StepResult};
use lockstep_proto::wire::{Assignment, Frame, Hello, Message, RefuseCode, PROTOCOL_VERSION};

use crate::engine::{EngineOptions, ExecError, ModelInfo, StepExecutor};

/// Longest a step may take before its group is declared down.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the coordinator pings every node.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a joiner has to say `Hello` after its connection is accepted.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an assigned node has to load its shard, form the ring and answer `Ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodesMode {
    /// Spawn the node processes locally on loopback.
    Embedded,
    /// Wait for nodes started elsewhere with `lockstep node`.
    Static,
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub model_dir: PathBuf,
    pub tp: usize,
    pub replicas: usize,
    /// The coordinator's QUIC address for nodes.
    pub listen: SocketAddr,
    pub nodes: NodesMode,
    /// Cluster CA and certificates. Embedded mode creates a throwaway one when absent.
    pub tls_dir: Option<PathBuf>,
    pub engine: EngineOptions,
    /// Kernel threads per node (embedded mode).
    pub node_threads: usize,
    /// How long to wait for every group to be ready.
    pub join_timeout: Duration,
}

/// What the coordinator knows about one node (for the ops API and error messages).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub group: usize,
    pub rank: usize,
    pub ring_addr: String,
    pub state: String,
    pub last_heartbeat_ms_ago: Option<u64>,
    pub rtt_us: u64,
    pub fingerprint: String,
}

struct Member {
    name: String,
    rank: usize,
    conn: ConnSender,
    raw: Arc<Conn>,
    inbox: Mutex<std_mpsc::Receiver<NodeEvent>>,
    last_ack: Arc<Mutex<Option<Instant>>>,
    ring_addr: String,
    fingerprint: String,
}

enum NodeEvent {
    Done { step_id: u64, samples: Vec<(u64, ShardSample)> },
    Failed { step_id: u64, message: String },
    Gone(String),
}

/// One ready tensor-parallel group.
pub struct Group {
    pub id: usize,
    members: Vec<Member>,
    down: AtomicBool,
    down_reason: Mutex<Option<String>>,
}

impl Group {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
    pub fn down_reason(&self) -> Option<String> {
        self.down_reason.lock().expect("lock").clone()
    }
    fn mark_down(&self, reason: String) {
        if !self.down.swap(true, Ordering::SeqCst) {
            eprintln!("[coordinator] group {} is down: {reason}", self.id);
            *self.down_reason.lock().expect("lock") = Some(reason);
        }
    }
    pub fn status(&self) -> Vec<NodeStatus> {
        let down = self.is_down();
        self.members
            .iter()
            .map(|m| NodeStatus {
                name: m.name.clone(),
                group: self.id,
                rank: m.rank,
                ring_addr: m.ring_addr.clone(),
                state: if down { "down".into() } else { "ready".into() },
                last_heartbeat_ms_ago: m.last_ack.lock().expect("lock").map(|t| t.elapsed().as_millis() as u64),
                rtt_us: m.raw.rtt().as_micros() as u64,
                fingerprint: m.fingerprint.clone(),
            })
            .collect()
    }
}

/// A running cluster: the coordinator endpoint, the registrar, the groups, and (embedded) the
/// node processes, which are killed when the cluster is dropped.
pub struct Cluster {
    rt: Option<tokio::runtime::Runtime>,
    pub info: ModelInfo,
    pub addr: SocketAddr,
    pub tls_dir: PathBuf,
    groups: Vec<Arc<Group>>,
    children: Mutex<Vec<Child>>,
    throwaway_tls: bool,
    endpoint: Arc<Endpoint>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let parts = Shutdown {
            rt: self.rt.take(),
            groups: std::mem::take(&mut self.groups),
            children: std::mem::take(&mut *self.children.lock().expect("lock")),
            endpoint: self.endpoint.clone(),
            tls_dir: self.throwaway_tls.then(|| self.tls_dir.clone()),
        };
        // Blocking on (and dropping) a runtime is not allowed from inside another runtime's
        // worker, which is where the last handle to a serving cluster is often dropped.
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || parts.run()).join();
        } else {
            parts.run();
        }
    }
}

/// Everything a cluster shutdown needs, owned, so it can run on a plain thread.
struct Shutdown {
    rt: Option<tokio::runtime::Runtime>,
    groups: Vec<Arc<Group>>,
    children: Vec<Child>,
    endpoint: Arc<Endpoint>,
    tls_dir: Option<PathBuf>,
}

impl Shutdown {
    fn run(mut self) {
        // Ask every node to exit, give them a moment to do so, then close: a node that sees the
        // connection close without a Shutdown reports an error.
        if let Some(rt) = &self.rt {
            for g in &self.groups {
                for m in &g.members {
                    let conn = m.conn.clone();
                    // `finish` waits until the node has the message, so closing below cannot lose it.
                    let _ = rt.block_on(async move {
                        tokio::time::timeout(Duration::from_millis(500), async {
                            conn.send(&Frame::Control(Message::Shutdown)).await?;
                            conn.finish().await
                        })
                        .await
                    });
                }
            }
        }
        for c in self.children.iter_mut() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.endpoint.close("coordinator shutting down");
        drop(self.groups);
        drop(self.rt.take());
        if let Some(d) = self.tls_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Certificate name of embedded node `i`.
fn node_name(i: usize) -> String {
    format!("node-{i}")
}

impl Cluster {
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        if opts.tp == 0 || opts.replicas == 0 {
            bail!("--tp and --replicas must be at least 1");
        }
        if opts.engine.device != crate::engine::Device::Cpu {
            bail!("node processes run on the CPU; a GPU model runs in-process (--tp 1, one replica)");
        }
        let info = ModelInfo::load(
            &opts.model_dir,
            &opts.engine,
            lockstep_kernels::CpuBackend::fingerprint_name_for(opts.engine.mode),
        )?;
        // Refuse impossible splits before any process starts.
        lockstep_node::shard::ShardPlan::new(&info.config, 0, opts.tp, info.numerics.reduce_segments)
            .with_context(|| format!("tensor-parallel degree {}", opts.tp))?;
        let n_nodes = opts.tp * opts.replicas;
        let (tls_dir, throwaway) = match (&opts.tls_dir, opts.nodes) {
            (Some(d), _) => (d.clone(), false),
            (None, NodesMode::Embedded) => {
                static N: AtomicU64 = AtomicU64::new(0);
                let d = std::env::temp_dir().join(format!(
                    "lockstep-cluster-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&d);
                init_ca(&d)?;
                issue(&d, "coordinator")?;
                for i in 0..n_nodes {
                    issue(&d, &node_name(i))?;
                }
                (d, true)
            }
            (None, NodesMode::Static) => bail!("--nodes static needs --tls-dir with the cluster CA and a `coordinator` certificate (see `lockstep certs`)"),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lockstep-coord-io")
            .enable_all()
            .build()?;
        let identity = TlsIdentity::load(&tls_dir, "coordinator")?;
        let endpoint = Arc::new(rt.block_on(async { Endpoint::bind(opts.listen, &identity) })?);
        let addr = endpoint.local_addr()?;
        let mut children = Vec::new();
        if opts.nodes == NodesMode::Embedded {
            let exe = std::env::current_exe().context("locating the lockstep binary")?;
            for i in 0..n_nodes {
                let child = Command::new(&exe)
                    .args(["node", "--coordinator", &addr.to_string(), "--tls-dir"])
                    .arg(&tls_dir)
                    .args(["--name", &node_name(i), "--threads", &opts.node_threads.to_string()])
                    .args(["--listen", "127.0.0.1:0"])
                    .stdin(Stdio::null())
                    .spawn()
                    .with_context(|| format!("spawning {}", exe.display()))?;
                children.push(child);
            }
        } else {
            eprintln!(
                "[coordinator] waiting for {n_nodes} node(s) on {addr}: lockstep node --coordinator {addr} --tls-dir {} --name NAME",
                tls_dir.display()
            );
        }
        let registrar = Registrar::new(&opts, &info);
        let ready = registrar.ready.clone();
        rt.spawn(registrar_loop(endpoint.clone(), registrar.clone()));
        let deadline = Instant::now() + opts.join_timeout;
        let groups = loop {
            if let Some(g) = ready.lock().expect("lock").take_if_complete(opts.replicas) {
                break g;
            }
            for c in children.iter_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    Cluster::cleanup(children, &tls_dir, throwaway);
                    bail!("a node process exited during start-up ({status})");
                }
            }
            if Instant::now() > deadline {
                Cluster::cleanup(children, &tls_dir, throwaway);
                bail!("the cluster did not become ready within {:?}", opts.join_timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for g in &groups {
            rt.spawn(heartbeats(g.clone()));
        }
        eprintln!(
            "[coordinator] {} group(s) × TP {} ready on {addr} (system_fingerprint {})",
            groups.len(),
            opts.tp,
            info.system_fingerprint
        );
        Ok(Cluster {
            rt: Some(rt),
            info,
            addr,
            tls_dir,
            groups,
            children: Mutex::new(children),
            throwaway_tls: throwaway,
            endpoint,
        })
    }

    /// A failed start: kill the node processes and remove a throwaway CA.
    fn cleanup(mut children: Vec<Child>, tls_dir: &Path, throwaway: bool) {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if throwaway {
            let _ = std::fs::remove_dir_all(tls_dir);
        }
    }

    pub fn groups(&self) -> &[Arc<Group>] {
        &self.groups
    }

    /// The step executor of group `g`.
    pub fn executor(&self, g: usize) -> GroupExecutor {
        GroupExecutor { group: self.groups[g].clone(), rt: self.rt.as_ref().expect("running cluster").handle().clone() }
    }

    /// Operating-system process ids of the embedded nodes, in node order.
    pub fn node_pids(&self) -> Vec<u32> {
        self.children.lock().expect("lock").iter().map(Child::id).collect()
    }
}

/// Runs one step on every rank of a group and merges their sampling reports.
pub struct GroupExecutor {
    group: Arc<Group>,
    rt: tokio::runtime::Handle,
}

impl GroupExecutor {
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }
    fn fail(&self, reason: String) -> ExecError {
        self.group.mark_down(reason.clone());
        ExecError::Other(reason)
    }
}

impl StepExecutor for GroupExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError> {
        if let Some(r) = self.group.down_reason() {
            return Err(ExecError::Other(format!("group {} is down: {r}", self.group.id)));
        }
        let msg = Frame::Control(Message::Step(plan.clone()));
        for m in &self.group.members {
            let conn = m.conn.clone();
            let msg = msg.clone();
            if let Err(e) = self.rt.block_on(async move { conn.send(&msg).await }) {
                return Err(
                    self.fail(format!("node {} (group {} rank {}) is unreachable: {e}", m.name, self.group.id, m.rank))
                );
            }
        }
        let mut per_rank: Vec<Vec<(u64, ShardSample)>> = Vec::with_capacity(self.group.members.len());
        for m in &self.group.members {
            let inbox = m.inbox.lock().expect("lock");
            loop {
                match inbox.recv_timeout(STEP_TIMEOUT) {
                    Ok(NodeEvent::Done { step_id, samples }) if step_id == plan.step_id => {
                        per_rank.push(samples);
                        break;
                    }
                    Ok(NodeEvent::Done { .. }) => continue, // a stale answer to an abandoned step
                    Ok(NodeEvent::Failed { step_id, message }) if step_id == plan.step_id => {
                        return Err(
                            self.fail(format!("node {} (rank {}) failed step {step_id}: {message}", m.name, m.rank))
                        );
                    }
                    Ok(NodeEvent::Failed { .. }) => continue,
                    Ok(NodeEvent::Gone(reason)) => {
                        return Err(self.fail(format!(
                            "node {} (group {} rank {}) disconnected: {reason}",
                            m.name, self.group.id, m.rank
                        )));
                    }
                    Err(_) => {
                        return Err(self.fail(format!(
                            "node {} (rank {}) did not answer step {} within {STEP_TIMEOUT:?}",
                            m.name, m.rank, plan.step_id
                        )));
                    }
                }
            }
        }
        // Merge in rank order: every rank reports the same sequences in plan order.
        let requests: HashMap<u64, lockstep_kernels::SampleRequest> =
            plan.chunks.iter().filter_map(|c| c.sample.map(|s| (c.seq_id, s))).collect();
        let mut sampled = Vec::with_capacity(per_rank[0].len());
        for (i, (seq_id, _)) in per_rank[0].iter().enumerate() {
            let shards: Vec<&ShardSample> = per_rank.iter().map(|r| &r[i].1).collect();
            if per_rank.iter().any(|r| r.get(i).map(|x| x.0) != Some(*seq_id)) {
                return Err(self.fail(format!("ranks of group {} disagree on the sampled sequences", self.group.id)));
            }
            let req = requests
                .get(seq_id)
                .ok_or_else(|| ExecError::Other(format!("unplanned sample for sequence {seq_id}")))?;
            sampled.push((*seq_id, merge_shard_samples(&shards, req)));
        }
        Ok(StepResult { step_id: plan.step_id, sampled })
    }
}

// ---------------------------------------------------------------- registrar

struct Pending {
    name: String,
    ring_addr: String,
    conn: Arc<Conn>,
}

#[derive(Default)]
struct ReadyGroups {
    groups: Vec<Arc<Group>>,
    taken: bool,
}

impl ReadyGroups {
    fn take_if_complete(&mut self, n: usize) -> Option<Vec<Arc<Group>>> {
        if !self.taken && self.groups.len() >= n {
            self.taken = true;
            let mut g = self.groups.clone();
            g.sort_by_key(|g| g.id);
            return Some(g);
        }
        None
    }
}

#[derive(Clone)]
struct Registrar {
    tp: usize,
    replicas: usize,
    assignment: Assignment,
    waiting: Arc<tokio::sync::Mutex<Vec<Pending>>>,
    next_group: Arc<AtomicU64>,
    names: Arc<Mutex<Vec<String>>>,
    ready: Arc<Mutex<ReadyGroups>>,
}

impl Registrar {
    fn new(opts: &ClusterOptions, info: &ModelInfo) -> Self {
        Registrar {
            tp: opts.tp,
            replicas: opts.replicas,
            assignment: Assignment {
                group: 0,
                rank: 0,
                tp: opts.tp as u32,
                model_dir: info.dir.to_string_lossy().into_owned(),
                reduce_segments: info.numerics.reduce_segments as u32,
                kv_chunk: info.numerics.kv_chunk as u32,
                kernel_mode: opts.engine.mode,
                block_size: info.block_size as u32,
                num_blocks: info.num_blocks as u32,
                max_context: info.max_context as u32,
                expected_fingerprint: info.system_fingerprint.clone(),
                ring_next: String::new(),
                ring_prev_node: String::new(),
            },
            waiting: Default::default(),
            next_group: Default::default(),
            names: Default::default(),
            ready: Default::default(),
        }
    }
}

async fn refuse(conn: &Conn, code: RefuseCode, message: String) {
    eprintln!("[coordinator] refused {}: {message}", conn.peer_name());
    let _ = conn.send(&Frame::Control(Message::Refused { code, message })).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.finish()).await;
    conn.close("refused");
}

async fn registrar_loop(endpoint: Arc<Endpoint>, reg: Registrar) {
    while let Some(incoming) = endpoint.accept().await {
        let conn = match incoming {
            Ok(c) => Arc::new(c),
            Err(e) => {
                eprintln!("[coordinator] refused a connection: {e}");
                continue;
            }
        };
        tokio::spawn(admit(conn, reg.clone()));
    }
}

/// One joiner: read its Hello, check it, and queue it for the next group.
async fn admit(conn: Arc<Conn>, reg: Registrar) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, conn.recv()).await {
        Ok(Ok(Frame::Control(Message::Hello(h)))) => h,
        Ok(Ok(other)) => {
            let m = format!("expected Hello as the first message, got {}", frame_kind(&other));
            return refuse(&conn, RefuseCode::BadRequest, m).await;
        }
        Ok(Err(e)) => {
            eprintln!("[coordinator] dropped {}: {e}", conn.peer_name());
            conn.close("bad frame");
            return;
        }
        Err(_) => return refuse(&conn, RefuseCode::BadRequest, format!("no Hello within {HELLO_TIMEOUT:?}")).await,
    };
    if let Err(m) = check_hello(&hello, conn.peer_name()) {
        let code = if hello.protocol_version != PROTOCOL_VERSION {
            RefuseCode::ProtocolVersion
        } else {
            RefuseCode::BadRequest
        };
        return refuse(&conn, code, m).await;
    }
    let refusal = {
        let mut names = reg.names.lock().expect("lock");
        if names.contains(&hello.node_id) {
            Some((RefuseCode::BadRequest, format!("a node named {} is already in the cluster", hello.node_id)))
        } else if reg.next_group.load(Ordering::SeqCst) as usize >= reg.replicas {
            Some((RefuseCode::Busy, "every group of the cluster is already complete".to_string()))
        } else {
            names.push(hello.node_id.clone());
            None
        }
    };
    if let Some((code, m)) = refusal {
        return refuse(&conn, code, m).await;
    }
    let _ = conn.send(&Frame::Control(Message::Welcome { coordinator_id: "coordinator".into() })).await;
    let group_members = {
        let mut waiting = reg.waiting.lock().await;
        waiting.push(Pending { name: hello.node_id.clone(), ring_addr: hello.ring_addr.clone(), conn });
        if waiting.len() < reg.tp {
            return;
        }
        std::mem::take(&mut *waiting)
    };
    let gid = reg.next_group.fetch_add(1, Ordering::SeqCst) as usize;
    form_group(gid, group_members, reg).await;
}

fn check_hello(h: &Hello, cert_name: &str) -> Result<(), String> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "node {} speaks lockstep protocol version {}, this coordinator speaks {PROTOCOL_VERSION}",
            h.node_id, h.protocol_version
        ));
    }
    if h.node_id != cert_name {
        return Err(format!("node calls itself {:?} but its certificate names {cert_name:?}", h.node_id));
    }
    Ok(())
}

fn frame_kind(f: &Frame) -> &'static str {
    match f {
        Frame::Ring(_) => "a ring frame",
        Frame::Control(_) => "another control message",
    }
}

/// Send every member its assignment, wait for all of them to be ready, then publish the group.
/// A member that refuses (other weights) or fails is dropped and the rest go back to waiting.
async fn form_group(gid: usize, members: Vec<Pending>, reg: Registrar) {
    let tp = members.len();
    for (rank, m) in members.iter().enumerate() {
        let a = Assignment {
            group: gid as u32,
            rank: rank as u32,
            ring_next: members[(rank + 1) % tp].ring_addr.clone(),
            ring_prev_node: members[(rank + tp - 1) % tp].name.clone(),
            ..reg.assignment.clone()
        };
        let _ = m.conn.send(&Frame::Control(Message::Assign(a))).await;
    }
    let mut ready = Vec::with_capacity(tp);
    let mut failed: Option<(usize, String)> = None;
    for (rank, m) in members.iter().enumerate() {
        let answer = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                match m.conn.recv().await {
                    Ok(Frame::Control(Message::HeartbeatAck { .. })) => continue,
                    other => return other,
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(Frame::Control(Message::Ready { fingerprint, .. })))
                if fingerprint == reg.assignment.expected_fingerprint =>
            {
                ready.push(fingerprint)
            }
            Ok(Ok(Frame::Control(Message::Ready { fingerprint, .. }))) => {
                let msg = format!(
                    "node {} reports fingerprint {fingerprint}, expected {}",
                    m.name, reg.assignment.expected_fingerprint
                );
                refuse(&m.conn, RefuseCode::Fingerprint, msg.clone()).await;
                failed = Some((rank, msg));
                break;
            }
            Ok(Ok(Frame::Control(Message::Refused { code, message }))) => {
                eprintln!("[coordinator] node {} refused its assignment ({}): {message}", m.name, code.as_str());
                failed = Some((rank, message));
                break;
            }
            Ok(Ok(other)) => {
                failed = Some((rank, format!("unexpected {other:?} instead of Ready")));
                break;
            }
            Ok(Err(e)) => {
                failed = Some((rank, format!("{e}")));
                break;
            }
            Err(_) => {
                failed = Some((rank, format!("not ready within {READY_TIMEOUT:?}")));
                break;
            }
        }
    }
    if let Some((bad, why)) = failed {
        eprintln!("[coordinator] group {gid} did not form: node {} dropped: {why}", members[bad].name);
        reg.names.lock().expect("lock").retain(|n| *n != members[bad].name);
        // The others go back to the front of the queue; they will be reassigned when the group
        // is complete again (their ring connections are renegotiated on the next assignment).
        for (i, m) in members.into_iter().enumerate() {
            if i != bad {
                m.conn.close("group re-forming: reconnect");
                reg.names.lock().expect("lock").retain(|n| *n != m.name);
            }
        }
        reg.next_group.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let group = Arc::new(Group {
        id: gid,
        members: members
            .into_iter()
            .enumerate()
            .zip(ready)
            .map(|((rank, p), fingerprint)| {
                let (tx, rx) = std_mpsc::channel();
                let last_ack = Arc::new(Mutex::new(Some(Instant::now())));
                let member = Member {
                    name: p.name.clone(),
                    rank,
                    conn: p.conn.sender(),
                    raw: p.conn.clone(),
                    inbox: Mutex::new(rx),
                    last_ack: last_ack.clone(),
                    ring_addr: p.ring_addr,
                    fingerprint,
                };
                tokio::spawn(member_reader(p.conn, tx, last_ack));
                member
            })
            .collect(),
        down: AtomicBool::new(false),
        down_reason: Mutex::new(None),
    });
    eprintln!(
        "[coordinator] group {gid} ready: {}",
        group.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    reg.ready.lock().expect("lock").groups.push(group);
}

/// Routes one node's messages to its group's inbox; a lost connection becomes `Gone`.
async fn member_reader(conn: Arc<Conn>, tx: std_mpsc::Sender<NodeEvent>, last_ack: Arc<Mutex<Option<Instant>>>) {
    loop {
        let ev = match conn.recv().await {
            Ok(Frame::Control(Message::StepDone { step_id, samples })) => NodeEvent::Done { step_id, samples },
            Ok(Frame::Control(Message::StepFailed { step_id, message })) => NodeEvent::Failed { step_id, message },
            Ok(Frame::Control(Message::HeartbeatAck { .. })) => {
                *last_ack.lock().expect("lock") = Some(Instant::now());
                continue;
            }
            Ok(other) => NodeEvent::Gone(format!("protocol error: unexpected {}", frame_kind(&other))),
            Err(e) => NodeEvent::Gone(e.to_string()),
        };
        let gone = matches!(ev, NodeEvent::Gone(_));
        if tx.send(ev).is_err() || gone {
            return;
        }
    }
}

async fn heartbeats(group: Arc<Group>) {
    let mut seq = 0u64;
    loop {
        tokio::time::sleep(HEARTBEAT_EVERY).await;
        if group.is_down() {
            return;
        }
        seq += 1;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        for m in &group.members {
            // A failed send surfaces in the member's reader as a lost connection.
            let _ = m.conn.send(&Frame::Control(Message::Heartbeat { seq, sent_unix_ns: now })).await;
        }
    }
}
