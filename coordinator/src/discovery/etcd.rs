//! The etcd I/O of discovery, kept thin: the coordinator's [`Campaigner`] carries out the
//! [`Leadership`] state machine's actions with `etcd-client` (every call bounded by
//! [`CALL_TIMEOUT`] but the campaign, which waits to be elected) and publishes the resulting
//! [`DiscoveryStatus`]; [`run_node`] registers a node under its lease and follows the leader.
//!
//! Nodes look the leader up every [`LOOK_UP_EVERY`] (a unary call, which survives etcd restarts
//! without stream bookkeeping) and leave their coordinator as soon as etcd names another one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use lockstep_node::server::{NodeError, NodeOptions};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{
    election_name, lease_ttl_secs, node_key, node_prefix, EtcdHealth, LeadAction, LeaderRecord, Leadership,
    LeadershipConfig, NodeRecord, Role,
};

/// Longest wait for one etcd call (the campaign excepted): past it, etcd counts as down.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a node looks up the leader.
pub const LOOK_UP_EVERY: Duration = Duration::from_millis(200);
/// Pause before a grant, campaign or dial that failed is tried again.
pub const RETRY_AFTER: Duration = Duration::from_millis(300);
/// Longest wait for a QUIC handshake with the leader (a leader elected but not yet listening
/// never answers; the node looks the leader up again instead of waiting for the idle timeout).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the leader record in etcd is not valid: {0}")]
    Record(String),
    #[error("--etcd-endpoints is empty")]
    NoEndpoints,
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
}

/// Where etcd is and which cluster to meet in.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port` (or `host:port`) of the etcd members.
    pub endpoints: Vec<String>,
    /// The cluster's name: coordinators and nodes of one cluster use the same one.
    pub cluster: String,
}

impl EtcdOptions {
    async fn connect(&self) -> Result<Client, DiscoveryError> {
        if self.endpoints.is_empty() {
            return Err(DiscoveryError::NoEndpoints);
        }
        // No request timeout on the client: a campaign waits as long as another coordinator
        // leads. Every other call is bounded by `bounded`.
        let opts = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT).with_keep_alive(CALL_TIMEOUT, CALL_TIMEOUT);
        bounded(Client::connect(&self.endpoints, Some(opts))).await
    }
}

/// `call`, failing with [`DiscoveryError::Timeout`] past [`CALL_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DiscoveryError::Timeout(CALL_TIMEOUT)),
    }
}

async fn grant(client: &mut Client, ttl_secs: i64) -> Result<i64, DiscoveryError> {
    Ok(bounded(client.lease_grant(ttl_secs, None)).await?.id())
}

/// One keep-alive of `lease`: the TTL etcd gives it (0: etcd no longer has it).
async fn keep_alive_once(client: &mut Client, lease: i64) -> Result<i64, DiscoveryError> {
    bounded(async {
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        match answers.message().await? {
            Some(a) => Ok(a.ttl()),
            None => Err(etcd_client::Error::LeaseKeepAliveError("the keep-alive stream closed".into())),
        }
    })
    .await
}

