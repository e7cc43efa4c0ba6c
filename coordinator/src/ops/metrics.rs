//! Prometheus metrics (being written).

use crate::service::ServiceObserver;

#[derive(Default)]
pub struct Metrics {}

impl ServiceObserver for Metrics {}
