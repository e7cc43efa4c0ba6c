//! The tensor-parallel cluster as the coordinator sees it: the I/O shell around the sans-IO
//! [`Membership`] core.
//!
//! Nodes dial the coordinator over mutual-TLS QUIC and say `Hello`. The accept task checks the
//! protocol version and that the node calls itself by its certificate's name, then hands the
//! connection to the *driver*: one task that owns the [`Membership`] state machine and every
//! session, feeds it what happens (hellos, heartbeat acks, `Ready`, lost connections, step
//! time-outs) with the current time, and carries out the [`Action`]s it returns — heartbeats,
//! `Assign`, `Release`, `Refused`, closing sessions, and starting or failing groups. A node whose
//! connection drops, that is silent past `--node-timeout-ms` (idle, loading or stepping), or that
//! does not answer a step within `--step-timeout-ms` is down; its group stops serving at once and
//! is re-formed from the surviving members and any hot spare, at the most preferred degree of
//! `--tp` that the live nodes allow. A node that comes back under the same name replaces its old
//! session.
//!
//! Each serving group is driven through a [`GroupExecutor`], the [`StepExecutor`] of one engine
//! thread of the [`crate::service::Service`]: a step goes to every rank, every rank answers with
//! its vocab shard's sampling report, and the coordinator merges them in rank order (never seeing
//! logits). When a group fails, its executor fails the step in flight (or the service retires the
//! idle replica) naming the node at fault, and the service migrates the group's requests to the
//! groups that still serve, where they continue with identical bytes.
//!
//! `--nodes embedded` (the default) spawns the node processes itself on loopback with a throwaway
//! cluster CA, reaps and respawns any that exit (as systemd's `Restart=always` does for static
//! nodes) and kills and respawns any that the membership closed (a paused process); `--spare-nodes
//! N` spawns N more that wait as hot spares. `--nodes static` waits for `lockstep node` processes
//! started elsewhere.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use lockstep_node::same_host::RingTransportMode;
use lockstep_proto::wire::{Assignment, Frame, Hello, Message, RefuseCode, PROTOCOL_VERSION};
use lockstep_transport::certs::{init_ca, issue, TlsIdentity};
use lockstep_transport::{Conn, ConnSender, Endpoint};
use tokio::sync::mpsc;

use crate::engine::{EngineOptions, ModelInfo};
use crate::membership::{
    Action, ClusterEvent, GroupId, GroupMember, Membership, MembershipConfig, NodeState, SessionId,
    DEFAULT_HEARTBEAT_EVERY, DEFAULT_NODE_TIMEOUT, DEFAULT_STEP_TIMEOUT,
};
use crate::service::ReplicaSink;

mod group;
pub use group::{Group, GroupExecutor};
use group::{Member, StepEvent, StepSink};

/// How long a joiner has to say `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an executor waiting for a step looks whether its group was failed meanwhile.
pub(super) const STEP_POLL: Duration = Duration::from_millis(20);
/// Least time between two respawns of the same embedded node (a node that cannot start must
/// not spin).
const RESPAWN_BACKOFF: Duration = Duration::from_secs(1);
/// Most entries of the event history shown by the ops API.
const EVENTS_SHOWN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodesMode {
    /// Spawn the node processes locally on loopback.
    Embedded,
    /// Wait for nodes started elsewhere with `lockstep node`.
    Static,
}

/// Whether embedded nodes are pinned to CPUs of their own (`--pin-nodes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PinNodes {
    /// Each node gets `--pin-cpus` with CPUs of its own when every node's threads fit on this
    /// process's CPUs; otherwise no node is pinned.
    #[default]
    Auto,
    /// Leave placement to the scheduler.
    Off,
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub model_dir: PathBuf,
    /// Tensor-parallel degrees, most preferred first (`--tp 4,2,1`).
    pub tp: Vec<usize>,
    pub replicas: usize,
    /// The coordinator's QUIC address for nodes.
    pub listen: SocketAddr,
    pub nodes: NodesMode,
    /// The coordinator's certificate name in `tls_dir`.
    pub name: String,
    /// Cluster CA and certificates. Embedded mode creates a throwaway one when absent.
    pub tls_dir: Option<PathBuf>,
    pub engine: EngineOptions,
    /// Kernel threads per node (embedded mode).
    pub node_threads: usize,
    /// Embedded nodes' `--ring-transport`.
    pub ring_transport: RingTransportMode,
    /// Whether embedded nodes are pinned to CPUs of their own.
    pub pin_nodes: PinNodes,
    /// How long to wait for every group to be ready.
    pub join_timeout: Duration,
    /// Embedded nodes beyond `max(tp) × replicas`, waiting as hot spares.
    pub spare_nodes: usize,
    pub heartbeat_every: Duration,
    pub node_timeout: Duration,
    pub step_timeout: Duration,
    /// Test aid: embedded nodes sleep this long before every step (`lockstep node
    /// --step-delay-ms`), so a test can act while a group generates.
    pub node_step_delay: Option<Duration>,
}

