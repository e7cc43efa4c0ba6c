//! The tokenizer synth writes: a working byte-level BPE `tokenizer.json` (GPT-2 byte alphabet,
//! merges learned from a small built-in English text, padded with pseudo-word merges up to the
//! real vocabulary size, the real special tokens at their real ids) and a `tokenizer_config.json`
//! with the model family's chat template. It does not depend on the weights seed.
//!
//! The pre-tokenizer is the family's: GPT-2's split for Llama, Qwen2's split regex for Qwen2 and
//! Qwen3 (llama.cpp's `qwen2`), so that a GGUF converted from a synthetic Qwen model tokenizes text
//! in llama.cpp as it does here. llama.cpp's `convert_hf_to_gguf.py` still cannot name it by
//! itself: it recognises a pre-tokenizer by hashing the token ids of a test string, and those ids
//! depend on the vocabulary, which is synthetic; `bench/peers/convert_synth.py` tells it `qwen2`.

use std::collections::HashMap;

use lockstep_kernels::splitmix::SplitMix64;
use serde_json::{json, Value};

use super::presets::{Family, Spec};
use crate::gguf::QWEN2_SPLIT_REGEX;

/// Original English text the BPE merges are learned from (written for this purpose).
const CORPUS: &str = "\
Once upon a time, in a small town near the river, there lived a baker who got up before the sun \
every morning. She made bread, cakes and cookies for the people of the town, and everyone said \
that her bread was the best in the whole country. The children would stop at the window on their \
way to school and look at the sweet things inside. One day a little boy named Tom came into the \
shop with his sister. They had only one coin between them, but they wanted to buy something for \
their mother, who was not feeling well.
\"What can we get for this?\" asked Tom. The baker looked at the coin and then at the two \
children. She smiled and said, \"For you, I think this coin is enough for the biggest cake in \
the shop.\" The children were so happy that they ran all the way home, holding the cake between \
them like a treasure. Their mother laughed when she saw it, and she felt better that very day.
The next morning, the children came back with flowers from their garden. They gave them to the \
baker and thanked her again. From then on, they were good friends, and the children often helped \
in the shop after school. They learned how to make bread, how to mix the flour and the water, and \
how long to wait for the dough to rise. Years later, when the baker was old, Tom and his sister \
took over the shop, and they always kept one cake for any child who came in with only one coin.
This is a simple story, but it shows something important about people and the world we live in. \
Small acts of kindness can change the life of another person in ways we cannot see at first. \
The time we spend helping others is never lost. When you think about your own day, you may find \
that there are many chances to be kind: to listen, to share, to say thank you, or to help someone \
who has a problem. These things do not cost much, but they make the world a better place for \
everyone.
Learning is also part of a good life. We read books, we ask questions, and we try new things. \
Some of them work and some of them do not, and that is how we grow. A scientist tests an idea many \
times before she believes it. A student writes and rewrites an answer until it is clear. A team \
of engineers builds a system, measures it, and then makes it faster and more reliable. The same \
request should always give the same answer, and a good system should explain what it does and why.
In 2024 and 2025 there were 12 months in each year, 365 or 366 days, and 24 hours in every day. \
The numbers 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 are the first ten counting numbers. Water boils at \
100 degrees and freezes at 0 degrees. These facts are the same for everyone, everywhere.
";

/// GPT-2's byte → printable character map used by byte-level BPE.
fn byte_to_char() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("in range")
        };
    }
    map
}

/// Split text roughly like GPT-2's pre-tokenizer regex: a word, number or punctuation run with
/// at most one leading space, or a run of whitespace. (Only used to learn merges; the real
/// pre-tokenization is done by the `ByteLevel` pre-tokenizer the tokenizer file declares.)
fn pretokenize(text: &str) -> Vec<&str> {
    #[derive(PartialEq)]
    enum Class {
        Letter,
        Digit,
        Other,
        Space,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Digit
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    };
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = chars[i].0;
        let mut j = i;
        if chars[i].1 == ' ' && i + 1 < chars.len() && class(chars[i + 1].1) != Class::Space {
            j += 1;
        }
        let c = class(chars[j].1);
        let mut k = j + 1;
        while k < chars.len() && class(chars[k].1) == c {
            k += 1;
        }
        // A whitespace run gives its last space to the following word.
        if c == Class::Space && k < chars.len() && k - j > 1 && chars[k - 1].1 == ' ' {
            k -= 1;
        }
        let end = chars.get(k).map_or(text.len(), |c| c.0);
        pieces.push(&text[start..end]);
        i = k;
    }
    pieces
}

