//! The serving core between the HTTP front ends and the engines.
//!
//! One engine thread per replica (a tensor-parallel group, or the whole model in-process) runs the
//! loop of [`Engine`]: it takes [`Submission`]s and aborts from a channel, steps while there is
//! work, and pushes every sequence's tokens to that request's own channel. HTTP handlers never
//! touch an engine: they [`Service::submit`] a validated [`GenerateRequest`] and read
//! [`EngineEvent`]s until the last one. Dropping a [`Submission`] before it finished (a client that
//! disconnected) aborts the sequence, which frees its KV blocks at once.
//!
//! Admission is bounded: when `max_waiting` requests already wait for a slot across the replicas,
//! `submit` refuses with [`SubmitError::Overloaded`] (HTTP 429 with `Retry-After`) instead of
//! queueing without limit. Requests go to the live replica with the least outstanding work.
//!
//! Everything observable — queue, TTFT, inter-token latency, finishes, errors — is reported to a
//! [`ServiceObserver`] (the Prometheus metrics), never computed twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::cluster::{Cluster, NodeStatus};
use crate::engine::{
    Engine, EngineEvent, GenerateRequest, ModelInfo, RequestError, RequestId, SeqOutput, StepExecutor, Usage,
};
use crate::scheduler::{FinishReason, SchedulerConfig};

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

/// How one request joins its engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitOptions {
    /// Join the batch only after the engine has run this many more loop turns (idle turns
    /// count), so the command line and tests can make requests arrive mid-generation of others.
    pub delay_steps: u64,
}

/// Where a request's events go. Several requests may share one sink: every event names its
/// request.
pub type EventSink = mpsc::UnboundedSender<EngineEvent>;

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
    /// Requests submitted here that have not ended (routing weight).
    pub outstanding: AtomicUsize,
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

struct Pending {
    id: RequestId,
    req: GenerateRequest,
    sink: EventSink,
    at: Instant,
    delay_steps: u64,
}

enum Cmd {
    Submit(Box<Pending>),
    Abort(RequestId),
}

struct Replica {
    tx: std_mpsc::Sender<Cmd>,
    load: Arc<ReplicaLoad>,
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

/// Aborts its request when dropped before [`AbortOnDrop::disarm`]: a client that went away frees
/// the sequence's KV blocks at once.
pub struct AbortOnDrop {
    id: RequestId,
    tx: Option<std_mpsc::Sender<Cmd>>,
}

impl AbortOnDrop {
    /// The request ended: dropping no longer aborts anything.
    pub fn disarm(&mut self) {
        self.tx = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Cmd::Abort(self.id));
        }
    }
}

/// A request in flight with its own event channel. Read `events` until the last event
/// ([`EngineEvent::is_last`]); dropping it earlier aborts the request.
pub struct Submission {
    pub id: RequestId,
    pub events: mpsc::UnboundedReceiver<EngineEvent>,
    guard: AbortOnDrop,
}

impl Submission {
    /// The request finished: dropping no longer aborts anything.
    pub fn disarm(&mut self) {
        self.guard.disarm();
    }

    /// The next event, blocking the calling (non-async) thread. A closed channel — the engine
    /// thread went away — reads as a last `Rejected` event, so a reader never hangs.
    pub fn blocking_next(&mut self) -> EngineEvent {
        let ev = self
            .events
            .blocking_recv()
            .unwrap_or(EngineEvent::Rejected { id: self.id, error: RequestError::EngineStopped });
        if ev.is_last() {
            self.disarm();
        }
        ev
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
            let mut worker = EngineThread::new(engine, load.clone(), observer.clone());
            std::thread::Builder::new().name(format!("lockstep-engine-{g}")).spawn(move || worker.run(rx))?;
            replicas.push(Replica { tx, load });
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

    /// Queue a validated request on the least-loaded live replica, with its own event channel.
    pub fn submit(&self, req: GenerateRequest) -> Result<Submission, SubmitError> {
        let (tx, events) = mpsc::unbounded_channel();
        let guard = self.submit_to(req, SubmitOptions::default(), tx)?;
        Ok(Submission { id: guard.id, events, guard })
    }

    /// Queue a validated request whose events go to `sink` (which may be shared by many
    /// requests). Returns the guard that aborts it when dropped.
    pub fn submit_to(
        &self,
        req: GenerateRequest,
        opts: SubmitOptions,
        sink: EventSink,
    ) -> Result<AbortOnDrop, SubmitError> {
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
            .min_by_key(|r| r.load.outstanding.load(Ordering::Relaxed))
        else {
            let why = self.replicas.iter().find_map(|r| r.load.down_reason.lock().expect("lock").clone());
            self.observer.on_error("unavailable");
            return Err(SubmitError::Unavailable(why.unwrap_or_else(|| "no replicas".into())));
        };
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        r.load.outstanding.fetch_add(1, Ordering::Relaxed);
        r.load.queued.fetch_add(1, Ordering::Relaxed);
        let pending = Pending { id, req, sink, at: Instant::now(), delay_steps: opts.delay_steps };
        if r.tx.send(Cmd::Submit(Box::new(pending))).is_err() {
            r.load.outstanding.fetch_sub(1, Ordering::Relaxed);
            r.load.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Unavailable("engine thread stopped".into()));
        }
        self.observer.on_admitted();
        Ok(AbortOnDrop { id, tx: Some(r.tx.clone()) })
    }

