//! The OpenAI-compatible API over HTTP/1.1, in process on 127.0.0.1 with stories260K: identical
//! answers for identical requests under 64 concurrent clients, every bad input answered with the
//! right OpenAI error object (and counted), a streaming client that disconnects releases its KV
//! blocks. Each test is bounded in time.

mod api_support;

use std::net::SocketAddr;
use std::time::Duration;

use api_support::{ids, logprob_bits, start, Options};
use lockstep_coordinator::api::client::Client;
use lockstep_test_env::stories260k;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);

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
    "sun", "tree", "friend", "mom", "cat", "jumped", "over", "fence", "played", "all", "day",
];

/// One answer, as compared between copies: text, token ids, logprob bits, finish reason and
/// fingerprint.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    text: String,
    token_ids: Vec<u32>,
    logprob_bits: Vec<u32>,
    finish_reason: String,
    fingerprint: String,
}

/// Sends a completions request, streaming or not, and returns choice 0's answer.
async fn complete(client: &mut Client, body: &Value) -> Answer {
    if body["stream"] == json!(true) {
        let (status, sse) = client.post_stream("/v1/completions", body).await.expect("request");
        assert_eq!(status, 200);
        let events = sse.collect_json().await.expect("a complete stream");
        let mut a = Answer {
            text: String::new(),
            token_ids: vec![],
            logprob_bits: vec![],
            finish_reason: String::new(),
            fingerprint: String::new(),
        };
        for e in &events {
            assert!(e.get("error").is_none(), "stream error {e}");
            a.fingerprint = e["system_fingerprint"].as_str().expect("fingerprint on every chunk").to_string();
            for c in e["choices"].as_array().unwrap() {
                a.text.push_str(c["text"].as_str().unwrap());
                a.token_ids.extend(ids(&c["token_ids"]));
                a.logprob_bits.extend(logprob_bits(&c["logprobs"]["token_logprobs"]));
                if let Some(f) = c["finish_reason"].as_str() {
                    a.finish_reason = f.to_string();
                }
            }
        }
        a
    } else {
        let (status, _, v) = client.post("/v1/completions", body).await.expect("request");
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        Answer {
            text: c["text"].as_str().unwrap().to_string(),
            token_ids: ids(&c["token_ids"]),
            logprob_bits: logprob_bits(&c["logprobs"]["token_logprobs"]),
            finish_reason: c["finish_reason"].as_str().unwrap().to_string(),
            fingerprint: v["system_fingerprint"].as_str().unwrap().to_string(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_get_identical_answers_for_identical_requests() {
    let Some(model) = stories260k() else {
        return;
    };
    let srv = start(&model, Options::default()).await;
    let addr = srv.server.http_addr;
    let target = "Once upon a time, there was a little";
    let greedy = json!({"prompt": target, "max_tokens": 40, "temperature": 0, "logprobs": 0});
    let seeded = json!({"prompt": target, "max_tokens": 40, "temperature": 0.9, "seed": 4242, "logprobs": 0});
    let mut rng = Rng(0x5eed);
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let stream = (i / 4) % 2 == 1;
        let (kind, mut body) = match i % 4 {
            0 => ("greedy", greedy.clone()),
            1 => ("seeded", seeded.clone()),
            _ => {
                let words: Vec<&str> =
                    (0..1 + rng.below(60)).map(|_| WORDS[rng.below(WORDS.len() as u64) as usize]).collect();
                let t = if rng.below(2) == 0 { 0.0 } else { 0.7 };
                (
                    "other",
                    json!({"prompt": words.join(" "), "max_tokens": 1 + rng.below(80), "temperature": t,
                           "seed": rng.below(1000), "logprobs": 0}),
                )
            }
        };
        body["stream"] = json!(stream);
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(addr, None);
            (kind, complete(&mut client, &body).await)
        }));
    }
    let answers = tokio::time::timeout(LIMIT, async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    })
    .await
    .expect("64 clients finished in time");
    for kind in ["greedy", "seeded"] {
        let copies: Vec<&Answer> = answers.iter().filter(|(k, _)| *k == kind).map(|(_, a)| a).collect();
        assert_eq!(copies.len(), 16);
        assert_eq!(copies[0].token_ids.len(), 40, "{kind}: {:?}", copies[0]);
        assert_eq!(copies[0].logprob_bits.len(), 40);
        for (j, c) in copies.iter().enumerate() {
            assert_eq!(*c, copies[0], "{kind} copy {j} (streaming and not, in any batch) differs");
        }
    }
    let g = &answers.iter().find(|(k, _)| *k == "greedy").unwrap().1;
    let s = &answers.iter().find(|(k, _)| *k == "seeded").unwrap().1;
    assert_ne!(g.token_ids, s.token_ids, "greedy and sampled answers should differ");
    assert!(g.text.contains("there was a little") || !g.text.is_empty());
    srv.wait_idle(Duration::from_secs(10)).await;
}

