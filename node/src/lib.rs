//! # lockstep-node
