//! One established connection and its message stream: frames of [`lockstep_proto::wire`] written
//! whole and read back incrementally.
//!
//! Sends are serialised by a mutex around the stream and a reused encode buffer (the ring sends
//! the same sizes step after step); a send abandoned midway marks the stream torn, since a partial
//! frame is on it, and every later send refuses. Receiving pushes whatever the stream yields into
//! a [`FrameDecoder`], which checks the length cap as soon as a prefix arrives, so a hostile peer
//! cannot make us buffer a 4 GiB "frame".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lockstep_proto::wire::{self, Frame, FrameDecoder, ALPN};
use tokio::sync::Mutex;

use crate::error::{close_code, connection_error, read_error, write_error, NetError};

/// Bytes read from the stream per call before the decoder looks at them: also the most that is
/// buffered before an over-cap length prefix is noticed.
const READ_CHUNK: usize = 64 << 10;

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

pub(crate) struct SendState {
    pub(crate) stream: quinn::SendStream,
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
    pub(crate) state: Arc<Mutex<SendState>>,
}

/// The receiving half of a [`Conn`].
pub struct ConnReceiver {
    shared: Arc<Shared>,
    stream: quinn::RecvStream,
    pub(crate) decoder: FrameDecoder,
    scratch: Box<[u8]>,
}

/// One established lockstep connection: a verified peer and its message stream.
///
/// Dropping the last handle (the `Conn`, or both halves and every sender clone) closes the
/// connection at once, like [`close`](Conn::close): frames the peer has not yet received are lost.
/// Call [`finish`](Conn::finish) first when the last message matters.
pub struct Conn {
    pub(crate) sender: ConnSender,
    pub(crate) receiver: Mutex<ConnReceiver>,
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
    pub(crate) fn new(
        connection: quinn::Connection,
        peer_name: String,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Self {
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

    /// Sends bytes of one encoded frame. See [`ConnSender::send_encoded`].
    pub async fn send_encoded(&self, frame: &[u8]) -> Result<(), NetError> {
        self.sender.send_encoded(frame).await
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

    pub(crate) fn close_with(&self, code: u32, reason: &str) {
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

    /// Sends frame bytes that [`wire::encode`] made, so one frame encoded once can go to several
    /// peers (the coordinator sends each step's plan to every rank of a group). `frame` must be
    /// exactly one whole encoded frame. Same guarantees as [`send`](Self::send).
    pub async fn send_encoded(&self, frame: &[u8]) -> Result<(), NetError> {
        let mut state = self.lock_untorn().await?;
        let SendState { stream, torn, .. } = &mut *state;
        Self::write_frame(stream, torn, frame).await
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
        let SendState { stream, buf, torn } = state;
        Self::write_frame(stream, torn, buf).await
    }

    /// Writes one whole frame, marking the stream torn while a write is under way.
    async fn write_frame(stream: &mut quinn::SendStream, torn: &mut bool, frame: &[u8]) -> Result<(), NetError> {
        *torn = true;
        stream.write_all(frame).await.map_err(write_error)?;
        *torn = false;
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
    /// [`IDLE_TIMEOUT`](crate::IDLE_TIMEOUT)), or sent something that is not a frame ([`NetError::Wire`]; the length cap
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
