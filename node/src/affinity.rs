//! Pinning a node process to CPUs (`lockstep node --pin-cpus`), and the CPU lists it takes.
//!
//! Why: the ranks of a tensor-parallel group meet at every all-reduce, so a step runs at the pace
//! of its slowest rank. On a host with as many CPUs as the group's ranks need, the scheduler still
//! moves a rank's thread between CPUs, or puts two ranks on one CPU for a while, and every such
//! moment stalls the whole group (BENCHMARKS §22.3, §23.2). A pinned process keeps its threads on
//! its own CPUs. The mask is set on the process's first thread before any other starts, so every
//! thread it creates (kernel pool, model thread, I/O runtime) inherits it.

use std::io;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuListError {
    #[error("empty CPU list")]
    Empty,
    #[error("bad CPU list item {0:?} (expected N or N-M, e.g. 0,2-3)")]
    Item(String),
    #[error("CPU {0} is beyond what the kernel's CPU mask can name ({1})")]
    TooLarge(usize, usize),
}

/// Parses a Linux CPU list (`0`, `0,2`, `4-7`, `0-1,6`) into sorted, distinct CPU numbers.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, CpuListError> {
    let mut cpus = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || CpuListError::Item(item.to_owned());
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let n: usize = item.parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        if hi >= MAX_CPUS {
            return Err(CpuListError::TooLarge(hi, MAX_CPUS));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(CpuListError::Empty);
    }
    Ok(cpus)
}

/// A parsed CPU list (`--pin-cpus 0,2-3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl std::str::FromStr for CpuList {
    type Err = CpuListError;
    fn from_str(s: &str) -> Result<Self, CpuListError> {
        parse_cpu_list(s).map(CpuList)
    }
}

impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_cpu_list(&self.0))
    }
}

/// The list form of `cpus` (`0,2-3`), as [`parse_cpu_list`] reads it.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { sorted[i].to_string() } else { format!("{}-{}", sorted[i], sorted[j]) });
        i = j + 1;
    }
    parts.join(",")
}

/// CPUs one `cpu_set_t` can name.
const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: every index is below CPU_SETSIZE.
    Ok((0..MAX_CPUS).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Restricts the calling thread, and every thread it starts from now on, to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= MAX_CPUS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {c} is beyond {MAX_CPUS}")));
        }
        // SAFETY: `c` is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Disjoint CPU sets for `nodes` processes of `threads` kernel threads each, taken in order from
/// `allowed`: node `i` gets the `i`-th run of `threads` CPUs. `None` when they do not all fit, so
/// that nodes are never pinned onto a shared CPU.
pub fn disjoint_sets(allowed: &[usize], nodes: usize, threads: usize) -> Option<Vec<Vec<usize>>> {
    let threads = threads.max(1);
    if nodes == 0 || nodes.checked_mul(threads)? > allowed.len() {
        return None;
    }
    Some(allowed.chunks(threads).take(nodes).map(<[usize]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_format_round_trip() {
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("3,1"), Ok(vec![1, 3]));
        assert_eq!(parse_cpu_list("0-2, 6,2"), Ok(vec![0, 1, 2, 6]));
        for bad in ["", ",", "a", "2-1", "1-", "-3"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(parse_cpu_list("1-99999"), Err(CpuListError::TooLarge(..))));
        assert_eq!(format_cpu_list(&[0, 1, 2, 6, 8, 9]), "0-2,6,8-9");
        assert_eq!(format_cpu_list(&[5]), "5");
        let l = [0, 2, 3, 4, 7];
        assert_eq!(parse_cpu_list(&format_cpu_list(&l)).unwrap(), l);
    }

    #[test]
    fn disjoint_sets_fit_or_are_refused() {
        let all = [0, 1, 2, 3];
        assert_eq!(disjoint_sets(&all, 2, 1), Some(vec![vec![0], vec![1]]));
        assert_eq!(disjoint_sets(&all, 2, 2), Some(vec![vec![0, 1], vec![2, 3]]));
        assert_eq!(disjoint_sets(&[1, 5, 6], 3, 1), Some(vec![vec![1], vec![5], vec![6]]));
        assert_eq!(disjoint_sets(&all, 3, 2), None, "two nodes would share a CPU");
        assert_eq!(disjoint_sets(&all, 0, 1), None);
    }

    #[test]
    fn this_thread_can_be_pinned_to_a_cpu_it_may_use() {
        // In a thread of its own: the mask stays with this test.
        std::thread::spawn(|| {
            let allowed = allowed_cpus().unwrap();
            assert!(!allowed.is_empty());
            let last = *allowed.last().unwrap();
            pin_current_thread(&[last]).unwrap();
            assert_eq!(allowed_cpus().unwrap(), vec![last]);
            let child = std::thread::spawn(|| allowed_cpus().unwrap()).join().unwrap();
            assert_eq!(child, vec![last], "threads started after pinning inherit the mask");
        })
        .join()
        .unwrap();
    }
}
