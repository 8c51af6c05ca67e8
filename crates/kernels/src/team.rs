//! A team of spinning threads for decoding's many short parallel loops.
//!
//! Decoding one token runs ~75 matrix × vector products of 0.05–1 ms each,
//! with serial work (norms, rope, attention of one query) between them.
//! Rayon's workers go to sleep within microseconds of running out of work,
//! and waking one costs a futex round trip: on the 2-core build VMs,
//! measured, 27 µs per parallel loop back to back and 140 µs after a 200 µs
//! gap — several milliseconds of every 20 ms token. llama.cpp's threads poll
//! for the next operation instead (its `--poll`); so do these.
//!
//! [`for_each`] runs a list of tasks on the calling thread plus
//! `threads − 1` helpers. Helpers spin on an epoch counter for up to
//! [`SPIN`] after their last task (yielding the core now and then to any
//! other runnable thread), then sleep on a condition variable; a
//! token's worth of work keeps them awake, and a finished generation lets
//! them sleep 2 ms later. One loop runs at a time: a call made while
//! another runs (a nested call, another thread) runs its tasks serially.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper polls before it sleeps.
pub const SPIN: Duration = Duration::from_millis(2);

/// Runs `f` on every item, spread over the team; returns when all are done.
/// Items are claimed one at a time in order, so give a few per thread.
pub fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    if items.len() <= 1 {
        items.into_iter().for_each(f);
        return;
    }
    let cells: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let task = |i: usize| {
        let item = cells[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(item) = item {
            f(item)
        }
    };
    match team() {
        Some(team) => team.run(cells.len(), &task),
        None => (0..cells.len()).for_each(task),
    }
}

/// The process's team, started on first use with candle's thread count
/// (`RAYON_NUM_THREADS`, else the available cores); `None` for one thread.
fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let helpers = candle_core::utils::get_num_threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        let team = Team::new(helpers);
        team.spawn_helpers();
        Some(team)
    })
}

type Job = *const (dyn Fn(usize) + Sync);

struct Team {
    helpers: usize,
    /// Held by the thread whose loop is running.
    running: Mutex<()>,
    /// The running loop's task, valid from an epoch's start until every
    /// helper has checked out of it (`pending == 0`).
    job: UnsafeCell<Option<Job>>,
    /// Bumped when a loop starts (publishes `job`, `next`, `len`).
    epoch: AtomicU64,
    next: AtomicUsize,
    len: AtomicUsize,
    /// Helpers still inside the current loop.
    pending: AtomicUsize,
    panicked: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `running`, before it
// bumps `epoch` (Release) and after every helper left the previous loop
// (`pending == 0`, Acquire); helpers read it only between observing the new
// epoch (Acquire) and decrementing `pending` (Release).
unsafe impl Sync for Team {}

impl Team {
    /// A team of `helpers` (leaked: it lives as long as the process); no
    /// helper runs before [`Team::spawn_helpers`].
    fn new(helpers: usize) -> &'static Team {
        Box::leak(Box::new(Team {
            helpers,
            running: Mutex::new(()),
            job: UnsafeCell::new(None),
            epoch: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }))
    }

    fn spawn_helpers(&'static self) {
        for h in 0..self.helpers {
            std::thread::Builder::new()
                .name(format!("pipeline-team-{h}"))
                .spawn(move || self.help())
                .expect("spawn a team thread");
        }
    }

