//! The same-host ring path: when two ring neighbours run on one machine, the ring frames between
//! them travel over a Unix stream socket that the blocking model thread reads and writes itself,
//! instead of through the QUIC connection and its async tasks.
//!
//! ```text
//!  QUIC:       model thread ─▶ channel ─▶ sender task ─▶ QUIC ─▶ receiver task ─▶ channel ─▶ model thread
//!  same host:  model thread ─────────────────────── Unix socket ──────────────────────────▶ model thread
//! ```
//!
//! **Negotiated over the authenticated ring connection, never guessed.** The QUIC ring connection
//! (mutual TLS, the acceptor takes only the predecessor its assignment names) is formed first. The
//! acceptor then offers, on that connection, a socket in a fresh directory only its user may enter
//! (mode 0700) together with 32 random bytes from the kernel, its boot id, and nothing else
//! ([`SameHostOffer`]). The dialler takes the offer only if both ends say "same machine": the
//! offer's boot id equals its own (`/proc/sys/kernel/random/boot_id`: one running kernel) and the
//! QUIC peer address is a loopback address on both sides. It connects, writes the token, and says
//! so on QUIC; the acceptor takes the first connection on the socket, compares the token (in
//! constant time), answers one byte and removes the directory. A wrong token, or a dialler that
//! says it connected when nothing valid arrived, fails the ring's formation with an error naming
//! the predecessor. A dialler that cannot use the offer (another machine, another mount namespace,
//! `--ring-transport quic`) answers `connected: false` and the frames stay on QUIC.
//!
//! **Each socket carries one direction**, from the dialler (rank r) to the acceptor (rank r+1),
//! with the same framing as QUIC (`lockstep_proto::wire`), decoded by the same [`FrameDecoder`].
//! The QUIC connections stay open beside the sockets: they carry the close reasons and keep the
//! failure reporting of `quic_ring`.
//!
//! **No deadlock on large frames, no extra thread.** Both ends are non-blocking and waited on with
//! `poll(2)`. Every rank sends its partial before it receives, so a frame larger than the socket
//! buffer would block every rank in `write` at once; a rank whose write would block therefore
//! reads what its predecessor sends while it waits (the frames are buffered in the decoder until
//! the all-gather asks for them).
//!
//! **Failing fast, by name.** A neighbour that exits or is killed closes its socket ends in the
//! kernel: a rank waiting for its predecessor also watches its successor's socket, so either end
//! closing fails the step at once with the name of the node that went away. Between steps the
//! model thread looks at both sockets every 20 ms while it waits for a plan: a neighbour killed
//! after its last ring frame of a step, before it answered, would otherwise leave the coordinator
//! waiting on that step for the transport's idle timeout, so the survivor reports the closed socket
//! as a failure of the step it last answered. Closes that arrive on
//! QUIC (a released assignment, with its reason) wake the model thread by shutting its
//! predecessor socket down ([`SocketWaker`]). A link whose two directions differ (one neighbour
//! runs `--ring-transport quic`) waits on QUIC for its predecessor; a successor that dies on the
//! socket side is then noticed through its QUIC connection (at once for an orderly exit, within the
//! transport's idle timeout for a killed process).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use lockstep_proto::wire::{self, Frame, FrameDecoder, RingFrame, SameHostOffer};

/// Bytes of the one-time token.
pub const TOKEN_BYTES: usize = 32;

/// The byte the acceptor answers on the socket once the token matched.
const ACCEPTED: u8 = 1;

/// Longest the acceptor waits for the dialler's socket and token once it said it connected.
const SOCKET_ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a rank whose predecessor's frame has not (fully) arrived keeps re-reading the socket
/// before it sleeps in `poll(2)`; again after every piece that arrives. A rank sleeping there lets
/// its CPU halt, and on a VM each wake-up is an interrupt through the hypervisor, 48 times a token
/// at TP = 2: the spin took 0.2–0.4 ms off a 32 ms batch-1 step on the 2-vCPU KVM machine. The
/// ranks finish their halves of a layer close together: there, 94–97 % of a batch-1 decode's
/// waits ended within 100 µs, and most of the rest took far longer (one rank slower, or
/// preempted), where sleeping costs little (BENCHMARKS §23.2). Only a step spins: between steps
/// the model thread sleeps, so an idle node uses no CPU.
pub const RECV_SPIN: Duration = Duration::from_micros(100);

