//! The scheduler's policy checked against a fake engine: plans, budgets, preemption, migration.
use super::*;
use std::collections::HashSet;

fn cfg(
    block_size: u32,
    num_blocks: u32,
    max_batch_tokens: u32,
    prefill_chunk: u32,
    max_running: u32,
) -> SchedulerConfig {
    SchedulerConfig { block_size, num_blocks, max_batch_tokens, prefill_chunk, max_running, max_model_len: 256 }
}

fn tok(id: u32) -> SampledToken {
    SampledToken { id, logprob: -1.0 }
}

fn prompt(seq_id: u64, len: u32) -> Vec<u32> {
    (0..len).map(|i| (seq_id as u32 * 31 + i * 7) % 100 + 3).collect()
}

/// Answers every sampling chunk of `plan` with `token`.
fn answer_all(plan: &StepPlan, token: u32) -> StepResult {
    let sampled = plan.chunks.iter().filter(|c| c.sample.is_some()).map(|c| (c.seq_id, tok(token))).collect();
    StepResult { step_id: plan.step_id, sampled }
}

/// Checks that the free list and the block tables partition the cache exactly.
fn assert_blocks_partitioned(s: &Scheduler) {
    let a = &s.blocks;
    let mut seen: HashSet<u32> = a.free.iter().copied().collect();
    assert_eq!(seen.len(), a.free.len());
    for (seq_id, table) in &a.tables {
        assert!(s.seqs.contains_key(seq_id), "blocks held by unknown sequence {seq_id}");
        for &b in table {
            assert!(b < a.num_blocks, "block {b} out of range");
            assert!(seen.insert(b), "block {b} allocated twice (seq {seq_id})");
        }
    }
    assert_eq!(seen.len() as u32, a.num_blocks, "blocks leaked");
    for id in &s.waiting {
        assert!(a.block_table(*id).is_empty(), "waiting sequence {id} holds blocks");
    }
}

/// A model stand-in that uses the KV cache for real: each chunk writes `(seq, pos, token)`
/// into the slots its block table names, and sampling reads the whole prefix back through the
/// table. The sampled token is a hash of `(seed, step, prefix)`, so any wrong position, slot,
/// block sharing or sample step changes the output.
struct FakeEngine {
    block_size: u32,
    num_blocks: u32,
    vocab: u32,
    kv: HashMap<u32, (u64, u32, u32)>,
    next_pos: HashMap<u64, u32>,
}

impl FakeEngine {
    fn new(config: &SchedulerConfig, vocab: u32) -> Self {
        FakeEngine {
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            vocab,
            kv: HashMap::new(),
            next_pos: HashMap::new(),
        }
    }

    fn run(&mut self, plan: &StepPlan) -> StepResult {
        plan.validate(self.block_size, self.num_blocks).unwrap();
        let mut sampled = Vec::new();
        for chunk in &plan.chunks {
            let seq = chunk.seq_id;
            let next = self.next_pos.get(&seq).copied().unwrap_or(0);
            assert!(chunk.first_pos <= next, "seq {seq}: chunk at {} skips {next}", chunk.first_pos);
            for (pos, &token) in chunk.positions().zip(&chunk.tokens) {
                self.kv.insert(chunk.slot(pos, self.block_size).unwrap(), (seq, pos, token));
            }
            self.next_pos.insert(seq, chunk.end_pos());
            if let Some(req) = chunk.sample {
                let prefix: Vec<u32> = (0..chunk.end_pos())
                    .map(|pos| {
                        let slot = chunk.slot(pos, self.block_size).unwrap();
                        let (s, p, t) = self.kv[&slot];
                        assert_eq!((s, p), (seq, pos), "KV slot {slot} holds another position");
                        t
                    })
                    .collect();
                let id = fake_sample(&prefix, &req, self.vocab);
                sampled.push((seq, SampledToken { id, logprob: -(id as f32) / 64.0 }));
            }
        }
        StepResult { step_id: plan.step_id, sampled }
    }
}

