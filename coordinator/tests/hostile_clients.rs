//! Hostile and careless clients against the HTTP edge (issue #13), over real sockets on 127.0.0.1
//! and, where it applies, HTTP/3: one table of requests that must be refused with an exact status
//! and OpenAI error object on both transports (cross-site `text/plain`, wrong soak types, `n` the
//! queue can never hold, `top_k` past the sampler, 404/405, keys), and the scenarios a table
//! cannot hold — slow headers, trickled bodies, idle keep-alive, a connection flood, huge prompts
//! against `/health`, tiny temperatures, an unauthenticated HTTP/3 body, shutdown mid-stream and
//! a coordinator still forming. Every wait is bounded; the only timed assertion is the issue's
//! `/health` latency under four 4 MB prompts, taken as the median of several samples.

mod api_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use api_support::{start, H3Client, Options, TestServer};
use bytes::{Buf, Bytes};
use lockstep_coordinator::api::{forming_app, EdgeLimits, InterimServer, Server, OVERFLOW_CONNECTIONS};
use lockstep_test_env::stories260k;
use lockstep_tests::{dechunk, scratch, Watched};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
/// Bound of one raw exchange (never an assertion on speed).
const EXCHANGE_LIMIT: Duration = Duration::from_secs(30);
const API_KEY: &str = "sk-hostile";
const OPS_KEY: &str = "ops-hostile";

/// What one HTTP/1.1 exchange saw; `None` from [`exchange`] is a connection closed with no answer.
struct Raw {
    status: u16,
    /// The head, lower-cased.
    head: String,
    /// The body as sent (chunked framing included).
    wire_body: Vec<u8>,
    /// The body without chunked framing.
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
    }
}

fn parse(raw: &[u8]) -> Option<Raw> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let wire_body = raw[split + 4..].to_vec();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(&wire_body) } else { wire_body.clone() };
    Some(Raw { status, head, wire_body, body })
}

/// Reads until the server closes (bounded).
async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(EXCHANGE_LIMIT, s.read_to_end(&mut buf)).await.expect("the server closes in time");
    buf
}

/// One request on a fresh connection (`Connection: close`); `None` when the server closed it
/// without an answer.
async fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> Option<Raw> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(head.as_bytes()).await;
    // The server may answer (and close) before reading the whole body; that is fine.
    let _ = s.write_all(body).await;
    parse(&read_all(&mut s).await)
}

fn head(method: &str, path: &str, headers: &[(&str, &str)], body_len: Option<usize>) -> String {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(n) = body_len {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    h + "\r\n"
}

/// One request over HTTP/3 with the given headers; the body is sent whole and finished.
async fn h3_exchange(
    c: &mut H3Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, http::HeaderMap, Vec<u8>) {
    let mut req = http::Request::builder().method(method).uri(format!("https://localhost:{}{path}", c.port));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut stream = c.send.send_request(req.body(()).unwrap()).await.unwrap();
    // A server that refuses from the headers stops the body (STOP_SENDING): like over
    // HTTP/1.1, the answer is what counts, not whether the whole body went out.
    // (After a refused write the stream must not be written again, not even to finish it: the
    // client's h3 would close the whole connection.)
    let sent = body.is_empty() || stream.send_data(Bytes::copy_from_slice(body)).await.is_ok();
    if sent {
        let _ = stream.finish().await;
    }
    let resp = stream.recv_response().await.unwrap();
    let mut out = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    (resp.status().as_u16(), resp.headers().clone(), out)
}

/// Opens a `POST path` stream with a JSON content type (the body is the caller's to send).
async fn h3_post(c: &mut H3Client, path: &str) -> h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{}{path}", c.port))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    c.send.send_request(req).await.unwrap()
}

fn completion(extra: Value) -> Vec<u8> {
    let mut b = json!({"prompt": "Once upon a time", "max_tokens": 4});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b.to_string().into_bytes()
}

