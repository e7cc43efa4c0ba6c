//! The TLS and QUIC settings every lockstep endpoint uses, and the checks made on a peer once the
//! handshake is done.
//!
//! Both directions trust exactly the cluster CA of the process's [`TlsIdentity`]: the server side
//! requires a client certificate chaining to it, the client side verifies the server against it.
//! TLS 1.3 only, ring provider only. The QUIC transport allows one bidirectional stream per
//! connection (the message stream) and nothing else, with flow-control windows sized for
//! multi-megabyte ring frames.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use crate::certs::TlsIdentity;
use crate::error::{alpn_str, close_code, NetError};

/// How often an idle connection sends a keep-alive, so that the idle timeout only fires when the
/// peer is really gone.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// How long a connection may hear nothing from its peer before it is declared dead. Also bounds
/// the QUIC handshake.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-stream flow-control window: large enough that a multi-megabyte ring frame flows without
/// waiting for window updates.
const STREAM_WINDOW: u32 = 16 << 20;
/// Bytes of data in flight per connection before the sender waits for acknowledgements.
const SEND_WINDOW: u64 = 64 << 20;

/// The name a certificate identifies: its subject common name, else its first DNS SAN.
pub fn certificate_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert.subject().iter_common_name().find_map(|cn| cn.as_str().ok()) {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
        _ => None,
    })
}

/// Builds the server and client QUIC configurations for `identity` speaking `alpn`.
pub(crate) fn quic_configs(
    identity: &TlsIdentity,
    alpn: &'static [u8],
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), NetError> {
    let tls = |e: rustls::Error| NetError::TlsConfig(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in identity.roots() {
        roots.add(ca.clone()).map_err(|e| NetError::TlsConfig(format!("cluster CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);

    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| NetError::TlsConfig(format!("client certificate verifier: {e}")))?;
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(identity.chain().to_vec(), identity.key().clone_key())
        .map_err(tls)?;
    server_tls.alpn_protocols = vec![alpn.to_vec()];

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())
        .map_err(tls)?;
    client_tls.alpn_protocols = vec![alpn.to_vec()];

    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT.as_millis() as u32).into()))
        // One bidirectional stream per connection, opened by the acceptor; nothing else.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .send_window(SEND_WINDOW);
    let transport = Arc::new(transport);

    let quic_server = QuicServerConfig::try_from(server_tls).map_err(|e| NetError::TlsConfig(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    server_config.transport_config(transport.clone());
    let quic_client = QuicClientConfig::try_from(client_tls).map_err(|e| NetError::TlsConfig(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
    client_config.transport_config(transport);
    Ok((server_config, client_config))
}

/// Checks what TLS negotiated (rustls already refused a wrong ALPN or an untrusted certificate;
/// this catches a peer that offered no ALPN at all) and returns the peer's certificate name.
pub(crate) fn check_peer(connection: &quinn::Connection, alpn: &[u8]) -> Result<String, NetError> {
    let protocol = connection
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if protocol.as_deref() != Some(alpn) {
        connection.close(close_code::REFUSED.into(), b"ALPN mismatch");
        let got = protocol.map_or_else(|| "none".to_owned(), |p| alpn_str(&p));
        return Err(NetError::AlpnMismatch { ours: alpn_str(alpn), detail: format!(": peer negotiated {got}") });
    }
    let certs = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(NetError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(NetError::NoPeerCertificate)?;
    certificate_name(leaf).ok_or_else(|| {
        connection.close(close_code::REFUSED.into(), b"certificate names nobody");
        NetError::InvalidPeerCertificate { detail: "it has neither a common name nor a DNS name".into() }
    })
}
