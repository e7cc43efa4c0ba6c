//! # lockstep-transport: mutual-TLS QUIC between the coordinator and the nodes
//!
//! The coordinator and every node speak to each other over this crate and nothing else, so it is
//! its own crate that both depend on: neither side's model or scheduling code comes with it.
//!
//! **Who may talk.** Each cluster has a private CA ([`certs`]): [`certs::init_ca`] makes one,
//! [`certs::issue`] signs a certificate for a node (or coordinator) name, and
//! [`certs::TlsIdentity`] is what a process loads to take part. Every connection is mutual TLS 1.3
//! against that CA: the acceptor *requires* a client certificate signed by it, the dialler checks
//! the acceptor's certificate against it and the name it expects, and both learn the other's name
//! ([`Conn::peer_name`]) from the certificate, so authorisation ("only my ring predecessor may
//! connect here") is a string compare. No public CA is involved and no host-name convention needs
//! configuring.
//!
//! **Which protocol.** The application protocol is negotiated with ALPN
//! ([`lockstep_proto::wire::ALPN`], `lockstep/2`), which names the protocol version: two
//! incompatible builds fail the handshake with "peer does not speak lockstep/2" instead of
//! misparsing each other's frames. Only TLS 1.3 (which QUIC requires) and only the ring crypto
//! provider are used — no aws-lc-rs anywhere in the tree, so the build needs no C toolchain beyond
//! ring's.
//!
//! **Endpoints.** One [`Endpoint`] per process and UDP port acts as both server and client: the
//! coordinator dials nodes, nodes accept the coordinator and dial their ring successor, all on the
//! same socket. Connections get keep-alives ([`KEEP_ALIVE`]) and an idle timeout
//! ([`IDLE_TIMEOUT`]), so a dead or partitioned peer is an error within seconds rather than a hang,
//! and every failure is a [`NetError`] that says in lockstep's terms what happened (whose
//! certificate was refused and why, which close reason the peer gave).
//!
//! **Framing.** Each connection carries exactly one bidirectional stream, the message channel,
//! holding the length-prefixed frames of [`lockstep_proto::wire`]; QUIC gives it ordering, flow
//! control and loss recovery. The acceptor opens the stream and writes a short preface before
//! anything else: in TLS 1.3 the dialler's handshake completes *before* the acceptor has verified
//! the dialler's certificate, so waiting for the preface is how [`Endpoint::connect`] learns that it
//! was actually accepted (a refused certificate then surfaces from `connect`, not from the first
//! `recv`). The length cap is enforced from the prefix alone, before a byte of the body is
//! buffered. Ring all-reduce frames are written from borrowed slices ([`Conn::send_ring`]) so the
//! hot path never copies activations into a message first.
//!
//! **Sharing.** A [`Conn`] can be shared between tasks (its methods take `&self`), or
//! [`split`](Conn::split) into a cloneable [`ConnSender`] and a [`ConnReceiver`]: a node receives
//! `Step`s in one task while another sends heartbeats. Receiving is cancel-safe (a `recv` dropped
//! in a `select!` loses no bytes); sending is not, and a send abandoned midway poisons the sender,
//! since half a frame is on the stream.
//!
//! Modules: [`certs`] (the cluster PKI on disk), `config` (TLS and QUIC settings, peer checks),
//! `endpoint` (binding, dialling, accepting), `conn` (the message stream and its framing), `error`
//! (what went wrong, from quinn's and rustls's errors).

pub mod certs;
mod config;
mod conn;
mod endpoint;
mod error;
#[cfg(test)]
mod tests;

pub use config::{certificate_name, IDLE_TIMEOUT, KEEP_ALIVE};
pub use conn::{Conn, ConnReceiver, ConnSender};
pub use endpoint::{resolve, Endpoint, ACCEPT_QUEUE, DEFAULT_SERVER_NAME, PREFACE_TIMEOUT};
pub use error::{close_code, NetError};
