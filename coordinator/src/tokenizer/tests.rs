//! The tokenizer through its public API: stories260K's files and small ChatML directories
//! written on the fly.

use super::*;

/// stories260K's tokenizer, or `None` when the test is skipped (see `lockstep_test_env`).
fn stories() -> Option<Tokenizer> {
    let dir = lockstep_test_env::stories260k()?;
    Some(Tokenizer::from_dir(&dir).expect("stories260K tokenizer loads"))
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("lockstep-tokenizer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn write(&self, file: &str, contents: &str) {
        std::fs::write(self.0.join(file), contents).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny word-level `tokenizer.json` with ChatML special tokens.
const CHATML_TOKENIZER_JSON: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 3, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3, "hello": 4, "world": 5}, "unk_token": "<unk>"}
}"#;

/// In the style of Qwen2.5's template: default system prompt, role check, `.strip()`.
const QWEN_STYLE_TEMPLATE: &str = r#"{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('Unknown role: ' + message.role) }}
{%- endif %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
    {{- '<|im_start|>' + message.role + '\n' + message.content.strip() + '<|im_end|>' + '\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}"#;

fn chatml_dir(name: &str, template: &str) -> TempDir {
    let dir = TempDir::new(name);
    dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
    let config = serde_json::json!({
        "bos_token": null,
        "eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": template,
    });
    dir.write("tokenizer_config.json", &config.to_string());
    dir.write("generation_config.json", r#"{"eos_token_id": [2, 3], "bos_token_id": null}"#);
    dir
}

#[test]
fn stories_encode_starts_with_bos_and_special_ids_are_read() {
    let Some(tok) = stories() else { return };
    let ids = tok.encode("Once upon a time", true).unwrap();
    assert_eq!(ids[0], 1, "{ids:?}");
    assert!(ids.len() > 2);
    assert_eq!(tok.encode("Once upon a time", false).unwrap(), ids[1..]);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<s>"), Some("</s>")));
    assert_eq!(tok.vocab_size(), 512);
    assert!(!tok.has_chat_template());
}

#[test]
fn stories_decode_encode_round_trips() {
    let Some(tok) = stories() else { return };
    for text in [
        "Once upon a time, there was a little girl named Lily.",
        "Hello, world! 123 + 456 = 579",
        "  two leading spaces and\ttabs\nand newlines",
        "héllo wörld — ñandú",
        "日本語のテキスト",
        "emoji 🦀🎉 and 👩‍👩‍👧",
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), text, "ids {ids:?}");
    }
    // Byte fallback: a character outside the 512-token vocabulary becomes its UTF-8 bytes.
    let crab = tok.encode("🦀", false).unwrap();
    assert!(crab.len() >= 4, "{crab:?}");
}

#[test]
fn stories_decode_stream_never_splits_characters() {
    let Some(tok) = stories() else { return };
    let prompt = tok.encode("Once upon a time", true).unwrap();
    let generated_text = " there was a crab 🦀 named Ünal. The end!";
    let full = tok.encode(&format!("Once upon a time{generated_text}"), true).unwrap();
    assert_eq!(full[..prompt.len()], prompt[..], "prompt tokens are a prefix");
    let generated = &full[prompt.len()..];
    let mut stream = tok.decode_stream_after(&prompt, true);
    let mut pieces = Vec::new();
    for &id in generated {
        pieces.push(stream.push(id).unwrap());
    }
    pieces.push(stream.flush().unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(pieces.iter().any(|p| p.contains('🦀')));
    assert_eq!(pieces.concat(), generated_text);
    // From nothing: the first word has no leading space, as in a plain decode.
    let mut stream = tok.decode_stream(true);
    let text: String = full.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(text + &stream.flush().unwrap(), tok.decode(&full, true).unwrap());
}

#[test]
fn byte_fallback_bytes_are_held_until_the_character_completes() {
    let Some(tok) = stories() else { return };
    let ids = tok.encode("🦀", false).unwrap();
    let mut stream = tok.decode_stream_after(&tok.encode("A", true).unwrap(), true);
    let is_byte = |id: u32| tok.id_to_token(id).is_some_and(|t| t.starts_with("<0x"));
    let first_byte = ids.iter().position(|&id| is_byte(id)).unwrap();
    assert_eq!(ids.len() - first_byte, 4, "🦀 is 4 UTF-8 bytes: {ids:?}");
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(pieces[first_byte..], ["", "", "", "🦀"], "{pieces:?}");
    assert_eq!(pieces.concat(), " 🦀");
    // An incomplete character at the end of generation is flushed as a replacement char.
    let mut stream = tok.decode_stream(true);
    assert_eq!(stream.push(ids[first_byte]).unwrap(), "");
    assert_eq!(stream.flush().unwrap(), "\u{FFFD}");
}

#[test]
fn stories_fallback_chat_template() {
    let Some(tok) = stories() else { return };
    let messages = [ChatMessage::new("user", "Tell me a story.")];
    let text = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, "<s>user: Tell me a story.\n\nassistant:");
    let ids = tok.encode_chat(&messages, true).unwrap();
    assert_eq!(ids[0], 1);
    assert_ne!(ids[1], 1, "BOS once, from the template");
}

#[test]
fn qwen_style_chat_template_renders() {
    let dir = chatml_dir("qwen", QWEN_STYLE_TEMPLATE);
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert!(tok.has_chat_template());
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.eos_token_ids(), &[2, 3]);
    assert_eq!(tok.bos_token_id(), None);
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "  Hi there!\n")];
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    );
    let messages = [ChatMessage::new("user", "hello world")];
    let text = tok.apply_chat_template(&messages, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
    );
    let ids = tok.encode_chat(&messages, false).unwrap();
    assert_eq!(ids[0], 1);
    assert!(ids.contains(&4) && ids.contains(&5) && ids.contains(&2), "{ids:?}");
    // raise_exception surfaces as an error naming the template's file.
    let err = tok.apply_chat_template(&[ChatMessage::new("tool", "x")], true).unwrap_err();
    assert_eq!(err.error_type(), "chat_template");
    let message = err.to_string();
    assert!(message.contains("Unknown role: tool") && message.contains("tokenizer_config.json"), "{message}");
}

