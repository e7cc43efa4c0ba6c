//! The node process: join a coordinator, load one shard, join the ring, run steps.
//!
//! ```text
//! dial coordinator ── Hello ──▶            ◀── Welcome / Refused
//!                  ◀── Assign ── load only this rank's shard, compute the fingerprint,
//!                                dial ring successor, accept ring predecessor
//!                  ── Ready ──▶ (or Refused{Fingerprint}: other weights, other numerics)
//!                  ◀── Step ──  model thread runs it (two ring all-reduces per layer)
//!                  ── StepDone / StepFailed ──▶
//!                  ◀── Heartbeat ── HeartbeatAck ──▶
//! ```
//!
//! The forward pass is synchronous, CPU-bound code; it runs on its own thread and talks to the
//! async QUIC tasks through channels ([`QuicRing`]). The coordinator connection is the node's
//! lifeline: when it closes, the node exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_kernels::{CpuBackend, CpuConfig, Isa, NumericsConfig};
use lockstep_proto::step::StepPlan;
use lockstep_proto::wire::{Assignment, Frame, Hello, Message, RefuseCode, RingFrame, PROTOCOL_VERSION};
use lockstep_transport::certs::TlsIdentity;
use lockstep_transport::{resolve, ConnReceiver, ConnSender, Endpoint, NetError, DEFAULT_SERVER_NAME};
use tokio::sync::mpsc;

use crate::config::ModelConfig;
use crate::fingerprint::deployment_fingerprint;
use crate::model::{Collective, Model, ModelOptions, StepError};
use crate::ring::{RingCollective, RingError, RingTransport};
use crate::shard::ShardPlan;
use crate::weights::SafetensorsRepo;

/// How long one all-reduce waits for its ring predecessor before the step fails.
pub const RING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node waits for its ring neighbours to connect after its assignment.
pub const RING_FORM_TIMEOUT: Duration = Duration::from_secs(60);

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
    pub threads: usize,
    pub isa: Option<Isa>,
    /// Load the model from here instead of the assigned path (the files must still match the
    /// coordinator's fingerprint, or the node refuses the assignment).
    pub model_override: Option<PathBuf>,
    /// Sleep this long before every step. For tests only (the hidden `lockstep node
    /// --step-delay-ms`): it stretches generation so a test can act in the middle of it.
    pub step_delay: Option<Duration>,
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
    rt.block_on(node_main(opts))
}