fn fake_sample(prefix: &[u32], req: &SampleRequest, vocab: u32) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ req.params.seed ^ (req.step << 32);
    for &t in prefix {
        h = (h ^ t as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 29;
    (h % vocab as u64) as u32
}

/// Collected events, checked as they arrive: indices contiguous, nothing after `Finished`.
#[derive(Default)]
struct Outputs {
    tokens: HashMap<u64, Vec<u32>>,
    finished: HashMap<u64, FinishReason>,
}

impl Outputs {
    fn apply(&mut self, events: Vec<SeqEvent>) {
        for event in events {
            let seq_id = event.seq_id();
            assert!(!self.finished.contains_key(&seq_id), "event after Finished: {event:?}");
            match event {
                SeqEvent::Token { token, index, .. } => {
                    let tokens = self.tokens.entry(seq_id).or_default();
                    assert_eq!(index as usize, tokens.len(), "seq {seq_id}: index out of order");
                    tokens.push(token.id);
                }
                SeqEvent::Finished { reason, .. } => {
                    self.finished.insert(seq_id, reason);
                }
            }
        }
    }

    fn tokens(&self, seq_id: u64) -> Vec<u32> {
        self.tokens.get(&seq_id).cloned().unwrap_or_default()
    }
}

/// Runs the scheduler against the fake engine until nothing is left; checks the block
/// partition and the sample steps at every step. Returns the outputs and the number of steps.
fn run_to_completion(s: &mut Scheduler, engine: &mut FakeEngine, max_steps: usize) -> (Outputs, usize) {
    continue_to_completion(s, engine, Outputs::default(), max_steps)
}

/// [`run_to_completion`] for sequences whose earlier tokens are already in `out`.
fn continue_to_completion(
    s: &mut Scheduler,
    engine: &mut FakeEngine,
    mut out: Outputs,
    max_steps: usize,
) -> (Outputs, usize) {
    for steps in 0..max_steps {
        let plan = s.schedule();
        out.apply(s.take_events());
        assert_blocks_partitioned(s);
        let Some(plan) = plan else {
            assert!(!s.has_unfinished(), "scheduler stalled with unfinished sequences");
            return (out, steps);
        };
        check_plan(s, &plan, &out);
        let result = engine.run(&plan);
        out.apply(s.on_step_result(result));
        assert_blocks_partitioned(s);
    }
    panic!("did not terminate within {max_steps} steps");
}

fn check_plan(s: &Scheduler, plan: &StepPlan, out: &Outputs) {
    let c = s.config();
    assert!(!plan.chunks.is_empty());
    assert!(plan.num_tokens() <= c.max_batch_tokens as usize, "token budget exceeded");
    assert!(plan.chunks.len() <= c.max_running as usize);
    assert!(s.num_running() <= c.max_running as usize);
    for chunk in &plan.chunks {
        assert!(chunk.len() <= c.prefill_chunk.max(1) as usize);
        if let Some(req) = chunk.sample {
            let emitted = out.tokens.get(&chunk.seq_id).map_or(0, Vec::len);
            assert_eq!(req.step as usize, emitted, "seq {}: sample step", chunk.seq_id);
        }
    }
}

#[test]
fn config_validation_rejects_bad_values() {
    assert_eq!(SchedulerConfig::default().validate(), Ok(()));
    let mut c = cfg(4, 8, 16, 8, 4);
    c.block_size = 0;
    assert_eq!(Scheduler::new(c).unwrap_err(), ConfigError::Zero { field: "block_size" });
    let c = cfg(4, 8, 3, 8, 4);
    let err = Scheduler::new(c).unwrap_err();
    assert_eq!(err.error_type(), "config_budget_below_max_running");
    let c = cfg(1 << 16, 1 << 16, 16, 8, 4);
    assert_eq!(c.validate().unwrap_err().error_type(), "config_cache_too_large");
}

#[test]
fn add_request_rejects_invalid_requests() {
    let mut c = cfg(4, 3, 16, 8, 4);
    c.max_model_len = 16;
    let mut s = Scheduler::new(c).unwrap();
    let err = |s: &mut Scheduler, id, len, params| s.add_request(id, prompt(id, len), params).unwrap_err().error_type();
    assert_eq!(err(&mut s, 1, 0, SeqParams::greedy(3)), "empty_prompt");
    assert_eq!(err(&mut s, 1, 16, SeqParams::greedy(3)), "prompt_too_long");
    assert_eq!(err(&mut s, 1, 4, SeqParams::greedy(0)), "invalid_max_tokens");
    // 10 + 100 is capped at max_model_len 16: 15 KV slots = 4 blocks > 3.
    let e = s.add_request(1, prompt(1, 10), SeqParams::greedy(100)).unwrap_err();
    assert_eq!(e, AddRequestError::KvCacheTooSmall { needed_slots: 15, needed_blocks: 4, num_blocks: 3 });
    let mut bad = SeqParams::greedy(3);
    bad.sampling.temperature = -1.0;
    assert_eq!(err(&mut s, 1, 4, bad), "invalid_sampling_params");
    assert_eq!(s.num_waiting(), 0, "rejected requests leave no trace");
    // 10 + 3 = 13 tokens, 12 slots = exactly the whole cache.
    s.add_request(1, prompt(1, 10), SeqParams::greedy(3)).unwrap();
    assert_eq!(err(&mut s, 1, 4, SeqParams::greedy(3)), "duplicate_seq_id");
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn chunked_prefill_boundaries_and_sample_steps() {
    let mut s = Scheduler::new(cfg(4, 16, 64, 4, 4)).unwrap();
    let p = prompt(1, 10);
    s.add_request(1, p.clone(), SeqParams::greedy(3)).unwrap();
    let expect = [(0u32, 4u32, None, 1usize), (4, 4, None, 2), (8, 2, Some(0u64), 3)];
    for (first_pos, len, step, table_len) in expect {
        let plan = s.schedule().unwrap();
        assert_eq!(plan.chunks.len(), 1);
        let c = &plan.chunks[0];
        assert_eq!((c.first_pos, c.len() as u32), (first_pos, len));
        assert_eq!(c.tokens, p[first_pos as usize..(first_pos + len) as usize]);
        assert_eq!(c.sample.map(|r| r.step), step);
        assert_eq!(c.block_table.len(), table_len);
        assert_eq!(
            s.on_step_result(answer_all(&plan, 50)),
            match step {
                None => vec![],
                Some(_) => vec![SeqEvent::Token { seq_id: 1, token: tok(50), index: 0 }],
            }
        );
    }
    // Decodes: the previous token at the next position, sample step = generated index.
    for (pos, index) in [(10u32, 1u32), (11, 2)] {
        let plan = s.schedule().unwrap();
        let c = &plan.chunks[0];
        assert_eq!((c.first_pos, c.tokens.clone()), (pos, vec![50 + index - 1]));
        assert_eq!(c.sample.unwrap().step, index as u64);
        let events = s.on_step_result(answer_all(&plan, 50 + index));
        assert_eq!(events[0], SeqEvent::Token { seq_id: 1, token: tok(50 + index), index });
    }
    assert!(!s.has_unfinished());
    assert_eq!(s.used_blocks(), 0);
    assert!(s.schedule().is_none());
}

#[test]
fn token_budget_is_respected_and_decodes_come_first() {
    let mut s = Scheduler::new(cfg(4, 64, 10, 6, 8)).unwrap();
    for id in 0..5 {
        s.add_request(id, prompt(id, 2 + 5 * id as u32), SeqParams::greedy(6)).unwrap();
    }
    let mut decoding: HashSet<u64> = HashSet::new();
    let mut out = Outputs::default();
    while let Some(plan) = s.schedule() {
        assert!(plan.num_tokens() <= 10);
        let mut seen_prefill = false;
        for c in &plan.chunks {
            let is_decode = decoding.contains(&c.seq_id);
            assert!(!(is_decode && seen_prefill), "decode after a prefill chunk: {plan:?}");
            seen_prefill |= !is_decode;
            assert!(c.len() <= 6);
            if is_decode {
                assert_eq!(c.len(), 1);
            }
        }
        let planned: HashSet<u64> = plan.chunks.iter().map(|c| c.seq_id).collect();
        assert!(decoding.is_subset(&planned), "a decoding sequence was skipped");
        let events = s.on_step_result(answer_all(&plan, 99));
        for e in &events {
            match e {
                SeqEvent::Token { seq_id, .. } => decoding.insert(*seq_id),
                SeqEvent::Finished { seq_id, .. } => decoding.remove(seq_id),
            };
        }
        out.apply(events);
    }
    assert_eq!(out.finished.len(), 5);
    assert!(out.finished.values().all(|r| *r == FinishReason::Length));
    assert_eq!(s.num_preemptions(), 0);
}

#[test]
fn arrival_mid_run_joins_the_batch() {
    let mut s = Scheduler::new(cfg(4, 32, 32, 8, 4)).unwrap();
    s.add_request(1, prompt(1, 3), SeqParams::greedy(10)).unwrap();
    for _ in 0..3 {
        let plan = s.schedule().unwrap();
        assert_eq!(plan.chunks.len(), 1);
        s.on_step_result(answer_all(&plan, 7));
    }
    s.add_request(2, prompt(2, 5), SeqParams::greedy(2)).unwrap();
    let plan = s.schedule().unwrap();
    let summary: Vec<_> =
        plan.chunks.iter().map(|c| (c.seq_id, c.first_pos, c.len(), c.sample.map(|r| r.step))).collect();
    assert_eq!(summary, vec![(1, 5, 1, Some(3)), (2, 0, 5, Some(0))]);
    assert_eq!(s.num_running(), 2);
}

#[test]
fn end_tokens_and_max_tokens_finish_and_free_blocks() {
    let mut s = Scheduler::new(cfg(4, 32, 32, 8, 4)).unwrap();
    let params = |ignore_eos| SeqParams {
        sampling: SamplingParams::greedy(),
        max_tokens: 3,
        eos_token_ids: vec![7],
        stop_token_ids: vec![9],
        ignore_eos,
    };
    s.add_request(1, prompt(1, 5), params(false)).unwrap();
    s.add_request(2, prompt(2, 5), params(true)).unwrap();
    s.add_request(3, prompt(3, 5), params(true)).unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(s.used_blocks(), 6);
    let events =
        s.on_step_result(StepResult { step_id: plan.step_id, sampled: vec![(1, tok(7)), (2, tok(7)), (3, tok(9))] });
    assert_eq!(
        events,
        vec![
            SeqEvent::Token { seq_id: 1, token: tok(7), index: 0 },
            SeqEvent::Finished { seq_id: 1, reason: FinishReason::Eos },
            SeqEvent::Token { seq_id: 2, token: tok(7), index: 0 },
            SeqEvent::Token { seq_id: 3, token: tok(9), index: 0 },
            SeqEvent::Finished { seq_id: 3, reason: FinishReason::Stop },
        ]
    );
    assert_eq!(s.used_blocks(), 2, "finished sequences free their blocks at once");
    for _ in 0..2 {
        let plan = s.schedule().unwrap();
        s.on_step_result(answer_all(&plan, 7));
    }
    assert!(!s.contains(2));
    assert_eq!(s.used_blocks(), 0);
}

#[test]
fn max_model_len_caps_generation() {
    let mut c = cfg(4, 32, 32, 8, 4);
    c.max_model_len = 8;
    let mut s = Scheduler::new(c).unwrap();
    s.add_request(1, prompt(1, 5), SeqParams::greedy(100)).unwrap();
    let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&c, 64), 100);
    assert_eq!(out.tokens(1).len(), 3);
    assert_eq!(out.finished[&1], FinishReason::Length);
}

