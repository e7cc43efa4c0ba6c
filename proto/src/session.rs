//! The session step protocol: what a node keeps between steps, so a step plan on the wire carries
//! only what changed.
//!
//! # Design
//!
//! A [`StepPlan`] names every chunk's whole KV block table and sampling parameters. Sent as is to
//! every rank at every step, a batch-8 decode step is mostly block tables that did not change. So
//! the coordinator and each node hold the same [`SessionState`] — per live sequence its block
//! table, the position its KV reaches and its sampling parameters — and the wire carries a
//! [`PlanDelta`]: new tokens, blocks appended to a table, parameters only when they change, and the
//! sequences to forget. Both sides run the same [`SessionState::apply`], which expands a delta back
//! into the full [`StepPlan`]; the node then runs that plan through `StepPlan::validate` exactly as
//! before, so the engine and its checks never see a delta.
//!
//! **The session holds exactly the previous step's sequences.** A delta drops every sequence of
//! the previous step that is not in this one (finished, aborted, preempted, migrated away, or just
//! left out of this step by the token budget), and a sequence that (re)appears is sent whole. That
//! rule needs nothing from the scheduler beyond the plans themselves, keeps a node's memory bounded
//! by one step's batch, and costs a table resend only for a sequence that skips a step. A chunk
//! continues its sequence (blocks appended, nothing else) only when it starts where the sequence's
//! KV ended and the old table is a prefix of the new one; a preempted sequence recomputed from
//! position 0 is therefore sent whole again, on fresh blocks or not.
//!
//! **Chained by step id.** A delta names the step it builds on ([`PlanDelta::base_step`]); a
//! *full snapshot* (`base_step: None`) forgets everything first. A node applies a delta only on top
//! of exactly that step, so a duplicate, a reordering or a lost step is an error
//! ([`SessionError`]), never a plan silently built on the wrong state. A failed apply also clears
//! the state, so nothing but a full snapshot is accepted afterwards.
//!
//! **Who sends a snapshot.** The coordinator keeps one [`SessionMirror`] per formed group. A new
//! group (first formation or re-formation after a node loss) starts with an empty mirror, so its
//! first plan is a full snapshot, which is also what a node that joins mid-stream gets. A node that
//! rejects a delta answers `StepRejected`; the coordinator sends that rank the same step as a full
//! snapshot ([`SessionState::snapshot`]), and the ranks that accepted the delta are meanwhile
//! waiting in the step's first all-reduce for it.

use std::collections::HashMap;

use lockstep_kernels::{SampleRequest, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::step::{SeqChunk, StepPlan};

/// How a chunk's sequence's block table changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableChange {
    /// The sequence continues: these blocks go after the ones the session holds.
    Append(Vec<u32>),
    /// The sequence is new to the session (or restarts): this is its whole table.
    Whole(Vec<u32>),
}

/// What to sample after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleDelta {
    /// Index of the generated token (see `SampleRequest::step`).
    pub step: u64,
    /// `None`: the parameters the session last saw for this sequence.
    pub params: Option<SamplingParams>,
}

/// One chunk of a [`PlanDelta`]: a [`SeqChunk`] without what the session already knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkDelta {
    pub seq_id: u64,
    pub tokens: Vec<u32>,
    pub first_pos: u32,
    pub table: TableChange,
    pub sample: Option<SampleDelta>,
}

/// A step as it travels to a node: the changes to the node's [`SessionState`] that expand into the
/// step's [`StepPlan`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanDelta {
    pub step_id: u64,
    /// The step whose state this delta builds on; `None` for a full snapshot, which starts from an
    /// empty session.
    pub base_step: Option<u64>,
    /// Sequences of the base step that this step does not continue; the session forgets them.
    pub dropped: Vec<u64>,
    pub chunks: Vec<ChunkDelta>,
}

impl PlanDelta {
    /// Whether this delta is a full snapshot (applies to any session state).
    pub fn is_snapshot(&self) -> bool {
        self.base_step.is_none()
    }
}

