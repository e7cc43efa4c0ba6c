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
//! # Replicas come and go; requests move
//!
//! Replicas are added at any time ([`Service::add_replica`]: a tensor-parallel group that has just
//! formed). When a replica's executor fails, its engine thread takes every unfinished request out
//! of the engine ([`Engine::evacuate`]: prompt, tokens so far, text state) and hands it back to the
//! [`Router`], which resumes it on another replica. There it is re-prefilled from prompt plus the
//! tokens already emitted and continues with the next token index, so — sampling noise being keyed
//! by that index and every kernel being batch- and TP-invariant — the client receives exactly the
//! bytes an uninterrupted run would have produced, on the same event channel, with no error and no
//! repeated token. A request that has moved `migration_limit` times fails, naming the failures.
//! While no replica serves, new and moving requests are *parked*; those still parked after
//! `queue_timeout` are refused as unavailable (HTTP 503 with `Retry-After`).
//!
//! The routing table (live replicas, where each request is, the parked queue) sits behind one
//! lock, and every send to an engine thread happens under it: a replica that failed removes itself
//! under the lock and then drains its channel, so no submission or abort can be lost in between.
//!
//! Everything observable — queue, TTFT, inter-token latency, finishes, errors — is reported to a
//! [`ServiceObserver`] (the Prometheus metrics), never computed twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::cluster::{Cluster, NodeStatus};
use crate::engine::{
    Engine, EngineEvent, GenerateRequest, Migrating, ModelInfo, RequestError, RequestId, SeqOutput, StepExecutor,
    StepFailure, Usage,
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
    /// A request moved to another replica after its replica failed.
    fn on_migration(&self) {}
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

/// `--migration-limit` default.
pub const DEFAULT_MIGRATION_LIMIT: u32 = 3;
/// `--queue-timeout-s` default.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct ServiceOptions {
    /// Most requests waiting for a running slot, across all replicas.
    pub max_waiting: usize,
    /// How many times a request may move to another replica before it fails.
    pub migration_limit: u32,
    /// How long a request waits for a serving replica when none is left.
    pub queue_timeout: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            max_waiting: 256,
            migration_limit: DEFAULT_MIGRATION_LIMIT,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
        }
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
    /// Requests routed here that have not ended or moved on (routing weight).
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

/// What the engine thread remembers of a request for its client: where its events go and the
/// timestamps behind the latency metrics. Tokens and text live in the engine alone.
struct Client {
    sink: EventSink,
    submitted: Instant,
    scheduled: bool,
    last_token: Option<Instant>,
    prompt_tokens: usize,
}

/// A request on its way to another replica.
struct Moving {
    request: Migrating,
    client: Client,
    /// Why it had to move (the failure that named the nodes).
    reason: String,
}

impl Pending {
    /// Its last event when it is aborted before it ever joined an engine.
    fn aborted(&self) -> EngineEvent {
        let usage = Usage { prompt_tokens: self.req.prompt_ids.len(), completion_tokens: 0 };
        EngineEvent::Finished { id: self.id, reason: FinishReason::Abort, text: String::new(), usage }
    }
}

enum Cmd {
    Submit(Box<Pending>),
    Resume(Box<Moving>),
    Abort(RequestId),
    /// The replica's group stopped serving (its membership said so): hand everything over now,
    /// even if idle.
    Fail(String),
}

/// A request that waits for a replica (none serves right now).
enum Parked {
    New(Box<Pending>),
    Moving(Box<Moving>),
}

impl Parked {
    fn id(&self) -> RequestId {
        match self {
            Parked::New(p) => p.id,
            Parked::Moving(m) => m.request.id,
        }
    }

    fn sink(&self) -> &EventSink {
        match self {
            Parked::New(p) => &p.sink,
            Parked::Moving(m) => &m.client.sink,
        }
    }
}

struct Replica {
    /// The replica's label: its tensor-parallel group id (or its index when in-process).
    group: usize,
    tx: std_mpsc::Sender<Cmd>,
    load: Arc<ReplicaLoad>,
}

/// The routing table: live replicas, where each request is, and the parked requests. One lock,
/// and every send to an engine thread happens under it (see the module docs).
#[derive(Default)]
struct Table {
    replicas: Vec<Replica>,
    location: HashMap<RequestId, usize>,
    parked: VecDeque<(Instant, Parked)>,
    /// Why the last replica went down (for 503 messages and `/health`).
    last_failure: Option<String>,
    /// Aborts that arrived while their request was between replicas.
    orphan_aborts: std::collections::HashSet<RequestId>,
}

