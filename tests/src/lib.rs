//! Helpers for lockstep's system-level tests: the `lockstep` binary, the shared test model and
//! scratch directories. Tests here run real processes on loopback only, each bounded in time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The workspace's `lockstep` binary, built next to this test's executable.
pub fn lockstep_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/lockstep
    let profile_dir = exe.parent().and_then(Path::parent).expect("target profile dir").to_path_buf();
    let bin = profile_dir.join(format!("lockstep{}", std::env::consts::EXE_SUFFIX));
    // `cargo test --workspace` builds it (the coordinator package has integration tests); a
    // nested `cargo build` here would wait forever on the lock the running `cargo test` holds.
    assert!(bin.exists(), "{} not built: run the suite with `cargo test --workspace`", bin.display());
    bin
}

/// `../shared/models/stories260K/hf`, or `None` after printing a visible SKIPPED line.
pub fn stories_dir(test: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/stories260K/hf");
    if p.join("config.json").exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED {test}: {} not found", p.display());
        None
    }
}

/// A fresh scratch directory under the target dir, unique to this process and name.
pub fn scratch(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.parent().and_then(Path::parent).expect("target profile dir");
    let dir = target.join("lockstep-scratch").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Run `lockstep args…`, killing it after `limit`.
pub fn run_lockstep(args: &[&str], limit: Duration) -> Output {
    run_lockstep_with_env(args, &[], limit)
}

/// Run `lockstep args…` with extra environment variables, killing it after `limit`.
pub fn run_lockstep_with_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = Command::new(lockstep_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn lockstep");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("lockstep {args:?} ran past {limit:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Process ids whose parent is `pid` (from /proc; Linux only).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // Fields after the parenthesised command name: state, ppid, ...
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
                out.push(child);
            }
        }
    }
    out.sort_unstable();
    out
}

/// A free UDP port on 127.0.0.1 (bound and released: good enough for a test).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("free port")
}

/// Write `lines` as a prompts file in `dir`.
pub fn prompts_file(dir: &Path, lines: &[&str]) -> PathBuf {
    let p = dir.join("prompts.txt");
    std::fs::write(&p, lines.join("\n")).expect("write prompts");
    p
}