impl ClusterOptions {
    /// Options with the membership timings at their defaults.
    pub fn new(model_dir: PathBuf, tp: Vec<usize>, replicas: usize, nodes: NodesMode, engine: EngineOptions) -> Self {
        ClusterOptions {
            model_dir,
            tp,
            replicas,
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            nodes,
            name: "coordinator".into(),
            tls_dir: None,
            engine,
            node_threads: 1,
            ring_transport: RingTransportMode::default(),
            pin_nodes: PinNodes::default(),
            join_timeout: Duration::from_secs(300),
            spare_nodes: 0,
            heartbeat_every: DEFAULT_HEARTBEAT_EVERY,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            node_step_delay: None,
        }
    }
}

/// What the coordinator knows about one node (for the ops API and error messages).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub name: String,
    /// `None` while the node is in no group (joining, waiting, down).
    pub group: Option<usize>,
    pub rank: Option<usize>,
    pub ring_addr: String,
    /// `joining`, `waiting`, `forming`, `ready` (serving) or `down`.
    pub state: String,
    /// The state in words (`in group 3 rank 1`, `down: …`).
    pub detail: String,
    pub last_heartbeat_ms_ago: Option<u64>,
    pub rtt_us: u64,
    pub fingerprint: String,
    /// Operating-system process id, for nodes this coordinator spawned.
    pub pid: Option<u32>,
    pub session: u64,
}

/// One entry of the cluster's event history, for the ops API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventStatus {
    /// Seconds since the Unix epoch.
    pub unix_s: f64,
    pub message: String,
    #[serde(flatten)]
    pub kind: crate::membership::EventKind,
}

/// Counters of the cluster's life, for the metrics.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Groups that stopped serving (a member lost, a step failed, an upgrade).
    pub reformations: AtomicU64,
    /// Node sessions that ended other than by shutdown.
    pub node_failures: AtomicU64,
}

/// What the driver is told.
pub(super) enum Input {
    Hello {
        conn: Arc<Conn>,
        hello: Hello,
    },
    Frame {
        session: SessionId,
        frame: Frame,
    },
    Lost {
        session: SessionId,
        reason: String,
    },
    /// The executor gave up on a step: these members never answered.
    StepTimedOut {
        group: GroupId,
        silent: Vec<SessionId>,
        reason: String,
    },
    /// A member answered a step with a failure.
    StepFailed {
        group: GroupId,
        session: SessionId,
        reason: String,
    },
    /// The service is attached: serving groups go to it from now on (acknowledged once the
    /// groups already serving were handed over).
    Attach(ReplicaSink, std_mpsc::Sender<()>),
    /// The service retired a group's replica after it failed.
    Stop,
}

struct Session {
    name: String,
    conn: Arc<Conn>,
    /// Messages to the node, sent in order by the session's writer task (an `Assign` must never
    /// overtake the `Release` before it).
    out: mpsc::UnboundedSender<Message>,
    /// Set while the session serves in a group: where its step answers go.
    step_sink: StepSink,
    fingerprint: String,
}

/// What the ops API reads: refreshed by the driver after every input.
#[derive(Default)]
struct Snapshot {
    nodes: Vec<NodeStatus>,
    events: VecDeque<EventStatus>,
    /// When the newest rendered event happened (to skip re-rendering an unchanged history).
    events_newest: Option<Instant>,
    health: Option<String>,
    serving: usize,
}

/// State shared between the driver, the supervisor, the executors and the [`Cluster`] handle.
struct Shared {
    snapshot: Mutex<Snapshot>,
    counters: ClusterCounters,
    /// Embedded node processes by name.
    children: Mutex<HashMap<String, Child>>,
    /// Embedded nodes the membership closed (paused, wedged): killed and respawned.
    to_restart: Mutex<Vec<String>>,
    stopping: AtomicBool,
    /// How this coordinator was elected (`--membership etcd`), for the ops API.
    discovery: Mutex<Option<tokio::sync::watch::Receiver<crate::discovery::etcd::DiscoveryStatus>>>,
}

