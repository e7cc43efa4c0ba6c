//! The serving core between the HTTP front ends and the engines.
//!
//! One engine thread per replica (a tensor-parallel group, or the whole model in-process) runs the
//! loop of [`Engine`]: it takes [`Submission`]s and aborts from a channel, steps while there is
//! work, and pushes every sequence's tokens to that request's own channel. HTTP handlers never
//! touch an engine: they [`Service::submit`] a validated [`GenerateRequest`] and read
//! [`SeqUpdate`]s until `Finished`. Dropping a [`Submission`] before it finished (a client that
//! disconnected) aborts the sequence, which frees its KV blocks at once.
//!
//! Admission is bounded: when `max_waiting` requests already wait for a slot across the replicas,
//! `submit` refuses with [`SubmitError::Overloaded`] (HTTP 429 with `Retry-After`) instead of
//! queueing without limit. Requests go to the live replica with the least outstanding work.
//!
//! Everything observable — queue, TTFT, inter-token latency, finishes, errors — is reported to a
//! [`ServiceObserver`] (the Prometheus metrics), never computed twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::cluster::{Cluster, NodeStatus};
use crate::engine::{Engine, EngineEvent, GenerateRequest, ModelInfo, StepExecutor};
use crate::scheduler::{FinishReason, SchedulerConfig};

/// What happens to one submitted request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqUpdate {
    /// A generated token and the text it completed (possibly empty while text is held back).
    Token { token_id: u32, logprob: f32, text: String, index: u32 },
    /// The request ended. `text` is held-back text released at the end.
    Finished { reason: FinishReason, text: String, prompt_tokens: usize, completion_tokens: usize },
    /// The engine would not take the request (it never ran).
    Rejected { error_type: &'static str, message: String },
}

/// Hooks for metrics. Every method has a no-op default.
pub trait ServiceObserver: Send + Sync {
    fn on_admitted(&self) {}
    fn on_queue_time(&self, _secs: f64) {}
    fn on_first_token(&self, _ttft_secs: f64) {}
    fn on_inter_token(&self, _secs: f64) {}
    fn on_prompt_tokens(&self, _n: usize) {}
    fn on_generation_tokens(&self, _n: usize) {}
    fn on_finished(&self, _reason: &FinishReason, _e2e_secs: f64) {}
    fn on_error(&self, _error_type: &str) {}
}

pub struct NoopObserver;
impl ServiceObserver for NoopObserver {}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SubmitError {
    #[error("server overloaded: {waiting} requests are already waiting")]
    Overloaded { waiting: usize, retry_after_secs: u64 },
    #[error("no replica is available: {0}")]
    Unavailable(String),
}

impl SubmitError {
    pub fn error_type(&self) -> &'static str {
        match self {
            SubmitError::Overloaded { .. } => "overloaded",
            SubmitError::Unavailable(_) => "unavailable",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ServiceOptions {
    /// Most requests waiting for a running slot, across all replicas.
    pub max_waiting: usize,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions { max_waiting: 256 }
    }
}

/// Load and health of one replica, for routing and the ops API.
#[derive(Debug, Default)]
pub struct ReplicaLoad {
    pub running: AtomicUsize,
    /// Waiting in the scheduler for a running slot.
    pub waiting: AtomicUsize,
    /// Submitted but not yet taken by the engine thread.
    pub queued: AtomicUsize,
    pub kv_used_blocks: AtomicUsize,
    pub kv_total_blocks: AtomicUsize,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub down: AtomicBool,
    pub down_reason: Mutex<Option<String>>,
}

/// A snapshot of one replica.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaStatus {
    pub group: usize,
    pub state: &'static str,
    pub down_reason: Option<String>,
    pub running: usize,
    pub waiting: usize,
    pub kv_used_blocks: usize,
    pub kv_total_blocks: usize,
    pub generated_tokens: u64,
    pub steps: u64,
}

enum Cmd {
    Submit { id: u64, req: GenerateRequest, tx: mpsc::UnboundedSender<SeqUpdate>, at: Instant },
    Abort(u64),
}

struct Replica {
    tx: std_mpsc::Sender<Cmd>,
    load: Arc<ReplicaLoad>,
    outstanding: Arc<AtomicUsize>,
}

pub struct Service {
    info: ModelInfo,
    replicas: Vec<Replica>,
    observer: Arc<dyn ServiceObserver>,
    opts: ServiceOptions,
    next_id: AtomicU64,
    cluster: Option<Cluster>,
    started: Instant,
}

/// A request in flight. Read `updates` until `Finished` or `Rejected`; dropping it earlier aborts
/// the sequence.
pub struct Submission {
    pub id: u64,
    pub updates: mpsc::UnboundedReceiver<SeqUpdate>,
    abort: Option<std_mpsc::Sender<Cmd>>,
}