#[test]
fn abort_frees_blocks_and_drops_in_flight_results() {
    let mut s = Scheduler::new(cfg(4, 32, 32, 8, 4)).unwrap();
    assert_eq!(s.abort(42, FinishReason::Abort), None);
    for id in 1..=3 {
        s.add_request(id, prompt(id, 6), SeqParams::greedy(10)).unwrap();
    }
    // Waiting sequence.
    assert_eq!(s.abort(3, FinishReason::Abort), Some(SeqEvent::Finished { seq_id: 3, reason: FinishReason::Abort }));
    s.add_request(3, prompt(3, 6), SeqParams::greedy(10)).unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(s.used_blocks(), 6);
    // Aborted while its step is in flight (a stop string found by the caller), then the id is
    // reused at once: the late result must land on neither.
    assert_eq!(s.abort(2, FinishReason::Stop), Some(SeqEvent::Finished { seq_id: 2, reason: FinishReason::Stop }));
    assert_eq!(s.used_blocks(), 4);
    s.add_request(2, prompt(2, 4), SeqParams::greedy(10)).unwrap();
    let events = s.on_step_result(answer_all(&plan, 11));
    let ids: Vec<u64> = events.iter().map(SeqEvent::seq_id).collect();
    assert_eq!(ids, vec![1, 3]);
    let plan = s.schedule().unwrap();
    let c2 = plan.chunks.iter().find(|c| c.seq_id == 2).unwrap();
    assert_eq!((c2.first_pos, c2.len()), (0, 4), "the reused id starts afresh");
}

