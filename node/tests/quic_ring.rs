//! The QUIC ring between two in-process endpoints on 127.0.0.1: a connection left over from an
//! abandoned formation is not taken for the new ring, and a neighbour that goes away fails the
//! all-reduce at once with its name.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lockstep_node::model::Collective;
use lockstep_node::quic_ring::{connect_ring, QuicRing, RingLinks, RingPlace};
use lockstep_node::ring::RingCollective;
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

type Rank = (Arc<RingCollective<QuicRing>>, RingLinks);

async fn form(a: &Endpoint, b: &Endpoint, group: u32) -> (Rank, Rank) {
    let (pa, pb) = places(group, a, b);
    let (ra, rb) = tokio::try_join!(connect_ring(a, &pa), connect_ring(b, &pb)).expect("the ring forms");
    let rank = |r: usize, (ring, links): (QuicRing, RingLinks)| {
        (Arc::new(RingCollective::new(r, 2, ring, RING_TIMEOUT)), links)
    };
    (rank(0, ra), rank(1, rb))
}

/// One all-reduce on `c` in step `step`, off the async workers.
async fn all_reduce(c: &Arc<RingCollective<QuicRing>>, step: u64, value: f32) -> Result<Vec<f32>, String> {
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
    let dir = certs("gone");
    bounded(async {
        let (a, b) = (endpoint(&dir, "node-a"), endpoint(&dir, "node-b"));
        let ((_ca, la), (cb, _lb)) = form(&a, &b, 1).await;
        // node-b waits for node-a's partial, which never comes: node-a drops the ring.
        let waiting = tokio::spawn({
            let cb = cb.clone();
            async move { all_reduce(&cb, 1, 2.0).await }
        });
        la.close("node node-a released its assignment: test");
        let err = waiting.await.unwrap().unwrap_err();
        // Reported as the neighbour leaving, not after RING_TIMEOUT as "no ring frame within".
        assert!(err.contains("node-a") && err.contains("released its assignment"), "{err}");
        assert!(!err.contains("within"), "{err}");
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
