//! The leadership state machine driven without etcd: every etcd answer is an input.

use std::time::{Duration, Instant};

use super::*;

const RETRY: Duration = Duration::from_millis(400);

fn drain(l: &mut Leadership) -> Vec<LeadAction> {
    std::iter::from_fn(|| l.poll_action()).collect()
}

fn record(name: &str) -> LeaderRecord {
    LeaderRecord { name: name.into(), cluster_addr: "127.0.0.1:7000".into(), http_addr: "127.0.0.1:8000".into() }
}

/// A coordinator `me` that got lease 7 and was elected with it.
fn leader(t0: Instant) -> Leadership {
    let mut l = Leadership::new(LeadershipConfig::for_ttl(3, RETRY), "me", t0);
    assert_eq!(drain(&mut l), [LeadAction::GrantLease { ttl_secs: 3 }, LeadAction::LookUpLeader]);
    l.leader_seen(t0, None);
    l.lease_granted(t0, 7);
    assert_eq!(drain(&mut l), [LeadAction::Campaign { lease: 7 }]);
    l.elected(t0, 7);
    assert_eq!(drain(&mut l), [LeadAction::StartServing]);
    assert_eq!(l.role(), Role::Leader);
    l
}

#[test]
fn a_coordinator_asks_for_a_lease_campaigns_and_leads_once_elected() {
    let t0 = Instant::now();
    let mut l = Leadership::new(LeadershipConfig::for_ttl(3, RETRY), "me", t0);
    assert_eq!(l.role(), Role::Standby);
    assert_eq!(drain(&mut l), [LeadAction::GrantLease { ttl_secs: 3 }, LeadAction::LookUpLeader]);
    l.leader_seen(t0, Some(record("other")));
    assert_eq!(l.leader(), Some(&record("other")));
    l.lease_granted(t0, 7);
    assert_eq!(drain(&mut l), [LeadAction::Campaign { lease: 7 }]);
    assert_eq!(l.role(), Role::Standby, "campaigning is standing by");
    l.elected(t0, 7);
    assert_eq!(drain(&mut l), [LeadAction::StartServing]);
    assert_eq!(l.role(), Role::Leader);
    assert_eq!(l.etcd(), &EtcdHealth::Up);
}

#[test]
fn the_lease_is_kept_alive_three_times_per_ttl() {
    let t0 = Instant::now();
    let mut l = leader(t0);
    assert_eq!(l.poll_timeout(), t0 + Duration::from_secs(1));
    l.handle_timeout(t0 + Duration::from_millis(999));
    assert_eq!(drain(&mut l), []);
    l.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(drain(&mut l), [LeadAction::KeepAlive { lease: 7 }, LeadAction::LookUpLeader]);
    // No second keep-alive while one is unanswered.
    l.handle_timeout(t0 + Duration::from_secs(2));
    assert_eq!(drain(&mut l), []);
    l.keep_alive_answered(t0 + Duration::from_secs(2), 7, 3);
    l.leader_seen(t0 + Duration::from_secs(2), Some(record("me")));
    l.handle_timeout(t0 + Duration::from_secs(3));
    assert_eq!(drain(&mut l), [LeadAction::KeepAlive { lease: 7 }, LeadAction::LookUpLeader]);
    assert_eq!(l.role(), Role::Leader);
}

#[test]
fn a_leader_keeps_serving_while_etcd_is_unavailable() {
    let t0 = Instant::now();
    let mut l = leader(t0);
    for s in 1..30 {
        let now = t0 + Duration::from_secs(s);
        l.handle_timeout(now);
        for a in drain(&mut l) {
            assert!(matches!(a, LeadAction::KeepAlive { .. } | LeadAction::LookUpLeader), "{a:?}");
            l.call_failed(now, &a, "connection refused".into());
        }
        assert_eq!(l.role(), Role::Leader);
    }
    assert_eq!(l.etcd(), &EtcdHealth::Down { error: "connection refused".into() });
    assert_eq!(l.etcd_last_ok_age(t0 + Duration::from_secs(30)), Some(Duration::from_secs(30)));
    // etcd is back (restarted: it renewed the lease).
    let back = t0 + Duration::from_secs(31);
    l.handle_timeout(back);
    assert_eq!(drain(&mut l), [LeadAction::KeepAlive { lease: 7 }, LeadAction::LookUpLeader]);
    l.keep_alive_answered(back, 7, 3);
    assert_eq!(l.etcd(), &EtcdHealth::Up);
    assert_eq!(l.role(), Role::Leader);
}

