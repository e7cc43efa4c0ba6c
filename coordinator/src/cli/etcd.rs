//! `--membership etcd` on the command line: the etcd flags `serve` and `node` share, and the
//! serve loop of a coordinator that may lead or stand by.
//!
//! ```text
//!          ┌───────────── standby: /health 503 {"status":"standby","leader":…}, /v1/* 503 ─┐
//! start ──▶│  campaigning (lib: discovery::Leadership, driven by discovery::etcd)          │
//!          └── elected ──▶ start the cluster on --cluster-listen and wait for its groups   │
//!                          ──▶ serve the full API (HTTP/1.1 + HTTP/3) ── lease lost ──────────┘
//! ```
//!
//! The standby's HTTP/1.1 listener (an [`InterimServer`] with the real server's connection limits)
//! hands its socket to the leader's server when elected, so the `--listen` address never refuses a
//! connection then; after a step-down the leader's server hands the same socket back to a new
//! standby (it stops accepting at once, so clients that connect while requests in flight drain wait
//! in the backlog and are answered by the standby; one accepted just before the stop is answered,
//! not closed unread). A standby does not proxy to the
//! leader: it names it, and clients retry (bytes are identical wherever they land).

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use clap::Args;
use lockstep_coordinator::api::{self, ApiError, EdgeLimits, InterimServer, ServeOptions, Server};
use lockstep_coordinator::discovery::etcd::{Campaigner, DiscoveryStatus, EtcdOptions};
use lockstep_coordinator::discovery::{LeaderRecord, MembershipMode, Role, DEFAULT_CLUSTER_NAME};
use lockstep_coordinator::engine::ModelInfo;
use lockstep_coordinator::service::SubmitError;
use lockstep_coordinator::state::Auth;
use serde_json::json;
use tokio::sync::watch;

use super::serve::ServeArgs;

/// Where etcd is, for `--membership etcd`.
#[derive(Args, Clone)]
pub(crate) struct EtcdArgs {
    /// etcd members for `--membership etcd` (`http://host:port`, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub(crate) etcd_endpoints: Vec<String>,
    /// The cluster's name in etcd: its coordinators and nodes all use the same one.
    #[arg(long, default_value = DEFAULT_CLUSTER_NAME)]
    pub(crate) cluster_name: String,
}

impl EtcdArgs {
    pub(crate) fn options(&self) -> Result<EtcdOptions> {
        if self.etcd_endpoints.is_empty() {
            bail!("--membership etcd needs --etcd-endpoints URL[,URL…]");
        }
        Ok(EtcdOptions { endpoints: self.etcd_endpoints.clone(), cluster: self.cluster_name.clone() })
    }
}

/// How long a leader that steps down lets requests in flight finish.
const STEP_DOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a SIGTERM lets requests in flight finish (as `api::run`).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest wait for a stepped-down leader's cluster to let go of its address.
const RELEASE_WAIT: Duration = Duration::from_secs(15);

