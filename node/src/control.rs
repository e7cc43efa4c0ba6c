//! The node's side of the control protocol, sans-IO: what to do with each message from the
//! coordinator, each finished preparation and each finished step.
//!
//! ```text
//!            Assign                     prepared: Ready
//!   Idle ─────────────▶ Preparing(g) ───────────────────▶ Serving(g) ◀─▶ Step / StepDone|StepFailed|StepRejected
//!    ▲ ▲                    │   │ prepare failed:                 │
//!    │ └──── Release ───────┘   └─▶ Refused, exit                 │
//!    └─────── Release, or the model thread panicked (StepFailed "panic: …") ─┘
//!
//! in every state: Heartbeat → HeartbeatAck · Shutdown → exit 0 · Refused → exit with its reason
//! ```
//!
//! [`NodeControl`] owns no sockets, threads or models. The I/O layer (`server`) feeds it what
//! arrived and carries out the [`ControlAction`]s it drains, in order: send a message, start or
//! drop a preparation, hand a step to the model thread, exit. Every assignment gets a new
//! [`Generation`]; preparations and step answers carry the generation they belong to, so whatever
//! finishes after its assignment was released is dropped here instead of reaching the coordinator
//! as an answer to a question it no longer asks.
//!
//! Heartbeats are answered in every state, loading included: the coordinator declares a node
//! silent for a few seconds dead, and loading a shard takes longer than that. That is why a
//! preparation is an action the I/O layer runs off the control task rather than a call here.
//!
//! A `Release` while nothing is assigned is a no-op (the coordinator releases every member of a
//! failed group, the one that already released itself after a panic included), and an `Assign`
//! while something is assigned releases it first: either way the node ends up holding exactly
//! the assignment the coordinator last sent. `Release` names no group, so this holds only if the
//! coordinator's messages to a node arrive in the order it decided them.

use std::collections::VecDeque;

use lockstep_kernels::ShardSample;
use lockstep_proto::session::PlanDelta;
use lockstep_proto::wire::{Assignment, Message, RefuseCode};

/// One assignment's lifetime on this node, counted from 1.
pub type Generation = u64;

/// What the I/O layer must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlAction {
    /// Send this message to the coordinator.
    Send(Message),
    /// Load `assignment` (shard, fingerprint, ring, model) off the control task, once everything
    /// an earlier generation held has been let go, and report with [`NodeControl::prepared`].
    Prepare { generation: Generation, assignment: Box<Assignment> },
    /// Drop everything of `generation`: stop its preparation or its model thread, close its ring
    /// connections, free its model. Nothing of it is reported any more.
    Release { generation: Generation, reason: String },
    /// Hand `plan` to `generation`'s model thread, which expands it against its session; its
    /// answer comes back through [`NodeControl::step_finished`].
    RunStep { generation: Generation, plan: PlanDelta },
    /// End the process (after releasing whatever is held).
    Exit(ControlExit),
}

/// Why the node stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlExit {
    /// The coordinator said `Shutdown`: a clean exit.
    Shutdown,
    /// The coordinator refused this node.
    RefusedByCoordinator { code: RefuseCode, message: String },
    /// This node refused its assignment (it has sent `Refused`).
    AssignmentRefused(String),
    /// The coordinator sent something the protocol does not allow here.
    Protocol(String),
}

/// The outcome of a preparation that worked: what `Ready` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyReport {
    pub rank: u32,
    pub fingerprint: String,
    pub weights_hash: String,
}

/// Why a preparation failed: sent to the coordinator as `Refused`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefuseCode,
    pub message: String,
}

/// How a step ended on the model thread.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Done {
        step_id: u64,
        samples: Vec<(u64, ShardSample)>,
    },
    Failed {
        step_id: u64,
        message: String,
    },
    /// The plan did not fit the model thread's session; nothing ran. The coordinator resends the
    /// step as a full snapshot.
    Rejected {
        step_id: u64,
        message: String,
    },
    /// The forward pass panicked: the model's state is suspect, so the assignment is dropped.
    Panicked {
        step_id: u64,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Preparing(Generation),
    Serving(Generation),
    Exited,
}

/// The control state machine of one node connection.
#[derive(Debug)]
pub struct NodeControl {
    node: String,
    phase: Phase,
    last_generation: Generation,
    actions: VecDeque<ControlAction>,
}