#[test]
fn preemption_recomputes_with_correct_positions_and_steps() {
    // 4 blocks of 2 slots. A and B (3-token prompts, 3 new tokens each) fill the cache after
    // their first step; A's third token needs a fifth block.
    let mut s = Scheduler::new(cfg(2, 4, 16, 16, 4)).unwrap();
    s.add_request(1, vec![10, 11, 12], SeqParams::greedy(3)).unwrap();
    s.add_request(2, vec![20, 21, 22], SeqParams::greedy(3)).unwrap();
    let mut out = Outputs::default();
    for (a, b) in [(30, 40), (31, 41)] {
        let plan = s.schedule().unwrap();
        assert_eq!(plan.chunks.len(), 2);
        out.apply(s.on_step_result(StepResult { step_id: plan.step_id, sampled: vec![(1, tok(a)), (2, tok(b))] }));
    }
    assert_eq!(s.free_blocks(), 0);
    // A needs a block: B, the later arrival, is evicted before it is planned.
    let plan = s.schedule().unwrap();
    assert_eq!(s.num_preemptions(), 1);
    assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
    assert_eq!(plan.chunks.len(), 1);
    let c = &plan.chunks[0];
    assert_eq!((c.seq_id, c.first_pos, c.tokens.clone()), (1, 4, vec![31]));
    assert_eq!(c.sample.unwrap().step, 2);
    out.apply(s.on_step_result(answer_all(&plan, 32)));
    assert_eq!(out.finished[&1], FinishReason::Length);
    // B is recomputed from position 0 over prompt + its two generated tokens, and samples
    // generated index 2; its first two tokens are not emitted again.
    let plan = s.schedule().unwrap();
    let c = &plan.chunks[0];
    assert_eq!((c.seq_id, c.first_pos, c.tokens.clone()), (2, 0, vec![20, 21, 22, 40, 41]));
    assert_eq!(c.sample.unwrap().step, 2);
    let events = s.on_step_result(answer_all(&plan, 42));
    assert_eq!(
        events,
        vec![
            SeqEvent::Token { seq_id: 2, token: tok(42), index: 2 },
            SeqEvent::Finished { seq_id: 2, reason: FinishReason::Length },
        ]
    );
    out.apply(events);
    assert_eq!(out.tokens(2), vec![40, 41, 42]);
    assert_eq!(s.used_blocks(), 0);
}

