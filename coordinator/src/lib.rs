//! # lockstep-coordinator
//!
//! The front of a lockstep cluster: it turns requests into token ids, decides what every engine
//! step computes, and turns sampled ids back into text.
//!
//! * [`tokenizer`]: the model's Hugging Face tokenizer, chat template, streaming detokenizer and
//!   stop-string matcher.
//! * [`scheduler`]: the continuous-batching scheduler (chunked prefill, paged KV block accounting,
//!   preemption by recompute) as a sans-IO state machine: it consumes requests and step results
//!   and produces step plans and sequence events, with no threads, clocks or I/O, so tests drive
//!   it directly.
//! * [`membership`]: which nodes are alive and which tensor-parallel groups they form, as a
//!   sans-IO state machine with time as an input.
//! * [`discovery`]: etcd discovery and coordinator fail-over (`--membership etcd`): which
//!   coordinator leads, as a sans-IO state machine, and a thin etcd wrapper.
//!
//! The scheduler never changes a request's output bits: sampling noise is keyed by the generated
//! token's index and the kernels are batch-invariant (see `docs/DESIGN.md`), so which step, batch
//! or KV blocks a token was computed in is invisible in the result.

pub mod api;
pub mod cluster;
pub mod discovery;
pub mod engine;
pub mod membership;
pub mod ops;
pub mod scheduler;
pub mod service;
pub mod soak;
pub mod state;
pub mod tokenizer;