#[test]
fn a_leader_whose_lease_is_gone_steps_down_and_campaigns_again() {
    let t0 = Instant::now();
    let mut l = leader(t0);
    let t1 = t0 + Duration::from_secs(1);
    l.handle_timeout(t1);
    drain(&mut l);
    l.keep_alive_answered(t1, 7, 0);
    assert_eq!(l.role(), Role::Standby);
    assert_eq!(
        drain(&mut l),
        [LeadAction::StopServing { reason: "lost its etcd lease 7".into() }, LeadAction::GrantLease { ttl_secs: 3 }]
    );
    assert_eq!(l.lease(), None);
    l.lease_granted(t1, 9);
    assert_eq!(drain(&mut l), [LeadAction::Campaign { lease: 9 }]);
    // The look-up of before the step-down answers late: it changes nothing.
    l.leader_seen(t1, Some(record("other")));
    assert_eq!(drain(&mut l), []);
    l.elected(t1, 9);
    assert_eq!(drain(&mut l), [LeadAction::StartServing]);
}

#[test]
fn a_leader_that_etcd_says_is_not_the_leader_steps_down() {
    let t0 = Instant::now();
    let mut l = leader(t0);
    let t1 = t0 + Duration::from_secs(1);
    l.handle_timeout(t1);
    drain(&mut l);
    l.leader_seen(t1, Some(record("other")));
    assert_eq!(l.role(), Role::Standby);
    let actions = drain(&mut l);
    assert_eq!(actions[0], LeadAction::StopServing { reason: "etcd names other the leader".into() });
    assert!(actions.contains(&LeadAction::GrantLease { ttl_secs: 3 }), "{actions:?}");
}

#[test]
fn a_look_up_read_before_the_election_does_not_end_the_leadership() {
    let t0 = Instant::now();
    let mut l = Leadership::new(LeadershipConfig::for_ttl(3, RETRY), "me", t0);
    drain(&mut l); // GrantLease, LookUpLeader (in flight)
    l.lease_granted(t0, 7);
    drain(&mut l);
    l.elected(t0, 7);
    drain(&mut l);
    // The look-up read while the old leader still held the election answers now.
    l.leader_seen(t0, Some(record("old")));
    assert_eq!(l.role(), Role::Leader);
    assert_eq!(drain(&mut l), []);
    // The next one is believed.
    let t1 = t0 + Duration::from_secs(1);
    l.handle_timeout(t1);
    drain(&mut l);
    l.leader_seen(t1, Some(record("me")));
    assert_eq!(l.role(), Role::Leader);
}

#[test]
fn failed_grants_and_campaigns_are_retried_later() {
    let t0 = Instant::now();
    let mut l = Leadership::new(LeadershipConfig::for_ttl(3, RETRY), "me", t0);
    let grant = LeadAction::GrantLease { ttl_secs: 3 };
    assert_eq!(drain(&mut l), [grant.clone(), LeadAction::LookUpLeader]);
    l.leader_seen(t0, None);
    l.call_failed(t0, &grant, "etcd is down".into());
    assert_eq!(l.poll_timeout(), t0 + RETRY);
    l.handle_timeout(t0 + RETRY);
    assert_eq!(drain(&mut l), std::slice::from_ref(&grant));
    l.lease_granted(t0 + RETRY, 5);
    assert_eq!(drain(&mut l), [LeadAction::Campaign { lease: 5 }]);
    l.campaign_failed(t0 + RETRY, 5, "stream reset".into());
    assert!(matches!(l.etcd(), EtcdHealth::Down { .. }));
    l.handle_timeout(t0 + RETRY * 2);
    assert_eq!(drain(&mut l), [LeadAction::Campaign { lease: 5 }]);
    // A campaign whose lease expired meanwhile is abandoned and started over with a new lease.
    let t1 = t0 + Duration::from_secs(1);
    l.handle_timeout(t1);
    assert_eq!(drain(&mut l), [LeadAction::KeepAlive { lease: 5 }, LeadAction::LookUpLeader]);
    l.keep_alive_answered(t1, 5, 0);
    assert_eq!(drain(&mut l), [LeadAction::CancelCampaign, grant]);
    // The abandoned campaign's late success is ignored.
    l.elected(t1, 5);
    assert_eq!(l.role(), Role::Standby);
    assert_eq!(drain(&mut l), []);
}

#[test]
fn lease_ttls_cover_the_node_timeout() {
    assert_eq!(lease_ttl_secs(Duration::from_millis(3000)), 3);
    assert_eq!(lease_ttl_secs(Duration::from_millis(3001)), 4);
    assert_eq!(lease_ttl_secs(Duration::from_millis(10)), 1);
}
