//! The same API over HTTP/3: QUIC (quinn, rustls with the ring provider, TLS 1.3) and `h3`.
//!
//! There is one router. Each HTTP/3 request is bridged into it with
//! [`tower::ServiceExt::oneshot`]: the request body is collected (at most
//! [`MAX_BODY_BYTES`](crate::api::error::MAX_BODY_BYTES) plus one byte, so the router's own limit
//! answers 413 without the bridge buffering an endless body), and the response body is forwarded
//! frame by frame, so server-sent events stream over HTTP/3 exactly as over HTTP/1.1. When the
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
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tower::ServiceExt;

use crate::api::error::MAX_BODY_BYTES;

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
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("idle timeout")));
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, addr).with_context(|| format!("binding HTTP/3 on udp {addr}"))
}

/// Accepts connections until the endpoint is closed; every request goes to `router`.
pub async fn serve(endpoint: quinn::Endpoint, router: Router) {
    while let Some(incoming) = endpoint.accept().await {
        let router = router.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok(mut h3) = h3::server::builder().build::<_, Bytes>(h3_quinn::Connection::new(conn)).await else {
                return;
            };
            // Ends on GOAWAY, when the client closes, or on a connection error.
            while let Ok(Some(resolver)) = h3.accept().await {
                let router = router.clone();
                tokio::spawn(async move {
                    // A failed request (a reset stream, a client gone) concerns that request only.
                    let _ = handle(resolver, router).await;
                });
            }
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn handle(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    router: Router,
) -> Result<(), BoxError> {
    let (req, stream) = resolver.resolve_request().await?;
    let (mut send, mut recv) = stream.split();
    let mut body = BytesMut::new();
    while let Some(mut chunk) = recv.recv_data().await? {
        // One byte past the cap is enough for the router to answer 413.
        let room = (MAX_BODY_BYTES + 1).saturating_sub(body.len());
        let take = chunk.remaining().min(room);
        body.extend_from_slice(&chunk.copy_to_bytes(take));
        if body.len() > MAX_BODY_BYTES {
            break;
        }
    }
    let (parts, ()) = req.into_parts();
    let req = http::Request::from_parts(parts, axum::body::Body::from(body.freeze()));
    let resp = router.oneshot(req).await.unwrap_or_else(|e: Infallible| match e {});
    let (parts, mut body) = resp.into_parts();
    send.send_response(http::Response::from_parts(parts, ())).await?;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if !data.is_empty() {
                send.send_data(data).await?;
            }
        }
    }
    send.finish().await?;
    Ok(())
}
