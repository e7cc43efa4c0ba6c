//! # lockstep-coordinator
