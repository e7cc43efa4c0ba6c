//! GGUF loading: the real stories260K GGUF against its Hugging Face twin, and small generated
//! files (written with candle's GGUF writer) for dequantization, the RoPE permutation and every
//! kind of bad file.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;
use crate::source::WeightStore;
use crate::weights::tests::TempDir;
use crate::weights::SafetensorsRepo;

const HIDDEN: usize = 32;
const HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const VOCAB: usize = 8;

fn f32_tensor(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> QTensor {
    let values: Vec<f32> = (0..rows * cols).map(|i| f(i / cols, i % cols)).collect();
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

fn quantized(rows: usize, cols: usize, dtype: GgmlDType) -> QTensor {
    let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// The metadata of a one-layer Llama with `HEADS` heads of `HEAD_DIM`, `arch` and `extra` keys.
fn metadata(arch: &str) -> Vec<(String, Value)> {
    let u = |n: usize| Value::U32(n as u32);
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.embedding_length"), u(HIDDEN)),
        (format!("{arch}.feed_forward_length"), u(64)),
        (format!("{arch}.block_count"), u(1)),
        (format!("{arch}.attention.head_count"), u(HEADS)),
        (format!("{arch}.attention.head_count_kv"), u(HEADS)),
        (format!("{arch}.context_length"), u(128)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(["a", "b", "c", "ab", "abc", "<s>", "</s>", "x"].map(|t| Value::String(t.into())).to_vec()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(["a b", "ab c"].map(|t| Value::String(t.into())).to_vec())),
    ]
}

fn write(path: &Path, meta: &[(String, Value)], tensors: &[(&str, QTensor)]) {
    let mut f = std::fs::File::create(path).unwrap();
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut f, &meta, &tensors).unwrap();
}

/// A valid tiny model file: embedding, an F32 q_proj whose row r holds r, a Q8_0 k_proj, a Q4_1
/// v_proj (both kept in their blocks) and a Q5_0 o_proj (dequantized at load).
fn tiny(dir: &Path, name: &str, arch: &str) -> PathBuf {
    let path = dir.join(name);
    write(
        &path,
        &metadata(arch),
        &[
            ("token_embd.weight", f32_tensor(VOCAB, HIDDEN, |r, c| (r * HIDDEN + c) as f32)),
            ("blk.0.attn_q.weight", f32_tensor(HEADS * HEAD_DIM, HIDDEN, |r, _| r as f32)),
            ("blk.0.attn_k.weight", quantized(HEADS * HEAD_DIM, HIDDEN, GgmlDType::Q8_0)),
            ("blk.0.attn_v.weight", quantized(HEADS * HEAD_DIM, HIDDEN, GgmlDType::Q4_1)),
            ("blk.0.attn_output.weight", quantized(HIDDEN, HEADS * HEAD_DIM, GgmlDType::Q5_0)),
        ],
    );
    path
}

fn err<T>(r: Result<T>) -> LoadError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn stories260k_gguf_tensors_equal_the_hf_safetensors_bitwise() {
    let Some(gguf_path) = lockstep_test_env::shared_model("stories260K/stories260K.gguf") else { return };
    let Some(hf_dir) = lockstep_test_env::stories260k() else { return };
    let hf_cfg = ModelConfig::from_dir(&hf_dir).unwrap();
    let cfg = crate::source::load_config(&gguf_path).unwrap();
    assert_eq!(cfg.arch, Architecture::Llama);
    let shape = |c: &ModelConfig| {
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    };
    assert_eq!(shape(&cfg), shape(&hf_cfg));
    assert_eq!((cfg.head_dim, cfg.vocab_size, cfg.rope_theta), (hf_cfg.head_dim, hf_cfg.vocab_size, hf_cfg.rope_theta));
    assert_eq!(cfg.rms_norm_eps as f32, hf_cfg.rms_norm_eps as f32);
    assert_eq!((cfg.bos_token_id, cfg.eos_token_ids.clone()), (Some(1), vec![2]));
    // The GGUF stores `output.weight` as a copy of the embedding.
    assert!(!cfg.tie_word_embeddings);

    let hf = SafetensorsRepo::open(&hf_dir).unwrap();
    let store = WeightStore::open(&gguf_path).unwrap();
    assert_eq!(store.dtypes().unwrap(), vec![DType::F32]);
    let mut compared = 0;
    for name in hf.tensor_names() {
        let (a, b) = (hf.get(name).unwrap(), store.get(name).unwrap());
        assert_eq!((a.dtype, a.rows, a.cols), (b.dtype, b.rows, b.cols), "{name}");
        // q/k rows were un-permuted back to the rotate-half layout of the HF conversion.
        assert!(a.bytes.as_slice() == b.bytes.as_slice(), "{name} differs");
        assert_eq!(store.shape(name).unwrap(), hf.info(name).unwrap().shape, "{name}");
        compared += 1;
    }
    assert_eq!(compared, 47);
    let lm_head = store.get("lm_head.weight").unwrap();
    assert!(lm_head.bytes.as_slice() == hf.get("model.embed_tokens.weight").unwrap().bytes.as_slice());
    // Shards slice the same bytes.
    let rows = store.get_rows("model.layers.1.self_attn.k_proj.weight", 8..24).unwrap();
    assert!(
        rows.bytes.as_slice() == hf.get_rows("model.layers.1.self_attn.k_proj.weight", 8..24).unwrap().bytes.as_slice()
    );
    let cols = store.get_cols("model.layers.1.mlp.down_proj.weight", 86..172).unwrap();
    assert!(
        cols.bytes.as_slice() == hf.get_cols("model.layers.1.mlp.down_proj.weight", 86..172).unwrap().bytes.as_slice()
    );

    let tok = GgufFile::open(&gguf_path).unwrap().tokenizer().unwrap();
    assert_eq!(tok.kind, GgufTokenizerKind::Llama);
    assert_eq!((tok.tokens.len(), tok.bos_token_id, tok.eos_token_id), (512, Some(1), Some(2)));
    assert_eq!(tok.scores.as_ref().unwrap()[300], -41.0);
}

/// Q8_0 and Q4_1 stay in their blocks and widen (in the kernels' one formula) to exactly candle's
/// dequantization; a type the kernels do not keep (Q5_0) is candle's dequantization rounded to
/// bf16 at load.
#[test]
fn quantized_tensors_are_candles_dequantization_kept_or_rounded_to_bf16_and_rope_rows_are_unpermuted() {
    let tmp = TempDir::new("gguf-tiny");
    let path = tiny(tmp.path(), "tiny.gguf", "llama");
    let m = GgufModel::open(&path).unwrap();
    assert_eq!(m.dtypes().unwrap(), vec![DType::F32, DType::Bf16, DType::Q8_0, DType::Q4_1]);
    let to_bf16 = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    for (hf, dtype, kept, rows, cols) in [
        ("model.layers.0.self_attn.v_proj.weight", GgmlDType::Q4_1, DType::Q4_1, HEADS * HEAD_DIM, HIDDEN),
        ("model.layers.0.self_attn.k_proj.weight", GgmlDType::Q8_0, DType::Q8_0, HEADS * HEAD_DIM, HIDDEN),
        ("model.layers.0.self_attn.o_proj.weight", GgmlDType::Q5_0, DType::Bf16, HIDDEN, HEADS * HEAD_DIM),
    ] {
        let reference: Vec<f32> =
            quantized(rows, cols, dtype).dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let w = m.get(hf).unwrap();
        assert_eq!((w.dtype, w.rows, w.cols), (kept, rows, cols), "{hf}");
        let got = w.view().to_f32();
        let want = if kept == DType::Bf16 { to_bf16(&reference) } else { reference };
        if hf.contains("k_proj") {
            // k_proj is permuted too: row-wise it holds the same rows in HF order.
            let bytes: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
            let unpermuted = unpermute_heads(&bytes, cols * 4, HEADS, HEAD_DIM);
            let want: Vec<f32> =
                unpermuted.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            assert_eq!(got, want, "{hf}");
        } else {
            assert_eq!(got, want, "{hf}");
        }
    }
    // Stored row h·d + 2i + j is HF row h·d + j·d/2 + i.
    let q = m.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    let rows: Vec<f32> = (0..q.rows).map(|r| q.view().get(r, 0)).collect();
    let half = HEAD_DIM / 2;
    for h in 0..HEADS {
        for i in 0..half {
            for j in 0..2 {
                assert_eq!(rows[h * HEAD_DIM + j * half + i], (h * HEAD_DIM + 2 * i + j) as f32);
            }
        }
    }
    // qwen2 / qwen3 files are not permuted.
    let qwen = GgufModel::open(tiny(tmp.path(), "qwen3.gguf", "qwen3")).unwrap();
    let q = qwen.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert!((0..q.rows).all(|r| q.view().get(r, 0) == r as f32));
    let cfg = qwen.file().config().unwrap();
    assert_eq!((cfg.arch, cfg.qk_norm, cfg.head_dim, cfg.vocab_size), (Architecture::Qwen3, true, HEAD_DIM, VOCAB));
    assert!(cfg.tie_word_embeddings && !cfg.qkv_bias);
}

#[test]
fn a_truncated_gguf_names_the_first_tensor_cut_off() {
    let tmp = TempDir::new("gguf-trunc");
    let path = tiny(tmp.path(), "whole.gguf", "llama");
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 40]).unwrap();
    match err(GgufFile::open(&cut)) {
        LoadError::Truncated { file, name, file_len, .. } => {
            assert_eq!(file, cut);
            assert_eq!(name, "blk.0.attn_output.weight");
            assert_eq!(file_len, bytes.len() as u64 - 40);
        }
        other => panic!("wrong error: {other}"),
    }
    // Cut inside the header: candle's reader says why, with the file named.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let e = err(GgufFile::open(&cut));
    assert!(matches!(e, LoadError::Gguf { .. }) && e.to_string().contains("cut.gguf"), "{e}");
}

