//! The determinism canary (being written).

#[derive(Default)]
pub struct Canary {}
