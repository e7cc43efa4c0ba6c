//! `lockstep loadgen`: closed-loop streaming load against a running server.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub(crate) struct LoadgenArgs {
    /// Server base URL (`http://host:port`).
    #[arg(long)]
    url: String,
    #[arg(long)]
    api_key: Option<String>,
    /// Model name (default: the server's first model).
    #[arg(long)]
    model: Option<String>,
    /// Concurrency levels, run one after the other.
    #[arg(long, default_value = "1,8,32,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Tokens generated per request (`ignore_eos`: exactly this many unless the context ends).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// A prompt (repeatable; used round-robin).
    #[arg(long = "prompt")]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Print one JSON object per level instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: LoadgenArgs) -> Result<()> {
    use lockstep_coordinator::api::loadgen::{run, table, LoadgenOptions};
    let prompts = if a.prompt.is_empty() { vec!["Once upon a time".to_string()] } else { a.prompt.clone() };
    let opts = LoadgenOptions {
        url: a.url.clone(),
        api_key: a.api_key.clone(),
        model: a.model.clone(),
        concurrency: a.concurrency.clone(),
        requests: a.requests,
        max_tokens: a.max_tokens,
        prompts,
        temperature: a.temperature,
        request_timeout: std::time::Duration::from_secs(600),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let reports = runtime.block_on(run(&opts))?;
    if a.json {
        for r in &reports {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", table(&reports));
    }
    Ok(())
}
