//! The determinism canary: lockstep's promise, checked continuously in production.
//!
//! The claim is that a request's output bits do not depend on what else the cluster is doing.
//! The canary tests exactly that, on the live service:
//!
//! 1. **Reference.** When it starts it waits until the service is idle and runs a fixed request
//!    *alone* — the prompt "Once upon a time" (or the first ids of the vocabulary when that does
//!    not encode), 32 tokens, once greedy and once with temperature 0.8 and a fixed seed — and
//!    keeps every token id and the bits of every logprob. A reference that turns out not to have
//!    been alone (traffic arrived meanwhile) is discarded and retaken when idle again.
//! 2. **Checks.** Every `every` (30 s by default) it submits the same two requests through
//!    [`Service::submit`], like any client, so they land in whatever batch is running, at whatever
//!    position, next to whatever prompts. The answers are compared bit for bit to the reference:
//!    a check is a `match` only if every id and every logprob bit agree.
//!
//! A mismatch means the determinism contract is broken on this deployment (a kernel path that is
//! not batch-invariant, a node with different weights that slipped past the fingerprint, a
//! hardware fault); the status keeps where the answers first diverged. A check that cannot run
//! (overloaded, no replica) is an `error`, not a mismatch: it says nothing about determinism.
//!
//! A reference recorded earlier can be handed to [`Canary::start_with_reference`]: answers under
//! one `system_fingerprint` must never change, so yesterday's reference is as good as today's.
//!
//! The canary runs on its own thread and holds the service only weakly: dropping the service (or
//! the [`Canary`]) stops it. Its requests are ordinary requests, so they also appear in the
//! request metrics. The same thread, being the one ops thread that wakes up regularly, also takes
//! the per-second samples behind the dashboard's charts ([`Metrics::record`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lockstep_kernels::SamplingParams;
use serde::{Deserialize, Serialize};

use super::metrics::{CanaryResult, Metrics};
use crate::engine::EngineEvent;
use crate::engine::GenerateRequest;
use crate::service::Service;

/// How often a check runs unless configured otherwise.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(30);
/// The canary's prompt.
pub const CANARY_PROMPT: &str = "Once upon a time";
/// Tokens generated per canary request (EOS is ignored, so every answer has exactly this many
/// unless the context is shorter).
pub const CANARY_TOKENS: u32 = 32;
/// Temperature and seed of the sampled variant.
pub const CANARY_TEMPERATURE: f32 = 0.8;
pub const CANARY_SEED: u64 = 20_250_910;
/// A reference that keeps being disturbed by traffic is accepted anyway after this many tries
/// (and reported as not alone), so a busy deployment still gets a canary.
const REFERENCE_TRIES: u32 = 20;

/// One answer of the canary: ids and logprob bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CanaryRun {
    pub token_ids: Vec<u32>,
    /// `f32::to_bits` of each token's logprob: compared as bits, never as floats.
    pub logprob_bits: Vec<u32>,
}

/// Which of the two canary requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Greedy,
    Seeded,
}

/// The reference answers, as recorded alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryReference {
    pub system_fingerprint: String,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: u32,
    pub greedy: CanaryRun,
    pub seeded: CanaryRun,
    pub recorded_unix: f64,
    /// Nothing else ran while it was recorded.
    pub alone: bool,
}

/// Where a check's answer first left the reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenDifference {
    pub variant: Variant,
    /// Index of the generated token (0 = first).
    pub index: usize,
    /// `None`: the answer is shorter than the reference (or longer, for `expected_id`).
    pub expected_id: Option<u32>,
    pub got_id: Option<u32>,
    pub expected_logprob_bits: Option<u32>,
    pub got_logprob_bits: Option<u32>,
    /// The tokens' text, for people.
    pub expected_text: Option<String>,
    pub got_text: Option<String>,
}

/// The first position where `got` differs from `want` (id or logprob bits), with the variant.
pub fn first_difference(variant: Variant, want: &CanaryRun, got: &CanaryRun) -> Option<TokenDifference> {
    let n = want.token_ids.len().max(got.token_ids.len());
    (0..n).find_map(|i| {
        let e = (want.token_ids.get(i).copied(), want.logprob_bits.get(i).copied());
        let g = (got.token_ids.get(i).copied(), got.logprob_bits.get(i).copied());
        (e != g).then_some(TokenDifference {
            variant,
            index: i,
            expected_id: e.0,
            got_id: g.0,
            expected_logprob_bits: e.1,
            got_logprob_bits: g.1,
            expected_text: None,
            got_text: None,
        })
    })
}

