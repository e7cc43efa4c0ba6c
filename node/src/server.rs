//! The node process: join a coordinator, then load, serve and drop one assignment after another
//! on the same connection until the coordinator shuts the node down.
//!
//! ```text
//! dial coordinator ── Hello ──▶            ◀── Welcome / Refused
//!   ┌─────────────▶ ◀── Assign ── load only this rank's shard, compute the fingerprint,
//!   │                              dial ring successor, accept ring predecessor (off the control
//!   │                              task: heartbeats are answered all along)
//!   │                 ── Ready ──▶ (or Refused{Fingerprint}: other weights, other numerics; exit)
//!   │               ◀── Step ──  model thread expands the delta against its session and runs it
//!   │                              (two ring all-reduces per layer)
//!   │                 ── StepDone / StepFailed ──▶ (a panic in the step: StepFailed "panic: …",
//!   │                                               then the node releases itself)
//!   │                 ── StepRejected ──▶ the delta does not fit the session: nothing ran, the
//!   │                                     coordinator resends the step as a full snapshot
//!   └── Release ──  stop the model thread, close the ring, free the model; wait for Assign
//!     at any time: ◀── Heartbeat ── HeartbeatAck ──▶ · ◀── Shutdown: exit 0
//! ```
//!
//! What to do with each message is decided by the sans-IO [`NodeControl`]; this module carries
//! its actions out. Loading runs in its own task (blocking parts on tokio's blocking pool) while
//! the control loop keeps reading the coordinator connection; releasing an assignment that is
//! still loading cancels it at the next step boundary, and the next assignment starts loading
//! only once everything the previous one held has been let go, so two models never share the
//! memory at once. The forward pass is synchronous, CPU-bound code; it runs on its own thread and
//! talks to the async QUIC tasks through channels, or to a same-host neighbour's socket itself
//! ([`NodeRing`]). The coordinator connection is
//! the node's lifeline: when it closes, the node exits — unless it follows an etcd leader
//! (`lockstep node --membership etcd`, in the coordinator crate), which runs one
//! [`serve_coordinator`] session after another on the same endpoint, leaving a coordinator as
//! soon as etcd names another leader.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use lockstep_kernels::{CpuBackend, CpuConfig, Isa, NumericsConfig};
use lockstep_proto::session::{PlanDelta, SessionState};
use lockstep_proto::wire::{Assignment, Frame, Hello, Message, RefuseCode, PROTOCOL_VERSION};
use lockstep_transport::certs::TlsIdentity;
use lockstep_transport::{resolve, ConnSender, Endpoint, NetError, DEFAULT_SERVER_NAME};
use tokio::sync::{mpsc, oneshot};

use crate::config::ModelConfig;
use crate::control::{ControlAction, ControlExit, Generation, NodeControl, ReadyReport, Refusal, StepOutcome};
use crate::fingerprint::deployment_fingerprint;
use crate::model::{Collective, Model, ModelOptions, StepError};
use crate::quic_ring::{connect_ring, NodeRing, RingLinks, RingPlace};
use crate::ring::{RingCollective, RingTransport};
use crate::same_host::RingTransportMode;
use crate::shard::ShardPlan;
use crate::source::{load_config, WeightStore};

