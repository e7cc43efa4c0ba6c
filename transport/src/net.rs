//! Mutual-TLS QUIC transport for lockstep's wire protocol.
//!
//! One [`Endpoint`] per process and UDP port acts as both server and client: the coordinator dials
//! nodes, nodes accept the coordinator and dial their ring successor, all on the same socket. Every
//! connection is mutual TLS 1.3 against the cluster CA ([`crate::certs`]): the acceptor *requires*
//! a client certificate signed by the CA, the dialler checks the acceptor's certificate against the
//! CA and the name it expects, and both learn the other's name ([`Conn::peer_name`]) from the
//! certificate, so authorisation ("only my ring predecessor may connect here") is a string compare.
//!
//! The application protocol is negotiated with ALPN ([`ALPN`], `lockstep/1`), which names the
//! protocol version: two incompatible builds fail the handshake with "peer does not speak
//! lockstep/1" instead of misparsing each other's frames.
//!
//! Each connection carries exactly one bidirectional stream, the message channel, holding frames of
//! [`lockstep_proto::wire`]; QUIC gives it ordering, flow control and loss recovery, and the
//! connection gives keep-alives ([`KEEP_ALIVE`]) and an idle timeout ([`IDLE_TIMEOUT`]) so a dead
//! or partitioned peer is an error within seconds rather than a hang. The acceptor opens the stream
//! and writes a short preface before anything else: in TLS 1.3 the dialler's handshake completes
//! *before* the acceptor has verified the dialler's certificate, so waiting for the preface is how
//! [`Endpoint::connect`] learns that it was actually accepted (a refused certificate then surfaces
//! from `connect`, not from the first `recv`).
//!
//! A [`Conn`] can be shared between tasks (its methods take `&self`), or [`split`](Conn::split)
//! into a cloneable [`ConnSender`] and a [`ConnReceiver`]: a node receives `Step`s in one task while
//! another sends heartbeats. Receiving is cancel-safe (a `recv` dropped in a `select!` loses no
//! bytes); sending is not, and a send abandoned midway poisons the sender, since half a frame is on
//! the stream.
//!
//! Only the ring crypto provider is used (no aws-lc-rs), and only TLS 1.3 (which QUIC requires).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lockstep_proto::wire::{self, Frame, FrameDecoder, WireError, ALPN};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportErrorCode, VarInt};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::sync::{mpsc, Mutex};

use crate::certs::TlsIdentity;

/// The server name [`Endpoint::connect`] callers use when they do not know the peer's certificate
/// name: every certificate from [`crate::certs::issue`] is valid for it. Passing the peer's node
/// name instead also checks *which* cluster member answered.
pub const DEFAULT_SERVER_NAME: &str = "localhost";

/// How often an idle connection sends a keep-alive, so that the idle timeout only fires when the
/// peer is really gone.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// How long a connection may hear nothing from its peer before it is declared dead. Also bounds
/// the QUIC handshake.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Endpoint::connect`] waits, after the TLS handshake, for the acceptor to open the
/// message stream.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections handshaken but not yet taken by [`Endpoint::accept`]; more are closed as busy.
pub const ACCEPT_QUEUE: usize = 64;

/// Application close codes (QUIC `CONNECTION_CLOSE` with an application error code).
pub mod close_code {
    /// Orderly close ([`super::Conn::close`]).
    pub const NORMAL: u32 = 0;
    /// The peer sent bytes that are not valid frames.
    pub const PROTOCOL: u32 = 1;
    /// The acceptor's queue of unaccepted connections is full.
    pub const BUSY: u32 = 2;
    /// The peer failed a check after the TLS handshake (ALPN, certificate name).
    pub const REFUSED: u32 = 3;

    /// A human-readable name for a close code.
    pub fn name(code: u64) -> &'static str {
        match code {
            0 => "closed",
            1 => "protocol violation",
            2 => "busy",
            3 => "refused",
            _ => "unknown close code",
        }
    }
}

/// Per-stream flow-control window: large enough that a multi-megabyte ring frame flows without
/// waiting for window updates.
const STREAM_WINDOW: u32 = 16 << 20;
/// Bytes of data in flight per connection before the sender waits for acknowledgements.
const SEND_WINDOW: u64 = 64 << 20;
/// Bytes read from the stream per call before the decoder looks at them: also the most that is
/// buffered before an over-cap length prefix is noticed.
const READ_CHUNK: usize = 64 << 10;

/// What can go wrong on the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("TLS configuration error: {0}")]
    TlsConfig(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("cannot resolve {addr:?}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("peer certificate is not signed by the cluster CA ({detail})")]
    UntrustedPeerCertificate { detail: String },
    #[error("peer certificate is invalid ({detail})")]
    InvalidPeerCertificate { detail: String },
    #[error("peer presented no certificate (mutual TLS with a cluster certificate is required)")]
    NoPeerCertificate,
    #[error("the peer rejected our certificate: {hint} (TLS alert {alert})")]
    CertificateRejectedByPeer { alert: String, hint: String },
    #[error("peer does not speak {ours} (ALPN mismatch{detail})")]
    AlpnMismatch { ours: String, detail: String },
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("connection closed by peer: {reason}")]
    Closed { reason: String },
    #[error("connection timed out: nothing heard from the peer for {}s (it died, hung, or the network dropped)", IDLE_TIMEOUT.as_secs())]
    TimedOut,
    #[error("connection reset by peer (it restarted or forgot the connection)")]
    Reset,
    #[error("connection was closed locally")]
    LocallyClosed,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("frame error: {0}")]
    Wire(#[from] WireError),
    #[error("QUIC transport error: {0}")]
    Transport(String),
}