#[test]
fn template_helpers_and_python_methods() {
    let template = "{{ eos_token }}|{{ strftime_now('%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I %p') }}|\
        {{ 'a,b,,c'.split(',') | join('/') }}|{{ ' x y  z '.split() | join('/') }}|\
        {{ 'xxhixx'.strip('x') }}|{{ 'Hello'.startswith(('He', 'Zz')) }}|{{ 'Hello'.endswith('x') }}|\
        {{ 'hello world'.title() }}|{{ 'aXa'.replace('a', 'b') }}|{{ {'k': 1}.get('k') }}\
        {{ {'k': 1}.get('z', 7) }}|{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|\
        {{ ', '.join(['p', 'q']) }}";
    let dir = chatml_dir("helpers", template);
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    let text = tok.apply_chat_template_at(&[], false, 1_700_000_000).unwrap();
    assert_eq!(
        text,
        "<|im_end|>|2023-11-14 22:13:20 Tue Tuesday Nov November 318 23 10 PM|a/b//c|x/y/z|hi|True|False|\
         Hello World|bXb|17|a=1|p, q"
    );
}

#[test]
fn chat_template_file_and_named_list_are_found() {
    let dir = TempDir::new("jinja-file");
    dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
    dir.write("chat_template.jinja", "{% for m in messages %}[{{ m.content }}]{% endfor %}");
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tok.apply_chat_template(&[ChatMessage::new("user", "q")], true).unwrap(), "[q]");
    assert_eq!(tok.eos_token_ids(), &[] as &[u32]);

    let dir = TempDir::new("named-list");
    dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
    let config = serde_json::json!({
        "eos_token": "<|endoftext|>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default:{{ messages | length }}"},
        ],
    });
    dir.write("tokenizer_config.json", &config.to_string());
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tok.apply_chat_template(&[ChatMessage::new("user", "q")], true).unwrap(), "default:1");
    assert_eq!(tok.eos_token_ids(), &[3]);
}

