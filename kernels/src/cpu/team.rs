//! A spinning thread team for the passes inside a model step.
//!
//! A decode step of a small model is hundreds of short passes (a q/k/v group, attention, a norm,
//! each 5–30 µs at batch 1). Handing each to a rayon pool cost a wake-up, a deque split and a
//! park per pass (~10 % of SmolLM2's batch-1 samples sat in rayon's idle loop). A team instead
//! keeps `threads - 1` helpers of its own, which the calling thread (the step's) joins:
//!
//! * **Publish.** The caller writes the pass (a `&dyn Fn(usize)` and its task count) and opens
//!   it with one store of the pass state; helpers watching the state join at once.
//! * **Claim.** The tasks are cut into one contiguous range per member (the publisher's first),
//!   each with its own counter. A member claims its range's tasks in order, then claims from the
//!   other ranges' fronts until all run out. Contiguous runs keep a member's weight stream
//!   sequential (interleaved claiming cost SmolLM2's M=1 gate/up group ~15 %, BENCHMARKS §17.2),
//!   and claiming stays dynamic, so a member that is late or descheduled (an oversubscribed
//!   host) leaves its tasks to the others.
//! * **Close.** The publisher closes the pass when its claims run out and waits for the helpers
//!   still inside (each registered before it looked at the pass), so the borrowed task outlives
//!   every use. A helper that registers after the close sees it closed and leaves: the
//!   registration and the close are sequentially consistent (a Dekker handshake).
//! * **Idle.** A helper spins for a short while after its last pass (the next pass of a step is
//!   microseconds away), then yields its core (an oversubscribed host, e.g. TP ranks sharing
//!   cores, keeps running), then parks on a condition variable, so an idle node burns no CPU.
//! * **Panics** in a task are caught where they happen, the other tasks still run, the pass
//!   still closes, and the first panic is raised again on the publisher's thread.
//! * A pass published from inside a task (or of one task) runs inline on that thread, and passes
//!   from two threads at once take turns.
//!
//! Tasks own disjoint outputs, so which member runs which task changes no bit.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an idle helper spins (pause instructions) before it starts yielding its core: longer
/// than the gaps between the passes of a step.
const SPIN_FOR: Duration = Duration::from_micros(50);
/// How long an idle helper yields before it parks: longer than the gaps between decode steps, so
/// a busy node's helpers stay awake, short enough that an idle node goes quiet at once.
const YIELD_UNTIL: Duration = Duration::from_millis(2);

/// A task of a pass, borrowed from the publisher for the pass.
type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// One atomic on a cache line of its own: the pass state, the claim counters and the helpers'
/// registrations are written by different threads at different times.
#[repr(align(64))]
#[derive(Default)]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The open pass, as the helpers read it.
#[derive(Clone, Copy)]
struct Pass {
    task: *const Task<'static>,
    tasks: usize,
}