/// Why a [`PlanDelta`] does not fit a [`SessionState`]. The node answers `StepRejected` and the
/// coordinator resends the step as a full snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("step {step_id} builds on step {base}, but this node holds no session (it needs a full snapshot)")]
    NoSession { step_id: u64, base: u64 },
    #[error("step {step_id} builds on step {base}, but this node's last step is {last}")]
    WrongBase { step_id: u64, base: u64, last: u64 },
    #[error("step {step_id} does not come after step {last}")]
    StepNotAfter { step_id: u64, last: u64 },
    #[error("step {step_id} drops sequence {seq_id}, which this node does not hold")]
    DropUnknown { step_id: u64, seq_id: u64 },
    #[error("step {step_id} continues sequence {seq_id}, which this node does not hold")]
    UnknownSequence { step_id: u64, seq_id: u64 },
    #[error("step {step_id} continues sequence {seq_id} at position {first_pos}, but its KV ends at {end_pos}")]
    PositionGap { step_id: u64, seq_id: u64, first_pos: u32, end_pos: u32 },
    #[error("step {step_id} samples sequence {seq_id} with the previous parameters, but none are known")]
    NoSamplingParams { step_id: u64, seq_id: u64 },
    #[error("step {step_id} names sequence {seq_id} twice")]
    DuplicateSequence { step_id: u64, seq_id: u64 },
}

impl SessionError {
    /// A stable machine-readable name for logs and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            SessionError::NoSession { .. } => "no_session",
            SessionError::WrongBase { .. } => "wrong_base",
            SessionError::StepNotAfter { .. } => "step_not_after",
            SessionError::DropUnknown { .. } => "drop_unknown",
            SessionError::UnknownSequence { .. } => "unknown_sequence",
            SessionError::PositionGap { .. } => "position_gap",
            SessionError::NoSamplingParams { .. } => "no_sampling_params",
            SessionError::DuplicateSequence { .. } => "duplicate_sequence",
        }
    }
}

/// What the session knows of one live sequence.
#[derive(Debug, Clone, PartialEq)]
struct SeqState {
    block_table: Vec<u32>,
    /// One past the last position whose KV the sequence's steps have written.
    end_pos: u32,
    /// The sampling parameters of its last sampled chunk.
    params: Option<SamplingParams>,
}

/// The sequences a node holds between steps (and the coordinator's mirror of them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionState {
    /// The last step applied; `None` before the first snapshot and after a failed apply.
    last_step: Option<u64>,
    seqs: HashMap<u64, SeqState>,
}

impl SessionState {
    pub fn new() -> Self {
        SessionState::default()
    }

    /// The last step applied, if the session holds one.
    pub fn last_step(&self) -> Option<u64> {
        self.last_step
    }

    /// Number of sequences held.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Whether sequence `seq_id` is held.
    pub fn holds(&self, seq_id: u64) -> bool {
        self.seqs.contains_key(&seq_id)
    }

    /// Forgets everything: only a full snapshot applies afterwards.
    pub fn clear(&mut self) {
        self.last_step = None;
        self.seqs.clear();
    }

    /// `plan` as a full snapshot: every table whole, every sampling parameter spelled out.
    pub fn snapshot(plan: &StepPlan) -> PlanDelta {
        PlanDelta {
            step_id: plan.step_id,
            base_step: None,
            dropped: Vec::new(),
            chunks: plan
                .chunks
                .iter()
                .map(|c| ChunkDelta {
                    seq_id: c.seq_id,
                    tokens: c.tokens.clone(),
                    first_pos: c.first_pos,
                    table: TableChange::Whole(c.block_table.clone()),
                    sample: c.sample.map(|s| SampleDelta { step: s.step, params: Some(s.params) }),
                })
                .collect(),
        }
    }

    /// The delta that takes this state to `plan` (a full snapshot when the state holds no step).
    /// Does not change the state: [`apply`](Self::apply) does.
    pub fn delta_to(&self, plan: &StepPlan) -> PlanDelta {
        let Some(base) = self.last_step else { return Self::snapshot(plan) };
        let in_plan: std::collections::HashSet<u64> = plan.chunks.iter().map(|c| c.seq_id).collect();
        let mut dropped: Vec<u64> = self.seqs.keys().copied().filter(|s| !in_plan.contains(s)).collect();
        // HashMap order is arbitrary; the wire bytes should not be.
        dropped.sort_unstable();
        let chunks = plan.chunks.iter().map(|c| self.chunk_delta(c)).collect();
        PlanDelta { step_id: plan.step_id, base_step: Some(base), dropped, chunks }
    }

