//! The `lockstep` command line: one module per command, and what they share — the engine and
//! cluster options, where the model runs ([`executors`]) and the serving core every model-running
//! command drives ([`start_service`]).
//!
//! `generate`, `bench`, `demo` and `serve` all run their requests through the same
//! [`Service`] and its engine threads: there is one engine loop in the program.

pub(crate) mod bench;
pub(crate) mod certs;
pub(crate) mod demo;
pub(crate) mod etcd;
pub(crate) mod generate;
pub(crate) mod loadgen;
pub(crate) mod logging;
pub(crate) mod model;
pub(crate) mod node;
pub(crate) mod serve;
pub(crate) mod soak;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use lockstep_coordinator::cluster::{Cluster, ClusterOptions, NodesMode, PinNodes};
use lockstep_coordinator::discovery::MembershipMode;
use lockstep_coordinator::engine::{Device, EngineOptions, LocalExecutor, ModelInfo, StepExecutor};
use lockstep_coordinator::membership::{DEFAULT_HEARTBEAT_EVERY, DEFAULT_NODE_TIMEOUT, DEFAULT_STEP_TIMEOUT};
use lockstep_coordinator::service::{
    NoopObserver, Service, ServiceObserver, ServiceOptions, DEFAULT_MIGRATION_LIMIT, DEFAULT_QUEUE_TIMEOUT,
};
use lockstep_kernels::{DType, Isa, KernelMode};
use lockstep_node::same_host::RingTransportMode;

use bench::BenchArgs;
use certs::CertsCmd;
use demo::DemoArgs;
use generate::GenerateArgs;
use loadgen::LoadgenArgs;
use logging::LogFormat;
use model::ModelCmd;
use node::NodeArgs;
use serve::ServeArgs;
use soak::SoakArgs;

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Bitwise-reproducible LLM inference")]
pub(crate) struct Cli {
    /// Log lines on stderr as `text` or `json` (one object per line); `RUST_LOG` chooses what is
    /// logged (default `info`).
    #[arg(long, global = true, value_enum, default_value = "text", env = logging::LOG_FORMAT_ENV)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) cmd: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Generate completions for one or more prompts, all batched through the scheduler together.
    Generate(GenerateArgs),
    /// Model utilities.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Prefill and decode throughput at batch 1, 8 and 32, invariant vs fast.
    Bench(BenchArgs),
    /// Run a node: join a coordinator, load one shard, serve steps.
    Node(NodeArgs),
    /// Serve the OpenAI-compatible API over HTTP/1.1 and HTTP/3 until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Closed-loop streaming load against a running server: requests/s, tokens/s, TTFT, ITL.
    Loadgen(LoadgenArgs),
    /// The "1000 completions" determinism soak against a running server.
    Soak(SoakArgs),
    /// Cluster certificates (mutual TLS with a cluster CA).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// A self-contained demonstration on loopback: the same prompts alone, batched with other
    /// traffic and on other thread counts, showing identical bytes.
    Demo(DemoArgs),
}

pub(crate) fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "bf16" => Ok(DType::Bf16),
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        o => Err(format!("unknown dtype {o:?} (bf16|f16|f32)")),
    }
}

