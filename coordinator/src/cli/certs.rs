//! `lockstep certs`: the cluster CA and the certificates it issues (mutual TLS).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum CertsCmd {
    /// Create the cluster CA (`ca.pem`, `ca.key`) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the cluster CA for a node or the coordinator.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

pub(crate) fn run(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Init { dir } => {
            lockstep_transport::certs::init_ca(&dir)?;
            tracing::info!("created the cluster CA in {}", dir.display());
        }
        CertsCmd::Issue { dir, name } => {
            lockstep_transport::certs::issue(&dir, &name)?;
            tracing::info!("issued {}/{name}.pem", dir.display());
        }
    }
    Ok(())
}
