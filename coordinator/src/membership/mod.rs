//! Cluster membership: which nodes are alive, which tensor-parallel groups they form, and when a
//! group must stop serving — as a sans-IO state machine in the style of quinn-proto.
//!
//! [`Membership`] owns no sockets, threads or clocks. The I/O layer (the QUIC registrar, the
//! heartbeat task, the engine threads) feeds it what happened — a node said hello, acknowledged a
//! heartbeat, answered its assignment or a step, lost its connection — each with the current
//! [`Instant`], calls [`Membership::handle_timeout`] when [`Membership::poll_timeout`] comes due,
//! and carries out the [`Action`]s it drains with [`Membership::poll_action`]. Given the same inputs
//! it always produces the same actions, which is what lets the tests (and a randomized property
//! test) drive it on a simulated clock.
//!
//! # Node states
//!
//! ```text
//! hello ─▶ Joining ─first heartbeat ack─▶ Waiting ─Assign─▶ Forming{g,r} ─all Ready─▶ Serving{g,r}
//!                                           ▲                    │                       │
//!                                           └───── Release: the group was dissolved ─────┘
//! any state ─ lost / silent / refused / replaced / did not answer ─▶ Down{reason}
//! ```
//!
//! A node must answer one heartbeat (sent at once on hello) before it is given a rank, so a node
//! that connects and wedges never holds up a group. A `Down` node's session is over for good; the
//! same name comes back with a new hello and a new [`SessionId`]. A hello under the name of a live
//! session ends that session ("replaced by a new session") before the new one starts.
//!
//! # Timeouts
//!
//! * **Node timeout:** a session silent (no heartbeat ack, `Ready` or step answer) for
//!   `node_timeout` is closed, whatever its state — idle, loading its shard or stepping. Nodes
//!   therefore answer heartbeats while they load.
//! * **Step timeout:** a step not answered by every member within `step_timeout` fails its group,
//!   naming exactly the members that have not answered; their sessions are closed (their model
//!   thread is in an unknown state and a late answer must not be mistaken for a new one), the
//!   members that did answer go back to waiting.
//! * **Form timeout:** a member that has not answered its `Assign` within `form_timeout` is closed
//!   and the rest of its forming group go back to waiting.
//!
//! # Groups
//!
//! A group stops serving the moment any member is lost, times out, is replaced, or a step fails
//! ([`Action::GroupFailed`]: the I/O layer stops its engine and migrates its in-flight requests).
//! Its surviving members are released back to `Waiting` (waiting since the release) and formation
//! runs again within the same input, so a hot spare replaces a lost member at once. A group that
//! fails while still forming never served: its survivors are released and no `GroupFailed` is sent.
//!
//! **Formation rule.** After every input, while fewer than `replicas` groups are forming or
//! serving, a new group takes the most preferred degree in `tp_prefs` that the waiting nodes can
//! fill, and its members are the longest-waiting nodes (ties by name); rank is their order. Nodes
//! left over wait as hot spares.
//!
//! **Upgrade rule.** When nodes are still waiting after formation and a serving group, together
//! with them, could re-form at a more preferred degree, that group is dissolved ("re-forming at
//! TP d") and formation runs again. Migration makes this lossless, but re-forming reloads shards,
//! so a group must have served for at least `node_timeout` before it is dissolved for an upgrade:
//! each group is upgraded at most once, and a lineage of groups at most once per `node_timeout`.
//! The least preferred group is upgraded first (ties: the oldest id). Layouts depend on arrival
//! order: with `tp_prefs = [2, 1]` the first node to arrive serves alone at TP 1 until a second one
//! waits and the hold-off has passed; with two replicas, two nodes arriving one at a time serve as
//! two TP 1 groups and stay so, since only *waiting* nodes trigger an upgrade.
//!
//! Every transition is recorded in a bounded event history for the ops API.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod tests;