/// `lockstep serve --membership etcd`: stand by, lead when elected, step down when the lease is
/// lost, until SIGINT/SIGTERM.
pub(crate) fn serve(a: &ServeArgs, auth: Auth, info: ModelInfo, edge: EdgeLimits) -> Result<()> {
    let etcd = a.etcd.options()?;
    if a.cluster.tls_dir.is_none() {
        bail!("--membership etcd needs --tls-dir with the cluster CA and this coordinator's certificate (--name)");
    }
    // The address goes into the election value before the cluster binds it, so it must be
    // concrete: port 0 is resolved here, once.
    let cluster_addr = concrete_udp_addr(a.cluster.cluster_listen)?;
    let mut cluster_args = a.cluster.clone();
    cluster_args.membership = Some(MembershipMode::Static);
    cluster_args.cluster_listen = cluster_addr;
    let node_timeout = Duration::from_millis(a.cluster.node_timeout_ms);

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("lockstep-http").build()?;
    let (stop_tx, stop) = watch::channel(false);
    rt.spawn(async move {
        api::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // Bound first: the election value names the HTTP address.
    let mut standby = Some(rt.block_on(StandbyServer::start(a.listen, None, edge))?);
    let http_addr = standby.as_ref().expect("started").addr();
    let me = LeaderRecord {
        name: a.cluster.coordinator_name.clone(),
        cluster_addr: cluster_addr.to_string(),
        http_addr: http_addr.to_string(),
    };
    let campaign = |rt: &tokio::runtime::Runtime| {
        let _guard = rt.enter();
        Campaigner::start(etcd.clone(), me.clone(), node_timeout)
    };
    let mut campaigner = campaign(&rt);
    if let Some(s) = &mut standby {
        s.follow(campaigner.status());
    }
    // Scripts and tests wait for `standby on http://`.
    tracing::info!(
        "{} standby on http://{http_addr} in etcd cluster {} (nodes will dial {cluster_addr}); campaigning",
        me.name,
        etcd.cluster
    );
    loop {
        let mut status = campaigner.status();
        if !rt.block_on(wait_for(&mut status, &stop, |s| s.role == Role::Leader)) {
            break;
        }
        tracing::info!("{} was elected; starting the cluster on {cluster_addr}", me.name);
        let state = match a.start_state(auth.clone(), info.clone(), &cluster_args) {
            Ok(state) => state,
            Err(e) => {
                // Leave the election so a coordinator that can serve takes over.
                tracing::error!("{} cannot lead: {e:#}; resigning", me.name);
                rt.block_on(campaigner.stop());
                std::thread::sleep(Duration::from_secs(1));
                campaigner = campaign(&rt);
                if let Some(s) = &mut standby {
                    s.follow(campaigner.status());
                }
                continue;
            }
        };
        if let Some(c) = state.service.cluster() {
            c.set_discovery(campaigner.status());
        }
        let opts = ServeOptions { listen: http_addr, h3: a.h3_options(), edge };
        let server = match standby.take() {
            Some(s) => {
                let listener = rt.block_on(s.into_listener())?;
                rt.block_on(Server::start_on(listener, state.clone(), opts))?
            }
            None => rt.block_on(Server::start(state.clone(), opts))?,
        };
        tracing::info!(http_addr = %server.http_addr, "{} leads: {}", me.name, server.banner());
        let still_leader = rt.block_on(wait_for(&mut status, &stop, |s| s.role != Role::Leader));
        let grace = if still_leader { STEP_DOWN_GRACE } else { SHUTDOWN_GRACE };
        let listener = rt.block_on(server.shutdown_keeping_listener(grace));
        let service = Arc::downgrade(&state.service);
        drop(state);
        wait_released(&service);
        if !still_leader {
            break;
        }
        tracing::warn!("{} stepped down: standby on http://{http_addr} again; campaigning", me.name);
        let status = Some(campaigner.status());
        standby = Some(match listener {
            // The same socket: clients that connected during the step-down are answered by the standby.
            Some(listener) => rt.block_on(async { StandbyServer::start_on(listener, status, edge) })?,
            None => rt.block_on(StandbyServer::start(http_addr, status, edge))?,
        });
    }
    tracing::info!("shutting down");
    if let Some(s) = standby.take() {
        drop(rt.block_on(s.into_listener()));
    }
    // Revoking the lease hands the election to a standby at once.
    rt.block_on(campaigner.stop());
    Ok(())
}

/// Waits until `status` satisfies `done` (`true`) or a shutdown signal came (`false`).
async fn wait_for(
    status: &mut watch::Receiver<DiscoveryStatus>,
    stop: &watch::Receiver<bool>,
    done: impl Fn(&DiscoveryStatus) -> bool,
) -> bool {
    let mut stop = stop.clone();
    tokio::select! {
        r = status.wait_for(|s| done(s)) => r.is_ok(),
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Waits (bounded) until the last handle on a stepped-down leader's service is gone, so its
/// cluster has closed its QUIC address before it may be bound again.
fn wait_released(service: &Weak<lockstep_coordinator::service::Service>) {
    let deadline = Instant::now() + RELEASE_WAIT;
    while service.strong_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `addr`, with port 0 replaced by a free UDP port.
fn concrete_udp_addr(addr: SocketAddr) -> Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let socket = UdpSocket::bind(addr).with_context(|| format!("finding a free UDP port on {}", addr.ip()))?;
    Ok(socket.local_addr()?)
}

/// The HTTP/1.1 server of a standby: it answers, but serves nothing.
struct StandbyServer {
    interim: InterimServer,
    status: StandbyState,
}

type StandbyState = Arc<std::sync::Mutex<Option<watch::Receiver<DiscoveryStatus>>>>;

impl StandbyServer {
    async fn start(
        listen: SocketAddr,
        status: Option<watch::Receiver<DiscoveryStatus>>,
        edge: EdgeLimits,
    ) -> Result<StandbyServer> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding HTTP on tcp {listen}: {e}"))?;
        Self::start_on(listener, status, edge)
    }

    /// [`StandbyServer::start`] on a listener already bound (the one a stepped-down leader served on).
    fn start_on(
        listener: tokio::net::TcpListener,
        status: Option<watch::Receiver<DiscoveryStatus>>,
        edge: EdgeLimits,
    ) -> Result<StandbyServer> {
        let state: StandbyState = Arc::new(std::sync::Mutex::new(status));
        let app = axum::Router::new()
            .route("/health", axum::routing::get(standby_health))
            .fallback(standby_refusal)
            .with_state(state.clone());
        Ok(StandbyServer { interim: InterimServer::start_on(listener, app, edge)?, status: state })
    }

    fn addr(&self) -> SocketAddr {
        self.interim.http_addr
    }

    /// Report this campaign's status from now on.
    fn follow(&mut self, status: watch::Receiver<DiscoveryStatus>) {
        *self.status.lock().expect("lock") = Some(status);
    }

    /// Stops answering; the listener goes to the leader's server.
    async fn into_listener(self) -> Result<tokio::net::TcpListener> {
        self.interim.into_listener().await
    }
}

/// What a standby says about itself: `standby` with the leader etcd names, or `starting` when
/// it was just elected and its groups are forming.
fn standby_body(state: &StandbyState) -> serde_json::Value {
    let status = state.lock().expect("lock").as_ref().map(|s| s.borrow().clone());
    let Some(s) = status else { return json!({ "status": "standby", "leader": null }) };
    let (word, leader) = match s.role {
        Role::Leader => ("starting", Some(s.name.clone())),
        Role::Standby => ("standby", s.leader.as_ref().map(|l| l.name.clone())),
    };
    json!({
        "status": word,
        "leader": leader,
        "leader_http": s.leader.as_ref().filter(|_| s.role == Role::Standby).map(|l| l.http_addr.clone()),
        "name": s.name,
        "cluster_name": s.cluster_name,
        "etcd": s.etcd,
    })
}

async fn standby_health(State(state): State<StandbyState>) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(standby_body(&state))).into_response()
}

/// `/v1/*` (and everything else): 503 with `Retry-After`, naming the leader.
async fn standby_refusal(State(state): State<StandbyState>, req: Request) -> Response {
    let body = standby_body(&state);
    if req.uri().path().starts_with("/v1/") {
        let leader = body["leader"].as_str().map_or("unknown".to_string(), |l| {
            format!("{l}{}", body["leader_http"].as_str().map(|h| format!(" at http://{h}")).unwrap_or_default())
        });
        let message =
            format!("this coordinator is a {}; the leader is {leader}", body["status"].as_str().unwrap_or("standby"));
        return ApiError::Submit(SubmitError::Unavailable(message)).into_response();
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