impl NetError {
    /// A stable machine-readable name for logs and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            NetError::TlsConfig(_) => "tls_config",
            NetError::Io { .. } => "io",
            NetError::Resolve { .. } => "resolve",
            NetError::Connect { .. } => "connect",
            NetError::UntrustedPeerCertificate { .. } => "untrusted_peer_certificate",
            NetError::InvalidPeerCertificate { .. } => "invalid_peer_certificate",
            NetError::NoPeerCertificate => "no_peer_certificate",
            NetError::CertificateRejectedByPeer { .. } => "certificate_rejected_by_peer",
            NetError::AlpnMismatch { .. } => "alpn_mismatch",
            NetError::Handshake(_) => "handshake",
            NetError::Closed { .. } => "closed",
            NetError::TimedOut => "timed_out",
            NetError::Reset => "reset",
            NetError::LocallyClosed => "locally_closed",
            NetError::Protocol(_) => "protocol",
            NetError::Wire(_) => "wire",
            NetError::Transport(_) => "transport",
        }
    }

    /// Whether the connection is gone (as opposed to a refused handshake or a local mistake): the
    /// peer closed, reset or stopped answering, or we closed it.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, NetError::Closed { .. } | NetError::TimedOut | NetError::Reset | NetError::LocallyClosed)
    }

    /// Whether a certificate is the problem, on either side.
    pub fn is_certificate_problem(&self) -> bool {
        matches!(
            self,
            NetError::UntrustedPeerCertificate { .. }
                | NetError::InvalidPeerCertificate { .. }
                | NetError::NoPeerCertificate
                | NetError::CertificateRejectedByPeer { .. }
        )
    }
}

/// The TLS alert carried by a QUIC crypto error code (`0x100 + alert`).
fn tls_alert(code: TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..=0x1ff).contains(&code).then(|| (code - 0x100) as u8)
}

fn alert_name(alert: u8) -> String {
    format!("{:?}", rustls::AlertDescription::from(alert))
}

// TLS alert numbers (RFC 8446 §6) that quinn reports as crypto errors.
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_UNSUPPORTED_CERTIFICATE: u8 = 43;
const ALERT_CERTIFICATE_REVOKED: u8 = 44;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_CERTIFICATE_UNKNOWN: u8 = 46;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// What a TLS alert from the peer most likely says about our certificate (rustls's mapping of
/// verification failures to alerts).
fn rejection_hint(alert: u8) -> &'static str {
    match alert {
        ALERT_UNKNOWN_CA => "it is not signed by the peer's cluster CA",
        ALERT_CERTIFICATE_EXPIRED => "it has expired or is not yet valid (check both hosts' clocks)",
        ALERT_CERTIFICATE_REQUIRED => "the peer requires one and we presented none",
        ALERT_BAD_CERTIFICATE => "it is malformed or not valid for the name the peer dialled",
        ALERT_DECRYPT_ERROR => "its signature does not verify",
        ALERT_CERTIFICATE_REVOKED => "it has been revoked",
        _ => "it is not acceptable to the peer",
    }
}

fn alpn_str(alpn: &[u8]) -> String {
    String::from_utf8_lossy(alpn).into_owned()
}

/// Turns quinn's connection error into one that says what happened in lockstep's terms. `alpn`
/// is what this side offered, for the mismatch message.
fn connection_error(e: ConnectionError, alpn: &[u8]) -> NetError {
    match e {
        // We detected the problem: our TLS stack rejected the peer.
        ConnectionError::TransportError(err) => match tls_alert(err.code) {
            Some(ALERT_NO_APPLICATION_PROTOCOL) => {
                NetError::AlpnMismatch { ours: alpn_str(alpn), detail: format!(": {}", err.reason) }
            }
            Some(ALERT_UNKNOWN_CA) => NetError::UntrustedPeerCertificate { detail: err.reason },
            Some(ALERT_CERTIFICATE_REQUIRED) => NetError::NoPeerCertificate,
            Some(
                ALERT_BAD_CERTIFICATE
                | ALERT_UNSUPPORTED_CERTIFICATE
                | ALERT_CERTIFICATE_REVOKED
                | ALERT_CERTIFICATE_EXPIRED
                | ALERT_CERTIFICATE_UNKNOWN
                | ALERT_DECRYPT_ERROR,
            ) => NetError::InvalidPeerCertificate { detail: err.reason },
            Some(_) => NetError::Handshake(err.to_string()),
            None => NetError::Transport(err.to_string()),
        },
        // The peer's TLS stack rejected us.
        ConnectionError::ConnectionClosed(close) => match tls_alert(close.error_code) {
            Some(ALERT_NO_APPLICATION_PROTOCOL) => {
                NetError::AlpnMismatch { ours: alpn_str(alpn), detail: ", refused by the peer".into() }
            }
            Some(
                alert @ (ALERT_BAD_CERTIFICATE
                | ALERT_UNSUPPORTED_CERTIFICATE
                | ALERT_CERTIFICATE_REVOKED
                | ALERT_CERTIFICATE_EXPIRED
                | ALERT_CERTIFICATE_UNKNOWN
                | ALERT_UNKNOWN_CA
                | ALERT_DECRYPT_ERROR
                | ALERT_CERTIFICATE_REQUIRED),
            ) => NetError::CertificateRejectedByPeer { alert: alert_name(alert), hint: rejection_hint(alert).into() },
            Some(alert) => NetError::Handshake(format!("peer aborted with TLS alert {}", alert_name(alert))),
            None => NetError::Closed { reason: format!("transport error {close}") },
        },
        ConnectionError::ApplicationClosed(close) => {
            let code = close.error_code.into_inner();
            let reason = String::from_utf8_lossy(&close.reason);
            let reason = if code == close_code::NORMAL as u64 {
                if reason.is_empty() {
                    "no reason given".to_owned()
                } else {
                    reason.into_owned()
                }
            } else {
                format!("{}: {reason}", close_code::name(code))
            };
            NetError::Closed { reason }
        }
        ConnectionError::TimedOut => NetError::TimedOut,
        ConnectionError::Reset => NetError::Reset,
        ConnectionError::LocallyClosed => NetError::LocallyClosed,
        ConnectionError::VersionMismatch => NetError::Handshake("peer does not support QUIC version 1".into()),
        ConnectionError::CidsExhausted => NetError::Transport("connection IDs exhausted".into()),
    }
}