impl NodeControl {
    /// A node called `node` that has been welcomed and holds nothing.
    pub fn new(node: impl Into<String>) -> Self {
        NodeControl { node: node.into(), phase: Phase::Idle, last_generation: 0, actions: VecDeque::new() }
    }

    /// The generation being prepared or served, if any.
    pub fn current(&self) -> Option<Generation> {
        match self.phase {
            Phase::Preparing(g) | Phase::Serving(g) => Some(g),
            Phase::Idle | Phase::Exited => None,
        }
    }

    /// Whether an `Exit` has been issued; nothing happens after it.
    pub fn has_exited(&self) -> bool {
        self.phase == Phase::Exited
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<ControlAction> {
        self.actions.pop_front()
    }

    /// A message from the coordinator.
    pub fn message(&mut self, message: Message) {
        if self.has_exited() {
            return;
        }
        match message {
            Message::Heartbeat { seq, sent_unix_ns } => {
                self.actions.push_back(ControlAction::Send(Message::HeartbeatAck { seq, sent_unix_ns }))
            }
            // Only the first is expected, but a repeated welcome changes nothing.
            Message::Welcome { .. } => {}
            Message::Assign(assignment) => {
                self.release_current(format!("replaced by an assignment to group {}", assignment.group));
                self.last_generation += 1;
                let generation = self.last_generation;
                self.phase = Phase::Preparing(generation);
                self.actions.push_back(ControlAction::Prepare { generation, assignment: Box::new(assignment) });
            }
            Message::Release { reason } => self.release_current(reason),
            Message::Step(plan) => match self.phase {
                Phase::Serving(generation) => self.actions.push_back(ControlAction::RunStep { generation, plan }),
                // The coordinator cannot know yet that a panic released this node; answering keeps
                // it from waiting for a step nobody runs.
                _ => self.actions.push_back(ControlAction::Send(Message::StepFailed {
                    step_id: plan.step_id,
                    message: format!("node {} holds no ready assignment", self.node),
                })),
            },
            Message::Shutdown => self.exit(ControlExit::Shutdown),
            Message::Refused { code, message } => self.exit(ControlExit::RefusedByCoordinator { code, message }),
            other => self.exit(ControlExit::Protocol(format!("unexpected {} from the coordinator", other.name()))),
        }
    }

    /// The preparation of `generation` finished.
    pub fn prepared(&mut self, generation: Generation, result: Result<ReadyReport, Refusal>) {
        if self.phase != Phase::Preparing(generation) {
            // Released (or exited) while it was loading: the I/O layer has already let it go.
            return;
        }
        match result {
            Ok(r) => {
                self.phase = Phase::Serving(generation);
                self.actions.push_back(ControlAction::Send(Message::Ready {
                    rank: r.rank,
                    fingerprint: r.fingerprint,
                    weights_hash: r.weights_hash,
                }));
            }
            Err(Refusal { code, message }) => {
                self.actions.push_back(ControlAction::Send(Message::Refused { code, message: message.clone() }));
                self.exit(ControlExit::AssignmentRefused(message));
            }
        }
    }

    /// A step of `generation` finished on the model thread.
    pub fn step_finished(&mut self, generation: Generation, outcome: StepOutcome) {
        if self.phase != Phase::Serving(generation) {
            // An answer for a released assignment: the coordinator has moved on.
            return;
        }
        let message = match outcome {
            StepOutcome::Done { step_id, samples } => Message::StepDone { step_id, samples },
            StepOutcome::Failed { step_id, message } => Message::StepFailed { step_id, message },
            StepOutcome::Rejected { step_id, message } => Message::StepRejected { step_id, message },
            StepOutcome::Panicked { step_id, message } => {
                self.actions.push_back(ControlAction::Send(Message::StepFailed {
                    step_id,
                    message: format!("panic: {message}"),
                }));
                self.release_current(format!("the model thread panicked in step {step_id}: {message}"));
                return;
            }
        };
        self.actions.push_back(ControlAction::Send(message));
    }

    fn release_current(&mut self, reason: String) {
        if let Some(generation) = self.current() {
            self.actions.push_back(ControlAction::Release { generation, reason });
            self.phase = Phase::Idle;
        }
    }

    fn exit(&mut self, why: ControlExit) {
        self.release_current("the node is exiting".into());
        self.phase = Phase::Exited;
        self.actions.push_back(ControlAction::Exit(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::{KernelMode, LsePartial};

    fn assignment(group: u32, rank: u32) -> Assignment {
        Assignment {
            group,
            rank,
            tp: 2,
            model_dir: "/m".into(),
            reduce_segments: 4,
            kv_chunk: 64,
            kernel_mode: KernelMode::Fast,
            block_size: 16,
            num_blocks: 8,
            max_context: 128,
            expected_fingerprint: "fp".into(),
            ring_next: "127.0.0.1:1".into(),
            ring_prev_node: "other".into(),
        }
    }

    fn plan(step_id: u64) -> PlanDelta {
        PlanDelta { step_id, base_step: None, dropped: vec![], chunks: vec![] }
    }

    fn ready(rank: u32) -> ReadyReport {
        ReadyReport { rank, fingerprint: "fp".into(), weights_hash: "w".into() }
    }

    fn drain(c: &mut NodeControl) -> Vec<ControlAction> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn sample() -> ShardSample {
        ShardSample { lse: LsePartial { max: 1.0, sum: 2.0 }, lse_scaled: None, best: None, candidates: vec![] }
    }

    /// Assign and prepare generation `g` successfully; returns its generation.
    fn serve(c: &mut NodeControl, group: u32, rank: u32) -> Generation {
        c.message(Message::Assign(assignment(group, rank)));
        let g = c.current().expect("preparing");
        c.prepared(g, Ok(ready(rank)));
        drain(c);
        g
    }

    #[test]
    fn heartbeats_are_answered_while_preparing() {
        let mut c = NodeControl::new("n");
        c.message(Message::Assign(assignment(1, 0)));
        c.message(Message::Heartbeat { seq: 4, sent_unix_ns: 9 });
        assert_eq!(
            drain(&mut c),
            vec![
                ControlAction::Prepare { generation: 1, assignment: Box::new(assignment(1, 0)) },
                ControlAction::Send(Message::HeartbeatAck { seq: 4, sent_unix_ns: 9 }),
            ]
        );
        c.prepared(1, Ok(ready(0)));
        assert_eq!(
            drain(&mut c),
            vec![ControlAction::Send(Message::Ready { rank: 0, fingerprint: "fp".into(), weights_hash: "w".into() })]
        );
    }

    #[test]
    fn release_returns_to_idle_and_the_next_assign_is_a_new_generation() {
        let mut c = NodeControl::new("n");
        let g1 = serve(&mut c, 1, 0);
        c.message(Message::Step(plan(5)));
        assert_eq!(drain(&mut c), vec![ControlAction::RunStep { generation: g1, plan: plan(5) }]);
        c.message(Message::Release { reason: "group 1 stopped".into() });
        assert_eq!(drain(&mut c), vec![ControlAction::Release { generation: g1, reason: "group 1 stopped".into() }]);
        assert_eq!(c.current(), None);
        // The answer of the step that was running when the release came is not sent.
        c.step_finished(g1, StepOutcome::Done { step_id: 5, samples: vec![] });
        assert_eq!(drain(&mut c), vec![]);
        // A second release is harmless.
        c.message(Message::Release { reason: "again".into() });
        assert_eq!(drain(&mut c), vec![]);
        let g2 = serve(&mut c, 2, 1);
        assert!(g2 > g1);
        c.message(Message::Step(plan(6)));
        assert_eq!(drain(&mut c), vec![ControlAction::RunStep { generation: g2, plan: plan(6) }]);
        c.step_finished(g2, StepOutcome::Done { step_id: 6, samples: vec![(3, sample())] });
        assert_eq!(
            drain(&mut c),
            vec![ControlAction::Send(Message::StepDone { step_id: 6, samples: vec![(3, sample())] })]
        );
    }

    #[test]
    fn release_while_preparing_drops_the_preparation_and_its_late_result() {
        let mut c = NodeControl::new("n");
        c.message(Message::Assign(assignment(1, 0)));
        drain(&mut c);
        c.message(Message::Release { reason: "member lost".into() });
        assert_eq!(drain(&mut c), vec![ControlAction::Release { generation: 1, reason: "member lost".into() }]);
        c.prepared(1, Ok(ready(0)));
        c.prepared(1, Err(Refusal { code: RefuseCode::BadRequest, message: "late".into() }));
        assert_eq!(drain(&mut c), vec![], "a released preparation reports nothing");
        assert!(!c.has_exited());
    }

    #[test]
    fn an_assign_while_serving_releases_first() {
        let mut c = NodeControl::new("n");
        let g1 = serve(&mut c, 1, 0);
        c.message(Message::Assign(assignment(2, 1)));
        let actions = drain(&mut c);
        assert!(matches!(&actions[0], ControlAction::Release { generation, .. } if *generation == g1));
        assert!(matches!(&actions[1], ControlAction::Prepare { generation, .. } if *generation == g1 + 1));
        assert_eq!(actions.len(), 2);
    }

    #[test]
    fn a_rejected_plan_is_answered_and_the_assignment_kept() {
        let mut c = NodeControl::new("n");
        let g = serve(&mut c, 1, 0);
        c.step_finished(g, StepOutcome::Rejected { step_id: 4, message: "step 4 builds on step 2".into() });
        assert_eq!(
            drain(&mut c),
            vec![ControlAction::Send(Message::StepRejected { step_id: 4, message: "step 4 builds on step 2".into() })]
        );
        assert_eq!(c.current(), Some(g), "a rejected delta is resent whole, the node keeps serving");
    }

    #[test]
    fn a_panic_reports_the_step_failed_and_releases() {
        let mut c = NodeControl::new("n");
        let g = serve(&mut c, 1, 0);
        c.step_finished(g, StepOutcome::Panicked { step_id: 8, message: "index out of bounds".into() });
        let actions = drain(&mut c);
        assert_eq!(
            actions[0],
            ControlAction::Send(Message::StepFailed { step_id: 8, message: "panic: index out of bounds".into() })
        );
        assert!(
            matches!(&actions[1], ControlAction::Release { generation, reason } if *generation == g && reason.contains("panicked"))
        );
        assert_eq!(c.current(), None);
        // A step that was already on its way is answered rather than left hanging.
        c.message(Message::Step(plan(9)));
        let actions = drain(&mut c);
        assert!(
            matches!(&actions[..], [ControlAction::Send(Message::StepFailed { step_id: 9, message })] if message.contains("no ready assignment"))
        );
        // The coordinator's release of the failed group finds nothing to drop.
        c.message(Message::Release { reason: "group 1 stopped".into() });
        assert_eq!(drain(&mut c), vec![]);
        assert_eq!(serve(&mut c, 2, 0), g + 1);
    }

    #[test]
    fn a_failed_preparation_is_refused_and_ends_the_node() {
        let mut c = NodeControl::new("n");
        c.message(Message::Assign(assignment(1, 0)));
        drain(&mut c);
        c.prepared(1, Err(Refusal { code: RefuseCode::Fingerprint, message: "other weights".into() }));
        assert_eq!(
            drain(&mut c),
            vec![
                ControlAction::Send(Message::Refused {
                    code: RefuseCode::Fingerprint,
                    message: "other weights".into()
                }),
                ControlAction::Release { generation: 1, reason: "the node is exiting".into() },
                ControlAction::Exit(ControlExit::AssignmentRefused("other weights".into())),
            ]
        );
        assert!(c.has_exited());
        c.message(Message::Heartbeat { seq: 1, sent_unix_ns: 1 });
        assert_eq!(drain(&mut c), vec![], "nothing after the exit");
    }

    #[test]
    fn shutdown_refused_and_unexpected_messages_exit() {
        let mut c = NodeControl::new("n");
        let g = serve(&mut c, 1, 0);
        c.message(Message::Shutdown);
        assert_eq!(
            drain(&mut c),
            vec![
                ControlAction::Release { generation: g, reason: "the node is exiting".into() },
                ControlAction::Exit(ControlExit::Shutdown),
            ]
        );
        let mut c = NodeControl::new("n");
        c.message(Message::Refused { code: RefuseCode::Busy, message: "full".into() });
        assert_eq!(
            drain(&mut c),
            vec![ControlAction::Exit(ControlExit::RefusedByCoordinator {
                code: RefuseCode::Busy,
                message: "full".into()
            })]
        );
        let mut c = NodeControl::new("n");
        c.message(Message::StepDone { step_id: 1, samples: vec![] });
        assert!(
            matches!(&drain(&mut c)[..], [ControlAction::Exit(ControlExit::Protocol(m))] if m.contains("StepDone"))
        );
    }
}