/// One connection of one node. A node that reconnects under the same name gets a new session.
pub type SessionId = u64;
/// One tensor-parallel group; never reused, so a re-formed group has a new id.
pub type GroupId = u64;

pub const DEFAULT_HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(3000);
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_FORM_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_HISTORY_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Tensor-parallel degrees, most preferred first; only degrees the model can be split into
    /// (the caller filters them with `ShardPlan::new`).
    pub tp_prefs: Vec<usize>,
    /// Most groups serving at once.
    pub replicas: usize,
    pub heartbeat_every: Duration,
    pub node_timeout: Duration,
    pub step_timeout: Duration,
    /// Longest a member may take from `Assign` to `Ready`.
    pub form_timeout: Duration,
    /// Events kept for the ops API.
    pub history_len: usize,
}

impl MembershipConfig {
    /// `tp_prefs` and `replicas` with the default timings.
    pub fn new(tp_prefs: Vec<usize>, replicas: usize) -> Self {
        MembershipConfig {
            tp_prefs,
            replicas,
            heartbeat_every: DEFAULT_HEARTBEAT_EVERY,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            form_timeout: DEFAULT_FORM_TIMEOUT,
            history_len: DEFAULT_HISTORY_LEN,
        }
    }

    pub fn validate(&self) -> Result<(), MembershipConfigError> {
        if self.tp_prefs.is_empty() {
            return Err(MembershipConfigError::NoDegrees);
        }
        for (i, &d) in self.tp_prefs.iter().enumerate() {
            if d == 0 {
                return Err(MembershipConfigError::ZeroDegree);
            }
            if self.tp_prefs[..i].contains(&d) {
                return Err(MembershipConfigError::RepeatedDegree(d));
            }
        }
        if self.replicas == 0 {
            return Err(MembershipConfigError::ZeroReplicas);
        }
        let durations = [
            ("heartbeat_every", self.heartbeat_every),
            ("node_timeout", self.node_timeout),
            ("step_timeout", self.step_timeout),
            ("form_timeout", self.form_timeout),
        ];
        if let Some((field, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(MembershipConfigError::Zero { field });
        }
        if self.history_len == 0 {
            return Err(MembershipConfigError::Zero { field: "history_len" });
        }
        // Otherwise every node would time out between two heartbeats.
        if self.heartbeat_every >= self.node_timeout {
            return Err(MembershipConfigError::HeartbeatNotBelowTimeout {
                heartbeat_every: self.heartbeat_every,
                node_timeout: self.node_timeout,
            });
        }
        Ok(())
    }

    /// Fewest nodes that make a group.
    pub fn min_degree(&self) -> usize {
        self.tp_prefs.iter().copied().min().unwrap_or(1)
    }

    /// The most preferred degree `nodes` nodes can fill, as (place in `tp_prefs`, degree).
    fn best_degree(&self, nodes: usize) -> Option<(usize, usize)> {
        self.tp_prefs.iter().copied().enumerate().find(|&(_, d)| d <= nodes)
    }

    /// Place of `degree` in `tp_prefs` (0 = most preferred).
    fn preference(&self, degree: usize) -> usize {
        self.tp_prefs.iter().position(|&d| d == degree).unwrap_or(usize::MAX)
    }
}

/// A [`MembershipConfig`] the membership cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipConfigError {
    #[error("membership: the list of tensor-parallel degrees is empty")]
    NoDegrees,
    #[error("membership: a tensor-parallel degree must be at least 1")]
    ZeroDegree,
    #[error("membership: tensor-parallel degree {0} is listed twice")]
    RepeatedDegree(usize),
    #[error("membership: replicas must be at least 1")]
    ZeroReplicas,
    #[error("membership: {field} must be positive")]
    Zero { field: &'static str },
    #[error(
        "membership: the heartbeat interval ({} ms) must be shorter than the node timeout ({} ms)",
        heartbeat_every.as_millis(),
        node_timeout.as_millis()
    )]
    HeartbeatNotBelowTimeout { heartbeat_every: Duration, node_timeout: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeState {
    /// Said hello; has not answered its first heartbeat yet.
    Joining,
    /// Alive and unassigned: the next group's candidate, or a hot spare.
    Waiting,
    /// Assigned rank `rank` of `group`, which is not serving yet.
    Forming {
        group: GroupId,
        rank: usize,
    },
    Serving {
        group: GroupId,
        rank: usize,
    },
    /// The session is over; the node must say hello again.
    Down {
        reason: String,
    },
}

impl NodeState {
    pub fn is_live(&self) -> bool {
        !matches!(self, NodeState::Down { .. })
    }

    /// The group and rank of a forming or serving member.
    pub fn group(&self) -> Option<(GroupId, usize)> {
        match *self {
            NodeState::Forming { group, rank } | NodeState::Serving { group, rank } => Some((group, rank)),
            _ => None,
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeState::Joining => f.write_str("joining"),
            NodeState::Waiting => f.write_str("waiting"),
            NodeState::Forming { group, rank } => write!(f, "forming group {group} rank {rank}"),
            NodeState::Serving { group, rank } => write!(f, "in group {group} rank {rank}"),
            NodeState::Down { reason } => write!(f, "down: {reason}"),
        }
    }
}

/// A group member as the I/O layer needs it to assign ranks and build the ring.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupMember {
    pub session: SessionId,
    pub name: String,
    pub ring_addr: String,
}