fn read_error(e: quinn::ReadError) -> NetError {
    match e {
        quinn::ReadError::ConnectionLost(e) => connection_error(e, ALPN),
        quinn::ReadError::Reset(code) => {
            NetError::Closed { reason: format!("peer reset the message stream (code {code})") }
        }
        quinn::ReadError::ClosedStream => NetError::LocallyClosed,
        other => NetError::Transport(other.to_string()),
    }
}

fn write_error(e: quinn::WriteError) -> NetError {
    match e {
        quinn::WriteError::ConnectionLost(e) => connection_error(e, ALPN),
        quinn::WriteError::Stopped(code) => {
            NetError::Closed { reason: format!("peer stopped reading the message stream (code {code})") }
        }
        quinn::WriteError::ClosedStream => NetError::LocallyClosed,
        other => NetError::Transport(other.to_string()),
    }
}

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

/// Resolves `host:port` to one socket address (the first the resolver returns).
pub async fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    let resolve_error = |reason: String| NetError::Resolve { addr: addr.to_owned(), reason };
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(|e| resolve_error(e.to_string()))?;
    addrs.next().ok_or_else(|| resolve_error("no addresses".into()))
}

/// A QUIC endpoint with the process's TLS identity: accepts and dials lockstep connections.
///
/// Must be created inside a tokio runtime. Dropping it stops accepting; connections already
/// established stay up until they are closed or dropped.
pub struct Endpoint {
    endpoint: quinn::Endpoint,
    alpn: &'static [u8],
    incoming: Mutex<mpsc::Receiver<Result<Conn, NetError>>>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("local_addr", &self.endpoint.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Refuse new connections from now on instead of completing handshakes nobody will accept.
        self.endpoint.set_server_config(None);
    }
}

impl Endpoint {
    /// Binds a UDP socket at `addr` (port 0 picks a free port) serving and dialling lockstep/1 with
    /// `identity`.
    pub fn bind(addr: SocketAddr, identity: &TlsIdentity) -> Result<Endpoint, NetError> {
        Self::bind_with_alpn(addr, identity, ALPN)
    }

    /// [`bind`](Self::bind) with another application protocol: tests use it to play an
    /// incompatible build.
    fn bind_with_alpn(addr: SocketAddr, identity: &TlsIdentity, alpn: &'static [u8]) -> Result<Endpoint, NetError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(NetError::Io {
                context: format!("binding {addr}"),
                source: std::io::Error::other("lockstep endpoints must be created inside a tokio runtime"),
            });
        }
        let (server_config, client_config) = quic_configs(identity, alpn)?;
        let mut endpoint = quinn::Endpoint::server(server_config, addr)
            .map_err(|source| NetError::Io { context: format!("binding UDP {addr}"), source })?;
        endpoint.set_default_client_config(client_config);

        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), tx, alpn));
        Ok(Endpoint { endpoint, alpn, incoming: Mutex::new(rx), accept_task })
    }

    /// The bound address (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint.local_addr().map_err(|source| NetError::Io { context: "reading local address".into(), source })
    }

    /// Dials `addr`, expecting its certificate to be valid for `server_name` (the peer's node
    /// name, or [`DEFAULT_SERVER_NAME`]). Returns once the peer has accepted our certificate and
    /// opened the message stream.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<Conn, NetError> {
        let connecting =
            self.endpoint.connect(addr, server_name).map_err(|e| NetError::Connect { addr, reason: e.to_string() })?;
        let connection = connecting.await.map_err(|e| connection_error(e, self.alpn))?;
        let peer_name = check_peer(&connection, self.alpn)?;
        let preface = async {
            let (send, mut recv) = connection.accept_bi().await.map_err(|e| connection_error(e, self.alpn))?;
            let mut buf = [0u8; 32];
            let buf = &mut buf[..self.alpn.len()];
            recv.read_exact(buf).await.map_err(|e| match e {
                quinn::ReadExactError::ReadError(e) => read_error(e),
                quinn::ReadExactError::FinishedEarly(n) => {
                    NetError::Protocol(format!("peer ended the message stream after {n} bytes of its preface"))
                }
            })?;
            if buf != self.alpn {
                return Err(NetError::Protocol(format!(
                    "peer's stream preface is {:?}, expected {:?}",
                    String::from_utf8_lossy(buf),
                    alpn_str(self.alpn)
                )));
            }
            Ok((send, recv))
        };
        let (send, recv) = match tokio::time::timeout(PREFACE_TIMEOUT, preface).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                connection.close(close_code::PROTOCOL.into(), b"no message stream opened");
                return Err(NetError::Protocol(format!(
                    "peer completed the handshake but opened no message stream within {}s",
                    PREFACE_TIMEOUT.as_secs()
                )));
            }
        };
        Ok(Conn::new(connection, peer_name, send, recv))
    }

    /// The next incoming connection, in the order their handshakes completed: a [`Conn`], or the
    /// error that refused a peer (so the caller can log it; the endpoint keeps accepting). `None`
    /// once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<Conn, NetError>> {
        self.incoming.lock().await.recv().await
    }

    /// Closes every connection of this endpoint with `reason` and stops accepting.
    pub fn close(&self, reason: &str) {
        self.endpoint.close(close_code::NORMAL.into(), reason.as_bytes());
    }

    /// Waits until every connection is fully closed, e.g. after [`close`](Self::close) before the
    /// process exits, so the peers get the close reason rather than a timeout.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// Builds the server and client QUIC configurations for `identity` speaking `alpn`.