/// Routes requests to replicas and moves them when a replica fails.
pub struct Router {
    table: Mutex<Table>,
    /// Wakes the expiry thread when something is parked.
    parked_cv: Condvar,
    obs: Arc<dyn ServiceObserver>,
    opts: ServiceOptions,
    sched: SchedulerConfig,
    info: ModelInfo,
    migrations: AtomicU64,
}

impl Router {
    /// The least-loaded live replica (by outstanding requests), if any.
    fn pick(table: &Table) -> Option<usize> {
        table
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.load.down.load(Ordering::Relaxed))
            .min_by_key(|(_, r)| r.load.outstanding.load(Ordering::Relaxed))
            .map(|(i, _)| i)
    }

    /// Send a new request to a replica, or park it when none serves. Called with the lock held.
    fn route_new(&self, table: &mut Table, p: Box<Pending>) {
        self.route(table, Parked::New(p));
    }

    /// Send a moving request to a replica, or park it. Called with the lock held.
    fn route_moving(&self, table: &mut Table, m: Box<Moving>) {
        self.route(table, Parked::Moving(m));
    }

    /// Send a request to the least-loaded live replica, or park it until one is added.
    fn route(&self, table: &mut Table, mut item: Parked) {
        while let Some(i) = Self::pick(table) {
            let r = &table.replicas[i];
            r.load.outstanding.fetch_add(1, Ordering::Relaxed);
            let (group, id) = (r.group, item.id());
            let cmd = match item {
                Parked::New(p) => {
                    r.load.queued.fetch_add(1, Ordering::Relaxed);
                    Cmd::Submit(p)
                }
                Parked::Moving(m) => Cmd::Resume(m),
            };
            match r.tx.send(cmd) {
                Ok(()) => {
                    table.location.insert(id, group);
                    return;
                }
                // The engine thread is gone without removing itself (it panicked).
                Err(std_mpsc::SendError(back)) => {
                    let r = table.replicas.remove(i);
                    r.load.down.store(true, Ordering::SeqCst);
                    item = match back {
                        Cmd::Submit(p) => Parked::New(p),
                        Cmd::Resume(m) => Parked::Moving(m),
                        Cmd::Abort(_) | Cmd::Fail(_) => unreachable!("the command sent comes back"),
                    };
                }
            }
        }
        table.location.remove(&item.id());
        table.parked.push_back((Instant::now() + self.opts.queue_timeout, item));
        self.parked_cv.notify_all();
    }

    /// A request left a failed replica: count the move and send it on, or fail it past the limit.
    fn migrate(&self, table: &mut Table, mut m: Moving) {
        if table.orphan_aborts.remove(&m.request.id) {
            table.location.remove(&m.request.id);
            self.finish_elsewhere(&m, FinishReason::Abort);
            return;
        }
        m.request.migrations += 1;
        self.migrations.fetch_add(1, Ordering::Relaxed);
        self.obs.on_migration();
        if m.request.migrations > self.opts.migration_limit {
            let message = format!(
                "the request was moved {} times (--migration-limit {}); last failure: {}",
                m.request.migrations - 1,
                self.opts.migration_limit,
                m.reason
            );
            tracing::warn!(request_id = %m.request.id, "failed: {message}");
            table.location.remove(&m.request.id);
            self.finish_elsewhere(&m, FinishReason::Error(message));
            return;
        }
        tracing::warn!(request_id = %m.request.id, migrations = m.request.migrations, reason = %m.reason, "migrating");
        self.route_moving(table, Box::new(m));
    }

    /// End a request that is not in any engine (parked or over the migration limit).
    fn finish_elsewhere(&self, m: &Moving, reason: FinishReason) {
        if let FinishReason::Error(_) = &reason {
            self.obs.on_error("engine");
        }
        self.obs.on_finished(&reason, m.client.submitted.elapsed().as_secs_f64());
        let usage = Usage { prompt_tokens: m.client.prompt_tokens, completion_tokens: m.request.generated() };
        let _ = m.client.sink.send(EngineEvent::Finished { id: m.request.id, reason, text: String::new(), usage });
    }

    fn abort(&self, id: RequestId) {
        let mut table = self.table.lock().expect("routing table");
        if let Some(&group) = table.location.get(&id) {
            match table.replicas.iter().find(|r| r.group == group) {
                Some(r) => {
                    let _ = r.tx.send(Cmd::Abort(id));
                }
                // Its replica just failed and is handing it over: end it when it arrives.
                None => {
                    table.orphan_aborts.insert(id);
                }
            }
            return;
        }
        if let Some(k) = table.parked.iter().position(|(_, p)| p.id() == id) {
            let (_, parked) = table.parked.remove(k).expect("found");
            match parked {
                Parked::New(p) => {
                    let _ = p.sink.send(p.aborted());
                }
                Parked::Moving(m) => self.finish_elsewhere(&m, FinishReason::Abort),
            }
        }
    }

    /// Refuse the parked requests whose wait ran out; returns the next deadline.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut table = self.table.lock().expect("routing table");
        let why = table.last_failure.clone().unwrap_or_else(|| "no replica has formed".into());
        let message = format!("no replica could serve within {:?}: {why}", self.opts.queue_timeout);
        while table.parked.front().is_some_and(|(deadline, _)| *deadline <= now) {
            let (_, parked) = table.parked.pop_front().expect("front exists");
            tracing::warn!(request_id = %parked.id(), "refused: {message}");
            self.obs.on_error("unavailable");
            let error = RequestError::Unavailable(message.clone());
            let _ = parked.sink().send(EngineEvent::Rejected { id: parked.id(), error });
        }
        table.parked.front().map(|(d, _)| *d)
    }
}

