//! `lockstep serve`: the OpenAI-compatible API, ops API and dashboard over HTTP/1.1 and HTTP/3.
//!
//! The HTTP address answers from the start: while the serving core loads (and a static cluster
//! waits for its nodes) [`InterimServer`](lockstep_coordinator::api::InterimServer) answers `/health` with
//! 503 `forming`; the same listener then goes to the real server. Keys come from flags, files
//! (`--api-key-file`, `--ops-key-file`) and the environment (`LOCKSTEP_API_KEY`,
//! `LOCKSTEP_OPS_KEY`, comma-separated); an empty key is refused at start.

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use lockstep_coordinator::api::EdgeLimits;
use lockstep_coordinator::api::{self, auth::collect_keys};
use lockstep_coordinator::cluster::NodesMode;
use lockstep_coordinator::discovery::MembershipMode;
use lockstep_coordinator::engine::{backend_fingerprint_name, ModelInfo};
use lockstep_coordinator::state::DEFAULT_BODY_TIMEOUT;
use lockstep_coordinator::state::{AppState, Auth};

use super::etcd::EtcdArgs;
use super::{start_service, ClusterArgs, EngineArgs};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// HTTP/1.1 address (TCP).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub(crate) listen: std::net::SocketAddr,
    /// HTTP/3 address (UDP). Default: the --listen address and port, on UDP.
    #[arg(long)]
    h3_listen: Option<std::net::SocketAddr>,
    /// Serve HTTP/1.1 only.
    #[arg(long, conflicts_with = "h3_listen")]
    no_h3: bool,
    /// Where to write the self-signed HTTP/3 certificate's PEM when --tls-dir has no
    /// server.pem/server.key (default: a file in the temp directory, printed at start-up).
    #[arg(long)]
    h3_cert_out: Option<PathBuf>,
    /// A bearer key accepted on /v1/*, /tokenize and /detokenize (repeatable; none: no auth).
    /// Keys on the command line are visible in `ps`: prefer --api-key-file or LOCKSTEP_API_KEY.
    #[arg(long = "api-key")]
    api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long, env = "LOCKSTEP_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// A bearer key accepted on /metrics, /ops/* and /dashboard (repeatable; none: no auth).
    /// Keys on the command line are visible in `ps`: prefer --ops-key-file or LOCKSTEP_OPS_KEY.
    #[arg(long = "ops-key")]
    ops_key: Vec<String>,
    /// A file of ops keys, one per line (blank lines and `#` comments ignored).
    #[arg(long, env = "LOCKSTEP_OPS_KEY_FILE")]
    ops_key_file: Option<PathBuf>,
    /// Seconds a client has to send a request's head (also how long an idle keep-alive
    /// connection stays open).
    #[arg(long, default_value_t = api::DEFAULT_HEADER_TIMEOUT.as_secs())]
    header_timeout_s: u64,
    /// Seconds a client has to send a request's body once its head arrived (else 408).
    #[arg(long, default_value_t = DEFAULT_BODY_TIMEOUT.as_secs())]
    body_timeout_s: u64,
    /// Most connections served at once (HTTP/1.1 and HTTP/3 together); past it, a few more may
    /// ask /health and the rest are closed at once.
    #[arg(long, default_value_t = api::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Most requests waiting for a running slot before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// The model name clients use (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds between determinism canary checks (0: no canary).
    #[arg(long, default_value_t = 30)]
    canary_every: u64,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    #[command(flatten)]
    pub(crate) etcd: EtcdArgs,
}

/// Environment variables holding keys (comma-separated), next to the flags and files.
const API_KEY_ENV: &str = "LOCKSTEP_API_KEY";
const OPS_KEY_ENV: &str = "LOCKSTEP_OPS_KEY";

