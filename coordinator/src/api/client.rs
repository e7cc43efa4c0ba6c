//! A small HTTP/1.1 client for the API (hyper's connection-level client on one kept-alive TCP
//! connection): what `lockstep loadgen` and the tests use to talk to a server. Loopback or
//! whatever the operator points it at; it never picks an address itself.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// `http://HOST:PORT[/...]` → the socket address and the `Host` header value.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow!("{url}: only http:// URLs are supported"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .with_context(|| format!("{url}: bad host:port"))?
        .next()
        .ok_or_else(|| anyhow!("{url}: no address"))?;
    Ok((addr, authority.to_string()))
}

/// One kept-alive connection; it reconnects when the server closed the previous one.
pub struct Client {
    addr: SocketAddr,
    authority: String,
    api_key: Option<String>,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(addr: SocketAddr, api_key: Option<String>) -> Self {
        Client { addr, authority: addr.to_string(), api_key, conn: None }
    }

    pub fn from_url(url: &str, api_key: Option<String>) -> Result<Self> {
        let (addr, authority) = parse_url(url)?;
        Ok(Client { addr, authority, api_key, conn: None })
    }

    async fn connection(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        if let Some(c) = &mut self.conn {
            if c.ready().await.is_ok() {
                return Ok(self.conn.as_mut().expect("connection"));
            }
        }
        let tcp =
            tokio::net::TcpStream::connect(self.addr).await.with_context(|| format!("connecting {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(self.conn.insert(sender))
    }

    /// Sends a request with a raw body and extra headers; the response body is not read.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response<Incoming>> {
        let mut req = Request::builder().method(method).uri(path).header(http::header::HOST, &self.authority);
        if let Some(k) = &self.api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into()))?;
        let conn = self.connection().await?;
        match conn.send_request(req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// A request whose response is read whole and parsed as JSON (`Value::Null` when it is not).
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, HeaderMap, Value)> {
        let (bytes, headers): (Bytes, &[(&str, &str)]) = match body {
            Some(b) => (Bytes::from(serde_json::to_vec(b)?), &[("content-type", "application/json")]),
            None => (Bytes::new(), &[]),
        };
        let resp = self.send(method, path, headers, bytes).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, HeaderMap, Value)> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Result<(StatusCode, HeaderMap, Value)> {
        self.json(Method::POST, path, Some(body)).await
    }

    /// POSTs a streaming request; the events are read from the returned [`Sse`].
    pub async fn post_stream(&mut self, path: &str, body: &Value) -> Result<(StatusCode, Sse)> {
        let bytes = Bytes::from(serde_json::to_vec(body)?);
        let resp = self.send(Method::POST, path, &[("content-type", "application/json")], bytes).await?;
        let (parts, body) = resp.into_parts();
        Ok((parts.status, Sse { body, buf: Vec::new() }))
    }
}

/// A server-sent event stream being read.
pub struct Sse {
    body: Incoming,
    buf: Vec<u8>,
}

impl Sse {
    /// The `data:` payload of the next event (`[DONE]` included); `None` at the end of the body.
    pub async fn next_data(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(event).map_err(|_| anyhow!("event is not UTF-8"))?;
                let data: Vec<&str> =
                    text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => {
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        return Ok(None);
                    }
                    bail!("the stream ended inside an event");
                }
                Some(f) => {
                    if let Ok(d) = f?.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    /// Every event's JSON up to `[DONE]` (which must come).
    pub async fn collect_json(mut self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data().await? {
            if d == "[DONE]" {
                return Ok(out);
            }
            out.push(serde_json::from_str(&d).with_context(|| format!("bad event {d:?}"))?);
        }
        bail!("the stream ended without [DONE]")
    }
}