/// What the I/O layer must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a heartbeat to each session (every `heartbeat_every`, and once at hello).
    SendHeartbeats { sessions: Vec<SessionId> },
    /// Assign every member its rank (its index) in a new group of degree `tp`.
    Assign { group: GroupId, tp: usize, members: Vec<GroupMember> },
    /// Every member is ready: start an engine for the group.
    GroupServing { group: GroupId, members: Vec<GroupMember> },
    /// Stop the group's engine and migrate its in-flight requests to the groups that still serve.
    /// Sent only for groups that were announced with `GroupServing`; `culprits` names the nodes
    /// at fault (none for an upgrade).
    GroupFailed { group: GroupId, reason: String, culprits: Vec<String> },
    /// Tell a live node to drop its assignment and wait; it stays connected.
    Release { session: SessionId, reason: String },
    /// End a session (replaced, silent, did not answer): close its connection.
    Close { session: SessionId, reason: String },
    /// End a session whose node cannot serve (wrong fingerprint, refused its assignment): send
    /// `Refused` and close.
    Refuse { session: SessionId, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupPhase {
    Forming,
    Serving,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub id: GroupId,
    pub tp: usize,
    pub phase: GroupPhase,
    /// When the phase began (assigned, or all members ready).
    pub since: Instant,
    /// In rank order.
    pub members: Vec<GroupMember>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// The live session, or the last one for a node that is down.
    pub session: SessionId,
    pub ring_addr: String,
    pub state: NodeState,
    /// Time since the node was last heard from.
    pub heartbeat_age: Duration,
}

/// One entry of the bounded event history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    pub at: Instant,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    Joined {
        name: String,
        session: SessionId,
    },
    /// A session ended: connection lost, silent, refused, replaced or did not answer.
    Lost {
        name: String,
        session: SessionId,
        reason: String,
    },
    Forming {
        group: GroupId,
        tp: usize,
        members: Vec<String>,
    },
    Serving {
        group: GroupId,
        tp: usize,
        members: Vec<String>,
    },
    /// A serving group stopped.
    Failed {
        group: GroupId,
        reason: String,
        culprits: Vec<String>,
    },
    /// A forming group gave up before it served.
    Abandoned {
        group: GroupId,
        reason: String,
    },
    /// The I/O layer moved a failed group's in-flight requests elsewhere.
    Migrated {
        group: GroupId,
        requests: usize,
    },
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKind::Joined { name, session } => write!(f, "{name} joined (session {session})"),
            EventKind::Lost { name, session, reason } => write!(f, "{name} (session {session}) lost: {reason}"),
            EventKind::Forming { group, tp, members } => {
                write!(f, "group {group} forming at TP {tp}: {}", members.join(", "))
            }
            EventKind::Serving { group, tp, members } => {
                write!(f, "group {group} serving at TP {tp}: {}", members.join(", "))
            }
            EventKind::Failed { group, reason, .. } => write!(f, "group {group} failed: {reason}"),
            EventKind::Abandoned { group, reason } => write!(f, "group {group} did not form: {reason}"),
            EventKind::Migrated { group, requests } => {
                write!(f, "{requests} request(s) migrated away from group {group}")
            }
        }
    }
}