/// The tokenizer's regular vocabulary (byte tokens + merge results) and its merges.
pub(super) struct TokenizerSpec {
    tokens: Vec<String>,
    merges: Vec<(u32, u32)>,
    specials: Vec<(u32, String)>,
}

impl TokenizerSpec {
    pub(super) fn build(spec: &Spec) -> Self {
        let specials = spec.special_tokens();
        let regular = specials.iter().map(|(id, _)| *id as usize).min().expect("specials");
        let mut tokens: Vec<String> = byte_to_char().iter().map(|c| c.to_string()).collect();
        let mut ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut merges = Vec::new();
        learn_merges(&mut tokens, &mut ids, &mut merges, regular);
        pad_with_pseudo_words(&mut tokens, &mut ids, &mut merges, regular);
        TokenizerSpec { tokens, merges, specials }
    }

    pub(super) fn tokenizer_json(&self, spec: &Spec) -> String {
        let s = |x: &str| Value::String(x.to_string()).to_string();
        let added: Vec<String> = self
            .specials
            .iter()
            .map(|(id, content)| {
                format!(
                    r#"    {{"id": {id}, "content": {}, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": {}}}"#,
                    s(content),
                    is_special(content)
                )
            })
            .collect();
        let pre_tokenizer = match spec.family {
            Family::Llama => {
                r#"{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}"#
                    .to_string()
            }
            // Qwen's own split, as in Qwen2.5's tokenizer.json, so that llama.cpp's `qwen2`
            // pre-tokenizer (named in a converted GGUF) splits text as lockstep does.
            Family::Qwen2 | Family::Qwen3 => format!(
                r#"{{"type": "Sequence", "pretokenizers": [{{"type": "Split", "pattern": {{"Regex": {}}}, "behavior": "Isolated", "invert": false}}, {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}}]}}"#,
                s(QWEN2_SPLIT_REGEX)
            ),
        };
        let post = match spec.family {
            // Llama 3 prepends <|begin_of_text|> to every encoding with special tokens on.
            Family::Llama => {
                let (bos_id, bos) = self.specials.iter().find(|(_, n)| n == "<|begin_of_text|>").expect("bos");
                let b = s(bos);
                format!(
                    r#"{{"type": "Sequence", "processors": [{{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}}, {{"type": "TemplateProcessing", "single": [{{"SpecialToken": {{"id": {b}, "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}], "pair": [{{"SpecialToken": {{"id": {b}, "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": {b}, "type_id": 1}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}], "special_tokens": {{{b}: {{"id": {b}, "ids": [{bos_id}], "tokens": [{b}]}}}}}}]}}"#
                )
            }
            Family::Qwen2 | Family::Qwen3 => {
                r#"{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}"#
                    .to_string()
            }
        };
        let mut out = String::with_capacity(self.tokens.len() * 40);
        out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n");
        out.push_str(&format!("  \"added_tokens\": [\n{}\n  ],\n", added.join(",\n")));
        out.push_str("  \"normalizer\": null,\n");
        out.push_str(&format!("  \"pre_tokenizer\": {pre_tokenizer},\n"));
        out.push_str(&format!("  \"post_processor\": {post},\n"));
        out.push_str(
            "  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true},\n",
        );
        out.push_str(
            "  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n    \
             \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \"fuse_unk\": false,\n    \
             \"byte_fallback\": false,\n    \"ignore_merges\": false,\n    \"vocab\": {\n",
        );
        for (i, t) in self.tokens.iter().enumerate() {
            let sep = if i + 1 < self.tokens.len() { "," } else { "" };
            out.push_str(&format!("      {}: {i}{sep}\n", s(t)));
        }
        out.push_str("    },\n    \"merges\": [\n");
        for (i, (a, b)) in self.merges.iter().enumerate() {
            let sep = if i + 1 < self.merges.len() { "," } else { "" };
            let m = format!("{} {}", self.tokens[*a as usize], self.tokens[*b as usize]);
            out.push_str(&format!("      {}{sep}\n", s(&m)));
        }
        out.push_str("    ]\n  }\n}\n");
        out
    }

