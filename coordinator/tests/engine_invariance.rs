//! Engine-level determinism: a prompt's token ids and logprob bits do not depend on what else is
//! running, when it arrived, the prefill chunk size, the thread count, or preemption — greedy and
//! seeded sampling alike. Runs on the real stories260K model (see `lockstep_test_env` for where it
//! is found and what happens when it is not) and always on a synthesized tiny Qwen2 (q/k/v biases)
//! and tiny Llama. A negative control runs the same conditions with the conventional (fast) GEMM
//! and requires them to show a difference, so the matrix is known to be able to see one.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lockstep_coordinator::engine::{
    Engine, EngineOptions, GenerateRequest, LocalExecutor, ModelInfo, RequestId, SeqOutput,
};
use lockstep_coordinator::tokenizer::ChatMessage;
use lockstep_kernels::{CpuBackend, DType, KernelMode, SamplingParams};
use lockstep_node::synth::{synth, Preset};
use lockstep_test_env::{shared_model, smollm2_gguf, stories260k};

/// A synthesized model, written once per test binary.
fn synth_model(preset: Preset, dtype: DType) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> = OnceLock::new();
    let key = format!("{preset}-{}", dtype.as_str());
    let mut dirs = DIRS.get_or_init(Default::default).lock().unwrap();
    dirs.entry(key.clone())
        .or_insert_with(|| {
            // Cargo's per-target scratch directory: reused across runs, removed by `cargo clean`.
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("synth-{key}-seed7"));
            if !dir.join("model.safetensors").exists() {
                let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
                synth(preset, 7, dtype, &tmp).unwrap();
                // Another test binary may have won the race; either copy is byte-identical.
                if std::fs::rename(&tmp, &dir).is_err() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
            dir
        })
        .clone()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the", "little", "dog", "ran", "to", "park", "and", "saw", "a", "big", "red", "ball", "Lily", "said", "happy",
    "sun", "tree", "friend", "mom", "cat", "jumped", "over", "fence", "played", "all", "day", "once", "upon", "time",
];