struct Node {
    session: SessionId,
    ring_addr: String,
    state: NodeState,
    last_heard: Instant,
    /// Orders the waiting nodes for formation (longest waiting first).
    waiting_since: Instant,
}

enum Phase {
    Forming { assigned_at: Instant, ready: BTreeSet<SessionId> },
    Serving { since: Instant, step: Option<StepInFlight> },
}

/// The group's engine runs one step at a time; a new `step_started` supersedes an older step.
struct StepInFlight {
    step_id: u64,
    started: Instant,
    answered: BTreeSet<SessionId>,
}

struct Group {
    tp: usize,
    /// In rank order.
    members: Vec<SessionId>,
    phase: Phase,
}

/// How the I/O layer learns that a session ended.
#[derive(Clone, Copy)]
enum Farewell {
    /// The connection is already gone.
    Silent,
    Close,
    Refuse,
}

/// The membership state machine; see the module documentation.
pub struct Membership {
    cfg: MembershipConfig,
    /// Every node ever seen, by name: its live session, or the last one if it is down.
    nodes: BTreeMap<String, Node>,
    /// Live sessions and their node's name.
    live: BTreeMap<SessionId, String>,
    groups: BTreeMap<GroupId, Group>,
    next_session: SessionId,
    next_group: GroupId,
    next_heartbeat: Instant,
    actions: VecDeque<Action>,
    events: VecDeque<ClusterEvent>,
    last_failure: Option<String>,
}

