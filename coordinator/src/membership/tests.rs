//! One test per membership rule, driven on a simulated clock.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn config(tp_prefs: &[usize], replicas: usize) -> MembershipConfig {
    MembershipConfig {
        tp_prefs: tp_prefs.to_vec(),
        replicas,
        heartbeat_every: 500 * MS,
        node_timeout: 3000 * MS,
        step_timeout: 10_000 * MS,
        form_timeout: 20_000 * MS,
        history_len: 64,
    }
}

/// The membership plus the clock and the nodes' behaviour an I/O layer would supply.
struct Sim {
    m: Membership,
    now: Instant,
    /// Names of nodes that do not answer heartbeats.
    paused: BTreeSet<String>,
}

impl Sim {
    fn new(tp_prefs: &[usize], replicas: usize) -> Sim {
        Sim::with(config(tp_prefs, replicas))
    }

    fn with(cfg: MembershipConfig) -> Sim {
        let now = Instant::now();
        Sim { m: Membership::new(cfg, now).expect("valid config"), now, paused: BTreeSet::new() }
    }

    fn hello(&mut self, name: &str) -> SessionId {
        self.m.node_hello(self.now, name, format!("{name}.ring:9000"))
    }

    /// Hello and the answer to the probe heartbeat.
    fn join(&mut self, name: &str) -> SessionId {
        let s = self.hello(name);
        self.m.heartbeat_ack(self.now, s);
        s
    }

    fn session(&self, name: &str) -> SessionId {
        self.node(name).session
    }

    fn node(&self, name: &str) -> NodeView {
        self.m.nodes(self.now).into_iter().find(|n| n.name == name).expect("known node")
    }

    fn state(&self, name: &str) -> NodeState {
        self.node(name).state
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.m.poll_action()).collect()
    }

    /// Every member of forming group `group` answers Ready.
    fn ready(&mut self, group: GroupId) {
        let g = self.m.groups().into_iter().find(|g| g.id == group).expect("forming group");
        for member in g.members {
            self.m.node_ready(self.now, member.session, group, Ok(()));
        }
    }

    /// Run the clock to `until` the way the I/O layer would: wake at each `poll_timeout`, handle
    /// it, and have every node that is not paused answer its heartbeats. Returns every other
    /// action, in order.
    fn run_until(&mut self, until: Instant) -> Vec<Action> {
        let mut log = Vec::new();
        loop {
            let due = self.m.poll_timeout();
            if due > until {
                break;
            }
            self.now = due;
            self.m.handle_timeout(self.now);
            assert!(self.m.poll_timeout() > self.now, "a handled deadline stays due");
            for action in self.actions() {
                match action {
                    Action::SendHeartbeats { sessions } => {
                        for s in sessions {
                            let name = self.m.nodes(self.now).into_iter().find(|n| n.session == s).expect("node").name;
                            if !self.paused.contains(&name) {
                                self.m.heartbeat_ack(self.now, s);
                            }
                        }
                        log.extend(self.actions());
                    }
                    other => log.push(other),
                }
            }
        }
        self.now = until;
        log
    }
}

fn assigned(actions: &[Action]) -> Vec<(GroupId, usize, Vec<String>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Assign { group, tp, members } => {
                Some((*group, *tp, members.iter().map(|m| m.name.clone()).collect()))
            }
            _ => None,
        })
        .collect()
}

fn failed(actions: &[Action]) -> Vec<(GroupId, String, Vec<String>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::GroupFailed { group, reason, culprits } => Some((*group, reason.clone(), culprits.clone())),
            _ => None,
        })
        .collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn config_rejects_unusable_settings() {
    let ok = config(&[4, 2, 1], 2);
    assert_eq!(ok.validate(), Ok(()));
    let bad = |f: fn(&mut MembershipConfig)| {
        let mut c = ok.clone();
        f(&mut c);
        c.validate().unwrap_err()
    };
    assert_eq!(bad(|c| c.tp_prefs.clear()), MembershipConfigError::NoDegrees);
    assert_eq!(bad(|c| c.tp_prefs = vec![2, 0]), MembershipConfigError::ZeroDegree);
    assert_eq!(bad(|c| c.tp_prefs = vec![2, 1, 2]), MembershipConfigError::RepeatedDegree(2));
    assert_eq!(bad(|c| c.replicas = 0), MembershipConfigError::ZeroReplicas);
    assert_eq!(bad(|c| c.step_timeout = Duration::ZERO), MembershipConfigError::Zero { field: "step_timeout" });
    assert_eq!(bad(|c| c.history_len = 0), MembershipConfigError::Zero { field: "history_len" });
    assert!(matches!(
        bad(|c| c.heartbeat_every = c.node_timeout),
        MembershipConfigError::HeartbeatNotBelowTimeout { .. }
    ));
    assert!(Membership::new(MembershipConfig::new(vec![], 1), Instant::now()).is_err());
    assert_eq!(MembershipConfig::new(vec![2], 1).validate(), Ok(()), "the defaults are valid");
}