    fn chunk_delta(&self, c: &SeqChunk) -> ChunkDelta {
        let held = self.seqs.get(&c.seq_id);
        let continues = held.filter(|s| c.first_pos == s.end_pos && c.block_table.starts_with(&s.block_table));
        let table = match continues {
            Some(s) => TableChange::Append(c.block_table[s.block_table.len()..].to_vec()),
            None => TableChange::Whole(c.block_table.clone()),
        };
        let known_params = continues.and_then(|s| s.params);
        let sample = c
            .sample
            .map(|s| SampleDelta { step: s.step, params: (known_params != Some(s.params)).then_some(s.params) });
        ChunkDelta { seq_id: c.seq_id, tokens: c.tokens.clone(), first_pos: c.first_pos, table, sample }
    }

    /// Applies `delta` and returns the step's full plan. On error the state is cleared, so the next
    /// delta must be a full snapshot.
    pub fn apply(&mut self, delta: &PlanDelta) -> Result<StepPlan, SessionError> {
        let result = self.try_apply(delta);
        if result.is_err() {
            self.clear();
        }
        result
    }

    fn try_apply(&mut self, delta: &PlanDelta) -> Result<StepPlan, SessionError> {
        let step_id = delta.step_id;
        match (delta.base_step, self.last_step) {
            (None, Some(last)) if step_id <= last => return Err(SessionError::StepNotAfter { step_id, last }),
            (None, _) => self.seqs.clear(),
            (Some(base), None) => return Err(SessionError::NoSession { step_id, base }),
            (Some(base), Some(last)) if base != last => return Err(SessionError::WrongBase { step_id, base, last }),
            (Some(_), Some(last)) if step_id <= last => return Err(SessionError::StepNotAfter { step_id, last }),
            (Some(_), Some(_)) => {}
        }
        for &seq_id in &delta.dropped {
            if self.seqs.remove(&seq_id).is_none() {
                return Err(SessionError::DropUnknown { step_id, seq_id });
            }
        }
        let mut chunks = Vec::with_capacity(delta.chunks.len());
        let mut seen = std::collections::HashSet::with_capacity(delta.chunks.len());
        for c in &delta.chunks {
            let seq_id = c.seq_id;
            if !seen.insert(seq_id) {
                return Err(SessionError::DuplicateSequence { step_id, seq_id });
            }
            let seq = match &c.table {
                TableChange::Whole(table) => {
                    let seq = SeqState { block_table: table.clone(), end_pos: c.first_pos, params: None };
                    match self.seqs.entry(seq_id) {
                        std::collections::hash_map::Entry::Occupied(mut held) => {
                            held.insert(seq);
                            held.into_mut()
                        }
                        std::collections::hash_map::Entry::Vacant(free) => free.insert(seq),
                    }
                }
                TableChange::Append(blocks) => {
                    let seq = self.seqs.get_mut(&seq_id).ok_or(SessionError::UnknownSequence { step_id, seq_id })?;
                    if c.first_pos != seq.end_pos {
                        return Err(SessionError::PositionGap {
                            step_id,
                            seq_id,
                            first_pos: c.first_pos,
                            end_pos: seq.end_pos,
                        });
                    }
                    seq.block_table.extend_from_slice(blocks);
                    seq
                }
            };
            seq.end_pos = c.first_pos.saturating_add(c.tokens.len() as u32);
            let sample = match c.sample {
                None => None,
                Some(s) => {
                    let params = s.params.or(seq.params).ok_or(SessionError::NoSamplingParams { step_id, seq_id })?;
                    seq.params = Some(params);
                    Some(SampleRequest { params, step: s.step })
                }
            };
            chunks.push(SeqChunk {
                seq_id,
                tokens: c.tokens.clone(),
                first_pos: c.first_pos,
                block_table: seq.block_table.clone(),
                sample,
            });
        }
        self.last_step = Some(step_id);
        Ok(StepPlan { step_id, chunks })
    }
}

/// The coordinator's copy of what one group's nodes hold: turns each full plan into the delta to
/// send.
#[derive(Debug, Default)]
pub struct SessionMirror {
    state: SessionState,
}

