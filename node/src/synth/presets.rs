//! The model shapes synth can write: each preset's hyper-parameters, its tensors in model order
//! with how each is initialised, and the `config.json` / `generation_config.json` a real
//! checkpoint of that model ships (special-token ids at their real places).

use std::collections::HashMap;

use lockstep_kernels::DType;
use serde_json::{json, Value};

use crate::weights::layer_tensor;

/// The model shapes [`synth`](super::synth) can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// A tiny Llama: hidden 128, intermediate 344, 2 layers, 8 heads = 8 KV heads of 16 dims, vocab
    /// 512, untied `lm_head`. `q_dim = 128 = 8 × 16` lanes, so `reduce_segments` is 8 and tensor
    /// parallelism 1/2/4/8 all split it along whole heads and whole segments.
    Tiny,
    /// A tiny Qwen2: hidden 64, intermediate 176, 2 layers, 8 heads, 4 KV heads, vocab 512, tied
    /// embeddings and q/k/v biases (the Qwen2.5 code paths at test size).
    TinyQwen2,
    /// SmolLM2-135M's head layout at test size: hidden 288, intermediate 768, 2 layers, 9 heads,
    /// 3 KV heads of 32 dims, vocab 512, tied embeddings. `q_dim = 288`, so `reduce_segments` is
    /// 6 (the `3·2^k` family) and tensor parallelism 1 and 3 are the degrees it allows.
    TinySmol,
    /// Qwen2.5-0.5B's shapes: hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads,
    /// vocab 151936, tied embeddings, q/k/v biases.
    Qwen25_05b,
    /// Llama-3.2-1B's shapes: hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads,
    /// vocab 128256, tied embeddings, llama3 RoPE scaling.
    Llama32_1b,
    /// A tiny Qwen3: hidden 64, intermediate 176, 2 layers, 4 heads, 2 KV heads of 32 dims
    /// (`q_dim` 128 ≠ hidden, as in Qwen3), vocab 512, tied embeddings, per-head q/k norms.
    TinyQwen3,
    /// Qwen3-0.6B's shapes: hidden 1024, intermediate 3072, 28 layers, 16 heads, 8 KV heads of
    /// 128 dims, vocab 151936, tied embeddings, per-head q/k norms.
    Qwen3_06b,
}

impl Preset {
    pub const ALL: [Preset; 7] = [
        Preset::Tiny,
        Preset::TinyQwen2,
        Preset::TinySmol,
        Preset::Qwen25_05b,
        Preset::Llama32_1b,
        Preset::TinyQwen3,
        Preset::Qwen3_06b,
    ];

    /// The name used on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::TinyQwen2 => "tiny-qwen2",
            Preset::TinySmol => "tiny-smollm2",
            Preset::Qwen25_05b => "qwen2.5-0.5b",
            Preset::Llama32_1b => "llama-3.2-1b",
            Preset::TinyQwen3 => "tiny-qwen3",
            Preset::Qwen3_06b => "qwen3-0.6b",
        }
    }

    pub(super) fn spec(self) -> Spec {
        match self {
            Preset::Tiny => Spec {
                family: Family::Llama,
                hidden: 128,
                intermediate: 344,
                layers: 2,
                heads: 8,
                kv_heads: 8,
                head_dim: 16,
                vocab: 512,
                tied: false,
                rope_theta: 10000.0,
                llama3_rope: false,
                max_pos: 2048,
                eps: 1e-5,
                specials: SpecialSet::Llama3Short,
            },
            Preset::TinyQwen2 => Spec {
                family: Family::Qwen2,
                hidden: 64,
                intermediate: 176,
                layers: 2,
                heads: 8,
                kv_heads: 4,
                head_dim: 8,
                vocab: 512,
                tied: true,
                rope_theta: 1_000_000.0,
                llama3_rope: false,
                max_pos: 4096,
                eps: 1e-6,
                specials: SpecialSet::QwenShort,
            },
            Preset::TinySmol => Spec {
                family: Family::Llama,
                hidden: 288,
                intermediate: 768,
                layers: 2,
                heads: 9,
                kv_heads: 3,
                head_dim: 32,
                vocab: 512,
                tied: true,
                rope_theta: 100000.0,
                llama3_rope: false,
                max_pos: 2048,
                eps: 1e-5,
                specials: SpecialSet::Llama3Short,
            },
            Preset::Qwen25_05b => Spec {
                family: Family::Qwen2,
                hidden: 896,
                intermediate: 4864,
                layers: 24,
                heads: 14,
                kv_heads: 2,
                head_dim: 64,
                vocab: 151936,
                tied: true,
                rope_theta: 1_000_000.0,
                llama3_rope: false,
                max_pos: 32768,
                eps: 1e-6,
                specials: SpecialSet::Qwen,
            },
            Preset::Llama32_1b => Spec {
                family: Family::Llama,
                hidden: 2048,
                intermediate: 8192,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                head_dim: 64,
                vocab: 128256,
                tied: true,
                rope_theta: 500000.0,
                llama3_rope: true,
                max_pos: 131072,
                eps: 1e-5,
                specials: SpecialSet::Llama3,
            },
            Preset::TinyQwen3 => Spec {
                family: Family::Qwen3,
                hidden: 64,
                intermediate: 176,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
                vocab: 512,
                tied: true,
                rope_theta: 1_000_000.0,
                llama3_rope: false,
                max_pos: 4096,
                eps: 1e-6,
                specials: SpecialSet::QwenShort,
            },
            Preset::Qwen3_06b => Spec {
                family: Family::Qwen3,
                hidden: 1024,
                intermediate: 3072,
                layers: 28,
                heads: 16,
                kv_heads: 8,
                head_dim: 128,
                vocab: 151936,
                tied: true,
                rope_theta: 1_000_000.0,
                llama3_rope: false,
                max_pos: 40960,
                eps: 1e-6,
                specials: SpecialSet::Qwen3,
            },
        }
    }

    /// Number of parameters written (the tied `lm_head` counted once).
    pub fn num_params(self) -> u64 {
        self.spec().tensors().iter().map(|t| t.numel() as u64).sum()
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Preset::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!("unknown preset {s:?} (one of {})", names.join(", "))
        })
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