    fn run(&self, len: usize, task: &(dyn Fn(usize) + Sync)) {
        let _running = match self.running.try_lock() {
            Ok(g) => g,
            // A task panicked in an earlier loop: the team is fine.
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return (0..len).for_each(task),
        };
        // SAFETY: see `impl Sync`: no helper reads `job` now, and this call
        // does not return before they all stopped using it (`Finish`).
        unsafe {
            *self.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(task));
        }
        self.next.store(0, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.pending.store(self.helpers, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Release);
        {
            // Helpers check the epoch under this lock before they sleep, so
            // none misses the bump.
            let _g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        // Waits for the helpers even if a task of ours panics.
        struct Finish<'a>(&'a Team);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                while self.0.pending.load(Ordering::Acquire) != 0 {
                    std::hint::spin_loop();
                }
                // SAFETY: every helper has left the loop.
                unsafe { *self.0.job.get() = None }
            }
        }
        let finish = Finish(self);
        self.claim(task);
        drop(finish);
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of pipeline_kernels::team::for_each panicked (see the message above)");
        }
    }

    /// Runs tasks until none is left unclaimed.
    fn claim(&self, task: &(dyn Fn(usize) + Sync)) {
        let len = self.len.load(Ordering::Relaxed);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= len {
                return;
            }
            task(i);
        }
    }

    /// A helper's life: wait for an epoch, take tasks, check out.
    fn help(&self) {
        // The epoch the team was created with, not the current one: the
        // first loop may have started before this thread ran.
        let mut seen = 0;
        loop {
            seen = self.wait_past(seen);
            // SAFETY: see `impl Sync`.
            let task = unsafe { (*self.job.get()).expect("a job is published with its epoch") };
            let task = unsafe { &*task };
            if catch_unwind(AssertUnwindSafe(|| self.claim(task))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
                // Leave the remaining tasks unclaimed: the caller panics.
                self.next.store(usize::MAX / 2, Ordering::Relaxed);
            }
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }

    /// Polls for an epoch other than `seen` for up to [`SPIN`], then sleeps
    /// until one comes; returns it.
    fn wait_past(&self, seen: u64) -> u64 {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = self.epoch.load(Ordering::Acquire);
            if e != seen {
                return e;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                if since.elapsed() < SPIN {
                    // Let any other runnable thread (rayon's) have the core.
                    std::thread::yield_now();
                    continue;
                }
                let g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                let _g = self
                    .wake
                    .wait_while(g, |_| self.epoch.load(Ordering::Acquire) == seen)
                    .unwrap_or_else(|e| e.into_inner());
                since = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_back_to_back_and_after_the_helpers_slept() {
        for round in 0..200 {
            if round == 100 {
                std::thread::sleep(SPIN * 3);
            }
            let mut outs = vec![0usize; 37];
            let items: Vec<(usize, &mut usize)> = outs.iter_mut().enumerate().collect();
            for_each(items, |(i, o)| *o = i * round + 1);
            assert!(outs.iter().enumerate().all(|(i, &o)| o == i * round + 1), "round {round}");
        }
    }

    #[test]
    fn a_loop_started_before_the_helpers_ran_finishes() {
        let team = Team::new(2);
        let n = std::sync::Arc::new(AtomicUsize::new(0));
        let (done, finished) = std::sync::mpsc::channel();
        let counter = n.clone();
        // Not scoped: if the loop hangs, the test fails instead of hanging.
        std::thread::spawn(move || {
            team.run(16, &|_| {
                counter.fetch_add(1, Ordering::Relaxed);
            });
            done.send(()).unwrap();
        });
        // The loop has begun (its epoch is out) before any helper runs.
        while team.epoch.load(Ordering::Acquire) == 0 {
            std::hint::spin_loop();
        }
        team.spawn_helpers();
        let waited = finished.recv_timeout(Duration::from_secs(10));
        assert!(waited.is_ok(), "the loop never finished: a helper missed its epoch");
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn a_nested_call_runs_serially_and_a_panic_reaches_the_caller() {
        let total = AtomicUsize::new(0);
        for_each((0..8).collect(), |_| {
            for_each((0..5).collect(), |j: usize| {
                total.fetch_add(j, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 8 * 10);
        let r = catch_unwind(|| for_each((0..64).collect(), |i: usize| assert!(i != 40, "task 40")));
        assert!(r.is_err());
        // The team still works afterwards.
        let n = AtomicUsize::new(0);
        for_each((0..64).collect(), |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 64);
    }
}
