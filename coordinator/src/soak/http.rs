//! A deliberately small HTTP/1.1 client for the soak and load tools: one blocking request per
//! connection over `std::net::TcpStream`, JSON bodies, `Content-Length` or chunked responses,
//! and incremental reading of server-sent events. Plain `http://` only: the tools talk to a
//! cluster on the operator's own network, usually loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("unsupported URL {0:?} (expected http://host:port[/path])")]
    Url(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// `http://host:port/base` split into the address and the path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub addr: String,
    pub host: String,
    pub prefix: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| HttpError::Url(url.into()))?;
        let (hostport, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, String::new()));
        if hostport.is_empty() {
            return Err(HttpError::Url(url.into()));
        }
        let addr = if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:80") };
        Ok(BaseUrl { addr, host: hostport.to_string(), prefix: path.trim_end_matches('/').to_string() })
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.host, self.prefix, path)
    }
}

/// A response whose body is read as it arrives.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    chunked: bool,
    remaining: Option<usize>,
    chunk_left: usize,
    done: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Up to `buf.len()` body bytes; 0 at the end of the body.
    pub fn read_body(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        if self.done {
            return Ok(0);
        }
        if self.chunked {
            if self.chunk_left == 0 {
                let mut line = String::new();
                self.reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| HttpError::Malformed(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    self.done = true;
                    return Ok(0);
                }
                self.chunk_left = size;
            }
            let take = self.chunk_left.min(buf.len());
            let n = self.reader.read(&mut buf[..take])?;
            if n == 0 {
                return Err(HttpError::Malformed("connection closed inside a chunk".into()));
            }
            self.chunk_left -= n;
            if self.chunk_left == 0 {
                let mut crlf = [0u8; 2];
                self.reader.read_exact(&mut crlf)?;
            }
            return Ok(n);
        }
        let want = match self.remaining {
            Some(0) => {
                self.done = true;
                return Ok(0);
            }
            Some(r) => r.min(buf.len()),
            None => buf.len(),
        };
        let n = self.reader.read(&mut buf[..want])?;
        if n == 0 {
            self.done = true;
        }
        if let Some(r) = self.remaining.as_mut() {
            *r -= n;
        }
        Ok(n)
    }

    pub fn body_string(&mut self) -> Result<String, HttpError> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = self.read_body(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).map_err(|e| HttpError::Malformed(e.to_string()))
    }

    /// Server-sent events: calls `on_data` with each `data:` payload until the body ends or
    /// `on_data` returns false (the caller hangs up).
    pub fn for_each_event(&mut self, mut on_data: impl FnMut(&str) -> bool) -> Result<(), HttpError> {
        let mut pending = String::new();
        let mut buf = [0u8; 8 * 1024];
        loop {
            let n = self.read_body(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        if !on_data(data.trim_start()) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

/// Send one request (`body` as JSON when given) and read the status line and headers.
pub fn request(
    base: &BaseUrl,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let stream = TcpStream::connect(&base.addr)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut head = format!("{method} {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", base.prefix, base.host);
    if let Some(k) = bearer {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut w = &stream;
    w.write_all(head.as_bytes())?;
    if let Some(b) = body {
        w.write_all(b.as_bytes())?;
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
    let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let remaining = find("content-length").and_then(|v| v.parse().ok());
    Ok(Response { status, headers, reader, chunked, remaining, chunk_left: 0, done: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = BaseUrl::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!((u.addr.as_str(), u.prefix.as_str()), ("127.0.0.1:8000", ""));
        let u = BaseUrl::parse("http://localhost:9/api/").unwrap();
        assert_eq!((u.addr.as_str(), u.prefix.as_str()), ("localhost:9", "/api"));
        assert!(BaseUrl::parse("https://x").is_err());
    }

    #[test]
    fn chunked_and_sse_bodies_are_read() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            let body = "data: {\"a\":1}\n\ndata: [DONE]\n\n";
            let (a, b) = body.split_at(10);
            write!(
                s,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            )
            .unwrap();
        });
        let base = BaseUrl::parse(&format!("http://{addr}")).unwrap();
        let mut r = request(&base, "POST", "/x", Some("{}"), None, Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200);
        let mut events = Vec::new();
        r.for_each_event(|d| {
            events.push(d.to_string());
            true
        })
        .unwrap();
        assert_eq!(events, ["{\"a\":1}", "[DONE]"]);
        server.join().unwrap();
    }
}