#[test]
fn a_node_waits_only_after_answering_its_first_heartbeat() {
    let mut sim = Sim::new(&[1], 1);
    let a = sim.hello("a");
    assert_eq!(sim.actions(), vec![Action::SendHeartbeats { sessions: vec![a] }], "hello sends the probe");
    assert_eq!(sim.state("a"), NodeState::Joining);
    sim.now += 40 * MS;
    sim.m.heartbeat_ack(sim.now, a);
    let actions = sim.actions();
    assert_eq!(assigned(&actions), vec![(0, 1, names(&["a"]))]);
    assert_eq!(sim.state("a"), NodeState::Forming { group: 0, rank: 0 });
    sim.ready(0);
    assert_eq!(sim.state("a"), NodeState::Serving { group: 0, rank: 0 });
    let served = sim.actions();
    assert!(
        matches!(&served[..], [Action::GroupServing { group: 0, members }] if members[0].ring_addr == "a.ring:9000")
    );
}

#[test]
fn formation_takes_the_longest_waiting_nodes_then_names() {
    let mut sim = Sim::new(&[3], 1);
    let (b, c, a) = (sim.hello("b"), sim.hello("c"), sim.hello("a"));
    sim.m.heartbeat_ack(sim.now, b);
    sim.now += MS;
    sim.m.heartbeat_ack(sim.now, c);
    sim.m.heartbeat_ack(sim.now, a);
    assert_eq!(assigned(&sim.actions()), vec![(0, 3, names(&["b", "a", "c"]))]);
    assert_eq!(sim.state("c"), NodeState::Forming { group: 0, rank: 2 });
}

#[test]
fn heartbeats_go_to_every_live_session_on_schedule() {
    let mut sim = Sim::new(&[2], 1);
    let start = sim.now;
    let a = sim.join("a");
    let b = sim.hello("b");
    sim.actions();
    assert_eq!(sim.m.poll_timeout(), start + 500 * MS);
    sim.now = start + 500 * MS;
    sim.m.handle_timeout(sim.now);
    assert_eq!(sim.actions(), vec![Action::SendHeartbeats { sessions: vec![a, b] }], "joining sessions too");
    assert_eq!(sim.m.poll_timeout(), start + 1000 * MS);
}

#[test]
fn a_spare_replaces_a_lost_member_at_once() {
    let mut sim = Sim::new(&[2], 1);
    sim.join("a");
    sim.join("b");
    sim.now += MS;
    sim.join("c");
    sim.ready(0);
    sim.actions();
    assert_eq!(sim.state("c"), NodeState::Waiting, "a hot spare");
    let (a, b) = (sim.session("a"), sim.session("b"));
    sim.now += MS;
    sim.m.connection_lost(sim.now, b, "reset by peer".into());
    let actions = sim.actions();
    let reason = "node b (rank 1) connection lost: reset by peer".to_string();
    assert_eq!(
        actions,
        vec![
            Action::GroupFailed { group: 0, reason: reason.clone(), culprits: names(&["b"]) },
            Action::Release { session: a, reason: format!("group 0 stopped: {reason}") },
            Action::Assign {
                group: 1,
                tp: 2,
                members: vec![
                    GroupMember { session: sim.session("c"), name: "c".into(), ring_addr: "c.ring:9000".into() },
                    GroupMember { session: a, name: "a".into(), ring_addr: "a.ring:9000".into() },
                ],
            },
        ],
        "the spare waited longer, so it takes rank 0"
    );
    assert_eq!(sim.state("b"), NodeState::Down { reason: "connection lost: reset by peer".into() });
}