impl Membership {
    pub fn new(cfg: MembershipConfig, now: Instant) -> Result<Self, MembershipConfigError> {
        cfg.validate()?;
        Ok(Membership {
            next_heartbeat: now + cfg.heartbeat_every,
            cfg,
            nodes: BTreeMap::new(),
            live: BTreeMap::new(),
            groups: BTreeMap::new(),
            next_session: 1,
            next_group: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            last_failure: None,
        })
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    // ------------------------------------------------------------------------------- inputs

    /// A node passed the handshake (protocol version, certificate name). Returns its new session.
    /// A live session under the same name is ended first ("replaced by a new session").
    pub fn node_hello(&mut self, now: Instant, name: &str, ring_addr: String) -> SessionId {
        if let Some(old) = self.nodes.get(name).filter(|n| n.state.is_live()).map(|n| n.session) {
            self.end_sessions(now, vec![(old, "replaced by a new session".into())], Farewell::Close);
        }
        let session = self.next_session;
        self.next_session += 1;
        self.nodes.insert(
            name.to_string(),
            Node { session, ring_addr, state: NodeState::Joining, last_heard: now, waiting_since: now },
        );
        self.live.insert(session, name.to_string());
        self.record(now, EventKind::Joined { name: name.to_string(), session });
        // The probe: the node waits once it has answered.
        self.actions.push_back(Action::SendHeartbeats { sessions: vec![session] });
        self.settle(now);
        session
    }

    pub fn heartbeat_ack(&mut self, now: Instant, session: SessionId) {
        let Some(node) = self.live_node_mut(session) else { return };
        node.last_heard = now;
        if node.state == NodeState::Joining {
            node.state = NodeState::Waiting;
            node.waiting_since = now;
            self.settle(now);
        }
    }

    /// A member's answer to its `Assign`: `Ok` when it is ready with the expected fingerprint,
    /// `Err(why)` when it refused or reported another fingerprint — it is then refused and removed,
    /// and the rest of its group go back to waiting.
    pub fn node_ready(&mut self, now: Instant, session: SessionId, group: GroupId, verdict: Result<(), String>) {
        let Some(node) = self.live_node_mut(session) else { return };
        if !matches!(node.state, NodeState::Forming { group: g, .. } if g == group) {
            return;
        }
        node.last_heard = now;
        match verdict {
            Err(why) => self.end_sessions(now, vec![(session, format!("refused: {why}"))], Farewell::Refuse),
            Ok(()) => {
                let g = self.groups.get_mut(&group).expect("a forming member's group exists");
                let Phase::Forming { ready, .. } = &mut g.phase else { return };
                ready.insert(session);
                if ready.len() == g.members.len() {
                    g.phase = Phase::Serving { since: now, step: None };
                    let (tp, sessions) = (g.tp, g.members.clone());
                    for (rank, s) in sessions.iter().enumerate() {
                        self.node_by_session_mut(*s).state = NodeState::Serving { group, rank };
                    }
                    let members = self.members(&sessions);
                    let names = members.iter().map(|m| m.name.clone()).collect();
                    self.actions.push_back(Action::GroupServing { group, members });
                    self.record(now, EventKind::Serving { group, tp, members: names });
                }
            }
        }
        self.settle(now);
    }

    pub fn connection_lost(&mut self, now: Instant, session: SessionId, reason: String) {
        self.end_sessions(now, vec![(session, format!("connection lost: {reason}"))], Farewell::Silent);
        self.settle(now);
    }

    /// The group's engine sent step `step_id` to every member.
    pub fn step_started(&mut self, now: Instant, group: GroupId, step_id: u64) {
        if let Some(Group { phase: Phase::Serving { step, .. }, .. }) = self.groups.get_mut(&group) {
            *step = Some(StepInFlight { step_id, started: now, answered: BTreeSet::new() });
        }
    }

    /// `session` answered step `step_id` (done or not: a failure also comes to
    /// [`Membership::step_failed`]).
    pub fn step_answered(&mut self, now: Instant, group: GroupId, session: SessionId, step_id: u64) {
        let Some(node) = self.live_node_mut(session) else { return };
        node.last_heard = now;
        let Some(g) = self.groups.get_mut(&group) else { return };
        if !g.members.contains(&session) {
            return;
        }
        if let Phase::Serving { step, .. } = &mut g.phase {
            if let Some(s) = step.as_mut().filter(|s| s.step_id == step_id) {
                s.answered.insert(session);
                if s.answered.len() == g.members.len() {
                    *step = None;
                }
            }
        }
    }

    /// A step failed: a member reported `StepFailed` (`culprit`), or the engine failed without
    /// one to blame. The group stops and every member, the culprit included, goes back to waiting:
    /// it answered, so its session is sound.
    pub fn step_failed(&mut self, now: Instant, group: GroupId, culprit: Option<SessionId>, reason: String) {
        let Some(g) = self.groups.get(&group) else { return };
        if !matches!(g.phase, Phase::Serving { .. }) {
            return;
        }
        let culprit = culprit.and_then(|s| Some((g.members.iter().position(|m| *m == s)?, self.live.get(&s)?)));
        let (reason, culprits) = match culprit {
            Some((rank, name)) => (format!("node {name} (rank {rank}) failed a step: {reason}"), vec![name.clone()]),
            None => (format!("a step failed: {reason}"), vec![]),
        };
        self.dissolve(now, group, reason, culprits);
        self.settle(now);
    }

    /// The I/O layer moved `requests` in-flight requests away from failed group `group` (history
    /// only).
    pub fn requests_migrated(&mut self, now: Instant, group: GroupId, requests: usize) {
        self.record(now, EventKind::Migrated { group, requests });
    }

    /// Act on every deadline at or before `now`: silent nodes, unanswered steps, members not
    /// ready in time, upgrades that were waiting out their hold-off, and the next heartbeat.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silent: Vec<(SessionId, String)> = self
            .live
            .keys()
            .map(|s| (*s, self.node_by_session(*s)))
            .filter(|(_, n)| now >= n.last_heard + self.cfg.node_timeout)
            .map(|(s, n)| {
                (
                    s,
                    format!(
                        "silent for {} ms (node timeout {} ms)",
                        (now - n.last_heard).as_millis(),
                        self.cfg.node_timeout.as_millis()
                    ),
                )
            })
            .collect();
        self.end_sessions(now, silent, Farewell::Close);

        let mut unanswered = Vec::new();
        let mut not_ready = Vec::new();
        for g in self.groups.values() {
            match &g.phase {
                Phase::Serving { step: Some(s), .. } if now >= s.started + self.cfg.step_timeout => {
                    let why =
                        format!("did not answer step {} within {} ms", s.step_id, self.cfg.step_timeout.as_millis());
                    unanswered.extend(g.members.iter().filter(|m| !s.answered.contains(m)).map(|m| (*m, why.clone())));
                }
                Phase::Forming { assigned_at, ready } if now >= *assigned_at + self.cfg.form_timeout => {
                    let why = format!("not ready within the form timeout ({} ms)", self.cfg.form_timeout.as_millis());
                    not_ready.extend(g.members.iter().filter(|m| !ready.contains(m)).map(|m| (*m, why.clone())));
                }
                _ => {}
            }
        }
        self.end_sessions(now, unanswered, Farewell::Close);
        self.end_sessions(now, not_ready, Farewell::Close);

        if now >= self.next_heartbeat {
            if !self.live.is_empty() {
                self.actions.push_back(Action::SendHeartbeats { sessions: self.live.keys().copied().collect() });
            }
            self.next_heartbeat = now + self.cfg.heartbeat_every;
        }
        self.settle(now);
    }