#[test]
fn load_errors_name_the_file() {
    let dir = TempDir::new("errors");
    let err = Tokenizer::from_dir(&dir.0).unwrap_err();
    assert_eq!(err.error_type(), "tokenizer_file_not_found");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    dir.write("tokenizer.json", "{not json");
    let err = Tokenizer::from_dir(&dir.0).unwrap_err();
    assert_eq!(err.error_type(), "tokenizer_load");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
    dir.write("tokenizer_config.json", "{\"eos_token\": ");
    let err = Tokenizer::from_dir(&dir.0).unwrap_err();
    assert_eq!(err.error_type(), "tokenizer_invalid_json");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    dir.write("tokenizer_config.json", "{\"eos_token\": 5}");
    let err = Tokenizer::from_dir(&dir.0).unwrap_err();
    assert_eq!(err.error_type(), "tokenizer_bad_field");

    dir.write("tokenizer_config.json", "{}");
    dir.write("generation_config.json", "{\"eos_token_id\": \"x\"}");
    let err = Tokenizer::from_dir(&dir.0).unwrap_err();
    assert!(err.to_string().contains("generation_config.json"), "{err}");

    // A template that does not compile is reported when used, not at load.
    dir.write("generation_config.json", "{}");
    dir.write("tokenizer_config.json", r#"{"chat_template": "{% for %}"}"#);
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tok.encode("hello world", false).unwrap(), vec![4, 5]);
    let err = tok.apply_chat_template(&[], true).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

/// Guards the GGUF SentencePiece path: the tokenizer built from stories260K.gguf's metadata
/// (tokens, scores, types; merges generated from the scores) encodes and decodes exactly like the
/// HF conversion's `tokenizer.json`.
#[test]
fn stories_gguf_tokenizer_equals_the_hf_tokenizer_json() {
    let Some(hf) = stories() else { return };
    let Some(path) = lockstep_test_env::shared_model("stories260K/stories260K.gguf") else { return };
    let gguf = Tokenizer::load(&path).unwrap();
    assert_eq!(gguf.vocab_size(), hf.vocab_size());
    assert_eq!((gguf.bos_token_id(), gguf.eos_token_ids()), (Some(1), &[2u32][..]));
    assert_eq!((gguf.bos_token(), gguf.eos_token()), (Some("<s>"), Some("</s>")));
    assert!(!gguf.has_chat_template());
    let texts = [
        "Once upon a time, there was a little girl named Lily.",
        "  two  spaces and\nnew lines\t tabs",
        "Émile ate 12 crème brûlées — ünïcödé 日本語 🙂",
        "",
        "<s> is not special in text",
    ];
    for text in texts {
        for special in [true, false] {
            let ids = gguf.encode(text, special).unwrap();
            assert_eq!(ids, hf.encode(text, special).unwrap(), "{text:?} special={special}");
            assert_eq!(gguf.decode(&ids, true).unwrap(), hf.decode(&ids, true).unwrap(), "{text:?}");
        }
    }
}

/// SmolLM2's GGUF tokenizer (GPT-2 BPE, `smollm` pre-tokenizer) and its chat template: without
/// a system message the template inserts its default system prompt.
#[test]
fn smollm2_gguf_chat_prompt_is_the_templates_rendering_with_the_default_system_prompt() {
    let Some(path) = lockstep_test_env::smollm2_gguf() else { return };
    let t = Tokenizer::load(&path).unwrap();
    assert!(t.has_chat_template());
    assert_eq!((t.bos_token(), t.eos_token()), (Some("<|im_start|>"), Some("<|im_end|>")));
    assert_eq!(t.eos_token_ids(), &[2]);
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    let prompt = t.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    // An explicit system message replaces the default one.
    let with_system = [ChatMessage::new("system", "Be brief."), messages[0].clone()];
    let prompt2 = t.apply_chat_template(&with_system, true).unwrap();
    assert!(prompt2.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"), "{prompt2:?}");
    // Special tokens are single ids; digits are split one by one (the `smollm` pre-tokenizer);
    // nothing is prepended (add_bos_token is false).
    let ids = t.encode_chat(&messages, true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3, "three <|im_start|>");
    assert_eq!(t.decode(&ids, false).unwrap(), prompt);
    let digits = t.encode("2024", true).unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    assert_eq!(
        t.decode(&t.encode("Hello, world! It's 12:30.", true).unwrap(), true).unwrap(),
        "Hello, world! It's 12:30."
    );
}