fn quic_configs(
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
fn check_peer(connection: &quinn::Connection, alpn: &[u8]) -> Result<String, NetError> {
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

/// Drives every incoming connection through its handshake in its own task (a slow or hostile
/// client cannot hold up the others) and queues the outcomes for [`Endpoint::accept`].
async fn accept_loop(endpoint: quinn::Endpoint, tx: mpsc::Sender<Result<Conn, NetError>>, alpn: &'static [u8]) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let outcome = accept_one(incoming, alpn).await;
            if let Err(mpsc::error::TrySendError::Full(Ok(conn))) = tx.try_send(outcome) {
                conn.close_with(close_code::BUSY, "too many connections waiting to be accepted");
            }
        });
    }
}

async fn accept_one(incoming: quinn::Incoming, alpn: &'static [u8]) -> Result<Conn, NetError> {
    let connection = incoming.await.map_err(|e| connection_error(e, alpn))?;
    let peer_name = check_peer(&connection, alpn)?;
    let (mut send, recv) = connection.open_bi().await.map_err(|e| connection_error(e, alpn))?;
    send.write_all(alpn).await.map_err(write_error)?;
    Ok(Conn::new(connection, peer_name, send, recv))
}

/// State shared by both halves of a connection.
struct Shared {
    connection: quinn::Connection,
    peer_name: String,
}

impl Shared {
    fn close(&self, code: u32, reason: &str) {
        self.connection.close(code.into(), reason.as_bytes());
    }
}

struct SendState {
    stream: quinn::SendStream,
    /// Reused encode buffer: the ring sends the same sizes step after step.
    buf: Vec<u8>,
    /// Set while a frame is being written; still set at the next send only if that write was
    /// abandoned midway, leaving a partial frame on the stream.
    torn: bool,
}

/// The sending half of a [`Conn`]. Cheap to clone; sends from several tasks are serialised, each
/// frame written whole.
#[derive(Clone)]
pub struct ConnSender {
    shared: Arc<Shared>,
    state: Arc<Mutex<SendState>>,
}

/// The receiving half of a [`Conn`].
pub struct ConnReceiver {
    shared: Arc<Shared>,
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
    scratch: Box<[u8]>,
}

/// One established lockstep connection: a verified peer and its message stream.
///
/// Dropping the last handle (the `Conn`, or both halves and every sender clone) closes the
/// connection at once, like [`close`](Conn::close): frames the peer has not yet received are lost.
/// Call [`finish`](Conn::finish) first when the last message matters.
pub struct Conn {
    sender: ConnSender,
    receiver: Mutex<ConnReceiver>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer_name", &self.peer_name())
            .field("remote_addr", &self.remote_addr())
            .finish_non_exhaustive()
    }
}

impl Conn {
    fn new(connection: quinn::Connection, peer_name: String, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let shared = Arc::new(Shared { connection, peer_name });
        let sender = ConnSender {
            shared: shared.clone(),
            state: Arc::new(Mutex::new(SendState { stream: send, buf: Vec::new(), torn: false })),
        };
        let receiver = ConnReceiver {
            shared,
            stream: recv,
            decoder: FrameDecoder::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        };
        Conn { sender, receiver: Mutex::new(receiver) }
    }

    /// Sends one frame. See [`ConnSender::send`].
    pub async fn send(&self, frame: &Frame) -> Result<(), NetError> {
        self.sender.send(frame).await
    }

    /// Sends a ring frame from borrowed data. See [`ConnSender::send_ring`].
    pub async fn send_ring(&self, step_id: u64, op: u32, origin_rank: u32, data: &[f32]) -> Result<(), NetError> {
        self.sender.send_ring(step_id, op, origin_rank, data).await
    }

    /// Receives the next frame. See [`ConnReceiver::recv`]; concurrent callers take turns.
    pub async fn recv(&self) -> Result<Frame, NetError> {
        self.receiver.lock().await.recv().await
    }

    /// Ends our side of the message stream and waits until the peer has everything. See
    /// [`ConnSender::finish`].
    pub async fn finish(&self) -> Result<(), NetError> {
        self.sender.finish().await
    }

    /// The peer's certificate name (common name, else first DNS SAN), verified by the cluster CA.
    pub fn peer_name(&self) -> &str {
        &self.sender.shared.peer_name
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.sender.shared.connection.remote_address()
    }

    /// QUIC's current round-trip-time estimate.
    pub fn rtt(&self) -> Duration {
        self.sender.shared.connection.rtt()
    }

    /// Closes the connection at once with `reason`, which the peer's next `recv` reports. Data
    /// not yet delivered is abandoned: [`finish`](Self::finish) first to deliver it.
    pub fn close(&self, reason: &str) {
        self.sender.close(reason);
    }

    fn close_with(&self, code: u32, reason: &str) {
        self.sender.shared.close(code, reason);
    }

    /// Waits until the connection closes, for whatever reason, and says why.
    pub async fn closed(&self) -> NetError {
        self.sender.closed().await
    }

    /// Another handle on the sending half, for a task that only sends (heartbeats).
    pub fn sender(&self) -> ConnSender {
        self.sender.clone()
    }