/// A running cluster: the coordinator endpoint, the driver, and (embedded) the node processes,
/// which are killed when the cluster is dropped.
pub struct Cluster {
    rt: Option<tokio::runtime::Runtime>,
    pub info: ModelInfo,
    pub addr: SocketAddr,
    pub tls_dir: PathBuf,
    shared: Arc<Shared>,
    inputs: mpsc::UnboundedSender<Input>,
    throwaway_tls: bool,
    endpoint: Arc<Endpoint>,
    supervisor: Option<std::thread::JoinHandle<()>>,
    /// Every session's sender, for the shutdown message.
    senders: Arc<Mutex<HashMap<SessionId, ConnSender>>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.inputs.send(Input::Stop);
        let parts = Shutdown {
            rt: self.rt.take(),
            senders: std::mem::take(&mut *self.senders.lock().expect("lock")),
            children: std::mem::take(&mut *self.shared.children.lock().expect("lock")),
            endpoint: self.endpoint.clone(),
            tls_dir: self.throwaway_tls.then(|| self.tls_dir.clone()),
            supervisor: self.supervisor.take(),
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
    senders: HashMap<SessionId, ConnSender>,
    children: HashMap<String, Child>,
    endpoint: Arc<Endpoint>,
    tls_dir: Option<PathBuf>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

impl Shutdown {
    fn run(mut self) {
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        // Ask every node to exit, give them a moment to do so, then close: a node that sees the
        // connection close without a Shutdown reports an error.
        if let Some(rt) = &self.rt {
            for conn in self.senders.values() {
                let conn = conn.clone();
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
        for c in self.children.values_mut() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.endpoint.close("coordinator shutting down");
        drop(self.rt.take());
        if let Some(d) = self.tls_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The CPUs of each of `nodes` embedded nodes of `threads` kernel threads, when they are to be
/// pinned and all fit on this process's CPUs without sharing one (empty otherwise).
fn node_cpus(pin: PinNodes, nodes: usize, threads: usize) -> Vec<Vec<usize>> {
    if pin == PinNodes::Off {
        return Vec::new();
    }
    let allowed = lockstep_node::affinity::allowed_cpus().unwrap_or_default();
    let sets = lockstep_node::affinity::disjoint_sets(&allowed, nodes, threads).unwrap_or_default();
    if !sets.is_empty() {
        tracing::info!("pinning {nodes} embedded nodes to CPUs {sets:?} (--pin-nodes off leaves them unpinned)");
    }
    sets
}

/// Certificate name of embedded node `i`.
fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// How embedded node processes are started.
#[derive(Clone)]
struct NodeCommand {
    exe: PathBuf,
    addr: SocketAddr,
    tls_dir: PathBuf,
    threads: usize,
    ring_transport: RingTransportMode,
    step_delay: Option<Duration>,
    /// CPUs of each node, by index (`node-i` gets `cpus[i]`); empty: none pinned.
    cpus: Vec<Vec<usize>>,
}

impl NodeCommand {
    fn spawn(&self, name: &str) -> Result<Child> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["node", "--coordinator", &self.addr.to_string(), "--tls-dir"])
            .arg(&self.tls_dir)
            .args(["--name", name, "--threads", &self.threads.to_string()])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--ring-transport", self.ring_transport.as_str()])
            .stdin(Stdio::null());
        if let Some(d) = self.step_delay {
            cmd.args(["--step-delay-ms", &d.as_millis().to_string()]);
        }
        // By index, so a node restarted under its name goes back onto the same CPUs.
        let index = name.strip_prefix("node-").and_then(|i| i.parse::<usize>().ok());
        if let Some(cpus) = index.and_then(|i| self.cpus.get(i)) {
            cmd.args(["--pin-cpus", &lockstep_node::affinity::format_cpu_list(cpus)]);
        }
        cmd.spawn().with_context(|| format!("spawning {}", self.exe.display()))
    }
}

impl Cluster {
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        if opts.tp.is_empty() || opts.tp.contains(&0) || opts.replicas == 0 {
            bail!("--tp and --replicas must be at least 1");
        }
        if opts.engine.device != crate::engine::Device::Cpu {
            bail!("node processes run on the CPU; a GPU model runs in-process (--tp 1, one replica)");
        }
        // Embedded nodes run on this CPU: say here, once, what it lacks for native numerics
        // rather than have every node refuse its assignment.
        if opts.nodes == NodesMode::Embedded && opts.engine.mode == lockstep_kernels::KernelMode::Native {
            lockstep_kernels::cpu::native_exec()?;
        }
        let info = ModelInfo::load(
            &opts.model_dir,
            &opts.engine,
            lockstep_kernels::CpuBackend::fingerprint_name_for(opts.engine.mode),
        )?;
        // Refuse impossible splits before any process starts.
        for &tp in &opts.tp {
            lockstep_node::shard::ShardPlan::new(&info.config, 0, tp, info.numerics.reduce_segments)
                .with_context(|| format!("tensor-parallel degree {tp}"))?;
        }
        let mut mcfg = MembershipConfig::new(opts.tp.clone(), opts.replicas);
        mcfg.heartbeat_every = opts.heartbeat_every;
        mcfg.node_timeout = opts.node_timeout;
        mcfg.step_timeout = opts.step_timeout;
        let membership = Membership::new(mcfg, Instant::now()).context("cluster membership options")?;
        let max_tp = *opts.tp.iter().max().expect("not empty");
        let n_nodes = max_tp * opts.replicas + opts.spare_nodes;
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
                issue(&d, &opts.name)?;
                for i in 0..n_nodes {
                    issue(&d, &node_name(i))?;
                }
                (d, true)
            }
            (None, NodesMode::Static) => bail!(
                "--nodes static needs --tls-dir with the cluster CA and a `{}` certificate (see `lockstep certs`)",
                opts.name
            ),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lockstep-coord-io")
            .enable_all()
            .build()?;
        let identity = TlsIdentity::load(&tls_dir, &opts.name)?;
        let endpoint = Arc::new(rt.block_on(async { Endpoint::bind(opts.listen, &identity) })?);
        let addr = endpoint.local_addr()?;
        let shared = Arc::new(Shared {
            snapshot: Mutex::new(Snapshot::default()),
            counters: ClusterCounters::default(),
            children: Mutex::new(HashMap::new()),
            to_restart: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            discovery: Mutex::new(None),
        });
        let mut supervisor = None;
        if opts.nodes == NodesMode::Embedded {
            let command = NodeCommand {
                exe: std::env::current_exe().context("locating the lockstep binary")?,
                addr,
                tls_dir: tls_dir.clone(),
                threads: opts.node_threads,
                ring_transport: opts.ring_transport,
                step_delay: opts.node_step_delay,
                cpus: node_cpus(opts.pin_nodes, n_nodes, opts.node_threads),
            };
            let mut children = shared.children.lock().expect("lock");
            for i in 0..n_nodes {
                children.insert(node_name(i), command.spawn(&node_name(i))?);
            }
            drop(children);
            let shared = shared.clone();
            supervisor = Some(
                std::thread::Builder::new()
                    .name("lockstep-supervisor".into())
                    .spawn(move || supervise(shared, command))?,
            );
        } else {
            tracing::info!(
                "waiting for nodes on {addr}: lockstep node --coordinator {addr} --tls-dir {} --name NAME",
                tls_dir.display()
            );
        }
        let template = Assignment {
            group: 0,
            rank: 0,
            tp: 0,
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
        };
        let (inputs, rx) = mpsc::unbounded_channel();
        let senders = Arc::new(Mutex::new(HashMap::new()));
        let driver = Driver {
            m: membership,
            sessions: HashMap::new(),
            groups: HashMap::new(),
            template,
            shared: shared.clone(),
            inputs: inputs.clone(),
            sink: None,
            unattached: Vec::new(),
            senders: senders.clone(),
            step_timeout: opts.step_timeout,
        };
        rt.spawn(driver.run(rx));
        rt.spawn(accept_loop(endpoint.clone(), inputs.clone(), Arc::from(opts.name.as_str())));
        let cluster = Cluster {
            rt: Some(rt),
            info,
            addr,
            tls_dir,
            shared,
            inputs,
            throwaway_tls: throwaway,
            endpoint,
            supervisor,
            senders,
        };
        let deadline = Instant::now() + opts.join_timeout;
        loop {
            let serving = cluster.shared.snapshot.lock().expect("lock").serving;
            if serving >= opts.replicas {
                break;
            }
            if Instant::now() > deadline {
                let why = cluster.health().err().unwrap_or_default();
                bail!("the cluster did not become ready within {:?}: {why}", opts.join_timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(
            "{} group(s) ready on {addr} (--tp {:?}, system_fingerprint {})",
            opts.replicas,
            opts.tp,
            cluster.info.system_fingerprint
        );
        Ok(cluster)
    }

    /// Start handing serving groups to the service; those already serving are handed over
    /// before this returns, so a service that starts healthy answers `/health` 200 at once.
    pub fn attach(&self, sink: ReplicaSink) {
        let (ack, done) = std_mpsc::channel();
        if self.inputs.send(Input::Attach(sink, ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Every node the cluster knows, for the ops API.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.shared.snapshot.lock().expect("lock").nodes.clone()
    }

    /// The recent membership events, oldest first.
    pub fn events(&self) -> Vec<EventStatus> {
        self.shared.snapshot.lock().expect("lock").events.iter().cloned().collect()
    }

    /// `Ok` while a group serves; otherwise why not.
    pub fn health(&self) -> Result<(), String> {
        match &self.shared.snapshot.lock().expect("lock").health {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Show `status` (the etcd election this coordinator won, and whether etcd answers) in the
    /// ops API.
    pub fn set_discovery(&self, status: tokio::sync::watch::Receiver<crate::discovery::etcd::DiscoveryStatus>) {
        *self.shared.discovery.lock().expect("lock") = Some(status);
    }

    /// The etcd status, when this coordinator was elected through etcd.
    pub fn discovery(&self) -> Option<crate::discovery::etcd::DiscoveryStatus> {
        self.shared.discovery.lock().expect("lock").as_ref().map(|s| s.borrow().clone())
    }

    pub fn counters(&self) -> &ClusterCounters {
        &self.shared.counters
    }

    /// Operating-system process ids of the embedded nodes, by node name order.
    pub fn node_pids(&self) -> Vec<u32> {
        let children = self.shared.children.lock().expect("lock");
        let mut named: Vec<(&String, u32)> = children.iter().map(|(n, c)| (n, c.id())).collect();
        named.sort();
        named.into_iter().map(|(_, pid)| pid).collect()
    }

    /// The pid of embedded node `name`.
    pub fn node_pid(&self, name: &str) -> Option<u32> {
        self.shared.children.lock().expect("lock").get(name).map(Child::id)
    }
}

/// Reaps embedded node processes that exited and respawns them under the same name; kills and
/// respawns those the membership closed. Ends when the cluster stops.
fn supervise(shared: Arc<Shared>, command: NodeCommand) {
    let mut last_spawn: HashMap<String, Instant> = HashMap::new();
    while !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        let restart: Vec<String> = std::mem::take(&mut *shared.to_restart.lock().expect("lock"));
        let mut children = shared.children.lock().expect("lock");
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        for name in restart {
            if let Some(c) = children.get_mut(&name) {
                let _ = c.kill();
            }
        }
        let names: Vec<String> = children.keys().cloned().collect();
        for name in names {
            let child = children.get_mut(&name).expect("listed");
            let Ok(Some(status)) = child.try_wait() else { continue };
            if last_spawn.get(&name).is_some_and(|t| t.elapsed() < RESPAWN_BACKOFF) {
                continue;
            }
            tracing::warn!("node process {name} (pid {}) exited ({status}); respawning", child.id());
            match command.spawn(&name) {
                Ok(c) => {
                    children.insert(name.clone(), c);
                }
                Err(e) => tracing::error!("could not respawn {name}: {e:#}"),
            }
            last_spawn.insert(name, Instant::now());
        }
    }
}

/// Accepts joiners and hands their checked `Hello` to the driver.
async fn accept_loop(endpoint: Arc<Endpoint>, inputs: mpsc::UnboundedSender<Input>, name: Arc<str>) {
    while let Some(incoming) = endpoint.accept().await {
        let conn = match incoming {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::warn!("refused a connection: {e}");
                continue;
            }
        };
        tokio::spawn(admit(conn, inputs.clone(), name.clone()));
    }
}

async fn refuse(conn: &Conn, code: RefuseCode, message: String) {
    tracing::warn!("refused {}: {message}", conn.peer_name());
    let _ = conn.send(&Frame::Control(Message::Refused { code, message })).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.finish()).await;
    conn.close("refused");
}

/// One joiner: read its Hello and check it.
async fn admit(conn: Arc<Conn>, inputs: mpsc::UnboundedSender<Input>, name: Arc<str>) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, conn.recv()).await {
        Ok(Ok(Frame::Control(Message::Hello(h)))) => h,
        Ok(Ok(other)) => {
            let m = format!("expected Hello as the first message, got {}", frame_kind(&other));
            return refuse(&conn, RefuseCode::BadRequest, m).await;
        }
        Ok(Err(e)) => {
            tracing::warn!("dropped {}: {e}", conn.peer_name());
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
    let _ = conn.send(&Frame::Control(Message::Welcome { coordinator_id: name.to_string() })).await;
    let _ = inputs.send(Input::Hello { conn, hello });
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
        Frame::Control(m) => m.name(),
    }
}

/// Reads one session's frames: step answers go straight to its group's executor, everything else
/// to the driver; a lost connection becomes `Lost`.
async fn session_reader(
    session: SessionId,
    conn: Arc<Conn>,
    step_sink: StepSink,
    inputs: mpsc::UnboundedSender<Input>,
) {
    loop {
        match conn.recv().await {
            Ok(Frame::Control(Message::StepDone { step_id, samples })) => {
                if let Some((rank, tx)) = step_sink.lock().expect("lock").as_ref() {
                    let _ = tx.send((*rank, StepEvent::Done { step_id, samples }));
                }
            }
            Ok(Frame::Control(Message::StepFailed { step_id, message })) => {
                if let Some((rank, tx)) = step_sink.lock().expect("lock").as_ref() {
                    let _ = tx.send((*rank, StepEvent::Failed { step_id, message }));
                }
            }
            Ok(Frame::Control(Message::StepRejected { step_id, message })) => {
                if let Some((rank, tx)) = step_sink.lock().expect("lock").as_ref() {
                    let _ = tx.send((*rank, StepEvent::Rejected { step_id, message }));
                }
            }
            Ok(frame) => {
                if inputs.send(Input::Frame { session, frame }).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = inputs.send(Input::Lost { session, reason: e.to_string() });
                return;
            }
        }
    }
}

/// Sends one session's control messages in order; a failed send surfaces in the session's reader
/// as a lost connection.
async fn session_writer(conn: ConnSender, mut queue: mpsc::UnboundedReceiver<Message>) {
    while let Some(msg) = queue.recv().await {
        if conn.send(&Frame::Control(msg)).await.is_err() {
            return;
        }
    }
}

/// The task that owns the membership and every session.
struct Driver {
    m: Membership,
    sessions: HashMap<SessionId, Session>,
    groups: HashMap<GroupId, Arc<Group>>,
    template: Assignment,
    shared: Arc<Shared>,
    inputs: mpsc::UnboundedSender<Input>,
    sink: Option<ReplicaSink>,
    /// Groups that served before the service was attached.
    unattached: Vec<Arc<Group>>,
    senders: Arc<Mutex<HashMap<SessionId, ConnSender>>>,
    step_timeout: Duration,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            let deadline = tokio::time::Instant::from_std(self.m.poll_timeout());
            tokio::select! {
                input = rx.recv() => match input {
                    None | Some(Input::Stop) => return,
                    Some(i) => self.input(i),
                },
                _ = tokio::time::sleep_until(deadline) => self.m.handle_timeout(Instant::now()),
            }
            while let Some(action) = self.m.poll_action() {
                self.perform(action);
            }
            self.publish();
        }
    }

    fn input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Hello { conn, hello } => {
                let session = self.m.node_hello(now, &hello.node_id, hello.ring_addr.clone());
                let step_sink = Arc::new(Mutex::new(None));
                tokio::spawn(session_reader(session, conn.clone(), step_sink.clone(), self.inputs.clone()));
                let (out, queue) = mpsc::unbounded_channel();
                tokio::spawn(session_writer(conn.sender(), queue));
                self.senders.lock().expect("lock").insert(session, conn.sender());
                let s = Session { name: hello.node_id, conn, out, step_sink, fingerprint: String::new() };
                self.sessions.insert(session, s);
            }
            Input::Frame { session, frame } => match frame {
                Frame::Control(Message::HeartbeatAck { .. }) => self.m.heartbeat_ack(now, session),
                Frame::Control(Message::Ready { fingerprint, .. }) => {
                    let Some((group, _)) = self.node_group(session) else { return };
                    let verdict = if fingerprint == self.template.expected_fingerprint {
                        Ok(())
                    } else {
                        Err(format!(
                            "reports fingerprint {fingerprint}, expected {}",
                            self.template.expected_fingerprint
                        ))
                    };
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.fingerprint = fingerprint;
                    }
                    self.m.node_ready(now, session, group, verdict);
                }
                Frame::Control(Message::Refused { code, message }) => {
                    let name = self.sessions.get(&session).map(|s| s.name.clone()).unwrap_or_default();
                    tracing::warn!("node {name} refused its assignment ({}): {message}", code.as_str());
                    match self.node_group(session) {
                        Some((group, _)) => self.m.node_ready(now, session, group, Err(message)),
                        None => self.m.connection_lost(now, session, format!("refused: {message}")),
                    }
                }
                Frame::Control(Message::Error { code, message }) => {
                    self.m.connection_lost(now, session, format!("node error {code}: {message}"));
                }
                other => {
                    let reason = format!("protocol error: unexpected {}", frame_kind(&other));
                    self.m.connection_lost(now, session, reason);
                }
            },
            Input::Lost { session, reason } => {
                self.m.connection_lost(now, session, reason.clone());
                // The membership ends a lost session silently (nothing to send): forget it here.
                self.end_session(session, None, &format!("connection lost: {reason}"));
            }
            Input::StepTimedOut { group, silent, reason } => {
                for session in silent {
                    self.m.connection_lost(now, session, reason.clone());
                }
                // If every silent session was already gone the group still must stop.
                if self.groups.get(&group).is_some_and(|g| !g.is_down()) {
                    self.m.step_failed(now, group, None, reason);
                }
            }
            Input::StepFailed { group, session, reason } => self.m.step_failed(now, group, Some(session), reason),
            Input::Attach(sink, ack) => {
                for g in std::mem::take(&mut self.unattached) {
                    if !g.is_down() {
                        Self::add_to_service(&sink, &g, self.step_timeout);
                    }
                }
                self.sink = Some(sink);
                let _ = ack.send(());
            }
            Input::Stop => {}
        }
    }

