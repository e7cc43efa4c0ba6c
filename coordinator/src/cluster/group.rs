//! A serving tensor-parallel group as the engine sees it: the [`GroupExecutor`] sends each step
//! to every rank, collects their sampling reports from the group's inbox (fed straight by the
//! members' connections), merges them in rank order, and fails the step — naming the node — when
//! the group was stopped, a member failed the step, or a member did not answer in time.
//!
//! Steps travel as deltas against the group's [`SessionMirror`] (`lockstep_proto::session`): the
//! executor is created with each formation, so the first step a group sees is a full snapshot. The
//! delta is encoded once and the same bytes are written to every rank concurrently. A rank that
//! rejects a delta gets the same step again as a full snapshot (once; the other ranks wait for it
//! in the step's first all-reduce), and after any failed step the mirror is forgotten, so whatever
//! runs next starts from a snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_kernels::{merge_shard_samples, ShardSample};
use lockstep_proto::session::{SessionMirror, SessionState};
use lockstep_proto::step::{StepPlan, StepResult};
use lockstep_proto::wire::{self, Frame, Message};
use lockstep_transport::ConnSender;
use tokio::sync::mpsc;

use super::{Input, STEP_POLL};
use crate::engine::{ExecError, StepExecutor};
use crate::membership::{GroupId, SessionId};

/// A step answer or failure of one member, routed straight from its connection to the group's
/// executor (the hot path never goes through the driver).
pub(super) enum StepEvent {
    Done {
        step_id: u64,
        samples: Vec<(u64, ShardSample)>,
    },
    Failed {
        step_id: u64,
        message: String,
    },
    /// The step's delta did not fit the member's session; nothing ran there.
    Rejected {
        step_id: u64,
        message: String,
    },
}

pub(super) struct Member {
    pub(super) session: SessionId,
    pub(super) name: String,
    pub(super) rank: usize,
    pub(super) conn: ConnSender,
}

/// Where a serving member's step answers go: its group's inbox, tagged with its rank.
pub(super) type StepSink = Arc<Mutex<Option<(usize, std_mpsc::Sender<(usize, StepEvent)>)>>>;

/// One serving tensor-parallel group.
pub struct Group {
    pub id: GroupId,
    pub(super) members: Vec<Member>,
    /// Every member's step answers, tagged with the member's rank.
    pub(super) inbox: Mutex<std_mpsc::Receiver<(usize, StepEvent)>>,
    pub(super) down: AtomicBool,
    pub(super) down_reason: Mutex<Option<String>>,
    /// Back to the driver, to report a step time-out or failure.
    pub(super) inputs: mpsc::UnboundedSender<Input>,
}

impl Group {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
    pub fn down_reason(&self) -> Option<String> {
        self.down_reason.lock().expect("lock").clone()
    }
    pub(super) fn mark_down(&self, reason: String) {
        let mut r = self.down_reason.lock().expect("lock");
        if r.is_none() {
            *r = Some(reason);
        }
        self.down.store(true, Ordering::SeqCst);
    }
    pub fn member_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }
}

/// Runs one step on every rank of a group and merges their sampling reports.
pub struct GroupExecutor {
    group: Arc<Group>,
    rt: tokio::runtime::Handle,
    step_timeout: Duration,
    /// What the group's nodes hold between steps.
    mirror: SessionMirror,
}

impl GroupExecutor {
    pub(super) fn new(group: Arc<Group>, rt: tokio::runtime::Handle, step_timeout: Duration) -> Self {
        GroupExecutor { group, rt, step_timeout, mirror: SessionMirror::new() }
    }

    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    /// Stops the group because the member of `rank` `what` (a failed or refused step).
    fn member_failed(&self, rank: usize, what: &str) -> ExecError {
        let m = &self.group.members[rank];
        let why = format!("node {} (rank {}) {what}", m.name, m.rank);
        let _ =
            self.group.inputs.send(Input::StepFailed { group: self.group.id, session: m.session, reason: why.clone() });
        self.group.mark_down(why);
        self.down()
    }

    /// Encodes `message` once and writes the same bytes to the members of `ranks`, all at once.
    fn send_to(&self, ranks: &[usize], message: Message) -> Result<(), ExecError> {
        let bytes: Arc<[u8]> = wire::encode(&Frame::Control(message))
            .map_err(|e| ExecError::Other(format!("cannot encode the step for group {}: {e}", self.group.id)))?
            .into();
        self.rt.block_on(async {
            let sends: Vec<_> = ranks
                .iter()
                .map(|&rank| {
                    let (conn, bytes) = (self.group.members[rank].conn.clone(), bytes.clone());
                    tokio::spawn(async move { conn.send_encoded(&bytes).await })
                })
                .collect();
            for send in sends {
                // A failed send shows up as the member's lost connection, which stops the group.
                let _ = send.await;
            }
        });
        Ok(())
    }