    /// Splits into independently owned halves.
    pub fn split(self) -> (ConnSender, ConnReceiver) {
        (self.sender, self.receiver.into_inner())
    }
}

impl ConnSender {
    /// Sends one frame, whole. A frame over [`wire::MAX_FRAME_BYTES`] is refused here
    /// ([`NetError::Wire`]) with nothing sent and the connection intact.
    ///
    /// Not cancel-safe: if the future is dropped midway, part of the frame may be on the stream,
    /// and every later send fails with [`NetError::Protocol`]; close the connection.
    pub async fn send(&self, frame: &Frame) -> Result<(), NetError> {
        let mut state = self.lock_untorn().await?;
        state.buf.clear();
        wire::encode_into(frame, &mut state.buf)?;
        Self::write_buf(&mut state).await
    }

    /// Sends a ring frame built from borrowed parts, without first copying `data` into a
    /// [`wire::RingFrame`]. Same guarantees as [`send`](Self::send).
    pub async fn send_ring(&self, step_id: u64, op: u32, origin_rank: u32, data: &[f32]) -> Result<(), NetError> {
        let mut state = self.lock_untorn().await?;
        state.buf.clear();
        wire::encode_ring(step_id, op, origin_rank, data, &mut state.buf)?;
        Self::write_buf(&mut state).await
    }

    async fn lock_untorn(&self) -> Result<tokio::sync::MutexGuard<'_, SendState>, NetError> {
        let state = self.state.lock().await;
        if state.torn {
            return Err(NetError::Protocol(
                "an earlier send was cancelled midway, leaving a partial frame on the stream; close the connection"
                    .into(),
            ));
        }
        Ok(state)
    }

    async fn write_buf(state: &mut SendState) -> Result<(), NetError> {
        state.torn = true;
        state.stream.write_all(&state.buf).await.map_err(write_error)?;
        state.torn = false;
        Ok(())
    }

    /// Ends our side of the message stream and waits until the peer has acknowledged everything
    /// sent on it, so that a following [`close`](Self::close) loses nothing (send `Refused` or
    /// `Shutdown`, `finish`, then close). The peer's `recv` then reports the stream's end. Later
    /// sends fail.
    pub async fn finish(&self) -> Result<(), NetError> {
        let mut state = self.state.lock().await;
        // Finishing twice is harmless.
        let _ = state.stream.finish();
        match state.stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(NetError::Closed {
                reason: format!("peer stopped reading the message stream (code {code}) before it had everything"),
            }),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(connection_error(e, ALPN)),
            Err(other) => Err(NetError::Transport(other.to_string())),
        }
    }

    pub fn peer_name(&self) -> &str {
        &self.shared.peer_name
    }

    /// QUIC's current round-trip-time estimate.
    pub fn rtt(&self) -> Duration {
        self.shared.connection.rtt()
    }

    /// Closes the whole connection (both halves) at once with `reason`.
    pub fn close(&self, reason: &str) {
        self.shared.close(close_code::NORMAL, reason);
    }

    /// Waits until the connection closes, for whatever reason, and says why.
    pub async fn closed(&self) -> NetError {
        connection_error(self.shared.connection.closed().await, ALPN)
    }
}

impl ConnReceiver {
    /// Receives the next frame.
    ///
    /// Cancel-safe: bytes already read stay buffered for the next call. Errors: the peer closed
    /// ([`NetError::Closed`], with its reason), vanished ([`NetError::TimedOut`] after
    /// [`IDLE_TIMEOUT`]), or sent something that is not a frame ([`NetError::Wire`]; the length cap
    /// is checked as soon as a length prefix arrives, before the body is buffered, and the
    /// connection is then closed as a protocol violation). After an error, later calls fail too.
    pub async fn recv(&mut self) -> Result<Frame, NetError> {
        loop {
            match self.decoder.next() {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => {
                    self.shared.close(close_code::PROTOCOL, &format!("bad frame: {e}"));
                    return Err(NetError::Wire(e));
                }
            }
            match self.stream.read(&mut self.scratch).await {
                Ok(Some(n)) => self.decoder.push(&self.scratch[..n]),
                Ok(None) => {
                    let reason = if self.decoder.buffered() > 0 {
                        "peer ended the message stream in the middle of a frame"
                    } else {
                        "peer ended the message stream"
                    };
                    return Err(NetError::Closed { reason: reason.into() });
                }
                Err(e) => return Err(read_error(e)),
            }
        }
    }

    pub fn peer_name(&self) -> &str {
        &self.shared.peer_name
    }

