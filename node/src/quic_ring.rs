//! The ring over QUIC: one connection to the successor (dialled), one from the predecessor
//! (accepted), and the [`RingTransport`] the blocking model thread drives them through.
//!
//! ```text
//!  model thread ── send_next ──▶ channel ──▶ sender task ──QUIC──▶ successor
//!     (encodes the frame from its buffer)      (writes the bytes)
//!  model thread ◀── recv_prev ── channel ◀── receiver task ◀──QUIC── predecessor
//!                                              ▲ also watches the successor's connection
//! ```
//!
//! **Who may join.** Every rank dials its successor and accepts its predecessor at the same
//! time (one after the other would deadlock a ring of two). The acceptor takes a connection only
//! from the node named in its assignment *and* only once that node's first frame, a
//! `RingHello`, names the same group and the predecessor's rank: connections handshake in the
//! background and queue until accepted, so one dialled for a formation that was abandoned can
//! still be waiting when the next formation starts, from the same node.
//!
//! **Failing fast, by name.** The model thread spends a step blocked in `recv_prev`. When either
//! neighbour goes away the receiver task puts an error naming that node into the same channel,
//! so the step fails as soon as the connection closes (at once for an orderly close, within the
//! transport's idle timeout for a vanished host) rather than after the all-reduce timeout, and
//! the message says which node is missing. [`RingLinks::close`] closes both connections with a
//! reason the neighbours then report.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_proto::wire::{self, Frame, Message, RingFrame};
use lockstep_transport::{resolve, Conn, ConnSender, Endpoint, NetError, DEFAULT_SERVER_NAME};
use tokio::sync::mpsc;

use crate::ring::{RingError, RingTransport};

/// Longest the ring takes to form: both neighbours connected.
pub const RING_FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest an accepted connection from the predecessor's node may take to say which ring it is
/// for.
const RING_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// One rank's place in a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingPlace {
    pub group: u32,
    pub rank: u32,
    pub tp: u32,
    /// Ring address of the successor, rank `(rank + 1) % tp`.
    pub next_addr: String,
    /// Node name of the predecessor, rank `(rank + tp - 1) % tp`.
    pub prev_node: String,
}