    fn node_group(&self, session: SessionId) -> Option<(GroupId, usize)> {
        self.m.nodes(Instant::now()).into_iter().find(|n| n.session == session).and_then(|n| n.state.group())
    }

    fn send(&self, session: SessionId, msg: Message) {
        if let Some(s) = self.sessions.get(&session) {
            let _ = s.out.send(msg);
        }
    }

    fn end_session(&mut self, session: SessionId, refusal: Option<(RefuseCode, String)>, reason: &str) {
        let Some(s) = self.sessions.remove(&session) else { return };
        self.senders.lock().expect("lock").remove(&session);
        *s.step_sink.lock().expect("lock") = None;
        if !self.shared.stopping.load(Ordering::SeqCst) {
            self.shared.counters.node_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("node {} is down: {reason}", s.name);
        }
        // An embedded node that is still running (paused, wedged) is replaced by a fresh process —
        // unless a newer process of that name has already said hello (the session was replaced):
        // the process under that name is then the new one.
        let superseded = self.sessions.values().any(|other| other.name == s.name);
        if !superseded && self.shared.children.lock().expect("lock").contains_key(&s.name) {
            self.shared.to_restart.lock().expect("lock").push(s.name.clone());
        }
        let conn = s.conn;
        let reason = reason.to_string();
        tokio::spawn(async move {
            if let Some((code, message)) = refusal {
                refuse(&conn, code, message).await;
            } else {
                conn.close(&reason);
            }
        });
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::SendHeartbeats { sessions } => {
                let now =
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
                for session in sessions {
                    self.send(session, Message::Heartbeat { seq: 0, sent_unix_ns: now });
                }
            }
            Action::Assign { group, tp, members } => {
                tracing::info!(
                    "forming group {group} (TP {tp}): {}",
                    members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                );
                for (rank, member) in members.iter().enumerate() {
                    let a = Assignment {
                        group: group as u32,
                        rank: rank as u32,
                        tp: tp as u32,
                        ring_next: members[(rank + 1) % tp].ring_addr.clone(),
                        ring_prev_node: members[(rank + tp - 1) % tp].name.clone(),
                        ..self.template.clone()
                    };
                    self.send(member.session, Message::Assign(a));
                }
            }
            Action::GroupServing { group, members } => self.start_group(group, members),
            Action::GroupFailed { group, reason, culprits } => {
                self.shared.counters.reformations.fetch_add(1, Ordering::Relaxed);
                let why = if culprits.is_empty() { reason } else { format!("{reason} (node {})", culprits.join(", ")) };
                tracing::warn!("group {group} stopped serving: {why}");
                if let Some(g) = self.groups.remove(&group) {
                    for m in &g.members {
                        if let Some(s) = self.sessions.get(&m.session) {
                            *s.step_sink.lock().expect("lock") = None;
                        }
                    }
                    g.mark_down(why.clone());
                    if let Some(sink) = &self.sink {
                        sink.fail(group as usize, why);
                    }
                }
            }
            Action::Release { session, reason } => {
                if let Some(s) = self.sessions.get(&session) {
                    *s.step_sink.lock().expect("lock") = None;
                }
                self.send(session, Message::Release { reason });
            }
            Action::Close { session, reason } => self.end_session(session, None, &reason),
            Action::Refuse { session, reason } => {
                let code =
                    if reason.contains("fingerprint") { RefuseCode::Fingerprint } else { RefuseCode::BadRequest };
                self.end_session(session, Some((code, reason.clone())), &reason);
            }
        }
    }

    fn start_group(&mut self, group: GroupId, members: Vec<GroupMember>) {
        let mut built = Vec::with_capacity(members.len());
        let (tx, rx) = std_mpsc::channel();
        for (rank, gm) in members.iter().enumerate() {
            let Some(s) = self.sessions.get(&gm.session) else { return };
            *s.step_sink.lock().expect("lock") = Some((rank, tx.clone()));
            built.push(Member { session: gm.session, name: gm.name.clone(), rank, conn: s.conn.sender() });
        }
        let g = Arc::new(Group {
            id: group,
            members: built,
            inbox: Mutex::new(rx),
            down: AtomicBool::new(false),
            down_reason: Mutex::new(None),
            inputs: self.inputs.clone(),
        });
        tracing::info!("group {group} ready: {}", g.member_names().join(", "));
        self.groups.insert(group, g.clone());
        match &self.sink {
            Some(sink) => Self::add_to_service(sink, &g, self.step_timeout),
            None => self.unattached.push(g),
        }
    }

    fn add_to_service(sink: &ReplicaSink, g: &Arc<Group>, step_timeout: Duration) {
        let exec = GroupExecutor::new(g.clone(), tokio::runtime::Handle::current(), step_timeout);
        if let Err(e) = sink.add(g.id as usize, Box::new(exec)) {
            tracing::error!("could not start an engine for group {}: {e:#}", g.id);
        }
    }

    /// Refresh what the ops API reads.
    fn publish(&self) {
        let now = Instant::now();
        let children = self.shared.children.lock().expect("lock");
        let nodes = self
            .m
            .nodes(now)
            .into_iter()
            .map(|n| {
                let session = self.sessions.get(&n.session);
                let (state, group, rank) = match &n.state {
                    NodeState::Joining => ("joining", None, None),
                    NodeState::Waiting => ("waiting", None, None),
                    NodeState::Forming { group, rank } => ("forming", Some(*group as usize), Some(*rank)),
                    NodeState::Serving { group, rank } => ("ready", Some(*group as usize), Some(*rank)),
                    NodeState::Down { .. } => ("down", None, None),
                };
                NodeStatus {
                    name: n.name.clone(),
                    group,
                    rank,
                    ring_addr: n.ring_addr.clone(),
                    state: state.to_string(),
                    detail: n.state.to_string(),
                    last_heartbeat_ms_ago: Some(n.heartbeat_age.as_millis() as u64),
                    rtt_us: session.map_or(0, |s| s.conn.rtt().as_micros() as u64),
                    fingerprint: session.map(|s| s.fingerprint.clone()).unwrap_or_default(),
                    pid: children.get(&n.name).map(Child::id),
                    session: n.session,
                }
            })
            .collect();
        drop(children);
        // The history changes on joins, losses and formations, not on every heartbeat ack: render
        // it only when its newest entry is new.
        let newest = self.m.events().back().map(|e| e.at);
        let mut snap = self.shared.snapshot.lock().expect("lock");
        if snap.events_newest != newest {
            let wall = SystemTime::now();
            snap.events = self
                .m
                .events()
                .iter()
                .rev()
                .take(EVENTS_SHOWN)
                .rev()
                .map(|e: &ClusterEvent| EventStatus {
                    unix_s: wall
                        .checked_sub(now.saturating_duration_since(e.at))
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map_or(0.0, |d| d.as_secs_f64()),
                    message: e.kind.to_string(),
                    kind: e.kind.clone(),
                })
                .collect();
            snap.events_newest = newest;
        }
        snap.nodes = nodes;
        snap.health = self.m.health().err();
        snap.serving = self.m.serving_groups().len();
    }
}
