//! The wire protocol between coordinator and nodes, and between the ranks of a ring: framing,
//! control messages and tensor frames, sans-IO.
//!
//! # Design
//!
//! **Sans-IO.** This module turns values into bytes and bytes into values and nothing else: no
//! sockets, no async, no clocks. The QUIC transport (the `lockstep-transport` crate) and the tests
//! drive the same [`encode`] / [`FrameDecoder`] pair, so the parsing that faces the network is
//! exercised byte by byte without a network, and hostile input is a unit-test concern (see the
//! property test at the bottom of this file).
//!
//! **Framing.** Every frame is `[u32 LE length of the rest][u8 kind][body]`. The length counts the
//! kind byte and the body, and may not exceed [`MAX_FRAME_BYTES`]; the decoder checks it as soon as
//! the four prefix bytes are in, before it buffers (or reserves room for) any of the body, so a peer
//! cannot make a node allocate more than the cap by announcing a huge frame. Kind 0 is a control
//! [`Message`] in postcard; kind 1 is a [`RingFrame`].
//!
//! **Control messages: serde + postcard.** They are small, varied and evolve with the code, so they
//! use serde with postcard's compact, stable, `no_std`-friendly format (bincode is archived).
//! Postcard is not self-describing: both sides must run the same message definitions, which is what
//! the protocol version guarantees.
//!
//! **Tensors: raw little-endian bytes.** A [`RingFrame`] carries activations for the all-reduce,
//! typically megabytes per step and per layer. Encoding them through serde would cost a call per
//! element and, in postcard, a variable-length layout; instead the body is a fixed little-endian
//! header followed by the `f32`s' little-endian bytes, so encoding and decoding are straight copies
//! and every bit — NaN payloads, `-0.0`, subnormals — survives, which a bitwise-reproducible
//! all-reduce needs.
//!
//! **The version lives in ALPN.** [`ALPN`] (`lockstep/4`) names the protocol version and is
//! negotiated in the TLS handshake, so two builds that would misread each other's postcard never
//! get as far as exchanging a frame: the mismatch is a handshake failure with a clear cause rather
//! than a garbled message later. [`Hello::protocol_version`] repeats it for logs and for the
//! coordinator's refusal message.

use lockstep_kernels::{KernelMode, ShardSample};
use serde::{Deserialize, Serialize};

use crate::session::PlanDelta;

/// Version of the wire protocol. Bump it (and [`ALPN`]) on any change to the framing or to the
/// postcard layout of [`Message`].
///
/// History: 2 added [`Message::Release`] (re-formation on one connection) and
/// [`Message::RingHello`] (ring connections say which group they belong to); 3 made
/// [`Message::Step`] carry a [`PlanDelta`] (the session step protocol, `crate::session`) and added
/// [`Message::StepRejected`]; 4 added [`Message::RingSameHost`] and
/// [`Message::RingSameHostAnswer`] (the same-host ring socket).
pub const PROTOCOL_VERSION: u32 = 4;

/// The TLS application protocol name: `lockstep/` followed by [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"lockstep/4";

/// Hard cap on the length prefix of a frame (kind byte plus body): 64 MiB.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Bytes of the length prefix in front of every frame.
pub const LEN_PREFIX_BYTES: usize = 4;

/// Frame kind of a postcard-encoded [`Message`].
pub const KIND_CONTROL: u8 = 0;

/// Frame kind of a [`RingFrame`].
pub const KIND_RING: u8 = 1;

/// Bytes of a ring frame's fixed header: `step_id u64, op u32, origin_rank u32, count u32`, all
/// little-endian, followed by `count` little-endian `f32`s.
pub const RING_HEADER_BYTES: usize = 20;

/// Most `f32`s one ring frame can carry under [`MAX_FRAME_BYTES`].
pub const MAX_RING_FLOATS: usize = (MAX_FRAME_BYTES - 1 - RING_HEADER_BYTES) / 4;

/// A node's introduction, its first message to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The node's [`PROTOCOL_VERSION`]; ALPN already enforces it, this is for the refusal message.
    pub protocol_version: u32,
    pub node_id: String,
    /// Where this node accepts ring connections from its ring predecessor (`host:port`).
    pub ring_addr: String,
    pub threads: u32,
    /// Free-form build description (version, git hash, target features) for logs.
    pub build: String,
}