    /// Closes the whole connection (both halves) at once with `reason`.
    pub fn close(&self, reason: &str) {
        self.shared.close(close_code::NORMAL, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::tests::TempDir;
    use crate::certs::{init_ca, issue};
    use lockstep_proto::wire::{Message, RingFrame, MAX_FRAME_BYTES};
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};

    const LOCAL: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

    /// Every test body is bounded: a hang is a failure, not a stuck CI job.
    async fn bounded<T>(body: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), body).await.expect("test timed out")
    }

    /// A fresh cluster CA with certificates for `names`.
    fn cluster(tag: &str, names: &[&str]) -> TempDir {
        let dir = TempDir::new(tag);
        init_ca(&dir.0).unwrap();
        for name in names {
            issue(&dir.0, name).unwrap();
        }
        dir
    }

    fn endpoint(dir: &TempDir, name: &str) -> Endpoint {
        Endpoint::bind(LOCAL, &TlsIdentity::load(&dir.0, name).unwrap()).unwrap()
    }

    /// Connects `client` to `server`, returning (client side, server side).
    async fn pair(client: &Endpoint, server: &Endpoint, server_name: &str) -> (Conn, Conn) {
        let addr = server.local_addr().unwrap();
        let (dialled, accepted) = tokio::join!(client.connect(addr, server_name), server.accept());
        (dialled.unwrap(), accepted.expect("endpoint open").unwrap())
    }

    /// 1M floats of random bits: NaNs with payloads, infinities, subnormals and -0.0 all occur.
    fn random_floats(n: usize, mut seed: u64) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                f32::from_bits(seed as u32)
            })
            .collect();
        v[..4].copy_from_slice(&[-0.0, f32::from_bits(0x7fc0_1234), f32::NEG_INFINITY, f32::from_bits(1)]);
        v
    }

    fn assert_bits_eq(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        let first_diff = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
        assert_eq!(first_diff, None, "ring data differs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_exchanges_control_and_ring_frames_both_ways() {
        let certs = cluster("net-exchange", &["node-0", "node-1"]);
        bounded(async {
            let server = endpoint(&certs, "node-0");
            let client = endpoint(&certs, "node-1");
            let (c, s) = pair(&client, &server, "node-0").await;
            assert_eq!(c.peer_name(), "node-0");
            assert_eq!(s.peer_name(), "node-1");
            assert_eq!(s.remote_addr(), client.local_addr().unwrap());

            let hello = Frame::Control(Message::Heartbeat { seq: 7, sent_unix_ns: 123 });
            c.send(&hello).await.unwrap();
            assert_eq!(s.recv().await.unwrap(), hello);
            let ack = Frame::Control(Message::HeartbeatAck { seq: 7, sent_unix_ns: 123 });
            s.send(&ack).await.unwrap();
            assert_eq!(c.recv().await.unwrap(), ack);

            // A 1M-float ring frame each way, concurrently, bit-exact.
            let up = random_floats(1 << 20, 1);
            let down = random_floats(1 << 20, 2);
            let down_frame = Frame::Ring(RingFrame { step_id: 9, op: 5, origin_rank: 0, data: down.clone() });
            let (sent_up, sent_down, got_down, got_up) =
                tokio::join!(c.send_ring(9, 5, 1, &up), s.send(&down_frame), c.recv(), s.recv(),);
            sent_up.unwrap();
            sent_down.unwrap();
            let (Frame::Ring(got_up), Frame::Ring(got_down)) = (got_up.unwrap(), got_down.unwrap()) else {
                panic!("expected ring frames")
            };
            assert_eq!((got_up.step_id, got_up.op, got_up.origin_rank), (9, 5, 1));
            assert_eq!((got_down.step_id, got_down.op, got_down.origin_rank), (9, 5, 0));
            assert_bits_eq(&got_up.data, &up);
            assert_bits_eq(&got_down.data, &down);

            // Control traffic still flows after the big frames, and RTT has been measured.
            c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
            assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));
            assert!(c.rtt() < Duration::from_secs(1), "loopback rtt {:?}", c.rtt());
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_split_halves_work_from_two_tasks() {
        let certs = cluster("net-split", &["coordinator", "node-0"]);
        bounded(async {
            let node_ep = endpoint(&certs, "node-0");
            let coord_ep = endpoint(&certs, "coordinator");
            let (coord, node) = pair(&coord_ep, &node_ep, "node-0").await;

            // The node: one task sends heartbeats, another receives steps and answers them.
            let (node_tx, mut node_rx) = node.split();
            let heartbeats = {
                let tx = node_tx.clone();
                tokio::spawn(async move {
                    for seq in 0..50 {
                        tx.send(&Frame::Control(Message::Heartbeat { seq, sent_unix_ns: 0 })).await.unwrap();
                    }
                })
            };
            let worker = tokio::spawn(async move {
                for _ in 0..50 {
                    let Frame::Control(Message::Step(plan)) = node_rx.recv().await.unwrap() else {
                        panic!("expected a step")
                    };
                    let done = Message::StepDone { step_id: plan.step_id, samples: vec![] };
                    node_tx.send(&Frame::Control(done)).await.unwrap();
                }
                // Handed back rather than dropped: dropping the last handle closes the connection,
                // abandoning whatever the coordinator has not read yet.
                (node_tx, node_rx)
            });
            // The coordinator shares one Conn between a sending and a receiving task.
            let coord = Arc::new(coord);
            let sender = {
                let coord = coord.clone();
                tokio::spawn(async move {
                    for step_id in 0..50 {
                        let plan = lockstep_proto::step::StepPlan { step_id, chunks: vec![] };
                        coord.send(&Frame::Control(Message::Step(plan))).await.unwrap();
                    }
                })
            };
            let (mut beats, mut dones) = (0, Vec::new());
            while beats < 50 || dones.len() < 50 {
                match coord.recv().await.unwrap() {
                    Frame::Control(Message::Heartbeat { seq, .. }) => {
                        assert_eq!(seq, beats);
                        beats += 1;
                    }
                    Frame::Control(Message::StepDone { step_id, .. }) => dones.push(step_id),
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(dones, (0..50).collect::<Vec<_>>());
            heartbeats.await.unwrap();
            let _node = worker.await.unwrap();
            sender.await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_refuses_a_client_certificate_from_another_ca_and_keeps_accepting() {
        let ours = cluster("net-ours", &["node-0", "node-1"]);
        let theirs = cluster("net-theirs", &["node-1"]);
        bounded(async {
            let server = endpoint(&ours, "node-0");
            let addr = server.local_addr().unwrap();

            // An intruder that trusts our CA but presents a certificate from another CA: the server
            // refuses it, and the intruder hears why.
            let intruder_id = TlsIdentity::from_files(
                "intruder",
                &ours.0.join("ca.pem"),
                &theirs.0.join("node-1.pem"),
                &theirs.0.join("node-1.key"),
            )
            .unwrap();
            let intruder = Endpoint::bind(LOCAL, &intruder_id).unwrap();
            let (dialled, accepted) = tokio::join!(intruder.connect(addr, "node-0"), server.accept());
            let client_err = dialled.unwrap_err();
            assert_eq!(client_err.error_type(), "certificate_rejected_by_peer", "{client_err}");
            assert!(
                client_err.to_string().contains("rejected our certificate: it is not signed by the peer's cluster CA"),
                "{client_err}"
            );
            let server_err = accepted.unwrap().unwrap_err();
            assert_eq!(server_err.error_type(), "untrusted_peer_certificate", "{server_err}");
            assert!(
                server_err.to_string().contains("peer certificate is not signed by the cluster CA"),
                "{server_err}"
            );

            // A member of the other cluster altogether: it refuses our server's certificate itself.
            let stranger = endpoint(&theirs, "node-1");
            let (dialled, accepted) = tokio::join!(stranger.connect(addr, "node-0"), server.accept());
            let client_err = dialled.unwrap_err();
            assert_eq!(client_err.error_type(), "untrusted_peer_certificate", "{client_err}");
            assert!(client_err.is_certificate_problem());
            let server_err = accepted.unwrap().unwrap_err();
            assert!(server_err.is_certificate_problem(), "{server_err}");

            // The server still accepts a legitimate member.
            let member = endpoint(&ours, "node-1");
            let (c, s) = pair(&member, &server, "node-0").await;
            c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
            assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));
            assert_eq!(s.peer_name(), "node-1");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_server_name_must_match_the_certificate() {
        let certs = cluster("net-name", &["node-0", "node-1"]);
        bounded(async {
            let server = endpoint(&certs, "node-0");
            let client = endpoint(&certs, "node-1");
            let addr = server.local_addr().unwrap();
            let (dialled, accepted) = tokio::join!(client.connect(addr, "node-7"), server.accept());
            let err = dialled.unwrap_err();
            assert_eq!(err.error_type(), "invalid_peer_certificate", "{err}");
            assert!(err.to_string().contains("node-7") || err.to_string().contains("NotValidForName"), "{err}");
            assert!(accepted.unwrap().unwrap_err().is_certificate_problem());
            // The default name works with any cluster certificate.
            let (c, _s) = pair(&client, &server, DEFAULT_SERVER_NAME).await;
            assert_eq!(c.peer_name(), "node-0");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_refuses_a_peer_speaking_another_protocol_version() {
        let certs = cluster("net-alpn", &["node-0", "node-1"]);
        bounded(async {
            let server = endpoint(&certs, "node-0");
            let old = Endpoint::bind_with_alpn(LOCAL, &TlsIdentity::load(&certs.0, "node-1").unwrap(), b"lockstep/0")
                .unwrap();
            let addr = server.local_addr().unwrap();
            let (dialled, accepted) = tokio::join!(old.connect(addr, "node-0"), server.accept());
            let client_err = dialled.unwrap_err();
            assert_eq!(client_err.error_type(), "alpn_mismatch", "{client_err}");
            assert!(client_err.to_string().contains("peer does not speak lockstep/0 (ALPN mismatch"), "{client_err}");
            let server_err = accepted.unwrap().unwrap_err();
            assert_eq!(server_err.error_type(), "alpn_mismatch", "{server_err}");
            assert!(server_err.to_string().contains("peer does not speak lockstep/1 (ALPN mismatch"), "{server_err}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_frames_over_the_cap_are_refused_without_allocating() {
        let certs = cluster("net-cap", &["node-0", "node-1"]);
        bounded(async {
            let server = endpoint(&certs, "node-0");
            let client = endpoint(&certs, "node-1");
            let (c, s) = pair(&client, &server, "node-0").await;

            // The sender refuses to encode one, sends nothing, and the connection carries on.
            let big = vec![0.0f32; MAX_FRAME_BYTES / 4];
            let err = c.send_ring(1, 0, 0, &big).await.unwrap_err();
            assert_eq!(err.error_type(), "wire", "{err}");
            assert!(err.to_string().contains("exceeds the 67108864-byte cap"), "{err}");
            c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
            assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));

            // A hostile peer announces a 4 GiB frame: the receiver refuses it from the length
            // prefix alone, buffers none of it, and closes the connection as a protocol violation.
            {
                let mut state = c.sender.state.lock().await;
                state.stream.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
                state.stream.write_all(&[1; 1000]).await.unwrap();
            }
            let err = s.recv().await.unwrap_err();
            let NetError::Wire(WireError::TooLarge { len, max }) = &err else {
                panic!("expected too large, got {err}")
            };
            assert_eq!((*len, *max), (u32::MAX as usize, MAX_FRAME_BYTES));
            assert!(s.receiver.lock().await.decoder.buffered() == 0);
            let closed = c.recv().await.unwrap_err();
            assert_eq!(closed.error_type(), "closed", "{closed}");
            assert!(
                closed.to_string().contains("protocol violation: bad frame: frame of 4294967295 bytes"),
                "{closed}"
            );
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_peer_close_is_reported_promptly() {
        let certs = cluster("net-close", &["node-0", "node-1"]);
        bounded(async {
            let server = endpoint(&certs, "node-0");
            let client = endpoint(&certs, "node-1");

            // Explicit close with a reason.
            let (c, s) = pair(&client, &server, "node-0").await;
            let started = std::time::Instant::now();
            let receiving = tokio::spawn(async move { (s.recv().await, s) });
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.close("coordinator shutting down");
            let (err, s) = receiving.await.unwrap();
            let err = err.unwrap_err();
            assert_eq!(err.to_string(), "connection closed by peer: coordinator shutting down");
            assert!(err.is_disconnect());
            assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
            // Sending on a closed connection fails clearly too.
            assert_eq!(s.send(&Frame::Control(Message::Shutdown)).await.unwrap_err().error_type(), "closed");
            assert_eq!(c.recv().await.unwrap_err().error_type(), "locally_closed");

            // Dropping a connection closes it as well.
            let (c, s) = pair(&client, &server, "node-0").await;
            let started = std::time::Instant::now();
            drop(c);
            let err = s.recv().await.unwrap_err();
            assert!(err.is_disconnect(), "{err}");
            assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

            // Finish delivers the last message before the close.
            let (c, s) = pair(&client, &server, "node-0").await;
            let refused = Frame::Control(Message::Refused {
                code: wire::RefuseCode::Fingerprint,
                message: "expected fp-a, got fp-b".into(),
            });
            s.send(&refused).await.unwrap();
            s.finish().await.unwrap();
            s.close("refused");
            assert_eq!(c.recv().await.unwrap(), refused);
            let err = c.recv().await.unwrap_err();
            assert!(err.is_disconnect(), "{err}");
        })
        .await;
    }

    /// A UDP relay between a client and `server` whose link can be cut, to play a peer that dies
    /// without a word (power loss, partition).
    async fn cuttable_relay(server: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
        let front = Arc::new(tokio::net::UdpSocket::bind(LOCAL).await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind(LOCAL).await.unwrap());
        let addr = front.local_addr().unwrap();
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        {
            let (front, back, cut, client) = (front.clone(), back.clone(), cut.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    if !cut.load(Ordering::Relaxed) {
                        let _ = back.send_to(&buf[..n], server).await;
                    }
                }
            });
        }
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let (Some(to), false) = (to, cut.load(Ordering::Relaxed)) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_silent_peer_is_declared_dead_within_the_idle_timeout() {
        let certs = cluster("net-dead", &["node-0", "node-1"]);
        bounded(async {
            let server = endpoint(&certs, "node-0");
            let client = endpoint(&certs, "node-1");
            let cut = Arc::new(AtomicBool::new(false));
            let relay = cuttable_relay(server.local_addr().unwrap(), cut.clone()).await;
            let (dialled, accepted) = tokio::join!(client.connect(relay, "node-0"), server.accept());
            let (c, s) = (dialled.unwrap(), accepted.unwrap().unwrap());
            c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
            assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));

            // Keep-alives hold an idle connection open past the idle timeout...
            tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(1)).await;
            c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
            assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));

            // ...and once the link dies, both sides know within about the idle timeout.
            cut.store(true, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let (sr, cr) = tokio::join!(s.recv(), c.recv());
            for err in [sr.unwrap_err(), cr.unwrap_err()] {
                assert_eq!(err.error_type(), "timed_out", "{err}");
            }
            let took = started.elapsed();
            assert!(took < IDLE_TIMEOUT + Duration::from_secs(2), "took {took:?}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_closed_endpoint_stops_accepting_and_closes_its_connections() {
        let certs = cluster("net-epclose", &["node-0", "node-1"]);
        bounded(async {
            let server = endpoint(&certs, "node-0");
            let client = endpoint(&certs, "node-1");
            let (c, _s) = pair(&client, &server, "node-0").await;
            server.close("node shutting down");
            assert!(server.accept().await.is_none(), "a closed endpoint accepts nothing");
            let err = c.recv().await.unwrap_err();
            assert_eq!(err.to_string(), "connection closed by peer: node shutting down");
            server.wait_idle().await;
            let err = client.connect(server.local_addr().unwrap(), "node-0").await.unwrap_err();
            assert!(err.is_disconnect() || err.error_type() == "transport", "{err}");
        })
        .await;
    }

    #[test]
    fn net_bind_outside_a_runtime_is_a_clear_error() {
        let certs = cluster("net-nort", &["node-0"]);
        let err = Endpoint::bind(LOCAL, &TlsIdentity::load(&certs.0, "node-0").unwrap()).unwrap_err();
        assert!(err.to_string().contains("inside a tokio runtime"), "{err}");
    }

    #[test]
    fn net_error_types_are_distinct() {
        let errors = [
            NetError::TlsConfig(String::new()),
            NetError::Io { context: String::new(), source: std::io::Error::other("x") },
            NetError::Resolve { addr: String::new(), reason: String::new() },
            NetError::Connect { addr: LOCAL, reason: String::new() },
            NetError::UntrustedPeerCertificate { detail: String::new() },
            NetError::InvalidPeerCertificate { detail: String::new() },
            NetError::NoPeerCertificate,
            NetError::CertificateRejectedByPeer { alert: String::new(), hint: String::new() },
            NetError::AlpnMismatch { ours: String::new(), detail: String::new() },
            NetError::Handshake(String::new()),
            NetError::Closed { reason: String::new() },
            NetError::TimedOut,
            NetError::Reset,
            NetError::LocallyClosed,
            NetError::Protocol(String::new()),
            NetError::Wire(WireError::EmptyFrame),
            NetError::Transport(String::new()),
        ];
        let types: std::collections::HashSet<_> = errors.iter().map(NetError::error_type).collect();
        assert_eq!(types.len(), errors.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn net_resolve_finds_loopback() {
        bounded(async {
            assert_eq!(resolve("127.0.0.1:7000").await.unwrap(), "127.0.0.1:7000".parse().unwrap());
            assert_eq!(resolve("no port here").await.unwrap_err().error_type(), "resolve");
        })
        .await;
    }
}