#[test]
fn without_a_spare_the_group_reforms_smaller_and_upgrades_when_the_node_returns() {
    let mut sim = Sim::new(&[2, 1], 1);
    sim.join("a");
    assert_eq!(assigned(&sim.actions()), vec![(0, 1, names(&["a"]))], "one node makes TP 1 at once");
    sim.join("b");
    sim.ready(0);
    let actions = sim.run_until(sim.now + 3000 * MS);
    assert_eq!(failed(&actions), vec![(0, "re-forming at TP 2 with 1 waiting node(s)".into(), vec![])]);
    assert_eq!(assigned(&actions), vec![(1, 2, names(&["b", "a"]))]);
    sim.ready(1);

    sim.now += 100 * MS;
    sim.m.connection_lost(sim.now, sim.session("b"), "node process exited".into());
    let actions = sim.actions();
    assert_eq!(failed(&actions).len(), 1);
    assert_eq!(assigned(&actions), vec![(2, 1, names(&["a"]))], "TP 1 is the best one node allows");
    sim.ready(2);
    let serving_since = sim.now;
    assert_eq!(sim.m.health(), Ok(()));

    sim.now += 1000 * MS;
    sim.join("b");
    assert!(assigned(&sim.actions()).is_empty(), "the group has not served for a node timeout yet");
    assert_eq!(sim.state("b"), NodeState::Waiting);
    let hold_off_ends = serving_since + 3000 * MS;
    // Heartbeats fall on other instants, so an upgrade exactly at the end of the hold-off shows
    // that the hold-off is a deadline of its own.
    let before = sim.run_until(hold_off_ends - MS);
    assert!(before.is_empty(), "{before:?}");
    let actions = sim.run_until(hold_off_ends);
    let [(2, reason, culprits)] = &failed(&actions)[..] else { panic!("{actions:?}") };
    assert_eq!(reason, "re-forming at TP 2 with 1 waiting node(s)");
    assert!(culprits.is_empty(), "nobody is at fault for an upgrade");
    assert_eq!(assigned(&actions), vec![(3, 2, names(&["b", "a"]))]);
    sim.ready(3);
    assert_eq!(sim.m.serving_groups().iter().map(|g| (g.id, g.tp)).collect::<Vec<_>>(), vec![(3, 2)]);
}

#[test]
fn the_least_preferred_group_is_upgraded_first() {
    let mut sim = Sim::new(&[3, 2, 1], 2);
    sim.join("a");
    sim.join("b");
    assert_eq!(assigned(&sim.actions()), vec![(0, 1, names(&["a"])), (1, 1, names(&["b"]))]);
    sim.ready(0);
    sim.ready(1);
    sim.join("c");
    let actions = sim.run_until(sim.now + 3000 * MS);
    assert_eq!(failed(&actions).iter().map(|f| f.0).collect::<Vec<_>>(), vec![0], "equal degrees: the oldest group");
    assert_eq!(assigned(&actions), vec![(2, 2, names(&["c", "a"]))]);
    sim.ready(2);
    sim.actions();
    let quiet = sim.run_until(sim.now + 3000 * MS);
    assert!(quiet.is_empty(), "nobody waits, so nothing upgrades: {quiet:?}");

    // Both groups are past their hold-off; the TP 1 group goes first and takes the newcomer (who
    // started waiting the instant b was released, so the names decide the ranks).
    sim.join("d");
    let actions = sim.actions();
    assert_eq!(failed(&actions).iter().map(|f| f.0).collect::<Vec<_>>(), vec![1], "{actions:?}");
    assert_eq!(assigned(&actions), vec![(3, 2, names(&["b", "d"]))]);
}

#[test]
fn a_paused_node_is_closed_and_must_rejoin() {
    let mut sim = Sim::new(&[1], 1);
    let old = sim.join("a");
    sim.ready(0);
    sim.actions();
    let last_heard = sim.now;
    sim.paused.insert("a".into());
    let actions = sim.run_until(sim.now + 5000 * MS);
    let reason = "silent for 3000 ms (node timeout 3000 ms)".to_string();
    assert_eq!(actions[0], Action::Close { session: old, reason: reason.clone() });
    assert_eq!(failed(&actions), vec![(0, format!("node a (rank 0) {reason}"), names(&["a"]))]);
    assert_eq!(sim.state("a"), NodeState::Down { reason });
    assert_eq!(sim.node("a").heartbeat_age, sim.now - last_heard);
    assert!(sim.m.health().is_err());

    // Its acks resume, but the session is over.
    sim.m.heartbeat_ack(sim.now, old);
    assert!(!sim.state("a").is_live());
    let new = sim.join("a");
    assert_ne!(new, old);
    assert_eq!(assigned(&sim.actions()), vec![(1, 1, names(&["a"]))]);
}