/// Options shared by every command that runs a model.
#[derive(Args, Clone)]
pub(crate) struct EngineArgs {
    /// Numerics of the matmuls: the invariant contract, a conventional GEMM for comparison
    /// (`fast`), or `native` (on the CPU the same as `--numerics native`).
    #[arg(long, default_value = "invariant")]
    kernels: KernelMode,
    /// CPU threads of the kernels (never changes a bit).
    #[arg(long)]
    threads: Option<usize>,
    /// Force a SIMD path (scalar|avx2|avx512; never changes a bit).
    #[arg(long)]
    isa: Option<Isa>,
    /// Reduction segments S (2^k or 3·2^k; part of the fingerprint). Default: from the model shape.
    #[arg(long)]
    reduce_segments: Option<usize>,
    /// Attention key chunk in positions (part of the fingerprint).
    #[arg(long, default_value_t = lockstep_kernels::DEFAULT_KV_CHUNK)]
    kv_chunk: usize,
    /// Most prompt tokens of one sequence per step.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Token budget of one step (decode tokens + prefill chunks).
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Most sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    /// Exact number of KV cache blocks (overrides --kv-cache-mib).
    #[arg(long)]
    num_blocks: Option<usize>,
    /// KV cache block size in positions.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Longest context (default: the model's, at most 32768).
    #[arg(long)]
    max_context: Option<usize>,
    /// Where the in-process model runs: `cpu` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Numerics: `portable` (the contract's bits on every device) or `native` (the device's matrix
    /// unit, invariant within its class: tensor cores on a GPU; on a CPU AMX tiles, else AVX512-BF16
    /// dot products, one of which it must have). Default: `native` on a GPU, `portable` on the CPU.
    #[arg(long)]
    numerics: Option<Numerics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Numerics {
    Portable,
    Native,
}

impl EngineArgs {
    /// The engine options these flags say, or why they contradict each other.
    pub(crate) fn options(&self) -> Result<EngineOptions> {
        let d = EngineOptions::default();
        let (mode, device) = match self.device {
            Device::Cpu => (cpu_kernel_mode(self.kernels, self.numerics)?, Device::Cpu),
            Device::Cuda { ordinal, .. } => {
                if self.kernels == KernelMode::Native {
                    bail!("--kernels native names the CPU's AMX numerics; on a GPU say --numerics native");
                }
                let native = self.numerics.unwrap_or(Numerics::Native) == Numerics::Native;
                (self.kernels, Device::Cuda { ordinal, native })
            }
        };
        Ok(EngineOptions {
            threads: self.threads.unwrap_or(d.threads),
            mode,
            isa: self.isa,
            reduce_segments: self.reduce_segments,
            kv_chunk: self.kv_chunk,
            block_size: self.block_size,
            kv_cache_mib: self.kv_cache_mib,
            num_blocks: self.num_blocks,
            max_batch_tokens: self.max_batch_tokens,
            prefill_chunk: self.prefill_chunk,
            max_running: self.max_running,
            max_context: self.max_context,
            device,
        })
    }
}

/// The CPU's kernel mode from `--kernels` and `--numerics` (CPU default: portable).
fn cpu_kernel_mode(kernels: KernelMode, numerics: Option<Numerics>) -> Result<KernelMode> {
    Ok(match (kernels, numerics) {
        (KernelMode::Invariant | KernelMode::Native, Some(Numerics::Native)) => KernelMode::Native,
        (KernelMode::Fast, Some(Numerics::Native)) => {
            bail!("--kernels fast is a conventional GEMM with no native numerics: drop one of --kernels fast, --numerics native")
        }
        (KernelMode::Native, Some(Numerics::Portable)) => {
            bail!("--kernels native and --numerics portable contradict each other")
        }
        (k, _) => k,
    })
}

/// Where the model runs: in this process, or on a tensor-parallel cluster of node processes.
#[derive(Args, Clone)]
pub(crate) struct ClusterArgs {
    /// Tensor-parallel degree, or a preference list, most preferred first (`--tp 4,2,1`): after
    /// any node loss or join, groups re-form at the most preferred degree the live nodes allow.
    /// Each degree must divide the head counts and cut reduce_segments into subtrees (S = 2^k:
    /// 1, 2, 4, …, S; S = 3·2^k: 1, 3, 6, …, S).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub(crate) tp: Vec<usize>,
    /// Number of tensor-parallel groups; requests are spread across them.
    #[arg(long, default_value_t = 1)]
    pub(crate) replicas: usize,
    /// Run on node processes even at TP 1 with one replica.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// `embedded`: spawn the nodes on loopback; `static`: wait for `lockstep node` processes.
    #[arg(long, value_enum, default_value = "embedded")]
    pub(crate) nodes: NodesMode,
    /// How the coordinator finds its nodes: `embedded` or `static` (as --nodes, which this
    /// overrides), or `etcd` (`serve` only: coordinators and nodes meet in etcd at
    /// --etcd-endpoints; one coordinator leads, the others stand by).
    #[arg(long, value_enum)]
    pub(crate) membership: Option<MembershipMode>,
    /// This coordinator's certificate name in --tls-dir (static and etcd membership).
    #[arg(long = "name", default_value = "coordinator")]
    pub(crate) coordinator_name: String,
    /// Coordinator address for nodes (QUIC).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(crate) cluster_listen: std::net::SocketAddr,
    /// Cluster CA and certificates (see `lockstep certs`); embedded mode makes a throwaway one.
    #[arg(long)]
    pub(crate) tls_dir: Option<PathBuf>,
    /// Kernel threads per node process (default: this machine's cores ÷ nodes, at least 1).
    #[arg(long)]
    pub(crate) node_threads: Option<usize>,
    /// Embedded nodes: `auto` moves the ring between neighbours on this machine onto Unix
    /// sockets negotiated over the authenticated QUIC ring connections; `quic` keeps it on QUIC.
    #[arg(long, default_value = "auto")]
    pub(crate) ring_transport: RingTransportMode,
    /// Embedded nodes: `auto` pins each node process to CPUs of its own (`lockstep node
    /// --pin-cpus`) when all nodes' threads fit on this machine's CPUs, so the ranks of a group,
    /// which wait for each other at every all-reduce, never share a CPU or move between CPUs;
    /// `off` leaves them to the scheduler.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) pin_nodes: PinNodes,
    /// Seconds to wait for every group to become ready.
    #[arg(long, default_value_t = 300)]
    pub(crate) join_timeout: u64,
    /// Embedded mode: extra node processes that wait as hot spares.
    #[arg(long, default_value_t = 0)]
    pub(crate) spare_nodes: usize,
    /// How often the coordinator pings every node, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_HEARTBEAT_EVERY.as_millis() as u64)]
    pub(crate) heartbeat_ms: u64,
    /// A node silent this long (idle, loading or busy) is down, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_NODE_TIMEOUT.as_millis() as u64)]
    pub(crate) node_timeout_ms: u64,
    /// A step not answered by every member within this long fails its group, naming the members
    /// that did not answer, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_STEP_TIMEOUT.as_millis() as u64)]
    pub(crate) step_timeout_ms: u64,
    /// How many times a request may move to another group after its group failed.
    #[arg(long, default_value_t = DEFAULT_MIGRATION_LIMIT)]
    pub(crate) migration_limit: u32,
    /// How long requests wait for a serving group when none is left before they get 503.
    #[arg(long, default_value_t = DEFAULT_QUEUE_TIMEOUT.as_secs())]
    pub(crate) queue_timeout_s: u64,
    /// For tests only: embedded nodes sleep this many milliseconds before every step.
    #[arg(long, hide = true)]
    pub(crate) node_step_delay_ms: Option<u64>,
}

impl ClusterArgs {
    /// One embedded group of `tp` local node processes with `node_threads` kernel threads each
    /// (TP 1: the model runs in-process).
    pub(crate) fn embedded(tp: usize, node_threads: usize) -> Self {
        ClusterArgs {
            tp: vec![tp],
            replicas: 1,
            cluster: false,
            nodes: NodesMode::Embedded,
            membership: None,
            coordinator_name: "coordinator".into(),
            cluster_listen: "127.0.0.1:0".parse().expect("a valid address"),
            tls_dir: None,
            node_threads: Some(node_threads),
            ring_transport: RingTransportMode::default(),
            pin_nodes: PinNodes::default(),
            join_timeout: 300,
            spare_nodes: 0,
            heartbeat_ms: DEFAULT_HEARTBEAT_EVERY.as_millis() as u64,
            node_timeout_ms: DEFAULT_NODE_TIMEOUT.as_millis() as u64,
            step_timeout_ms: DEFAULT_STEP_TIMEOUT.as_millis() as u64,
            migration_limit: DEFAULT_MIGRATION_LIMIT,
            queue_timeout_s: DEFAULT_QUEUE_TIMEOUT.as_secs(),
            node_step_delay_ms: None,
        }
    }