    /// Submit every request and block until each has ended; the answers come back in input
    /// order. `on_event(i, event)` sees request `i`'s events as they arrive (for streaming).
    /// Must not be called from inside an async runtime.
    pub fn run_blocking(
        &self,
        requests: Vec<(GenerateRequest, SubmitOptions)>,
        mut on_event: impl FnMut(usize, &EngineEvent),
    ) -> Result<Vec<SeqOutput>, SubmitError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut outputs = vec![SeqOutput::default(); requests.len()];
        let mut index = HashMap::new();
        let mut guards = Vec::with_capacity(requests.len());
        for (i, (req, opts)) in requests.into_iter().enumerate() {
            let guard = self.submit_to(req, opts, tx.clone())?;
            index.insert(guard.id, i);
            guards.push(guard);
        }
        drop(tx);
        let mut open = outputs.len();
        while open > 0 {
            let Some(ev) = rx.blocking_recv() else { break };
            let Some(&i) = index.get(&ev.id()) else { continue };
            on_event(i, &ev);
            outputs[i].push(&ev);
            if ev.is_last() {
                guards[i].disarm();
                open -= 1;
            }
        }
        // Every engine thread is gone: whatever had not ended never will.
        for (i, out) in outputs.iter_mut().enumerate() {
            if !out.is_finished() {
                guards[i].disarm();
                out.push(&EngineEvent::Rejected { id: guards[i].id, error: RequestError::EngineStopped });
            }
        }
        Ok(outputs)
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

    /// The cluster the replicas run on, if any.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// True when at least one replica can serve.
    pub fn healthy(&self) -> bool {
        self.replicas.iter().any(|r| !r.load.down.load(Ordering::Relaxed))
    }
}

/// What the engine thread remembers of a request for its client: where its events go and the
/// timestamps behind the latency metrics. Tokens and text live in the engine alone.
struct Client {
    sink: EventSink,
    submitted: Instant,
    scheduled: bool,
    last_token: Option<Instant>,
    prompt_tokens: usize,
}

/// The one loop that drives an engine, for `serve`, `generate`, `bench`, `demo` and the canary:
/// it takes submissions and aborts from its channel, steps while there is work, and sends every
/// request's events to its sink.
struct EngineThread<E: StepExecutor> {
    engine: Engine<E>,
    load: Arc<ReplicaLoad>,
    obs: Arc<dyn ServiceObserver>,
    clients: HashMap<RequestId, Client>,
    /// Submissions held back by `delay_steps`, by the loop turn at which they join.
    delayed: BTreeMap<(u64, RequestId), Box<Pending>>,
    turns: u64,
}

impl<E: StepExecutor> EngineThread<E> {
    fn new(engine: Engine<E>, load: Arc<ReplicaLoad>, obs: Arc<dyn ServiceObserver>) -> Self {
        EngineThread { engine, load, obs, clients: HashMap::new(), delayed: BTreeMap::new(), turns: 0 }
    }