/// Other traffic: (prompt, arrival step, max tokens).
fn background(seed: u64, n: usize) -> Vec<(String, u64, u32)> {
    let mut rng = Rng(seed * 2654435761 + 1);
    (0..n)
        .map(|_| {
            let words = 1 + rng.below(40) as usize;
            let text: Vec<&str> = (0..words).map(|_| WORDS[rng.below(WORDS.len() as u64) as usize]).collect();
            (text.join(" "), rng.below(12), 1 + rng.below(40) as u32)
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
struct Answer {
    ids: Vec<u32>,
    logprob_bits: Vec<u32>,
    text: String,
}

struct Run {
    answer: Answer,
    preemptions: u64,
}

fn request(info: &ModelInfo, prompt: &str, sampling: SamplingParams, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: info.tokenizer.encode(prompt, true).unwrap(),
        sampling,
        max_tokens,
        stop: vec![],
        stop_token_ids: vec![],
        ignore_eos: true,
        skip_special_tokens: true,
    }
}

/// Run `target` (arriving at `arrival`) among `others`; return the target's answer.
fn run(
    dir: &Path,
    opts: &EngineOptions,
    target_prompt: &str,
    sampling: SamplingParams,
    arrival: u64,
    others: &[(String, u64, u32)],
) -> Run {
    let target = |info: &ModelInfo| request(info, target_prompt, sampling, 24);
    run_request(dir, opts, &target, sampling, arrival, others)
}

/// [`run`] with the target request built by `target` from the loaded model.
fn run_request(
    dir: &Path,
    opts: &EngineOptions,
    target_request: &dyn Fn(&ModelInfo) -> GenerateRequest,
    sampling: SamplingParams,
    arrival: u64,
    others: &[(String, u64, u32)],
) -> Run {
    let info = ModelInfo::load(dir, opts, CpuBackend::fingerprint_name_for(opts.mode)).unwrap();
    let exec = LocalExecutor::load(&info, opts).unwrap();
    let mut engine = Engine::new(info.scheduler_config(opts), exec, info.tokenizer.clone()).unwrap();
    const TARGET: RequestId = RequestId(0);
    let mut target_added = false;
    let mut target = SeqOutput::default();
    let mut step = 0;
    let mut pending: Vec<(u64, Option<GenerateRequest>)> = others
        .iter()
        .map(|(p, at, n)| (*at, Some(request(&info, p, SamplingParams { seed: 99, ..sampling }, *n))))
        .collect();
    loop {
        if step == arrival && !target_added {
            engine.add(TARGET, target_request(&info)).unwrap();
            target_added = true;
        }
        for (k, (at, req)) in pending.iter_mut().enumerate() {
            if *at == step {
                engine.add(RequestId(k as u64 + 1), req.take().unwrap()).unwrap();
            }
        }
        let done_adding = target_added && pending.iter().all(|(_, r)| r.is_none());
        if done_adding && !engine.has_work() {
            break;
        }
        for ev in engine.step().unwrap() {
            if ev.id() == TARGET {
                target.push(&ev);
            }
        }
        step += 1;
    }
    let preemptions = engine.scheduler().num_preemptions();
    let out = target;
    Run {
        answer: Answer {
            ids: out.token_ids,
            logprob_bits: out.logprobs.iter().map(|l| l.to_bits()).collect(),
            text: out.text,
        },
        preemptions,
    }
}

fn base_opts() -> EngineOptions {
    EngineOptions { threads: 2, kv_cache_mib: 16, max_context: Some(512), ..EngineOptions::default() }
}

/// Every condition of the contract, compared to the prompt run alone. Returns how many differ
/// (always 0 for the invariant kernels; counted honestly for the fast ones).
fn invariance_matrix(dir: &Path, mode: KernelMode, sampling: SamplingParams) -> (usize, usize) {
    let prompt = "Once upon a time";
    let opts = EngineOptions { mode, ..base_opts() };
    let alone = run(dir, &opts, prompt, sampling, 0, &[]).answer;
    assert_eq!(alone.ids.len(), 24);
    let mut cases: Vec<(String, Answer)> = Vec::new();
    for (i, n) in [1usize, 2, 5, 8, 16, 32].into_iter().enumerate() {
        let others = background(i as u64, n);
        let arrival = i as u64 % 4;
        cases.push((
            format!("{n} others, arrival {arrival}"),
            run(dir, &opts, prompt, sampling, arrival, &others).answer,
        ));
    }
    for chunk in [1usize, 7, 64] {
        let o = EngineOptions { prefill_chunk: chunk, ..opts.clone() };
        cases.push((
            format!("prefill chunk {chunk}"),
            run(dir, &o, prompt, sampling, 1, &background(10 + chunk as u64, 6)).answer,
        ));
    }
    for threads in [1usize, 3] {
        let o = EngineOptions { threads, ..opts.clone() };
        cases.push((format!("{threads} threads"), run(dir, &o, prompt, sampling, 0, &background(20, 4)).answer));
    }
    // A cache of 8 blocks × 16 slots cannot hold the target plus the others: preemption and
    // recompute must happen, and must not show.
    let tight = EngineOptions { num_blocks: Some(8), block_size: 16, prefill_chunk: 16, ..opts.clone() };
    let r = run(dir, &tight, prompt, sampling, 2, &background(30, 8));
    assert!(r.preemptions > 0, "the tight cache must preempt");
    cases.push((format!("{} preemptions", r.preemptions), r.answer));
    let differ: Vec<&String> = cases.iter().filter(|(_, a)| *a != alone).map(|(n, _)| n).collect();
    eprintln!("{mode:?} {sampling:?}: {} of {} conditions differ from alone: {differ:?}", differ.len(), cases.len());
    (differ.len(), cases.len())
}

fn greedy() -> SamplingParams {
    SamplingParams::greedy()
}
fn seeded(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed }
}

#[test]
fn stories260k_greedy_continues_once_upon_a_time() {
    let Some(dir) = stories260k() else { return };
    let a = run(&dir, &base_opts(), "Once upon a time", greedy(), 0, &[]).answer;
    assert!(a.text.starts_with(", there was a little girl named Lily"), "{:?}", a.text);
}

#[test]
fn stories260k_greedy_is_invariant_to_batch_arrival_chunking_threads_and_preemption() {
    let Some(dir) = stories260k() else { return };
    assert_eq!(invariance_matrix(&dir, KernelMode::Invariant, greedy()).0, 0);
}

#[test]
fn stories260k_seeded_sampling_is_invariant_and_seeds_differ() {
    let Some(dir) = stories260k() else { return };
    assert_eq!(invariance_matrix(&dir, KernelMode::Invariant, seeded(1234)).0, 0);
    let a = run(&dir, &base_opts(), "Once upon a time", seeded(1234), 0, &[]).answer;
    let b = run(&dir, &base_opts(), "Once upon a time", seeded(4321), 0, &[]).answer;
    assert_ne!(a.ids, b.ids, "different seeds give different streams");
}

#[test]
fn synthetic_qwen2_with_bias_is_invariant() {
    let dir = synth_model(Preset::TinyQwen2, DType::Bf16);
    assert_eq!(invariance_matrix(&dir, KernelMode::Invariant, greedy()).0, 0);
    assert_eq!(invariance_matrix(&dir, KernelMode::Invariant, seeded(5)).0, 0);
}

#[test]
fn synthetic_llama_and_qwen2_load_and_generate_in_bf16_and_f32() {
    for preset in [Preset::Tiny, Preset::TinyQwen2] {
        for dtype in [DType::Bf16, DType::F32] {
            let dir = synth_model(preset, dtype);
            let a = run(&dir, &base_opts(), "the little dog", greedy(), 0, &[]).answer;
            assert_eq!(a.ids.len(), 24, "{preset} {dtype:?}");
            assert!(a.logprob_bits.iter().all(|&b| f32::from_bits(b) <= 0.0 && f32::from_bits(b).is_finite()));
        }
    }
}

/// The same matrix with the conventional GEMM, whose sums change order with the batch: some
/// condition must differ from the prompt alone. If none did, the matrix could not see a batch
/// dependence at all, and its zero for the invariant kernels would prove nothing. (Observed on
/// x86-64 with AVX2 and AVX-512: every condition differs, on both models.)
#[test]
fn negative_control_the_matrix_sees_the_fast_kernels_batch_dependence() {
    let dirs: Vec<PathBuf> = stories260k().into_iter().chain([synth_model(Preset::TinyQwen2, DType::Bf16)]).collect();
    for dir in dirs {
        let (differ, total) = invariance_matrix(&dir, KernelMode::Fast, greedy());
        assert!(differ > 0, "{}: fast kernels agree with alone in all {total} conditions", dir.display());
    }
}

/// Guards request migration: requests taken out of an engine mid-generation (some still
/// prefilling, some decoding, a stop string half-matched) and resumed on another engine with
/// other threads, prefill chunk and cache give the uninterrupted run's token ids, logprob bits
/// and text — greedy and seeded.
#[test]
fn stories260k_requests_migrated_mid_generation_continue_identically() {
    let Some(dir) = lockstep_test_env::stories260k() else { return };
    let opts = base_opts();
    let info = ModelInfo::load(&dir, &opts, CpuBackend::fingerprint_name_for(opts.mode)).unwrap();
    let prompts = ["Once upon a time", "The little dog ran to the park and saw a big red ball", "Lily said"];
    let requests: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let mut greedy_req = request(&info, p, greedy(), 20 + 3 * i as u32);
            greedy_req.stop = vec!["park".into()];
            [greedy_req, request(&info, p, seeded(77 + i as u64), 24)]
        })
        .collect();
    let collect = |outs: &mut Vec<SeqOutput>, evs: Vec<lockstep_coordinator::engine::EngineEvent>| {
        for ev in evs {
            outs[ev.id().0 as usize].push(&ev);
        }
    };
    let engine_with = |opts: &EngineOptions| {
        let exec = LocalExecutor::load(&info, opts).unwrap();
        Engine::new(info.scheduler_config(opts), exec, info.tokenizer.clone()).unwrap()
    };
    let mut whole = engine_with(&opts);
    let mut reference = vec![SeqOutput::default(); requests.len()];
    for (i, r) in requests.iter().enumerate() {
        whole.add(RequestId(i as u64), r.clone()).unwrap();
    }
    while whole.has_work() {
        let evs = whole.step().unwrap();
        collect(&mut reference, evs);
    }
    for cut in [1usize, 2, 5, 9] {
        let mut outs = vec![SeqOutput::default(); requests.len()];
        let mut first = engine_with(&EngineOptions { prefill_chunk: 4, ..opts.clone() });
        for (i, r) in requests.iter().enumerate() {
            first.add(RequestId(i as u64), r.clone()).unwrap();
        }
        for _ in 0..cut {
            let evs = first.step().unwrap();
            collect(&mut outs, evs);
        }
        let moved = first.evacuate();
        assert!(!first.has_work());
        let mut second = engine_with(&EngineOptions { threads: 3, prefill_chunk: 7, ..opts.clone() });
        for m in moved {
            assert_eq!(m.generated(), outs[m.id.0 as usize].token_ids.len());
            second.resume(m).map_err(|b| b.0).unwrap();
        }
        while second.has_work() {
            let evs = second.step().unwrap();
            collect(&mut outs, evs);
        }
        for (i, (got, want)) in outs.iter().zip(&reference).enumerate() {
            assert_eq!(got.token_ids, want.token_ids, "cut {cut}, request {i}");
            let bits = |o: &SeqOutput| o.logprobs.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(want), "cut {cut}, request {i}");
            assert_eq!(got.text, want.text, "cut {cut}, request {i}");
            assert_eq!(got.finish_reason, want.finish_reason, "cut {cut}, request {i}");
        }
    }
}

