//! etcd discovery and coordinator fail-over (`--membership etcd`).
//!
//! Several coordinators of one cluster (`--cluster-name`) campaign in etcd's election API under
//! `/lockstep/NAME/leader`; each holds an etcd lease whose TTL is the node timeout. The one elected
//! publishes a [`LeaderRecord`] (its name, its QUIC cluster address and its HTTP address) as its
//! election value and serves; the others are standbys: they answer `/health` 503
//! `{"status":"standby","leader":…}` and `/v1/*` 503 with `Retry-After` (they do not proxy).
//! Nodes register under their own lease at `/lockstep/NAME/nodes/NODE` ([`NodeRecord`]: name,
//! ring address, fingerprint of what they serve), look the leader up in the same election and
//! follow it: when the published leader changes they leave the old one and say hello to the new
//! one, which forms groups from them as any coordinator does (see [`crate::membership`]). A
//! client that retries a request on the new leader with the same seed gets the same bytes: every
//! answer is TP-, batch- and group-invariant.
//!
//! Which role a coordinator plays is decided by the sans-IO [`Leadership`] state machine
//! (quinn-proto style: inputs are the answers of etcd calls with the current time, `handle_timeout`
//! / `poll_timeout` schedule lease keep-alives and leader look-ups, actions are polled), so tests
//! drive it without etcd. The leader shows the nodes registered in etcd in `/ops/cluster`
//! (`discovery.registered_nodes`). [`etcd`] is the thin I/O wrapper that carries the actions out with the
//! `etcd-client` crate. The rules:
//!
//! - **Lease first, then campaign.** Without a lease the coordinator asks for one; with one it
//!   campaigns (a standby waits inside the campaign call); elected, it starts serving.
//! - **etcd unavailable** (a call fails or times out): nothing changes but the etcd status (shown
//!   in `/ops/cluster`). A leader keeps serving with the nodes it has; they stay connected.
//! - **Step-down.** Only a definite answer from etcd ends leadership: a keep-alive that finds the
//!   lease gone (TTL 0), or a leader look-up that names another coordinator. The coordinator then
//!   stops serving, becomes a standby and asks for a new lease to campaign again. A leader cut off
//!   from a live etcd for longer than the TTL can therefore serve next to a new leader until it
//!   hears of it; the nodes that reach etcd follow the new one, and both give identical bytes.
//! - **Stale answers** (for a lease that is no longer held) are ignored.

pub mod etcd;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How a coordinator finds its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MembershipMode {
    /// Spawn the node processes locally on loopback (`--nodes embedded`).
    Embedded,
    /// Wait for `lockstep node --coordinator ADDR` processes (`--nodes static`).
    Static,
    /// Nodes and coordinators meet in etcd; one coordinator leads, the others stand by.
    Etcd,
}

/// The default `--cluster-name`.
pub const DEFAULT_CLUSTER_NAME: &str = "lockstep";

/// The election value of the leading coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The coordinator's certificate name (`--name`).
    pub name: String,
    /// Where nodes dial it (QUIC, `host:port`).
    pub cluster_addr: String,
    /// Where clients reach its API (`host:port`, HTTP/1.1).
    pub http_addr: String,
}

/// What a node registers under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Where its ring predecessor dials it (QUIC).
    pub ring_addr: String,
    /// The deployment fingerprint of the shard it serves (empty until it first served one).
    pub fingerprint: String,
}

/// The election every coordinator of `cluster` campaigns in.
pub fn election_name(cluster: &str) -> String {
    format!("/lockstep/{cluster}/leader")
}

/// The key under which node `node` of `cluster` registers.
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{}{node}", node_prefix(cluster))
}

/// The prefix of every node registration of `cluster`.
pub fn node_prefix(cluster: &str) -> String {
    format!("/lockstep/{cluster}/nodes/")
}

/// An etcd lease TTL (whole seconds, at least 1) that outlives `timeout`.
pub fn lease_ttl_secs(timeout: Duration) -> i64 {
    (timeout.as_millis().div_ceil(1000) as i64).max(1)
}

/// Whether etcd answered the last call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EtcdHealth {
    /// Nothing asked yet.
    Unknown,
    Up,
    /// The last call failed: `error` says how.
    Down {
        error: String,
    },
}

/// The role of this coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not elected: waiting in the campaign (or for a lease to campaign with).
    Standby,
    /// Elected: serves.
    Leader,
}