#[test]
fn a_silent_forming_member_times_out_like_any_node() {
    let mut sim = Sim::new(&[2], 1);
    sim.join("a");
    sim.join("b");
    sim.actions();
    sim.paused.insert("b".into());
    let actions = sim.run_until(sim.now + 3000 * MS);
    assert!(actions.contains(&Action::Close {
        session: sim.session("b"),
        reason: "silent for 3000 ms (node timeout 3000 ms)".into()
    }));
    assert!(failed(&actions).is_empty(), "it never served");
    assert_eq!(sim.state("a"), NodeState::Waiting);
}

#[test]
fn a_rejoin_under_the_same_name_replaces_the_old_session() {
    let mut sim = Sim::new(&[2], 1);
    let a = sim.join("a");
    let old = sim.join("b");
    sim.ready(0);
    sim.actions();
    let new = sim.hello("b");
    let reason = "replaced by a new session".to_string();
    assert_eq!(
        sim.actions(),
        vec![
            Action::Close { session: old, reason: reason.clone() },
            Action::GroupFailed { group: 0, reason: format!("node b (rank 1) {reason}"), culprits: names(&["b"]) },
            Action::Release { session: a, reason: format!("group 0 stopped: node b (rank 1) {reason}") },
            Action::SendHeartbeats { sessions: vec![new] },
        ]
    );
    assert_eq!((sim.session("b"), sim.state("b")), (new, NodeState::Joining));
    sim.m.node_ready(sim.now, old, 0, Ok(()));
    sim.m.step_answered(sim.now, 0, old, 1);
    assert!(sim.actions().is_empty(), "the old session's messages are ignored");
    sim.m.heartbeat_ack(sim.now, new);
    assert_eq!(assigned(&sim.actions()), vec![(1, 2, names(&["a", "b"]))]);
}

#[test]
fn a_node_lost_while_waiting_is_never_assigned() {
    let mut sim = Sim::new(&[2], 1);
    let a = sim.join("a");
    sim.m.connection_lost(sim.now, a, "closed".into());
    sim.join("b");
    assert!(assigned(&sim.actions()).is_empty());
    sim.join("c");
    assert_eq!(assigned(&sim.actions()), vec![(0, 2, names(&["b", "c"]))]);
}

#[test]
fn a_step_timeout_names_the_member_that_did_not_answer() {
    let mut sim = Sim::new(&[3], 1);
    for n in ["a", "b", "c"] {
        sim.join(n);
    }
    sim.ready(0);
    sim.actions();
    sim.m.step_started(sim.now, 0, 7);
    let started = sim.now;
    // b's heartbeats keep coming: its control stream is fine, its step is not.
    sim.now += 200 * MS;
    sim.m.step_answered(sim.now, 0, sim.session("c"), 7);
    sim.m.step_answered(sim.now, 0, sim.session("a"), 7);
    let actions = sim.run_until(started + 10_000 * MS);
    let why = "did not answer step 7 within 10000 ms".to_string();
    let b = sim.session("b");
    assert_eq!(actions[0], Action::Close { session: b, reason: why.clone() });
    assert_eq!(failed(&actions), vec![(0, format!("node b (rank 1) {why}"), names(&["b"]))]);
    assert_eq!(assigned(&actions), vec![], "two nodes cannot form TP 3");
    assert_eq!(sim.state("a"), NodeState::Waiting);
    assert_eq!(sim.state("c"), NodeState::Waiting);
}

#[test]
fn an_answered_step_leaves_the_group_serving() {
    let mut sim = Sim::new(&[2], 1);
    sim.join("a");
    sim.join("b");
    sim.ready(0);
    sim.actions();
    sim.m.step_started(sim.now, 0, 1);
    sim.m.step_answered(sim.now, 0, sim.session("a"), 1);
    sim.m.step_answered(sim.now, 0, sim.session("a"), 0);
    sim.m.step_answered(sim.now, 0, sim.session("b"), 1);
    let actions = sim.run_until(sim.now + 30_000 * MS);
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(sim.m.serving_groups().len(), 1);
}

#[test]
fn a_failed_step_names_its_culprit_and_keeps_every_session() {
    let mut sim = Sim::new(&[2], 1);
    let a = sim.join("a");
    let b = sim.join("b");
    sim.ready(0);
    sim.actions();
    sim.m.step_started(sim.now, 0, 3);
    sim.m.step_failed(sim.now, 0, Some(b), "ring predecessor timed out".into());
    let actions = sim.actions();
    let reason = "node b (rank 1) failed a step: ring predecessor timed out";
    assert_eq!(failed(&actions), vec![(0, reason.to_string(), names(&["b"]))]);
    assert!(actions.contains(&Action::Release { session: b, reason: format!("group 0 stopped: {reason}") }));
    assert!(!actions.iter().any(|a| matches!(a, Action::Close { .. })));
    assert_eq!(assigned(&actions), vec![(1, 2, names(&["a", "b"]))]);
    assert_eq!((sim.session("a"), sim.session("b")), (a, b));
}