/// What `/ops/canary` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryStatus {
    /// `disabled` (never started), `recording_reference`, `running`, or `stopped` (the service
    /// is gone).
    pub state: &'static str,
    pub every_secs: f64,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: u32,
    pub temperature: f32,
    pub seed: u64,
    pub system_fingerprint: Option<String>,
    pub reference_recorded_unix: Option<f64>,
    pub reference_alone: Option<bool>,
    /// The greedy reference's token ids.
    pub reference_tokens: Vec<u32>,
    pub reference_text: Option<String>,
    pub last_check_unix: Option<f64>,
    pub last_result: Option<CanaryResult>,
    /// How long the last check took, seconds.
    pub last_check_secs: Option<f64>,
    pub checks: u64,
    pub matches: u64,
    pub mismatches: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// Where the most recent mismatching check first diverged (kept after later matches, so a
    /// transient fault stays visible).
    pub first_differing_token: Option<TokenDifference>,
    pub last_mismatch_unix: Option<f64>,
    /// Most sequences running (all replicas, the canary's own two included) seen while the last
    /// check ran: the batch it had to survive.
    pub last_batch_running: usize,
}

struct Inner {
    state: &'static str,
    prompt: String,
    prompt_ids: Vec<u32>,
    reference: Option<CanaryReference>,
    reference_text: Option<String>,
    last_check_unix: Option<f64>,
    last_result: Option<CanaryResult>,
    last_check_secs: Option<f64>,
    checks: u64,
    matches: u64,
    mismatches: u64,
    errors: u64,
    last_error: Option<String>,
    first_differing_token: Option<TokenDifference>,
    last_mismatch_unix: Option<f64>,
    last_batch_running: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    stop: AtomicBool,
    wake: Condvar,
    every: Duration,
}

/// The canary's state; its thread runs from [`Canary::start`] until the service or this value is
/// dropped.
pub struct Canary {
    shared: Arc<Shared>,
}

impl Default for Canary {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Canary {
    /// A canary that is not running (for an [`crate::state::AppState`] built without one).
    pub fn new() -> Self {
        Self::with_every(DEFAULT_EVERY)
    }