/// The coordinator's instructions to one node: which rank of which tensor-parallel group it is,
/// what to load and how to configure its engine and ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub group: u32,
    pub rank: u32,
    /// Tensor-parallel degree of the group (number of ranks).
    pub tp: u32,
    pub model_dir: String,
    pub reduce_segments: u32,
    pub kv_chunk: u32,
    pub kernel_mode: KernelMode,
    pub block_size: u32,
    pub num_blocks: u32,
    pub max_context: u32,
    /// The determinism fingerprint the node must reproduce, or it refuses the assignment.
    pub expected_fingerprint: String,
    /// Ring address of rank `(rank + 1) % tp`, which this node connects to.
    pub ring_next: String,
    /// Node id of rank `(rank + tp - 1) % tp`, the only peer allowed to connect to this node's ring
    /// address.
    pub ring_prev_node: String,
}

/// Why one side refuses the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefuseCode {
    ProtocolVersion,
    Fingerprint,
    Certificate,
    Busy,
    BadRequest,
}

impl RefuseCode {
    /// A stable machine-readable name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::ProtocolVersion => "protocol_version",
            RefuseCode::Fingerprint => "fingerprint",
            RefuseCode::Certificate => "certificate",
            RefuseCode::Busy => "busy",
            RefuseCode::BadRequest => "bad_request",
        }
    }
}

/// A control message (frame kind 0), encoded with postcard.
///
/// Variants are identified by their index in postcard: append new variants at the end and bump
/// [`PROTOCOL_VERSION`] when changing an existing one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Node → coordinator: who I am.
    Hello(Hello),
    /// Coordinator → node: accepted.
    Welcome {
        coordinator_id: String,
    },
    /// Either way: I will not work with you, and why. The connection closes after it.
    Refused {
        code: RefuseCode,
        message: String,
    },
    /// Coordinator → node: your rank and configuration.
    Assign(Assignment),
    /// Node → coordinator: the assignment is loaded, ring connected, fingerprint checked.
    Ready {
        rank: u32,
        fingerprint: String,
        weights_hash: String,
    },
    /// Coordinator → node: run this step: the changes to the node's session that expand into the
    /// step's plan (a full snapshot for the first step of an assignment).
    Step(PlanDelta),
    /// Node → coordinator: the step ran; the vocab shard's sampling report per sampled sequence,
    /// in plan order.
    StepDone {
        step_id: u64,
        samples: Vec<(u64, ShardSample)>,
    },
    /// Node → coordinator: the step could not run. Also sent after [`Message::StepDone`] for the
    /// same step when a same-host ring neighbour's socket closes before the next step arrives: a
    /// neighbour killed after its last ring frame never answers, so the group cannot finish it.
    StepFailed {
        step_id: u64,
        message: String,
    },
    /// Liveness probe; the receiver answers with [`Message::HeartbeatAck`] echoing both fields.
    Heartbeat {
        seq: u64,
        sent_unix_ns: u64,
    },
    HeartbeatAck {
        seq: u64,
        sent_unix_ns: u64,
    },
    /// Either way: something went wrong that is not tied to one step.
    Error {
        code: String,
        message: String,
    },
    /// Coordinator → node: finish and exit.
    Shutdown,
    /// Coordinator → node: drop your assignment (model shard, KV cache, ring connections), keep
    /// this connection and wait for the next [`Message::Assign`]. Sent when the node's group is
    /// dissolved; harmless when the node holds no assignment.
    Release {
        reason: String,
    },
    /// Node → node, the first frame on a ring connection: the dialler is rank `rank` of group
    /// `group`. The acceptor takes only its current predecessor, so a connection left over from an
    /// abandoned formation (queued but never accepted) cannot join a new ring by name alone.
    RingHello {
        group: u32,
        rank: u32,
    },
    /// Node → coordinator: the step's delta does not fit this node's session (a gap in step ids,
    /// an unknown sequence); nothing of the step ran. The coordinator answers with the same step as
    /// a full snapshot.
    StepRejected {
        step_id: u64,
        message: String,
    },
    /// Node → node, the acceptor's answer to a [`Message::RingHello`]: where the dialler may send
    /// its ring frames instead of on this connection, if it runs on the same machine (`None`: the
    /// frames stay on QUIC). Sent over the mutually authenticated ring connection, so the offer
    /// reaches only the predecessor the acceptor's assignment names.
    RingSameHost {
        offer: Option<SameHostOffer>,
    },
    /// Node → node, the dialler's reply to [`Message::RingSameHost`]: `connected` when it has
    /// connected to the offered socket and written the token there; otherwise the ring frames of
    /// this connection stay on QUIC.
    RingSameHostAnswer {
        connected: bool,
    },
}

/// A same-host ring socket offered by a ring acceptor to its predecessor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SameHostOffer {
    /// The acceptor's `/proc/sys/kernel/random/boot_id`: equal only on the same running kernel.
    pub boot_id: String,
    /// A Unix stream socket in a directory only the acceptor's user may enter.
    pub socket_path: String,
    /// Random bytes the dialler must write first on the socket; good for one connection.
    pub token: Vec<u8>,
}