    pub(super) fn tokenizer_config(&self, spec: &Spec) -> Value {
        let mut decoder = serde_json::Map::new();
        for (id, content) in &self.specials {
            decoder.insert(
                id.to_string(),
                json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": is_special(content)}),
            );
        }
        let (bos, eos, pad, template) = match spec.family {
            Family::Llama => (Value::from("<|begin_of_text|>"), "<|eot_id|>", Value::Null, LLAMA3_CHAT_TEMPLATE),
            Family::Qwen2 | Family::Qwen3 => (Value::Null, "<|im_end|>", Value::from("<|endoftext|>"), CHATML_TEMPLATE),
        };
        json!({
            "added_tokens_decoder": decoder,
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "chat_template": template,
            "clean_up_tokenization_spaces": false,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": spec.max_pos,
            "tokenizer_class": "PreTrainedTokenizerFast",
        })
    }
}

/// Llama 3's chat format (without the date/tools preamble of the official template).
const LLAMA3_CHAT_TEMPLATE: &str = "{{- bos_token }}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// Qwen2.5's ChatML format with its default system message (without the tools branch).
const CHATML_TEMPLATE: &str = "\
{%- if messages | length == 0 or messages[0]['role'] != 'system' %}\
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\
{%- endif %}\
{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Plain BPE training on [`CORPUS`]: repeatedly merge the most frequent adjacent pair (ties to
/// the lowest ids) until `limit` tokens exist or no pair occurs twice.
fn learn_merges(tokens: &mut Vec<String>, ids: &mut HashMap<String, u32>, merges: &mut Vec<(u32, u32)>, limit: usize) {
    let chars = byte_to_char();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for piece in pretokenize(CORPUS) {
        *counts.entry(piece).or_default() += 1;
    }
    let mut words: Vec<(Vec<u32>, usize)> = counts
        .into_iter()
        .map(|(w, n)| (w.bytes().map(|b| ids[&chars[b as usize].to_string()]).collect(), n))
        .collect();
    words.sort();
    while tokens.len() < limit {
        let mut pairs: HashMap<(u32, u32), usize> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += n;
            }
        }
        // Highest count, then lowest pair: a total order, so HashMap iteration order is moot.
        let Some((&(a, b), &n)) = pairs.iter().max_by_key(|(p, n)| (**n, std::cmp::Reverse(**p))) else {
            break;
        };
        if n < 2 {
            break;
        }
        let merged = format!("{}{}", tokens[a as usize], tokens[b as usize]);
        let new = *ids.entry(merged.clone()).or_insert_with(|| {
            tokens.push(merged);
            tokens.len() as u32 - 1
        });
        merges.push((a, b));
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(new);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
}