/// What the I/O layer must do for the [`Leadership`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeadAction {
    /// Ask etcd for a lease of `ttl_secs`; answer with [`Leadership::lease_granted`] or
    /// [`Leadership::call_failed`].
    GrantLease { ttl_secs: i64 },
    /// Refresh `lease` once; answer with [`Leadership::keep_alive_answered`] or `call_failed`.
    KeepAlive { lease: i64 },
    /// Campaign with `lease` (the call returns once elected); answer with
    /// [`Leadership::elected`] or [`Leadership::campaign_failed`].
    Campaign { lease: i64 },
    /// Abandon the campaign in flight (its lease is gone).
    CancelCampaign,
    /// Read the current leader; answer with [`Leadership::leader_seen`] or `call_failed`.
    LookUpLeader,
    /// Elected: start serving.
    StartServing,
    /// Leadership is over: stop serving (and become a standby).
    StopServing { reason: String },
}

/// Timings of the [`Leadership`].
#[derive(Debug, Clone)]
pub struct LeadershipConfig {
    /// The coordinator's lease TTL (the node timeout, rounded up to seconds).
    pub ttl_secs: i64,
    /// How often the lease is refreshed and the leader looked up (a third of the TTL at most).
    pub refresh_every: Duration,
    /// How long to wait before retrying a grant or campaign that failed.
    pub retry_after: Duration,
}

impl LeadershipConfig {
    /// Keep-alives three times per TTL, look-ups as often, retries after `retry_after`.
    pub fn for_ttl(ttl_secs: i64, retry_after: Duration) -> Self {
        let ttl_secs = ttl_secs.max(1);
        LeadershipConfig { ttl_secs, refresh_every: Duration::from_millis(ttl_secs as u64 * 1000 / 3), retry_after }
    }
}

/// Where the coordinator is in winning and keeping leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// No lease: asking for one (`retry_at` `None`: the request is in flight).
    NoLease { retry_at: Option<Instant> },
    /// Holding `lease`, campaigning with it (`retry_at` `None`: the campaign is in flight).
    Campaigning { lease: i64, retry_at: Option<Instant> },
    /// Elected with `lease`.
    Leading { lease: i64 },
}

/// The leader/standby/step-down state machine of one coordinator (see the module docs).
#[derive(Debug)]
pub struct Leadership {
    cfg: LeadershipConfig,
    /// This coordinator's name (its certificate name): a looked-up leader of another name means
    /// another coordinator leads.
    name: String,
    phase: Phase,
    etcd: EtcdHealth,
    /// When etcd last answered.
    etcd_last_ok: Option<Instant>,
    /// The leader etcd last named (`None`: none, or not looked up yet).
    leader: Option<LeaderRecord>,
    next_refresh: Instant,
    keep_alive_in_flight: bool,
    look_up_in_flight: bool,
    /// Cleared when leadership changes while a look-up is in flight: its answer may predate
    /// the change (read before this coordinator was elected) and must not end the leadership.
    look_up_current: bool,
    actions: VecDeque<LeadAction>,
}

impl Leadership {
    /// A coordinator named `name` that has just started: it asks for a lease at once.
    pub fn new(cfg: LeadershipConfig, name: impl Into<String>, now: Instant) -> Self {
        let mut l = Leadership {
            phase: Phase::NoLease { retry_at: Some(now) },
            cfg,
            name: name.into(),
            etcd: EtcdHealth::Unknown,
            etcd_last_ok: None,
            leader: None,
            next_refresh: now,
            keep_alive_in_flight: false,
            look_up_in_flight: false,
            look_up_current: false,
            actions: VecDeque::new(),
        };
        l.handle_timeout(now);
        l
    }

    pub fn role(&self) -> Role {
        match self.phase {
            Phase::Leading { .. } => Role::Leader,
            _ => Role::Standby,
        }
    }

    pub fn etcd(&self) -> &EtcdHealth {
        &self.etcd
    }

    /// How long ago etcd last answered.
    pub fn etcd_last_ok_age(&self, now: Instant) -> Option<Duration> {
        self.etcd_last_ok.map(|t| now.saturating_duration_since(t))
    }

    /// The leader etcd last named.
    pub fn leader(&self) -> Option<&LeaderRecord> {
        self.leader.as_ref()
    }

    /// The lease held, if any.
    pub fn lease(&self) -> Option<i64> {
        match self.phase {
            Phase::NoLease { .. } => None,
            Phase::Campaigning { lease, .. } | Phase::Leading { lease } => Some(lease),
        }
    }

