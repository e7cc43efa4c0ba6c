//! The transport against itself on loopback: real endpoints, real certificates, real UDP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockstep_proto::wire::{self, Frame, Message, RingFrame, WireError, MAX_FRAME_BYTES};

use crate::certs::tests::TempDir;
use crate::certs::{init_ca, issue, TlsIdentity};
use crate::{resolve, Conn, Endpoint, NetError, DEFAULT_SERVER_NAME, IDLE_TIMEOUT};

const LOCAL: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Every test body is bounded: a hang is a failure, not a stuck CI job.
async fn bounded<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), body).await.expect("test timed out")
}

/// A fresh cluster CA with certificates for `names`.
fn cluster(tag: &str, names: &[&str]) -> TempDir {
    let dir = TempDir::new(tag);
    init_ca(&dir.0).unwrap();
    for name in names {
        issue(&dir.0, name).unwrap();
    }
    dir
}

fn endpoint(dir: &TempDir, name: &str) -> Endpoint {
    Endpoint::bind(LOCAL, &TlsIdentity::load(&dir.0, name).unwrap()).unwrap()
}

/// Connects `client` to `server`, returning (client side, server side).
async fn pair(client: &Endpoint, server: &Endpoint, server_name: &str) -> (Conn, Conn) {
    let addr = server.local_addr().unwrap();
    let (dialled, accepted) = tokio::join!(client.connect(addr, server_name), server.accept());
    (dialled.unwrap(), accepted.expect("endpoint open").unwrap())
}

/// 1M floats of random bits: NaNs with payloads, infinities, subnormals and -0.0 all occur.
fn random_floats(n: usize, mut seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            f32::from_bits(seed as u32)
        })
        .collect();
    v[..4].copy_from_slice(&[-0.0, f32::from_bits(0x7fc0_1234), f32::NEG_INFINITY, f32::from_bits(1)]);
    v
}