/// How long one all-reduce waits for its ring predecessor before the step fails (the upper
/// bound: a neighbour that goes away fails the step as soon as its connection closes).
pub const RING_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Coordinator address (`host:port`).
    pub coordinator: String,
    /// Directory with `ca.pem` and this node's `{name}.pem` / `{name}.key`.
    pub tls_dir: PathBuf,
    /// This node's name: its certificate's name and its id in the cluster.
    pub name: String,
    /// Where to accept the ring predecessor (`host:port`, port 0 = any).
    pub listen: SocketAddr,
    /// Whether ring links to neighbours on this machine may move to a same-host socket.
    pub ring_transport: RingTransportMode,
    pub threads: usize,
    pub isa: Option<Isa>,
    /// Load the model from here instead of the assigned path (the files must still match the
    /// coordinator's fingerprint, or the node refuses the assignment).
    pub model_override: Option<PathBuf>,
    /// Sleep this long before every step. For tests only (the hidden `lockstep node
    /// --step-delay-ms`): it stretches generation so a test can act in the middle of it.
    pub step_delay: Option<Duration>,
    /// Test aid: panic in the forward pass of the step with this id, to exercise the panic path.
    pub panic_at_step: Option<u64>,
    /// Test aid: forget the step session just before a delta for the step with this id arrives,
    /// so the node rejects it and the coordinator's resend path runs.
    pub forget_session_at_step: Option<u64>,
    /// Test aid: end the process (`_exit`) right after the forward pass of the step with this id,
    /// before answering it, as a node killed after its last ring frame of a step.
    pub die_after_step: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Cert(#[from] lockstep_transport::certs::CertError),
    #[error("refused by the coordinator ({code:?}): {message}")]
    Refused { code: RefuseCode, message: String },
    #[error("assignment refused: {0}")]
    Assignment(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Run a node until the coordinator goes away or shuts it down.
pub fn run_node(opts: NodeOptions) -> Result<(), NodeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lockstep-node-io")
        .enable_all()
        .build()
        .map_err(|e| NodeError::Protocol(format!("tokio runtime: {e}")))?;
    let result = rt.block_on(node_main(opts));
    // A released model may still be finishing a step on the blocking pool; it is not waited for.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn node_main(opts: NodeOptions) -> Result<(), NodeError> {
    let endpoint = bind(&opts)?;
    let coord_addr = resolve(&opts.coordinator).await?;
    let conn = endpoint.connect(coord_addr, DEFAULT_SERVER_NAME).await?;
    let result = serve_coordinator(Arc::new(opts), endpoint.clone(), conn, std::future::pending(), None).await;
    endpoint.close("node exiting");
    result
}

/// The node's QUIC endpoint (its ring address), bound with its certificate.
pub fn bind(opts: &NodeOptions) -> Result<Arc<Endpoint>, NodeError> {
    let identity = TlsIdentity::load(&opts.tls_dir, &opts.name)?;
    Ok(Arc::new(Endpoint::bind(opts.listen, &identity)?))
}

/// One session with the coordinator at the other end of `conn`: hello, then assignments until the
/// coordinator shuts the node down (`Ok`), the connection is lost, or `leave` resolves (`Ok`: a
/// node that follows an etcd leader leaves one that is no longer the leader). Whatever the node
/// holds is released on the way out. `fingerprint`, when given, gets the fingerprint of every
/// assignment the node reports ready.
pub async fn serve_coordinator(
    opts: Arc<NodeOptions>,
    endpoint: Arc<Endpoint>,
    conn: lockstep_transport::Conn,
    leave: impl std::future::Future<Output = ()>,
    fingerprint: Option<&tokio::sync::watch::Sender<String>>,
) -> Result<(), NodeError> {
    let ring_addr = endpoint.local_addr()?;
    let (tx, mut rx) = conn.split();
    tx.send(&Frame::Control(Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: opts.name.clone(),
        ring_addr: ring_addr.to_string(),
        threads: opts.threads as u32,
        build: format!("lockstep {} {}", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH),
    })))
    .await?;
    let (outcomes_tx, mut outcomes_rx) = mpsc::unbounded_channel();
    let mut node = Node {
        control: NodeControl::new(opts.name.clone()),
        opts,
        endpoint,
        tx,
        preparing: None,
        serving: None,
        retiring: Vec::new(),
        outcomes: outcomes_tx,
        fingerprint: fingerprint.cloned(),
    };
    let mut leave = std::pin::pin!(leave);
    loop {
        if let Some(exit) = node.carry_out_actions().await? {
            return exit;
        }
        let event = tokio::select! {
            frame = rx.recv() => Event::Frame(frame),
            (generation, prepared) = next_prepared(&mut node.preparing) => Event::Prepared(generation, Box::new(prepared)),
            Some((generation, outcome)) = outcomes_rx.recv() => Event::Step(generation, outcome),
            () = &mut leave => {
                node.release_all("the coordinator is no longer the leader");
                return Ok(());
            }
        };
        match event {
            Event::Frame(Ok(Frame::Control(m))) => node.control.message(m),
            Event::Frame(Ok(Frame::Ring(_))) => {
                node.release_all("protocol error");
                return Err(NodeError::Protocol("the coordinator sent a ring frame".into()));
            }
            Event::Frame(Err(e)) => {
                node.release_all("the coordinator connection is gone");
                return Err(e.into());
            }
            Event::Prepared(generation, result) => node.prepared(generation, *result),
            Event::Step(generation, outcome) => node.control.step_finished(generation, outcome),
        }
    }
}