async fn node_main(opts: NodeOptions) -> Result<(), NodeError> {
    let identity = TlsIdentity::load(&opts.tls_dir, &opts.name)?;
    let endpoint = Endpoint::bind(opts.listen, &identity)?;
    let ring_addr = endpoint.local_addr()?;
    let coord_addr = resolve(&opts.coordinator).await?;
    let conn = endpoint.connect(coord_addr, DEFAULT_SERVER_NAME).await?;
    let (tx, mut rx) = conn.split();
    tx.send(&Frame::Control(Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: opts.name.clone(),
        ring_addr: ring_addr.to_string(),
        threads: opts.threads as u32,
        build: format!("lockstep {} {}", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH),
    })))
    .await?;
    let assignment = loop {
        match rx.recv().await? {
            Frame::Control(Message::Welcome { .. }) => continue,
            Frame::Control(Message::Refused { code, message }) => return Err(NodeError::Refused { code, message }),
            Frame::Control(Message::Assign(a)) => break a,
            Frame::Control(Message::Heartbeat { seq, sent_unix_ns }) => {
                tx.send(&Frame::Control(Message::HeartbeatAck { seq, sent_unix_ns })).await?;
            }
            Frame::Control(Message::Shutdown) => return Ok(()),
            other => return Err(NodeError::Protocol(format!("expected an assignment, got {other:?}"))),
        }
    };
    eprintln!(
        "[{}] assigned rank {}/{} of group {} ({})",
        opts.name, assignment.rank, assignment.tp, assignment.group, assignment.model_dir
    );
    let refuse = |code: RefuseCode, message: String| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(&Frame::Control(Message::Refused { code, message: message.clone() })).await;
            let _ = tx.finish().await;
            NodeError::Assignment(message)
        }
    };
    // Load this rank's shard and check that it is the deployment the coordinator expects.
    let loaded = tokio::task::spawn_blocking({
        let mut a = assignment.clone();
        if let Some(dir) = &opts.model_override {
            a.model_dir = dir.to_string_lossy().into_owned();
        }
        let threads = opts.threads;
        let isa = opts.isa;
        move || prepare(&a, threads, isa)
    })
    .await
    .map_err(|e| NodeError::Protocol(e.to_string()))?;
    let mut assignment = assignment;
    if let Some(dir) = &opts.model_override {
        assignment.model_dir = dir.to_string_lossy().into_owned();
    }
    let (be, cfg, plan, fingerprint, weights_hash) = match loaded {
        Ok(x) => x,
        Err(m) => return Err(refuse(RefuseCode::BadRequest, m).await),
    };
    if fingerprint != assignment.expected_fingerprint {
        let m = format!(
            "node {} computes fingerprint {fingerprint} for {}, the coordinator expects {}: different weights, config or numerics",
            opts.name, assignment.model_dir, assignment.expected_fingerprint
        );
        return Err(refuse(RefuseCode::Fingerprint, m).await);
    }
    let (ring, ring_tasks) =
        connect_ring(&endpoint, &assignment.ring_next, &assignment.ring_prev_node, assignment.tp).await?;
    let collective =
        Arc::new(RingCollective::new(assignment.rank as usize, assignment.tp as usize, ring, RING_TIMEOUT));
    let mopts = ModelOptions {
        num_blocks: assignment.num_blocks as usize,
        block_size: assignment.block_size as usize,
        max_context: assignment.max_context as usize,
    };
    let dir = PathBuf::from(&assignment.model_dir);
    let model = tokio::task::spawn_blocking({
        let c: Box<dyn Collective> = Box::new(collective.clone());
        move || Model::load(be, &dir, cfg, plan, mopts, c)
    })
    .await
    .map_err(|e| NodeError::Protocol(e.to_string()))?;
    let model = match model {
        Ok(m) => m,
        Err(e) => return Err(refuse(RefuseCode::BadRequest, e.to_string()).await),
    };
    tx.send(&Frame::Control(Message::Ready { rank: assignment.rank, fingerprint, weights_hash })).await?;

    // The model thread: plans in, results out.
    let (plan_tx, plan_rx) = std_mpsc::channel::<StepPlan>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Message>();
    let worker = std::thread::Builder::new()
        .name(format!("lockstep-model-{}", assignment.rank))
        .spawn(move || model_thread(model, collective, plan_rx, done_tx, opts.step_delay))
        .map_err(|e| NodeError::Protocol(e.to_string()))?;
    let result = serve_steps(&tx, &mut rx, &plan_tx, &mut done_rx).await;
    drop(plan_tx);
    let _ = worker.join();
    for t in ring_tasks {
        t.abort();
    }
    endpoint.close("node exiting");
    result
}

type Prepared = (CpuBackend, ModelConfig, ShardPlan, String, String);

/// Everything before the ring: config, shard plan, backend and the fingerprint from the files.
fn prepare(a: &Assignment, threads: usize, isa: Option<Isa>) -> Result<Prepared, String> {
    let dir = PathBuf::from(&a.model_dir);
    let cfg = ModelConfig::from_dir(&dir).map_err(|e| e.to_string())?;
    let numerics = NumericsConfig { reduce_segments: a.reduce_segments as usize, kv_chunk: a.kv_chunk as usize };
    let plan =
        ShardPlan::new(&cfg, a.rank as usize, a.tp as usize, numerics.reduce_segments).map_err(|e| e.to_string())?;
    let be = CpuBackend::new(CpuConfig { threads: threads.max(1), isa, mode: a.kernel_mode, numerics })
        .map_err(|e| e.to_string())?;
    let repo = SafetensorsRepo::open(&dir).map_err(|e| e.to_string())?;
    let (fp, weights) = deployment_fingerprint(
        &repo,
        &cfg,
        CpuBackend::fingerprint_name_for(a.kernel_mode),
        numerics.reduce_segments,
        numerics.kv_chunk,
    )
    .map_err(|e| e.to_string())?;
    Ok((be, cfg, plan, fp, weights))
}

fn model_thread(
    mut model: Model<CpuBackend>,
    collective: Arc<RingCollective<QuicRing>>,
    plans: std_mpsc::Receiver<StepPlan>,
    done: mpsc::UnboundedSender<Message>,
    step_delay: Option<Duration>,
) {
    while let Ok(plan) = plans.recv() {
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
        collective.begin_step(plan.step_id);
        let msg = match model.step(&plan) {
            Ok(samples) => Message::StepDone {
                step_id: plan.step_id,
                samples: samples.into_iter().map(|s| (s.seq_id, s.sample)).collect(),
            },
            Err(e) => Message::StepFailed { step_id: plan.step_id, message: e.to_string() },
        };
        if done.send(msg).is_err() {
            return;
        }
    }
}

