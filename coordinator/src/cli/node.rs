//! `lockstep node`: join a coordinator (given, or the leader etcd names), load one shard, serve
//! steps.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lockstep_coordinator::discovery::MembershipMode;
use lockstep_coordinator::engine::EngineOptions;
use lockstep_coordinator::membership::DEFAULT_NODE_TIMEOUT;
use lockstep_kernels::Isa;
use lockstep_node::affinity::CpuList;
use lockstep_node::same_host::RingTransportMode;

use super::etcd::EtcdArgs;

#[derive(Args)]
pub(crate) struct NodeArgs {
    /// Coordinator address (`host:port`); not with `--membership etcd`, where the node follows
    /// the leader etcd names.
    #[arg(long)]
    coordinator: Option<String>,
    /// `static`: join --coordinator; `etcd`: register in etcd under a lease and follow the
    /// elected coordinator, moving to a new one when it changes.
    #[arg(long, value_enum, default_value = "static")]
    membership: MembershipMode,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The TTL of the node's etcd lease, in milliseconds (as the coordinators' --node-timeout-ms).
    #[arg(long, default_value_t = DEFAULT_NODE_TIMEOUT.as_millis() as u64)]
    node_timeout_ms: u64,
    /// Directory with `ca.pem` and this node's `NAME.pem` / `NAME.key`.
    #[arg(long)]
    tls_dir: PathBuf,
    /// This node's name (its certificate's name).
    #[arg(long, default_value = "node")]
    name: String,
    /// Where to accept the ring predecessor.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// `auto`: ring frames to and from a neighbour on this machine travel on a Unix socket
    /// negotiated over the authenticated QUIC ring connection; `quic`: always on QUIC.
    #[arg(long, default_value = "auto")]
    ring_transport: RingTransportMode,
    /// Kernel threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Run this node's threads only on these CPUs (a list as `0,2-3`). Ranks of a group wait for
    /// each other at every all-reduce, so on a machine that runs several nodes, nodes on CPUs of
    /// their own keep pace better than nodes the scheduler moves around or stacks on one CPU.
    /// Never changes a bit.
    #[arg(long, value_name = "LIST")]
    pin_cpus: Option<CpuList>,
    /// Force a SIMD path (never changes a bit).
    #[arg(long)]
    isa: Option<Isa>,
    /// Where this node finds the model (default: the path the coordinator assigns).
    #[arg(long)]
    model: Option<PathBuf>,
    /// For tests only: sleep this many milliseconds before every step, so a test can act while a
    /// group generates (tests/tests/cluster.rs kills a node mid-generation).
    #[arg(long, hide = true)]
    step_delay_ms: Option<u64>,
    /// Test aid: panic in the forward pass of the step with this id, to exercise how a node
    /// reports a crashed step (`StepFailed "panic: …"`) and drops its assignment.
    #[arg(long, hide = true, value_name = "STEP_ID")]
    panic_at_step: Option<u64>,
    /// Test aid: forget the step session just before the step with this id, so its delta is
    /// rejected (`StepRejected`) and the coordinator must resend the step as a full snapshot.
    #[arg(long, hide = true, value_name = "STEP_ID")]
    forget_session_at_step: Option<u64>,
    /// Test aid: end the process at once (`_exit`, nothing closed in an orderly way) right after
    /// the forward pass of the step with this id, before answering it: the moment a node killed
    /// mid-generation can die in after its last ring frame of a step.
    #[arg(long, hide = true, value_name = "STEP_ID")]
    die_after_step: Option<u64>,
}

pub(crate) fn run(a: NodeArgs) -> Result<()> {
    // Node processes of one machine share a terminal or a journal: every line names its node.
    let _node = tracing::info_span!("node", name = %a.name).entered();
    if let Some(cpus) = &a.pin_cpus {
        // First, before the node starts any thread: each inherits the mask.
        lockstep_node::affinity::pin_current_thread(&cpus.0).with_context(|| format!("--pin-cpus {cpus}"))?;
    }
    let mut opts = lockstep_node::server::NodeOptions {
        coordinator: String::new(),
        tls_dir: a.tls_dir,
        name: a.name,
        listen: a.listen,
        ring_transport: a.ring_transport,
        threads: a.threads.unwrap_or_else(|| EngineOptions::default().threads),
        isa: a.isa,
        model_override: a.model,
        step_delay: a.step_delay_ms.map(std::time::Duration::from_millis),
        panic_at_step: a.panic_at_step,
        forget_session_at_step: a.forget_session_at_step,
        die_after_step: a.die_after_step,
    };
    match (a.membership, a.coordinator) {
        (MembershipMode::Etcd, None) => {
            let timeout = std::time::Duration::from_millis(a.node_timeout_ms);
            lockstep_coordinator::discovery::etcd::run_node(opts, a.etcd.options()?, timeout)?;
        }
        (MembershipMode::Etcd, Some(_)) => bail!("--membership etcd follows the leader etcd names: drop --coordinator"),
        (MembershipMode::Static, Some(coordinator)) => {
            opts.coordinator = coordinator;
            lockstep_node::server::run_node(opts)?;
        }
        (MembershipMode::Static, None) => bail!("--coordinator is required (or --membership etcd)"),
        (MembershipMode::Embedded, _) => bail!("a node is `static` (--coordinator) or follows `etcd`"),
    }
    Ok(())
}