/// Bytes asked of the kernel per read of the predecessor's socket.
const READ_CHUNK: usize = 256 << 10;

/// Which links the ring may use (`--ring-transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RingTransportMode {
    /// A Unix socket between neighbours on the same machine, QUIC otherwise.
    #[default]
    Auto,
    /// QUIC between every pair of neighbours.
    Quic,
}

impl RingTransportMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RingTransportMode::Auto => "auto",
            RingTransportMode::Quic => "quic",
        }
    }
}

impl std::fmt::Display for RingTransportMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RingTransportMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RingTransportMode::Auto),
            "quic" => Ok(RingTransportMode::Quic),
            other => Err(format!("unknown ring transport {other:?} (expected auto or quic)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SameHostError {
    #[error("cannot set up the same-host ring socket: {0}")]
    Setup(#[source] io::Error),
    #[error("ring predecessor {node} said it connected to the same-host socket, but {why}")]
    Refused { node: String, why: String },
    #[error("ring successor {node} did not accept this node on the same-host socket: {why}")]
    NotAccepted { node: String, why: String },
}

/// This machine's boot id (`None` where the kernel does not say: then nothing is same-host).
pub fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Whether `addr` is a loopback address (IPv4, IPv6, or IPv4 mapped into IPv6).
pub fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Whether a dialler whose QUIC peer is at `peer` takes `offer`: same boot id, loopback peer.
pub fn offer_is_same_host(offer: &SameHostOffer, own_boot_id: Option<&str>, peer: SocketAddr) -> bool {
    own_boot_id.is_some_and(|id| id == offer.boot_id) && is_loopback(peer) && offer.token.len() == TOKEN_BYTES
}

fn random_token() -> io::Result<Vec<u8>> {
    let mut token = vec![0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut token)?;
    Ok(token)
}

/// Compares without an early exit, so the time taken says nothing about where bytes differ.
fn tokens_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The acceptor's side of one offer: a listening socket in a private directory, removed when
/// this is dropped.
pub struct SameHostListener {
    dir: PathBuf,
    listener: tokio::net::UnixListener,
    offer: SameHostOffer,
}

impl SameHostListener {
    /// A fresh private directory under `parent` with a listening socket, and the offer naming it.
    /// `None` when this machine has no boot id.
    pub fn bind(parent: &Path) -> Result<Option<SameHostListener>, SameHostError> {
        let Some(boot_id) = boot_id() else { return Ok(None) };
        let token = random_token().map_err(SameHostError::Setup)?;
        let suffix: String = token[..8].iter().map(|b| format!("{b:02x}")).collect();
        let dir = parent.join(format!("lockstep-ring-{}-{suffix}", std::process::id()));
        // 0700 from the start (not chmod afterwards): no moment where others may enter.
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(SameHostError::Setup)?;
        let path = dir.join("ring.sock");
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SameHostError::Setup(e));
            }
        };
        let offer = SameHostOffer { boot_id, socket_path: path.to_string_lossy().into_owned(), token };
        Ok(Some(SameHostListener { dir, listener, offer }))
    }

    pub fn offer(&self) -> &SameHostOffer {
        &self.offer
    }

    /// The predecessor's socket, once it presented the token. Anything else on the socket (a
    /// wrong or short token, nothing within the timeout) is refused and fails the formation.
    pub async fn accept(self, predecessor: &str) -> Result<UnixStream, SameHostError> {
        let refused = |why: String| SameHostError::Refused { node: predecessor.to_owned(), why };
        let accepted = tokio::time::timeout(SOCKET_ACCEPT_TIMEOUT, async {
            let (mut stream, _) = self.listener.accept().await.map_err(|e| refused(format!("accept failed: {e}")))?;
            let mut token = [0u8; TOKEN_BYTES];
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut token)
                .await
                .map_err(|e| refused(format!("no token arrived on the socket: {e}")))?;
            if !tokens_equal(&token, &self.offer.token) {
                return Err(refused("the socket presented a wrong token".into()));
            }
            tokio::io::AsyncWriteExt::write_all(&mut stream, &[ACCEPTED])
                .await
                .map_err(|e| refused(format!("the socket closed before it was accepted: {e}")))?;
            stream.into_std().map_err(SameHostError::Setup)
        })
        .await
        .unwrap_or_else(|_| {
            Err(refused(format!("nothing valid arrived on the socket within {SOCKET_ACCEPT_TIMEOUT:?}")))
        })?;
        accepted.set_nonblocking(true).map_err(SameHostError::Setup)?;
        Ok(accepted)
    }
}