enum Event {
    Frame(Result<Frame, NetError>),
    Prepared(Generation, Box<Result<Loaded, Refusal>>),
    Step(Generation, StepOutcome),
}

/// The I/O side of one node: what [`NodeControl`] decides, done.
struct Node {
    control: NodeControl,
    opts: Arc<NodeOptions>,
    endpoint: Arc<Endpoint>,
    tx: ConnSender,
    preparing: Option<Preparation>,
    serving: Option<Serving>,
    /// What released assignments are still letting go of (a model thread finishing its step, a
    /// load finishing its blocking part); the next preparation waits for them.
    retiring: Vec<tokio::task::JoinHandle<()>>,
    outcomes: mpsc::UnboundedSender<(Generation, StepOutcome)>,
    /// Told the fingerprint of every assignment reported ready (etcd registration).
    fingerprint: Option<tokio::sync::watch::Sender<String>>,
}

/// An assignment being loaded.
struct Preparation {
    generation: Generation,
    /// Dropping it cancels the preparation at its next step boundary.
    _cancel: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<Loaded, Refusal>>,
}

/// Everything a ready assignment needs to serve, before its model thread starts.
struct Loaded {
    model: Model<CpuBackend>,
    collective: Arc<RingCollective<NodeRing>>,
    links: RingLinks,
    report: ReadyReport,
}

/// A ready assignment: its model thread and ring.
struct Serving {
    generation: Generation,
    plans: std_mpsc::Sender<PlanDelta>,
    thread: std::thread::JoinHandle<()>,
    links: RingLinks,
}

/// The next finished preparation; never resolves while there is none.
async fn next_prepared(preparing: &mut Option<Preparation>) -> (Generation, Result<Loaded, Refusal>) {
    let Some(p) = preparing.as_mut() else { return std::future::pending().await };
    let result = (&mut p.task).await.unwrap_or_else(|e| {
        Err(Refusal { code: RefuseCode::BadRequest, message: format!("preparing the assignment failed: {e}") })
    });
    (p.generation, result)
}

impl Node {
    /// Does what the control state machine asked; `Some` when the node must stop.
    async fn carry_out_actions(&mut self) -> Result<Option<Result<(), NodeError>>, NodeError> {
        while let Some(action) = self.control.poll_action() {
            match action {
                ControlAction::Send(m) => {
                    if let (Message::Ready { fingerprint, .. }, Some(tell)) = (&m, &self.fingerprint) {
                        tell.send_replace(fingerprint.clone());
                    }
                    self.tx.send(&Frame::Control(m)).await?
                }
                ControlAction::Prepare { generation, assignment } => self.start_preparing(generation, *assignment),
                ControlAction::Release { generation, reason } => self.release(generation, &reason),
                ControlAction::RunStep { generation, plan } => {
                    let step_id = plan.step_id;
                    let sent = self.serving.as_ref().filter(|s| s.generation == generation).map(|s| s.plans.send(plan));
                    if !matches!(sent, Some(Ok(()))) {
                        // The model thread is gone: it panicked and its report is on the way.
                        self.control.step_finished(
                            generation,
                            StepOutcome::Failed { step_id, message: "the model thread has stopped".into() },
                        );
                    }
                }
                ControlAction::Exit(exit) => {
                    self.release_all("the node is exiting");
                    return Ok(Some(match exit {
                        ControlExit::Shutdown => Ok(()),
                        ControlExit::RefusedByCoordinator { code, message } => {
                            Err(NodeError::Refused { code, message })
                        }
                        ControlExit::AssignmentRefused(message) => {
                            // The refusal must reach the coordinator before the connection closes.
                            let _ = self.tx.finish().await;
                            Err(NodeError::Assignment(message))
                        }
                        ControlExit::Protocol(m) => Err(NodeError::Protocol(m)),
                    }));
                }
            }
        }
        Ok(None)
    }

