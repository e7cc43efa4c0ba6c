//! The endpoint: one UDP socket per process that both accepts and dials lockstep connections.
//!
//! Accepting runs every incoming handshake in its own task (a slow or hostile client cannot hold
//! up the others) and queues the outcomes, refused peers included, for [`Endpoint::accept`], so
//! the caller can log who was refused while the endpoint keeps accepting. The acceptor opens the
//! message stream and writes the ALPN preface; [`Endpoint::connect`] returns only once it has read
//! that preface, i.e. once the peer has really accepted our certificate.

use std::net::SocketAddr;
use std::time::Duration;

use lockstep_proto::wire::ALPN;
use tokio::sync::{mpsc, Mutex};

use crate::certs::TlsIdentity;
use crate::config::{check_peer, quic_configs};
use crate::conn::Conn;
use crate::error::{alpn_str, close_code, connection_error, read_error, write_error, NetError};

/// The server name [`Endpoint::connect`] callers use when they do not know the peer's certificate
/// name: every certificate from [`crate::certs::issue`] is valid for it. Passing the peer's node
/// name instead also checks *which* cluster member answered.
pub const DEFAULT_SERVER_NAME: &str = "localhost";

/// How long [`Endpoint::connect`] waits, after the TLS handshake, for the acceptor to open the
/// message stream.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections handshaken but not yet taken by [`Endpoint::accept`]; more are closed as busy.
pub const ACCEPT_QUEUE: usize = 64;

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
    /// Binds a UDP socket at `addr` (port 0 picks a free port) serving and dialling lockstep/2 with
    /// `identity`.
    pub fn bind(addr: SocketAddr, identity: &TlsIdentity) -> Result<Endpoint, NetError> {
        Self::bind_with_alpn(addr, identity, ALPN)
    }

    /// [`bind`](Self::bind) with another application protocol: tests use it to play an
    /// incompatible build.
    pub(crate) fn bind_with_alpn(
        addr: SocketAddr,
        identity: &TlsIdentity,
        alpn: &'static [u8],
    ) -> Result<Endpoint, NetError> {
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