struct Shared {
    /// Twice the number of passes published, plus one while the newest is open.
    state: Padded<AtomicU64>,
    /// Per member's range of the open pass, the next task index to claim in it.
    next: Box<[Padded<AtomicUsize>]>,
    /// Helpers registered for a pass; while any is, the publisher neither returns nor rewrites
    /// `pass`.
    inside: Padded<AtomicUsize>,
    /// Written by the publisher only while no pass is open and no helper is inside; read by
    /// helpers only while registered and the pass they saw is still open.
    pass: UnsafeCell<Pass>,
    /// The first panic of a helper's task in the current pass.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Helpers parked (or about to) on `wake`.
    parked: Padded<AtomicUsize>,
    park_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

// SAFETY: `pass` is the only field without its own synchronization; its raw task pointer is
// written and read under the open/close protocol above (the task itself is `Sync`).
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync`: nothing in `Shared` is tied to the thread that made it.
unsafe impl Send for Shared {}

thread_local! {
    /// Whether this thread is running a task of a pass (a nested pass then runs inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a task until dropped (also when a task unwinds).
struct InTask(bool);

impl InTask {
    fn enter() -> Self {
        InTask(IN_TASK.replace(true))
    }
}

impl Drop for InTask {
    fn drop(&mut self) {
        IN_TASK.set(self.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never leaves the guarded values half-written (a taken payload, a unit).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The helpers of one CPU backend (see the module comment).
pub(crate) struct Team {
    shared: Arc<Shared>,
    /// One publisher at a time (passes from two threads take turns).
    publish: Mutex<()>,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

impl Team {
    /// A team of `members` threads: the caller of [`Team::run`] and `members - 1` helpers named
    /// `{name}-{i}`.
    pub(crate) fn new(members: usize, name: &str) -> Team {
        let shared = Arc::new(Shared {
            state: Padded::default(),
            next: (0..members.max(1)).map(|_| Padded::default()).collect(),
            inside: Padded::default(),
            pass: UnsafeCell::new(Pass { task: &|_| {}, tasks: 0 }),
            panic: Mutex::new(None),
            parked: Padded::default(),
            park_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let helpers = (1..members.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || helper(&shared, i))
                    .expect("spawn a team helper")
            })
            .collect();
        Team { shared, publish: Mutex::new(()), helpers }
    }

    /// Helpers parked now (tests: an idle team parks).
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.shared.parked.load(SeqCst)
    }

    /// Runs `task(0..tasks)`, each index exactly once, on this thread and the helpers; returns
    /// when all have run. A panic in a task is raised here once every task has run.
    pub(crate) fn run(&self, tasks: usize, task: &Task<'_>) {
        if tasks <= 1 || self.helpers.is_empty() || IN_TASK.get() {
            let _in = InTask::enter();
            return (0..tasks).for_each(task);
        }
        let _publishing = lock(&self.publish);
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased; the pass closes and every helper leaves it before
        // this function returns, and no helper reads `pass` outside an open pass.
        let task_ptr: *const Task<'static> = unsafe { std::mem::transmute(task as *const Task<'_>) };
        // SAFETY: no pass is open and no helper is inside (the last pass waited for that), so no
        // helper reads `pass` now.
        unsafe { *s.pass.get() = Pass { task: task_ptr, tasks } };
        for (member, next) in s.next.iter().enumerate() {
            next.store(range(member, s.next.len(), tasks).start, Relaxed);
        }
        let open = s.state.load(Relaxed) + 1;
        s.state.store(open, SeqCst);
        if s.parked.load(SeqCst) > 0 {
            let _g = lock(&s.park_lock);
            s.wake.notify_all();
        }
        claim(s, 0, task, tasks);
        s.state.store(open + 1, SeqCst);
        let mut spins = 0u32;
        while s.inside.load(SeqCst) != 0 {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                // A helper descheduled on an oversubscribed host: give it the core.
                std::thread::yield_now();
            }
        }
        if let Some(payload) = lock(&s.panic).take() {
            resume_unwind(payload);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _g = lock(&self.shared.park_lock);
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Member `member`'s range of a pass of `tasks` tasks cut among `members`.
fn range(member: usize, members: usize, tasks: usize) -> std::ops::Range<usize> {
    member * tasks / members..(member + 1) * tasks / members
}

/// Claims and runs the open pass's tasks, `member`'s own range first, then the others' (from
/// their fronts), until none is left. A task's panic is kept for the publisher (the first one)
/// and the claiming goes on, so every task of a pass runs.
fn claim(s: &Shared, member: usize, task: &Task<'_>, tasks: usize) {
    let _in = InTask::enter();
    let members = s.next.len();
    for r in (member..members).chain(0..member) {
        let end = range(r, members, tasks).end;
        loop {
            let t = s.next[r].fetch_add(1, Relaxed);
            if t >= end {
                break;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| task(t))) {
                lock(&s.panic).get_or_insert(payload);
            }
        }
    }
}

/// A helper's life: join each pass once, spin, yield, then park between passes.
fn helper(s: &Shared, member: usize) {
    let mut seen = 0u64;
    let mut idle_since = Instant::now();
    let mut idle = Duration::ZERO;
    let mut polls = 0u32;
    loop {
        let state = s.state.load(Acquire);
        if state & 1 == 1 && state != seen {
            seen = state;
            s.inside.fetch_add(1, SeqCst);
            if s.state.load(SeqCst) == state {
                // SAFETY: registered while the pass is open, so the publisher keeps `pass` and its
                // task alive (and unchanged) until this helper leaves.
                let (pass, task) = unsafe {
                    let pass = *s.pass.get();
                    (pass, &*pass.task)
                };
                claim(s, member, task, pass.tasks);
            }
            s.inside.fetch_sub(1, SeqCst);
            idle_since = Instant::now();
            idle = Duration::ZERO;
            continue;
        }
        if s.shutdown.load(Relaxed) {
            return;
        }
        if idle < SPIN_FOR {
            std::hint::spin_loop();
            polls = polls.wrapping_add(1);
            // The clock is read every 64 polls: a pause is tens of cycles, `Instant::now` more.
            if polls.is_multiple_of(64) {
                idle = idle_since.elapsed();
            }
        } else if idle < YIELD_UNTIL {
            std::thread::yield_now();
            idle = idle_since.elapsed();
        } else {
            park(s, seen);
            idle_since = Instant::now();
            idle = Duration::ZERO;
        }
    }
}

/// Sleeps until a pass newer than `seen` opens or the team shuts down (or spuriously).
fn park(s: &Shared, seen: u64) {
    let guard = lock(&s.park_lock);
    s.parked.fetch_add(1, SeqCst);
    // Registered as parked before looking: a publisher that opens a pass after this load sees
    // `parked` and notifies under the lock, which this thread holds until it waits.
    let state = s.state.load(SeqCst);
    let _guard = if (state & 1 == 1 && state != seen) || s.shutdown.load(SeqCst) {
        guard
    } else {
        s.wake.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    s.parked.fetch_sub(1, SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Waits (bounded) until `done()` holds; the bound is a hang guard, not a speed check.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(30), "never happened: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn every_task_of_every_pass_runs_exactly_once() {
        for members in [2, 3, 4] {
            let team = Team::new(members, "test-team");
            for pass in 0..2000usize {
                let tasks = pass % 37;
                let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                team.run(tasks, &|t| {
                    counts[t].fetch_add(1, Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Relaxed) == 1), "pass {pass} of {members} members");
            }
        }
    }

    #[test]
    fn helpers_run_tasks_concurrently_with_the_publisher() {
        let team = Team::new(2, "test-team");
        // Task 0 waits for task 1 to start: with one thread this pass could never finish.
        let started = AtomicBool::new(false);
        let publisher = std::thread::current().id();
        let helper_ran = AtomicBool::new(false);
        team.run(2, &|t| {
            if std::thread::current().id() != publisher {
                helper_ran.store(true, SeqCst);
            }
            if t == 1 {
                started.store(true, SeqCst);
            } else {
                eventually("the other task started", || started.load(SeqCst));
            }
        });
        assert!(helper_ran.load(SeqCst), "a helper ran a task");
    }

    #[test]
    fn a_panic_in_a_task_reaches_the_publisher_and_the_team_keeps_working() {
        let team = Team::new(3, "test-team");
        for bad in [0, 5, 63] {
            let ran = AtomicU32::new(0);
            let result = catch_unwind(AssertUnwindSafe(|| {
                team.run(64, &|t| {
                    ran.fetch_add(1, Relaxed);
                    if t == bad {
                        panic!("task {t} failed");
                    }
                })
            }));
            let payload = result.expect_err("the pass raises the task's panic");
            let msg = payload.downcast_ref::<String>().cloned().unwrap_or_default();
            assert_eq!(msg, format!("task {bad} failed"));
            assert_eq!(ran.load(Relaxed), 64, "the other tasks still ran");
        }
        let counts: Vec<AtomicU32> = (0..100).map(|_| AtomicU32::new(0)).collect();
        team.run(100, &|t| {
            counts[t].fetch_add(1, Relaxed);
        });
        assert!(counts.iter().all(|c| c.load(Relaxed) == 1));
    }

    #[test]
    fn an_idle_team_parks_its_helpers_and_wakes_for_the_next_pass() {
        let team = Team::new(3, "test-team");
        team.run(8, &|_| {});
        eventually("both helpers parked", || team.parked() == 2);
        let helpers_ran = AtomicU32::new(0);
        let publisher = std::thread::current().id();
        // Each task waits until some helper has run one, so the pass needs a woken helper.
        team.run(2, &|_| {
            if std::thread::current().id() != publisher {
                helpers_ran.fetch_add(1, SeqCst);
            } else {
                eventually("a woken helper ran a task", || helpers_ran.load(SeqCst) > 0);
            }
        });
        assert!(helpers_ran.load(SeqCst) > 0);
    }

    #[test]
    fn a_pass_inside_a_task_runs_inline() {
        let team = Team::new(2, "test-team");
        let counts: Vec<AtomicU32> = (0..16).map(|_| AtomicU32::new(0)).collect();
        team.run(4, &|outer| {
            let me = std::thread::current().id();
            team.run(4, &|inner| {
                assert_eq!(std::thread::current().id(), me, "a nested pass stays on its thread");
                counts[outer * 4 + inner].fetch_add(1, Relaxed);
            });
        });
        assert!(counts.iter().all(|c| c.load(Relaxed) == 1));
    }

    #[test]
    fn passes_from_two_threads_take_turns() {
        let team = Team::new(2, "test-team");
        let total = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        team.run(10, &|_| {
                            total.fetch_add(1, Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Relaxed), 2 * 500 * 10);
    }
}