    fn start_preparing(&mut self, generation: Generation, assignment: Assignment) {
        tracing::info!(
            "node {}: assigned rank {}/{} of group {} ({})",
            self.opts.name,
            assignment.rank,
            assignment.tp,
            assignment.group,
            assignment.model_dir
        );
        let (cancel, cancelled) = oneshot::channel();
        let task = tokio::spawn(prepare_assignment(
            self.opts.clone(),
            self.endpoint.clone(),
            assignment,
            std::mem::take(&mut self.retiring),
            cancelled,
        ));
        self.preparing = Some(Preparation { generation, _cancel: cancel, task });
    }

    /// A preparation finished: start its model thread before `Ready` goes out.
    fn prepared(&mut self, generation: Generation, result: Result<Loaded, Refusal>) {
        self.preparing = None;
        let report = match result {
            Ok(loaded) => {
                let report = loaded.report.clone();
                match self.start_serving(generation, loaded) {
                    Ok(()) => Ok(report),
                    Err(message) => Err(Refusal { code: RefuseCode::BadRequest, message }),
                }
            }
            Err(refusal) => Err(refusal),
        };
        self.control.prepared(generation, report);
    }

    fn start_serving(&mut self, generation: Generation, loaded: Loaded) -> Result<(), String> {
        let Loaded { model, collective, links, report } = loaded;
        let (plans, plan_rx) = std_mpsc::channel::<PlanDelta>();
        let outcomes = self.outcomes.clone();
        let aids = TestAids {
            step_delay: self.opts.step_delay,
            panic_at_step: self.opts.panic_at_step,
            forget_session_at_step: self.opts.forget_session_at_step,
            die_after_step: self.opts.die_after_step,
        };
        let thread = std::thread::Builder::new()
            .name(format!("lockstep-model-{}", report.rank))
            .spawn(move || model_thread(generation, model, collective, plan_rx, outcomes, aids))
            .map_err(|e| format!("cannot start the model thread: {e}"))?;
        self.serving = Some(Serving { generation, plans, thread, links });
        Ok(())
    }

    /// Lets go of `generation`, whether it is loading or serving.
    fn release(&mut self, generation: Generation, reason: &str) {
        if let Some(p) = self.preparing.take_if(|p| p.generation == generation) {
            tracing::info!("node {}: released while loading: {reason}", self.opts.name);
            let Preparation { _cancel: cancel, task, .. } = p;
            drop(cancel);
            self.retiring.push(tokio::spawn(async move {
                let _ = task.await;
            }));
        }
        if let Some(s) = self.serving.take_if(|s| s.generation == generation) {
            tracing::info!("node {}: released: {reason}", self.opts.name);
            let Serving { plans, thread, links, .. } = s;
            // Closing the ring first fails a step blocked in an all-reduce at once; without plans
            // the thread then ends and drops the model.
            links.close(&format!("node {} released its assignment: {reason}", self.opts.name));
            drop(plans);
            self.retiring.push(tokio::task::spawn_blocking(move || {
                let _ = thread.join();
            }));
        }
    }

    fn release_all(&mut self, reason: &str) {
        let generations: Vec<Generation> =
            self.preparing.iter().map(|p| p.generation).chain(self.serving.iter().map(|s| s.generation)).collect();
        for g in generations {
            self.release(g, reason);
        }
    }
}

