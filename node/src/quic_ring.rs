//! The ring over QUIC: one connection to the successor (dialled), one from the predecessor
//! (accepted), and the [`RingTransport`] the blocking model thread drives them through. Where both
//! neighbours of a link run on this machine, the link's frames move to a Unix socket negotiated on
//! its QUIC connection (`crate::same_host`; `--ring-transport auto`, the default), and the QUIC
//! connection stays open beside it for close reasons.
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
//! reason the neighbours then report. On a same-host link the kernel closes the socket of a process
//! that dies, which fails the waiting step at once; a QUIC close wakes the model thread by shutting
//! its predecessor socket down, and the step reports the reason QUIC carried when it has arrived.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_proto::wire::{self, Frame, Message, RingFrame};
use lockstep_transport::{resolve, Conn, ConnSender, Endpoint, NetError, DEFAULT_SERVER_NAME};
use tokio::sync::mpsc;

use crate::ring::{RingError, RingTransport};
use crate::same_host::{
    self, RingSockets, RingTransportMode, SameHostError, SameHostListener, SocketFailure, SocketWaker,
};

/// Longest the ring takes to form: both neighbours connected.
pub const RING_FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest an accepted connection from the predecessor's node may take to say which ring it is
/// for, and to answer the same-host offer.
const RING_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a write to a same-host successor may wait for room (the successor reads every frame as
/// part of its own all-reduce, so only a stuck successor makes it wait).
const SOCKET_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a step whose same-host socket closed waits for the QUIC connection's close reason
/// (it comes within a loopback round trip when the neighbour closed in an orderly way; a killed
/// process sends none).
const QUIC_REASON_GRACE: Duration = Duration::from_millis(250);

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
    #[error("ring neighbour {node}: {why}")]
    Negotiation { node: String, why: String },
    #[error(transparent)]
    SameHost(#[from] SameHostError),
}

/// How the frames of each direction of a link travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPath {
    Quic,
    SameHostSocket,
}

impl LinkPath {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkPath::Quic => "QUIC",
            LinkPath::SameHostSocket => "same-host socket",
        }
    }
}

/// Ring links between the model thread (blocking) and its neighbours: QUIC connections (async,
/// through channels), or same-host sockets the model thread uses itself.
pub struct NodeRing {
    /// Encoded ring frames for the successor (QUIC path).
    to_next: mpsc::UnboundedSender<Vec<u8>>,
    from_prev: Mutex<std_mpsc::Receiver<Result<RingFrame, String>>>,
    /// The same-host sockets, where negotiated (either direction may still be on QUIC).
    sockets: Mutex<RingSockets>,
    next_node: String,
    prev_node: String,
    /// Why the sender task stopped, once it has.
    successor_failure: Arc<Mutex<Option<String>>>,
}

impl NodeRing {
    /// How frames travel to the successor and from the predecessor.
    pub fn paths(&self) -> (LinkPath, LinkPath) {
        let s = self.sockets.lock().expect("ring socket lock");
        let path = |socket: bool| if socket { LinkPath::SameHostSocket } else { LinkPath::Quic };
        (path(s.has_next()), path(s.has_prev()))
    }

    /// A socket failure as the step reports it: with the reason the neighbour gave on QUIC when it
    /// closed in an orderly way (that close shuts the socket down too, and may be read first).
    fn socket_error(&self, failure: SocketFailure, timeout: Duration) -> RingError {
        if failure != SocketFailure::Timeout {
            let told = self.from_prev.lock().expect("ring receiver lock").recv_timeout(QUIC_REASON_GRACE);
            if let Ok(Err(why)) = told {
                return RingError::Transport(why);
            }
        }
        RingError::Transport(match failure {
            SocketFailure::Successor(why) => format!("ring successor {} is gone: {why}", self.next_node),
            SocketFailure::Predecessor(why) => format!("ring predecessor {} is gone: {why}", self.prev_node),
            SocketFailure::Timeout => {
                format!("no progress with ring neighbours {} and {} within {timeout:?}", self.prev_node, self.next_node)
            }
        })
    }
}

