//! `lockstep serve`: the OpenAI-compatible API, ops API and dashboard over HTTP/1.1 and HTTP/3.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use lockstep_coordinator::engine::{backend_fingerprint_name, ModelInfo};

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
    #[arg(long = "api-key")]
    api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// A bearer key accepted on /metrics, /ops/* and /dashboard (repeatable; none: no auth).
    #[arg(long = "ops-key")]
    ops_key: Vec<String>,
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

pub(crate) fn run(a: ServeArgs) -> Result<()> {
    use lockstep_coordinator::api::{self, ServeOptions};
    use lockstep_coordinator::discovery::MembershipMode;

    let api_keys = a.api_keys()?;
    let opts = a.engine.options();
    let mut info = ModelInfo::load(&a.model, &opts, &backend_fingerprint_name(&opts)?)?;
    if let Some(name) = &a.served_model_name {
        info.name = name.clone();
    }
    if a.cluster.membership == Some(MembershipMode::Etcd) {
        return super::etcd::serve(&a, api_keys, info);
    }
    let state = a.start_state(api_keys, info, &a.cluster)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("lockstep-http").build()?;
    runtime.block_on(api::run(state, ServeOptions { listen: a.listen, h3: a.h3_options() }))
}

impl ServeArgs {
    /// The `/v1/*` keys of `--api-key` and `--api-key-file`.
    fn api_keys(&self) -> Result<Vec<String>> {
        let mut api_keys = self.api_key.clone();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            api_keys.extend(
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string),
            );
            if api_keys.is_empty() {
                bail!("{}: no API keys in the file", path.display());
            }
        }
        Ok(api_keys)
    }

    /// Loads the model where `cluster` says and starts everything the HTTP handlers share.
    pub(crate) fn start_state(
        &self,
        api_keys: Vec<String>,
        info: ModelInfo,
        cluster: &ClusterArgs,
    ) -> Result<Arc<lockstep_coordinator::state::AppState>> {
        use lockstep_coordinator::ops::{canary::Canary, metrics::Metrics};
        use lockstep_coordinator::service::ServiceOptions;
        use lockstep_coordinator::state::{AppState, Auth};

        let metrics = Arc::new(Metrics::new());
        let service = start_service(
            &self.model,
            cluster,
            &self.engine.options(),
            info,
            ServiceOptions { max_waiting: self.max_waiting, ..ServiceOptions::default() },
            Some(metrics.clone()),
        )?;
        let service = Arc::new(service);
        let canary = match self.canary_every {
            0 => Arc::new(Canary::new()),
            secs => Canary::start(service.clone(), metrics.clone(), std::time::Duration::from_secs(secs)),
        };
        Ok(Arc::new(AppState {
            service,
            metrics,
            canary,
            auth: Auth { api_keys, ops_keys: self.ops_key.clone() },
            soak: std::sync::Mutex::new(None),
        }))
    }

    /// HTTP/3 next to HTTP/1.1, unless `--no-h3`.
    pub(crate) fn h3_options(&self) -> Option<lockstep_coordinator::api::H3Options> {
        use lockstep_coordinator::api::{H3Options, TlsSource};
        (!self.no_h3).then(|| {
            let pem_out = self.h3_cert_out.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("lockstep-serve-{}", std::process::id())).join("h3-cert.pem")
            });
            H3Options {
                listen: self.h3_listen,
                tls: TlsSource::from_dir_or_self_signed(self.cluster.tls_dir.as_deref(), pem_out),
            }
        })
    }
}