pub(crate) fn run(a: ServeArgs) -> Result<()> {
    use lockstep_coordinator::api::{forming_app, InterimServer, ServeOptions};

    let auth = a.auth()?;
    let edge = a.edge()?;
    raise_fd_limit();
    // A certificate directory of our own (not --h3-cert-out's) goes when the server does.
    let _remove_cert_dir = (a.h3_cert_out.is_none() && !a.no_h3).then(|| RemoveOnDrop(a.temp_cert_dir()));
    let opts = a.engine.options()?;
    if a.cluster.membership == Some(MembershipMode::Etcd) {
        let mut info = ModelInfo::load(&a.model, &opts, &backend_fingerprint_name(&opts)?)?;
        if let Some(name) = &a.served_model_name {
            info.name = name.clone();
        }
        return super::etcd::serve(&a, auth, info, edge);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("lockstep-http").build()?;
    // Until the serving core stands (a static cluster waits for its nodes), /health says so.
    let reason = match a.cluster.nodes_mode() {
        NodesMode::Static => "waiting for nodes to join and form groups (static membership)",
        NodesMode::Embedded => "loading the model and starting its nodes",
    };
    let forming = runtime.block_on(InterimServer::start(a.listen, forming_app(reason.into()), edge))?;
    tracing::info!(http_addr = %forming.http_addr, "answering /health (forming) on http://{}", forming.http_addr);
    let mut info = ModelInfo::load(&a.model, &opts, &backend_fingerprint_name(&opts)?)?;
    if let Some(name) = &a.served_model_name {
        info.name = name.clone();
    }
    let state = a.start_state(auth, info, &a.cluster)?;
    runtime.block_on(async {
        let listener = forming.into_listener().await?;
        api::run_on(listener, state, ServeOptions { listen: a.listen, h3: a.h3_options(), edge }).await
    })
}

impl ServeArgs {
    /// The API and ops keys of the flags, the key files and the environment.
    pub(crate) fn auth(&self) -> Result<Auth> {
        let env = |name: &str| std::env::var(name).ok();
        let api_keys = collect_keys("API", &self.api_key, self.api_key_file.as_slice(), env(API_KEY_ENV).as_deref())?;
        let ops_keys = collect_keys("ops", &self.ops_key, self.ops_key_file.as_slice(), env(OPS_KEY_ENV).as_deref())?;
        Ok(Auth { api_keys, ops_keys })
    }

    /// The connection limits of `--header-timeout-s` and `--max-connections`.
    pub(crate) fn edge(&self) -> Result<EdgeLimits> {
        if self.max_connections == 0 || self.header_timeout_s == 0 || self.body_timeout_s == 0 {
            bail!("--max-connections, --header-timeout-s and --body-timeout-s must be at least 1");
        }
        Ok(EdgeLimits {
            header_timeout: Duration::from_secs(self.header_timeout_s),
            max_connections: self.max_connections,
        })
    }

    /// Loads the model where `cluster` says and starts everything the HTTP handlers share.
    pub(crate) fn start_state(&self, auth: Auth, info: ModelInfo, cluster: &ClusterArgs) -> Result<Arc<AppState>> {
        use lockstep_coordinator::ops::{canary::Canary, metrics::Metrics};
        use lockstep_coordinator::service::ServiceOptions;
        use lockstep_coordinator::state::Limits;

        let metrics = Arc::new(Metrics::new());
        let service = start_service(
            &self.model,
            cluster,
            &self.engine.options()?,
            info,
            ServiceOptions { max_waiting: self.max_waiting, ..ServiceOptions::default() },
            Some(metrics.clone()),
        )?;
        let service = Arc::new(service);
        let canary = match self.canary_every {
            0 => Arc::new(Canary::new()),
            secs => Canary::start(service.clone(), metrics.clone(), Duration::from_secs(secs)),
        };
        let mut state = AppState::new(service, metrics, canary, auth);
        state.limits = Limits { body_timeout: Duration::from_secs(self.body_timeout_s) };
        Ok(Arc::new(state))
    }

    fn temp_cert_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("lockstep-serve-{}", std::process::id()))
    }

    /// HTTP/3 next to HTTP/1.1, unless `--no-h3`.
    pub(crate) fn h3_options(&self) -> Option<lockstep_coordinator::api::H3Options> {
        use lockstep_coordinator::api::{H3Options, TlsSource};
        (!self.no_h3).then(|| {
            let pem_out = self.h3_cert_out.clone().unwrap_or_else(|| self.temp_cert_dir().join("h3-cert.pem"));
            H3Options {
                listen: self.h3_listen,
                tls: TlsSource::from_dir_or_self_signed(self.cluster.tls_dir.as_deref(), pem_out),
            }
        })
    }
}

/// Removes a directory when dropped (the self-signed certificate's, on any way out of `run`).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raises the open-file soft limit to the hard limit: every connection is a descriptor, and a
/// default soft limit of 1024 would run out before `--max-connections` does.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads one `rlimit` through a valid pointer to a local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::debug!(from = lim.rlim_cur, to = lim.rlim_max, "raised the open-file limit");
    }
}