    pub fn poll_action(&mut self) -> Option<LeadAction> {
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Instant {
        let retry = match self.phase {
            Phase::NoLease { retry_at } | Phase::Campaigning { retry_at, .. } => retry_at,
            Phase::Leading { .. } => None,
        };
        retry.map_or(self.next_refresh, |r| r.min(self.next_refresh))
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::NoLease { retry_at: Some(t) } if now >= t => {
                self.phase = Phase::NoLease { retry_at: None };
                self.actions.push_back(LeadAction::GrantLease { ttl_secs: self.cfg.ttl_secs });
            }
            Phase::Campaigning { lease, retry_at: Some(t) } if now >= t => {
                self.phase = Phase::Campaigning { lease, retry_at: None };
                self.actions.push_back(LeadAction::Campaign { lease });
            }
            _ => {}
        }
        if now >= self.next_refresh {
            self.next_refresh = now + self.cfg.refresh_every;
            if let Some(lease) = self.lease() {
                if !self.keep_alive_in_flight {
                    self.keep_alive_in_flight = true;
                    self.actions.push_back(LeadAction::KeepAlive { lease });
                }
            }
            if !self.look_up_in_flight {
                self.look_up_in_flight = true;
                self.look_up_current = true;
                self.actions.push_back(LeadAction::LookUpLeader);
            }
        }
    }

    fn etcd_answered(&mut self, now: Instant) {
        self.etcd = EtcdHealth::Up;
        self.etcd_last_ok = Some(now);
    }

    /// A call failed (etcd unreachable, timed out, or refused it). Leadership does not change.
    pub fn call_failed(&mut self, now: Instant, call: &LeadAction, error: String) {
        self.etcd = EtcdHealth::Down { error };
        match call {
            LeadAction::GrantLease { .. } if self.phase == (Phase::NoLease { retry_at: None }) => {
                self.phase = Phase::NoLease { retry_at: Some(now + self.cfg.retry_after) };
            }
            LeadAction::KeepAlive { .. } => self.keep_alive_in_flight = false,
            LeadAction::LookUpLeader => self.look_up_in_flight = false,
            _ => {}
        }
    }

    pub fn lease_granted(&mut self, now: Instant, lease: i64) {
        self.etcd_answered(now);
        if self.phase != (Phase::NoLease { retry_at: None }) {
            return;
        }
        self.phase = Phase::Campaigning { lease, retry_at: None };
        self.actions.push_back(LeadAction::Campaign { lease });
    }

    /// The answer to a keep-alive of `lease`: `ttl_secs` 0 means etcd no longer has it.
    pub fn keep_alive_answered(&mut self, now: Instant, lease: i64, ttl_secs: i64) {
        self.etcd_answered(now);
        self.keep_alive_in_flight = false;
        if ttl_secs <= 0 && self.lease() == Some(lease) {
            self.lose_lease(now, format!("lost its etcd lease {lease:x}"));
        }
    }

    /// The campaign with `lease` returned: this coordinator leads.
    pub fn elected(&mut self, now: Instant, lease: i64) {
        self.etcd_answered(now);
        if self.phase != (Phase::Campaigning { lease, retry_at: None }) {
            return;
        }
        self.phase = Phase::Leading { lease };
        self.look_up_current = false;
        self.actions.push_back(LeadAction::StartServing);
    }

    /// The campaign with `lease` failed (etcd restarted, unreachable): campaign again later.
    pub fn campaign_failed(&mut self, now: Instant, lease: i64, error: String) {
        self.etcd = EtcdHealth::Down { error };
        if self.phase == (Phase::Campaigning { lease, retry_at: None }) {
            self.phase = Phase::Campaigning { lease, retry_at: Some(now + self.cfg.retry_after) };
        }
    }

    /// etcd names `leader` as the current leader (`None`: nobody leads).
    pub fn leader_seen(&mut self, now: Instant, leader: Option<LeaderRecord>) {
        self.etcd_answered(now);
        self.look_up_in_flight = false;
        if !std::mem::replace(&mut self.look_up_current, false) {
            return;
        }
        if let (Phase::Leading { .. }, Some(other)) = (&self.phase, &leader) {
            if other.name != self.name {
                let reason = format!("etcd names {} the leader", other.name);
                self.leader = leader;
                self.lose_lease(now, reason);
                return;
            }
        }
        self.leader = leader;
    }

    /// The lease is gone: stop serving or campaigning, and start over with a new lease.
    fn lose_lease(&mut self, now: Instant, reason: String) {
        match std::mem::replace(&mut self.phase, Phase::NoLease { retry_at: Some(now) }) {
            Phase::Leading { .. } => self.actions.push_back(LeadAction::StopServing { reason }),
            Phase::Campaigning { retry_at: None, .. } => self.actions.push_back(LeadAction::CancelCampaign),
            _ => {}
        }
        self.keep_alive_in_flight = false;
        self.handle_timeout(now);
    }
}