#[test]
fn earlier_prefill_evicts_a_later_decode_already_planned() {
    // 6 blocks of 2 slots, 2-token prefill chunks. A (long prompt) arrives first, B (short)
    // second; B decodes while A is still prefilling, until A's chunk finds no free block.
    let c = cfg(2, 6, 4, 2, 2);
    let mut s = Scheduler::new(c).unwrap();
    s.add_request(1, prompt(1, 10), SeqParams::greedy(1)).unwrap();
    s.add_request(2, prompt(2, 2), SeqParams::greedy(8)).unwrap();
    let mut engine = FakeEngine::new(&c, SOLO_VOCAB);
    let mut out = Outputs::default();
    let mut shapes = Vec::new();
    while let Some(plan) = s.schedule() {
        assert_blocks_partitioned(&s);
        check_plan(&s, &plan, &out);
        shapes.push(plan.chunks.iter().map(|c| (c.seq_id, c.first_pos)).collect::<Vec<_>>());
        out.apply(s.on_step_result(engine.run(&plan)));
    }
    // Step 3: B's decode (planned first) is withdrawn and B evicted so A can continue.
    assert_eq!(shapes[2], vec![(2, 3), (1, 4)]);
    assert_eq!(shapes[3], vec![(1, 6)]);
    assert_eq!(s.num_preemptions(), 1);
    // A's last chunk frees nothing yet, but there is room to readmit B: it recomputes from 0.
    assert_eq!(shapes[4], vec![(1, 8), (2, 0)]);
    assert_eq!(shapes[5], vec![(2, 2)]);
    for a in [
        Arrival { step: 0, seq_id: 1, prompt: prompt(1, 10), params: SeqParams::greedy(1) },
        Arrival { step: 0, seq_id: 2, prompt: prompt(2, 2), params: SeqParams::greedy(8) },
    ] {
        assert_eq!((out.tokens(a.seq_id), out.finished[&a.seq_id].clone()), solo_output(&c, &a));
    }
}