    /// The earliest deadline: the next heartbeat, a node, step or form timeout, or the end of an
    /// upgrade's hold-off. Call [`Membership::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Instant {
        let nodes = self.live.keys().map(|s| self.node_by_session(*s).last_heard + self.cfg.node_timeout);
        let groups = self.groups.iter().flat_map(|(id, g)| {
            let (form, step) = match &g.phase {
                Phase::Forming { assigned_at, .. } => (Some(*assigned_at + self.cfg.form_timeout), None),
                Phase::Serving { step, .. } => (None, step.as_ref().map(|s| s.started + self.cfg.step_timeout)),
            };
            [form, step, self.upgrade_target(*id).map(|(_, at)| at)].into_iter().flatten()
        });
        nodes.chain(groups).fold(self.next_heartbeat, Instant::min)
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ------------------------------------------------------------------------------ queries

    /// Forming and serving groups, by id.
    pub fn groups(&self) -> Vec<GroupView> {
        self.groups
            .iter()
            .map(|(id, g)| {
                let (phase, since) = match &g.phase {
                    Phase::Forming { assigned_at, .. } => (GroupPhase::Forming, *assigned_at),
                    Phase::Serving { since, .. } => (GroupPhase::Serving, *since),
                };
                GroupView { id: *id, tp: g.tp, phase, since, members: self.members(&g.members) }
            })
            .collect()
    }

    pub fn serving_groups(&self) -> Vec<GroupView> {
        self.groups().into_iter().filter(|g| g.phase == GroupPhase::Serving).collect()
    }