/// Fill the vocabulary up to `limit` with pseudo-words, each the merge of an existing word-like
/// token and a short letter token, so that every id of a random model decodes to text and every
/// vocabulary entry stays reachable by merges (a valid BPE, as real tokenizers are).
fn pad_with_pseudo_words(
    tokens: &mut Vec<String>,
    ids: &mut HashMap<String, u32>,
    merges: &mut Vec<(u32, u32)>,
    limit: usize,
) {
    let space = byte_to_char()[b' ' as usize];
    let letters = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphabetic());
    let word_like = |s: &str| letters(s.strip_prefix(space).unwrap_or(s));
    let mut stems: Vec<u32> = (0..tokens.len() as u32).filter(|&i| word_like(&tokens[i as usize])).collect();
    let suffixes: Vec<u32> =
        (0..tokens.len() as u32).filter(|&i| letters(&tokens[i as usize]) && tokens[i as usize].len() <= 4).collect();
    // Fixed key: the tokenizer is the same for every weights seed.
    let mut rng = SplitMix64::new(0x746f_6b65_6e69_7a65);
    while tokens.len() < limit {
        let a = stems[rng.below(stems.len())];
        let b = suffixes[rng.below(suffixes.len())];
        let merged = format!("{}{}", tokens[a as usize], tokens[b as usize]);
        if merged.chars().count() > 16 || ids.contains_key(&merged) {
            continue;
        }
        let id = tokens.len() as u32;
        ids.insert(merged.clone(), id);
        tokens.push(merged);
        merges.push((a, b));
        stems.push(id);
    }
}