/// The current leader of `cluster`'s election, `None` when nobody leads.
async fn look_up_leader(client: &mut Client, cluster: &str) -> Result<Option<LeaderRecord>, DiscoveryError> {
    match bounded(client.leader(election_name(cluster))).await {
        Ok(answer) => match answer.kv() {
            Some(kv) => serde_json::from_slice(kv.value()).map(Some).map_err(|e| DiscoveryError::Record(e.to_string())),
            None => Ok(None),
        },
        // etcd answers an election without a leader with an error status, not an empty answer.
        Err(DiscoveryError::Etcd(etcd_client::Error::GRpcStatus(s))) if s.message().contains("no leader") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The nodes registered in `cluster`, by name (records that do not parse are skipped).
async fn registered_nodes(client: &mut Client, cluster: &str) -> Result<Vec<NodeRecord>, DiscoveryError> {
    let answer = bounded(client.get(node_prefix(cluster), Some(GetOptions::new().with_prefix()))).await?;
    let mut nodes: Vec<NodeRecord> =
        answer.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// What this coordinator's discovery looks like, for `/health`, `/ops/cluster` and the serve loop.
#[derive(Debug, Clone, Serialize)]
pub struct DiscoveryStatus {
    /// Always `etcd`.
    pub membership: &'static str,
    pub cluster_name: String,
    /// This coordinator's name.
    pub name: String,
    pub role: Role,
    /// The leader etcd last named.
    pub leader: Option<LeaderRecord>,
    pub etcd: EtcdHealth,
    pub etcd_endpoints: Vec<String>,
    pub etcd_last_ok_ms_ago: Option<u64>,
    /// The lease this coordinator holds (hex), if any.
    pub lease: Option<String>,
    /// The nodes registered in etcd (alive: under a lease), as last read with the leader.
    pub registered_nodes: Vec<NodeRecord>,
}

/// What an etcd call in flight answers.
enum Answer {
    Granted(Result<i64, DiscoveryError>),
    KeptAlive(i64, Result<i64, DiscoveryError>),
    Campaigned(i64, Result<(), DiscoveryError>),
    Leader(Result<Option<LeaderRecord>, DiscoveryError>),
    Nodes(Vec<NodeRecord>),
}

/// A coordinator taking part in its cluster's election (see the module docs of [`super`]).
/// Dropping it revokes the lease, so a standby takes over at once.
pub struct Campaigner {
    status: watch::Receiver<DiscoveryStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Campaigner {
    /// Starts campaigning as `me` (call inside a tokio runtime). The lease TTL covers
    /// `node_timeout`.
    pub fn start(etcd: EtcdOptions, me: LeaderRecord, node_timeout: Duration) -> Campaigner {
        let ttl_secs = lease_ttl_secs(node_timeout);
        let leadership =
            Leadership::new(LeadershipConfig::for_ttl(ttl_secs, RETRY_AFTER), me.name.clone(), Instant::now());
        let status = render(&leadership, &etcd, &me.name, &[]);
        let (status_tx, status_rx) = watch::channel(status);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(campaign_loop(etcd, me, leadership, status_tx, stopped));
        Campaigner { status: status_rx, stop: Some(stop), task: Some(task) }
    }

    /// The current status; `changed()` on it wakes when the role (or anything else) changes.
    pub fn status(&self) -> watch::Receiver<DiscoveryStatus> {
        self.status.clone()
    }

    /// Revokes the lease (bounded) and stops.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(CALL_TIMEOUT * 2, t).await;
        }
    }
}

impl Drop for Campaigner {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn render(l: &Leadership, etcd: &EtcdOptions, name: &str, nodes: &[NodeRecord]) -> DiscoveryStatus {
    DiscoveryStatus {
        membership: "etcd",
        cluster_name: etcd.cluster.clone(),
        name: name.to_string(),
        role: l.role(),
        leader: l.leader().cloned(),
        etcd: l.etcd().clone(),
        etcd_endpoints: etcd.endpoints.clone(),
        etcd_last_ok_ms_ago: l.etcd_last_ok_age(Instant::now()).map(|d| d.as_millis() as u64),
        lease: l.lease().map(|id| format!("{id:x}")),
        registered_nodes: nodes.to_vec(),
    }
}

async fn campaign_loop(
    etcd: EtcdOptions,
    me: LeaderRecord,
    mut l: Leadership,
    status: watch::Sender<DiscoveryStatus>,
    mut stopped: oneshot::Receiver<()>,
) {
    let value = serde_json::to_vec(&me).expect("a leader record serializes");
    let mut client = loop {
        match etcd.connect().await {
            Ok(c) => break c,
            Err(e) => {
                l.call_failed(Instant::now(), &LeadAction::LookUpLeader, e.to_string());
                status.send_replace(render(&l, &etcd, &me.name, &[]));
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    };
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut campaign: Option<JoinHandle<()>> = None;
    let mut registered: Vec<NodeRecord> = Vec::new();
    loop {
        while let Some(action) = l.poll_action() {
            let mut c = client.clone();
            let tx = answers.clone();
            match action {
                LeadAction::GrantLease { ttl_secs } => {
                    tokio::spawn(async move {
                        let _ = tx.send(Answer::Granted(grant(&mut c, ttl_secs).await));
                    });
                }
                LeadAction::KeepAlive { lease } => {
                    tokio::spawn(async move {
                        let _ = tx.send(Answer::KeptAlive(lease, keep_alive_once(&mut c, lease).await));
                    });
                }
                LeadAction::Campaign { lease } => {
                    let (name, value) = (election_name(&etcd.cluster), value.clone());
                    campaign = Some(tokio::spawn(async move {
                        let result = c.campaign(name, value, lease).await.map(|_| ()).map_err(DiscoveryError::from);
                        let _ = tx.send(Answer::Campaigned(lease, result));
                    }));
                }
                LeadAction::CancelCampaign => {
                    if let Some(t) = campaign.take() {
                        t.abort();
                    }
                }
                LeadAction::LookUpLeader => {
                    let cluster = etcd.cluster.clone();
                    tokio::spawn(async move {
                        let leader = look_up_leader(&mut c, &cluster).await;
                        let reached = leader.is_ok();
                        let _ = tx.send(Answer::Leader(leader));
                        if reached {
                            if let Ok(nodes) = registered_nodes(&mut c, &cluster).await {
                                let _ = tx.send(Answer::Nodes(nodes));
                            }
                        }
                    });
                }
                LeadAction::StartServing => {
                    tracing::info!("{} leads cluster {} (etcd election)", me.name, etcd.cluster)
                }
                LeadAction::StopServing { reason } => {
                    tracing::warn!("{} steps down as the leader of cluster {}: {reason}", me.name, etcd.cluster)
                }
            }
        }
        let rendered = render(&l, &etcd, &me.name, &registered);
        status.send_if_modified(|old| {
            // The age of etcd's last answer changes all the time; only a change of anything
            // else wakes the serve loop.
            let changed = old.role != rendered.role
                || old.leader != rendered.leader
                || old.etcd != rendered.etcd
                || old.lease != rendered.lease;
            *old = rendered;
            changed
        });
        let deadline = tokio::time::Instant::from_std(l.poll_timeout());
        tokio::select! {
            _ = &mut stopped => break,
            Some(answer) = answered.recv() => {
                let now = Instant::now();
                match answer {
                    Answer::Granted(Ok(lease)) => l.lease_granted(now, lease),
                    Answer::Granted(Err(e)) => l.call_failed(now, &LeadAction::GrantLease { ttl_secs: 0 }, e.to_string()),
                    Answer::KeptAlive(lease, Ok(ttl)) => l.keep_alive_answered(now, lease, ttl),
                    Answer::KeptAlive(lease, Err(e)) => l.call_failed(now, &LeadAction::KeepAlive { lease }, e.to_string()),
                    Answer::Campaigned(lease, Ok(())) => l.elected(now, lease),
                    Answer::Campaigned(lease, Err(e)) => l.campaign_failed(now, lease, e.to_string()),
                    Answer::Leader(Ok(leader)) => l.leader_seen(now, leader),
                    Answer::Leader(Err(e)) => l.call_failed(now, &LeadAction::LookUpLeader, e.to_string()),
                    Answer::Nodes(nodes) => registered = nodes,
                }
            }
            _ = tokio::time::sleep_until(deadline) => l.handle_timeout(Instant::now()),
        }
    }
    if let Some(t) = campaign.take() {
        t.abort();
    }
    // Revoking the lease deletes the election key at once: a standby does not wait for the TTL.
    if let Some(lease) = l.lease() {
        let _ = bounded(client.lease_revoke(lease)).await;
    }
}

/// Registers a node under its lease and keeps the registration alive: re-registers under a new
/// lease when etcd lost the old one, and rewrites the record when the fingerprint changes.
async fn keep_registered(
    etcd: EtcdOptions,
    mut client: Client,
    ttl_secs: i64,
    mut record: NodeRecord,
    mut fingerprint: watch::Receiver<String>,
) {
    let key = node_key(&etcd.cluster, &record.name);
    let refresh_every = super::LeadershipConfig::for_ttl(ttl_secs, RETRY_AFTER).refresh_every;
    let mut lease: Option<i64> = None;
    let mut written = false;
    let mut was_down = false;
    loop {
        let result: Result<(), DiscoveryError> = async {
            let id = match lease {
                Some(id) => id,
                None => {
                    let id = grant(&mut client, ttl_secs).await?;
                    lease = Some(id);
                    written = false;
                    id
                }
            };
            if !written {
                let value = serde_json::to_vec(&record).expect("a node record serializes");
                bounded(client.put(key.clone(), value, Some(PutOptions::new().with_lease(id)))).await?;
                written = true;
            }
            if keep_alive_once(&mut client, id).await? <= 0 {
                tracing::warn!("node {}: etcd lost its lease; registering again", record.name);
                lease = None;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) if was_down => {
                tracing::info!("node {}: etcd answers again", record.name);
                was_down = false;
            }
            Ok(()) => {}
            Err(e) if !was_down => {
                tracing::warn!("node {}: etcd unavailable ({e}); keeping the coordinator it has", record.name);
                was_down = true;
            }
            Err(_) => {}
        }
        let wait = if lease.is_none() || !written { RETRY_AFTER } else { refresh_every };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = fingerprint.changed() => {
                record.fingerprint = fingerprint.borrow_and_update().clone();
                written = false;
            }
        }
    }
}

/// Resolves once etcd names a leader other than `current`.
async fn leader_changed(mut client: Client, cluster: String, current: LeaderRecord) {
    loop {
        tokio::time::sleep(LOOK_UP_EVERY).await;
        if let Ok(Some(leader)) = look_up_leader(&mut client, &cluster).await {
            if leader != current {
                return;
            }
        }
    }
}

/// `lockstep node --membership etcd`: register under a lease of `node_timeout`, then serve
/// whichever coordinator leads, one session after another, until the process is stopped, the
/// node refuses an assignment (other weights or numerics) or its certificate cannot be loaded.
pub fn run_node(opts: NodeOptions, etcd: EtcdOptions, node_timeout: Duration) -> Result<(), DiscoveryError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lockstep-node-io")
        .enable_all()
        .build()
        .map_err(DiscoveryError::Runtime)?;
    let result = rt.block_on(follow_leader(Arc::new(opts), etcd, node_timeout));
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn follow_leader(
    opts: Arc<NodeOptions>,
    etcd: EtcdOptions,
    node_timeout: Duration,
) -> Result<(), DiscoveryError> {
    let endpoint = lockstep_node::server::bind(&opts)?;
    let ring_addr = endpoint.local_addr().map_err(NodeError::from)?;
    let mut client = loop {
        match etcd.connect().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!("node {}: cannot reach etcd ({e}); retrying", opts.name);
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    };
    let (fingerprint_tx, fingerprint_rx) = watch::channel(String::new());
    let record = NodeRecord { name: opts.name.clone(), ring_addr: ring_addr.to_string(), fingerprint: String::new() };
    let registration = tokio::spawn(keep_registered(
        etcd.clone(),
        client.clone(),
        lease_ttl_secs(node_timeout),
        record,
        fingerprint_rx,
    ));
    tracing::info!("node {}: registered in etcd cluster {}; following its leader", opts.name, etcd.cluster);
    let result = loop {
        let leader = match look_up_leader(&mut client, &etcd.cluster).await {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => {
                tokio::time::sleep(LOOK_UP_EVERY).await;
                continue;
            }
        };
        let addr = match lockstep_transport::resolve(&leader.cluster_addr).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("node {}: leader {} has no usable address: {e}", opts.name, leader.name);
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        match serve_leader(&opts, &endpoint, addr, &leader, &client, &etcd, &fingerprint_tx).await {
            Ok(()) => tracing::info!("node {}: left coordinator {}", opts.name, leader.name),
            // Other weights, other numerics, or a certificate this node cannot use: following
            // another leader would not change that.
            Err(e @ (NodeError::Assignment(_) | NodeError::Cert(_))) => break Err(e.into()),
            Err(e) => {
                tracing::warn!("node {}: coordinator {} at {addr}: {e}", opts.name, leader.name);
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    };
    registration.abort();
    endpoint.close("node exiting");
    result
}

/// One session with the leader `leader` at `addr`, left as soon as etcd names another leader.
async fn serve_leader(
    opts: &Arc<NodeOptions>,
    endpoint: &Arc<lockstep_transport::Endpoint>,
    addr: SocketAddr,
    leader: &LeaderRecord,
    client: &Client,
    etcd: &EtcdOptions,
    fingerprint: &watch::Sender<String>,
) -> Result<(), NodeError> {
    let conn = match tokio::time::timeout(DIAL_TIMEOUT, endpoint.connect(addr, lockstep_transport::DEFAULT_SERVER_NAME))
        .await
    {
        Ok(c) => c?,
        Err(_) => return Err(NodeError::Protocol(format!("no QUIC handshake within {DIAL_TIMEOUT:?}"))),
    };
    tracing::info!("node {}: joining coordinator {} at {addr}", opts.name, leader.name);
    let leave = leader_changed(client.clone(), etcd.cluster.clone(), leader.clone());
    lockstep_node::server::serve_coordinator(opts.clone(), endpoint.clone(), conn, leave, Some(fingerprint)).await
}