    /// Every node seen, by name.
    pub fn nodes(&self, now: Instant) -> Vec<NodeView> {
        self.nodes
            .iter()
            .map(|(name, n)| NodeView {
                name: name.clone(),
                session: n.session,
                ring_addr: n.ring_addr.clone(),
                state: n.state.clone(),
                heartbeat_age: now.saturating_duration_since(n.last_heard),
            })
            .collect()
    }

    /// The bounded history, oldest first.
    pub fn events(&self) -> &VecDeque<ClusterEvent> {
        &self.events
    }

    /// `Ok` while at least one group serves; otherwise why not (for a 503).
    pub fn health(&self) -> Result<(), String> {
        if self.groups.values().any(|g| matches!(g.phase, Phase::Serving { .. })) {
            return Ok(());
        }
        let mut why = vec!["no tensor-parallel group is serving".to_string()];
        for (id, g) in &self.groups {
            why.push(format!("group {id} (TP {}) is forming", g.tp));
        }
        let count = |want: fn(&NodeState) -> bool| self.live.values().filter(|n| want(&self.nodes[*n].state)).count();
        let (waiting, joining) = (count(|s| *s == NodeState::Waiting), count(|s| *s == NodeState::Joining));
        if self.live.is_empty() {
            why.push("no node is connected".into());
        } else if self.groups.is_empty() {
            why.push(format!(
                "{waiting} node(s) waiting and {joining} joining; a group needs at least {}",
                self.cfg.min_degree()
            ));
        }
        if let Some(f) = &self.last_failure {
            why.push(format!("last failure: {f}"));
        }
        Err(why.join("; "))
    }

    // ----------------------------------------------------------------------------- internals

    fn live_node_mut(&mut self, session: SessionId) -> Option<&mut Node> {
        let name = self.live.get(&session)?;
        self.nodes.get_mut(name)
    }

    fn node_by_session(&self, session: SessionId) -> &Node {
        &self.nodes[&self.live[&session]]
    }

    fn node_by_session_mut(&mut self, session: SessionId) -> &mut Node {
        self.live_node_mut(session).expect("a live session")
    }

    /// Groups only ever hold live sessions: a group is dissolved as soon as a member's ends.
    fn members(&self, sessions: &[SessionId]) -> Vec<GroupMember> {
        sessions
            .iter()
            .map(|s| GroupMember {
                session: *s,
                name: self.live[s].clone(),
                ring_addr: self.node_by_session(*s).ring_addr.clone(),
            })
            .collect()
    }

    fn record(&mut self, at: Instant, kind: EventKind) {
        if self.events.len() == self.cfg.history_len {
            self.events.pop_front();
        }
        self.events.push_back(ClusterEvent { at, kind });
    }

    /// End sessions (each with its reason), then dissolve every group that lost a member, naming
    /// all of its lost members at once.
    fn end_sessions(&mut self, now: Instant, ended: Vec<(SessionId, String)>, farewell: Farewell) {
        let mut hit: BTreeMap<GroupId, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for (session, reason) in ended {
            let Some(name) = self.live.remove(&session) else { continue };
            let node = self.nodes.get_mut(&name).expect("a live session's node");
            let was = std::mem::replace(&mut node.state, NodeState::Down { reason: reason.clone() });
            match farewell {
                Farewell::Silent => {}
                Farewell::Close => self.actions.push_back(Action::Close { session, reason: reason.clone() }),
                Farewell::Refuse => self.actions.push_back(Action::Refuse { session, reason: reason.clone() }),
            }
            if let Some((group, rank)) = was.group() {
                let (reasons, culprits) = hit.entry(group).or_default();
                reasons.push(format!("node {name} (rank {rank}) {reason}"));
                culprits.push(name.clone());
            }
            self.record(now, EventKind::Lost { name, session, reason });
        }
        for (group, (reasons, culprits)) in hit {
            self.dissolve(now, group, reasons.join("; "), culprits);
        }
    }

