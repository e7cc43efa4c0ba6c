//! The lock-free metric types the engine threads update on every token: a Prometheus histogram
//! with fixed buckets, and a ring of per-second counters. Every update is a relaxed atomic or a
//! compare-and-swap loop on one word; nothing here takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-second slots kept for throughput (a little over two minutes of history).
pub(super) const RING_SECS: usize = 128;

/// A Prometheus histogram with fixed upper bounds (`le`), lock-free.
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, *not* cumulative (the last one is `+Inf`); cumulated at render.
    counts: Box<[AtomicU64]>,
    /// The sum as `f64` bits, updated by compare-and-swap.
    sum_bits: AtomicU64,
}

/// A consistent-enough copy of a histogram: cumulative counts read once, so `_count` always
/// equals the `+Inf` bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Cumulative: `cumulative[i]` observations were `<= bounds[i]`; the last entry is `+Inf`.
    pub cumulative: Vec<u64>,
    pub sum: f64,
}

impl HistogramSnapshot {
    /// The observations made since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative: self
                .cumulative
                .iter()
                .zip(earlier.cumulative.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum: self.sum - earlier.sum,
        }
    }

    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The `q` quantile by linear interpolation inside the bucket, like PromQL's
    /// `histogram_quantile` (the dashboard does the same over windowed deltas). `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let i = self.cumulative.iter().position(|&c| c as f64 >= rank)?;
        if i >= self.bounds.len() {
            // In the +Inf bucket: the best honest answer is the highest finite bound.
            return self.bounds.last().copied();
        }
        let (lo, below) = if i == 0 { (0.0, 0) } else { (self.bounds[i - 1], self.cumulative[i - 1]) };
        let in_bucket = self.cumulative[i] - below;
        let frac = if in_bucket == 0 { 1.0 } else { (rank - below as f64) / in_bucket as f64 };
        Some(lo + (self.bounds[i] - lo) * frac)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bucket bounds must increase");
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        // Bucket `le` semantics: the first bound with v <= bound.
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.sum_bits.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0u64;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                acc += c.load(Ordering::Relaxed);
                acc
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative,
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

/// Counts per second over the last [`RING_SECS`] seconds. Slot `s % RING_SECS` holds
/// `(s << 32) | count` for second `s` since the ring was made.
pub(super) struct SecondRing {
    slots: Box<[AtomicU64]>,
}

impl SecondRing {
    pub(super) fn new() -> Self {
        SecondRing { slots: (0..RING_SECS).map(|_| AtomicU64::new(u64::MAX)).collect() }
    }

    pub(super) fn add(&self, sec: u64, n: u64) {
        let slot = &self.slots[(sec % RING_SECS as u64) as usize];
        let tag = sec & 0xffff_ffff;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == tag && cur != u64::MAX {
                cur + n.min(0xffff_ffff - (cur & 0xffff_ffff))
            } else {
                (tag << 32) | n.min(0xffff_ffff)
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    pub(super) fn get(&self, sec: u64) -> u64 {
        let v = self.slots[(sec % RING_SECS as u64) as usize].load(Ordering::Relaxed);
        if v != u64::MAX && v >> 32 == sec & 0xffff_ffff {
            v & 0xffff_ffff
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        assert_eq!(h.snapshot().quantile(0.5), None);
        for v in [0.5, 1.5, 1.5, 3.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![1, 3, 4, 4]);
        assert_eq!(s.sum, 6.5);
        // Rank 2 of 4 lies halfway through the (1, 2] bucket.
        assert_eq!(s.quantile(0.5), Some(1.5));
        assert_eq!(s.quantile(1.0), Some(4.0));
        h.observe(100.0);
        assert_eq!(h.snapshot().quantile(1.0), Some(4.0), "+Inf bucket reports the highest finite bound");
    }
}
