//! # lockstep-proto
//!
//! The messages that travel between the coordinator's scheduler and the engine (in one process
//! today, over QUIC to node processes later). No I/O lives here.

pub mod step;