impl Message {
    /// The variant's name, for logs and "unexpected message" errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Refused { .. } => "Refused",
            Message::Assign(_) => "Assign",
            Message::Ready { .. } => "Ready",
            Message::Step(_) => "Step",
            Message::StepDone { .. } => "StepDone",
            Message::StepFailed { .. } => "StepFailed",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::HeartbeatAck { .. } => "HeartbeatAck",
            Message::Error { .. } => "Error",
            Message::Shutdown => "Shutdown",
            Message::Release { .. } => "Release",
            Message::RingHello { .. } => "RingHello",
            Message::StepRejected { .. } => "StepRejected",
            Message::RingSameHost { .. } => "RingSameHost",
            Message::RingSameHostAnswer { .. } => "RingSameHostAnswer",
        }
    }
}

/// One piece of an all-reduce (frame kind 1).
///
/// Equality is bitwise on `data` (NaN equals the same NaN, `-0.0` differs from `0.0`), because
/// what matters on the wire is that the bits arrive unchanged.
#[derive(Debug, Clone)]
pub struct RingFrame {
    pub step_id: u64,
    /// Which all-reduce of the step: `layer * 2 + 0` after attention, `layer * 2 + 1` after the MLP.
    pub op: u32,
    /// Rank whose segment this is (the all-reduce's bookkeeping, not the sender's identity).
    pub origin_rank: u32,
    pub data: Vec<f32>,
}

impl PartialEq for RingFrame {
    fn eq(&self, other: &Self) -> bool {
        self.step_id == other.step_id
            && self.op == other.op
            && self.origin_rank == other.origin_rank
            && self.data.len() == other.data.len()
            && self.data.iter().zip(&other.data).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// One unit on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Control(Message),
    Ring(RingFrame),
}

impl From<Message> for Frame {
    fn from(message: Message) -> Self {
        Frame::Control(message)
    }
}

impl From<RingFrame> for Frame {
    fn from(ring: RingFrame) -> Self {
        Frame::Ring(ring)
    }
}

impl Frame {
    /// `"control"` or `"ring"`, for logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Control(_) => "control",
            Frame::Ring(_) => "ring",
        }
    }
}

/// Why bytes could not become a frame, or a frame bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the {max}-byte cap")]
    TooLarge { len: usize, max: usize },
    #[error("frame has a zero length prefix (every frame carries at least its kind byte)")]
    EmptyFrame,
    #[error("unknown frame kind {0} (expected 0 = control message or 1 = ring frame)")]
    UnknownKind(u8),
    #[error("malformed control message: {0}")]
    MalformedControl(String),
    #[error("{count} unexpected bytes after the end of the {after}")]
    TrailingBytes { after: &'static str, count: usize },
    #[error("ring frame body is {got} bytes, shorter than its {RING_HEADER_BYTES}-byte header")]
    RingHeaderTruncated { got: usize },
    #[error("ring frame announces {count} floats ({expected} body bytes) but its body is {got} bytes")]
    RingLength { count: u32, expected: u64, got: usize },
    #[error("truncated frame: have {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("cannot encode control message: {0}")]
    Encode(String),
}

impl WireError {
    /// A stable machine-readable name for logs and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "frame_too_large",
            WireError::EmptyFrame => "empty_frame",
            WireError::UnknownKind(_) => "unknown_frame_kind",
            WireError::MalformedControl(_) => "malformed_control",
            WireError::TrailingBytes { .. } => "trailing_bytes",
            WireError::RingHeaderTruncated { .. } => "ring_header_truncated",
            WireError::RingLength { .. } => "ring_length",
            WireError::Truncated { .. } => "truncated",
            WireError::Encode(_) => "encode",
        }
    }
}

/// Encodes one frame into a fresh buffer.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(frame, &mut out)?;
    Ok(out)
}

/// Appends one encoded frame to `out`, so a sender can reuse its buffer. On error `out` is left as
/// it was.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    match frame {
        Frame::Control(message) => {
            let body = postcard::to_allocvec(message).map_err(|e| WireError::Encode(e.to_string()))?;
            let len = check_len(1 + body.len())?;
            out.reserve(LEN_PREFIX_BYTES + len as usize);
            out.extend_from_slice(&len.to_le_bytes());
            out.push(KIND_CONTROL);
            out.extend_from_slice(&body);
            Ok(())
        }
        Frame::Ring(ring) => encode_ring(ring.step_id, ring.op, ring.origin_rank, &ring.data, out),
    }
}

