//! The QUIC ring between two in-process endpoints on 127.0.0.1: a connection left over from an
//! abandoned formation is not taken for the new ring, and a neighbour that goes away fails the
//! all-reduce at once with its name, on QUIC and on the same-host socket alike; the same-host
//! socket is taken only where negotiated, gives the QUIC path's bits, and a wrong token is refused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lockstep_node::model::Collective;
use lockstep_node::quic_ring::{connect_ring, LinkPath, NodeRing, RingLinks, RingPlace, RingSetupError};
use lockstep_node::ring::RingCollective;
use lockstep_node::same_host::{RingTransportMode, TOKEN_BYTES};
use lockstep_node::server::RING_TIMEOUT;
use lockstep_proto::wire::{Frame, Message};
use lockstep_transport::certs::{init_ca, issue, TlsIdentity};
use lockstep_transport::{Endpoint, DEFAULT_SERVER_NAME};

/// A fresh CA with certificates for node-a and node-b.
fn certs(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("quic-ring-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    init_ca(&dir).unwrap();
    for name in ["node-a", "node-b"] {
        issue(&dir, name).unwrap();
    }
    dir
}

fn endpoint(dir: &std::path::Path, name: &str) -> Endpoint {
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), &TlsIdentity::load(dir, name).unwrap()).unwrap()
}

/// Ring places of group `group`: node-a rank 0, node-b rank 1.
fn places(group: u32, a: &Endpoint, b: &Endpoint) -> (RingPlace, RingPlace) {
    let place = |rank, next: &Endpoint, prev: &str| RingPlace {
        group,
        rank,
        tp: 2,
        next_addr: next.local_addr().unwrap().to_string(),
        prev_node: prev.to_owned(),
    };
    (place(0, b, "node-b"), place(1, a, "node-a"))
}

type Rank = (Arc<RingCollective<NodeRing>>, RingLinks);

const MODES: [RingTransportMode; 2] = [RingTransportMode::Quic, RingTransportMode::Auto];

/// The ring of node-a (rank 0, `mode_a`) and node-b (rank 1, `mode_b`), and how node-a's frames
/// travel each way.
async fn form_with(
    a: &Endpoint,
    b: &Endpoint,
    group: u32,
    mode_a: RingTransportMode,
    mode_b: RingTransportMode,
) -> (Rank, Rank, (LinkPath, LinkPath)) {
    let (pa, pb) = places(group, a, b);
    let (ra, rb) =
        tokio::try_join!(connect_ring(a, &pa, mode_a), connect_ring(b, &pb, mode_b)).expect("the ring forms");
    let paths = ra.0.paths();
    let rank = |r: usize, (ring, links): (NodeRing, RingLinks)| {
        (Arc::new(RingCollective::new(r, 2, ring, RING_TIMEOUT)), links)
    };
    (rank(0, ra), rank(1, rb), paths)
}

async fn form(a: &Endpoint, b: &Endpoint, group: u32) -> (Rank, Rank) {
    let (ra, rb, _) = form_with(a, b, group, RingTransportMode::Auto, RingTransportMode::Auto).await;
    (ra, rb)
}