#[test]
fn synthetic_qwen3_with_qk_norm_is_invariant() {
    let dir = synth_model(Preset::TinyQwen3, DType::Bf16);
    assert_eq!(invariance_matrix(&dir, KernelMode::Invariant, greedy()).0, 0);
    assert_eq!(invariance_matrix(&dir, KernelMode::Invariant, seeded(5)).0, 0);
}

/// Guards GGUF loading end to end: stories260K's GGUF (F32, llama.cpp's interleaved-RoPE row
/// order, SentencePiece tokenizer in the metadata) answers with the HF conversion's very bits.
#[test]
fn stories260k_gguf_answers_bitwise_like_its_hf_twin() {
    let Some(hf) = stories260k() else { return };
    let Some(gguf) = shared_model("stories260K/stories260K.gguf") else { return };
    for sampling in [greedy(), seeded(1234)] {
        let a = run(&hf, &base_opts(), "Once upon a time", sampling, 0, &[]).answer;
        let b = run(&gguf, &base_opts(), "Once upon a time", sampling, 0, &background(3, 4)).answer;
        assert_eq!(a, b, "{sampling:?}");
    }
}

fn capital_of_france(info: &ModelInfo, sampling: SamplingParams, max_tokens: u32) -> GenerateRequest {
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    GenerateRequest {
        prompt_ids: info.tokenizer.encode_chat(&messages, true).unwrap(),
        sampling,
        max_tokens,
        stop: vec![],
        stop_token_ids: vec![],
        ignore_eos: false,
        skip_special_tokens: true,
    }
}