    fn with_every(every: Duration) -> Self {
        Canary {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    state: "disabled",
                    prompt: CANARY_PROMPT.to_string(),
                    prompt_ids: Vec::new(),
                    reference: None,
                    reference_text: None,
                    last_check_unix: None,
                    last_result: None,
                    last_check_secs: None,
                    checks: 0,
                    matches: 0,
                    mismatches: 0,
                    errors: 0,
                    last_error: None,
                    first_differing_token: None,
                    last_mismatch_unix: None,
                    last_batch_running: 0,
                }),
                stop: AtomicBool::new(false),
                wake: Condvar::new(),
                every,
            }),
        }
    }

    /// Record the reference (alone, as soon as the service is idle), then check every `every`.
    pub fn start(service: Arc<Service>, metrics: Arc<Metrics>, every: Duration) -> Arc<Canary> {
        Self::spawn(service, metrics, every, None)
    }

    /// Check against a reference recorded earlier. It must carry this service's fingerprint
    /// (answers are only promised equal within one) and be for this canary's prompt.
    pub fn start_with_reference(
        service: Arc<Service>,
        metrics: Arc<Metrics>,
        every: Duration,
        reference: CanaryReference,
    ) -> anyhow::Result<Arc<Canary>> {
        let fp = &service.info().system_fingerprint;
        if &reference.system_fingerprint != fp {
            anyhow::bail!(
                "the canary reference is for system_fingerprint {}, this deployment is {fp}",
                reference.system_fingerprint
            );
        }
        let (_, ids) = canary_prompt(&service);
        if reference.prompt_ids != ids {
            anyhow::bail!("the canary reference is for another prompt");
        }
        Ok(Self::spawn(service, metrics, every, Some(reference)))
    }

    fn spawn(
        service: Arc<Service>,
        metrics: Arc<Metrics>,
        every: Duration,
        reference: Option<CanaryReference>,
    ) -> Arc<Canary> {
        let canary = Arc::new(Canary::with_every(every));
        let (prompt, ids) = canary_prompt(&service);
        {
            let mut g = canary.shared.inner.lock().expect("canary lock");
            g.prompt = prompt;
            g.prompt_ids = ids;
            g.state = if reference.is_some() { "running" } else { "recording_reference" };
            if let Some(r) = &reference {
                g.reference_text = service.info().tokenizer.decode(&r.greedy.token_ids, true).ok();
            }
            g.reference = reference;
        }
        let shared = canary.shared.clone();
        let weak = Arc::downgrade(&service);
        drop(service);
        let spawned = std::thread::Builder::new()
            .name("lockstep-canary".into())
            .spawn(move || canary_loop(shared, weak, metrics));
        if let Err(e) = spawned {
            let mut g = canary.shared.inner.lock().expect("canary lock");
            g.state = "stopped";
            g.last_error = Some(format!("could not start the canary thread: {e}"));
        }
        canary
    }

    pub fn status(&self) -> CanaryStatus {
        let g = self.shared.inner.lock().expect("canary lock");
        let r = g.reference.as_ref();
        CanaryStatus {
            state: g.state,
            every_secs: self.shared.every.as_secs_f64(),
            prompt: g.prompt.clone(),
            prompt_ids: g.prompt_ids.clone(),
            max_tokens: r.map_or(CANARY_TOKENS, |r| r.max_tokens),
            temperature: CANARY_TEMPERATURE,
            seed: CANARY_SEED,
            system_fingerprint: r.map(|r| r.system_fingerprint.clone()),
            reference_recorded_unix: r.map(|r| r.recorded_unix),
            reference_alone: r.map(|r| r.alone),
            reference_tokens: r.map(|r| r.greedy.token_ids.clone()).unwrap_or_default(),
            reference_text: g.reference_text.clone(),
            last_check_unix: g.last_check_unix,
            last_result: g.last_result,
            last_check_secs: g.last_check_secs,
            checks: g.checks,
            matches: g.matches,
            mismatches: g.mismatches,
            errors: g.errors,
            last_error: g.last_error.clone(),
            first_differing_token: g.first_differing_token.clone(),
            last_mismatch_unix: g.last_mismatch_unix,
            last_batch_running: g.last_batch_running,
        }
    }

    /// The reference in use (to keep it for a later [`Canary::start_with_reference`]).
    pub fn reference(&self) -> Option<CanaryReference> {
        self.shared.inner.lock().expect("canary lock").reference.clone()
    }

    /// Block until at least `n` checks (of any result) have completed; false on timeout.
    pub fn wait_for_checks(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.inner.lock().expect("canary lock");
        while g.checks < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.shared.wake.wait_timeout(g, left).expect("canary lock").0;
        }
        true
    }
}

/// The prompt text and ids: "Once upon a time", or the first ids of the vocabulary if the
/// tokenizer cannot encode it (a model with an unusual tokenizer still gets a canary).
fn canary_prompt(service: &Service) -> (String, Vec<u32>) {
    let tok = &service.info().tokenizer;
    match tok.encode(CANARY_PROMPT, true) {
        Ok(ids) if !ids.is_empty() => (CANARY_PROMPT.to_string(), ids),
        _ => {
            let n = (tok.vocab_size().min(service.info().config.vocab_size) as u32).clamp(1, 8);
            let ids: Vec<u32> = (0..n).collect();
            let text = tok.decode(&ids, false).unwrap_or_default();
            (text, ids)
        }
    }
}

fn request(prompt_ids: &[u32], max_tokens: u32, variant: Variant) -> GenerateRequest {
    let sampling = match variant {
        Variant::Greedy => SamplingParams::greedy(),
        Variant::Seeded => SamplingParams { temperature: CANARY_TEMPERATURE, seed: CANARY_SEED, ..Default::default() },
    };
    GenerateRequest {
        prompt_ids: prompt_ids.to_vec(),
        sampling,
        max_tokens,
        stop: vec![],
        stop_token_ids: vec![],
        // Always the full length: an early EOS would make the check weaker, not different.
        ignore_eos: true,
        skip_special_tokens: true,
    }
}

fn running(service: &Service) -> usize {
    service.replicas().iter().map(|r| r.running).sum()
}

fn idle(service: &Service) -> bool {
    service.replicas().iter().all(|r| r.running == 0 && r.waiting == 0)
}

