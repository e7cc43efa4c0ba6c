//! The same API over HTTP/3: QUIC (quinn, rustls with the ring provider, TLS 1.3) and `h3`.
//!
//! There is one router. Each HTTP/3 request is bridged into it with
//! [`tower::ServiceExt::oneshot`]: the key is checked from the headers before a byte of the body
//! is read (a refused request's body is never taken in); otherwise the body is handed to the
//! router as a stream read on demand, so the router's size cap and body timeout apply exactly as
//! on HTTP/1.1 and nothing is buffered ahead. The response body is forwarded frame by frame, so
//! server-sent events stream over HTTP/3 exactly as over HTTP/1.1. QUIC flow control bounds what
//! a client can push unread: [`STREAM_RECEIVE_WINDOW`] per stream, [`CONNECTION_RECEIVE_WINDOW`]
//! per connection. Connections share `--max-connections` with HTTP/1.1. When the
//! client resets the stream, the next write fails, the response body is dropped, and with it the
//! request's submissions: the sequences are aborted like on a closed TCP connection.
//!
//! The server certificate is `server.pem` / `server.key` from a TLS directory when given, else a
//! self-signed one made at start-up (for `localhost`, `127.0.0.1`, `::1` and the listen address)
//! whose PEM is written to a file so that clients can trust it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use axum::Router;
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tower::ServiceExt;

use crate::api::{auth, stopped, ConnectionSlots, Inflight};
use crate::state::AppState;

/// Most unread request bytes QUIC lets a client send on one stream.
pub const STREAM_RECEIVE_WINDOW: u32 = 256 << 10;
/// Most unread request bytes QUIC lets a client send on one connection, all streams together.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 4 << 20;
/// Most request streams a client may open at once on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 64;

/// The ALPN protocol id of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

/// Where the HTTP/3 server certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// A PEM certificate chain and its PEM private key.
    Files { cert: PathBuf, key: PathBuf },
    /// Generate a self-signed certificate and write its PEM to `pem_out`.
    SelfSigned { pem_out: PathBuf },
}

impl TlsSource {
    /// `dir/server.pem` + `dir/server.key` when both exist, else a self-signed certificate
    /// written to `pem_out`.
    pub fn from_dir_or_self_signed(dir: Option<&Path>, pem_out: PathBuf) -> Self {
        if let Some(d) = dir {
            let (cert, key) = (d.join("server.pem"), d.join("server.key"));
            if cert.is_file() && key.is_file() {
                return TlsSource::Files { cert, key };
            }
        }
        TlsSource::SelfSigned { pem_out }
    }
}

/// A certificate chain and key, and where a generated certificate's PEM was written.
pub struct TlsMaterial {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub generated_pem: Option<PathBuf>,
}

impl TlsMaterial {
    pub fn load(source: &TlsSource, listen: SocketAddr) -> Result<Self> {
        match source {
            TlsSource::Files { cert, key } => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| anyhow!("{}: {e}", cert.display()))?;
                if chain.is_empty() {
                    return Err(anyhow!("{}: no certificate in the file", cert.display()));
                }
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow!("{}: {e}", key.display()))?;
                Ok(TlsMaterial { chain, key, generated_pem: None })
            }
            TlsSource::SelfSigned { pem_out } => {
                let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
                let ip = listen.ip();
                if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
                    names.push(ip.to_string());
                }
                let ck = rcgen::generate_simple_self_signed(names).context("generating the HTTP/3 certificate")?;
                if let Some(parent) = pem_out.parent() {
                    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                }
                std::fs::write(pem_out, ck.cert.pem()).with_context(|| format!("writing {}", pem_out.display()))?;
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
                Ok(TlsMaterial { chain: vec![ck.cert.der().clone()], key, generated_pem: Some(pem_out.clone()) })
            }
        }
    }
}

