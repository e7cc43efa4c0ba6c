//! Request migration in the serving core, without sockets: replicas whose executor fails on
//! cue, requests that must continue elsewhere with the bytes of an uninterrupted run, parked
//! requests when nothing serves, and the migration limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockstep_coordinator::engine::{
    EngineOptions, ExecError, GenerateRequest, LocalExecutor, ModelInfo, RequestError, SeqOutput, StepExecutor,
};
use lockstep_coordinator::scheduler::FinishReason;
use lockstep_coordinator::service::{NoopObserver, Service, ServiceOptions, SubmitOptions};
use lockstep_kernels::{CpuBackend, SamplingParams};
use lockstep_proto::step::{StepPlan, StepResult};

/// An in-process replica that fails every step from the `fail_at`-th on (counting its own
/// steps), or whenever `kill` is set — a node that died.
struct Flaky {
    inner: LocalExecutor,
    steps: Arc<AtomicU64>,
    fail_at: u64,
    kill: Arc<AtomicBool>,
    name: &'static str,
}

impl StepExecutor for Flaky {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError> {
        let n = self.steps.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_at || self.kill.load(Ordering::SeqCst) {
            return Err(ExecError::Other(format!("node {} disconnected (test)", self.name)));
        }
        self.inner.execute(plan)
    }
}

struct Fixture {
    info: ModelInfo,
    opts: EngineOptions,
}

impl Fixture {
    fn new() -> Option<Self> {
        let dir = lockstep_test_env::stories260k()?;
        let opts = EngineOptions { threads: 1, ..EngineOptions::default() };
        let info = ModelInfo::load(&dir, &opts, CpuBackend::fingerprint_name_for(opts.mode)).unwrap();
        Some(Fixture { info, opts })
    }
    fn flaky(&self, name: &'static str, fail_at: u64) -> (Box<dyn StepExecutor>, Arc<AtomicBool>) {
        let kill = Arc::new(AtomicBool::new(false));
        let exec = Flaky {
            inner: LocalExecutor::load(&self.info, &self.opts).unwrap(),
            steps: Arc::new(AtomicU64::new(0)),
            fail_at,
            kill: kill.clone(),
            name,
        };
        (Box::new(exec), kill)
    }
    fn service(&self, execs: Vec<Box<dyn StepExecutor>>, opts: ServiceOptions) -> Service {
        let sched = self.info.scheduler_config(&self.opts);
        Service::start(self.info.clone(), execs, None, sched, opts, Arc::new(NoopObserver)).unwrap()
    }
    fn requests(&self) -> Vec<(GenerateRequest, SubmitOptions)> {
        let prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day"];
        prompts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                let req = |sampling, stop: Vec<String>| GenerateRequest {
                    prompt_ids: self.info.tokenizer.encode(p, true).unwrap(),
                    sampling,
                    max_tokens: 40,
                    stop,
                    stop_token_ids: vec![],
                    ignore_eos: false,
                    skip_special_tokens: true,
                };
                let seeded = SamplingParams { temperature: 0.8, top_k: 0, top_p: 0.95, seed: 11 + i as u64 };
                [
                    (req(SamplingParams::greedy(), vec!["ball".into()]), SubmitOptions { delay_steps: i as u64 * 3 }),
                    (req(seeded, vec![]), SubmitOptions { delay_steps: i as u64 }),
                ]
            })
            .collect()
    }
}

fn same(a: &[SeqOutput], b: &[SeqOutput]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.token_ids, y.token_ids, "request {i}");
        let bits = |o: &SeqOutput| o.logprobs.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(x), bits(y), "request {i}");
        assert_eq!(x.text, y.text, "request {i}");
        assert_eq!(x.finish_reason, y.finish_reason, "request {i}");
        assert_eq!(x.usage, y.usage, "request {i}");
    }
}