#[test]
fn a_member_not_ready_in_time_is_dropped_and_the_rest_wait() {
    let mut sim = Sim::new(&[2], 1);
    sim.join("a");
    sim.join("b");
    sim.now += MS;
    sim.join("c");
    sim.actions();
    let assigned_at = sim.now - MS;
    sim.m.node_ready(sim.now, sim.session("a"), 0, Ok(()));
    let actions = sim.run_until(assigned_at + 20_000 * MS);
    let b = sim.session("b");
    let why = "not ready within the form timeout (20000 ms)".to_string();
    assert_eq!(actions[0], Action::Close { session: b, reason: why.clone() });
    assert!(failed(&actions).is_empty(), "a group that never served does not fail");
    assert!(actions.contains(&Action::Release {
        session: sim.session("a"),
        reason: format!("group 0 stopped: node b (rank 1) {why}")
    }));
    assert_eq!(assigned(&actions), vec![(1, 2, names(&["c", "a"]))]);
    assert!(sim.m.events().iter().any(|e| matches!(&e.kind, EventKind::Abandoned { group: 0, .. })));
}

#[test]
fn a_refused_fingerprint_removes_the_node_and_releases_the_rest() {
    let mut sim = Sim::new(&[2], 1);
    let a = sim.join("a");
    let b = sim.join("b");
    sim.actions();
    sim.m.node_ready(sim.now, a, 0, Ok(()));
    sim.m.node_ready(sim.now, b, 0, Err("fingerprint 1234, expected abcd".into()));
    let reason = "refused: fingerprint 1234, expected abcd".to_string();
    assert_eq!(
        sim.actions(),
        vec![
            Action::Refuse { session: b, reason: reason.clone() },
            Action::Release { session: a, reason: format!("group 0 stopped: node b (rank 1) {reason}") },
        ]
    );
    assert_eq!(sim.state("b"), NodeState::Down { reason });
    assert!(sim.m.groups().is_empty());
    let err = sim.m.health().unwrap_err();
    assert!(err.contains("1 node(s) waiting and 0 joining; a group needs at least 2"), "{err}");
}

#[test]
fn health_explains_why_nothing_serves() {
    let mut sim = Sim::new(&[2, 1], 1);
    let err = sim.m.health().unwrap_err();
    assert_eq!(err, "no tensor-parallel group is serving; no node is connected");
    sim.hello("a");
    assert!(sim.m.health().unwrap_err().contains("0 node(s) waiting and 1 joining; a group needs at least 1"));
    sim.m.heartbeat_ack(sim.now, sim.session("a"));
    assert!(sim.m.health().unwrap_err().contains("group 0 (TP 1) is forming"));
    sim.ready(0);
    assert_eq!(sim.m.health(), Ok(()));
    sim.m.connection_lost(sim.now, sim.session("a"), "gone".into());
    let err = sim.m.health().unwrap_err();
    assert!(err.ends_with("last failure: group 0 failed: node a (rank 0) connection lost: gone"), "{err}");
}

#[test]
fn spares_wait_once_every_replica_is_formed() {
    let mut sim = Sim::new(&[2], 2);
    for n in ["a", "b", "c", "d", "e"] {
        sim.join(n);
    }
    assert_eq!(assigned(&sim.actions()), vec![(0, 2, names(&["a", "b"])), (1, 2, names(&["c", "d"]))]);
    sim.ready(0);
    let states: Vec<String> = sim.m.nodes(sim.now).iter().map(|n| format!("{} {}", n.name, n.state)).collect();
    assert_eq!(
        states,
        [
            "a in group 0 rank 0",
            "b in group 0 rank 1",
            "c forming group 1 rank 0",
            "d forming group 1 rank 1",
            "e waiting"
        ]
    );
}

#[test]
fn the_event_history_is_bounded() {
    let mut sim = Sim::with(MembershipConfig { history_len: 4, ..config(&[8], 1) });
    for i in 0..10 {
        sim.hello(&format!("n{i}"));
    }
    sim.m.requests_migrated(sim.now, 3, 5);
    let events: Vec<String> = sim.m.events().iter().map(|e| e.kind.to_string()).collect();
    assert_eq!(
        events,
        [
            "n7 joined (session 8)",
            "n8 joined (session 9)",
            "n9 joined (session 10)",
            "5 request(s) migrated away from group 3"
        ]
    );
}
