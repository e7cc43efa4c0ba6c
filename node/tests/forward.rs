//! Forward-pass tests on the real stories260K model (see `lockstep_test_env` for where it is
//! found and what happens when it is not).

use lockstep_kernels::cpu::amx::AmxExec;
use lockstep_kernels::cpu::dpbf16::Dpbf16Exec;
use lockstep_kernels::cpu::NativeExec;
use lockstep_kernels::{CpuBackend, CpuConfig, Isa, KernelMode, NumericsConfig, SampleRequest, SamplingParams};
use lockstep_node::config::ModelConfig;
use lockstep_node::model::{Model, ModelOptions, SingleRank};
use lockstep_node::shard::{auto_reduce_segments, ShardPlan};
use lockstep_proto::step::{SeqChunk, StepPlan};

fn pieces(dir: &std::path::Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("llama2c_vocab.json")).unwrap()).unwrap();
    v.as_array().unwrap().iter().map(|e| e["piece"].as_str().unwrap().replace('▁', " ")).collect()
}

fn load(dir: &std::path::Path, threads: usize) -> Model<CpuBackend> {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let segments = auto_reduce_segments(&cfg);
    let be = CpuBackend::new(CpuConfig {
        threads,
        isa: Some(Isa::best()),
        mode: KernelMode::Invariant,
        numerics: NumericsConfig { reduce_segments: segments, kv_chunk: 16 },
    })
    .unwrap();
    let plan = ShardPlan::new(&cfg, 0, 1, segments).unwrap();
    let opts = ModelOptions { num_blocks: 64, block_size: 16, max_context: 512 };
    Model::load(be, dir, cfg, plan, opts, Box::new(SingleRank)).unwrap()
}

#[test]
fn stories260k_greedy_from_bos_tells_the_lily_story() {
    let Some(dir) = lockstep_test_env::stories260k() else { return };
    let mut model = load(&dir, 2);
    let table: Vec<u32> = (0..4).collect();
    let mut tokens = vec![1u32];
    let mut pos = 0;
    let mut out = String::new();
    let p = pieces(&dir);
    for step in 0..24u64 {
        let chunk = SeqChunk {
            seq_id: 7,
            tokens: tokens[pos..].to_vec(),
            first_pos: pos as u32,
            block_table: table.clone(),
            sample: Some(SampleRequest { params: SamplingParams::greedy(), step }),
        };
        pos = tokens.len();
        let s = model.step(&StepPlan { step_id: step, chunks: vec![chunk] }).unwrap();
        let tok = lockstep_kernels::merge_shard_samples(&[&s[0].sample], &s[0].request);
        tokens.push(tok.id);
        out.push_str(&p[tok.id as usize]);
    }
    eprintln!("{out:?}");
    assert!(out.starts_with(" Once upon a time, there was a little girl named Lily"), "{out:?}");
}

/// Regression: the node used to check only block ranges and table lengths, so a plan that named a
/// sequence twice or wrote one KV slot from two chunks ran and silently overwrote another
/// sequence's cache. Every plan now goes through `StepPlan::validate` before anything runs.
#[test]
fn node_refuses_a_plan_that_writes_one_kv_slot_twice() {
    let Some(dir) = lockstep_test_env::stories260k() else { return };
    let mut model = load(&dir, 1);
    let chunk = |seq_id: u64, table: Vec<u32>| SeqChunk {
        seq_id,
        tokens: vec![1, 2],
        first_pos: 0,
        block_table: table,
        sample: Some(SampleRequest { params: SamplingParams::greedy(), step: 0 }),
    };
    let shared_block = StepPlan { step_id: 0, chunks: vec![chunk(1, vec![3]), chunk(2, vec![3])] };
    let err = model.step(&shared_block).unwrap_err();
    assert!(err.to_string().contains("written twice"), "{err}");
    let same_seq = StepPlan { step_id: 1, chunks: vec![chunk(1, vec![3]), chunk(1, vec![4])] };
    assert!(model.step(&same_seq).unwrap_err().to_string().contains("more than one chunk"));
    let fine = StepPlan { step_id: 2, chunks: vec![chunk(1, vec![3]), chunk(2, vec![4])] };
    assert_eq!(model.step(&fine).unwrap().len(), 2, "a valid plan still runs after refused ones");
}

/// CPU native numerics (AMX, `native-amx`) through the whole forward pass, on the software model
/// of the tile unit (the same tile program the CPU's tile unit runs, so this runs anywhere): a
/// prompt prefilled in one chunk or in several, alone or in a batch with another sequence, then
/// decoded, gives the same tokens and logprob bits.
#[test]
fn native_amx_model_prefill_chunking_and_batching_keep_every_bit() {
    native_prefill_chunking_and_batching_keep_every_bit(NativeExec::Amx(AmxExec::Model), "amx")
}