#[test]
fn requests_of_a_failed_replica_finish_on_another_with_identical_bytes() {
    let Some(f) = Fixture::new() else { return };
    let (healthy, _) = f.flaky("reference", u64::MAX);
    let reference = f.service(vec![healthy], ServiceOptions::default()).run_blocking(f.requests(), |_, _| {}).unwrap();
    assert!(reference.iter().all(|o| o.error.is_none() && o.token_ids.len() > 3));
    for fail_at in [1u64, 4, 9, 17] {
        // The first replica dies after `fail_at` steps; the second never does.
        let (dying, _) = f.flaky("node-a", fail_at);
        let (spare, _) = f.flaky("node-b", u64::MAX);
        let service = f.service(vec![dying, spare], ServiceOptions::default());
        let mut seen: Vec<Vec<u32>> = vec![Vec::new(); reference.len()];
        let got = service
            .run_blocking(f.requests(), |i, ev| {
                if let lockstep_coordinator::engine::EngineEvent::Token { index, .. } = ev {
                    seen[i].push(*index);
                }
            })
            .unwrap();
        same(&got, &reference);
        for (i, idx) in seen.iter().enumerate() {
            let want: Vec<u32> = (0..idx.len() as u32).collect();
            assert_eq!(idx, &want, "fail_at {fail_at}, request {i}: no repeated or missing token index");
        }
        assert!(service.migrations() > 0, "fail_at {fail_at}: some request had to move");
        assert_eq!(service.replicas().len(), 1, "the failed replica left the table");
    }
}

#[test]
fn with_no_replica_left_requests_wait_for_a_new_one_then_continue() {
    let Some(f) = Fixture::new() else { return };
    let (healthy, _) = f.flaky("reference", u64::MAX);
    let reference = f.service(vec![healthy], ServiceOptions::default()).run_blocking(f.requests(), |_, _| {}).unwrap();
    let (dying, _) = f.flaky("node-a", 5);
    let service = Arc::new(f.service(vec![dying], ServiceOptions::default()));
    // A new group forms a little later, while the requests are parked.
    let later = {
        let service = service.clone();
        let (fresh, _) = f.flaky("node-b", u64::MAX);
        std::thread::spawn(move || {
            while service.healthy() {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(service.unhealthy_reason().unwrap().contains("node-a"));
            std::thread::sleep(Duration::from_millis(100));
            assert!(service.parked() > 0, "the requests wait for a replica");
            service.add_replica(7, fresh).unwrap();
        })
    };
    let got = service.run_blocking(f.requests(), |_, _| {}).unwrap();
    later.join().unwrap();
    same(&got, &reference);
}

#[test]
fn requests_parked_past_the_queue_timeout_are_refused_as_unavailable() {
    let Some(f) = Fixture::new() else { return };
    let (dying, _) = f.flaky("node-a", 2);
    let opts = ServiceOptions { queue_timeout: Duration::from_millis(300), ..ServiceOptions::default() };
    let service = f.service(vec![dying], opts);
    let got = service.run_blocking(f.requests(), |_, _| {}).unwrap();
    for o in &got {
        match &o.error {
            Some(RequestError::Unavailable(m)) => assert!(m.contains("node-a"), "{m}"),
            other => panic!("expected unavailable, got {other:?}"),
        }
    }
    assert!(!service.healthy());
}

#[test]
fn a_request_that_keeps_landing_on_failing_replicas_fails_at_the_migration_limit() {
    let Some(f) = Fixture::new() else { return };
    let opts = ServiceOptions { migration_limit: 2, ..ServiceOptions::default() };
    let names = ["node-a", "node-b", "node-c", "node-d"];
    let execs = names.iter().map(|n| f.flaky(n, 2).0).collect();
    let service = f.service(execs, opts);
    let mut reqs = f.requests();
    reqs.truncate(1);
    let got = service.run_blocking(reqs, |_, _| {}).unwrap();
    match &got[0].finish_reason {
        Some(FinishReason::Error(m)) => {
            assert!(m.contains("--migration-limit 2"), "{m}");
            assert!(m.contains("disconnected"), "names the failure: {m}");
        }
        other => panic!("expected the migration limit, got {other:?}"),
    }
}
