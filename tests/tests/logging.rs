//! Structured logging as an operator sees it: `--log-format json` writes one JSON object per
//! stderr line with the engine's spans and request ids, `RUST_LOG` filters, and the environment
//! variable that spawned node processes inherit selects the same format.

use std::time::Duration;

use lockstep_test_env::stories260k;
use lockstep_tests::{run_lockstep_with_env, stderr, stdout};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// Every stderr line of `lockstep generate` (one prompt, 8 tokens) with `args` added, parsed as
/// JSON; fails on a line that is not a JSON object.
fn generate_log(test: &str, args: &[&str], env: &[(&str, &str)]) -> Option<Vec<Value>> {
    let _ = test;
    let model = stories260k()?;
    let model = model.to_str().unwrap();
    let base = ["generate", "--model", model, "--prompt", "Once upon a time", "--max-tokens", "8", "--ignore-eos"];
    let all: Vec<&str> = base.iter().copied().chain(args.iter().copied()).collect();
    // Unset variables from the test's own environment must not change what is logged.
    let mut env = env.to_vec();
    for (name, default) in [("RUST_LOG", "info"), ("LOCKSTEP_LOG_FORMAT", "text")] {
        if !env.iter().any(|(n, _)| *n == name) {
            env.push((name, default));
        }
    }
    let out = run_lockstep_with_env(&all, &env, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{all:?} failed: {err}");
    assert!(!stdout(&out).trim().is_empty(), "the completion still goes to stdout");
    let lines = err
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{err}")))
        .collect::<Vec<_>>();
    for l in &lines {
        assert!(l.is_object(), "one object per line: {l}");
        assert!(l["level"].is_string() && l["timestamp"].is_string() && l["target"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "every event has a message: {l}");
    }
    Some(lines)
}

fn messages_at<'a>(lines: &'a [Value], level: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["level"] == level).collect()
}

#[test]
fn json_log_format_writes_one_json_object_per_stderr_line() {
    let test = "json_log_format_writes_one_json_object_per_stderr_line";
    let Some(lines) = generate_log(test, &["--log-format", "json"], &[]) else { return };
    let generated = lines
        .iter()
        .find(|l| l["fields"]["message"] == "generated")
        .unwrap_or_else(|| panic!("the end of generation is logged at info: {lines:#?}"));
    assert_eq!(generated["level"], "INFO");
    assert_eq!(generated["fields"]["finish_reason"], "length", "{generated}");
    assert!(generated["fields"]["seed"].is_u64() && generated["fields"]["system_fingerprint"].is_string());
    // Nothing per request or per step at the default level.
    assert!(messages_at(&lines, "DEBUG").is_empty() && messages_at(&lines, "TRACE").is_empty(), "{lines:#?}");
}

#[test]
fn engine_events_carry_the_request_id_and_the_replica_span() {
    let test = "engine_events_carry_the_request_id_and_the_replica_span";
    let env = [("RUST_LOG", "info,lockstep_coordinator=debug")];
    let Some(lines) = generate_log(test, &["--log-format", "json"], &env) else { return };
    let event = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} event: {lines:#?}"))
    };
    let (admitted, finished) = (event("admitted"), event("finished"));
    assert_eq!(admitted["fields"]["request_id"], "req-1", "{admitted}");
    assert_eq!(finished["fields"]["request_id"], "req-1", "{finished}");
    assert_eq!(finished["fields"]["reason"], "length", "{finished}");
    assert_eq!(finished["fields"]["completion_tokens"], 8, "{finished}");
    // The engine thread's span names its replica.
    for e in [admitted, finished] {
        let spans = e["spans"].as_array().unwrap_or_else(|| panic!("no span list: {e}"));
        assert!(spans.iter().any(|s| s["name"] == "replica" && s["group"] == 0), "{e}");
    }
}

#[test]
fn rust_log_warn_silences_info() {
    let Some(lines) = generate_log("rust_log_warn_silences_info", &["--log-format", "json"], &[("RUST_LOG", "warn")])
    else {
        return;
    };
    assert!(
        lines.iter().all(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
        "RUST_LOG=warn lets nothing below warn through: {lines:#?}"
    );
}

/// Embedded clusters pass the format to their node processes through this variable.
#[test]
fn log_format_env_var_selects_json_without_the_flag() {
    let test = "log_format_env_var_selects_json_without_the_flag";
    let Some(lines) = generate_log(test, &[], &[("LOCKSTEP_LOG_FORMAT", "json")]) else { return };
    assert!(lines.iter().any(|l| l["fields"]["message"] == "generated"), "{lines:#?}");
}

#[test]
fn text_log_format_is_the_default() {
    let Some(model) = stories260k() else { return };
    let args = ["generate", "--model", model.to_str().unwrap(), "--prompt", "Once", "--max-tokens", "4"];
    let out = run_lockstep_with_env(&args, &[("RUST_LOG", "info"), ("LOCKSTEP_LOG_FORMAT", "text")], LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let line = err.lines().find(|l| l.contains("generated")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("INFO") && line.contains("finish_reason=") && line.contains("system_fingerprint="), "{line}");
    assert!(serde_json::from_str::<Value>(line).is_err(), "text, not JSON: {line}");
}