impl Drop for SameHostListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The dialler's side: connect to the offered socket and write the token. `None` when the socket
/// cannot be reached from here (the answer is then `connected: false` and the link stays on QUIC).
pub async fn dial(offer: &SameHostOffer) -> Option<tokio::net::UnixStream> {
    let mut stream = tokio::net::UnixStream::connect(&offer.socket_path).await.ok()?;
    tokio::io::AsyncWriteExt::write_all(&mut stream, &offer.token).await.ok()?;
    Some(stream)
}

/// After the dialler said it connected: wait for the acceptor's byte, and hand the socket to the
/// model thread.
pub async fn confirm(mut stream: tokio::net::UnixStream, successor: &str) -> Result<UnixStream, SameHostError> {
    let not_accepted = |why: String| SameHostError::NotAccepted { node: successor.to_owned(), why };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(SOCKET_ACCEPT_TIMEOUT, tokio::io::AsyncReadExt::read_exact(&mut stream, &mut byte)).await
    {
        Ok(Ok(_)) if byte[0] == ACCEPTED => {}
        Ok(Ok(_)) => return Err(not_accepted(format!("it answered {:#04x}", byte[0]))),
        Ok(Err(e)) => return Err(not_accepted(format!("the socket closed: {e}"))),
        Err(_) => return Err(not_accepted(format!("no answer within {SOCKET_ACCEPT_TIMEOUT:?}"))),
    }
    let stream = stream.into_std().map_err(SameHostError::Setup)?;
    stream.set_nonblocking(true).map_err(SameHostError::Setup)?;
    Ok(stream)
}

/// What went wrong on a socket, and on whose side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketFailure {
    Successor(String),
    Predecessor(String),
    Timeout,
}

/// Wakes a model thread waiting on its predecessor's socket (the socket reads as closed).
pub struct SocketWaker(UnixStream);

