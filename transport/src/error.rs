//! What can go wrong on a lockstep connection, in lockstep's terms.
//!
//! quinn reports a refused handshake as a transport error carrying a TLS alert number, from our
//! side or the peer's; [`connection_error`] turns those into "the peer's certificate is not signed
//! by the cluster CA", "the peer rejected our certificate: it has expired", "peer does not speak
//! lockstep/2", so an operator reading a log knows which host to fix. Application close codes
//! ([`close_code`]) carry the reason an orderly or protocol-violation close was made.

use std::net::SocketAddr;

use quinn::{ConnectionError, TransportErrorCode};

use lockstep_proto::wire::{WireError, ALPN};

use crate::config::IDLE_TIMEOUT;

/// Application close codes (QUIC `CONNECTION_CLOSE` with an application error code).
pub mod close_code {
    /// Orderly close ([`crate::Conn::close`]).
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

pub(crate) fn alpn_str(alpn: &[u8]) -> String {
    String::from_utf8_lossy(alpn).into_owned()
}

/// Turns quinn's connection error into one that says what happened in lockstep's terms. `alpn`
/// is what this side offered, for the mismatch message.
pub(crate) fn connection_error(e: ConnectionError, alpn: &[u8]) -> NetError {
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

pub(crate) fn read_error(e: quinn::ReadError) -> NetError {
    match e {
        quinn::ReadError::ConnectionLost(e) => connection_error(e, ALPN),
        quinn::ReadError::Reset(code) => {
            NetError::Closed { reason: format!("peer reset the message stream (code {code})") }
        }
        quinn::ReadError::ClosedStream => NetError::LocallyClosed,
        other => NetError::Transport(other.to_string()),
    }
}

pub(crate) fn write_error(e: quinn::WriteError) -> NetError {
    match e {
        quinn::WriteError::ConnectionLost(e) => connection_error(e, ALPN),
        quinn::WriteError::Stopped(code) => {
            NetError::Closed { reason: format!("peer stopped reading the message stream (code {code})") }
        }
        quinn::WriteError::ClosedStream => NetError::LocallyClosed,
        other => NetError::Transport(other.to_string()),
    }
}