/// Submit the given variants together and read their answers to the end. Returns the runs (in
/// the order given) and the most sequences seen running meanwhile.
fn run_requests(
    service: &Weak<Service>,
    prompt_ids: &[u32],
    max_tokens: u32,
    variants: &[Variant],
) -> Result<(Vec<CanaryRun>, usize), String> {
    let mut subs = Vec::new();
    {
        let svc = service.upgrade().ok_or("the service is gone")?;
        for &v in variants {
            subs.push(svc.submit(request(prompt_ids, max_tokens, v)).map_err(|e| e.to_string())?);
        }
    }
    let mut max_running = 0;
    let mut runs = Vec::new();
    for mut sub in subs {
        let mut run = CanaryRun::default();
        loop {
            // Every submission ends with Finished or Rejected (a failed node fails its group's
            // requests), and the channel closes if the engine goes away, so this cannot hang.
            match sub.blocking_next() {
                EngineEvent::Token { token_id, logprob, .. } => {
                    run.token_ids.push(token_id);
                    run.logprob_bits.push(logprob.to_bits());
                    if let Some(svc) = service.upgrade() {
                        max_running = max_running.max(running(&svc));
                    }
                }
                EngineEvent::Finished { reason, .. } => match reason {
                    crate::scheduler::FinishReason::Error(e) => return Err(format!("canary request failed: {e}")),
                    crate::scheduler::FinishReason::Abort => return Err("canary request aborted".into()),
                    _ => break,
                },
                EngineEvent::Rejected { error, .. } => {
                    return Err(format!("canary request rejected ({}): {error}", error.error_type()));
                }
            }
        }
        runs.push(run);
    }
    Ok((runs, max_running))
}