/// One all-reduce on `c` in step `step`, off the async workers.
async fn all_reduce(c: &Arc<RingCollective<NodeRing>>, step: u64, value: f32) -> Result<Vec<f32>, String> {
    let c = c.clone();
    tokio::task::spawn_blocking(move || {
        c.begin_step(step);
        let mut out = vec![0.0; 4];
        c.all_reduce(&[value; 4], &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .await
    .unwrap()
}

async fn bounded<F: std::future::Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), body).await.expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_ring_connection_from_an_abandoned_formation_is_not_taken_for_the_new_ring() {
    let dir = certs("stale");
    bounded(async {
        let (a, b) = (endpoint(&dir, "node-a"), endpoint(&dir, "node-b"));
        // node-a dialled node-b for group 1, which was abandoned before node-b accepted it; the
        // connection is still open and queued at node-b.
        let stale = a.connect(b.local_addr().unwrap(), DEFAULT_SERVER_NAME).await.unwrap();
        stale.send(&Frame::Control(Message::RingHello { group: 1, rank: 0 })).await.unwrap();

        let ((ca, _la), (cb, _lb)) = form(&a, &b, 2).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), stale.closed()).await.expect("stale closed");
        assert!(closed.to_string().contains("stale ring connection"), "{closed}");
        let (x, y) = tokio::join!(all_reduce(&ca, 1, 1.0), all_reduce(&cb, 1, 2.0));
        assert_eq!(x.unwrap(), y.unwrap(), "both ranks hold the same sum");
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_reduce_fails_at_once_naming_the_neighbour_that_left() {
    for mode in MODES {
        neighbour_that_left(mode).await;
    }
}

async fn neighbour_that_left(mode: RingTransportMode) {
    let dir = certs(&format!("gone-{mode}"));
    bounded(async {
        let (a, b) = (endpoint(&dir, "node-a"), endpoint(&dir, "node-b"));
        let ((_ca, la), (cb, _lb), _) = form_with(&a, &b, 1, mode, mode).await;
        // node-b waits for node-a's partial, which never comes: node-a drops the ring.
        let waiting = tokio::spawn({
            let cb = cb.clone();
            async move { all_reduce(&cb, 1, 2.0).await }
        });
        la.close("node node-a released its assignment: test");
        let err = waiting.await.unwrap().unwrap_err();
        // Reported as the neighbour leaving, not after RING_TIMEOUT as "no ring frame within".
        assert!(err.contains("node-a") && err.contains("released its assignment"), "{mode}: {err}");
        assert!(!err.contains("within"), "{mode}: {err}");
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Guards the same-host path: two ranks on this machine move both directions to the socket under
/// `auto` (and stay on QUIC when either says `quic`), and every all-reduce gives the same bits on
/// both paths, including one far larger than a socket buffer sent by both ranks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_ranks_use_the_socket_under_auto_only_and_reduce_to_the_same_bits() {
    let dir = certs("paths");
    bounded(async {
        let (a, b) = (endpoint(&dir, "node-a"), endpoint(&dir, "node-b"));
        let both = |p| (p, p);
        let cases = [
            (RingTransportMode::Auto, RingTransportMode::Auto, both(LinkPath::SameHostSocket)),
            (RingTransportMode::Quic, RingTransportMode::Quic, both(LinkPath::Quic)),
            // node-a declines node-b's offer; node-b offers nothing.
            (RingTransportMode::Quic, RingTransportMode::Auto, both(LinkPath::Quic)),
            (RingTransportMode::Auto, RingTransportMode::Quic, both(LinkPath::Quic)),
        ];
        let mut results = Vec::new();
        for (group, (mode_a, mode_b, want)) in cases.into_iter().enumerate() {
            let ((ca, _la), (cb, _lb), paths) = form_with(&a, &b, group as u32, mode_a, mode_b).await;
            assert_eq!(paths, want, "node-a {mode_a}, node-b {mode_b}");
            let mut bits = Vec::new();
            for (step, n) in [(1u64, 7usize), (2, 896 * 8), (3, 3 << 20)] {
                let (x, y) = tokio::join!(reduce_n(&ca, step, n, 0.0), reduce_n(&cb, step, n, 0.5));
                let (x, y) = (x.unwrap(), y.unwrap());
                assert_eq!(x, y, "both ranks hold the same bits");
                bits.push(x);
            }
            results.push(bits);
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "every path gives the same bits");
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// All-reduce of `n` values (a pattern shifted by `shift`), as bits.
async fn reduce_n(c: &Arc<RingCollective<NodeRing>>, step: u64, n: usize, shift: f32) -> Result<Vec<u32>, String> {
    let c = c.clone();
    tokio::task::spawn_blocking(move || {
        c.begin_step(step);
        let partial: Vec<f32> = (0..n).map(|i| ((i as f32 + shift) * 0.37).sin() * 1e3).collect();
        let mut out = vec![0.0; n];
        c.all_reduce(&partial, &mut out).map_err(|e| e.to_string())?;
        Ok(out.iter().map(|x| x.to_bits()).collect())
    })
    .await
    .unwrap()
}

/// Guards the same-host socket's admission: a predecessor that connects with any other token than
/// the one offered on its authenticated connection is refused by name, and the private directory
/// the offer named (mode 0700) is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_same_host_token_is_refused_naming_the_predecessor() {
    use std::os::unix::fs::PermissionsExt;
    let dir = certs("token");
    bounded(async {
        let (a, b) = (endpoint(&dir, "node-a"), endpoint(&dir, "node-b"));
        let (_, pb) = places(1, &a, &b);
        // node-a's side by hand: accept node-b's dial and keep it on QUIC (node-b's answer is not
        // awaited: its formation may already have failed)...
        let a_accepts = async {
            let conn = a.accept().await.unwrap().unwrap();
            assert!(matches!(conn.recv().await.unwrap(), Frame::Control(Message::RingHello { .. })));
            conn.send(&Frame::Control(Message::RingSameHost { offer: None })).await.unwrap();
            conn
        };
        // ...and dial node-b, take its offer, and present a wrong token on the socket.
        let a_dials = async {
            let conn = a.connect(b.local_addr().unwrap(), DEFAULT_SERVER_NAME).await.unwrap();
            conn.send(&Frame::Control(Message::RingHello { group: 1, rank: 0 })).await.unwrap();
            let Frame::Control(Message::RingSameHost { offer: Some(offer) }) = conn.recv().await.unwrap() else {
                panic!("node-b offers a same-host socket to a loopback predecessor");
            };
            let private = std::path::Path::new(&offer.socket_path).parent().unwrap().to_owned();
            let mode = std::fs::metadata(&private).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", private.display());
            let mut socket = tokio::net::UnixStream::connect(&offer.socket_path).await.unwrap();
            let wrong: Vec<u8> = offer.token.iter().map(|b| b ^ 1).collect();
            assert_eq!(wrong.len(), TOKEN_BYTES);
            tokio::io::AsyncWriteExt::write_all(&mut socket, &wrong).await.unwrap();
            conn.send(&Frame::Control(Message::RingSameHostAnswer { connected: true })).await.unwrap();
            (conn, socket, private)
        };
        let (formed, _accepted, (_dialled, mut socket, private)) =
            tokio::join!(connect_ring(&b, &pb, RingTransportMode::Auto), a_accepts, a_dials);
        let err = formed.err().expect("a wrong token is refused");
        assert!(matches!(err, RingSetupError::SameHost(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("node-a") && msg.contains("wrong token"), "{msg}");
        assert!(!private.exists(), "the private socket directory is removed");
        // Nothing was accepted on the socket: it reads as closed, not as the accepting byte.
        let mut byte = [0u8; 1];
        assert_eq!(tokio::io::AsyncReadExt::read(&mut socket, &mut byte).await.unwrap(), 0);
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
