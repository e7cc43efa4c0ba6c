//! The soak against a scripted server on 127.0.0.1: plain threads speaking HTTP/1.1 by hand, so a
//! test decides exactly how the answer's bytes are cut — a stream is written in pieces that end
//! inside multibyte characters, with a pause after each so the client reads them separately.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

use super::{run_soak, SoakOptions, SoakReport};

const FINGERPRINT: &str = "fp-scripted";
/// Its streamed tokens end and begin inside 2-, 3- and 4-byte characters once cut into pieces.
const MULTIBYTE_TOKENS: &[&str] = &["Ein ", "Café", " für ", "日本", "語 ", "🦀", "!"];
const FAILS_MIDWAY: &str = "fails midway";

/// The answer to `prompt`: its token texts and, for a stream, an error event after the first.
fn script(prompt: &str) -> (&'static [&'static str], bool) {
    match prompt {
        FAILS_MIDWAY => (&["Once", " upon"], true),
        _ => (MULTIBYTE_TOKENS, false),
    }
}

fn chunk(text: &str, token: Option<usize>, finish: Option<&str>) -> Value {
    let mut c = json!({"index": 0, "text": text, "finish_reason": finish});
    if let Some(t) = token {
        c["token_ids"] = json!([t]);
        c["logprobs"] = json!({"token_logprobs": [-0.5 - t as f64]});
    }
    json!({"object": "text_completion", "system_fingerprint": FINGERPRINT, "choices": [c]})
}

fn whole_answer(tokens: &[&str]) -> Value {
    let choice = json!({
        "index": 0,
        "text": tokens.concat(),
        "token_ids": (0..tokens.len()).collect::<Vec<_>>(),
        "logprobs": {"token_logprobs": (0..tokens.len()).map(|t| -0.5 - t as f64).collect::<Vec<_>>()},
        "finish_reason": "length",
    });
    json!({"object": "text_completion", "system_fingerprint": FINGERPRINT, "choices": [choice]})
}

fn stream_events(tokens: &[&str], fail_midway: bool) -> String {
    let mut s = String::new();
    for (t, text) in tokens.iter().enumerate() {
        s += &format!("data: {}\n\n", chunk(text, Some(t), None));
        if fail_midway {
            let e = json!({"error": {"message": "the engine stopped", "type": "server_error", "code": "internal"}});
            s += &format!("data: {e}\n\n");
            break;
        }
    }
    if !fail_midway {
        s += &format!("data: {}\n\n", chunk("", None, Some("length")));
    }
    s + "data: [DONE]\n\n"
}

/// Writes `body` as chunked transfer coding, one chunk per piece, cutting inside every multibyte
/// character and pausing there so the reader gets the halves in separate reads.
fn trickle(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut from = 0;
    for i in 1..=body.len() {
        let inside_a_character = i < body.len() && (body[i] & 0xC0) == 0x80;
        if inside_a_character || i == body.len() {
            write!(s, "{:x}\r\n", i - from)?;
            s.write_all(&body[from..i])?;
            s.write_all(b"\r\n")?;
            s.flush()?;
            from = i;
            if inside_a_character {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    s.write_all(b"0\r\n\r\n")
}

/// Serves requests on one kept-alive connection until the client closes it.
fn serve_connection(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut s = s;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body)?;
        if request_line.starts_with("GET /v1/models ") {
            let models = json!({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).to_string();
            write!(s, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", models.len())?;
            s.write_all(models.as_bytes())?;
            continue;
        }
        assert!(request_line.starts_with("POST /v1/completions "), "unexpected request {request_line:?}");
        let req: Value = serde_json::from_slice(&body).expect("a JSON request");
        let (tokens, fail_midway) = script(req["prompt"].as_str().expect("a prompt"));
        if req["stream"] == json!(true) {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")?;
            trickle(&mut s, stream_events(tokens, fail_midway).as_bytes())?;
        } else {
            let answer = whole_answer(tokens).to_string();
            write!(s, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", answer.len())?;
            s.write_all(answer.as_bytes())?;
        }
    }
}

/// The scripted server's URL; it serves until the test process exits.
fn scripted_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve_connection(conn));
        }
    });
    url
}

fn soak_of(prompt: &str, requests: usize) -> SoakReport {
    run_soak(&SoakOptions {
        url: scripted_server(),
        api_key: None,
        model: None,
        prompts: vec![prompt.to_string()],
        requests,
        max_tokens: 16,
        temperature: 0.0,
        seed: None,
        concurrency_ramp: vec![1, 4],
        background_per_s: 0.0,
        duration: None,
        request_timeout: Duration::from_secs(60),
        progress: None,
    })
    .unwrap()
}

#[test]
fn multibyte_text_split_across_reads_is_not_reported_as_a_divergence() {
    let r = soak_of("multibyte", 12);
    assert_eq!(r.model, "scripted", "the model came from /v1/models");
    assert_eq!((r.completed, r.errors), (12, 0), "{:?}", r.error_samples);
    let p = &r.prompts[0];
    assert_eq!(p.unique_completions, 1, "streamed and whole answers agree: {:#?}", p.variants);
    assert_eq!(p.variants[0].text, MULTIBYTE_TOKENS.concat());
    assert_eq!(p.variants[0].token_count, Some(MULTIBYTE_TOKENS.len()));
    assert_eq!(p.logprob_bit_mismatches, 0);
    assert_eq!(r.fingerprints.get(FINGERPRINT), Some(&12));
    assert!(r.is_deterministic(), "{}", r.verdict);
}

#[test]
fn a_mid_stream_error_event_counts_as_an_error_not_a_completion() {
    // Copies alternate: the 4 whole answers complete, the 4 streams fail after one token.
    let r = soak_of(FAILS_MIDWAY, 8);
    assert_eq!((r.completed, r.errors), (4, 4), "{:?}", r.error_samples);
    assert!(r.error_samples.iter().all(|e| e.contains("the engine stopped")), "{:?}", r.error_samples);
    let p = &r.prompts[0];
    assert_eq!((p.copies, p.errors), (8, 4));
    assert_eq!(p.unique_completions, 1, "the partial streams are not variants: {:#?}", p.variants);
    assert_eq!(p.variants[0].text, "Once upon");
    assert!(!r.is_deterministic(), "errors make a soak fail: {}", r.verdict);
}
