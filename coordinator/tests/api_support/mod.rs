//! Shared by the `api_*` tests: an in-process API server on stories260K, bound to 127.0.0.1.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_coordinator::api::{H3Options, ServeOptions, Server, TlsSource};
use lockstep_coordinator::engine::{EngineOptions, LocalExecutor, ModelInfo, StepExecutor};
use lockstep_coordinator::ops::canary::Canary;
use lockstep_coordinator::ops::metrics::Metrics;
use lockstep_coordinator::service::{Service, ServiceOptions};
use lockstep_coordinator::state::{AppState, Auth};
use lockstep_kernels::CpuBackend;

pub struct Options {
    pub api_keys: Vec<String>,
    pub max_waiting: usize,
    pub h3: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { api_keys: Vec::new(), max_waiting: 256, h3: false }
    }
}

pub struct TestServer {
    pub state: Arc<AppState>,
    pub server: Server,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.server.http_addr)
    }

    /// Waits until no sequence runs or waits and no KV block is in use, or panics after `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let r = self.state.service.replicas();
            if r.iter().all(|r| r.running == 0 && r.waiting == 0 && r.kv_used_blocks == 0) {
                return;
            }
            assert!(start.elapsed() < limit, "the service did not become idle: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts the API on 127.0.0.1 (ephemeral ports) over stories260K, in this process.
pub async fn start(model: &std::path::Path, opts: Options) -> TestServer {
    let eopts = EngineOptions { threads: 1, ..EngineOptions::default() };
    let info = ModelInfo::load(model, &eopts, CpuBackend::fingerprint_name_for(eopts.mode)).expect("model");
    let exec: Box<dyn StepExecutor> = Box::new(LocalExecutor::load(&info, &eopts).expect("executor"));
    let metrics = Arc::new(Metrics::new());
    let sched = info.scheduler_config(&eopts);
    let service = Service::start(
        info,
        vec![exec],
        None,
        sched,
        ServiceOptions { max_waiting: opts.max_waiting, ..ServiceOptions::default() },
        metrics.clone(),
    )
    .expect("service");
    let auth = Auth { api_keys: opts.api_keys, ops_keys: Vec::new() };
    let state = Arc::new(AppState::new(Arc::new(service), metrics, Arc::new(Canary::new()), auth));
    let h3 = opts.h3.then(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("api-h3-{}", std::process::id()));
        H3Options {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            tls: TlsSource::SelfSigned { pem_out: dir.join(format!("cert-{:?}.pem", std::thread::current().id())) },
        }
    });
    let opts = ServeOptions { listen: "127.0.0.1:0".parse().unwrap(), h3, edge: Default::default() };
    let server = Server::start(state.clone(), opts).await.expect("server");
    TestServer { state, server }
}

/// The f32 bits of each logprob of a JSON list (the server writes each f32 exactly).
pub fn logprob_bits(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| a.iter().map(|x| (x.as_f64().expect("a number") as f32).to_bits()).collect())
        .unwrap_or_default()
}

/// Token ids of a JSON list.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().map(|x| x.as_u64().expect("an id") as u32).collect()).unwrap_or_default()
}