fn sampled_params(seed: u64, max_tokens: u32) -> SeqParams {
    SeqParams {
        sampling: SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed },
        ..SeqParams::greedy(max_tokens)
    }
}

#[test]
fn preempted_output_equals_unpreempted_output() {
    let run = |config: SchedulerConfig| {
        let mut s = Scheduler::new(config).unwrap();
        for id in 0..6 {
            s.add_request(id, prompt(id, 3 + 4 * id as u32), sampled_params(id, 12)).unwrap();
        }
        let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&config, 97), 10_000);
        (out, s.num_preemptions())
    };
    let (tight, preemptions) = run(cfg(2, 20, 16, 5, 6));
    assert!(preemptions > 0, "the tight cache must preempt");
    let (ample, none) = run(cfg(2, 200, 64, 64, 6));
    assert_eq!(none, 0);
    for id in 0..6 {
        assert_eq!(tight.tokens(id), ample.tokens(id), "seq {id}");
        assert_eq!(tight.tokens(id).len(), 12);
        assert_eq!(tight.finished[&id], FinishReason::Length);
    }
}

#[test]
fn sequence_too_large_for_the_cache_fails_without_looping() {
    let c = cfg(2, 3, 16, 4, 4);
    let mut s = Scheduler::new(c).unwrap();
    let e = s.add_request(9, prompt(9, 3), SeqParams::greedy(10)).unwrap_err();
    assert_eq!(e.error_type(), "kv_cache_too_small");
    // Past the admission check (the safety net): it grows until it is alone and still needs
    // more than the cache, then fails; the small request ahead of it completes.
    s.add_request(1, prompt(1, 2), SeqParams::greedy(2)).unwrap();
    s.add_request_unchecked_capacity(9, prompt(9, 3), SeqParams::greedy(10)).unwrap();
    let (out, steps) = run_to_completion(&mut s, &mut FakeEngine::new(&c, 64), 1000);
    assert!(steps < 50);
    assert_eq!(out.finished[&1], FinishReason::Length);
    assert!(matches!(out.finished[&9], FinishReason::Error(_)));
    assert_eq!(out.tokens(9).len(), 4, "6 slots hold 3 prompt + 3 fed-back tokens");
    // A first chunk that does not fit even in the empty cache fails at admission.
    s.add_request_unchecked_capacity(10, prompt(10, 4), SeqParams::greedy(1)).unwrap();
    let mut c = c;
    c.prefill_chunk = 16;
    let mut s2 = Scheduler::new(c).unwrap();
    s2.add_request_unchecked_capacity(10, prompt(10, 8), SeqParams::greedy(1)).unwrap();
    s2.add_request(11, prompt(11, 2), SeqParams::greedy(1)).unwrap();
    let plan = s2.schedule().unwrap();
    let events = s2.take_events();
    assert!(matches!(&events[..], [SeqEvent::Finished { seq_id: 10, reason: FinishReason::Error(_) }]));
    assert_eq!(plan.chunks.iter().map(|c| c.seq_id).collect::<Vec<_>>(), vec![11]);
}

#[test]
fn max_running_limits_the_batch() {
    let c = cfg(4, 64, 64, 16, 2);
    let mut s = Scheduler::new(c).unwrap();
    for id in 0..5 {
        s.add_request(id, prompt(id, 4), SeqParams::greedy(3)).unwrap();
    }
    let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&c, 64), 100);
    assert_eq!(out.finished.len(), 5);
}

#[test]
fn stale_results_are_ignored_and_failed_steps_recomputed() {
    let mut s = Scheduler::new(cfg(4, 32, 32, 4, 4)).unwrap();
    s.add_request(1, prompt(1, 6), SeqParams::greedy(4)).unwrap();
    let first = s.schedule().unwrap();
    assert!(s.schedule().is_none(), "one step in flight at a time");
    assert!(s.on_step_result(StepResult { step_id: 99, sampled: vec![] }).is_empty());
    assert_eq!((s.num_ignored_results(), s.step_in_flight()), (1, Some(first.step_id)));
    assert!(!s.on_step_failed(99));
    assert!(s.on_step_failed(first.step_id));
    let again = s.schedule().unwrap();
    assert_eq!(again.step_id, first.step_id + 1);
    assert_eq!(again.chunks, first.chunks, "the failed step is planned again unchanged");
    s.on_step_result(answer_all(&again, 5));
    let second = s.schedule().unwrap();
    assert_eq!(second.chunks[0].sample.unwrap().step, 0);
    // A result that forgets a sampling chunk: the chunk is recomputed, nothing is emitted.
    assert!(s.on_step_result(StepResult { step_id: second.step_id, sampled: vec![] }).is_empty());
    let third = s.schedule().unwrap();
    assert_eq!(third.chunks, second.chunks);
}