    /// Remove a group; its live members go back to waiting.
    fn dissolve(&mut self, now: Instant, group: GroupId, reason: String, culprits: Vec<String>) {
        let Some(g) = self.groups.remove(&group) else { return };
        match g.phase {
            Phase::Serving { .. } => {
                self.actions.push_back(Action::GroupFailed {
                    group,
                    reason: reason.clone(),
                    culprits: culprits.clone(),
                });
                self.last_failure = Some(format!("group {group} failed: {reason}"));
                self.record(now, EventKind::Failed { group, reason: reason.clone(), culprits });
            }
            Phase::Forming { .. } => self.record(now, EventKind::Abandoned { group, reason: reason.clone() }),
        }
        for session in g.members {
            let Some(node) = self.live_node_mut(session) else { continue };
            node.state = NodeState::Waiting;
            node.waiting_since = now;
            self.actions.push_back(Action::Release { session, reason: format!("group {group} stopped: {reason}") });
        }
    }

    /// Form groups, then upgrade, until neither applies.
    fn settle(&mut self, now: Instant) {
        self.form(now);
        while let Some((group, tp)) = self.due_upgrade(now) {
            let waiting = self.waiting().len();
            self.dissolve(now, group, format!("re-forming at TP {tp} with {waiting} waiting node(s)"), vec![]);
            self.form(now);
        }
    }

    /// Waiting sessions, longest waiting first, ties by name.
    fn waiting(&self) -> Vec<SessionId> {
        let mut w: Vec<(Instant, &str, SessionId)> = self
            .live
            .iter()
            .map(|(s, name)| (*s, name, &self.nodes[name]))
            .filter(|(_, _, n)| n.state == NodeState::Waiting)
            .map(|(s, name, n)| (n.waiting_since, name.as_str(), s))
            .collect();
        w.sort();
        w.into_iter().map(|(_, _, s)| s).collect()
    }

    fn form(&mut self, now: Instant) {
        while self.groups.len() < self.cfg.replicas {
            let waiting = self.waiting();
            let Some((_, tp)) = self.cfg.best_degree(waiting.len()) else { return };
            let group = self.next_group;
            self.next_group += 1;
            let sessions = waiting[..tp].to_vec();
            for (rank, s) in sessions.iter().enumerate() {
                self.node_by_session_mut(*s).state = NodeState::Forming { group, rank };
            }
            self.groups.insert(
                group,
                Group {
                    tp,
                    members: sessions.clone(),
                    phase: Phase::Forming { assigned_at: now, ready: BTreeSet::new() },
                },
            );
            let members = self.members(&sessions);
            let names = members.iter().map(|m| m.name.clone()).collect();
            self.actions.push_back(Action::Assign { group, tp, members });
            self.record(now, EventKind::Forming { group, tp, members: names });
        }
    }

    /// The better degree serving group `group` could re-form at with the waiting nodes, and when
    /// its hold-off ends.
    fn upgrade_target(&self, group: GroupId) -> Option<(usize, Instant)> {
        let g = self.groups.get(&group)?;
        let Phase::Serving { since, .. } = g.phase else { return None };
        let waiting = self.waiting().len();
        if waiting == 0 {
            return None;
        }
        let (pref, tp) = self.cfg.best_degree(g.tp + waiting)?;
        (pref < self.cfg.preference(g.tp)).then_some((tp, since + self.cfg.node_timeout))
    }

    /// The upgrade to make now: the least preferred eligible group first, then the oldest.
    fn due_upgrade(&self, now: Instant) -> Option<(GroupId, usize)> {
        self.groups
            .iter()
            .filter_map(|(id, g)| {
                let (tp, at) = self.upgrade_target(*id)?;
                (at <= now).then_some((std::cmp::Reverse(self.cfg.preference(g.tp)), *id, tp))
            })
            .min()
            .map(|(_, id, tp)| (id, tp))
    }
}
