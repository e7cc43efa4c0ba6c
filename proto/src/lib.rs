//! # lockstep-proto
//!
//! The messages that travel between the coordinator's scheduler and the engine (in one process
//! today, over QUIC to node processes later), and the [`wire`] protocol that carries them: framing,
//! control messages and raw tensor frames. No I/O lives here.

pub mod session;
pub mod step;
pub mod wire;
