//! The fixed-order ring all-reduce.
//!
//! A row-parallel layer leaves every rank with a *partial*: the subtree sum of its segments
//! (`lockstep_kernels::reference::dot`). The all-reduce must finish the same segment tree the
//! single-node kernel would have built, so it is not a reduce-scatter with running sums (whose
//! association depends on the ring position) but an **all-gather**: partials travel the ring
//! unchanged, and once a rank holds all `t` of them it combines them itself with the kernels'
//! pairwise tree in rank order. Every rank therefore ends with identical bits, equal to the
//! unsplit result.
//!
//! [`RingAllGather`] is the sans-IO state machine of one all-gather: fed the frames arriving
//! from the previous rank, it says which to forward to the next, and rejects anything
//! inconsistent (wrong step, duplicate origin, wrong length). [`RingCollective`] drives it over
//! any blocking [`RingTransport`] — QUIC between node processes, channels in tests.
//!
//! **Copies.** The activation is copied only where bytes must exist: the transport encodes this
//! rank's partial straight from the model's buffer into the frame it sends (and a forwarded partial
//! straight from where it was received), the peers' partials are decoded once into their own
//! vectors, and the combine writes the model's output buffer. Nothing is cloned to be sent, and on
//! the CPU backend the model hands its buffers over without a download or an upload.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use lockstep_proto::wire::RingFrame;

use crate::model::{Collective, StepError};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RingError {
    #[error("ring frame for step {got_step} op {got_op} while step {step} op {op} is in progress")]
    WrongOp { step: u64, op: u32, got_step: u64, got_op: u32 },
    #[error("ring frame from origin rank {origin}, which is not a peer of rank {rank} in a ring of {tp}")]
    BadOrigin { origin: u32, rank: usize, tp: usize },
    #[error("second ring frame from origin rank {0}")]
    Duplicate(u32),
    #[error("ring frame from rank {origin} has {got} values, expected {want}")]
    WrongLength { origin: u32, got: usize, want: usize },
    #[error("ring transport: {0}")]
    Transport(String),
}

/// One all-gather on a ring of `tp` ranks, seen from `rank`: collects the peers' partials (this
/// rank's own stays with the caller).
pub struct RingAllGather {
    rank: usize,
    tp: usize,
    step_id: u64,
    op: u32,
    len: usize,
    parts: Vec<Option<Vec<f32>>>,
    missing: usize,
}