    fn down(&self) -> ExecError {
        let why = self.group.down_reason().unwrap_or_else(|| "stopped".into());
        ExecError::Other(format!("group {} stopped serving: {why}", self.group.id))
    }
}

impl StepExecutor for GroupExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError> {
        let result = self.run_step(plan);
        if result.is_err() {
            // Whether the nodes ran the step is unknown: the next one goes whole.
            self.mirror.reset();
        }
        result
    }
}

impl GroupExecutor {
    fn run_step(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError> {
        if self.group.is_down() {
            return Err(self.down());
        }
        let all_ranks: Vec<usize> = (0..self.group.members.len()).collect();
        let delta = self.mirror.delta(plan);
        self.send_to(&all_ranks, Message::Step(delta))?;
        let mut resent = vec![false; self.group.members.len()];
        let deadline = Instant::now() + self.step_timeout;
        let mut per_rank: Vec<Option<Vec<(u64, ShardSample)>>> = vec![None; self.group.members.len()];
        while per_rank.iter().any(Option::is_none) {
            if self.group.is_down() {
                return Err(self.down());
            }
            if Instant::now() > deadline {
                let silent: Vec<&Member> =
                    self.group.members.iter().zip(&per_rank).filter(|(_, a)| a.is_none()).map(|(m, _)| m).collect();
                let names: Vec<String> = silent.iter().map(|m| format!("{} (rank {})", m.name, m.rank)).collect();
                let reason = format!("did not answer step {} within {:?}", plan.step_id, self.step_timeout);
                let _ = self.group.inputs.send(Input::StepTimedOut {
                    group: self.group.id,
                    silent: silent.iter().map(|m| m.session).collect(),
                    reason: reason.clone(),
                });
                let why = format!("node {} {reason}", names.join(", "));
                self.group.mark_down(why);
                return Err(self.down());
            }
            let got = self.group.inbox.lock().expect("lock").recv_timeout(STEP_POLL);
            match got {
                Ok((rank, StepEvent::Done { step_id, samples })) if step_id == plan.step_id => {
                    per_rank[rank] = Some(samples);
                }
                Ok((rank, StepEvent::Failed { step_id, message })) if step_id == plan.step_id => {
                    return Err(self.member_failed(rank, &format!("failed step {step_id}: {message}")));
                }
                Ok((rank, StepEvent::Rejected { step_id, message })) if step_id == plan.step_id && !resent[rank] => {
                    let m = &self.group.members[rank];
                    tracing::warn!(
                        "node {} (rank {}) rejected step {step_id} ({message}): sending it as a full snapshot",
                        m.name,
                        m.rank
                    );
                    resent[rank] = true;
                    self.send_to(&[rank], Message::Step(SessionState::snapshot(plan)))?;
                }
                Ok((rank, StepEvent::Rejected { step_id, message })) if step_id == plan.step_id => {
                    let what = format!("rejected the full snapshot of step {step_id}: {message}");
                    return Err(self.member_failed(rank, &what));
                }
                // A stale answer to an abandoned step, or nothing yet.
                _ => {}
            }
        }
        let per_rank: Vec<Vec<(u64, ShardSample)>> = per_rank.into_iter().map(|a| a.expect("all answered")).collect();
        // Merge in rank order: every rank reports the same sequences in plan order.
        let requests: HashMap<u64, lockstep_kernels::SampleRequest> =
            plan.chunks.iter().filter_map(|c| c.sample.map(|s| (c.seq_id, s))).collect();
        let mut sampled = Vec::with_capacity(per_rank[0].len());
        for (i, (seq_id, _)) in per_rank[0].iter().enumerate() {
            if per_rank.iter().any(|r| r.get(i).map(|x| x.0) != Some(*seq_id)) {
                let why = format!("ranks of group {} disagree on the sampled sequences", self.group.id);
                self.group.mark_down(why);
                return Err(self.down());
            }
            let shards: Vec<&ShardSample> = per_rank.iter().map(|r| &r[i].1).collect();
            let req = requests
                .get(seq_id)
                .ok_or_else(|| ExecError::Other(format!("unplanned sample for sequence {seq_id}")))?;
            sampled.push((*seq_id, merge_shard_samples(&shards, req)));
        }
        Ok(StepResult { step_id: plan.step_id, sampled })
    }
}