/// Loads `assignment` once everything in `retiring` has finished: shard plan, fingerprint check,
/// ring, model. Stops early, at the next step boundary, once `cancelled`'s sender is dropped.
async fn prepare_assignment(
    opts: Arc<NodeOptions>,
    endpoint: Arc<Endpoint>,
    mut a: Assignment,
    retiring: Vec<tokio::task::JoinHandle<()>>,
    mut cancelled: oneshot::Receiver<()>,
) -> Result<Loaded, Refusal> {
    let refusal = |code, message: String| Refusal { code, message };
    let released = || refusal(RefuseCode::BadRequest, "released while loading".into());
    let is_cancelled =
        |c: &mut oneshot::Receiver<()>| !matches!(c.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    for r in retiring {
        let _ = r.await;
    }
    if let Some(dir) = &opts.model_override {
        a.model_dir = dir.to_string_lossy().into_owned();
    }
    let files = tokio::task::spawn_blocking({
        let a = a.clone();
        move || prepare(&a)
    })
    .await
    .map_err(|e| refusal(RefuseCode::BadRequest, format!("reading the model failed: {e}")))?;
    let (cfg, plan, fingerprint, weights_hash) = files.map_err(|m| refusal(RefuseCode::BadRequest, m))?;
    if fingerprint != a.expected_fingerprint {
        return Err(refusal(
            RefuseCode::Fingerprint,
            format!(
                "node {} computes fingerprint {fingerprint} for {}, the coordinator expects {}: different weights, config or numerics",
                opts.name, a.model_dir, a.expected_fingerprint
            ),
        ));
    }
    // After the fingerprint check: a mismatch in numerics is named as such even on a CPU that
    // could not run the assigned mode anyway (native numerics without AMX).
    let be = CpuBackend::new(CpuConfig {
        threads: opts.threads.max(1),
        isa: opts.isa,
        mode: a.kernel_mode,
        numerics: assigned_numerics(&a),
    })
    .map_err(|e| refusal(RefuseCode::BadRequest, format!("node {}: {e}", opts.name)))?;
    if is_cancelled(&mut cancelled) {
        return Err(released());
    }
    let place = RingPlace {
        group: a.group,
        rank: a.rank,
        tp: a.tp,
        next_addr: a.ring_next.clone(),
        prev_node: a.ring_prev_node.clone(),
    };
    let (ring, links) = tokio::select! {
        r = connect_ring(&endpoint, &place, opts.ring_transport) => r.map_err(|e| refusal(RefuseCode::BadRequest, e.to_string()))?,
        _ = &mut cancelled => return Err(released()),
    };
    let collective = Arc::new(RingCollective::new(a.rank as usize, a.tp as usize, ring, RING_TIMEOUT));
    let mopts = ModelOptions {
        num_blocks: a.num_blocks as usize,
        block_size: a.block_size as usize,
        max_context: a.max_context as usize,
    };
    let dir = PathBuf::from(&a.model_dir);
    let model = tokio::task::spawn_blocking({
        let c: Box<dyn Collective> = Box::new(collective.clone());
        move || Model::load(be, &dir, cfg, plan, mopts, c)
    })
    .await
    .map_err(|e| refusal(RefuseCode::BadRequest, format!("loading the model failed: {e}")))?
    .map_err(|e| refusal(RefuseCode::BadRequest, e.to_string()))?;
    if is_cancelled(&mut cancelled) {
        return Err(released());
    }
    Ok(Loaded { model, collective, links, report: ReadyReport { rank: a.rank, fingerprint, weights_hash } })
}

type Prepared = (ModelConfig, ShardPlan, String, String);

fn assigned_numerics(a: &Assignment) -> NumericsConfig {
    NumericsConfig { reduce_segments: a.reduce_segments as usize, kv_chunk: a.kv_chunk as usize }
}

/// Everything before the backend and the ring: config, shard plan and the fingerprint from the
/// files.
fn prepare(a: &Assignment) -> Result<Prepared, String> {
    let dir = PathBuf::from(&a.model_dir);
    let cfg = load_config(&dir).map_err(|e| e.to_string())?;
    let numerics = assigned_numerics(a);
    let plan =
        ShardPlan::new(&cfg, a.rank as usize, a.tp as usize, numerics.reduce_segments).map_err(|e| e.to_string())?;
    let repo = WeightStore::open(&dir).map_err(|e| e.to_string())?;
    let (fp, weights) = deployment_fingerprint(
        &repo,
        &cfg,
        CpuBackend::fingerprint_name_for(a.kernel_mode),
        numerics.reduce_segments,
        numerics.kv_chunk,
    )
    .map_err(|e| e.to_string())?;
    Ok((cfg, plan, fp, weights))
}

/// How often a model thread waiting for its next plan looks at its same-host ring sockets (two
/// non-blocking reads; a plan that arrives ends the wait at once).
const RING_CHECK_BETWEEN_STEPS: Duration = Duration::from_millis(20);

/// The test aids of [`NodeOptions`] the model thread acts on.
struct TestAids {
    step_delay: Option<Duration>,
    panic_at_step: Option<u64>,
    forget_session_at_step: Option<u64>,
    die_after_step: Option<u64>,
}

/// Runs plans until the plan channel closes, expanding each against the assignment's session (a
/// delta that does not fit it is rejected before anything runs, and the session then waits for a
/// full snapshot). A panic in a step is caught and reported, and then the thread ends and drops the
/// model: whatever the panic interrupted (the KV cache, the ring's op count) can no longer be
/// trusted.
fn model_thread(
    generation: Generation,
    mut model: Model<CpuBackend>,
    collective: Arc<RingCollective<NodeRing>>,
    plans: std_mpsc::Receiver<PlanDelta>,
    outcomes: mpsc::UnboundedSender<(Generation, StepOutcome)>,
    aids: TestAids,
) {
    let TestAids { step_delay, panic_at_step, forget_session_at_step, die_after_step } = aids;
    let mut session = SessionState::new();
    let watch_ring = collective.transport().can_check_neighbours();
    // The last step this thread answered, and whether a lost neighbour has been reported since.
    let (mut last_step, mut loss_reported) = (None, false);
    loop {
        let delta = if watch_ring {
            match plans.recv_timeout(RING_CHECK_BETWEEN_STEPS) {
                Ok(delta) => delta,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    // A neighbour killed after its last ring frame of a step, before it answered,
                    // leaves the coordinator waiting on that step: say so now, not after the
                    // transport's idle timeout.
                    if let (Some(step_id), false) = (last_step, loss_reported) {
                        if let Err(e) = collective.transport().check_neighbours() {
                            loss_reported = true;
                            let message = format!("{e} (noticed after the step, waiting for the next)");
                            tracing::warn!("step {step_id}: {message}");
                            if outcomes.send((generation, StepOutcome::Failed { step_id, message })).is_err() {
                                return;
                            }
                        }
                    }
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match plans.recv() {
                Ok(delta) => delta,
                Err(_) => return,
            }
        };
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
        let step_id = delta.step_id;
        if forget_session_at_step == Some(step_id) && !delta.is_snapshot() {
            session.clear();
        }
        let plan = match session.apply(&delta) {
            Ok(plan) => plan,
            Err(e) => {
                tracing::warn!("step {step_id} rejected ({}): {e}", e.error_type());
                let outcome = StepOutcome::Rejected { step_id, message: e.to_string() };
                if outcomes.send((generation, outcome)).is_err() {
                    return;
                }
                continue;
            }
        };
        collective.begin_step(step_id);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if panic_at_step == Some(step_id) {
                panic!("--panic-at-step {step_id} (a test aid) made this step panic");
            }
            model.step(&plan)
        }));
        if die_after_step == Some(step_id) {
            tracing::warn!("--die-after-step {step_id} (a test aid): exiting before answering the step");
            // SAFETY: `_exit` ends the process at once; no Rust state is used after it.
            unsafe { libc::_exit(137) };
        }
        let (outcome, panicked) = match result {
            Ok(Ok(samples)) => (
                StepOutcome::Done { step_id, samples: samples.into_iter().map(|s| (s.seq_id, s.sample)).collect() },
                false,
            ),
            Ok(Err(e)) => (StepOutcome::Failed { step_id, message: e.to_string() }, false),
            Err(payload) => (StepOutcome::Panicked { step_id, message: panic_message(payload.as_ref()) }, true),
        };
        if outcomes.send((generation, outcome)).is_err() || panicked {
            return;
        }
        last_step = Some(step_id);
    }
}

/// The text of a panic's payload (`panic!` with a literal or a format string).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

impl<C: Collective + ?Sized> Collective for Arc<C> {
    fn ranks(&self) -> usize {
        (**self).ranks()
    }
    fn all_reduce(&self, partial: &[f32], out: &mut [f32]) -> Result<(), StepError> {
        (**self).all_reduce(partial, out)
    }
}