/// The same for the AVX512-BF16 class (`native-avx512bf16`), on its scalar model of the
/// instruction, and on the instruction itself where the CPU has it (the kernels' tests show the
/// two agree bit for bit).
#[test]
fn native_avx512bf16_prefill_chunking_and_batching_keep_every_bit() {
    native_prefill_chunking_and_batching_keep_every_bit(NativeExec::Avx512Bf16(Dpbf16Exec::Model), "dp-model");
    if lockstep_kernels::cpu::dpbf16::avx512bf16_available() {
        native_prefill_chunking_and_batching_keep_every_bit(NativeExec::Avx512Bf16(Dpbf16Exec::Hardware), "dp-hw");
    } else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED native_avx512bf16_prefill_chunking_and_batching_keep_every_bit (hardware half): CPU has no AVX512-BF16"
        );
    }
}

fn native_prefill_chunking_and_batching_keep_every_bit(exec: NativeExec, tag: &str) {
    use lockstep_kernels::DType;
    use lockstep_node::synth::{synth_with, Preset, SynthOptions};

    let dir = std::env::temp_dir().join(format!("lockstep-forward-native-{tag}-{}", std::process::id()));
    synth_with(Preset::Tiny, 5, DType::Bf16, &dir, &SynthOptions::default()).unwrap();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let segments = auto_reduce_segments(&cfg);
    let model = || {
        let be = CpuBackend::with_native(
            CpuConfig {
                threads: 2,
                isa: None,
                mode: KernelMode::Native,
                numerics: NumericsConfig { reduce_segments: segments, kv_chunk: 16 },
            },
            exec,
        )
        .unwrap();
        let plan = ShardPlan::new(&cfg, 0, 1, segments).unwrap();
        let opts = ModelOptions { num_blocks: 32, block_size: 16, max_context: 64 };
        Model::load(be, &dir, cfg.clone(), plan, opts, Box::new(SingleRank)).unwrap()
    };
    let prompt: Vec<u32> = (0..21).map(|i| 3 + (i * 37) % 500).collect();
    let greedy = |step| Some(SampleRequest { params: SamplingParams::greedy(), step });
    // The prompt in chunks of `chunks` tokens, the first step batched with another sequence's
    // whole prefill when `companion`, then six greedy decode steps: (token, logprob bits) each.
    let run = |chunks: &[usize], companion: bool| -> Vec<(u32, u32)> {
        let mut m = model();
        let mut tokens = prompt.clone();
        let mut out = Vec::new();
        let mut pos = 0;
        for (step_id, &len) in chunks.iter().enumerate() {
            let last = pos + len == prompt.len();
            let mut plan_chunks = vec![SeqChunk {
                seq_id: 7,
                tokens: prompt[pos..pos + len].to_vec(),
                first_pos: pos as u32,
                block_table: vec![0, 1, 2, 3],
                sample: if last { greedy(0) } else { None },
            }];
            if companion && step_id == 0 {
                plan_chunks.push(SeqChunk {
                    seq_id: 9,
                    tokens: (0..13).map(|i| 5 + i * 11).collect(),
                    first_pos: 0,
                    block_table: vec![10, 11],
                    sample: greedy(0),
                });
            }
            pos += len;
            let samples = m.step(&StepPlan { step_id: step_id as u64, chunks: plan_chunks }).unwrap();
            if let Some(s) = samples.iter().find(|s| s.seq_id == 7) {
                let t = lockstep_kernels::merge_shard_samples(&[&s.sample], &s.request);
                out.push((t.id, t.logprob.to_bits()));
                tokens.push(t.id);
            }
        }
        for step in 1..=6u64 {
            let chunk = SeqChunk {
                seq_id: 7,
                tokens: vec![*tokens.last().unwrap()],
                first_pos: (tokens.len() - 1) as u32,
                block_table: vec![0, 1, 2, 3],
                sample: greedy(step),
            };
            let s = &m.step(&StepPlan { step_id: 100 + step, chunks: vec![chunk] }).unwrap()[0];
            let t = lockstep_kernels::merge_shard_samples(&[&s.sample], &s.request);
            out.push((t.id, t.logprob.to_bits()));
            tokens.push(t.id);
        }
        out
    };
    let whole = run(&[21], false);
    assert_eq!(whole.len(), 7);
    assert_eq!(run(&[21], true), whole, "batched with another sequence");
    assert_eq!(run(&[5, 9, 7], false), whole, "prefill in chunks of 5, 9, 7");
    assert_eq!(run(&[1, 16, 4], true), whole, "prefill in chunks of 1, 16, 4, batched");
    let _ = std::fs::remove_dir_all(&dir);
}