impl RingPlace {
    fn prev_rank(&self) -> u32 {
        (self.rank + self.tp - 1) % self.tp
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RingSetupError {
    #[error("ring successor at {addr} (rank {rank}) could not be reached: {source}")]
    Dial {
        addr: String,
        rank: u32,
        #[source]
        source: NetError,
    },
    #[error("the ring did not form within {}s: {missing}", RING_FORM_TIMEOUT.as_secs())]
    Timeout { missing: String },
    #[error("the endpoint closed while waiting for ring predecessor {0}")]
    EndpointClosed(String),
}

/// Ring links between the model thread (blocking) and the QUIC connections (async).
pub struct QuicRing {
    /// Encoded ring frames for the successor.
    to_next: mpsc::UnboundedSender<Vec<u8>>,
    from_prev: Mutex<std_mpsc::Receiver<Result<RingFrame, String>>>,
    next_node: String,
    prev_node: String,
    /// Why the sender task stopped, once it has.
    successor_failure: Arc<Mutex<Option<String>>>,
}

impl RingTransport for QuicRing {
    fn send_next(&self, step_id: u64, op: u32, origin_rank: u32, data: &[f32]) -> Result<(), RingError> {
        let mut frame = Vec::new();
        wire::encode_ring(step_id, op, origin_rank, data, &mut frame)
            .map_err(|e| RingError::Transport(e.to_string()))?;
        self.to_next.send(frame).map_err(|_| {
            let why = self.successor_failure.lock().expect("ring failure lock").clone();
            let why = why.unwrap_or_else(|| "its connection was closed".into());
            RingError::Transport(format!("ring successor {} is gone: {why}", self.next_node))
        })
    }

    fn recv_prev(&self, timeout: Duration) -> Result<RingFrame, RingError> {
        match self.from_prev.lock().expect("ring receiver lock").recv_timeout(timeout) {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(RingError::Transport(e)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(RingError::Transport(format!(
                "no ring frame from the predecessor {} within {timeout:?}",
                self.prev_node
            ))),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                Err(RingError::Transport(format!("the connection from ring predecessor {} was closed", self.prev_node)))
            }
        }
    }
}

/// The connections and pump tasks of one ring membership. Dropping it closes both connections.
pub struct RingLinks {
    conns: Vec<ConnSender>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RingLinks {
    /// Closes both connections with `reason` (the neighbours' failing steps report it).
    pub fn close(self, reason: &str) {
        for c in &self.conns {
            c.close(reason);
        }
    }
}

impl Drop for RingLinks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Dial the successor and accept the predecessor (in parallel) for `place`. Returns the blocking
/// transport for [`RingCollective`](crate::ring::RingCollective) and the links that keep it up.
pub async fn connect_ring(endpoint: &Endpoint, place: &RingPlace) -> Result<(QuicRing, RingLinks), RingSetupError> {
    let (to_next, mut next_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (prev_tx, from_prev) = std_mpsc::channel();
    let successor_failure = Arc::new(Mutex::new(None));
    let mut ring = QuicRing {
        to_next,
        from_prev: Mutex::new(from_prev),
        next_node: format!("at {}", place.next_addr),
        prev_node: place.prev_node.clone(),
        successor_failure: successor_failure.clone(),
    };
    if place.tp <= 1 {
        return Ok((ring, RingLinks { conns: Vec::new(), tasks: Vec::new() }));
    }
    let next_rank = (place.rank + 1) % place.tp;
    let dial = async {
        let dialled = async {
            let conn = endpoint.connect(resolve(&place.next_addr).await?, DEFAULT_SERVER_NAME).await?;
            conn.send(&Frame::Control(Message::RingHello { group: place.group, rank: place.rank })).await?;
            Ok(conn)
        };
        match tokio::time::timeout(RING_FORM_TIMEOUT, dialled).await {
            Ok(r) => {
                r.map_err(|source| RingSetupError::Dial { addr: place.next_addr.clone(), rank: next_rank, source })
            }
            Err(_) => Err(RingSetupError::Timeout {
                missing: format!("ring successor at {} (rank {next_rank}) did not accept", place.next_addr),
            }),
        }
    };
    let accept = async {
        tokio::time::timeout(RING_FORM_TIMEOUT, accept_predecessor(endpoint, place)).await.unwrap_or_else(|_| {
            Err(RingSetupError::Timeout {
                missing: format!(
                    "ring predecessor {} (rank {}) did not connect for group {}",
                    place.prev_node,
                    place.prev_rank(),
                    place.group
                ),
            })
        })
    };
    let (next, prev) = tokio::try_join!(dial, accept)?;
    ring.next_node = next.peer_name().to_owned();

    let next_sender = next.sender();
    let sender = tokio::spawn({
        let next_node = ring.next_node.clone();
        async move {
            while let Some(f) = next_rx.recv().await {
                if let Err(e) = next.send_encoded(&f).await {
                    tracing::warn!("ring: sending to successor {next_node} failed: {e}");
                    *successor_failure.lock().expect("ring failure lock") = Some(e.to_string());
                    return;
                }
            }
        }
    });
    let (prev_sender, mut prev_rx) = prev.split();
    let receiver = tokio::spawn({
        let (prev_node, next_node) = (ring.prev_node.clone(), ring.next_node.clone());
        let successor = next_sender.clone();
        let prev_keep = prev_sender.clone();
        async move {
            // The sending half stays alive with the task so the stream is not finished under it.
            let _keep = prev_keep;
            loop {
                let item = tokio::select! {
                    frame = prev_rx.recv() => match frame {
                        Ok(Frame::Ring(f)) => Ok(f),
                        Ok(Frame::Control(m)) => {
                            Err(format!("ring predecessor {prev_node} sent a {} message on the ring", m.name()))
                        }
                        Err(e) => Err(format!("ring predecessor {prev_node} is gone: {e}")),
                    },
                    e = successor.closed() => Err(format!("ring successor {next_node} is gone: {e}")),
                };
                let stop = item.is_err();
                if prev_tx.send(item).is_err() || stop {
                    return;
                }
            }
        }
    });
    Ok((ring, RingLinks { conns: vec![next_sender, prev_sender], tasks: vec![sender, receiver] }))
}

/// The first incoming connection from `place.prev_node` whose hello names this group and the
/// predecessor's rank; everything else is closed.
async fn accept_predecessor(endpoint: &Endpoint, place: &RingPlace) -> Result<Conn, RingSetupError> {
    let want = (place.group, place.prev_rank());
    loop {
        let conn = match endpoint.accept().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                tracing::warn!("ring: refused a connection: {e}");
                continue;
            }
            None => return Err(RingSetupError::EndpointClosed(place.prev_node.clone())),
        };
        if conn.peer_name() != place.prev_node {
            conn.close("not my ring predecessor");
            continue;
        }
        match tokio::time::timeout(RING_HELLO_TIMEOUT, conn.recv()).await {
            Ok(Ok(Frame::Control(Message::RingHello { group, rank }))) if (group, rank) == want => return Ok(conn),
            Ok(Ok(Frame::Control(Message::RingHello { group, rank }))) => {
                let why = format!(
                    "stale ring connection: it is for group {group} rank {rank}, this ring is group {} rank {}",
                    want.0, want.1
                );
                tracing::warn!("ring: {} closed: {why}", place.prev_node);
                conn.close(&why);
            }
            Ok(Ok(other)) => conn.close(&format!("expected RingHello, got a {} frame", other.kind_name())),
            // Closed by its dialler before we got to it: left over from an abandoned formation.
            Ok(Err(_)) => {}
            Err(_) => conn.close("no RingHello"),
        }
    }
}