/// Appends a ring frame built from borrowed parts to `out`: what [`encode_into`] does for a
/// [`Frame::Ring`], without first copying `data` into a [`RingFrame`] (the all-reduce sends slices
/// of its working buffer). On error `out` is left as it was.
pub fn encode_ring(step_id: u64, op: u32, origin_rank: u32, data: &[f32], out: &mut Vec<u8>) -> Result<(), WireError> {
    // Checked in u64 so an absurd slice length cannot overflow the arithmetic on 32-bit targets.
    let rest = 1 + RING_HEADER_BYTES as u64 + 4 * data.len() as u64;
    if rest > MAX_FRAME_BYTES as u64 {
        return Err(WireError::TooLarge { len: usize::try_from(rest).unwrap_or(usize::MAX), max: MAX_FRAME_BYTES });
    }
    let rest = rest as u32;
    out.reserve(LEN_PREFIX_BYTES + rest as usize);
    out.extend_from_slice(&rest.to_le_bytes());
    out.push(KIND_RING);
    out.extend_from_slice(&step_id.to_le_bytes());
    out.extend_from_slice(&op.to_le_bytes());
    out.extend_from_slice(&origin_rank.to_le_bytes());
    // Fits: data.len() <= MAX_RING_FLOATS < u32::MAX.
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    // Sized once, then filled in place: on little-endian targets this compiles to a plain copy.
    let start = out.len();
    out.resize(start + 4 * data.len(), 0);
    for (dst, x) in out[start..].chunks_exact_mut(4).zip(data) {
        dst.copy_from_slice(&x.to_le_bytes());
    }
    Ok(())
}

/// The length prefix for `rest` bytes of kind plus body, or [`WireError::TooLarge`].
fn check_len(rest: usize) -> Result<u32, WireError> {
    if rest > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge { len: rest, max: MAX_FRAME_BYTES });
    }
    Ok(rest as u32)
}

/// Reads a length prefix and validates it against the cap: the length of the kind byte plus body.
fn parse_len(prefix: [u8; LEN_PREFIX_BYTES]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    if len > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge { len, max: MAX_FRAME_BYTES });
    }
    Ok(len)
}

/// Decodes the part of a frame after its length prefix: the kind byte and the body.
fn decode_rest(rest: &[u8]) -> Result<Frame, WireError> {
    let (&kind, body) = rest.split_first().ok_or(WireError::EmptyFrame)?;
    match kind {
        KIND_CONTROL => {
            let (message, tail) =
                postcard::take_from_bytes::<Message>(body).map_err(|e| WireError::MalformedControl(e.to_string()))?;
            if !tail.is_empty() {
                return Err(WireError::TrailingBytes { after: "control message", count: tail.len() });
            }
            Ok(Frame::Control(message))
        }
        KIND_RING => decode_ring(body).map(Frame::Ring),
        other => Err(WireError::UnknownKind(other)),
    }
}

fn decode_ring(body: &[u8]) -> Result<RingFrame, WireError> {
    if body.len() < RING_HEADER_BYTES {
        return Err(WireError::RingHeaderTruncated { got: body.len() });
    }
    let (header, payload) = body.split_at(RING_HEADER_BYTES);
    let u32_at = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let mut step_id = [0u8; 8];
    step_id.copy_from_slice(&header[..8]);
    let count = u32_at(16);
    let expected = RING_HEADER_BYTES as u64 + 4 * count as u64;
    if expected != body.len() as u64 {
        return Err(WireError::RingLength { count, expected, got: body.len() });
    }
    let data = payload.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(RingFrame { step_id: u64::from_le_bytes(step_id), op: u32_at(8), origin_rank: u32_at(12), data })
}

/// Decodes a buffer holding exactly one frame.
pub fn decode_one(bytes: &[u8]) -> Result<Frame, WireError> {
    if bytes.len() < LEN_PREFIX_BYTES {
        return Err(WireError::Truncated { have: bytes.len(), need: LEN_PREFIX_BYTES });
    }
    let (prefix, rest) = bytes.split_at(LEN_PREFIX_BYTES);
    let len = parse_len([prefix[0], prefix[1], prefix[2], prefix[3]])?;
    if rest.len() < len {
        return Err(WireError::Truncated { have: bytes.len(), need: LEN_PREFIX_BYTES + len });
    }
    if rest.len() > len {
        return Err(WireError::TrailingBytes { after: "frame", count: rest.len() - len });
    }
    decode_rest(rest)
}

