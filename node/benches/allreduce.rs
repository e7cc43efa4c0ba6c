//! `cargo bench -p lockstep-node --bench allreduce`: the fixed-order ring all-reduce over real
//! mutual-TLS QUIC connections on loopback (every rank in this process, each with its own UDP
//! endpoint), against a plain memcpy of the same bytes and a raw QUIC stream between two
//! endpoints, and the same rings with their frames on same-host sockets (`--ring-transport auto`).
//! Sizes are the hidden sizes of the synthetic qwen2.5-0.5b (896) and llama-3.2-1b (2048) at batch
//! 1, 8 and 32 tokens. Prints a Markdown table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_node::model::Collective;
use lockstep_node::quic_ring::{connect_ring, LinkPath, NodeRing, RingPlace};
use lockstep_node::ring::RingCollective;
use lockstep_node::same_host::RingTransportMode;
use lockstep_proto::wire::Frame;
use lockstep_transport::certs::{init_ca, issue, TlsIdentity};
use lockstep_transport::{Conn, Endpoint, DEFAULT_SERVER_NAME};

const ITERS: usize = 200;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("lockstep-bench-allreduce-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    init_ca(&dir).unwrap();
    for r in 0..4 {
        issue(&dir, &format!("rank-{r}")).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!(
        "| hidden | batch | floats | memcpy µs | raw QUIC stream µs | ring TP=2 µs | ring TP=4 µs | ring TP=2 GB/s | same-host TP=2 µs | same-host TP=4 µs |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let rings: Vec<Vec<Arc<RingCollective<NodeRing>>>> = [RingTransportMode::Quic, RingTransportMode::Auto]
        .into_iter()
        .flat_map(|mode| [2usize, 4].map(|tp| build_ring(&rt, &dir, tp, mode)))
        .collect();
    let raw = raw_pair(&rt, &dir);
    for hidden in [896usize, 2048] {
        for batch in [1usize, 8, 32] {
            let n = hidden * batch;
            let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let mut dst = vec![0.0f32; n];
            let memcpy = median(
                (0..ITERS)
                    .map(|_| {
                        let t = Instant::now();
                        dst.copy_from_slice(std::hint::black_box(&src));
                        std::hint::black_box(&dst);
                        t.elapsed().as_secs_f64()
                    })
                    .collect(),
            );
            let raw_t = rt.block_on(raw_roundtrip(&raw, &src));
            let ring_t: Vec<f64> = rings.iter().map(|r| ring_time(r, &src)).collect();
            println!(
                "| {hidden} | {batch} | {n} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
                memcpy * 1e6,
                raw_t * 1e6,
                ring_t[0] * 1e6,
                ring_t[1] * 1e6,
                // Bytes each rank sends in a TP=2 all-gather: its own partial once.
                (n * 4) as f64 / ring_t[0] / 1e9,
                ring_t[2] * 1e6,
                ring_t[3] * 1e6,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tp` ranks connected in a ring, each with its own endpoint, their links as `mode` makes them.
fn build_ring(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    tp: usize,
    mode: RingTransportMode,
) -> Vec<Arc<RingCollective<NodeRing>>> {
    rt.block_on(async {
        let eps: Vec<Endpoint> = (0..tp)
            .map(|r| {
                Endpoint::bind("127.0.0.1:0".parse().unwrap(), &TlsIdentity::load(dir, &format!("rank-{r}")).unwrap())
                    .unwrap()
            })
            .collect();
        let addrs: Vec<String> = eps.iter().map(|e| e.local_addr().unwrap().to_string()).collect();
        let eps: Vec<Arc<Endpoint>> = eps.into_iter().map(Arc::new).collect();
        let joins: Vec<_> = (0..tp)
            .map(|r| {
                let ep = eps[r].clone();
                let place = RingPlace {
                    group: 0,
                    rank: r as u32,
                    tp: tp as u32,
                    next_addr: addrs[(r + 1) % tp].clone(),
                    prev_node: format!("rank-{}", (r + tp - 1) % tp),
                };
                tokio::spawn(async move {
                    let (ring, links) = connect_ring(&ep, &place, mode).await.unwrap();
                    let want = if mode == RingTransportMode::Auto { LinkPath::SameHostSocket } else { LinkPath::Quic };
                    assert_eq!(ring.paths(), (want, want), "the {mode} ring's links");
                    std::mem::forget(links);
                    std::mem::forget(ep);
                    ring
                })
            })
            .collect();
        let mut out = Vec::new();
        for (r, j) in joins.into_iter().enumerate() {
            out.push(Arc::new(RingCollective::new(r, tp, j.await.unwrap(), Duration::from_secs(10))));
        }
        out
    })
}

/// Median time of one all-reduce (all ranks in parallel threads).
fn ring_time(ranks: &[Arc<RingCollective<NodeRing>>], src: &[f32]) -> f64 {
    let times: Vec<Vec<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let mut out = vec![0.0; src.len()];
                    (0..ITERS as u64)
                        .map(|step| {
                            c.begin_step(step);
                            let t = Instant::now();
                            c.all_reduce(src, &mut out).unwrap();
                            std::hint::black_box(&mut out);
                            t.elapsed().as_secs_f64()
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    median(times.into_iter().flatten().collect())
}

struct RawPair {
    a: Conn,
    b: Conn,
    _eps: (Endpoint, Endpoint),
}

fn raw_pair(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> RawPair {
    rt.block_on(async {
        let ea = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &TlsIdentity::load(dir, "rank-0").unwrap()).unwrap();
        let eb = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &TlsIdentity::load(dir, "rank-1").unwrap()).unwrap();
        let addr = eb.local_addr().unwrap();
        let (a, b) = tokio::join!(ea.connect(addr, DEFAULT_SERVER_NAME), eb.accept());
        RawPair { a: a.unwrap(), b: b.unwrap().unwrap(), _eps: (ea, eb) }
    })
}

/// Median one-way transfer of `src` as a ring frame over a raw connection (send + receive).
async fn raw_roundtrip(p: &RawPair, src: &[f32]) -> f64 {
    let mut times = Vec::with_capacity(ITERS);
    for i in 0..ITERS {
        let t = Instant::now();
        let (s, r) = tokio::join!(p.a.send_ring(i as u64, 0, 0, src), p.b.recv());
        s.unwrap();
        assert!(matches!(r.unwrap(), Frame::Ring(_)));
        times.push(t.elapsed().as_secs_f64());
    }
    median(times)
}