/// One row: a request and the exact refusal it must get (on HTTP/1.1 and HTTP/3).
struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
    /// `(type, code, param)` of the error object.
    error: (&'static str, &'static str, Option<&'static str>),
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const API: (&str, &str) = ("Authorization", "Bearer sk-hostile");
const OPS: (&str, &str) = ("Authorization", "Bearer ops-hostile");

fn cases() -> Vec<Case> {
    let invalid = "invalid_request_error";
    let c = "/v1/completions";
    let huge_prompt = json!({"prompt": "a".repeat(4_000_000), "max_tokens": 4}).to_string().into_bytes();
    vec![
        Case {
            name: "text/plain completion (a cross-site simple request)",
            method: "POST",
            path: c,
            headers: vec![("Content-Type", "text/plain"), API],
            body: completion(json!({})),
            status: 415,
            error: (invalid, "unsupported_media_type", None),
        },
        Case {
            name: "completion without a content type",
            method: "POST",
            path: c,
            headers: vec![API],
            body: completion(json!({})),
            status: 415,
            error: (invalid, "unsupported_media_type", None),
        },
        Case {
            name: "text/plain soak report",
            method: "POST",
            path: "/ops/soak",
            headers: vec![("Content-Type", "text/plain;charset=UTF-8"), OPS],
            body: br#"{"requests": 1}"#.to_vec(),
            status: 415,
            error: (invalid, "unsupported_media_type", None),
        },
        Case {
            name: "soak report with a string where a number belongs",
            method: "POST",
            path: "/ops/soak",
            headers: vec![JSON, OPS],
            body: br#"{"requests": 10, "completion_tokens_per_s": "fast"}"#.to_vec(),
            status: 400,
            error: (invalid, "invalid_type", Some("completion_tokens_per_s")),
        },
        Case {
            name: "n above what the queue can ever hold (--max-waiting 2)",
            method: "POST",
            path: c,
            headers: vec![JSON, API],
            body: completion(json!({"n": 4})),
            status: 400,
            error: (invalid, "never_admissible", Some("n")),
        },
        Case {
            name: "top_k above the sampler's candidate set",
            method: "POST",
            path: c,
            headers: vec![JSON, API],
            body: completion(json!({"top_k": 2000, "temperature": 0.8})),
            status: 400,
            error: (invalid, "unsupported_parameter", Some("top_k")),
        },
        Case {
            name: "top_p that is zero as an f32",
            method: "POST",
            path: c,
            headers: vec![JSON, API],
            body: completion(json!({"top_p": 1e-50, "temperature": 0.8})),
            status: 400,
            error: (invalid, "invalid_value", Some("top_p")),
        },
        Case {
            name: "a 4 MB prompt, refused before tokenizing",
            method: "POST",
            path: c,
            headers: vec![JSON, API],
            body: huge_prompt,
            status: 400,
            error: (invalid, "context_length_exceeded", Some("prompt")),
        },
        Case {
            name: "GET on a POST route",
            method: "GET",
            path: c,
            headers: vec![API],
            body: Vec::new(),
            status: 405,
            error: (invalid, "method_not_allowed", None),
        },
        Case {
            name: "DELETE on the soak report",
            method: "DELETE",
            path: "/ops/soak",
            headers: vec![OPS],
            body: Vec::new(),
            status: 405,
            error: (invalid, "method_not_allowed", None),
        },
        Case {
            name: "an unknown route",
            method: "GET",
            path: "/admin",
            headers: vec![],
            body: Vec::new(),
            status: 404,
            error: (invalid, "not_found", None),
        },
        Case {
            name: "no API key",
            method: "POST",
            path: c,
            headers: vec![JSON],
            body: completion(json!({})),
            status: 401,
            error: ("authentication_error", "invalid_api_key", None),
        },
        Case {
            name: "the ops key on the API",
            method: "GET",
            path: "/v1/models",
            headers: vec![OPS],
            body: Vec::new(),
            status: 401,
            error: ("authentication_error", "invalid_api_key", None),
        },
        Case {
            name: "no ops key",
            method: "GET",
            path: "/ops/cluster",
            headers: vec![],
            body: Vec::new(),
            status: 401,
            error: ("authentication_error", "invalid_api_key", None),
        },
    ]
}

async fn keyed_server(model: &std::path::Path, opts: Options) -> TestServer {
    let opts = Options { api_keys: vec![API_KEY.into()], ops_keys: vec![OPS_KEY.into()], ..opts };
    start(model, opts).await
}

async fn h3_client(srv: &TestServer) -> H3Client {
    let cert = srv.server.cert_pem.clone().expect("a generated certificate");
    H3Client::connect(srv.server.h3_addr.expect("HTTP/3 on"), &cert).await
}

fn check_error(name: &str, transport: &str, status: u16, body: &[u8], case: &Case) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    assert_eq!(status, case.status, "{name} over {transport}: {v}");
    let (kind, code, param) = case.error;
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{name} over {transport}: {v}");
    assert_eq!(e["code"], code, "{name} over {transport}: {v}");
    assert_eq!(e["param"].as_str(), param, "{name} over {transport}: {v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{name} over {transport}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_exact_counted_and_names_its_request_on_both_transports() {
    let Some(model) = stories260k() else { return };
    let srv = keyed_server(&model, Options { max_waiting: 2, h3: true, ..Options::default() }).await;
    let addr = srv.server.http_addr;
    let run = async {
        let mut h3c = h3_client(&srv).await;
        let cases = cases();
        let mut counted = std::collections::BTreeMap::<&str, usize>::new();
        for (i, case) in cases.iter().enumerate() {
            let id = format!("hostile-{i}");
            let mut headers = case.headers.clone();
            headers.push(("x-request-id", &id));
            let len = (case.method == "POST").then_some(case.body.len());
            let r = exchange(addr, &head(case.method, case.path, &headers, len), &case.body).await.expect("an answer");
            check_error(case.name, "HTTP/1.1", r.status, &r.body, case);
            assert_eq!(r.header("x-request-id"), Some(id.as_str()), "{}: the client's id comes back", case.name);
            if case.status == 401 {
                assert!(r.header("www-authenticate").is_some(), "{}: a challenge", case.name);
            }
            let (status, h, body) = h3_exchange(&mut h3c, case.method, case.path, &headers, &case.body).await;
            check_error(case.name, "HTTP/3", status, &body, case);
            assert_eq!(h.get("x-request-id").unwrap(), id.as_str(), "{}", case.name);
            *counted.entry(case.error.1).or_default() += 2;
        }

        // Every one of them was counted once, under the code its body names.
        let metrics = exchange(addr, &head("GET", "/metrics", &[OPS], None), b"").await.unwrap();
        let text = String::from_utf8(metrics.body).unwrap();
        for (code, n) in counted {
            let line = format!("lockstep_request_errors_total{{error_type=\"{code}\"}} {n}\n");
            assert!(text.contains(&line), "expected {line:?} in\n{text}");
        }

        // Without a client id the server names the request itself; the API scheme is
        // case-insensitive like the ops one.
        let r = exchange(addr, &head("GET", "/v1/models", &[("Authorization", "bearer sk-hostile")], None), b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(r.header("x-request-id").is_some_and(|id| id.starts_with("lockstep-")), "{}", r.head);

        // A temperature down to the tiniest f32s gives the greedy answer, never garbage ids.
        let greedy = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0});
        let r = exchange(
            addr,
            &head("POST", "/v1/completions", &[JSON, API], Some(greedy.to_string().len())),
            greedy.to_string().as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        let want = r.json()["choices"][0]["token_ids"].clone();
        assert_eq!(want.as_array().map(Vec::len), Some(12));
        for t in [1e-40, 1.4e-45, 1.2e-38, 1e-6] {
            let body = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": t, "seed": 3}).to_string();
            let r = exchange(addr, &head("POST", "/v1/completions", &[JSON, API], Some(body.len())), body.as_bytes())
                .await
                .unwrap();
            assert_eq!(r.status, 200, "T = {t}");
            assert_eq!(r.json()["choices"][0]["token_ids"], want, "T = {t} over HTTP/1.1");
            let (status, _, b) = h3_exchange(&mut h3c, "POST", "/v1/completions", &[JSON, API], body.as_bytes()).await;
            assert_eq!(status, 200);
            assert_eq!(
                serde_json::from_slice::<Value>(&b).unwrap()["choices"][0]["token_ids"],
                want,
                "T = {t} over HTTP/3"
            );
        }
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
    srv.server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_idle_connections_and_trickled_bodies_are_cut_off() {
    let Some(model) = stories260k() else { return };
    let edge = EdgeLimits { header_timeout: Duration::from_secs(1), ..EdgeLimits::default() };
    let opts = Options { h3: true, edge, body_timeout: Duration::from_secs(1), ..Options::default() };
    let srv = start(&model, opts).await;
    let addr = srv.server.http_addr;
    let run = async {
        // Slow headers: half a head, then nothing — the connection is closed without an answer.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.unwrap();
        assert!(read_all(&mut s).await.is_empty(), "a trickled head gets no answer, only a close");

        // An idle keep-alive connection: one answer, then a close once the next head is late.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        let raw = read_all(&mut s).await;
        let r = parse(&raw).expect("the first request is answered");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "ok");

        // A trickled body: the head, ten bytes of a declared hundred, then silence → 408.
        let h = head("POST", "/v1/completions", &[JSON], Some(100));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(h.as_bytes()).await.unwrap();
        s.write_all(b"{\"prompt\":").await.unwrap();
        let r = parse(&read_all(&mut s).await).expect("an answer");
        assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"]["code"], "body_timeout");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");

        // The same over HTTP/3: a stream whose body never finishes gets 408 too.
        let mut h3c = h3_client(&srv).await;
        let mut stream = h3_post(&mut h3c, "/v1/completions").await;
        stream.send_data(Bytes::from_static(b"{\"prompt\":")).await.unwrap();
        let resp = stream.recv_response().await.unwrap();
        assert_eq!(resp.status().as_u16(), 408);
        let mut out = Vec::new();
        while let Ok(Some(mut chunk)) = stream.recv_data().await {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["error"]["code"], "body_timeout");
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
    srv.server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_http3_body_is_refused_from_its_headers() {
    let Some(model) = stories260k() else { return };
    let srv = keyed_server(&model, Options { h3: true, ..Options::default() }).await;
    let run = async {
        let mut h3c = h3_client(&srv).await;
        let mut stream = h3_post(&mut h3c, "/v1/completions").await;
        // A first piece of a 4 MB body, never finished: the answer must not wait for the rest.
        // (The server may already have stopped the body — STOP_SENDING — when this is sent.)
        let _ = stream.send_data(Bytes::from(vec![b' '; 64 << 10])).await;
        let resp = stream.recv_response().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        assert!(resp.headers().get("www-authenticate").is_some());
        let mut out = Vec::new();
        while let Ok(Some(mut chunk)) = stream.recv_data().await {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
    srv.server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_health_keeps_answering() {
    let Some(model) = stories260k() else { return };
    const MAX: usize = 40;
    // A long header timeout: the flood holds its slots for the whole test.
    let edge = EdgeLimits { header_timeout: Duration::from_secs(60), max_connections: MAX };
    let srv = start(&model, Options { edge, ..Options::default() }).await;
    let addr = srv.server.http_addr;
    let run = async {
        let mut flood = Vec::new();
        for _ in 0..MAX + 8 {
            flood.push(TcpStream::connect(addr).await.unwrap());
        }
        // Bounded wait until the server has taken every regular slot.
        let start = Instant::now();
        while srv.server.open_connections() < MAX {
            assert!(start.elapsed() < EXCHANGE_LIMIT, "the flood never filled the slots");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Past the cap, /health is still answered, and nothing else is.
        let r = exchange(addr, &head("GET", "/health", &[], None), b"").await.expect("/health answers at the cap");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "ok");
        assert!(r.header("x-request-id").is_some());
        let r = exchange(addr, &head("GET", "/v1/models", &[], None), b"").await.expect("an answer");
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["code"], "too_many_connections");
        assert_eq!(r.header("retry-after"), Some("1"));

        // A few hundred more: the server never holds more than the cap plus the overflow.
        for _ in 0..200 {
            if let Ok(s) = TcpStream::connect(addr).await {
                flood.push(s);
            }
            assert!(srv.server.open_connections() <= MAX + OVERFLOW_CONNECTIONS);
        }
        assert!(srv.server.open_connections() <= MAX + OVERFLOW_CONNECTIONS);
        drop(flood);
        // Once the flood is gone, everything is served again.
        let start = Instant::now();
        loop {
            let r = exchange(addr, &head("GET", "/v1/models", &[], None), b"").await;
            if r.as_ref().is_some_and(|r| r.status == 200) {
                break;
            }
            assert!(start.elapsed() < EXCHANGE_LIMIT, "the slots never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
    srv.server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_huge_prompts_do_not_delay_health() {
    let Some(model) = stories260k() else { return };
    let srv = start(&model, Options::default()).await;
    let addr = srv.server.http_addr;
    let run = async {
        let body = json!({"prompt": "Once upon a time ".repeat(235_000), "max_tokens": 4}).to_string();
        assert!(body.len() > 3_900_000 && body.len() < 4 << 20);
        let h = head("POST", "/v1/completions", &[JSON], Some(body.len()));
        let prompts: Vec<_> = (0..4)
            .map(|_| {
                let (h, body) = (h.clone(), body.clone());
                tokio::spawn(async move { exchange(addr, &h, body.as_bytes()).await })
            })
            .collect();
        let mut samples = Vec::new();
        for _ in 0..9 {
            let t = Instant::now();
            let r = exchange(addr, &head("GET", "/health", &[], None), b"").await.expect("/health answers");
            samples.push(t.elapsed());
            assert_eq!(r.status, 200);
        }
        for p in prompts {
            let r = p.await.unwrap().expect("an answer");
            assert_eq!(r.status, 400);
            assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
            assert_eq!(r.json()["error"]["param"], "prompt");
        }
        samples.sort();
        let median = samples[samples.len() / 2];
        assert!(
            median <= Duration::from_millis(100),
            "/health took {median:?} (median) under four 4 MB prompts: {samples:?}"
        );
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
    srv.server.shutdown(Duration::from_secs(2)).await;
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body).split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_running_streams_with_an_error_event_and_done_on_both_transports() {
    let Some(model) = stories260k() else { return };
    // Slow steps: the streams below cannot end within the grace period.
    let opts = Options { h3: true, step_delay: Some(Duration::from_millis(40)), ..Options::default() };
    let TestServer { server, state: _state } = start(&model, opts).await;
    let addr = server.http_addr;
    let run = async {
        let body =
            json!({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true}).to_string();
        // HTTP/1.1: read the head and the first event, then let the server shut down.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head("POST", "/v1/completions", &[JSON], Some(body.len())).as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("data: {") {
            let n = tokio::time::timeout(EXCHANGE_LIMIT, s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the stream started");
            seen.extend_from_slice(&buf[..n]);
        }
        // HTTP/3: the same, on its own stream.
        let cert = server.cert_pem.clone().unwrap();
        let mut h3c = H3Client::connect(server.h3_addr.unwrap(), &cert).await;
        let mut stream = h3_post(&mut h3c, "/v1/completions").await;
        stream.send_data(Bytes::from(body.clone())).await.unwrap();
        stream.finish().await.unwrap();
        assert_eq!(stream.recv_response().await.unwrap().status().as_u16(), 200);

        let shutdown = tokio::spawn(server.shutdown(Duration::from_millis(300)));
        // HTTP/1.1: a clean chunked end after an error event and [DONE].
        seen.extend(read_all(&mut s).await);
        let r = parse(&seen).expect("a response");
        assert_eq!(r.status, 200);
        assert!(
            r.wire_body.ends_with(b"0\r\n\r\n"),
            "the chunked terminator: {:?}",
            String::from_utf8_lossy(&r.wire_body)
        );
        let data = sse_data(&r.body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
        let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(err["error"]["code"], "shutting_down", "{err}");
        assert_eq!(err["error"]["type"], "service_unavailable_error", "{err}");

        // HTTP/3: the stream finishes cleanly with the same ending.
        let mut out = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.expect("a clean stream finish, not a reset") {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        let data = sse_data(&out);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
        let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(err["error"]["code"], "shutting_down", "{err}");
        shutdown.await.unwrap();
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forming_coordinator_answers_health_503_until_it_serves() {
    let Some(model) = stories260k() else { return };
    let run = async {
        let forming = InterimServer::start(
            "127.0.0.1:0".parse().unwrap(),
            forming_app("waiting for nodes".into()),
            EdgeLimits::default(),
        )
        .await
        .unwrap();
        let addr = forming.http_addr;
        let r = exchange(addr, &head("GET", "/health", &[], None), b"").await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.json(), json!({"status": "forming", "reason": "waiting for nodes", "replicas": []}));
        assert!(r.header("x-request-id").is_some());
        let r = exchange(addr, &head("GET", "/v1/models", &[], None), b"").await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["code"], "unavailable");
        assert_eq!(r.header("retry-after"), Some("5"));

        // The same listener then serves for real.
        let listener = forming.into_listener().await.unwrap();
        let srv = start(&model, Options::default()).await;
        let opts = lockstep_coordinator::api::ServeOptions { listen: addr, h3: None, edge: EdgeLimits::default() };
        let server = Server::start_on(listener, srv.state.clone(), opts).await.unwrap();
        let r = exchange(addr, &head("GET", "/health", &[], None), b"").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "ok");
        server.shutdown(Duration::from_secs(1)).await;
        srv.server.shutdown(Duration::from_secs(1)).await;
    };
    tokio::time::timeout(LIMIT, run).await.expect("bounded");
}

/// The address a `lockstep serve` prints after `marker` (bounded wait).
fn printed_addr(serve: &mut Watched, marker: &str) -> SocketAddr {
    serve.wait_for_stderr(LIMIT, |line| {
        line.split(marker).nth(1).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    })
}

const LOG_ENV: [(&str, &str); 2] = [("RUST_LOG", "info"), ("LOCKSTEP_LOG_FORMAT", "text")];

/// `lockstep serve` as a process: keys from a file and the environment (never only argv), an
/// empty key refused at start, and on SIGTERM a clean exit that removes its certificate directory.
#[test]
fn serve_takes_keys_from_files_and_env_refuses_empty_ones_and_cleans_up_on_sigterm() {
    let Some(model) = stories260k() else { return };
    let model = model.to_str().unwrap();

    let refused = Watched::lockstep(&["serve", "--model", model, "--api-key", "", "--no-h3"]);
    let (ok, _, err) = refused.wait(LIMIT);
    assert!(!ok);
    assert!(err.contains("an empty API key from the command line"), "{err}");

    let dir = scratch("hostile-keys");
    let ops_file = dir.join("ops-keys");
    std::fs::write(&ops_file, "# the ops key\nops-from-file\n").unwrap();
    let args = ["serve", "--model", model, "--listen", "127.0.0.1:0", "--canary-every", "0", "--ops-key-file"];
    let args: Vec<&str> = args.into_iter().chain([ops_file.to_str().unwrap()]).collect();
    let env = [LOG_ENV[0], LOG_ENV[1], ("LOCKSTEP_API_KEY", "api-from-env")];
    let mut serve = Watched::lockstep_with_env(&args, &env);
    let addr = printed_addr(&mut serve, "listening on http://");
    let cert_dir = std::env::temp_dir().join(format!("lockstep-serve-{}", serve.pid()));
    assert!(cert_dir.join("h3-cert.pem").is_file(), "the self-signed certificate is in {}", cert_dir.display());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let get = |path: &'static str, auth: Option<&'static str>| async move {
            let headers: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
            exchange(addr, &head("GET", path, &headers, None), b"").await.unwrap()
        };
        assert_eq!(get("/v1/models", None).await.status, 401);
        assert_eq!(get("/v1/models", Some("Bearer api-from-env")).await.status, 200);
        assert_eq!(get("/metrics", Some("Bearer api-from-env")).await.status, 401);
        assert_eq!(get("/metrics", Some("Bearer ops-from-file")).await.status, 200);
    });
    let term = std::process::Command::new("kill").args(["-TERM", &serve.pid().to_string()]).status().unwrap();
    assert!(term.success());
    let (ok, _, err) = serve.wait(LIMIT);
    assert!(ok, "serve exits cleanly on SIGTERM: {err}");
    assert!(!cert_dir.exists(), "{} is removed on shutdown", cert_dir.display());
}

/// A static coordinator waiting for nodes that never come answers `/health` with 503 `forming`
/// from the start (it used to have no HTTP listener at all until its cluster was ready).
#[test]
fn a_static_coordinator_waiting_for_nodes_answers_health_forming() {
    let Some(model) = stories260k() else { return };
    let tls = scratch("hostile-static");
    let tls = tls.to_str().unwrap();
    for args in [vec!["certs", "init", "--dir", tls], vec!["certs", "issue", "--dir", tls, "--name", "coordinator"]] {
        let (ok, _, err) = Watched::lockstep(&args).wait(LIMIT);
        assert!(ok, "{args:?}: {err}");
    }
    let mut serve = Watched::lockstep_with_env(
        &["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--no-h3", "--nodes", "static"]
            .into_iter()
            .chain(["--tls-dir", tls, "--join-timeout", "120", "--canary-every", "0"])
            .collect::<Vec<_>>(),
        &LOG_ENV,
    );
    let addr = printed_addr(&mut serve, "answering /health (forming) on http://");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let r = rt.block_on(exchange(addr, &head("GET", "/health", &[], None), b"")).expect("an answer");
    serve.kill();
    assert_eq!(r.status, 503);
    let v = r.json();
    assert_eq!(v["status"], "forming", "{v}");
    assert_eq!(v["reason"], "waiting for nodes to join and form groups (static membership)", "{v}");
}