/// Qwen2.5's added tokens in id order from 151643; Qwen3 keeps them and appends four.
const QWEN25_ADDED: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecialSet {
    /// Llama 3's 256 reserved ids at the top of the vocabulary.
    Llama3,
    /// The five Llama 3 tokens a chat needs, at the top of a small vocabulary.
    Llama3Short,
    /// Qwen2.5's 22 added tokens, starting at 151643.
    Qwen,
    /// Qwen3's 26: Qwen2.5's 22, then `<tool_response>`, `</tool_response>`, `<think>`, `</think>`.
    Qwen3,
    /// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` at the top of a small vocabulary.
    QwenShort,
}

pub(super) struct Spec {
    pub(super) family: Family,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    pub(super) vocab: usize,
    tied: bool,
    rope_theta: f64,
    llama3_rope: bool,
    pub(super) max_pos: usize,
    eps: f64,
    specials: SpecialSet,
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
pub(super) enum Init {
    /// `std × N(0, 1)`
    Normal(f32),
    /// `1 + std × N(0, 1)`
    AroundOne(f32),
}

pub(super) struct TensorSpec {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) init: Init,
}

impl TensorSpec {
    pub(super) fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Spec {
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Every tensor in model order (the order they are written in).
    pub(super) fn tensors(&self) -> Vec<TensorSpec> {
        let (h, inter, v) = (self.hidden, self.intermediate, self.vocab);
        let (q, kv) = (self.q_dim(), self.kv_dim());
        let fan_in = |n: usize| Init::Normal(1.0 / (n as f32).sqrt());
        let norm = Init::AroundOne(0.05);
        let bias = Init::Normal(0.1);
        let t = |name: String, shape: Vec<usize>, init: Init| TensorSpec { name, shape, init };
        let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, h], fan_in(h))];
        for i in 0..self.layers {
            let l = |s: &str| layer_tensor(i, s);
            out.push(t(l("input_layernorm.weight"), vec![h], norm));
            out.push(t(l("self_attn.q_proj.weight"), vec![q, h], fan_in(h)));
            out.push(t(l("self_attn.k_proj.weight"), vec![kv, h], fan_in(h)));
            out.push(t(l("self_attn.v_proj.weight"), vec![kv, h], fan_in(h)));
            if self.family == Family::Qwen2 {
                out.push(t(l("self_attn.q_proj.bias"), vec![q], bias));
                out.push(t(l("self_attn.k_proj.bias"), vec![kv], bias));
                out.push(t(l("self_attn.v_proj.bias"), vec![kv], bias));
            }
            if self.family == Family::Qwen3 {
                out.push(t(l("self_attn.q_norm.weight"), vec![self.head_dim], norm));
                out.push(t(l("self_attn.k_norm.weight"), vec![self.head_dim], norm));
            }
            out.push(t(l("self_attn.o_proj.weight"), vec![h, q], fan_in(q)));
            out.push(t(l("post_attention_layernorm.weight"), vec![h], norm));
            out.push(t(l("mlp.gate_proj.weight"), vec![inter, h], fan_in(h)));
            out.push(t(l("mlp.up_proj.weight"), vec![inter, h], fan_in(h)));
            out.push(t(l("mlp.down_proj.weight"), vec![h, inter], fan_in(inter)));
        }
        out.push(t("model.norm.weight".into(), vec![h], norm));
        if !self.tied {
            out.push(t("lm_head.weight".into(), vec![v, h], fan_in(h)));
        }
        out
    }

    pub(super) fn config_json(&self, dtype: DType) -> Value {
        let torch_dtype = match dtype {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
            // synth writes safetensors; `synth_with` refuses block types before writing anything.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => unreachable!("synth writes element types only"),
        };
        let specials = self.special_tokens();
        let id = |name: &str| specials.iter().find(|(_, n)| n == name).map(|(i, _)| *i).expect("special token");
        let mut c = json!({
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_pos,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tied,
            "torch_dtype": torch_dtype,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": true,
        });
        let extra = match self.family {
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "head_dim": self.head_dim,
                "attention_bias": false,
                "mlp_bias": false,
                "pretraining_tp": 1,
                "bos_token_id": id("<|begin_of_text|>"),
                "eos_token_id": self.eos_ids(),
                "rope_scaling": if self.llama3_rope {
                    json!({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"})
                } else {
                    Value::Null
                },
            }),
            Family::Qwen2 => json!({
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "bos_token_id": id("<|endoftext|>"),
                "eos_token_id": id("<|im_end|>"),
                "max_window_layers": self.layers,
                "sliding_window": self.max_pos,
                "use_sliding_window": false,
                "rope_scaling": Value::Null,
            }),
            Family::Qwen3 => json!({
                "architectures": ["Qwen3ForCausalLM"],
                "model_type": "qwen3",
                "head_dim": self.head_dim,
                "attention_bias": false,
                "bos_token_id": id("<|endoftext|>"),
                "eos_token_id": id("<|im_end|>"),
                "max_window_layers": self.layers,
                "sliding_window": Value::Null,
                "use_sliding_window": false,
                "rope_scaling": Value::Null,
            }),
        };
        let obj = c.as_object_mut().expect("object");
        obj.extend(extra.as_object().expect("object").clone());
        c
    }

    /// Token ids that end generation.
    fn eos_ids(&self) -> Vec<u32> {
        let specials = self.special_tokens();
        let names: &[&str] = match self.family {
            Family::Llama => &["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
            Family::Qwen2 | Family::Qwen3 => &["<|im_end|>", "<|endoftext|>"],
        };
        names.iter().filter_map(|n| specials.iter().find(|(_, s)| s == n).map(|(i, _)| *i)).collect()
    }

    pub(super) fn generation_config(&self) -> Value {
        let specials = self.special_tokens();
        let bos = match self.family {
            Family::Llama => "<|begin_of_text|>",
            Family::Qwen2 | Family::Qwen3 => "<|endoftext|>",
        };
        let bos = specials.iter().find(|(_, s)| s == bos).map(|(i, _)| *i);
        json!({"bos_token_id": bos, "eos_token_id": self.eos_ids(), "do_sample": false})
    }

    /// `(id, content)` of every added special token; ids are the top of the tokenizer's range.
    pub(super) fn special_tokens(&self) -> Vec<(u32, String)> {
        let from = |first: u32, names: &[&str]| -> Vec<(u32, String)> {
            names.iter().enumerate().map(|(i, n)| (first + i as u32, n.to_string())).collect()
        };
        match self.specials {
            SpecialSet::Llama3 => {
                // Llama 3's layout: 128000.. with named tokens among numbered reserved ones.
                let named: HashMap<u32, &str> = [
                    (128000, "<|begin_of_text|>"),
                    (128001, "<|end_of_text|>"),
                    (128004, "<|finetune_right_pad_id|>"),
                    (128006, "<|start_header_id|>"),
                    (128007, "<|end_header_id|>"),
                    (128008, "<|eom_id|>"),
                    (128009, "<|eot_id|>"),
                    (128010, "<|python_tag|>"),
                ]
                .into_iter()
                .collect();
                let mut reserved = 0;
                (128000..128256u32)
                    .map(|id| match named.get(&id) {
                        Some(n) => (id, n.to_string()),
                        None => {
                            reserved += 1;
                            (id, format!("<|reserved_special_token_{}|>", reserved - 1))
                        }
                    })
                    .collect()
            }
            SpecialSet::Llama3Short => from(
                self.vocab as u32 - 5,
                &["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            ),
            SpecialSet::Qwen => from(151643, QWEN25_ADDED),
            SpecialSet::Qwen3 => {
                let mut names = QWEN25_ADDED.to_vec();
                names.extend(["<tool_response>", "</tool_response>", "<think>", "</think>"]);
                from(151643, &names)
            }
            SpecialSet::QwenShort => from(self.vocab as u32 - 3, &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::pretty_sorted_json;
    use crate::config::{Architecture, ModelConfig};
    use crate::weights::tests::TempDir;
    use lockstep_kernels::RopeScaling;

    #[test]
    fn presets_parse_back_with_real_configs() {
        let dir = TempDir::new("synth-configs");
        for p in Preset::ALL {
            let spec = p.spec();
            let path = dir.path().join(format!("{}.json", p.name()));
            std::fs::write(&path, pretty_sorted_json(&spec.config_json(DType::Bf16))).unwrap();
            let c = ModelConfig::from_file(&path).unwrap();
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
            assert_eq!(c.declared_dtype(), Some(DType::Bf16));
            assert!(c.vocab_size > spec.special_tokens().last().unwrap().0 as usize);
            match p {
                Preset::Qwen25_05b => {
                    assert_eq!(c.arch, Architecture::Qwen2);
                    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (896, 4864, 24));
                    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (14, 2, 64));
                    assert_eq!((c.vocab_size, c.max_position_embeddings), (151936, 32768));
                    assert!(c.tie_word_embeddings && c.qkv_bias && !c.o_bias);
                    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6));
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(151643), vec![151645]));
                    // ~494M parameters, like the real model.
                    assert_eq!(p.num_params(), 494_032_768);
                }
                Preset::Llama32_1b => {
                    assert_eq!(c.arch, Architecture::Llama);
                    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (2048, 8192, 16));
                    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (32, 8, 64));
                    assert_eq!((c.vocab_size, c.max_position_embeddings), (128256, 131072));
                    assert!(c.tie_word_embeddings && !c.qkv_bias);
                    assert_eq!((c.rope_theta, c.rms_norm_eps), (500000.0, 1e-5));
                    assert_eq!(
                        c.rope_scaling,
                        Some(RopeScaling::Llama3 {
                            factor: 32.0,
                            low_freq_factor: 1.0,
                            high_freq_factor: 4.0,
                            original_max_position_embeddings: 8192.0
                        })
                    );
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(128000), vec![128001, 128008, 128009]));
                    assert_eq!(p.num_params(), 1_235_814_400);
                }
                Preset::Tiny => {
                    assert_eq!(
                        (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size),
                        (8, 8, 16, 128)
                    );
                    assert!(!c.tie_word_embeddings);
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(507), vec![508, 511]));
                }
                Preset::TinySmol => {
                    assert_eq!(
                        (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size),
                        (9, 3, 32, 288)
                    );
                    assert!(c.tie_word_embeddings);
                    assert_eq!(crate::shard::auto_reduce_segments(&c), 6);
                }
                Preset::TinyQwen2 => {
                    assert_eq!(c.arch, Architecture::Qwen2);
                    assert!(c.tie_word_embeddings && c.qkv_bias);
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(509), vec![511]));
                }
                Preset::TinyQwen3 => {
                    assert_eq!(c.arch, Architecture::Qwen3);
                    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (4, 2, 32));
                    assert_eq!((c.q_dim(), c.hidden_size), (128, 64));
                    assert!(c.tie_word_embeddings && c.qk_norm && !c.qkv_bias && !c.o_bias);
                }
                Preset::Qwen3_06b => {
                    assert_eq!(c.arch, Architecture::Qwen3);
                    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (1024, 3072, 28));
                    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (16, 8, 128));
                    assert_eq!((c.vocab_size, c.max_position_embeddings), (151936, 40960));
                    assert!(c.tie_word_embeddings && c.qk_norm && !c.qkv_bias);
                    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6));
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(151643), vec![151645]));
                    // ~596M parameters, like the real model (0.44B without the embedding).
                    assert_eq!(p.num_params(), 596_049_920);
                }
            }
        }
    }
}