fn canary_loop(shared: Arc<Shared>, service: Weak<Service>, metrics: Arc<Metrics>) {
    let (prompt_ids, fingerprint, max_tokens, tokenizer) = {
        let Some(svc) = service.upgrade() else { return };
        let ids = shared.inner.lock().expect("canary lock").prompt_ids.clone();
        let room = svc.info().max_context.saturating_sub(ids.len()).max(1) as u32;
        (ids, svc.info().system_fingerprint.clone(), CANARY_TOKENS.min(room), svc.info().tokenizer.clone())
    };
    let mut reference_tries = 0;
    // The first check comes one period after the reference, like every later one.
    let mut next_check = Instant::now() + shared.every;
    loop {
        // This thread is the ops background thread: it also keeps the per-second history the
        // dashboard's charts show.
        if let Some(svc) = service.upgrade() {
            metrics.record(&svc);
        }
        if shared.stop.load(Ordering::SeqCst) || service.strong_count() == 0 {
            shared.inner.lock().expect("canary lock").state = "stopped";
            shared.wake.notify_all();
            return;
        }
        if !has_reference_now(&shared) {
            let is_idle = service.upgrade().is_some_and(|s| idle(&s));
            if is_idle || reference_tries >= REFERENCE_TRIES {
                reference_tries += 1;
                // Alone means alone: greedy then seeded, one at a time.
                let greedy = run_requests(&service, &prompt_ids, max_tokens, &[Variant::Greedy]);
                let seeded = run_requests(&service, &prompt_ids, max_tokens, &[Variant::Seeded]);
                match (greedy, seeded) {
                    (Ok((mut g, rg)), Ok((mut s, rs))) => {
                        let alone = rg <= 1 && rs <= 1;
                        if alone || reference_tries > REFERENCE_TRIES {
                            let mut inner = shared.inner.lock().expect("canary lock");
                            let greedy = g.remove(0);
                            inner.reference_text = tokenizer.decode(&greedy.token_ids, true).ok();
                            inner.reference = Some(CanaryReference {
                                system_fingerprint: fingerprint.clone(),
                                prompt_ids: prompt_ids.clone(),
                                max_tokens,
                                greedy,
                                seeded: s.remove(0),
                                recorded_unix: unix_now(),
                                alone,
                            });
                            inner.state = "running";
                            next_check = Instant::now() + shared.every;
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        shared.inner.lock().expect("canary lock").last_error = Some(format!("reference: {e}"));
                    }
                }
                shared.wake.notify_all();
                if !has_reference_now(&shared) {
                    // Disturbed or failed: try again shortly, without spinning on a dead replica.
                    wait(&shared, Duration::from_millis(500));
                }
                continue;
            }
            reference_tries += 1;
            wait(&shared, Duration::from_millis(500));
            continue;
        }
        let now = Instant::now();
        if now < next_check {
            wait(&shared, (next_check - now).min(Duration::from_millis(250)));
            continue;
        }
        next_check = now + shared.every;
        check(&shared, &service, &metrics, &prompt_ids, max_tokens, &tokenizer);
    }
}

fn has_reference_now(shared: &Shared) -> bool {
    shared.inner.lock().expect("canary lock").reference.is_some()
}

fn wait(shared: &Shared, d: Duration) {
    let g = shared.inner.lock().expect("canary lock");
    if !shared.stop.load(Ordering::SeqCst) {
        let _ = shared.wake.wait_timeout(g, d);
    }
}

fn check(
    shared: &Shared,
    service: &Weak<Service>,
    metrics: &Metrics,
    prompt_ids: &[u32],
    max_tokens: u32,
    tokenizer: &crate::tokenizer::Tokenizer,
) {
    let Some(reference) = shared.inner.lock().expect("canary lock").reference.clone() else { return };
    let started = Instant::now();
    let outcome = run_requests(service, prompt_ids, max_tokens, &[Variant::Greedy, Variant::Seeded]);
    let unix = unix_now();
    let mut inner = shared.inner.lock().expect("canary lock");
    inner.checks += 1;
    inner.last_check_unix = Some(unix);
    inner.last_check_secs = Some(started.elapsed().as_secs_f64());
    let result = match outcome {
        Ok((runs, max_running)) => {
            inner.last_batch_running = max_running;
            let diff = first_difference(Variant::Greedy, &reference.greedy, &runs[0])
                .or_else(|| first_difference(Variant::Seeded, &reference.seeded, &runs[1]));
            match diff {
                None => {
                    inner.matches += 1;
                    CanaryResult::Match
                }
                Some(mut d) => {
                    let text = |id: Option<u32>| id.and_then(|id| tokenizer.decode(&[id], false).ok());
                    d.expected_text = text(d.expected_id);
                    d.got_text = text(d.got_id);
                    tracing::error!(
                        variant = ?d.variant,
                        token_index = d.index,
                        expected_id = ?d.expected_id,
                        got_id = ?d.got_id,
                        running = max_running,
                        "canary MISMATCH: the answer differs from the reference"
                    );
                    inner.mismatches += 1;
                    inner.first_differing_token = Some(d);
                    inner.last_mismatch_unix = Some(unix);
                    CanaryResult::Mismatch
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "canary check failed");
            inner.errors += 1;
            inner.last_error = Some(e);
            CanaryResult::Error
        }
    };
    inner.last_result = Some(result);
    let batch = inner.last_batch_running;
    drop(inner);
    metrics.record_canary(result, unix, batch);
    shared.wake.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ids: &[u32], bits: &[u32]) -> CanaryRun {
        CanaryRun { token_ids: ids.to_vec(), logprob_bits: bits.to_vec() }
    }

    #[test]
    fn identical_runs_have_no_difference() {
        let a = run(&[5, 6, 7], &[1, 2, 3]);
        assert_eq!(first_difference(Variant::Greedy, &a, &a.clone()), None);
    }

    #[test]
    fn a_tampered_reference_is_caught_at_the_first_changed_token() {
        let got = run(&[5, 6, 7, 8], &[(-0.5f32).to_bits(), (-1.25f32).to_bits(), 3, 4]);
        // One logprob bit flipped at index 1: same ids, different bits — still a mismatch.
        let mut tampered = got.clone();
        tampered.logprob_bits[1] ^= 1;
        let d = first_difference(Variant::Seeded, &tampered, &got).expect("a mismatch");
        assert_eq!((d.variant, d.index, d.expected_id, d.got_id), (Variant::Seeded, 1, Some(6), Some(6)));
        assert_eq!(d.got_logprob_bits, Some((-1.25f32).to_bits()));
        assert_ne!(d.expected_logprob_bits, d.got_logprob_bits);
        // A different id at index 2.
        let mut tampered = got.clone();
        tampered.token_ids[2] = 9;
        let d = first_difference(Variant::Greedy, &tampered, &got).unwrap();
        assert_eq!((d.index, d.expected_id, d.got_id), (2, Some(9), Some(7)));
    }

    #[test]
    fn a_shorter_answer_differs_where_it_ends() {
        let want = run(&[1, 2, 3], &[0, 0, 0]);
        let got = run(&[1, 2], &[0, 0]);
        let d = first_difference(Variant::Greedy, &want, &got).unwrap();
        assert_eq!((d.index, d.expected_id, d.got_id), (2, Some(3), None));
    }

    #[test]
    fn a_canary_that_never_started_says_so() {
        let c = Canary::new();
        let s = c.status();
        assert_eq!(s.state, "disabled");
        assert_eq!((s.checks, s.matches, s.mismatches), (0, 0, 0));
        assert!(!c.wait_for_checks(1, Duration::from_millis(10)));
    }
}