impl RingTransport for NodeRing {
    fn send_next(&self, step_id: u64, op: u32, origin_rank: u32, data: &[f32]) -> Result<(), RingError> {
        let mut sockets = self.sockets.lock().expect("ring socket lock");
        if sockets.has_next() {
            return sockets
                .send(step_id, op, origin_rank, data, SOCKET_SEND_TIMEOUT)
                .map_err(|f| self.socket_error(f, SOCKET_SEND_TIMEOUT));
        }
        drop(sockets);
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
        let mut sockets = self.sockets.lock().expect("ring socket lock");
        if sockets.has_prev() {
            return sockets.recv(timeout).map_err(|f| match f {
                SocketFailure::Timeout => RingError::Transport(format!(
                    "no ring frame from the predecessor {} within {timeout:?}",
                    self.prev_node
                )),
                f => self.socket_error(f, timeout),
            });
        }
        drop(sockets);
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

    fn can_check_neighbours(&self) -> bool {
        let s = self.sockets.lock().expect("ring socket lock");
        s.has_next() || s.has_prev()
    }

    fn check_neighbours(&self) -> Result<(), RingError> {
        let failure = self.sockets.lock().expect("ring socket lock").check_neighbours();
        failure.map_err(|f| self.socket_error(f, Duration::ZERO))
    }
}

/// The connections, sockets and pump tasks of one ring membership. Dropping it closes both
/// connections.
pub struct RingLinks {
    conns: Vec<ConnSender>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Shut the same-host sockets down, so a step blocked on them fails at once.
    sockets: Vec<SocketWaker>,
}

impl RingLinks {
    /// Closes both connections (and the same-host sockets) with `reason` (the neighbours' failing
    /// steps report it).
    pub fn close(self, reason: &str) {
        for c in &self.conns {
            c.close(reason);
        }
        for s in &self.sockets {
            s.wake();
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

/// Dial the successor and accept the predecessor (in parallel) for `place`, and move each link
/// whose two ends share this machine onto a same-host socket when `mode` allows. Returns the
/// blocking transport for [`RingCollective`](crate::ring::RingCollective) and the links that
/// keep it up.
pub async fn connect_ring(
    endpoint: &Endpoint,
    place: &RingPlace,
    mode: RingTransportMode,
) -> Result<(NodeRing, RingLinks), RingSetupError> {
    let (to_next, mut next_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (prev_tx, from_prev) = std_mpsc::channel();
    let successor_failure = Arc::new(Mutex::new(None));
    let mut ring = NodeRing {
        to_next,
        from_prev: Mutex::new(from_prev),
        sockets: Mutex::new(RingSockets::new(None, None)),
        next_node: format!("at {}", place.next_addr),
        prev_node: place.prev_node.clone(),
        successor_failure: successor_failure.clone(),
    };
    if place.tp <= 1 {
        return Ok((ring, RingLinks { conns: Vec::new(), tasks: Vec::new(), sockets: Vec::new() }));
    }
    let next_rank = (place.rank + 1) % place.tp;
    let dial = async {
        let unreachable = |source| RingSetupError::Dial { addr: place.next_addr.clone(), rank: next_rank, source };
        let dialled = async {
            let conn = endpoint
                .connect(resolve(&place.next_addr).await.map_err(unreachable)?, DEFAULT_SERVER_NAME)
                .await
                .map_err(unreachable)?;
            let hello = Message::RingHello { group: place.group, rank: place.rank };
            conn.send(&Frame::Control(hello)).await.map_err(unreachable)?;
            // The successor answers once it reaches its own formation, which may be much later
            // (still loading, or hashing its weights): bounded by the formation's timeout only.
            let socket = take_same_host_offer(&conn, mode).await?;
            Ok((conn, socket))
        };
        tokio::time::timeout(RING_FORM_TIMEOUT, dialled).await.unwrap_or_else(|_| {
            Err(RingSetupError::Timeout {
                missing: format!("ring successor at {} (rank {next_rank}) did not accept", place.next_addr),
            })
        })
    };
    let accept = async {
        let accepted = async {
            let conn = accept_predecessor(endpoint, place).await?;
            let socket = offer_same_host(&conn, mode).await?;
            Ok((conn, socket))
        };
        tokio::time::timeout(RING_FORM_TIMEOUT, accepted).await.unwrap_or_else(|_| {
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
    let ((next, next_socket), (prev, prev_socket)) = tokio::try_join!(dial, accept)?;
    ring.next_node = next.peer_name().to_owned();
    let sockets = RingSockets::new(next_socket, prev_socket);
    let wakers = sockets.wakers().map_err(SameHostError::Setup)?;
    let wake_model_thread = sockets.prev_waker().map_err(SameHostError::Setup)?;
    *ring.sockets.get_mut().expect("ring socket lock") = sockets;
    let (to_successor, from_predecessor) = ring.paths();
    tracing::info!(
        "ring group {} rank {}/{}: frames to successor {} on {}, from predecessor {} on {}",
        place.group,
        place.rank,
        place.tp,
        ring.next_node,
        to_successor.as_str(),
        ring.prev_node,
        from_predecessor.as_str()
    );

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
                        Ok(Frame::Ring(f)) if wake_model_thread.is_none() => Ok(f),
                        Ok(Frame::Ring(_)) => {
                            Err(format!("ring predecessor {prev_node} sent a ring frame on QUIC after moving to a same-host socket"))
                        }
                        Ok(Frame::Control(m)) => {
                            Err(format!("ring predecessor {prev_node} sent a {} message on the ring", m.name()))
                        }
                        Err(e) => Err(format!("ring predecessor {prev_node} is gone: {e}")),
                    },
                    e = successor.closed() => Err(format!("ring successor {next_node} is gone: {e}")),
                };
                let stop = item.is_err();
                if let (Err(_), Some(waker)) = (&item, &wake_model_thread) {
                    // The model thread waits on the predecessor's socket, not on this channel: the
                    // socket reads as closed, and the step then takes the reason from the channel.
                    waker.wake();
                }
                if prev_tx.send(item).is_err() || stop {
                    return;
                }
            }
        }
    });
    Ok((ring, RingLinks { conns: vec![next_sender, prev_sender], tasks: vec![sender, receiver], sockets: wakers }))
}

/// The dialler's half of the same-host negotiation on a fresh ring connection: read the
/// successor's offer; take it when `mode` allows and both ends are provably on this machine.
async fn take_same_host_offer(
    conn: &Conn,
    mode: RingTransportMode,
) -> Result<Option<std::os::unix::net::UnixStream>, RingSetupError> {
    let node = conn.peer_name().to_owned();
    let negotiation = |why: String| RingSetupError::Negotiation { node: node.clone(), why };
    let offer = match conn.recv().await {
        Ok(Frame::Control(Message::RingSameHost { offer })) => offer,
        Ok(other) => return Err(negotiation(format!("expected RingSameHost, got a {} frame", other.kind_name()))),
        Err(e) => return Err(negotiation(format!("the ring connection closed while forming: {e}"))),
    };
    let usable = offer.filter(|o| {
        mode == RingTransportMode::Auto
            && same_host::offer_is_same_host(o, same_host::boot_id().as_deref(), conn.remote_addr())
    });
    let stream = match &usable {
        Some(offer) => same_host::dial(offer).await,
        None => None,
    };
    let answer = Message::RingSameHostAnswer { connected: stream.is_some() };
    conn.send(&Frame::Control(answer)).await.map_err(|e| negotiation(format!("cannot answer RingSameHost: {e}")))?;
    match stream {
        Some(s) => Ok(Some(same_host::confirm(s, &node).await?)),
        None => Ok(None),
    }
}

/// The acceptor's half: offer a same-host socket when `mode` allows and the predecessor's address
/// is loopback (the dialler checks the boot id), and take the predecessor's socket if it answers
/// that it connected.
async fn offer_same_host(
    conn: &Conn,
    mode: RingTransportMode,
) -> Result<Option<std::os::unix::net::UnixStream>, RingSetupError> {
    let node = conn.peer_name().to_owned();
    let negotiation = |why: String| RingSetupError::Negotiation { node: node.clone(), why };
    let listener = if mode == RingTransportMode::Auto && same_host::is_loopback(conn.remote_addr()) {
        SameHostListener::bind(&std::env::temp_dir()).unwrap_or_else(|e| {
            tracing::warn!("ring: predecessor {node} stays on QUIC: {e}");
            None
        })
    } else {
        None
    };
    let offer = Message::RingSameHost { offer: listener.as_ref().map(|l| l.offer().clone()) };
    conn.send(&Frame::Control(offer)).await.map_err(|e| negotiation(format!("cannot send RingSameHost: {e}")))?;
    match tokio::time::timeout(RING_HELLO_TIMEOUT, conn.recv()).await {
        Ok(Ok(Frame::Control(Message::RingSameHostAnswer { connected: false }))) => Ok(None),
        Ok(Ok(Frame::Control(Message::RingSameHostAnswer { connected: true }))) => match listener {
            Some(l) => Ok(Some(l.accept(&node).await?)),
            None => Err(negotiation("it says it connected to a same-host socket that was never offered".into())),
        },
        Ok(Ok(other)) => Err(negotiation(format!("expected RingSameHostAnswer, got a {} frame", other.kind_name()))),
        Ok(Err(e)) => Err(negotiation(format!("the ring connection closed while forming: {e}"))),
        Err(_) => Err(negotiation(format!("no RingSameHostAnswer within {RING_HELLO_TIMEOUT:?}"))),
    }
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
