//! `lockstep model`: model utilities (synthetic models with real shapes).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use lockstep_kernels::DType;
use lockstep_node::synth::{synth_with, Preset, SynthOptions};

use super::parse_dtype;

#[derive(Subcommand)]
pub(crate) enum ModelCmd {
    /// Write a synthetic Hugging Face model directory with deterministic random weights.
    Synth {
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
        dtype: DType,
        #[arg(long)]
        out: PathBuf,
        /// Split the weights into this many safetensors shards (with an index file).
        #[arg(long, default_value_t = 1)]
        shards: usize,
    },
}

pub(crate) fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Synth { preset, seed, dtype, out, shards } => {
            let t = Instant::now();
            let r = synth_with(preset, seed, dtype, &out, &SynthOptions { shards })?;
            tracing::info!(
                "wrote {} ({} parameters, {} files, {:.1} s)",
                r.dir.display(),
                r.params,
                r.files.len(),
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