/// Whether an added token is *special* (dropped when decoding with special tokens skipped). As in
/// Qwen's own tokenizers, the tool-call, fill-in-the-middle, repository and thinking markers are
/// added tokens that stay in decoded text (a Qwen3 answer shows its `<think>` block); every other
/// added token (all of Llama 3's) is special.
fn is_special(content: &str) -> bool {
    const KEPT_IN_TEXT: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ];
    !KEPT_IN_TEXT.contains(&content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{synth, Preset};
    use crate::weights::tests::TempDir;
    use lockstep_kernels::DType;
    use std::path::Path;

    #[test]
    fn pretokenize_keeps_every_byte() {
        let text = "Hello,  world!  It's 2025.\n\n  Done";
        let pieces = pretokenize(text);
        assert_eq!(pieces.concat(), text);
        assert_eq!(&pieces[..4], &["Hello", ",", " ", " world"]);
    }

    fn load_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
    }

    fn check_round_trip(tok: &tokenizers::Tokenizer, text: &str) -> usize {
        let enc = tok.encode(text, false).unwrap();
        let decoded = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(decoded, text);
        enc.get_ids().len()
    }

    #[test]
    fn tiny_tokenizers_load_and_round_trip() {
        for p in [Preset::Tiny, Preset::TinyQwen2] {
            let dir = TempDir::new("synth-tok");
            synth(p, 1, DType::F32, dir.path()).unwrap();
            let tok = load_tokenizer(dir.path());
            assert_eq!(tok.get_vocab_size(true), 512, "{p}");
            let text = "Once upon a time, there was a little girl who loved to read books.";
            let n = check_round_trip(&tok, text);
            assert!(n * 2 < text.len(), "{p}: {n} tokens for {} bytes", text.len());
            for t in ["naïve café, 日本語 🎉\n\ttabs  and   spaces", "", " ", "x", "\u{0}\u{7f}"] {
                check_round_trip(&tok, t);
            }
            let config: Value =
                serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap()).unwrap();
            let eos = config["eos_token"].as_str().unwrap();
            let eos_id = tok.token_to_id(eos).unwrap();
            let enc = tok.encode(format!("hi{eos}"), false).unwrap();
            assert_eq!(enc.get_ids().last(), Some(&eos_id), "{p}: special tokens are single ids");
            let with_special = tok.encode("hi", true).unwrap();
            match p {
                Preset::Tiny => assert_eq!(with_special.get_ids()[0], 507, "BOS is prepended"),
                _ => assert_eq!(with_special.get_ids(), tok.encode("hi", false).unwrap().get_ids()),
            }
            // Every id decodes (random models emit any id).
            for id in 0..512u32 {
                assert!(tok.id_to_token(id).is_some(), "{p}: id {id}");
            }
        }
    }

    /// The pieces the tokenizer's pre-tokenizer cuts `text` into (byte-level alphabet).
    fn pre_tokens(tok: &tokenizers::Tokenizer, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut pre = PreTokenizedString::from(text);
        tok.get_pre_tokenizer().expect("pre-tokenizer").pre_tokenize(&mut pre).unwrap();
        pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    #[test]
    fn qwen_tokenizers_split_like_llama_cpp_qwen2() {
        let text = "In 2024 (normal) it's\n\n";
        for p in [Preset::TinyQwen2, Preset::TinyQwen3] {
            let dir = TempDir::new("synth-qwen-split");
            synth(p, 1, DType::F32, dir.path()).unwrap();
            let tok = load_tokenizer(dir.path());
            // Digits alone, a space before a digit alone, punctuation keeps its space.
            let want = ["In", "Ġ", "2", "0", "2", "4", "Ġ(", "normal", ")", "Ġit", "'s", "ĊĊ"];
            assert_eq!(pre_tokens(&tok, text), want, "{p}");
            check_round_trip(&tok, text);
        }
        let dir = TempDir::new("synth-llama-split");
        synth(Preset::Tiny, 1, DType::F32, dir.path()).unwrap();
        let want = ["In", "Ġ2024", "Ġ(", "normal", ")", "Ġit", "'s", "ĊĊ"];
        assert_eq!(pre_tokens(&load_tokenizer(dir.path()), text), want, "GPT-2's split for Llama");
    }

    #[test]
    fn full_size_tokenizers_fill_the_vocabulary() {
        for (p, first_special, last) in [(Preset::Qwen25_05b, 151643, 151664), (Preset::Llama32_1b, 128000, 128255)] {
            let spec = p.spec();
            let tok_spec = TokenizerSpec::build(&spec);
            assert_eq!(tok_spec.tokens.len(), first_special as usize);
            let dir = TempDir::new("synth-bigtok");
            std::fs::write(dir.path().join("tokenizer.json"), tok_spec.tokenizer_json(&spec)).unwrap();
            let tok = load_tokenizer(dir.path());
            assert_eq!(tok.get_vocab_size(true), last as usize + 1);
            assert!(tok.get_vocab_size(true) <= spec.vocab);
            let text = "The same request should always give the same answer.";
            assert!(check_round_trip(&tok, text) * 3 < text.len());
            assert!(tok.id_to_token(first_special - 1).is_some());
            let decoded = tok.decode(&[1000, 50_000, first_special - 1], false).unwrap();
            assert!(!decoded.is_empty());
        }
        let qwen = Preset::Qwen25_05b.spec().special_tokens();
        assert_eq!(qwen[2], (151645, "<|im_end|>".to_string()));
        let llama = Preset::Llama32_1b.spec().special_tokens();
        assert_eq!(llama[9], (128009, "<|eot_id|>".to_string()));
        assert_eq!(llama[255], (128255, "<|reserved_special_token_247|>".to_string()));
    }

    #[test]
    fn qwen3_has_its_thinking_tokens_and_keeps_them_in_decoded_text() {
        let spec = Preset::Qwen3_06b.spec();
        let specials = spec.special_tokens();
        assert_eq!(specials.len(), 26);
        assert_eq!(specials[22], (151665, "<tool_response>".to_string()));
        assert_eq!(specials[24], (151667, "<think>".to_string()));
        assert_eq!(specials[25], (151668, "</think>".to_string()));
        let tok_spec = TokenizerSpec::build(&spec);
        let dir = TempDir::new("synth-qwen3tok");
        std::fs::write(dir.path().join("tokenizer.json"), tok_spec.tokenizer_json(&spec)).unwrap();
        let tok = load_tokenizer(dir.path());
        assert_eq!(tok.token_to_id("<think>"), Some(151667));
        let ids = tok.encode("<think>\nhi</think>Yes<|im_end|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids.first(), Some(&151667));
        assert!(ids.contains(&151668) && ids.contains(&151645));
        // Skipping special tokens drops <|im_end|> but, as Qwen3's own tokenizer does, keeps the
        // thinking markers that reasoning parsers split on.
        let decoded = tok.decode(&ids, true).unwrap();
        assert_eq!(decoded, "<think>\nhi</think>Yes");
        let config = tok_spec.tokenizer_config(&spec);
        assert_eq!(config["added_tokens_decoder"]["151667"]["special"], false);
        assert_eq!(config["added_tokens_decoder"]["151645"]["special"], true);
    }
}