    fn wants_cluster(&self) -> bool {
        self.cluster
            || self.tp.iter().any(|&t| t > 1)
            || self.tp.len() > 1
            || self.replicas > 1
            || self.spare_nodes > 0
            || self.nodes_mode() == NodesMode::Static
    }

    /// Whether nodes are spawned here or started elsewhere (`--membership` over `--nodes`).
    pub(crate) fn nodes_mode(&self) -> NodesMode {
        match self.membership {
            None => self.nodes,
            Some(MembershipMode::Embedded) => NodesMode::Embedded,
            Some(MembershipMode::Static | MembershipMode::Etcd) => NodesMode::Static,
        }
    }

    /// The service's migration and queueing limits from these flags, on top of `base`.
    pub(crate) fn service_options(&self, base: ServiceOptions) -> ServiceOptions {
        ServiceOptions {
            migration_limit: self.migration_limit,
            queue_timeout: Duration::from_secs(self.queue_timeout_s),
            ..base
        }
    }
}

/// One step executor per replica, and the cluster they run on (if any), which must outlive them.
pub(crate) type Executors = (Vec<Box<dyn StepExecutor>>, Option<Cluster>);

/// The step executors to run on: the whole model in-process, or one per cluster group (the
/// returned cluster must outlive them).
pub(crate) fn executors(
    model: &std::path::Path,
    c: &ClusterArgs,
    opts: &EngineOptions,
    info: &ModelInfo,
) -> Result<Executors> {
    if c.membership == Some(MembershipMode::Etcd) {
        bail!("--membership etcd is for `lockstep serve` (coordinator fail-over)");
    }
    if !c.wants_cluster() {
        return Ok((vec![Box::new(LocalExecutor::load(info, opts)?)], None));
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let max_tp = c.tp.iter().copied().max().unwrap_or(1);
    let cluster = Cluster::start(ClusterOptions {
        model_dir: model.to_path_buf(),
        tp: c.tp.clone(),
        replicas: c.replicas,
        listen: c.cluster_listen,
        nodes: c.nodes_mode(),
        name: c.coordinator_name.clone(),
        tls_dir: c.tls_dir.clone(),
        engine: opts.clone(),
        node_threads: c.node_threads.unwrap_or((cores / (max_tp * c.replicas)).max(1)),
        ring_transport: c.ring_transport,
        pin_nodes: c.pin_nodes,
        join_timeout: Duration::from_secs(c.join_timeout),
        spare_nodes: c.spare_nodes,
        heartbeat_every: Duration::from_millis(c.heartbeat_ms),
        node_timeout: Duration::from_millis(c.node_timeout_ms),
        step_timeout: Duration::from_millis(c.step_timeout_ms),
        node_step_delay: c.node_step_delay_ms.map(Duration::from_millis),
    })?;
    if cluster.info.system_fingerprint != info.system_fingerprint {
        bail!("cluster fingerprint {} differs from {}", cluster.info.system_fingerprint, info.system_fingerprint);
    }
    // The cluster's groups join the service as they form (Service::start attaches it).
    Ok((Vec::new(), Some(cluster)))
}

/// The synthesized-model cache directory (`$LOCKSTEP_CACHE_DIR`, `$XDG_CACHE_HOME/lockstep`,
/// `~/.cache/lockstep`, else the temp dir) for `name`.
pub(crate) fn synth_cache_dir(name: &str) -> PathBuf {
    lockstep_node::fingerprint::HashCache::from_env()
        .dir()
        .map(|d| d.join("synth"))
        .unwrap_or_else(|| std::env::temp_dir().join("lockstep-synth"))
        .join(name)
}

pub(crate) fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Generate(a) => generate::run(a),
        Command::Model { cmd } => model::run(cmd),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Loadgen(a) => loadgen::run(a),
        Command::Soak(a) => soak::run(a),
        Command::Node(a) => node::run(a),
        Command::Certs { cmd } => certs::run(cmd),
    }
}

/// Load the model where `cluster` says and start the serving core on it, with the admission limit
/// of a command-line batch (no limit) unless `opts` says otherwise.
pub(crate) fn start_service(
    model: &std::path::Path,
    cluster: &ClusterArgs,
    engine: &EngineOptions,
    info: ModelInfo,
    opts: ServiceOptions,
    observer: Option<Arc<dyn ServiceObserver>>,
) -> Result<Service> {
    let opts = cluster.service_options(opts);
    let (execs, cluster) = executors(model, cluster, engine, &info)?;
    let sched = info.scheduler_config(engine);
    Service::start(info, execs, cluster, sched, opts, observer.unwrap_or_else(|| Arc::new(NoopObserver)))
}

/// A command-line batch is never refused for queue length: it waits its turn.
pub(crate) const UNBOUNDED: ServiceOptions = ServiceOptions {
    max_waiting: usize::MAX,
    migration_limit: lockstep_coordinator::service::DEFAULT_MIGRATION_LIMIT,
    queue_timeout: lockstep_coordinator::service::DEFAULT_QUEUE_TIMEOUT,
};