impl SocketWaker {
    pub fn wake(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// The model thread's ends of the same-host sockets: `next` to the successor, `prev` from the
/// predecessor (either may be `None`: that direction is on QUIC).
pub struct RingSockets {
    next: Option<UnixStream>,
    prev: Option<UnixStream>,
    decoder: FrameDecoder,
    out: Vec<u8>,
    chunk: Vec<u8>,
}

impl RingSockets {
    /// Both sockets must be non-blocking (as [`SameHostListener::accept`] and [`confirm`] leave
    /// them).
    pub fn new(next: Option<UnixStream>, prev: Option<UnixStream>) -> Self {
        RingSockets { next, prev, decoder: FrameDecoder::default(), out: Vec::new(), chunk: vec![0; READ_CHUNK] }
    }

    pub fn has_next(&self) -> bool {
        self.next.is_some()
    }

    pub fn has_prev(&self) -> bool {
        self.prev.is_some()
    }

    /// Handles that shut both sockets down from another thread, cutting this rank off the ring
    /// (a released assignment).
    pub fn wakers(&self) -> io::Result<Vec<SocketWaker>> {
        self.prev.iter().chain(&self.next).map(|s| s.try_clone().map(SocketWaker)).collect()
    }

    /// A handle that shuts the predecessor's socket down, which ends this model thread's wait.
    pub fn prev_waker(&self) -> io::Result<Option<SocketWaker>> {
        self.prev.as_ref().map(|s| s.try_clone().map(SocketWaker)).transpose()
    }

    /// Writes one ring frame to the successor, encoded straight from `data`. While the successor's
    /// socket is full, reads what the predecessor sends (see the module comment).
    pub fn send(
        &mut self,
        step_id: u64,
        op: u32,
        origin_rank: u32,
        data: &[f32],
        timeout: Duration,
    ) -> Result<(), SocketFailure> {
        self.out.clear();
        wire::encode_ring(step_id, op, origin_rank, data, &mut self.out)
            .map_err(|e| SocketFailure::Successor(format!("cannot encode a ring frame: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut written = 0;
        while written < self.out.len() {
            let next = self.next.as_ref().expect("send on a ring without a successor socket");
            match (&*next).write(&self.out[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let (_, prev_ready) =
                        wait(Some((next, libc::POLLOUT)), self.prev.as_ref(), deadline).map_err(|e| match e {
                            WaitError::Timeout => SocketFailure::Timeout,
                            WaitError::Io(e) => SocketFailure::Successor(format!("waiting on its socket failed: {e}")),
                        })?;
                    if prev_ready {
                        self.fill_from_prev()?;
                    }
                }
                Err(e) => return Err(SocketFailure::Successor(format!("its socket failed: {e}"))),
            }
        }
        Ok(())
    }

    /// The next ring frame from the predecessor. Fails at once when either neighbour's socket
    /// closes.
    pub fn recv(&mut self, timeout: Duration) -> Result<RingFrame, SocketFailure> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.decoder.next() {
                Ok(Some(Frame::Ring(f))) => return Ok(f),
                Ok(Some(Frame::Control(m))) => {
                    return Err(SocketFailure::Predecessor(format!("sent a {} message on the ring socket", m.name())))
                }
                Err(e) => return Err(SocketFailure::Predecessor(format!("sent a malformed ring frame: {e}"))),
                Ok(None) => {}
            }
            if self.fill_from_prev()? || self.spin_for_prev()? {
                continue;
            }
            let prev = self.prev.as_ref().expect("recv on a ring without a predecessor socket");
            let watch_next = self.next.as_ref().map(|n| (n, libc::POLLIN));
            let (next_ready, _) = wait(watch_next, Some(prev), deadline).map_err(|e| match e {
                WaitError::Timeout => SocketFailure::Timeout,
                WaitError::Io(e) => SocketFailure::Predecessor(format!("waiting on its socket failed: {e}")),
            })?;
            if next_ready {
                self.check_successor()?;
            }
        }
    }

    /// Between steps, without waiting: fails when either neighbour's socket has closed. Whatever
    /// the predecessor already sent for the next step stays in the decoder for [`RingSockets::recv`].
    pub fn check_neighbours(&mut self) -> Result<(), SocketFailure> {
        if self.prev.is_some() {
            self.fill_from_prev()?;
        }
        if self.next.is_some() {
            self.check_successor()?;
        }
        Ok(())
    }

    /// Re-reads the predecessor's socket for up to [`RECV_SPIN`]; `true` once anything came.
    fn spin_for_prev(&mut self) -> Result<bool, SocketFailure> {
        let end = Instant::now() + RECV_SPIN;
        loop {
            // Not a busy loop: where another thread waits for this CPU, it runs.
            std::thread::yield_now();
            if self.fill_from_prev()? {
                return Ok(true);
            }
            if Instant::now() >= end {
                return Ok(false);
            }
        }
    }

    /// Reads whatever the predecessor has sent into the decoder; `true` if anything came.
    fn fill_from_prev(&mut self) -> Result<bool, SocketFailure> {
        let prev = self.prev.as_ref().expect("a predecessor socket");
        let mut any = false;
        loop {
            match (&*prev).read(&mut self.chunk) {
                Ok(0) => return Err(SocketFailure::Predecessor("its socket closed".into())),
                Ok(n) => {
                    self.decoder.push(&self.chunk[..n]);
                    any = true;
                    if n < self.chunk.len() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) => return Err(SocketFailure::Predecessor(format!("its socket failed: {e}"))),
            }
        }
    }

    /// The successor never writes on its socket: readable means closed.
    fn check_successor(&self) -> Result<(), SocketFailure> {
        let next = self.next.as_ref().expect("a successor socket");
        let mut byte = [0u8; 1];
        match (&*next).read(&mut byte) {
            Ok(0) => Err(SocketFailure::Successor("its socket closed".into())),
            Ok(_) => Err(SocketFailure::Successor("it wrote on the one-way ring socket".into())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(()),
            Err(e) => Err(SocketFailure::Successor(format!("its socket failed: {e}"))),
        }
    }
}

enum WaitError {
    Timeout,
    Io(io::Error),
}

/// `poll(2)` on the successor's socket (for `events`) and the predecessor's (for input) until one
/// is ready or `deadline` passes; says which are ready (an error or hang-up counts as ready: the
/// next read or write reports it).
fn wait(
    next: Option<(&UnixStream, libc::c_short)>,
    prev: Option<&UnixStream>,
    deadline: Instant,
) -> Result<(bool, bool), WaitError> {
    let mut fds = Vec::with_capacity(2);
    if let Some((s, events)) = next {
        fds.push(libc::pollfd { fd: s.as_raw_fd(), events, revents: 0 });
    }
    if let Some(s) = prev {
        fds.push(libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WaitError::Timeout);
        }
        // Rounded up, so a wait never ends just short of the deadline and spins.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(WaitError::Io(e));
        }
        if n > 0 {
            let ready = |i: usize| fds.get(i).is_some_and(|f| f.revents != 0);
            return Ok(match (next.is_some(), prev.is_some()) {
                (true, true) => (ready(0), ready(1)),
                (true, false) => (ready(0), false),
                (false, _) => (false, ready(0)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// Two ranks on socket pairs: 0 → 1 on `a`, 1 → 0 on `b`.
    fn two_ranks() -> (RingSockets, RingSockets) {
        let (a_send, a_recv) = pair();
        let (b_send, b_recv) = pair();
        (RingSockets::new(Some(a_send), Some(b_recv)), RingSockets::new(Some(b_send), Some(a_recv)))
    }

    #[test]
    fn frames_arrive_bit_for_bit_in_order() {
        let (mut r0, mut r1) = two_ranks();
        let data: Vec<f32> = vec![0.0, -0.0, f32::NAN, f32::from_bits(0x7fc0_1234), f32::MIN_POSITIVE, 1e30];
        r0.send(3, 0, 0, &data, Duration::from_secs(5)).unwrap();
        r0.send(3, 1, 0, &data[..2], Duration::from_secs(5)).unwrap();
        let f = r1.recv(Duration::from_secs(5)).unwrap();
        assert_eq!(f, RingFrame { step_id: 3, op: 0, origin_rank: 0, data: data.clone() });
        assert_eq!(r1.recv(Duration::from_secs(5)).unwrap().data.len(), 2);
    }

    /// Guards against the deadlock of every rank blocking in `write` with a frame larger than the
    /// socket buffer: each must read its predecessor while it waits.
    #[test]
    fn frames_larger_than_the_socket_buffer_sent_by_both_ranks_at_once_do_not_deadlock() {
        let (mut r0, mut r1) = two_ranks();
        let big: Vec<f32> = (0..4 << 20).map(|i| i as f32).collect(); // 16 MiB
        let t = Duration::from_secs(60);
        let (got0, got1) = std::thread::scope(|s| {
            let big = &big;
            let h0 = s.spawn(move || {
                r0.send(1, 0, 0, big, t).unwrap();
                r0.recv(t).unwrap()
            });
            let h1 = s.spawn(move || {
                r1.send(1, 0, 1, big, t).unwrap();
                r1.recv(t).unwrap()
            });
            (h0.join().unwrap(), h1.join().unwrap())
        });
        assert_eq!((got0.origin_rank, got1.origin_rank), (1, 0));
        assert!(got0.data == big && got1.data == big);
    }

    /// Guards the spin before `poll(2)`: a frame whose pieces arrive one within the spin and one
    /// well after it (the rank then sleeps) still comes out whole and in order.
    #[test]
    fn a_frame_arriving_in_pieces_around_the_spin_bound_arrives_whole() {
        let (a, b) = pair();
        let mut r = RingSockets::new(None, Some(b));
        let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let mut bytes = Vec::new();
        wire::encode_ring(4, 2, 1, &data, &mut bytes).unwrap();
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                let (head, tail) = bytes.split_at(bytes.len() / 3);
                std::thread::sleep(RECV_SPIN / 4);
                (&a).write_all(head).unwrap();
                std::thread::sleep(RECV_SPIN * 20);
                (&a).write_all(tail).unwrap();
            });
            r.recv(Duration::from_secs(30)).unwrap()
        });
        assert_eq!(got, RingFrame { step_id: 4, op: 2, origin_rank: 1, data });
    }

    #[test]
    fn a_closed_predecessor_or_successor_fails_the_wait_at_once_naming_the_side() {
        let (mut r0, r1) = two_ranks();
        let RingSockets { next, prev, .. } = r1;
        drop(prev); // rank 1 stops reading: rank 0's successor is gone
        let e = r0.recv(Duration::from_secs(30)).unwrap_err();
        assert!(matches!(e, SocketFailure::Successor(_)), "{e:?}");
        drop(next); // and stops writing: rank 0's predecessor is gone
        let (mut r0, r1) = two_ranks();
        let RingSockets { next, prev, .. } = r1;
        drop(next);
        let e = r0.recv(Duration::from_secs(30)).unwrap_err();
        assert!(matches!(e, SocketFailure::Predecessor(_)), "{e:?}");
        drop(prev);
    }

    /// Guards the report between steps: a neighbour killed after its last frame of a step leaves
    /// nothing waiting on its sockets, so the check must see the close without a step, and must
    /// keep a frame of the next step that arrived before it.
    #[test]
    fn between_steps_a_closed_neighbour_is_named_and_an_early_frame_is_kept() {
        let (mut r0, mut r1) = two_ranks();
        assert_eq!(r0.check_neighbours(), Ok(()), "open and silent: nothing to report");
        r1.send(8, 0, 1, &[1.5, -2.0], Duration::from_secs(5)).unwrap();
        assert_eq!(r0.check_neighbours(), Ok(()), "a frame of the next step is not a failure");
        let RingSockets { next, prev, .. } = r1;
        drop(prev);
        assert!(matches!(r0.check_neighbours(), Err(SocketFailure::Successor(_))));
        drop(next);
        let f = r0.recv(Duration::from_secs(5)).unwrap();
        assert_eq!((f.step_id, f.origin_rank, f.data), (8, 1, vec![1.5, -2.0]));
        assert!(matches!(r0.check_neighbours(), Err(SocketFailure::Predecessor(_))));
    }

    #[test]
    fn a_waker_ends_a_wait_and_a_silent_predecessor_times_out() {
        let (mut r0, _r1) = two_ranks();
        assert_eq!(r0.recv(Duration::from_millis(20)).unwrap_err(), SocketFailure::Timeout);
        let waker = r0.prev_waker().unwrap().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                waker.wake();
            });
            assert!(matches!(r0.recv(Duration::from_secs(30)), Err(SocketFailure::Predecessor(_))));
        });
    }

    #[test]
    fn garbage_from_the_predecessor_is_an_error_not_a_frame() {
        let (a, b) = pair();
        (&a).write_all(&[5, 0, 0, 0, 9, 1, 2, 3, 4]).unwrap();
        let mut r = RingSockets::new(None, Some(b));
        assert!(matches!(r.recv(Duration::from_secs(5)), Err(SocketFailure::Predecessor(_))));
    }

    #[test]
    fn only_a_loopback_peer_with_this_boot_id_and_a_full_token_is_same_host() {
        let offer =
            SameHostOffer { boot_id: "b".into(), socket_path: "/nonexistent".into(), token: vec![7; TOKEN_BYTES] };
        let lo: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(offer_is_same_host(&offer, Some("b"), lo));
        assert!(offer_is_same_host(&offer, Some("b"), "[::1]:9".parse().unwrap()));
        assert!(offer_is_same_host(&offer, Some("b"), "[::ffff:127.0.0.1]:9".parse().unwrap()));
        assert!(!offer_is_same_host(&offer, Some("a"), lo));
        assert!(!offer_is_same_host(&offer, None, lo));
        assert!(!offer_is_same_host(&offer, Some("b"), "10.0.0.1:9".parse().unwrap()));
        let short = SameHostOffer { token: vec![7; 4], ..offer };
        assert!(!offer_is_same_host(&short, Some("b"), lo));
    }

    #[test]
    fn tokens_compare_equal_only_when_every_byte_is() {
        assert!(tokens_equal(&[1, 2, 3], &[1, 2, 3]));
        assert!(!tokens_equal(&[1, 2, 3], &[1, 2, 4]));
        assert!(!tokens_equal(&[1, 2, 3], &[1, 2]));
    }

    #[test]
    fn ring_transport_mode_parses_its_names() {
        for m in [RingTransportMode::Auto, RingTransportMode::Quic] {
            assert_eq!(m.as_str().parse::<RingTransportMode>().unwrap(), m);
        }
        assert!("shm".parse::<RingTransportMode>().is_err());
        assert_eq!(RingTransportMode::default(), RingTransportMode::Auto);
    }
}