/// One raw HTTP/1.1 exchange (`Connection: close`): status, lower-cased head, body.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and close) before reading the whole body; that is fine.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), serde_json::from_str(body).unwrap_or(Value::Null))
}

fn post_head(path: &str, key: Option<&str>, len: usize) -> String {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}Content-Length: {len}\r\n\
         Connection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_openai_error_objects_and_the_server_keeps_serving() {
    let Some(model) = stories260k() else { return };
    let key = "sk-lockstep-test";
    let srv = start(&model, Options { api_keys: vec![key.into()], ..Options::default() }).await;
    let addr = srv.server.http_addr;
    let long_ids: Vec<u32> = (0..512).map(|i| 3 + i % 400).collect();
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    let p = |extra: Value| {
        let mut b = json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 4});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b.to_string().into_bytes()
    };
    let m = |extra: Value| {
        let mut b = json!({"model": "stories260K", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b.to_string().into_bytes()
    };
    // (name, path, key, body, status, type, param, code)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str, Option<&'a str>, &'a str);
    let k = Some(key);
    let invalid = "invalid_request_error";
    let cases: Vec<Case> = vec![
        ("malformed JSON", c, k, b"{\"model\": ".to_vec(), 400, invalid, None, "invalid_json"),
        ("not an object", c, k, b"[1, 2]".to_vec(), 400, invalid, None, "invalid_json"),
        ("empty body", c, k, Vec::new(), 400, invalid, None, "invalid_json"),
        ("invalid UTF-8", c, k, b"{\"prompt\": \"\xff\xfe\"}".to_vec(), 400, invalid, None, "invalid_utf8"),
        ("prompt of a wrong type", c, k, p(json!({"prompt": 5})), 400, invalid, Some("prompt"), "invalid_type"),
        (
            "max_tokens a string",
            c,
            k,
            p(json!({"max_tokens": "ten"})),
            400,
            invalid,
            Some("max_tokens"),
            "invalid_type",
        ),
        (
            "temperature a string",
            c,
            k,
            p(json!({"temperature": "hot"})),
            400,
            invalid,
            Some("temperature"),
            "invalid_type",
        ),
        ("stream a string", c, k, p(json!({"stream": "yes"})), 400, invalid, Some("stream"), "invalid_type"),
        ("stop a number", c, k, p(json!({"stop": 5})), 400, invalid, Some("stop"), "invalid_type"),
        ("unknown model", c, k, p(json!({"model": "gpt-4o"})), 404, invalid, Some("model"), "model_not_found"),
        ("negative max_tokens", c, k, p(json!({"max_tokens": -5})), 400, invalid, Some("max_tokens"), "invalid_value"),
        ("zero max_tokens", c, k, p(json!({"max_tokens": 0})), 400, invalid, Some("max_tokens"), "invalid_value"),
        ("huge max_tokens", c, k, p(json!({"max_tokens": 1e300})), 400, invalid, Some("max_tokens"), "invalid_type"),
        (
            "max_tokens past u64",
            c,
            k,
            br#"{"prompt": "Hi", "max_tokens": 18446744073709551616}"#.to_vec(),
            400,
            invalid,
            Some("max_tokens"),
            "invalid_type",
        ),
        (
            "temperature above 2",
            c,
            k,
            p(json!({"temperature": 2.5})),
            400,
            invalid,
            Some("temperature"),
            "invalid_value",
        ),
        ("top_p zero", c, k, p(json!({"top_p": 0})), 400, invalid, Some("top_p"), "invalid_value"),
        (
            "token id outside the vocabulary",
            c,
            k,
            p(json!({"prompt": [1, 99999]})),
            400,
            invalid,
            Some("prompt[1]"),
            "invalid_value",
        ),
        (
            "missing prompt",
            c,
            k,
            br#"{"model": "stories260K"}"#.to_vec(),
            400,
            invalid,
            Some("prompt"),
            "missing_parameter",
        ),
        (
            "prompt over the context",
            c,
            k,
            p(json!({"prompt": long_ids})),
            400,
            invalid,
            Some("prompt"),
            "context_length_exceeded",
        ),
        (
            "stream_options without stream",
            c,
            k,
            p(json!({"stream_options": {"include_usage": true}})),
            400,
            invalid,
            Some("stream_options"),
            "invalid_value",
        ),
        ("empty messages", chat, k, m(json!({"messages": []})), 400, invalid, Some("messages"), "invalid_value"),
        (
            "missing messages",
            chat,
            k,
            br#"{"model": "stories260K"}"#.to_vec(),
            400,
            invalid,
            Some("messages"),
            "missing_parameter",
        ),
        (
            "message without role",
            chat,
            k,
            m(json!({"messages": [{"content": "x"}]})),
            400,
            invalid,
            Some("messages[0].role"),
            "missing_parameter",
        ),
        (
            "image content",
            chat,
            k,
            m(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})),
            400,
            invalid,
            Some("messages[0].content[0]"),
            "unsupported_parameter",
        ),
        ("best_of", c, k, p(json!({"best_of": 3})), 400, invalid, Some("best_of"), "unsupported_parameter"),
        ("echo", c, k, p(json!({"echo": true})), 400, invalid, Some("echo"), "unsupported_parameter"),
        ("suffix", c, k, p(json!({"suffix": "The end."})), 400, invalid, Some("suffix"), "unsupported_parameter"),
        (
            "logit_bias",
            c,
            k,
            p(json!({"logit_bias": {"50": 5}})),
            400,
            invalid,
            Some("logit_bias"),
            "unsupported_parameter",
        ),
        ("logprobs 3", c, k, p(json!({"logprobs": 3})), 400, invalid, Some("logprobs"), "unsupported_parameter"),
        ("n above the cap", c, k, p(json!({"n": 17})), 400, invalid, Some("n"), "unsupported_parameter"),
        (
            "frequency_penalty",
            c,
            k,
            p(json!({"frequency_penalty": 0.5})),
            400,
            invalid,
            Some("frequency_penalty"),
            "unsupported_parameter",
        ),
        (
            "presence_penalty",
            c,
            k,
            p(json!({"presence_penalty": -1})),
            400,
            invalid,
            Some("presence_penalty"),
            "unsupported_parameter",
        ),
        (
            "unknown parameter",
            c,
            k,
            p(json!({"frobnicate": 1})),
            400,
            invalid,
            Some("frobnicate"),
            "unsupported_parameter",
        ),
        (
            "tools",
            chat,
            k,
            m(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            400,
            invalid,
            Some("tools"),
            "unsupported_parameter",
        ),
        (
            "response_format json",
            chat,
            k,
            m(json!({"response_format": {"type": "json_object"}})),
            400,
            invalid,
            Some("response_format"),
            "unsupported_parameter",
        ),
        (
            "top_logprobs",
            chat,
            k,
            m(json!({"logprobs": true, "top_logprobs": 2})),
            400,
            invalid,
            Some("top_logprobs"),
            "unsupported_parameter",
        ),
        ("missing API key", c, None, p(json!({})), 401, "authentication_error", None, "invalid_api_key"),
        ("wrong API key", c, Some("sk-wrong"), p(json!({})), 401, "authentication_error", None, "invalid_api_key"),
        (
            "tokenize without a key",
            "/tokenize",
            None,
            br#"{"prompt": "Hi"}"#.to_vec(),
            401,
            "authentication_error",
            None,
            "invalid_api_key",
        ),
        ("unknown route", "/v1/embeddings", k, p(json!({})), 404, invalid, None, "not_found"),
    ];
    let run = async {
        for (name, path, key, body, status, kind, param, code) in &cases {
            let (got, _, v) = raw(addr, &post_head(path, *key, body.len()), body).await;
            assert_eq!(got, *status, "{name}: {v}");
            let e = &v["error"];
            assert_eq!(e["type"], *kind, "{name}: {v}");
            assert_eq!(e["code"], *code, "{name}: {v}");
            assert_eq!(e["param"].as_str(), *param, "{name}: {v}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {v}");
        }
        // Over the body cap: refused from the declared length, before the body is read.
        let head = post_head(c, Some(key), 5 << 20);
        let (got, _, v) = raw(addr, &head, &vec![b' '; 64 << 10]).await;
        assert_eq!(got, 413, "{v}");
        assert_eq!(v["error"]["code"], "body_too_large");

        // The server keeps serving: a good request, health, and the capped max_tokens.
        let mut client = Client::new(addr, Some(key.to_string()));
        let (s, _, v) = client
            .post(c, &json!({"prompt": "Once upon a time", "max_tokens": 100000, "temperature": 0}))
            .await
            .unwrap();
        assert_eq!(s, 200, "max_tokens above the context is capped, not refused: {v}");
        assert_eq!(
            v["choices"][0]["text"].as_str().map(|t| t.starts_with(", there was a little girl named Lily")),
            Some(true),
            "{v}"
        );
        let edge: Vec<u32> = (0..511).map(|i| 3 + i % 400).collect();
        let (s, _, v) = client.post(c, &json!({"prompt": edge, "max_tokens": 50})).await.unwrap();
        assert_eq!(s, 200, "a prompt one short of the context gets one token: {v}");
        assert_eq!(v["usage"]["completion_tokens"], 1);
        let (s, _, _) = Client::new(addr, None).get("/health").await.unwrap();
        assert_eq!(s, 200, "/health needs no key");
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
    // Every refusal was counted once, under its error type.
    let errors = srv.state.metrics.errors();
    for code in ["invalid_json", "invalid_utf8", "invalid_type", "model_not_found", "invalid_api_key", "body_too_large"]
    {
        assert!(errors.get(code).copied().unwrap_or(0) >= 1, "{code} not counted: {errors:?}");
    }
    assert_eq!(errors.get("invalid_json"), Some(&3), "{errors:?}");
    assert_eq!(errors.get("invalid_api_key"), Some(&3), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_server_answers_429_with_retry_after() {
    let Some(model) = stories260k() else { return };
    // One sequence runs (slowly) and one waits: the queue of one is full, so the next request
    // is told to come back later — unlike one that could never fit (a 400, see hostile_clients).
    let opts = Options {
        max_waiting: 1,
        max_running: Some(1),
        step_delay: Some(Duration::from_millis(50)),
        ..Options::default()
    };
    let srv = start(&model, opts).await;
    let busy = |seed| lockstep_coordinator::engine::GenerateRequest {
        prompt_ids: srv.state.service.info().tokenizer.encode("Once upon a time", true).unwrap(),
        sampling: lockstep_kernels::SamplingParams { seed, ..Default::default() },
        max_tokens: 400,
        stop: vec![],
        stop_token_ids: vec![],
        ignore_eos: true,
        skip_special_tokens: true,
    };
    let _running = srv.state.service.submit(busy(1)).unwrap();
    let start_wait = std::time::Instant::now();
    while srv.state.service.replicas()[0].running == 0 {
        assert!(start_wait.elapsed() < LIMIT, "the first request never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _waiting = srv.state.service.submit(busy(2)).unwrap();
    let mut client = Client::new(srv.server.http_addr, None);
    let (s, h, v) =
        tokio::time::timeout(LIMIT, client.post("/v1/completions", &json!({"prompt": "Hi"}))).await.unwrap().unwrap();
    assert_eq!(s, 429, "{v}");
    assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert_eq!(v["error"]["code"], "overloaded");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // Counted once (by the service), not again by the API.
    assert_eq!(srv.state.metrics.errors().get("overloaded"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_client_that_disconnects_frees_its_kv_blocks() {
    let Some(model) = stories260k() else { return };
    let srv = start(&model, Options::default()).await;
    let addr = srv.server.http_addr;
    let run = async {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": true,
                          "temperature": 0})
        .to_string();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(post_head("/v1/completions", None, body.len()).as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        // Read until a few token events arrived: the sequence is running and holds KV blocks.
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while seen.windows(6).filter(|w| w == b"data: ").count() < 4 {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        let r = srv.state.service.replicas();
        assert!(r[0].running == 1 && r[0].kv_used_blocks > 0, "{r:?}");
        drop(s); // the client goes away mid-stream
        srv.wait_idle(Duration::from_secs(10)).await;
        let r = srv.state.service.replicas();
        assert!(r[0].generated_tokens < 400, "the sequence was aborted, not run to the end: {r:?}");

        // Also a non-streaming client that gives up: hyper notices the closed connection and drops
        // the handler, which aborts the sequence too.
        let before = srv.state.service.replicas()[0].generated_tokens;
        let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true}).to_string();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(post_head("/v1/completions", None, body.len()).as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        while srv.state.service.replicas()[0].generated_tokens == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(s);
        srv.wait_idle(Duration::from_secs(30)).await;
        let after = srv.state.service.replicas()[0].generated_tokens;
        assert!(after - before < 400, "aborted after {} tokens", after - before);

        // The server keeps serving.
        let mut client = Client::new(addr, None);
        let (st, _, v) =
            client.post("/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": 8})).await.unwrap();
        assert_eq!(st, 200, "{v}");
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_differ_seeds_replay_and_every_response_has_fingerprint_and_seed() {
    let Some(model) = stories260k() else {
        return;
    };
    let srv = start(&model, Options::default()).await;
    let mut client = Client::new(srv.server.http_addr, None);
    let run = async {
        // No seed: one is drawn and reported; sending it back replays every choice.
        let req = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0, "n": 3});
        let (s, _, first) = client.post("/v1/completions", &req).await.unwrap();
        assert_eq!(s, 200, "{first}");
        let seed = first["seed"].as_u64().expect("the drawn seed is reported");
        assert!(seed < 1 << 53);
        assert!(first["system_fingerprint"].as_str().unwrap().starts_with("fp_"));
        let choices = first["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        let texts: Vec<&str> = choices.iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert!(texts[0] != texts[1] && texts[1] != texts[2], "choices are distinct samples: {texts:?}");
        let mut replay = req.clone();
        replay["seed"] = json!(seed);
        let (_, _, again) = client.post("/v1/completions", &replay).await.unwrap();
        assert_eq!(again["choices"], first["choices"], "the reported seed replays every choice");
        // Choice 0 of n is the n = 1 answer; choice i alone replays with its derived seed.
        let mut one = replay.clone();
        one["n"] = json!(1);
        let (_, _, single) = client.post("/v1/completions", &one).await.unwrap();
        assert_eq!(single["choices"][0]["token_ids"], first["choices"][0]["token_ids"]);
        one["seed"] = json!(lockstep_coordinator::api::request::choice_seed(seed, 2));
        let (_, _, third) = client.post("/v1/completions", &one).await.unwrap();
        assert_eq!(third["choices"][0]["token_ids"], first["choices"][2]["token_ids"]);

        // Chat, streaming with usage: every chunk has the fingerprint, the first has the seed.
        let req = json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
                         "stream": true, "stream_options": {"include_usage": true}, "seed": 9, "logprobs": true});
        let (s, sse) = client.post_stream("/v1/chat/completions", &req).await.unwrap();
        assert_eq!(s, 200);
        let events = sse.collect_json().await.unwrap();
        assert_eq!(events[0]["seed"], 9);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(events.iter().all(|e| e["system_fingerprint"].is_string() && e["object"] == "chat.completion.chunk"));
        let usage = &events.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], 12, "{usage}");
        let streamed: String =
            events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
        let mut whole = req.clone();
        whole.as_object_mut().unwrap().remove("stream_options");
        whole["stream"] = json!(false);
        let (_, _, v) = client.post("/v1/chat/completions", &whole).await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), streamed, "stream == non-stream");
        assert_eq!(v["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), 12);

        // A batch of prompts × n: choice p * n + i is prompt p, sample i.
        let batch = json!({"prompt": ["Once upon a time", "The little dog"], "max_tokens": 10, "n": 2, "seed": 11,
                           "temperature": 1.0});
        let (s, _, v) = client.post("/v1/completions", &batch).await.unwrap();
        assert_eq!(s, 200, "{v}");
        let cs = v["choices"].as_array().unwrap();
        assert_eq!(cs.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2, 3]);
        let mut alone = batch.clone();
        alone["prompt"] = json!("The little dog");
        let (_, _, a) = client.post("/v1/completions", &alone).await.unwrap();
        assert_eq!(a["choices"][0]["token_ids"], cs[2]["token_ids"]);
        assert_eq!(a["choices"][1]["token_ids"], cs[3]["token_ids"]);
        assert_eq!(v["usage"]["completion_tokens"], 40);

        // A stop string ends the answer before it, with finish_reason "stop".
        let (_, _, v) = client
            .post(
                "/v1/completions",
                &json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0,
                                              "stop": [" girl", "zebra"]}),
            )
            .await
            .unwrap();
        assert_eq!(v["choices"][0]["text"], ", there was a little");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        // Tokenizer routes.
        let (_, _, t) = client.post("/tokenize", &json!({"prompt": "Once upon a time"})).await.unwrap();
        assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
        assert_eq!(t["max_model_len"], 512);
        let (_, _, d) = client.post("/detokenize", &json!({"tokens": t["tokens"]})).await.unwrap();
        assert!(d["prompt"].as_str().unwrap().ends_with("Once upon a time"), "{d}");
        let (_, _, t) =
            client.post("/tokenize", &json!({"messages": [{"role": "user", "content": "Hi"}]})).await.unwrap();
        assert!(t["count"].as_u64().unwrap() > 1);
        let (s, _, models) = client.get("/v1/models").await.unwrap();
        assert_eq!(s, 200);
        assert_eq!(models["data"][0]["id"], "stories260K");
        let (s, _, ver) = client.get("/version").await.unwrap();
        assert_eq!(s, 200);
        assert_eq!(ver["contract_version"], lockstep_kernels::CONTRACT_VERSION);
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_measures_a_running_server() {
    use lockstep_coordinator::api::loadgen::{run, table, LoadgenOptions};
    let Some(model) = stories260k() else { return };
    let srv = start(&model, Options::default()).await;
    let opts = LoadgenOptions {
        url: srv.url(),
        api_key: None,
        model: None,
        concurrency: vec![1, 4],
        requests: 8,
        max_tokens: 8,
        prompts: vec!["Once upon a time".into(), "The little dog".into()],
        temperature: 0.0,
        request_timeout: Duration::from_secs(30),
    };
    let reports = tokio::time::timeout(LIMIT, run(&opts)).await.expect("bounded").expect("loadgen");
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert_eq!((r.requests, r.failed), (8, 0), "{r:?}");
        assert!(r.tokens_per_sec > 0.0 && r.ttft_p50_ms > 0.0 && r.itl_p99_ms >= r.itl_p50_ms, "{r:?}");
    }
    let t = table(&reports);
    assert!(t.lines().count() == 4 && t.contains("| 4 | 8 | 0 |"), "{t}");
}
