//! Operations: Prometheus metrics, the ops API, the determinism canary and the dashboard.

pub mod canary;
pub mod metrics;
