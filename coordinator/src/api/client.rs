//! A small HTTP/1.1 client for the API (hyper's connection-level client on one kept-alive TCP
//! connection): what `lockstep loadgen`, `lockstep soak` and the tests use to talk to a server.
//! Loopback or whatever the operator points it at; it never picks an address itself. Streams are
//! read with the one SSE parser, [`super::sse`].

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::sse::{SseError, SseParser, StreamEvent};

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
    /// The URL's path (`http://host:port/api` → `/api`), put before every request's path, for a
    /// server behind a proxy that routes by prefix.
    prefix: String,
    api_key: Option<String>,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(addr: SocketAddr, api_key: Option<String>) -> Self {
        Client { addr, authority: addr.to_string(), prefix: String::new(), api_key, conn: None }
    }

    pub fn from_url(url: &str, api_key: Option<String>) -> Result<Self> {
        let (addr, authority) = parse_url(url)?;
        let path = url["http://".len() + authority.len()..].trim_end_matches('/');
        Ok(Client { addr, authority, prefix: path.to_string(), api_key, conn: None })
    }

    /// A client of the same server and key on a connection of its own.
    pub fn fresh(&self) -> Client {
        Client {
            addr: self.addr,
            authority: self.authority.clone(),
            prefix: self.prefix.clone(),
            api_key: self.api_key.clone(),
            conn: None,
        }
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
        let uri = format!("{}{path}", self.prefix);
        let mut req = Request::builder().method(method).uri(uri).header(http::header::HOST, &self.authority);
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

    /// A request with an optional JSON body whose response body is read whole.
    pub async fn bytes(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, HeaderMap, Bytes)> {
        let (bytes, headers): (Bytes, &[(&str, &str)]) = match body {
            Some(b) => (Bytes::from(serde_json::to_vec(b)?), &[("content-type", "application/json")]),
            None => (Bytes::new(), &[]),
        };
        let resp = self.send(method, path, headers, bytes).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// A request whose response is read whole and parsed as JSON (`Value::Null` when it is not).
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, HeaderMap, Value)> {
        let (status, headers, bytes) = self.bytes(method, path, body).await?;
        Ok((status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
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
        Ok((parts.status, Sse { body, parser: SseParser::default() }))
    }

    /// The model the server serves: the first of `/v1/models`.
    pub async fn served_model(&mut self) -> Result<String> {
        let (status, _, body) = self.get("/v1/models").await?;
        if !status.is_success() {
            bail!("GET /v1/models answered {status}: {body}");
        }
        body["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("GET /v1/models lists no model: {body}"))
    }
}

/// A server-sent event stream being read. Dropping it hangs up (the server then cancels).
pub struct Sse {
    body: Incoming,
    parser: SseParser,
}

impl Sse {
    /// The `data:` payload of the next event (`[DONE]` included); `None` at the end of the body.
    pub async fn next_data(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(data) = self.parser.next_data()? {
                return Ok(Some(data));
            }
            match self.body.frame().await {
                None => {
                    self.parser.finish()?;
                    return Ok(None);
                }
                Some(f) => {
                    if let Ok(d) = f?.into_data() {
                        self.parser.push(&d);
                    }
                }
            }
        }
    }

    /// The next chunk of a completion stream; `None` at `[DONE]`. An error event, or a body that
    /// ends before `[DONE]`, is an error.
    pub async fn next_chunk(&mut self) -> Result<Option<Value>> {
        match self.next_data().await? {
            None => Err(SseError::EndedWithoutDone.into()),
            Some(d) => match StreamEvent::from_data(&d)? {
                StreamEvent::Chunk(v) => Ok(Some(v)),
                StreamEvent::Done => Ok(None),
            },
        }
    }

    /// The rest of the body as text: for an answer that is not a stream (an error's JSON).
    pub async fn into_text(self) -> Result<String> {
        let mut bytes = self.parser.into_unparsed();
        bytes.extend_from_slice(&self.body.collect().await?.to_bytes());
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Every chunk up to `[DONE]` (which must come; an error event fails the whole stream).
    pub async fn collect_json(mut self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        while let Some(v) = self.next_chunk().await? {
            out.push(v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Client;

    #[test]
    fn a_url_path_prefixes_every_request_path() {
        let c = Client::from_url("http://127.0.0.1:8000", None).unwrap();
        assert_eq!((c.authority.as_str(), c.prefix.as_str()), ("127.0.0.1:8000", ""));
        let c = Client::from_url("http://127.0.0.1:9/api/", Some("k".into())).unwrap();
        assert_eq!((c.authority.as_str(), c.prefix.as_str()), ("127.0.0.1:9", "/api"));
        let f = c.fresh();
        assert_eq!((f.prefix.as_str(), f.api_key.as_deref()), ("/api", Some("k")));
        assert!(Client::from_url("https://127.0.0.1:9", None).is_err());
    }
}