impl SessionMirror {
    /// An empty mirror: its first delta is a full snapshot.
    pub fn new() -> Self {
        SessionMirror::default()
    }

    /// The delta for `plan`, recorded as what the nodes will hold once they ran it.
    pub fn delta(&mut self, plan: &StepPlan) -> PlanDelta {
        let delta = self.state.delta_to(plan);
        match self.state.apply(&delta) {
            // The same code expands it on the nodes: what comes back is what they will run.
            Ok(expanded) if expanded == *plan => delta,
            // Only a plan the scheduler should never make gets here (a sequence twice in one
            // step): send it whole and let the nodes' validation name the problem.
            _ => {
                self.state.clear();
                let snapshot = SessionState::snapshot(plan);
                let _ = self.state.apply(&snapshot);
                snapshot
            }
        }
    }

    /// Forgets what the nodes hold: the next delta is a full snapshot. For when a step failed and
    /// the nodes' state is unknown.
    pub fn reset(&mut self) {
        self.state.clear();
    }

    /// The state the nodes hold after the last delta.
    pub fn state(&self) -> &SessionState {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy(step: u64) -> Option<SampleRequest> {
        Some(SampleRequest { params: SamplingParams::greedy(), step })
    }

    fn chunk(
        seq_id: u64,
        first_pos: u32,
        tokens: Vec<u32>,
        table: Vec<u32>,
        sample: Option<SampleRequest>,
    ) -> SeqChunk {
        SeqChunk { seq_id, tokens, first_pos, block_table: table, sample }
    }

    fn plan(step_id: u64, chunks: Vec<SeqChunk>) -> StepPlan {
        StepPlan { step_id, chunks }
    }

    /// A coordinator mirror and one node: every plan goes through delta → apply, and the node must
    /// run exactly the plan the scheduler made.
    struct Pair {
        mirror: SessionMirror,
        node: SessionState,
    }

    impl Pair {
        fn new() -> Self {
            Pair { mirror: SessionMirror::new(), node: SessionState::new() }
        }
        fn step(&mut self, p: &StepPlan) -> PlanDelta {
            let delta = self.mirror.delta(p);
            assert_eq!(self.node.apply(&delta).unwrap(), *p, "the node expands the delta to the plan");
            assert_eq!(self.node, self.mirror.state, "mirror and node agree");
            delta
        }
    }

    #[test]
    fn decode_steps_carry_only_new_tokens_and_appended_blocks() {
        let mut pair = Pair::new();
        // Prefill two sequences with block size 4: 6 and 3 tokens.
        let d = pair.step(&plan(
            1,
            vec![
                chunk(1, 0, vec![1, 2, 3, 4, 5, 6], vec![7, 2], greedy(0)),
                chunk(2, 0, vec![9, 9, 9], vec![5], greedy(0)),
            ],
        ));
        assert!(d.is_snapshot(), "the first plan of a session is a full snapshot");
        // Decode: sequence 1 stays in block 2, sequence 2 crosses into a new block.
        let d = pair.step(&plan(
            2,
            vec![chunk(1, 6, vec![10], vec![7, 2], greedy(1)), chunk(2, 3, vec![11], vec![5], greedy(1))],
        ));
        assert_eq!(d.base_step, Some(1));
        assert!(d.dropped.is_empty());
        assert_eq!(d.chunks[0].table, TableChange::Append(vec![]));
        assert_eq!(d.chunks[0].sample, Some(SampleDelta { step: 1, params: None }), "parameters are not resent");
        let d = pair.step(&plan(
            3,
            vec![chunk(1, 7, vec![12], vec![7, 2], greedy(2)), chunk(2, 4, vec![13], vec![5, 0], greedy(2))],
        ));
        assert_eq!(d.chunks[1].table, TableChange::Append(vec![0]));
        assert_eq!(d.chunks[1].tokens, vec![13]);
        // Changed sampling parameters travel again.
        let hot = SampleRequest { params: SamplingParams { temperature: 0.7, top_k: 5, top_p: 0.9, seed: 3 }, step: 3 };
        let d = pair.step(&plan(4, vec![chunk(1, 8, vec![14], vec![7, 2, 3], Some(hot))]));
        assert_eq!(d.chunks[0].sample, Some(SampleDelta { step: 3, params: Some(hot.params) }));
        assert_eq!(d.chunks[0].table, TableChange::Append(vec![3]));
    }

    #[test]
    fn finished_and_skipped_sequences_are_dropped_and_come_back_whole() {
        let mut pair = Pair::new();
        pair.step(&plan(1, vec![chunk(1, 0, vec![1], vec![0], greedy(0)), chunk(2, 0, vec![1], vec![1], greedy(0))]));
        // Sequence 2 finished (or was left out of this step): the node forgets it.
        let d = pair.step(&plan(2, vec![chunk(1, 1, vec![2], vec![0], greedy(1))]));
        assert_eq!(d.dropped, vec![2]);
        assert!(!pair.node.holds(2));
        assert_eq!(pair.node.len(), 1);
        // It comes back: its table travels whole.
        let d = pair.step(&plan(3, vec![chunk(2, 1, vec![5], vec![1], greedy(1))]));
        assert_eq!(d.dropped, vec![1]);
        assert_eq!(d.chunks[0].table, TableChange::Whole(vec![1]));
        assert_eq!(d.chunks[0].sample, Some(SampleDelta { step: 1, params: Some(SamplingParams::greedy()) }));
        // An empty step drops everything.
        let d = pair.step(&plan(4, vec![]));
        assert_eq!(d.dropped, vec![2]);
        assert!(pair.node.is_empty());
    }

    #[test]
    fn a_preempted_sequence_recomputes_from_position_zero_with_its_table_whole() {
        let mut pair = Pair::new();
        pair.step(&plan(1, vec![chunk(1, 0, vec![1, 2, 3, 4, 5], vec![3, 4], greedy(0))]));
        pair.step(&plan(2, vec![chunk(1, 5, vec![6], vec![3, 4], greedy(1))]));
        // Preempted: absent for a step, then recomputed from 0 on other blocks.
        pair.step(&plan(3, vec![]));
        let d = pair.step(&plan(4, vec![chunk(1, 0, vec![1, 2, 3, 4, 5, 6], vec![6, 1], greedy(1))]));
        assert_eq!(d.chunks[0].table, TableChange::Whole(vec![6, 1]));
        // Recomputed from 0 on the same blocks, in consecutive steps: the chunk does not continue
        // where the KV ended, so it is whole too.
        let d = pair.step(&plan(5, vec![chunk(1, 0, vec![1, 2, 3, 4, 5, 6, 7], vec![6, 1], greedy(2))]));
        assert_eq!(d.chunks[0].table, TableChange::Whole(vec![6, 1]));
        // A chunk whose table is not an extension of the held one is whole as well.
        let d = pair.step(&plan(6, vec![chunk(1, 7, vec![8], vec![2, 1], greedy(3))]));
        assert_eq!(d.chunks[0].table, TableChange::Whole(vec![2, 1]));
    }

    #[test]
    fn a_node_that_joins_mid_stream_is_brought_up_to_date_by_a_snapshot() {
        let mut pair = Pair::new();
        pair.step(&plan(1, vec![chunk(1, 0, vec![1, 2], vec![0], greedy(0))]));
        let p2 = plan(2, vec![chunk(1, 2, vec![3], vec![0], greedy(1))]);
        let delta = pair.mirror.delta(&p2);
        // A fresh node cannot use a delta...
        let mut late = SessionState::new();
        let err = late.apply(&delta).unwrap_err();
        assert_eq!(err, SessionError::NoSession { step_id: 2, base: 1 });
        assert!(err.to_string().contains("full snapshot"));
        // ...and gets the same step whole, which gives it the same state as the others.
        assert_eq!(late.apply(&SessionState::snapshot(&p2)).unwrap(), p2);
        assert_eq!(pair.node.apply(&delta).unwrap(), p2);
        assert_eq!(late, pair.node);
        assert_eq!(late, pair.mirror.state);
        // Both continue on deltas.
        let p3 = plan(3, vec![chunk(1, 3, vec![4], vec![0], greedy(2))]);
        let d3 = pair.mirror.delta(&p3);
        assert_eq!(late.apply(&d3).unwrap(), p3);
        assert_eq!(pair.node.apply(&d3).unwrap(), p3);
    }

    #[test]
    fn a_reformed_group_starts_with_a_full_snapshot() {
        let mut pair = Pair::new();
        pair.step(&plan(1, vec![chunk(1, 0, vec![1, 2], vec![0], greedy(0))]));
        pair.step(&plan(2, vec![chunk(1, 2, vec![3], vec![0], greedy(1))]));
        // The group re-forms: a new mirror and fresh nodes. The migrated request continues on them.
        let mut reformed = Pair::new();
        let d = reformed.step(&plan(3, vec![chunk(1, 0, vec![1, 2, 3], vec![4], greedy(1))]));
        assert!(d.is_snapshot());
        // And a mirror that was reset after a failed step does the same.
        pair.mirror.reset();
        let p = plan(3, vec![chunk(1, 3, vec![4], vec![0], greedy(2))]);
        let d = pair.mirror.delta(&p);
        assert!(d.is_snapshot());
        assert_eq!(pair.node.apply(&d).unwrap(), p);
    }

    #[test]
    fn out_of_order_and_duplicate_steps_are_rejected_and_clear_the_session() {
        let mut mirror = SessionMirror::new();
        let p1 = plan(1, vec![chunk(1, 0, vec![1], vec![0], greedy(0))]);
        let p2 = plan(2, vec![chunk(1, 1, vec![2], vec![0], greedy(1))]);
        let p3 = plan(3, vec![chunk(1, 2, vec![3], vec![0], greedy(2))]);
        let (d1, d2, d3) = (mirror.delta(&p1), mirror.delta(&p2), mirror.delta(&p3));

        let mut node = SessionState::new();
        node.apply(&d1).unwrap();
        // Step 2 lost: step 3 does not build on step 1.
        assert_eq!(node.apply(&d3).unwrap_err(), SessionError::WrongBase { step_id: 3, base: 2, last: 1 });
        assert_eq!(node.last_step(), None, "a failed apply clears the session");
        assert_eq!(node.apply(&d2).unwrap_err().error_type(), "no_session");

        let mut node = SessionState::new();
        node.apply(&d1).unwrap();
        node.apply(&d2).unwrap();
        // The same delta twice.
        assert_eq!(node.apply(&d2).unwrap_err(), SessionError::WrongBase { step_id: 2, base: 1, last: 2 });

        // A snapshot must move forward too.
        let mut node = SessionState::new();
        node.apply(&SessionState::snapshot(&p2)).unwrap();
        assert_eq!(
            node.apply(&SessionState::snapshot(&p1)).unwrap_err(),
            SessionError::StepNotAfter { step_id: 1, last: 2 }
        );
        // A delta whose step id does not advance.
        let mut node = SessionState::new();
        node.apply(&d1).unwrap();
        let stale = PlanDelta { step_id: 1, base_step: Some(1), dropped: vec![], chunks: vec![] };
        assert_eq!(node.apply(&stale).unwrap_err().error_type(), "step_not_after");
    }

    #[test]
    fn deltas_that_do_not_fit_the_state_are_clear_errors() {
        let p1 = plan(1, vec![chunk(1, 0, vec![1, 2], vec![0], None)]);
        let node = || {
            let mut n = SessionState::new();
            n.apply(&SessionState::snapshot(&p1)).unwrap();
            n
        };
        let delta =
            |dropped: Vec<u64>, chunks: Vec<ChunkDelta>| PlanDelta { step_id: 2, base_step: Some(1), dropped, chunks };
        let cont = |seq_id, first_pos, sample| ChunkDelta {
            seq_id,
            tokens: vec![5],
            first_pos,
            table: TableChange::Append(vec![]),
            sample,
        };
        let err = |d: PlanDelta| node().apply(&d).unwrap_err();
        assert_eq!(err(delta(vec![9], vec![])), SessionError::DropUnknown { step_id: 2, seq_id: 9 });
        assert_eq!(err(delta(vec![], vec![cont(9, 0, None)])), SessionError::UnknownSequence { step_id: 2, seq_id: 9 });
        assert_eq!(
            err(delta(vec![], vec![cont(1, 3, None)])),
            SessionError::PositionGap { step_id: 2, seq_id: 1, first_pos: 3, end_pos: 2 }
        );
        assert_eq!(
            err(delta(vec![], vec![cont(1, 2, Some(SampleDelta { step: 0, params: None }))])).error_type(),
            "no_sampling_params"
        );
        assert_eq!(err(delta(vec![], vec![cont(1, 2, None), cont(1, 3, None)])).error_type(), "duplicate_sequence");
        // A dropped sequence cannot be continued in the same step.
        assert_eq!(err(delta(vec![1], vec![cont(1, 2, None)])).error_type(), "unknown_sequence");
        // Blocks out of range are the expanded plan's validation's business: the session passes
        // them on and `StepPlan::validate` names them.
        let mut n = node();
        let far = ChunkDelta { table: TableChange::Append(vec![999]), ..cont(1, 2, None) };
        let expanded = n.apply(&delta(vec![], vec![far])).unwrap();
        assert_eq!(expanded.validate(4, 8).unwrap_err().error_type(), "block_out_of_range");
    }

    #[test]
    fn a_plan_with_a_sequence_twice_goes_whole_to_the_nodes_validation() {
        let mut mirror = SessionMirror::new();
        mirror.delta(&plan(1, vec![chunk(1, 0, vec![1], vec![0], None)]));
        let bad = plan(2, vec![chunk(1, 1, vec![2], vec![0], None), chunk(1, 2, vec![3], vec![0], None)]);
        let d = mirror.delta(&bad);
        assert!(d.is_snapshot());
        let mut node = SessionState::new();
        assert_eq!(node.apply(&d).unwrap_err().error_type(), "duplicate_sequence");
    }

    #[test]
    fn errors_have_distinct_stable_types() {
        let all = [
            SessionError::NoSession { step_id: 0, base: 0 },
            SessionError::WrongBase { step_id: 0, base: 0, last: 0 },
            SessionError::StepNotAfter { step_id: 0, last: 0 },
            SessionError::DropUnknown { step_id: 0, seq_id: 0 },
            SessionError::UnknownSequence { step_id: 0, seq_id: 0 },
            SessionError::PositionGap { step_id: 0, seq_id: 0, first_pos: 0, end_pos: 0 },
            SessionError::NoSamplingParams { step_id: 0, seq_id: 0 },
            SessionError::DuplicateSequence { step_id: 0, seq_id: 0 },
        ];
        let types: std::collections::HashSet<_> = all.iter().map(SessionError::error_type).collect();
        assert_eq!(types.len(), all.len());
    }

    /// The bytes a batch-8 decode step puts on the wire, full plan against delta (recorded in
    /// docs/BENCHMARKS.md §3): 8 sequences 160 positions in, block size 16, a few thousand blocks.
    #[test]
    fn a_batch_8_decode_delta_is_a_fraction_of_the_full_plan() {
        let seqs = 8u64;
        let table = |s: u64| (0..10).map(|b| 1000 + (s as u32) * 37 + b * 211).collect::<Vec<u32>>();
        let prefill =
            plan(1, (0..seqs).map(|s| chunk(s, 0, vec![1; 128], table(s)[..8].to_vec(), greedy(0))).collect());
        let mut mirror = SessionMirror::new();
        mirror.delta(&prefill);
        let mut last = (0..seqs).map(|s| (s, 128u32)).collect::<Vec<_>>();
        let mut sizes = None;
        for step in 2..34u64 {
            let p = plan(
                step,
                last.iter()
                    .map(|&(s, pos)| {
                        chunk(s, pos, vec![151_000], table(s)[..(pos as usize / 16 + 1)].to_vec(), greedy(step - 1))
                    })
                    .collect(),
            );
            let delta = mirror.delta(&p);
            let full = postcard::to_allocvec(&SessionState::snapshot(&p)).unwrap().len();
            let plan_bytes = postcard::to_allocvec(&p).unwrap().len();
            let delta_bytes = postcard::to_allocvec(&delta).unwrap().len();
            if step == 33 {
                sizes = Some((plan_bytes, full, delta_bytes));
            }
            for entry in &mut last {
                entry.1 += 1;
            }
        }
        let (plan_bytes, full, delta_bytes) = sizes.unwrap();
        println!(
            "batch-8 decode step at position 160: full plan {plan_bytes} B, snapshot {full} B, delta {delta_bytes} B"
        );
        assert!(delta_bytes * 3 < plan_bytes, "delta {delta_bytes} B vs plan {plan_bytes} B");
    }
}