impl RingAllGather {
    /// An all-gather of partials of `len` values. The caller sends its own partial to the next
    /// rank (when `tp > 1`) and passes it again to [`finish`](Self::finish).
    pub fn new(rank: usize, tp: usize, step_id: u64, op: u32, len: usize) -> Self {
        assert!(rank < tp);
        RingAllGather { rank, tp, step_id, op, len, parts: vec![None; tp], missing: tp - 1 }
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// A frame from the previous rank. Returns its origin when the next rank still needs it (every
    /// origin except the next rank itself travels on); its values are then [`part`](Self::part).
    pub fn on_frame(&mut self, f: RingFrame) -> Result<Option<u32>, RingError> {
        if f.step_id != self.step_id || f.op != self.op {
            return Err(RingError::WrongOp { step: self.step_id, op: self.op, got_step: f.step_id, got_op: f.op });
        }
        let o = f.origin_rank as usize;
        if o >= self.tp || o == self.rank {
            return Err(RingError::BadOrigin { origin: f.origin_rank, rank: self.rank, tp: self.tp });
        }
        if self.parts[o].is_some() {
            return Err(RingError::Duplicate(f.origin_rank));
        }
        if f.data.len() != self.len {
            return Err(RingError::WrongLength { origin: f.origin_rank, got: f.data.len(), want: self.len });
        }
        self.parts[o] = Some(f.data);
        self.missing -= 1;
        Ok((o != (self.rank + 1) % self.tp).then_some(f.origin_rank))
    }

    /// The partial received from `origin` (empty if none has come).
    pub fn part(&self, origin: u32) -> &[f32] {
        self.parts.get(origin as usize).and_then(Option::as_deref).unwrap_or(&[])
    }

    /// The tree combine of all partials in rank order, `own` at this rank's place, into `out`
    /// (identical on every rank).
    pub fn finish(&self, own: &[f32], out: &mut [f32]) {
        assert!(self.is_complete(), "all-gather incomplete");
        let refs: Vec<&[f32]> = (0..self.tp)
            .map(|r| if r == self.rank { own } else { self.parts[r].as_deref().expect("complete") })
            .collect();
        lockstep_kernels::cpu::tree_combine(&refs, out);
    }
}

/// Blocking links to the ring neighbours.
pub trait RingTransport: Send + Sync {
    /// Sends `data` as the partial of `origin_rank` for op `op` of step `step_id`; the transport
    /// encodes it straight from the slice.
    fn send_next(&self, step_id: u64, op: u32, origin_rank: u32, data: &[f32]) -> Result<(), RingError>;
    fn recv_prev(&self, timeout: Duration) -> Result<RingFrame, RingError>;
    /// Whether [`RingTransport::check_neighbours`] can notice, between steps, a neighbour that
    /// went away (a link the kernel closes when the neighbour's process dies).
    fn can_check_neighbours(&self) -> bool {
        false
    }
    /// Between steps, without waiting: an error naming the neighbour whose link has closed. Frames
    /// of the next step that arrived early stay queued for [`RingTransport::recv_prev`].
    fn check_neighbours(&self) -> Result<(), RingError> {
        Ok(())
    }
}

/// The model's [`Collective`] on a ring. All ranks run the same layers in the same order, so
/// the n-th all-reduce of a step is the same operation everywhere: `op` counts them.
pub struct RingCollective<T: RingTransport> {
    rank: usize,
    tp: usize,
    transport: T,
    step_id: AtomicU64,
    op: AtomicU32,
    timeout: Duration,
}

impl<T: RingTransport> RingCollective<T> {
    pub fn new(rank: usize, tp: usize, transport: T, timeout: Duration) -> Self {
        RingCollective { rank, tp, transport, step_id: AtomicU64::new(0), op: AtomicU32::new(0), timeout }
    }
    pub fn transport(&self) -> &T {
        &self.transport
    }
    /// Call before each step.
    pub fn begin_step(&self, step_id: u64) {
        self.step_id.store(step_id, Ordering::SeqCst);
        self.op.store(0, Ordering::SeqCst);
    }
}

impl<T: RingTransport> Collective for RingCollective<T> {
    fn ranks(&self) -> usize {
        self.tp
    }
    fn all_reduce(&self, partial: &[f32], out: &mut [f32]) -> Result<(), StepError> {
        let step_id = self.step_id.load(Ordering::SeqCst);
        let op = self.op.fetch_add(1, Ordering::SeqCst);
        let err = |e: RingError| StepError::Collective(e.to_string());
        let mut ag = RingAllGather::new(self.rank, self.tp, step_id, op, partial.len());
        if self.tp > 1 {
            self.transport.send_next(step_id, op, self.rank as u32, partial).map_err(err)?;
        }
        while !ag.is_complete() {
            let f = self.transport.recv_prev(self.timeout).map_err(err)?;
            if let Some(origin) = ag.on_frame(f).map_err(err)? {
                self.transport.send_next(step_id, op, origin, ag.part(origin)).map_err(err)?;
            }
        }
        ag.finish(partial, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Mutex;

    struct ChannelLink {
        next: Sender<RingFrame>,
        prev: Mutex<Receiver<RingFrame>>,
    }
    impl RingTransport for ChannelLink {
        fn send_next(&self, step_id: u64, op: u32, origin_rank: u32, data: &[f32]) -> Result<(), RingError> {
            let frame = RingFrame { step_id, op, origin_rank, data: data.to_vec() };
            self.next.send(frame).map_err(|e| RingError::Transport(e.to_string()))
        }
        fn recv_prev(&self, timeout: Duration) -> Result<RingFrame, RingError> {
            self.prev.lock().unwrap().recv_timeout(timeout).map_err(|e| RingError::Transport(e.to_string()))
        }
    }

    fn ring(tp: usize) -> Vec<ChannelLink> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..tp).map(|_| channel()).unzip();
        // Rank r sends on channel r+1 and receives on channel r.
        let mut rxs: Vec<Option<Receiver<RingFrame>>> = rxs.into_iter().map(Some).collect();
        (0..tp)
            .map(|r| ChannelLink { next: txs[(r + 1) % tp].clone(), prev: Mutex::new(rxs[r].take().unwrap()) })
            .collect()
    }