#[test]
fn an_unknown_architecture_is_named() {
    let tmp = TempDir::new("gguf-arch");
    let path = tmp.path().join("mamba.gguf");
    write(&path, &metadata("mamba"), &[("token_embd.weight", f32_tensor(VOCAB, HIDDEN, |_, _| 0.0))]);
    let e = err(GgufFile::open(&path).unwrap().config());
    assert!(matches!(&e, LoadError::UnsupportedArchitecture { arch, .. } if arch.contains("mamba")), "{e}");
    assert!(e.to_string().contains("mamba.gguf") && e.to_string().contains("general.architecture"), "{e}");
    // No architecture key at all.
    let meta: Vec<_> = metadata("llama").into_iter().filter(|(k, _)| k != "general.architecture").collect();
    write(&path, &meta, &[("token_embd.weight", f32_tensor(VOCAB, HIDDEN, |_, _| 0.0))]);
    let e = err(GgufFile::open(&path).unwrap().config());
    assert!(matches!(&e, LoadError::MissingKey { key, .. } if key == "general.architecture"), "{e}");
}

#[test]
fn an_unsupported_tensor_type_names_the_tensor() {
    let tmp = TempDir::new("gguf-q81");
    let path = tmp.path().join("q81.gguf");
    // candle cannot build a Q8_1 tensor, so write Q8_0 and retype it in the tensor table:
    // after the name come n_dims (u32), the dims (u64 each) and the type (u32).
    write(
        &path,
        &metadata("llama"),
        &[
            ("blk.0.attn_q.weight", quantized(HEADS * HEAD_DIM, HIDDEN, GgmlDType::Q8_0)),
            ("token_embd.weight", f32_tensor(VOCAB, HIDDEN, |_, _| 0.0)),
        ],
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 2 * 8;
    assert_eq!(bytes[at..at + 4], 8u32.to_le_bytes(), "Q8_0's type id");
    bytes[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let m = GgufModel::open(&path).unwrap();
    for e in [err(m.dtypes()), err(m.get("model.layers.0.self_attn.q_proj.weight"))] {
        match &e {
            LoadError::UnsupportedDType { name, dtype, .. } => {
                assert_eq!(name, "blk.0.attn_q.weight");
                assert!(dtype.contains("Q8_1"), "{dtype}");
            }
            other => panic!("wrong error: {other}"),
        }
    }
    // A tensor that is not there is named by its GGUF name.
    let e = err(m.get("model.layers.0.mlp.up_proj.weight"));
    assert!(matches!(&e, LoadError::MissingTensor { name, .. } if name == "blk.0.ffn_up.weight"), "{e}");
}

#[test]
fn missing_tokenizer_keys_are_named() {
    let tmp = TempDir::new("gguf-tok");
    let path = tmp.path().join("tok.gguf");
    let embd = || f32_tensor(VOCAB, HIDDEN, |_, _| 0.0);
    let without =
        |key: &str| -> Vec<(String, Value)> { metadata("llama").into_iter().filter(|(k, _)| k != key).collect() };
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        write(&path, &without(key), &[("token_embd.weight", embd())]);
        let e = err(GgufFile::open(&path).unwrap().tokenizer());
        assert!(matches!(&e, LoadError::MissingKey { key: k, .. } if k == key), "{key}: {e}");
        assert!(e.to_string().contains(key) && e.to_string().contains("tok.gguf"), "{e}");
    }
    // A SentencePiece tokenizer needs scores.
    let mut meta = without("tokenizer.ggml.model");
    meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    write(&path, &meta, &[("token_embd.weight", embd())]);
    let e = err(GgufFile::open(&path).unwrap().tokenizer());
    assert!(matches!(&e, LoadError::MissingKey { key, .. } if key == "tokenizer.ggml.scores"), "{e}");
    // Mistyped and out-of-range keys.
    let mut meta = metadata("llama");
    meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(99)));
    write(&path, &meta, &[("token_embd.weight", embd())]);
    let e = err(GgufFile::open(&path).unwrap().tokenizer());
    assert!(matches!(&e, LoadError::BadKey { key, .. } if key == "tokenizer.ggml.bos_token_id"), "{e}");
    let mut meta = without("llama.block_count");
    meta.push(("llama.block_count".into(), Value::String("one".into())));
    write(&path, &meta, &[("token_embd.weight", embd())]);
    let e = err(GgufFile::open(&path).unwrap().config());
    assert!(matches!(&e, LoadError::BadKey { key, .. } if key == "llama.block_count"), "{e}");
    let e = err(GgufFile::open(&path).and_then(|f| f.config_json().map(|_| ())));
    assert!(e.to_string().contains("llama.block_count"), "{e}");
}