fn assert_bits_eq(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let first_diff = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
    assert_eq!(first_diff, None, "ring data differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_exchanges_control_and_ring_frames_both_ways() {
    let certs = cluster("net-exchange", &["node-0", "node-1"]);
    bounded(async {
        let server = endpoint(&certs, "node-0");
        let client = endpoint(&certs, "node-1");
        let (c, s) = pair(&client, &server, "node-0").await;
        assert_eq!(c.peer_name(), "node-0");
        assert_eq!(s.peer_name(), "node-1");
        assert_eq!(s.remote_addr(), client.local_addr().unwrap());

        let hello = Frame::Control(Message::Heartbeat { seq: 7, sent_unix_ns: 123 });
        c.send(&hello).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), hello);
        let ack = Frame::Control(Message::HeartbeatAck { seq: 7, sent_unix_ns: 123 });
        s.send(&ack).await.unwrap();
        assert_eq!(c.recv().await.unwrap(), ack);

        // A 1M-float ring frame each way, concurrently, bit-exact.
        let up = random_floats(1 << 20, 1);
        let down = random_floats(1 << 20, 2);
        let down_frame = Frame::Ring(RingFrame { step_id: 9, op: 5, origin_rank: 0, data: down.clone() });
        let (sent_up, sent_down, got_down, got_up) =
            tokio::join!(c.send_ring(9, 5, 1, &up), s.send(&down_frame), c.recv(), s.recv(),);
        sent_up.unwrap();
        sent_down.unwrap();
        let (Frame::Ring(got_up), Frame::Ring(got_down)) = (got_up.unwrap(), got_down.unwrap()) else {
            panic!("expected ring frames")
        };
        assert_eq!((got_up.step_id, got_up.op, got_up.origin_rank), (9, 5, 1));
        assert_eq!((got_down.step_id, got_down.op, got_down.origin_rank), (9, 5, 0));
        assert_bits_eq(&got_up.data, &up);
        assert_bits_eq(&got_down.data, &down);

        // Control traffic still flows after the big frames, and RTT has been measured.
        c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));
        assert!(c.rtt() < Duration::from_secs(1), "loopback rtt {:?}", c.rtt());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_split_halves_work_from_two_tasks() {
    let certs = cluster("net-split", &["coordinator", "node-0"]);
    bounded(async {
        let node_ep = endpoint(&certs, "node-0");
        let coord_ep = endpoint(&certs, "coordinator");
        let (coord, node) = pair(&coord_ep, &node_ep, "node-0").await;

        // The node: one task sends heartbeats, another receives steps and answers them.
        let (node_tx, mut node_rx) = node.split();
        let heartbeats = {
            let tx = node_tx.clone();
            tokio::spawn(async move {
                for seq in 0..50 {
                    tx.send(&Frame::Control(Message::Heartbeat { seq, sent_unix_ns: 0 })).await.unwrap();
                }
            })
        };
        let worker = tokio::spawn(async move {
            for _ in 0..50 {
                let Frame::Control(Message::Step(plan)) = node_rx.recv().await.unwrap() else {
                    panic!("expected a step")
                };
                let done = Message::StepDone { step_id: plan.step_id, samples: vec![] };
                node_tx.send(&Frame::Control(done)).await.unwrap();
            }
            // Handed back rather than dropped: dropping the last handle closes the connection,
            // abandoning whatever the coordinator has not read yet.
            (node_tx, node_rx)
        });
        // The coordinator shares one Conn between a sending and a receiving task.
        let coord = Arc::new(coord);
        let sender = {
            let coord = coord.clone();
            tokio::spawn(async move {
                for step_id in 0..50 {
                    let plan = lockstep_proto::step::StepPlan { step_id, chunks: vec![] };
                    let frame = Frame::Control(Message::Step(lockstep_proto::session::SessionState::snapshot(&plan)));
                    // Every other step goes as bytes encoded beforehand, as the coordinator sends
                    // one plan to every rank.
                    if step_id % 2 == 0 {
                        coord.send(&frame).await.unwrap();
                    } else {
                        let bytes = lockstep_proto::wire::encode(&frame).unwrap();
                        coord.sender().send_encoded(&bytes).await.unwrap();
                    }
                }
            })
        };
        let (mut beats, mut dones) = (0, Vec::new());
        while beats < 50 || dones.len() < 50 {
            match coord.recv().await.unwrap() {
                Frame::Control(Message::Heartbeat { seq, .. }) => {
                    assert_eq!(seq, beats);
                    beats += 1;
                }
                Frame::Control(Message::StepDone { step_id, .. }) => dones.push(step_id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(dones, (0..50).collect::<Vec<_>>());
        heartbeats.await.unwrap();
        let _node = worker.await.unwrap();
        sender.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_refuses_a_client_certificate_from_another_ca_and_keeps_accepting() {
    let ours = cluster("net-ours", &["node-0", "node-1"]);
    let theirs = cluster("net-theirs", &["node-1"]);
    bounded(async {
        let server = endpoint(&ours, "node-0");
        let addr = server.local_addr().unwrap();

        // An intruder that trusts our CA but presents a certificate from another CA: the server
        // refuses it, and the intruder hears why.
        let intruder_id = TlsIdentity::from_files(
            "intruder",
            &ours.0.join("ca.pem"),
            &theirs.0.join("node-1.pem"),
            &theirs.0.join("node-1.key"),
        )
        .unwrap();
        let intruder = Endpoint::bind(LOCAL, &intruder_id).unwrap();
        let (dialled, accepted) = tokio::join!(intruder.connect(addr, "node-0"), server.accept());
        let client_err = dialled.unwrap_err();
        assert_eq!(client_err.error_type(), "certificate_rejected_by_peer", "{client_err}");
        assert!(
            client_err.to_string().contains("rejected our certificate: it is not signed by the peer's cluster CA"),
            "{client_err}"
        );
        let server_err = accepted.unwrap().unwrap_err();
        assert_eq!(server_err.error_type(), "untrusted_peer_certificate", "{server_err}");
        assert!(server_err.to_string().contains("peer certificate is not signed by the cluster CA"), "{server_err}");

        // A member of the other cluster altogether: it refuses our server's certificate itself.
        let stranger = endpoint(&theirs, "node-1");
        let (dialled, accepted) = tokio::join!(stranger.connect(addr, "node-0"), server.accept());
        let client_err = dialled.unwrap_err();
        assert_eq!(client_err.error_type(), "untrusted_peer_certificate", "{client_err}");
        assert!(client_err.is_certificate_problem());
        let server_err = accepted.unwrap().unwrap_err();
        assert!(server_err.is_certificate_problem(), "{server_err}");

        // The server still accepts a legitimate member.
        let member = endpoint(&ours, "node-1");
        let (c, s) = pair(&member, &server, "node-0").await;
        c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));
        assert_eq!(s.peer_name(), "node-1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_server_name_must_match_the_certificate() {
    let certs = cluster("net-name", &["node-0", "node-1"]);
    bounded(async {
        let server = endpoint(&certs, "node-0");
        let client = endpoint(&certs, "node-1");
        let addr = server.local_addr().unwrap();
        let (dialled, accepted) = tokio::join!(client.connect(addr, "node-7"), server.accept());
        let err = dialled.unwrap_err();
        assert_eq!(err.error_type(), "invalid_peer_certificate", "{err}");
        assert!(err.to_string().contains("node-7") || err.to_string().contains("NotValidForName"), "{err}");
        assert!(accepted.unwrap().unwrap_err().is_certificate_problem());
        // The default name works with any cluster certificate.
        let (c, _s) = pair(&client, &server, DEFAULT_SERVER_NAME).await;
        assert_eq!(c.peer_name(), "node-0");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_refuses_a_peer_speaking_another_protocol_version() {
    let certs = cluster("net-alpn", &["node-0", "node-1"]);
    bounded(async {
        let server = endpoint(&certs, "node-0");
        let old =
            Endpoint::bind_with_alpn(LOCAL, &TlsIdentity::load(&certs.0, "node-1").unwrap(), b"lockstep/0").unwrap();
        let addr = server.local_addr().unwrap();
        let (dialled, accepted) = tokio::join!(old.connect(addr, "node-0"), server.accept());
        let client_err = dialled.unwrap_err();
        assert_eq!(client_err.error_type(), "alpn_mismatch", "{client_err}");
        assert!(client_err.to_string().contains("peer does not speak lockstep/0 (ALPN mismatch"), "{client_err}");
        let server_err = accepted.unwrap().unwrap_err();
        assert_eq!(server_err.error_type(), "alpn_mismatch", "{server_err}");
        let ours = format!("peer does not speak {} (ALPN mismatch", String::from_utf8_lossy(wire::ALPN));
        assert!(server_err.to_string().contains(&ours), "{server_err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_frames_over_the_cap_are_refused_without_allocating() {
    let certs = cluster("net-cap", &["node-0", "node-1"]);
    bounded(async {
        let server = endpoint(&certs, "node-0");
        let client = endpoint(&certs, "node-1");
        let (c, s) = pair(&client, &server, "node-0").await;

        // The sender refuses to encode one, sends nothing, and the connection carries on.
        let big = vec![0.0f32; MAX_FRAME_BYTES / 4];
        let err = c.send_ring(1, 0, 0, &big).await.unwrap_err();
        assert_eq!(err.error_type(), "wire", "{err}");
        assert!(err.to_string().contains("exceeds the 67108864-byte cap"), "{err}");
        c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));

        // A hostile peer announces a 4 GiB frame: the receiver refuses it from the length
        // prefix alone, buffers none of it, and closes the connection as a protocol violation.
        {
            let mut state = c.sender.state.lock().await;
            state.stream.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
            state.stream.write_all(&[1; 1000]).await.unwrap();
        }
        let err = s.recv().await.unwrap_err();
        let NetError::Wire(WireError::TooLarge { len, max }) = &err else { panic!("expected too large, got {err}") };
        assert_eq!((*len, *max), (u32::MAX as usize, MAX_FRAME_BYTES));
        assert!(s.receiver.lock().await.decoder.buffered() == 0);
        let closed = c.recv().await.unwrap_err();
        assert_eq!(closed.error_type(), "closed", "{closed}");
        assert!(closed.to_string().contains("protocol violation: bad frame: frame of 4294967295 bytes"), "{closed}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_peer_close_is_reported_promptly() {
    let certs = cluster("net-close", &["node-0", "node-1"]);
    bounded(async {
        let server = endpoint(&certs, "node-0");
        let client = endpoint(&certs, "node-1");

        // Explicit close with a reason.
        let (c, s) = pair(&client, &server, "node-0").await;
        let started = std::time::Instant::now();
        let receiving = tokio::spawn(async move { (s.recv().await, s) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.close("coordinator shutting down");
        let (err, s) = receiving.await.unwrap();
        let err = err.unwrap_err();
        assert_eq!(err.to_string(), "connection closed by peer: coordinator shutting down");
        assert!(err.is_disconnect());
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        // Sending on a closed connection fails clearly too.
        assert_eq!(s.send(&Frame::Control(Message::Shutdown)).await.unwrap_err().error_type(), "closed");
        assert_eq!(c.recv().await.unwrap_err().error_type(), "locally_closed");

        // Dropping a connection closes it as well.
        let (c, s) = pair(&client, &server, "node-0").await;
        let started = std::time::Instant::now();
        drop(c);
        let err = s.recv().await.unwrap_err();
        assert!(err.is_disconnect(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

        // Finish delivers the last message before the close.
        let (c, s) = pair(&client, &server, "node-0").await;
        let refused = Frame::Control(Message::Refused {
            code: wire::RefuseCode::Fingerprint,
            message: "expected fp-a, got fp-b".into(),
        });
        s.send(&refused).await.unwrap();
        s.finish().await.unwrap();
        s.close("refused");
        assert_eq!(c.recv().await.unwrap(), refused);
        let err = c.recv().await.unwrap_err();
        assert!(err.is_disconnect(), "{err}");
    })
    .await;
}

/// A UDP relay between a client and `server` whose link can be cut, to play a peer that dies
/// without a word (power loss, partition).
async fn cuttable_relay(server: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
    let front = Arc::new(tokio::net::UdpSocket::bind(LOCAL).await.unwrap());
    let back = Arc::new(tokio::net::UdpSocket::bind(LOCAL).await.unwrap());
    let addr = front.local_addr().unwrap();
    let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    {
        let (front, back, cut, client) = (front.clone(), back.clone(), cut.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if !cut.load(Ordering::Relaxed) {
                    let _ = back.send_to(&buf[..n], server).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().unwrap();
            if let (Some(to), false) = (to, cut.load(Ordering::Relaxed)) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_silent_peer_is_declared_dead_within_the_idle_timeout() {
    let certs = cluster("net-dead", &["node-0", "node-1"]);
    bounded(async {
        let server = endpoint(&certs, "node-0");
        let client = endpoint(&certs, "node-1");
        let cut = Arc::new(AtomicBool::new(false));
        let relay = cuttable_relay(server.local_addr().unwrap(), cut.clone()).await;
        let (dialled, accepted) = tokio::join!(client.connect(relay, "node-0"), server.accept());
        let (c, s) = (dialled.unwrap(), accepted.unwrap().unwrap());
        c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));

        // Keep-alives hold an idle connection open past the idle timeout...
        tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(1)).await;
        c.send(&Frame::Control(Message::Shutdown)).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Frame::Control(Message::Shutdown));

        // ...and once the link dies, both sides know within about the idle timeout.
        cut.store(true, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let (sr, cr) = tokio::join!(s.recv(), c.recv());
        for err in [sr.unwrap_err(), cr.unwrap_err()] {
            assert_eq!(err.error_type(), "timed_out", "{err}");
        }
        let took = started.elapsed();
        assert!(took < IDLE_TIMEOUT + Duration::from_secs(2), "took {took:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_closed_endpoint_stops_accepting_and_closes_its_connections() {
    let certs = cluster("net-epclose", &["node-0", "node-1"]);
    bounded(async {
        let server = endpoint(&certs, "node-0");
        let client = endpoint(&certs, "node-1");
        let (c, _s) = pair(&client, &server, "node-0").await;
        server.close("node shutting down");
        assert!(server.accept().await.is_none(), "a closed endpoint accepts nothing");
        let err = c.recv().await.unwrap_err();
        assert_eq!(err.to_string(), "connection closed by peer: node shutting down");
        server.wait_idle().await;
        let err = client.connect(server.local_addr().unwrap(), "node-0").await.unwrap_err();
        assert!(err.is_disconnect() || err.error_type() == "transport", "{err}");
    })
    .await;
}

#[test]
fn net_bind_outside_a_runtime_is_a_clear_error() {
    let certs = cluster("net-nort", &["node-0"]);
    let err = Endpoint::bind(LOCAL, &TlsIdentity::load(&certs.0, "node-0").unwrap()).unwrap_err();
    assert!(err.to_string().contains("inside a tokio runtime"), "{err}");
}

#[test]
fn net_error_types_are_distinct() {
    let errors = [
        NetError::TlsConfig(String::new()),
        NetError::Io { context: String::new(), source: std::io::Error::other("x") },
        NetError::Resolve { addr: String::new(), reason: String::new() },
        NetError::Connect { addr: LOCAL, reason: String::new() },
        NetError::UntrustedPeerCertificate { detail: String::new() },
        NetError::InvalidPeerCertificate { detail: String::new() },
        NetError::NoPeerCertificate,
        NetError::CertificateRejectedByPeer { alert: String::new(), hint: String::new() },
        NetError::AlpnMismatch { ours: String::new(), detail: String::new() },
        NetError::Handshake(String::new()),
        NetError::Closed { reason: String::new() },
        NetError::TimedOut,
        NetError::Reset,
        NetError::LocallyClosed,
        NetError::Protocol(String::new()),
        NetError::Wire(WireError::EmptyFrame),
        NetError::Transport(String::new()),
    ];
    let types: std::collections::HashSet<_> = errors.iter().map(NetError::error_type).collect();
    assert_eq!(types.len(), errors.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_resolve_finds_loopback() {
    bounded(async {
        assert_eq!(resolve("127.0.0.1:7000").await.unwrap(), "127.0.0.1:7000".parse().unwrap());
        assert_eq!(resolve("no port here").await.unwrap_err().error_type(), "resolve");
    })
    .await;
}