pub struct Service {
    info: ModelInfo,
    router: Arc<Router>,
    observer: Arc<dyn ServiceObserver>,
    opts: ServiceOptions,
    next_id: AtomicU64,
    next_replica: AtomicUsize,
    cluster: Option<Cluster>,
    started: Instant,
}

/// Aborts its request when dropped before [`AbortOnDrop::disarm`]: a client that went away frees
/// the sequence's KV blocks at once, wherever the request is by then.
pub struct AbortOnDrop {
    id: RequestId,
    router: Option<Weak<Router>>,
}

impl AbortOnDrop {
    /// The request ended: dropping no longer aborts anything.
    pub fn disarm(&mut self) {
        self.router = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(router) = self.router.take().and_then(|r| r.upgrade()) {
            router.abort(self.id);
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
    /// Start one engine thread per executor (more can be added later with
    /// [`Service::add_replica`]).
    pub fn start(
        info: ModelInfo,
        executors: Vec<Box<dyn StepExecutor>>,
        cluster: Option<Cluster>,
        sched: SchedulerConfig,
        opts: ServiceOptions,
        observer: Arc<dyn ServiceObserver>,
    ) -> anyhow::Result<Service> {
        let router = Arc::new(Router {
            table: Mutex::new(Table::default()),
            parked_cv: Condvar::new(),
            obs: observer.clone(),
            opts,
            sched,
            info: info.clone(),
            migrations: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&router);
        std::thread::Builder::new().name("lockstep-router".into()).spawn(move || expiry_loop(weak))?;
        let service = Service {
            info,
            router,
            observer,
            opts,
            next_id: AtomicU64::new(1),
            next_replica: AtomicUsize::new(0),
            cluster,
            started: Instant::now(),
        };
        for exec in executors {
            let g = service.next_replica.fetch_add(1, Ordering::Relaxed);
            service.add_replica(g, exec)?;
        }
        if let Some(c) = &service.cluster {
            c.attach(service.replica_sink());
        }
        Ok(service)
    }

    /// Start serving on one more replica (a group that has just formed), labelled `group`.
    /// Parked requests go to it at once.
    pub fn add_replica(&self, group: usize, exec: Box<dyn StepExecutor>) -> anyhow::Result<()> {
        add_replica(&self.router, group, exec)
    }

    /// A handle that adds replicas without holding the service (for the cluster's membership
    /// driver).
    pub fn replica_sink(&self) -> ReplicaSink {
        ReplicaSink(Arc::downgrade(&self.router))
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
    /// Requests moved to another replica so far.
    pub fn migrations(&self) -> u64 {
        self.router.migrations.load(Ordering::Relaxed)
    }

    /// Why `requests` (the choices of one API request, admitted together) could never be
    /// admitted, whatever the load: more choices than the waiting queue holds would get 429 on
    /// every retry. (A choice too long for the whole KV cache is refused by validation; choices
    /// that fit one by one but not all at once still run, taking turns by preemption.)
    pub fn admissible(&self, requests: &[GenerateRequest]) -> Result<(), String> {
        if requests.len() > self.opts.max_waiting {
            return Err(format!(
                "it has {} choices (n × prompts) but at most {} requests may wait for a slot (--max-waiting); \
                 lower n or send the prompts separately",
                requests.len(),
                self.opts.max_waiting
            ));
        }
        Ok(())
    }

    /// Queue a validated request on the least-loaded live replica, with its own event channel.
    pub fn submit(&self, req: GenerateRequest) -> Result<Submission, SubmitError> {
        let (tx, events) = mpsc::unbounded_channel();
        let guard = self.submit_to(req, SubmitOptions::default(), tx)?;
        Ok(Submission { id: guard.id, events, guard })
    }

    /// Queue a validated request whose events go to `sink` (which may be shared by many
    /// requests). Returns the guard that aborts it when dropped. When no replica serves right
    /// now, the request waits up to `queue_timeout` for one.
    pub fn submit_to(
        &self,
        req: GenerateRequest,
        opts: SubmitOptions,
        sink: EventSink,
    ) -> Result<AbortOnDrop, SubmitError> {
        let mut table = self.router.table.lock().expect("routing table");
        let waiting: usize = table
            .replicas
            .iter()
            .map(|r| r.load.waiting.load(Ordering::Relaxed) + r.load.queued.load(Ordering::Relaxed))
            .sum::<usize>()
            + table.parked.len();
        if waiting >= self.opts.max_waiting {
            self.observer.on_error("overloaded");
            return Err(SubmitError::Overloaded { waiting, retry_after_secs: 1 });
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let pending = Pending { id, req, sink, at: Instant::now(), delay_steps: opts.delay_steps };
        self.router.route_new(&mut table, Box::new(pending));
        self.observer.on_admitted();
        Ok(AbortOnDrop { id, router: Some(Arc::downgrade(&self.router)) })
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
        let table = self.router.table.lock().expect("routing table");
        table
            .replicas
            .iter()
            .map(|r| {
                let l = &r.load;
                let down = l.down.load(Ordering::Relaxed);
                ReplicaStatus {
                    group: r.group,
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

    /// Requests waiting for a replica because none serves.
    pub fn parked(&self) -> usize {
        self.router.table.lock().expect("routing table").parked.len()
    }

    /// The node processes (empty when the model runs in-process).
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.cluster.as_ref().map(|c| c.nodes()).unwrap_or_default()
    }

    /// The cluster the replicas run on, if any.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// True when at least one replica can serve.
    pub fn healthy(&self) -> bool {
        self.unhealthy_reason().is_none()
    }

    /// Why no replica serves (`None` while one does).
    pub fn unhealthy_reason(&self) -> Option<String> {
        let table = self.router.table.lock().expect("routing table");
        if table.replicas.iter().any(|r| !r.load.down.load(Ordering::Relaxed)) {
            return None;
        }
        Some(table.last_failure.clone().unwrap_or_else(|| "no replica has formed yet".into()))
    }
}

/// Adds replicas to a running service from elsewhere (the cluster's membership driver); holds
/// the service only weakly.
#[derive(Clone)]
pub struct ReplicaSink(Weak<Router>);

impl ReplicaSink {
    /// Start serving on a new replica; `false` when the service is gone.
    pub fn add(&self, group: usize, exec: Box<dyn StepExecutor>) -> anyhow::Result<bool> {
        match self.0.upgrade() {
            Some(router) => add_replica(&router, group, exec).map(|()| true),
            None => Ok(false),
        }
    }

    /// Retire replica `group` at once: its requests move to the replicas that still serve.
    pub fn fail(&self, group: usize, reason: String) {
        if let Some(router) = self.0.upgrade() {
            let table = router.table.lock().expect("routing table");
            if let Some(r) = table.replicas.iter().find(|r| r.group == group) {
                r.load.down.store(true, Ordering::SeqCst);
                let _ = r.tx.send(Cmd::Fail(reason));
            }
        }
    }
}

fn add_replica(router: &Arc<Router>, group: usize, exec: Box<dyn StepExecutor>) -> anyhow::Result<()> {
    let engine = Engine::new(router.sched, exec, router.info.tokenizer.clone())?;
    let (tx, rx) = std_mpsc::channel();
    let load = Arc::new(ReplicaLoad::default());
    load.kv_total_blocks.store(router.sched.num_blocks as usize, Ordering::Relaxed);
    let mut worker = EngineThread::new(engine, group, load.clone(), router.obs.clone(), Arc::downgrade(router));
    std::thread::Builder::new().name(format!("lockstep-engine-{group}")).spawn(move || worker.run(rx))?;
    let mut table = router.table.lock().expect("routing table");
    table.replicas.push(Replica { group, tx, load });
    // Whatever waited for a replica goes now, oldest first.
    let parked: Vec<_> = table.parked.drain(..).collect();
    for (_, p) in parked {
        match p {
            Parked::New(p) => router.route_new(&mut table, p),
            Parked::Moving(m) => router.route_moving(&mut table, m),
        }
    }
    Ok(())
}

/// Refuses parked requests whose wait ran out; ends with the service.
fn expiry_loop(router: Weak<Router>) {
    loop {
        let Some(r) = router.upgrade() else { return };
        let next = r.expire(Instant::now());
        let table = r.table.lock().expect("routing table");
        // Wake at the next deadline, when something is parked, or now and then to notice that
        // the service is gone.
        let wait = next.map_or(Duration::from_millis(500), |d| d.saturating_duration_since(Instant::now()));
        let _ = r.parked_cv.wait_timeout(table, wait.min(Duration::from_millis(500)));
    }
}

/// The one loop that drives an engine, for `serve`, `generate`, `bench`, `demo` and the canary:
/// it takes submissions and aborts from its channel, steps while there is work, and sends every
/// request's events to its sink. When its executor fails it hands its requests to the router and
/// ends.
struct EngineThread<E: StepExecutor> {
    engine: Engine<E>,
    group: usize,
    load: Arc<ReplicaLoad>,
    obs: Arc<dyn ServiceObserver>,
    router: Weak<Router>,
    clients: HashMap<RequestId, Client>,
    /// Submissions held back by `delay_steps`, by the loop turn at which they join.
    delayed: BTreeMap<(u64, RequestId), Box<Pending>>,
    turns: u64,
}

impl<E: StepExecutor> EngineThread<E> {
    fn new(
        engine: Engine<E>,
        group: usize,
        load: Arc<ReplicaLoad>,
        obs: Arc<dyn ServiceObserver>,
        router: Weak<Router>,
    ) -> Self {
        EngineThread { engine, group, load, obs, router, clients: HashMap::new(), delayed: BTreeMap::new(), turns: 0 }
    }

    fn run(&mut self, rx: std_mpsc::Receiver<Cmd>) {
        // Everything this thread logs — steps, requests, the executor's failures — names its
        // replica.
        let _replica = tracing::info_span!("replica", group = self.group).entered();
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
            let mut failed = None;
            for cmd in first.into_iter().chain(rx.try_iter()) {
                match cmd {
                    Cmd::Fail(reason) => failed = Some(reason),
                    cmd => self.command(cmd),
                }
            }
            if let Some(reason) = failed {
                let error = crate::engine::ExecError::Other(reason);
                return self.fail_over(StepFailure { error, events: Vec::new() }, rx);
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
            match self.engine.step() {
                Ok(events) => {
                    self.load.steps.fetch_add(1, Ordering::Relaxed);
                    self.note_scheduled();
                    for ev in events {
                        self.dispatch(ev);
                    }
                    self.sync_load();
                }
                Err(failure) => return self.fail_over(failure, rx),
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Submit(p) => {
                self.load.queued.fetch_sub(1, Ordering::Relaxed);
                if p.delay_steps == 0 {
                    self.admit(*p);
                } else {
                    self.delayed.insert((self.turns + p.delay_steps, p.id), p);
                }
            }
            Cmd::Resume(m) => {
                let Moving { request, client, reason } = *m;
                let id = request.id;
                match self.engine.resume(request) {
                    Ok(()) => {
                        self.clients.insert(id, client);
                    }
                    Err(b) => {
                        let (e, request) = *b;
                        let message = format!("could not resume after a failure ({reason}): {e}");
                        if let Some(r) = self.router.upgrade() {
                            r.finish_elsewhere(&Moving { request, client, reason }, FinishReason::Error(message));
                        }
                        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            Cmd::Abort(id) => self.abort(id),
            Cmd::Fail(_) => {}
        }
    }

    /// The executor failed: deliver what happened anyway, leave the routing table, and hand
    /// every request — running, waiting, held back or still in the channel — to the router.
    fn fail_over(&mut self, failure: StepFailure, rx: std_mpsc::Receiver<Cmd>) {
        let StepFailure { error, events } = failure;
        for ev in events {
            self.dispatch(ev);
        }
        let reason = error.to_string();
        tracing::error!(error = %reason, "replica failed; its requests move to another replica");
        self.load.down.store(true, Ordering::SeqCst);
        *self.load.down_reason.lock().expect("lock") = Some(reason.clone());
        self.obs.on_error("replica_down");
        let Some(router) = self.router.upgrade() else { return };
        let drained: Vec<Cmd> = {
            let mut table = router.table.lock().expect("routing table");
            table.replicas.retain(|r| r.group != self.group);
            table.last_failure = Some(format!("group {} failed: {reason}", self.group));
            // Nothing can be sent to this thread any more (sends happen under the lock): what is
            // in the channel now is everything.
            rx.try_iter().collect()
        };
        let mut resubmit = Vec::new();
        let mut resume = Vec::new();
        for cmd in drained {
            match cmd {
                Cmd::Submit(p) => resubmit.push(p),
                Cmd::Resume(m) => resume.push(m),
                Cmd::Abort(id) => self.abort(id),
                Cmd::Fail(_) => {}
            }
        }
        resubmit.extend(std::mem::take(&mut self.delayed).into_values());
        let moving: Vec<Moving> = self
            .engine
            .evacuate()
            .into_iter()
            .filter_map(|m| {
                let client = self.clients.remove(&m.id)?;
                Some(Moving { request: m, client, reason: reason.clone() })
            })
            .collect();
        let mut table = router.table.lock().expect("routing table");
        for m in moving {
            router.migrate(&mut table, m);
        }
        for m in resume {
            router.route_moving(&mut table, m);
        }
        for p in resubmit {
            router.route_new(&mut table, p);
        }
    }

    fn note_scheduled(&mut self) {
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
    }

    fn admit(&mut self, p: Pending) {
        let prompt_tokens = p.req.prompt_ids.len();
        match self.engine.add(p.id, p.req) {
            Ok(()) => {
                tracing::debug!(request_id = %p.id, prompt_tokens, "admitted");
                let client =
                    Client { sink: p.sink, submitted: p.at, scheduled: false, last_token: None, prompt_tokens };
                self.clients.insert(p.id, client);
            }
            Err(e) => {
                let error = RequestError::Invalid(e);
                tracing::info!(request_id = %p.id, error = %error, "rejected");
                self.obs.on_error(error.error_type());
                let _ = p.sink.send(EngineEvent::Rejected { id: p.id, error });
                self.ended(p.id);
            }
        }
    }

    /// A request ended here: it no longer weighs on this replica.
    fn ended(&self, id: RequestId) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
        if let Some(r) = self.router.upgrade() {
            let mut table = r.table.lock().expect("routing table");
            if table.location.get(&id) == Some(&self.group) {
                table.location.remove(&id);
            }
        }
    }

    fn abort(&mut self, id: RequestId) {
        let key = self.delayed.keys().find(|(_, d)| *d == id).copied();
        if let Some(p) = key.and_then(|k| self.delayed.remove(&k)) {
            // Never joined: it ends as aborted without having run.
            let _ = p.sink.send(p.aborted());
            self.ended(id);
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
            EngineEvent::Finished { reason, usage, .. } => {
                if let FinishReason::Error(message) = reason {
                    tracing::warn!(request_id = %id, completion_tokens = usage.completion_tokens, "failed: {message}");
                    self.obs.on_error("engine");
                } else {
                    let (reason, completion_tokens) = (reason.as_str(), usage.completion_tokens);
                    tracing::debug!(request_id = %id, reason, completion_tokens, "finished");
                }
                self.obs.on_finished(reason, c.submitted.elapsed().as_secs_f64());
            }
            EngineEvent::Rejected { error, .. } => {
                tracing::info!(request_id = %id, error = %error, "rejected");
                self.obs.on_error(error.error_type());
            }
        }
        let last = ev.is_last();
        let _ = c.sink.send(ev);
        if last {
            self.clients.remove(&id);
            self.ended(id);
        }
    }
}
