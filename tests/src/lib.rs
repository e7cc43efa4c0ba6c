//! Helpers for lockstep's system-level tests.