/// The real instruct model answers the question (an independent float32 implementation says
/// "The capital of France is Paris.").
#[test]
fn smollm2_gguf_greedy_chat_answers_paris() {
    let Some(path) = smollm2_gguf() else { return };
    let target = |info: &ModelInfo| capital_of_france(info, greedy(), 12);
    let a = run_request(&path, &base_opts(), &target, greedy(), 0, &[]).answer;
    assert!(a.text.contains("Paris"), "{:?}", a.text);
}

/// The invariance matrix on the real model, kept small (a 135M model on 2 cores): other
/// traffic, arrival, prefill chunk and threads change no bit of the answer, greedy or seeded.
#[test]
fn smollm2_gguf_chat_is_invariant_to_batch_chunking_and_threads() {
    let Some(path) = smollm2_gguf() else { return };
    let short = |seed: u64, n: usize| -> Vec<(String, u64, u32)> {
        background(seed, n).into_iter().map(|(p, at, max)| (p, at % 3, max.min(6))).collect()
    };
    for sampling in [greedy(), seeded(42)] {
        let target = |info: &ModelInfo| capital_of_france(info, sampling, 8);
        let opts = base_opts();
        let alone = run_request(&path, &opts, &target, sampling, 0, &[]).answer;
        assert!(!alone.ids.is_empty());
        let cases = [
            ("4 others", run_request(&path, &opts, &target, sampling, 1, &short(1, 4)).answer),
            (
                "prefill chunk 7",
                run_request(
                    &path,
                    &EngineOptions { prefill_chunk: 7, ..opts.clone() },
                    &target,
                    sampling,
                    0,
                    &short(2, 2),
                )
                .answer,
            ),
            (
                "1 thread",
                run_request(&path, &EngineOptions { threads: 1, ..opts.clone() }, &target, sampling, 0, &[]).answer,
            ),
            (
                "3 threads",
                run_request(&path, &EngineOptions { threads: 3, ..opts.clone() }, &target, sampling, 2, &short(3, 2))
                    .answer,
            ),
        ];
        for (name, answer) in cases {
            assert_eq!(answer, alone, "{sampling:?}: {name}");
        }
    }
}
