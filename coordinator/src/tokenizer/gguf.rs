//! The tokenizer of a GGUF file, built as a `tokenizers` tokenizer from the `tokenizer.ggml.*`
//! keys (read by `lockstep_node::gguf`).
//!
//! It is written as the `tokenizer.json` that Hugging Face's converters produce for the same
//! model, then loaded by `tokenizers`, so encoding and decoding are the library's, not ours:
//!
//! * **`gpt2`** (byte-level BPE: SmolLM, Qwen, Llama 3): the vocabulary and
//!   `tokenizer.ggml.merges`; the pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` name
//!   (`smollm`: single digits then the GPT-2 split; `qwen2` and `llama-bpe`: their split regexes;
//!   anything else: the GPT-2 split); ByteLevel decoding.
//! * **`llama`** (SentencePiece BPE with byte fallback: Llama 2, TinyLlama): the vocabulary, and
//!   merges generated from `tokenizer.ggml.scores` the way transformers' SentencePiece extractor
//!   does (every split of a piece into two pieces of the vocabulary, ordered by the piece's
//!   score); `▁` for spaces, prepended unless `add_space_prefix` is false.
//!
//! Control and unknown tokens (types 3, 2) become special added tokens, user-defined ones
//! (type 4) plain added tokens. BOS is prepended when `add_bos_token` says so (default: yes
//! for `llama`, no for `gpt2`, as in llama.cpp), EOS appended when `add_eos_token` is true.

use std::collections::HashMap;

use lockstep_node::gguf::{GgufTokenizer, GgufTokenizerKind, QWEN2_SPLIT_REGEX};
use serde_json::{json, Value as Json};

use super::{Result, TokenizerError};

const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Build the tokenizer the GGUF metadata describes.
pub(super) fn build(t: &GgufTokenizer) -> Result<tokenizers::Tokenizer> {
    let json = tokenizer_json(t)?;
    tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
        .map_err(|e| TokenizerError::Load { path: t.source.clone(), message: e.to_string() })
}

fn token_type(t: &GgufTokenizer, id: usize) -> i32 {
    t.token_types.as_ref().map_or(1, |types| types[id])
}

fn tokenizer_json(t: &GgufTokenizer) -> Result<Json> {
    let vocab: serde_json::Map<String, Json> =
        t.tokens.iter().enumerate().map(|(id, tok)| (tok.clone(), json!(id))).collect();
    let added: Vec<Json> = (0..t.tokens.len())
        .filter_map(|id| {
            let kind = token_type(t, id);
            let special = kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_UNKNOWN;
            (special || kind == TOKEN_TYPE_USER_DEFINED).then(|| {
                json!({"id": id, "content": t.tokens[id], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": !special, "special": special})
            })
        })
        .collect();
    let token = |id: Option<u32>| id.map(|id| t.tokens[id as usize].clone());
    let (bos, eos) = (token(t.bos_token_id), token(t.eos_token_id));
    let add_bos = t.add_bos_token.unwrap_or(t.kind == GgufTokenizerKind::Llama);
    let add_eos = t.add_eos_token.unwrap_or(false);
    let post_processor =
        template_processor(add_bos.then_some(()).and(bos.as_deref()), add_eos.then_some(()).and(eos.as_deref()), t);
    let missing_special = |key: &'static str| TokenizerError::BadField {
        path: t.source.clone(),
        field: key,
        message: "the tokenizer adds this token but the GGUF names none".into(),
    };
    if add_bos && bos.is_none() {
        return Err(missing_special("tokenizer.ggml.bos_token_id"));
    }
    if add_eos && eos.is_none() {
        return Err(missing_special("tokenizer.ggml.eos_token_id"));
    }
    Ok(match t.kind {
        GgufTokenizerKind::Gpt2 => {
            let merges = t.merges.as_ref().expect("checked when read");
            let byte_level =
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
            let split = |regex: &str| {
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
            };
            let pre_tokenizer = match t.pre.as_deref() {
                Some("smollm") => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level]}),
                Some("qwen2") => split(QWEN2_SPLIT_REGEX),
                Some("llama-bpe" | "llama3") => split(LLAMA3_SPLIT),
                Some(other) if other != "gpt2" && other != "default" => {
                    tracing::warn!(pre = other, file = %t.source.display(), "unknown tokenizer.ggml.pre: using the GPT-2 split");
                    byte_level
                }
                _ => byte_level,
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": pre_tokenizer,
                "post_processor": post_processor.unwrap_or_else(|| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})),
                "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges},
            })
        }
        GgufTokenizerKind::Llama => {
            let scores = t.scores.as_ref().expect("checked when read");
            let merges = sentencepiece_merges(&t.tokens, scores);
            let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
            let prefix = t.add_space_prefix.unwrap_or(true);
            let normalizer = if prefix {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, space]})
            } else {
                space
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let unk = t.unknown_token_id.map(|id| t.tokens[id as usize].clone());
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": normalizer, "pre_tokenizer": null, "post_processor": post_processor,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": merges},
            })
        }
    })
}

/// A `TemplateProcessing` that wraps a sequence in the given BOS / EOS, or `None` for neither.
fn template_processor(bos: Option<&str>, eos: Option<&str>, t: &GgufTokenizer) -> Option<Json> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let special = |tok: &str| json!({"SpecialToken": {"id": tok, "type_id": 0}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = serde_json::Map::new();
    let mut register = |tok: &str, id: Option<u32>| {
        specials.insert(tok.to_string(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
    };
    if let Some(b) = bos {
        single.push(special(b));
        pair.push(special(b));
        register(b, t.bos_token_id);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some(e) = eos {
        single.push(special(e));
        pair.push(special(e));
        register(e, t.eos_token_id);
    }
    if let Some(b) = bos {
        pair.push(special(b));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some(e) = eos {
        pair.push(special(e));
    }
    Some(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}))
}

/// BPE merges for a SentencePiece vocabulary, as transformers' `generate_merges` makes them:
/// every split of a piece into two pieces of the vocabulary (splits of one piece ordered by the
/// ids of the left then the right part), all ordered by the merged piece's score, highest first
/// (ties: shorter left part first, then shorter right part, then the order above).
pub(super) fn sentencepiece_merges(tokens: &[String], scores: &[f32]) -> Vec<String> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str, f32)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    // Python's `sorted(..., key=(score, len(l), len(r)), reverse=True)` is stable: equal keys
    // keep their order, and larger keys come first.
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        (b.2, chars(b.0), chars(b.1)).partial_cmp(&(a.2, chars(a.0), chars(a.1))).unwrap_or(std::cmp::Ordering::Equal)
    });
    merges.into_iter().map(|(l, r, _)| format!("{l} {r}")).collect()
}
