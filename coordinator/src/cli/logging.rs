//! The one `tracing` subscriber of the program: libraries only emit events and spans, and the
//! binary decides where they go — stderr, filtered by `RUST_LOG` (default `info`), as text for a
//! person or as one JSON object per line for a log pipeline (`--log-format json`).
//!
//! Node processes that the coordinator spawns (embedded clusters) log in the same format as their
//! parent: the chosen format is put in the environment ([`LOG_FORMAT_ENV`]), which children
//! inherit and `--log-format` reads as its default, so the parent's command line never has to
//! spell it out for them. `RUST_LOG` is inherited the same way.

use std::io::IsTerminal as _;

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// The environment variable behind `--log-format`'s default.
pub(crate) const LOG_FORMAT_ENV: &str = "LOCKSTEP_LOG_FORMAT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`), and
    /// the enclosing `span` and `spans` with their fields (request id, group, step).
    Json,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Installs the subscriber for the whole process. Call once, first thing in `main`, while the
/// process has one thread (it sets an environment variable).
pub(crate) fn init(format: LogFormat) {
    // Only while single-threaded: `set_var` races with any thread that reads the environment.
    std::env::set_var(LOG_FORMAT_ENV, format.as_str());
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
}

/// Reports the error that ends the program: a plain `error: …` line for a person, or an error
/// event in JSON mode so that every line on stderr stays machine-readable.
pub(crate) fn report_fatal(format: LogFormat, e: &anyhow::Error) {
    match format {
        // The whole cause chain on one line; no backtrace noise for user errors.
        LogFormat::Text => eprintln!("error: {e:#}"),
        LogFormat::Json => tracing::error!("{e:#}"),
    }
}