impl Submission {
    /// The request finished: dropping no longer aborts anything.
    pub fn disarm(&mut self) {
        self.abort = None;
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if let Some(tx) = self.abort.take() {
            let _ = tx.send(Cmd::Abort(self.id));
        }
    }
}

impl Service {
    /// Start one engine thread per executor.
    pub fn start(
        info: ModelInfo,
        executors: Vec<Box<dyn StepExecutor>>,
        cluster: Option<Cluster>,
        sched: SchedulerConfig,
        opts: ServiceOptions,
        observer: Arc<dyn ServiceObserver>,
    ) -> anyhow::Result<Service> {
        let mut replicas = Vec::new();
        for (g, exec) in executors.into_iter().enumerate() {
            let engine = Engine::new(sched, exec, info.tokenizer.clone())?;
            let (tx, rx) = std_mpsc::channel();
            let load = Arc::new(ReplicaLoad::default());
            load.kv_total_blocks.store(sched.num_blocks as usize, Ordering::Relaxed);
            let outstanding = Arc::new(AtomicUsize::new(0));
            let (l, o, obs) = (load.clone(), outstanding.clone(), observer.clone());
            std::thread::Builder::new()
                .name(format!("lockstep-engine-{g}"))
                .spawn(move || engine_loop(engine, rx, l, o, obs))?;
            replicas.push(Replica { tx, load, outstanding });
        }
        Ok(Service { info, replicas, observer, opts, next_id: AtomicU64::new(1), cluster, started: Instant::now() })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    pub fn observer(&self) -> &Arc<dyn ServiceObserver> {
        &self.observer
    }
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Queue a validated request on the least-loaded live replica.
    pub fn submit(&self, req: GenerateRequest) -> Result<Submission, SubmitError> {
        let waiting: usize = self
            .replicas
            .iter()
            .map(|r| r.load.waiting.load(Ordering::Relaxed) + r.load.queued.load(Ordering::Relaxed))
            .sum();
        if waiting >= self.opts.max_waiting {
            self.observer.on_error("overloaded");
            return Err(SubmitError::Overloaded { waiting, retry_after_secs: 1 });
        }
        let Some(r) = self
            .replicas
            .iter()
            .filter(|r| !r.load.down.load(Ordering::Relaxed))
            .min_by_key(|r| r.outstanding.load(Ordering::Relaxed))
        else {
            let why = self.replicas.iter().filter_map(|r| r.load.down_reason.lock().expect("lock").clone()).next();
            self.observer.on_error("unavailable");
            return Err(SubmitError::Unavailable(why.unwrap_or_else(|| "no replicas".into())));
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, updates) = mpsc::unbounded_channel();
        r.outstanding.fetch_add(1, Ordering::Relaxed);
        r.load.queued.fetch_add(1, Ordering::Relaxed);
        if r.tx.send(Cmd::Submit { id, req, tx, at: Instant::now() }).is_err() {
            r.outstanding.fetch_sub(1, Ordering::Relaxed);
            r.load.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Unavailable("engine thread stopped".into()));
        }
        self.observer.on_admitted();
        Ok(Submission { id, updates, abort: Some(r.tx.clone()) })
    }

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .enumerate()
            .map(|(g, r)| {
                let l = &r.load;
                let down = l.down.load(Ordering::Relaxed);
                ReplicaStatus {
                    group: g,
                    state: if down { "down" } else { "ready" },
                    down_reason: l.down_reason.lock().expect("lock").clone(),
                    running: l.running.load(Ordering::Relaxed),
                    waiting: l.waiting.load(Ordering::Relaxed) + l.queued.load(Ordering::Relaxed),
                    kv_used_blocks: l.kv_used_blocks.load(Ordering::Relaxed),
                    kv_total_blocks: l.kv_total_blocks.load(Ordering::Relaxed),
                    generated_tokens: l.generated_tokens.load(Ordering::Relaxed),
                    steps: l.steps.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// The node processes (empty when the model runs in-process).
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.cluster.as_ref().map(|c| c.groups().iter().flat_map(|g| g.status()).collect()).unwrap_or_default()
    }

    /// True when at least one replica can serve.
    pub fn healthy(&self) -> bool {
        self.replicas.iter().any(|r| !r.load.down.load(Ordering::Relaxed))
    }
}

struct Live {
    tx: mpsc::UnboundedSender<SeqUpdate>,
    submitted: Instant,
    scheduled: bool,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    completion_tokens: usize,
    outstanding_done: bool,
}

fn engine_loop<E: StepExecutor>(
    mut engine: Engine<E>,
    rx: std_mpsc::Receiver<Cmd>,
    load: Arc<ReplicaLoad>,
    outstanding: Arc<AtomicUsize>,
    obs: Arc<dyn ServiceObserver>,
) {
    let mut live: HashMap<u64, Live> = HashMap::new(); // engine seq id → request
    let mut by_service_id: HashMap<u64, u64> = HashMap::new();
    loop {
        // Block only when idle; otherwise take whatever arrived and keep stepping.
        let first = if engine.has_work() {
            rx.try_recv().ok()
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        let mut cmds: Vec<Cmd> = first.into_iter().collect();
        cmds.extend(rx.try_iter());
        for cmd in cmds {
            match cmd {
                Cmd::Submit { id, req, tx, at } => {
                    load.queued.fetch_sub(1, Ordering::Relaxed);
                    if load.down.load(Ordering::Relaxed) {
                        let reason = load.down_reason.lock().expect("lock").clone().unwrap_or_default();
                        let _ = tx.send(SeqUpdate::Rejected { error_type: "unavailable", message: reason });
                        outstanding.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    let prompt_tokens = req.prompt_ids.len();
                    match engine.add(req) {
                        Ok(seq) => {
                            by_service_id.insert(id, seq);
                            live.insert(
                                seq,
                                Live {
                                    tx,
                                    submitted: at,
                                    scheduled: false,
                                    last_token: None,
                                    prompt_tokens,
                                    completion_tokens: 0,
                                    outstanding_done: false,
                                },
                            );
                        }
                        Err(e) => {
                            let (error_type, message) = match &e {
                                crate::engine::EngineError::Add(a) => (a.error_type(), a.to_string()),
                                other => ("internal", other.to_string()),
                            };
                            obs.on_error(error_type);
                            let _ = tx.send(SeqUpdate::Rejected { error_type, message });
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Cmd::Abort(id) => {
                    if let Some(seq) = by_service_id.remove(&id) {
                        if let Some(ev) = engine.abort(seq) {
                            dispatch(&mut live, ev, &outstanding, &load, obs.as_ref());
                        }
                    }
                }
            }
        }
        if !engine.has_work() {
            sync_load(&engine, &load, &live);
            continue;
        }
        let events = match engine.step() {
            Ok(evs) => evs,
            Err(e) => {
                let msg = e.to_string();
                load.down.store(true, Ordering::SeqCst);
                *load.down_reason.lock().expect("lock") = Some(msg.clone());
                obs.on_error("replica_down");
                engine.fail_all(&msg)
            }
        };
        load.steps.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        for seq in engine.last_plan().to_vec() {
            if let Some(l) = live.get_mut(&seq) {
                if !l.scheduled {
                    l.scheduled = true;
                    obs.on_queue_time(now.duration_since(l.submitted).as_secs_f64());
                    obs.on_prompt_tokens(l.prompt_tokens);
                }
            }
        }
        for ev in events {
            dispatch(&mut live, ev, &outstanding, &load, obs.as_ref());
        }
        live.retain(|seq, l| {
            let keep = !l.outstanding_done;
            if !keep {
                engine.take_output(*seq);
                by_service_id.retain(|_, s| s != seq);
            }
            keep
        });
        sync_load(&engine, &load, &live);
    }
}

fn sync_load<E: StepExecutor>(engine: &Engine<E>, load: &ReplicaLoad, _live: &HashMap<u64, Live>) {
    let s = engine.scheduler();
    load.running.store(s.num_running(), Ordering::Relaxed);
    load.waiting.store(s.num_waiting(), Ordering::Relaxed);
    load.kv_used_blocks.store(s.used_blocks() as usize, Ordering::Relaxed);
}

fn dispatch(
    live: &mut HashMap<u64, Live>,
    ev: EngineEvent,
    outstanding: &AtomicUsize,
    load: &ReplicaLoad,
    obs: &dyn ServiceObserver,
) {
    match ev {
        EngineEvent::Token { seq_id, token_id, logprob, text, index } => {
            let Some(l) = live.get_mut(&seq_id) else { return };
            let now = Instant::now();
            match l.last_token {
                None => obs.on_first_token(now.duration_since(l.submitted).as_secs_f64()),
                Some(t) => obs.on_inter_token(now.duration_since(t).as_secs_f64()),
            }
            l.last_token = Some(now);
            l.completion_tokens += 1;
            obs.on_generation_tokens(1);
            load.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let _ = l.tx.send(SeqUpdate::Token { token_id, logprob, text, index });
        }
        EngineEvent::Finished { seq_id, reason, text } => {
            let Some(l) = live.get_mut(&seq_id) else { return };
            if let FinishReason::Error(_) = &reason {
                obs.on_error("engine");
            }
            obs.on_finished(&reason, l.submitted.elapsed().as_secs_f64());
            let _ = l.tx.send(SeqUpdate::Finished {
                reason,
                text,
                prompt_tokens: l.prompt_tokens,
                completion_tokens: l.completion_tokens,
            });
            if !l.outstanding_done {
                l.outstanding_done = true;
                outstanding.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}