#[test]
fn block_allocator_is_lowest_first_and_all_or_nothing() {
    let mut a = BlockAllocator::new(4, 5);
    a.ensure_capacity(1, 5).unwrap();
    a.ensure_capacity(2, 4).unwrap();
    assert_eq!((a.block_table(1), a.block_table(2)), (&[0, 1][..], &[2][..]));
    assert_eq!(a.ensure_capacity(2, 17), Err(OutOfBlocks { needed: 4, free: 2 }));
    assert_eq!(a.block_table(2), &[2], "a failed growth allocates nothing");
    assert_eq!(a.free_sequence(1), 2);
    a.ensure_capacity(2, 12).unwrap();
    assert_eq!(a.block_table(2), &[2, 0, 1]);
    assert_eq!((a.used_blocks(), a.free_blocks(), a.capacity(2)), (3, 2, 12));
    assert_eq!(a.free_sequence(7), 0);
}

/// xorshift64*: enough randomness for workloads, no dependency, reproducible by seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % (hi - lo + 1) as u64) as u32
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.range(0, 99) < percent
    }
}

struct Arrival {
    step: usize,
    seq_id: u64,
    prompt: Vec<u32>,
    params: SeqParams,
}

/// The fake engine's vocabulary in runs compared with [`solo_output`].
const SOLO_VOCAB: u32 = 41;

/// The sequence's output when it runs alone in an ample cache.
fn solo_output(config: &SchedulerConfig, a: &Arrival) -> (Vec<u32>, FinishReason) {
    let ample = SchedulerConfig { num_blocks: 4096, max_batch_tokens: 4096, ..*config };
    let mut s = Scheduler::new(ample).unwrap();
    s.add_request(a.seq_id, a.prompt.clone(), a.params.clone()).unwrap();
    let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&ample, SOLO_VOCAB), 10_000);
    (out.tokens(a.seq_id), out.finished[&a.seq_id].clone())
}