async fn serve_steps(
    tx: &ConnSender,
    rx: &mut ConnReceiver,
    plans: &std_mpsc::Sender<StepPlan>,
    done: &mut mpsc::UnboundedReceiver<Message>,
) -> Result<(), NodeError> {
    loop {
        tokio::select! {
            frame = rx.recv() => match frame? {
                Frame::Control(Message::Step(plan)) => {
                    if plans.send(plan).is_err() {
                        return Err(NodeError::Protocol("model thread stopped".into()));
                    }
                }
                Frame::Control(Message::Heartbeat { seq, sent_unix_ns }) => {
                    tx.send(&Frame::Control(Message::HeartbeatAck { seq, sent_unix_ns })).await?;
                }
                Frame::Control(Message::Shutdown) => return Ok(()),
                Frame::Control(Message::Refused { code, message }) => return Err(NodeError::Refused { code, message }),
                other => return Err(NodeError::Protocol(format!("unexpected frame from the coordinator: {other:?}"))),
            },
            Some(msg) = done.recv() => tx.send(&Frame::Control(msg)).await?,
        }
    }
}

/// Ring links between the model thread (blocking) and the QUIC connections (async).
pub struct QuicRing {
    to_next: mpsc::UnboundedSender<RingFrame>,
    from_prev: Mutex<std_mpsc::Receiver<Result<RingFrame, String>>>,
}

impl RingTransport for QuicRing {
    fn send_next(&self, frame: RingFrame) -> Result<(), RingError> {
        self.to_next.send(frame).map_err(|_| RingError::Transport("ring successor connection is gone".into()))
    }
    fn recv_prev(&self, timeout: Duration) -> Result<RingFrame, RingError> {
        match self.from_prev.lock().expect("ring receiver lock").recv_timeout(timeout) {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(RingError::Transport(e)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                Err(RingError::Transport(format!("no ring frame from the predecessor within {timeout:?}")))
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                Err(RingError::Transport("ring predecessor connection is gone".into()))
            }
        }
    }
}

/// Dial the successor at `ring_next` and accept the predecessor named `ring_prev_node` (in
/// parallel: every rank does both, so doing them one after the other would deadlock a ring of
/// two). Returns the blocking transport for [`RingCollective`] and the tasks that pump frames.
pub async fn connect_ring(
    endpoint: &Endpoint,
    ring_next: &str,
    ring_prev_node: &str,
    tp: u32,
) -> Result<(QuicRing, Vec<tokio::task::JoinHandle<()>>), NodeError> {
    let (to_next, mut next_rx) = mpsc::unbounded_channel::<RingFrame>();
    let (prev_tx, from_prev) = std_mpsc::channel();
    let ring = QuicRing { to_next, from_prev: Mutex::new(from_prev) };
    if tp <= 1 {
        return Ok((ring, Vec::new()));
    }
    let dial = async {
        let addr = resolve(ring_next).await?;
        endpoint.connect(addr, DEFAULT_SERVER_NAME).await
    };
    let accept = async {
        loop {
            match endpoint.accept().await {
                Some(Ok(c)) if c.peer_name() == ring_prev_node => return Ok(c),
                Some(Ok(c)) => c.close("not my ring predecessor"),
                Some(Err(e)) => eprintln!("ring: refused a connection: {e}"),
                None => {
                    return Err(NetError::Protocol("endpoint closed while waiting for the ring predecessor".into()))
                }
            }
        }
    };
    let (next, prev) = tokio::time::timeout(RING_FORM_TIMEOUT, async { tokio::try_join!(dial, accept) })
        .await
        .map_err(|_| NodeError::Protocol(format!("ring did not form within {RING_FORM_TIMEOUT:?}")))??;
    let sender = tokio::spawn(async move {
        while let Some(f) = next_rx.recv().await {
            if next.send_ring(f.step_id, f.op, f.origin_rank, &f.data).await.is_err() {
                return;
            }
        }
    });
    let (prev_sender, mut prev_rx) = prev.split();
    let receiver = tokio::spawn(async move {
        // The sending half stays alive with the task so the stream is not finished under it.
        let _keep = prev_sender;
        loop {
            let item = match prev_rx.recv().await {
                Ok(Frame::Ring(f)) => Ok(f),
                Ok(other) => Err(format!("unexpected frame on the ring: {other:?}")),
                Err(e) => Err(format!("ring predecessor: {e}")),
            };
            let stop = item.is_err();
            if prev_tx.send(item).is_err() || stop {
                return;
            }
        }
    });
    Ok((ring, vec![sender, receiver]))
}

impl<C: Collective + ?Sized> Collective for Arc<C> {
    fn ranks(&self) -> usize {
        (**self).ranks()
    }
    fn all_reduce(&self, partial: Vec<f32>) -> Result<Vec<f32>, StepError> {
        (**self).all_reduce(partial)
    }
}