    fn run(&mut self, rx: std_mpsc::Receiver<Cmd>) {
        loop {
            // Block only when idle; otherwise take whatever arrived and keep stepping.
            let busy = self.engine.has_work() || !self.delayed.is_empty();
            let first = if busy {
                rx.try_recv().ok()
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            for cmd in first.into_iter().chain(rx.try_iter()) {
                match cmd {
                    Cmd::Submit(p) => {
                        self.load.queued.fetch_sub(1, Ordering::Relaxed);
                        if p.delay_steps == 0 {
                            self.admit(*p);
                        } else {
                            self.delayed.insert((self.turns + p.delay_steps, p.id), p);
                        }
                    }
                    Cmd::Abort(id) => self.abort(id),
                }
            }
            // Held-back submissions whose turn came; when nothing else runs, time jumps to the
            // next one (idle turns count).
            if !self.engine.has_work() {
                if let Some(&(at, _)) = self.delayed.keys().next() {
                    self.turns = self.turns.max(at);
                }
            }
            while let Some(entry) = self.delayed.first_entry() {
                if entry.key().0 > self.turns {
                    break;
                }
                let p = entry.remove();
                self.admit(*p);
            }
            self.turns += 1;
            if !self.engine.has_work() {
                self.sync_load();
                continue;
            }
            let events = match self.engine.step() {
                Ok(evs) => evs,
                Err(e) => {
                    let msg = e.to_string();
                    self.load.down.store(true, Ordering::SeqCst);
                    *self.load.down_reason.lock().expect("lock") = Some(msg.clone());
                    self.obs.on_error("replica_down");
                    self.engine.fail_all(&msg)
                }
            };
            self.load.steps.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            for id in self.engine.last_plan() {
                if let Some(c) = self.clients.get_mut(id) {
                    if !c.scheduled {
                        c.scheduled = true;
                        self.obs.on_queue_time(now.duration_since(c.submitted).as_secs_f64());
                        self.obs.on_prompt_tokens(c.prompt_tokens);
                    }
                }
            }
            for ev in events {
                self.dispatch(ev);
            }
            self.sync_load();
        }
    }

    fn admit(&mut self, p: Pending) {
        if self.load.down.load(Ordering::Relaxed) {
            let reason = self.load.down_reason.lock().expect("lock").clone().unwrap_or_default();
            self.reject(p.id, &p.sink, RequestError::Unavailable(reason));
            return;
        }
        let prompt_tokens = p.req.prompt_ids.len();
        match self.engine.add(p.id, p.req) {
            Ok(()) => {
                let client =
                    Client { sink: p.sink, submitted: p.at, scheduled: false, last_token: None, prompt_tokens };
                self.clients.insert(p.id, client);
            }
            Err(e) => self.reject(p.id, &p.sink, RequestError::Invalid(e)),
        }
    }

    fn reject(&self, id: RequestId, sink: &EventSink, error: RequestError) {
        self.obs.on_error(error.error_type());
        let _ = sink.send(EngineEvent::Rejected { id, error });
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    fn abort(&mut self, id: RequestId) {
        let key = self.delayed.keys().find(|(_, d)| *d == id).copied();
        if let Some(p) = key.and_then(|k| self.delayed.remove(&k)) {
            // Never joined: it ends as aborted without having run.
            let usage = Usage { prompt_tokens: p.req.prompt_ids.len(), completion_tokens: 0 };
            let _ = p.sink.send(EngineEvent::Finished { id, reason: FinishReason::Abort, text: String::new(), usage });
            self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        if let Some(ev) = self.engine.abort(id) {
            self.dispatch(ev);
        }
    }

    fn sync_load(&self) {
        let s = self.engine.scheduler();
        self.load.running.store(s.num_running(), Ordering::Relaxed);
        self.load.waiting.store(s.num_waiting(), Ordering::Relaxed);
        self.load.kv_used_blocks.store(s.used_blocks() as usize, Ordering::Relaxed);
    }

    fn dispatch(&mut self, ev: EngineEvent) {
        let id = ev.id();
        let Some(c) = self.clients.get_mut(&id) else { return };
        match &ev {
            EngineEvent::Token { .. } => {
                let now = Instant::now();
                match c.last_token {
                    None => self.obs.on_first_token(now.duration_since(c.submitted).as_secs_f64()),
                    Some(t) => self.obs.on_inter_token(now.duration_since(t).as_secs_f64()),
                }
                c.last_token = Some(now);
                self.obs.on_generation_tokens(1);
                self.load.generated_tokens.fetch_add(1, Ordering::Relaxed);
            }
            EngineEvent::Finished { reason, .. } => {
                if let FinishReason::Error(_) = reason {
                    self.obs.on_error("engine");
                }
                self.obs.on_finished(reason, c.submitted.elapsed().as_secs_f64());
            }
            EngineEvent::Rejected { error, .. } => self.obs.on_error(error.error_type()),
        }
        let last = ev.is_last();
        let _ = c.sink.send(ev);
        if last {
            self.clients.remove(&id);
            self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
