//! Forward-pass tests on the real stories260K model (see `lockstep_test_env` for where it is
//! found and what happens when it is not).

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