    #[test]
    fn every_rank_gets_the_tree_combine_in_rank_order() {
        for tp in [1usize, 2, 4, 8] {
            let partials: Vec<Vec<f32>> = (0..tp)
                .map(|r| (0..37).map(|i| ((r * 37 + i) as f32 * 0.37).sin() * 1e3f32.powi(r as i32 % 3)).collect())
                .collect();
            let refs: Vec<&[f32]> = partials.iter().map(Vec::as_slice).collect();
            let want = lockstep_kernels::reference::tree_combine(&refs);
            let links = ring(tp);
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = links
                    .into_iter()
                    .enumerate()
                    .map(|(r, link)| {
                        let own = &partials[r];
                        s.spawn(move || {
                            let c = RingCollective::new(r, tp, link, Duration::from_secs(5));
                            c.begin_step(9);
                            let (mut a, mut b) = (vec![f32::NAN; own.len()], vec![0.0; own.len()]);
                            c.all_reduce(own, &mut a).unwrap();
                            c.all_reduce(own, &mut b).unwrap(); // a second op in the same step
                            assert_eq!(a, b);
                            a
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in results {
                assert_eq!(
                    r.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn inconsistent_frames_are_rejected() {
        let mut ag = RingAllGather::new(1, 4, 5, 2, 3);
        let f = |step, op, origin, n| RingFrame { step_id: step, op, origin_rank: origin, data: vec![1.0; n] };
        assert!(matches!(ag.on_frame(f(4, 2, 0, 3)), Err(RingError::WrongOp { .. })));
        assert!(matches!(ag.on_frame(f(5, 2, 1, 3)), Err(RingError::BadOrigin { .. })));
        assert!(matches!(ag.on_frame(f(5, 2, 7, 3)), Err(RingError::BadOrigin { .. })));
        assert!(matches!(ag.on_frame(f(5, 2, 0, 2)), Err(RingError::WrongLength { .. })));
        // Origin 0 must travel on to rank 2; origin 2 is the next rank itself and stops here.
        assert_eq!(ag.on_frame(f(5, 2, 0, 3)).unwrap(), Some(0));
        assert_eq!(ag.part(0), [1.0; 3]);
        assert!(matches!(ag.on_frame(f(5, 2, 0, 3)), Err(RingError::Duplicate(0))));
        assert!(ag.on_frame(f(5, 2, 2, 3)).unwrap().is_none());
        assert!(!ag.is_complete());
        ag.on_frame(f(5, 2, 3, 3)).unwrap();
        assert!(ag.is_complete());
    }

    #[test]
    fn a_silent_neighbour_times_out_with_an_error() {
        let links = ring(2);
        let mut it = links.into_iter();
        let c = RingCollective::new(0, 2, it.next().unwrap(), Duration::from_millis(50));
        let _keep = it.next();
        c.begin_step(1);
        let e = c.all_reduce(&[1.0], &mut [0.0]).unwrap_err();
        assert!(matches!(e, StepError::Collective(_)));
    }
}