/// Incremental, sans-IO frame decoder for a byte stream.
///
/// Feed it whatever arrived with [`push`](Self::push), then call [`next`](Self::next) until it
/// returns `Ok(None)` (a partial frame is buffered and more bytes are needed). It never panics on
/// any input. Errors are sticky: once [`next`](Self::next) fails, the stream is no longer trusted
/// (its framing may be lost), every later call returns the same error, and further pushes are
/// dropped; the caller closes the connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`; consumed frames are compacted away lazily so that a
    /// push holding several frames costs one copy, not one per frame.
    start: usize,
    failed: Option<WireError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. Call [`next`](Self::next) after each push: the length cap is
    /// enforced there, as soon as a prefix is complete.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the stream's error.
    #[allow(clippy::should_implement_trait)] // Fallible and sticky: not an Iterator.
    pub fn next(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        match self.try_next() {
            Ok(frame) => Ok(frame),
            Err(err) => {
                self.failed = Some(err.clone());
                // Nothing buffered will be read again.
                self.buf = Vec::new();
                self.start = 0;
                Err(err)
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Frame>, WireError> {
        let avail = &self.buf[self.start..];
        if avail.len() < LEN_PREFIX_BYTES {
            self.compact();
            return Ok(None);
        }
        // Checked before anything of the body is buffered or reserved.
        let len = parse_len([avail[0], avail[1], avail[2], avail[3]])?;
        let total = LEN_PREFIX_BYTES + len;
        if avail.len() < total {
            self.compact();
            // The length is within the cap, so reserving it is bounded; it saves the reallocations
            // of growing a large ring frame push by push.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let frame = decode_rest(&avail[LEN_PREFIX_BYTES..total])?;
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }

    /// Moves the unconsumed bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{ChunkDelta, SampleDelta, SessionState, TableChange};
    use crate::step::{SeqChunk, StepPlan};
    use lockstep_kernels::{Candidate, LsePartial, SampleRequest, SamplingParams};

    fn sample() -> ShardSample {
        let cand = |id, logit: f32| Candidate { id, logit, z: logit * 2.0, score: logit - 0.25 };
        ShardSample {
            lse: LsePartial { max: 3.5, sum: 17.25 },
            lse_scaled: Some(LsePartial { max: f32::NEG_INFINITY, sum: 0.0 }),
            best: Some(cand(42, 3.5)),
            candidates: vec![cand(42, 3.5), cand(7, -1.0e-30), cand(u32::MAX, f32::MAX)],
        }
    }

    fn all_messages() -> Vec<Message> {
        let plan = StepPlan {
            step_id: u64::MAX,
            chunks: vec![
                SeqChunk { seq_id: 1, tokens: vec![1, 2, 3], first_pos: 0, block_table: vec![4], sample: None },
                SeqChunk {
                    seq_id: 9,
                    tokens: vec![u32::MAX],
                    first_pos: 4095,
                    block_table: (0..300).collect(),
                    sample: Some(SampleRequest {
                        params: SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.95, seed: u64::MAX - 3 },
                        step: 12,
                    }),
                },
            ],
        };
        vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: "node-0".into(),
                ring_addr: "127.0.0.1:7001".into(),
                threads: 16,
                build: "lockstep 0.1.0 (avx512) ünïcødé".into(),
            }),
            Message::Welcome { coordinator_id: "coord-a".into() },
            Message::Refused { code: RefuseCode::ProtocolVersion, message: "want 1, got 2".into() },
            Message::Refused { code: RefuseCode::Fingerprint, message: String::new() },
            Message::Refused { code: RefuseCode::Certificate, message: "x".into() },
            Message::Refused { code: RefuseCode::Busy, message: "x".into() },
            Message::Refused { code: RefuseCode::BadRequest, message: "x".into() },
            Message::Assign(Assignment {
                group: 2,
                rank: 1,
                tp: 4,
                model_dir: "/models/llama".into(),
                reduce_segments: 8,
                kv_chunk: 256,
                kernel_mode: KernelMode::Fast,
                block_size: 16,
                num_blocks: 4096,
                max_context: 8192,
                expected_fingerprint: "fp-abc".into(),
                ring_next: "10.0.0.2:7001".into(),
                ring_prev_node: "node-0".into(),
            }),
            Message::Ready { rank: 3, fingerprint: "fp".into(), weights_hash: "sha256:00ff".into() },
            Message::Step(SessionState::snapshot(&plan)),
            Message::Step(PlanDelta {
                step_id: 7,
                base_step: Some(6),
                dropped: vec![3, u64::MAX],
                chunks: vec![ChunkDelta {
                    seq_id: 9,
                    tokens: vec![5],
                    first_pos: 4096,
                    table: TableChange::Append(vec![301]),
                    sample: Some(SampleDelta { step: 13, params: None }),
                }],
            }),
            Message::Step(SessionState::snapshot(&StepPlan { step_id: 0, chunks: vec![] })),
            Message::StepDone { step_id: 5, samples: vec![(1, sample()), (u64::MAX, sample())] },
            Message::StepDone { step_id: 6, samples: vec![] },
            Message::StepFailed { step_id: 7, message: "bad plan".into() },
            Message::Heartbeat { seq: 1, sent_unix_ns: 1_700_000_000_000_000_000 },
            Message::HeartbeatAck { seq: u64::MAX, sent_unix_ns: 0 },
            Message::Error { code: "oom".into(), message: "out of KV blocks".into() },
            Message::Shutdown,
            Message::Release { reason: "group 3 stopped: node-1 is down".into() },
            Message::Release { reason: String::new() },
            Message::RingHello { group: 7, rank: 1 },
            Message::RingHello { group: u32::MAX, rank: u32::MAX },
            Message::StepRejected { step_id: 8, message: "step 8 builds on step 6".into() },
            Message::RingSameHost { offer: None },
            Message::RingSameHost {
                offer: Some(SameHostOffer {
                    boot_id: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
                    socket_path: "/tmp/lockstep-ring-1/ring.sock".into(),
                    token: vec![0, 255, 7, 42],
                }),
            },
            Message::RingSameHostAnswer { connected: true },
            Message::RingSameHostAnswer { connected: false },
        ]
    }

    fn special_floats() -> Vec<f32> {
        vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::MIN_POSITIVE,
            f32::from_bits(1), // smallest subnormal
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7fc0_1234), // quiet NaN with payload
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::from_bits(0xffff_ffff), // negative NaN, all payload bits
        ]
    }

    fn ring(data: Vec<f32>) -> RingFrame {
        RingFrame { step_id: 0x0102_0304_0506_0708, op: 2 * 31 + 1, origin_rank: 3, data }
    }

    fn assert_bits_eq(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn every_message_variant_round_trips() {
        let messages = all_messages();
        let names: std::collections::HashSet<_> = messages.iter().map(Message::name).collect();
        assert_eq!(names.len(), 17, "a Message variant is missing from the round-trip list");
        for message in messages {
            let frame = Frame::Control(message);
            let bytes = encode(&frame).unwrap();
            assert_eq!(bytes[4], KIND_CONTROL);
            assert_eq!(u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize, bytes.len() - 4);
            assert_eq!(decode_one(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn ring_frames_round_trip_bit_exact() {
        let data = special_floats();
        let frame = Frame::Ring(ring(data.clone()));
        let bytes = encode(&frame).unwrap();
        assert_eq!(bytes.len(), 4 + 1 + RING_HEADER_BYTES + 4 * data.len());
        assert_eq!(bytes[4], KIND_RING);
        // The payload is literally the little-endian bytes of the floats.
        let payload = &bytes[4 + 1 + RING_HEADER_BYTES..];
        for (x, b) in data.iter().zip(payload.chunks_exact(4)) {
            assert_eq!(b, x.to_le_bytes());
        }
        let Frame::Ring(back) = decode_one(&bytes).unwrap() else { panic!("not a ring frame") };
        assert_eq!((back.step_id, back.op, back.origin_rank), (0x0102_0304_0506_0708, 63, 3));
        assert_bits_eq(&back.data, &data);
        assert_eq!(Frame::Ring(back), frame);

        let empty = Frame::Ring(ring(vec![]));
        assert_eq!(decode_one(&encode(&empty).unwrap()).unwrap(), empty);
    }

    #[test]
    fn ring_frame_equality_is_bitwise() {
        assert_eq!(ring(vec![f32::NAN]), ring(vec![f32::NAN]));
        assert_ne!(ring(vec![0.0]), ring(vec![-0.0]));
        assert_ne!(ring(vec![f32::NAN]), ring(vec![f32::from_bits(0x7fc0_0001)]));
    }

    #[test]
    fn encode_ring_matches_encode_of_a_ring_frame() {
        let data = special_floats();
        let mut out = vec![0xAA]; // appends, keeps what was there
        encode_ring(0x0102_0304_0506_0708, 63, 3, &data, &mut out).unwrap();
        assert_eq!(out[0], 0xAA);
        assert_eq!(&out[1..], &encode(&Frame::Ring(ring(data))).unwrap()[..]);
    }

    #[test]
    fn byte_at_a_time_feeding_yields_every_frame() {
        let mut frames: Vec<Frame> = all_messages().into_iter().map(Frame::Control).collect();
        frames.insert(3, Frame::Ring(ring(special_floats())));
        frames.push(Frame::Ring(ring(vec![])));
        let mut stream = Vec::new();
        for frame in &frames {
            encode_into(frame, &mut stream).unwrap();
        }
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for &b in &stream {
            decoder.push(&[b]);
            while let Some(frame) = decoder.next().unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(decoder.buffered(), 0);

        // And all at once.
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream);
        let mut got = Vec::new();
        while let Some(frame) = decoder.next().unwrap() {
            got.push(frame);
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn oversized_length_prefix_is_rejected_before_the_body() {
        for len in [MAX_FRAME_BYTES as u32 + 1, u32::MAX] {
            let mut decoder = FrameDecoder::new();
            decoder.push(&len.to_le_bytes());
            let err = decoder.next().unwrap_err();
            assert_eq!(err, WireError::TooLarge { len: len as usize, max: MAX_FRAME_BYTES });
            assert_eq!(err.error_type(), "frame_too_large");
            assert!(decoder.buf.capacity() < 1024, "nothing of the body may be reserved");
            // Sticky: the stream is dead.
            decoder.push(&[0; 100]);
            assert_eq!(decoder.next().unwrap_err(), err);
            assert_eq!(decoder.buffered(), 0);
        }
        // Exactly at the cap is accepted as far as the header goes (more bytes needed).
        let mut decoder = FrameDecoder::new();
        decoder.push(&(MAX_FRAME_BYTES as u32).to_le_bytes());
        assert_eq!(decoder.next(), Ok(None));
        assert_eq!(decode_one(&u32::MAX.to_le_bytes()).unwrap_err().error_type(), "frame_too_large");
    }

    #[test]
    fn encode_refuses_frames_over_the_cap() {
        let big = ring(vec![0.0; MAX_RING_FLOATS + 1]);
        let err = encode(&Frame::Ring(big)).unwrap_err();
        assert_eq!(err.error_type(), "frame_too_large");
        let mut out = vec![1, 2, 3];
        encode_ring(0, 0, 0, &vec![0.0; MAX_RING_FLOATS + 1], &mut out).unwrap_err();
        assert_eq!(out, [1, 2, 3], "a failed encode leaves the buffer alone");

        let msg = Message::Error { code: String::new(), message: "x".repeat(MAX_FRAME_BYTES) };
        assert_eq!(encode(&Frame::Control(msg)).unwrap_err().error_type(), "frame_too_large");
    }

    #[test]
    fn the_largest_ring_frame_fits_the_cap() {
        let bytes = encode(&Frame::Ring(ring(vec![1.0; MAX_RING_FLOATS]))).unwrap();
        assert!(bytes.len() - LEN_PREFIX_BYTES <= MAX_FRAME_BYTES);
        let Frame::Ring(back) = decode_one(&bytes).unwrap() else { panic!("not a ring frame") };
        assert_eq!(back.data.len(), MAX_RING_FLOATS);
    }

    #[test]
    fn malformed_frames_give_clear_errors() {
        let err = |bytes: &[u8]| decode_one(bytes).unwrap_err();
        assert_eq!(err(&[0, 0, 0, 0]), WireError::EmptyFrame);
        assert_eq!(err(&[1, 0, 0, 0, 7]), WireError::UnknownKind(7));
        assert!(err(&[1, 0, 0, 0, 7]).to_string().contains("unknown frame kind 7"));
        assert_eq!(err(&[1, 0]).error_type(), "truncated");
        assert_eq!(err(&[3, 0, 0, 0, 0]), WireError::Truncated { have: 5, need: 7 });

        // A control body that is not a Message: variant index 200 does not exist.
        assert_eq!(err(&[2, 0, 0, 0, KIND_CONTROL, 200]).error_type(), "malformed_control");
        // A valid message followed by junk inside the frame.
        let mut bytes = encode(&Frame::Control(Message::Shutdown)).unwrap();
        bytes.push(0x55);
        bytes[0] += 1;
        assert_eq!(err(&bytes), WireError::TrailingBytes { after: "control message", count: 1 });
        // A whole frame followed by extra bytes.
        let mut bytes = encode(&Frame::Control(Message::Shutdown)).unwrap();
        bytes.push(0);
        assert_eq!(err(&bytes), WireError::TrailingBytes { after: "frame", count: 1 });

        // Ring body shorter than its header, and a count that disagrees with the body.
        let mut short = vec![10, 0, 0, 0, KIND_RING];
        short.extend_from_slice(&[0; 9]);
        assert_eq!(err(&short), WireError::RingHeaderTruncated { got: 9 });
        let mut bytes = encode(&Frame::Ring(ring(vec![1.0, 2.0]))).unwrap();
        bytes[4 + 1 + 16] = 3; // count 2 -> 3
        assert_eq!(err(&bytes), WireError::RingLength { count: 3, expected: 32, got: 28 });
        bytes[4 + 1 + 16..4 + 1 + 20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(err(&bytes).error_type(), "ring_length");
    }

    /// xorshift64* (Vigna): a tiny deterministic generator, so the property test needs no
    /// dependency and every failure replays from its seed.
    struct XorShift(u64);

    impl XorShift {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }
    }

    fn random_frame(rng: &mut XorShift, messages: &[Message]) -> Frame {
        if rng.below(3) == 0 {
            let n = rng.below(64);
            let data = (0..n).map(|_| f32::from_bits(rng.next_u64() as u32)).collect();
            Frame::Ring(RingFrame {
                step_id: rng.next_u64(),
                op: rng.next_u64() as u32,
                origin_rank: rng.next_u64() as u32,
                data,
            })
        } else {
            Frame::Control(messages[rng.below(messages.len())].clone())
        }
    }

    /// Feeds `bytes` to a fresh decoder in random-sized pieces and drains it; returns the frames and
    /// the error, if any. Panics only if the decoder does.
    fn feed(rng: &mut XorShift, bytes: &[u8]) -> (Vec<Frame>, Option<WireError>) {
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(40));
            decoder.push(&rest[..n]);
            rest = &rest[n..];
            loop {
                match decoder.next() {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(err) => return (frames, Some(err)),
                }
            }
        }
        (frames, None)
    }

    #[test]
    fn property_hostile_bytes_never_panic_and_truncations_need_more() {
        let messages = all_messages();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for case in 0..20_000 {
            match case % 4 {
                // Random bytes, sometimes behind a plausible small length prefix and kind so the
                // body parsers (postcard, ring) see garbage rather than only the length check.
                0 => {
                    let n = rng.below(96);
                    let mut bytes = rng.bytes(n);
                    if rng.below(2) == 0 && bytes.len() >= 5 {
                        let len = (bytes.len() - 4) as u32;
                        bytes[..4].copy_from_slice(&len.to_le_bytes());
                        bytes[4] = rng.below(3) as u8;
                    }
                    let _ = feed(&mut rng, &bytes);
                    let _ = decode_one(&bytes);
                }
                // A strict prefix of a valid frame: never an error, never a frame.
                1 => {
                    let bytes = encode(&random_frame(&mut rng, &messages)).unwrap();
                    let cut = rng.below(bytes.len());
                    let (frames, err) = feed(&mut rng, &bytes[..cut]);
                    assert!(frames.is_empty() && err.is_none(), "case {case}: truncation to {cut} gave {err:?}");
                    let mut decoder = FrameDecoder::new();
                    decoder.push(&bytes[..cut]);
                    assert_eq!(decoder.next(), Ok(None), "case {case}");
                    assert_eq!(decode_one(&bytes[..cut]).unwrap_err().error_type(), "truncated");
                }
                // Bit flips in a valid frame: any outcome but a panic.
                2 => {
                    let mut bytes = encode(&random_frame(&mut rng, &messages)).unwrap();
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= 1 << rng.below(8);
                    }
                    let _ = feed(&mut rng, &bytes);
                    let _ = decode_one(&bytes);
                }
                // Several valid frames back to back round trip whatever the chunking.
                _ => {
                    let frames: Vec<Frame> = (0..1 + rng.below(4)).map(|_| random_frame(&mut rng, &messages)).collect();
                    let mut bytes = Vec::new();
                    for f in &frames {
                        encode_into(f, &mut bytes).unwrap();
                    }
                    let (got, err) = feed(&mut rng, &bytes);
                    assert_eq!(err, None, "case {case}");
                    assert_eq!(got, frames, "case {case}");
                }
            }
        }
    }

    #[test]
    fn random_length_prefixes_over_the_cap_are_rejected_immediately() {
        let mut rng = XorShift(42);
        for _ in 0..1000 {
            let len = (MAX_FRAME_BYTES as u32 + 1).saturating_add(rng.next_u64() as u32 % (u32::MAX / 2));
            let mut decoder = FrameDecoder::new();
            decoder.push(&len.to_le_bytes());
            assert_eq!(decoder.next().unwrap_err().error_type(), "frame_too_large");
        }
    }

    #[test]
    fn errors_have_distinct_stable_types() {
        let all = [
            WireError::TooLarge { len: 1, max: 0 },
            WireError::EmptyFrame,
            WireError::UnknownKind(9),
            WireError::MalformedControl(String::new()),
            WireError::TrailingBytes { after: "frame", count: 1 },
            WireError::RingHeaderTruncated { got: 0 },
            WireError::RingLength { count: 0, expected: 0, got: 0 },
            WireError::Truncated { have: 0, need: 1 },
            WireError::Encode(String::new()),
        ];
        let types: std::collections::HashSet<_> = all.iter().map(WireError::error_type).collect();
        assert_eq!(types.len(), all.len());
    }

    #[test]
    fn alpn_names_the_protocol_version() {
        assert_eq!(ALPN, format!("lockstep/{PROTOCOL_VERSION}").as_bytes());
    }
}
