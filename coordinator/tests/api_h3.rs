//! The API over HTTP/3: an `h3` + `h3-quinn` client that trusts the server's generated
//! certificate gets the same answers as HTTP/1.1 (non-streaming and streaming), `/health`, and
//! OpenAI error objects; HTTP/1.1 responses advertise the HTTP/3 port with `Alt-Svc`. In process,
//! on 127.0.0.1, bounded in time.

mod api_support;

use std::time::Duration;

use api_support::{start, H3Client, Options};
use lockstep_coordinator::api::client::Client;
use lockstep_test_env::stories260k;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

/// The JSON events of an SSE body, checked to end with `[DONE]`.
fn sse_events(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).unwrap();
    let data: Vec<&str> = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_serves_the_same_answers_as_http1_and_http1_advertises_it() {
    let Some(model) = stories260k() else { return };
    let srv = start(&model, Options { h3: true, ..Options::default() }).await;
    let h3_addr = srv.server.h3_addr.expect("HTTP/3 is on");
    let cert = srv.server.cert_pem.clone().expect("a self-signed certificate was generated");
    let run = async {
        // HTTP/1.1: the answer, and the Alt-Svc header naming the HTTP/3 port.
        let mut h1 = Client::new(srv.server.http_addr, None);
        let req = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8, "seed": 5, "logprobs": 0});
        let (s, headers, via_h1) = h1.post("/v1/completions", &req).await.unwrap();
        assert_eq!(s, 200);
        let alt = headers.get("alt-svc").and_then(|v| v.to_str().ok()).expect("Alt-Svc on HTTP/1.1");
        assert_eq!(alt, format!("h3=\":{}\"; ma=86400", h3_addr.port()));
        let (_, headers, _) = h1.get("/health").await.unwrap();
        assert!(headers.contains_key("alt-svc"), "on every response");

        let mut h3c = H3Client::connect(h3_addr, &cert).await;
        let (s, _, body) = h3c.request("GET", "/health", None).await;
        assert_eq!(s, 200);
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["status"], "ok");

        // Non-streaming: the same choices, bit for bit, as over HTTP/1.1.
        let (s, _, body) = h3c.request("POST", "/v1/completions", Some(&req)).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let via_h3: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(via_h3["choices"], via_h1["choices"]);
        assert_eq!(via_h3["system_fingerprint"], via_h1["system_fingerprint"]);

        // Streaming over HTTP/3: server-sent events, the same text and ids.
        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        let (s, headers, body) = h3c.request("POST", "/v1/completions", Some(&sreq)).await;
        assert_eq!(s, 200);
        assert_eq!(headers.get("content-type").unwrap(), "text/event-stream");
        let events = sse_events(&body);
        assert!(events.len() >= 24, "one event per token");
        let text: String = events.iter().map(|e| e["choices"][0]["text"].as_str().unwrap()).collect();
        let ids: Vec<Value> =
            events.iter().flat_map(|e| e["choices"][0]["token_ids"].as_array().unwrap().clone()).collect();
        assert_eq!(text, via_h1["choices"][0]["text"].as_str().unwrap());
        assert_eq!(Value::from(ids), via_h1["choices"][0]["token_ids"]);

        // Errors are the same OpenAI objects over HTTP/3.
        let (s, _, body) = h3c.request("POST", "/v1/completions", Some(&json!({"prompt": "x", "model": "nope"}))).await;
        assert_eq!(s, 404);
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["error"]["code"], "model_not_found");
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
    srv.server.shutdown(Duration::from_secs(2)).await;
}