#[test]
fn randomized_workloads_never_double_allocate_and_always_terminate() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut total_preemptions = 0;
    for round in 0..300 {
        let max_running = rng.range(1, 6);
        let config = SchedulerConfig {
            block_size: rng.range(1, 8),
            num_blocks: rng.range(1, 40),
            max_batch_tokens: rng.range(max_running, max_running + 24),
            prefill_chunk: rng.range(1, 12),
            max_running,
            max_model_len: rng.range(8, 64),
        };
        let arrivals: Vec<Arrival> = (0..rng.range(1, 12) as u64)
            .map(|seq_id| Arrival {
                step: rng.range(0, 30) as usize,
                seq_id,
                prompt: (0..rng.range(1, 24)).map(|_| rng.range(0, 40)).collect(),
                params: SeqParams {
                    sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: rng.next() },
                    max_tokens: rng.range(1, 24),
                    eos_token_ids: if rng.chance(50) { vec![rng.range(0, 40)] } else { vec![] },
                    stop_token_ids: vec![],
                    ignore_eos: false,
                },
            })
            .collect();
        let mut s = Scheduler::new(config).unwrap();
        let mut engine = FakeEngine::new(&config, SOLO_VOCAB);
        let mut out = Outputs::default();
        let mut accepted: Vec<&Arrival> = Vec::new();
        let mut aborted: HashSet<u64> = HashSet::new();
        let mut step = 0usize;
        loop {
            assert!(step < 20_000, "round {round}: no termination ({config:?})");
            for a in arrivals.iter().filter(|a| a.step == step) {
                match s.add_request(a.seq_id, a.prompt.clone(), a.params.clone()) {
                    Ok(()) => accepted.push(a),
                    Err(e) => assert!(
                        matches!(e.error_type(), "prompt_too_long" | "kv_cache_too_small"),
                        "round {round}: {e}"
                    ),
                }
            }
            if rng.chance(3) {
                let live: Vec<u64> = accepted.iter().map(|a| a.seq_id).filter(|id| s.contains(*id)).collect();
                if !live.is_empty() {
                    let id = live[rng.range(0, live.len() as u32 - 1) as usize];
                    out.apply(s.abort(id, FinishReason::Abort).into_iter().collect());
                    aborted.insert(id);
                }
            }
            let plan = s.schedule();
            out.apply(s.take_events());
            assert_blocks_partitioned(&s);
            step += 1;
            match plan {
                Some(plan) => {
                    check_plan(&s, &plan, &out);
                    out.apply(s.on_step_result(engine.run(&plan)));
                    assert_blocks_partitioned(&s);
                }
                None => {
                    assert!(!s.has_unfinished(), "round {round}: stalled ({config:?})");
                    if arrivals.iter().all(|a| a.step < step) {
                        break;
                    }
                }
            }
        }
        assert_eq!((s.num_running(), s.num_waiting(), s.used_blocks()), (0, 0, 0));
        total_preemptions += s.num_preemptions();
        for a in &accepted {
            let (solo_tokens, solo_reason) = solo_output(&config, a);
            let tokens = out.tokens(a.seq_id);
            if aborted.contains(&a.seq_id) && out.finished[&a.seq_id] == FinishReason::Abort {
                assert!(solo_tokens.starts_with(&tokens), "round {round} seq {}", a.seq_id);
            } else {
                assert_eq!(tokens, solo_tokens, "round {round} seq {} ({config:?})", a.seq_id);
                assert_eq!(out.finished[&a.seq_id], solo_reason);
            }
        }
    }
    assert!(total_preemptions > 0, "the workloads should exercise preemption");
}

/// Guards request migration (a failed group's requests continue on another): sequences
/// evacuated mid-run — with a step in flight, some mid-prefill, some decoding — and resumed on
/// a scheduler with another cache shape emit exactly the tokens of an uninterrupted run, and
/// never re-emit the ones they bring.
#[test]
fn evacuated_and_resumed_sequences_continue_as_if_uninterrupted() {
    let ample = cfg(2, 200, 64, 64, 6);
    let mut whole = Scheduler::new(ample).unwrap();
    for id in 0..6 {
        whole.add_request(id, prompt(id, 3 + 4 * id as u32), sampled_params(id, 12)).unwrap();
    }
    let (reference, _) = run_to_completion(&mut whole, &mut FakeEngine::new(&ample, 97), 10_000);
    for cut in [1usize, 2, 3, 5, 8, 11] {
        let first = cfg(4, 40, 24, 7, 4);
        let mut a = Scheduler::new(first).unwrap();
        for id in 0..6 {
            a.add_request(id, prompt(id, 3 + 4 * id as u32), sampled_params(id, 12)).unwrap();
        }
        let mut engine = FakeEngine::new(&first, 97);
        let mut out = Outputs::default();
        for _ in 0..cut {
            let Some(plan) = a.schedule() else { break };
            out.apply(a.take_events());
            out.apply(a.on_step_result(engine.run(&plan)));
        }
        // A step in flight whose result never arrives: the group died mid-step.
        let _lost = a.schedule();
        let moved = a.evacuate();
        assert_eq!(a.num_running() + a.num_waiting(), 0);
        assert_eq!(a.used_blocks(), 0, "evacuation frees every block");
        let second = cfg(2, 60, 16, 5, 3);
        let mut b = Scheduler::new(second).unwrap();
        for m in moved {
            let brought = m.tokens.len() - m.prompt_len;
            assert_eq!(out.tokens(m.seq_id).len(), brought, "seq {}: tokens brought", m.seq_id);
            b.resume_request(m.seq_id, m.tokens, m.prompt_len, m.params).unwrap();
        }
        let (all, _) = continue_to_completion(&mut b, &mut FakeEngine::new(&second, 97), out, 10_000);
        for id in 0..6 {
            assert_eq!(all.tokens(id), reference.tokens(id), "cut {cut}, seq {id}");
            assert_eq!(all.finished.get(&id), Some(&reference.finished[&id]), "cut {cut}, seq {id}");
        }
    }
}