/// A QUIC endpoint speaking HTTP/3 with `tls`.
pub fn bind(addr: SocketAddr, tls: &TlsMaterial) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())
        .context("the HTTP/3 certificate and key do not match")?;
    server_tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(|e| anyhow!("{e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .max_concurrent_bidi_streams(MAX_CONCURRENT_STREAMS.into())
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("idle timeout")));
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, addr).with_context(|| format!("binding HTTP/3 on udp {addr}"))
}

/// What every HTTP/3 request needs: the router, the state (keys, body timeout) and the count.
#[derive(Clone)]
pub struct Bridge {
    pub router: Router,
    pub state: Arc<AppState>,
    pub inflight: Inflight,
}

/// Accepts connections until `stop` is set, each within a slot of `slots` (a connection past the
/// cap is refused at once); on `stop` every connection gets GOAWAY and finishes the requests it
/// has.
pub async fn serve(endpoint: quinn::Endpoint, bridge: Bridge, slots: ConnectionSlots, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = stopped(&mut stop) => return,
        };
        let Some(permit) = slots.take_normal() else {
            incoming.refuse();
            continue;
        };
        let bridge = bridge.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(conn) = incoming.await else { return };
            let quic = conn.clone();
            let Ok(mut h3) = h3::server::builder().build::<_, Bytes>(h3_quinn::Connection::new(conn)).await else {
                return;
            };
            let mut requests = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    // Ends on GOAWAY, when the client closes, or on a connection error.
                    r = h3.accept() => match r {
                        Ok(Some(resolver)) => {
                            let bridge = bridge.clone();
                            // A failed request (a reset stream, a client gone) concerns that request only.
                            requests.spawn(async move { let _ = handle(resolver, bridge).await; });
                        }
                        _ => break,
                    },
                    _ = stopped(&mut stop) => {
                        // GOAWAY: no new requests; those in flight run on (cut at the grace's end).
                        let _ = h3.shutdown(0).await;
                        break;
                    }
                }
            }
            while requests.join_next().await.is_some() {}
            // Only the peer that receives last can close without losing data: wait for the
            // client to close (or the server's own close at the end of a shutdown).
            quic.closed().await;
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body read from the HTTP/3 stream as the handler asks for it: nothing is buffered
/// ahead beyond one chunk, so the router's limits (size, body timeout) apply exactly as on
/// HTTP/1.1, and a body nobody reads (a refused request) is never taken in.
struct StreamedBody(tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>);

impl http_body::Body for StreamedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|r| r.map(|r| r.map(http_body::Frame::data)))
    }
}

async fn handle(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    bridge: Bridge,
) -> Result<(), BoxError> {
    let _inflight = bridge.inflight.clone();
    let (req, stream) = resolver.resolve_request().await?;
    let (mut send, mut recv) = stream.split();
    // The key is checked from the headers alone: a refused request's body is never read (the
    // router answers 401 from the same rule, with no body to look at).
    let refused = auth::check(req.uri().path(), req.headers(), &bridge.state.auth).is_err();
    let (parts, ()) = req.into_parts();
    let (body, pump) = if refused {
        (axum::body::Body::empty(), None)
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let pump = tokio::spawn(async move {
            loop {
                let chunk = match recv.recv_data().await {
                    Ok(Some(mut c)) => Ok(c.copy_to_bytes(c.remaining())),
                    Ok(None) => return,
                    Err(e) => Err(BoxError::from(e)),
                };
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        });
        (axum::body::Body::new(StreamedBody(rx)), Some(pump))
    };
    let req = http::Request::from_parts(parts, body);
    let resp = bridge.router.oneshot(req).await.unwrap_or_else(|e: Infallible| match e {});
    let (parts, mut body) = resp.into_parts();
    let result = async {
        send.send_response(http::Response::from_parts(parts, ())).await?;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                if !data.is_empty() {
                    send.send_data(data).await?;
                }
            }
        }
        send.finish().await?;
        Ok::<(), BoxError>(())
    }
    .await;
    // Whatever of the body was not read stays unread: stop taking it in.
    if let Some(p) = pump {
        p.abort();
    }
    result
}
