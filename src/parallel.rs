//! How many threads spdlab's tensor work uses, and how.
//!
//! candle parallelises inside each operation: element-wise operations above 64k elements on
//! its barrier pool (whose waiting threads spin: the caller without pause, workers 25,000
//! rounds before parking) and matrix products on rayon. An SPD step is hundreds of small
//! operations, so that is a fork/join every few microseconds; with two threads on two cores
//! it measured no faster than one, and when other processes compete for the cores a spinning
//! thread waits on one that the scheduler has put aside, for a whole time slice, at every
//! operation (5–10× slower than one thread).
//!
//! spdlab instead splits the work once per step: each training step's batch is cut into row
//! shards computed on their own threads, each running candle single-threaded, and the
//! gradients are summed (see `Trainer::shard_count`). A shard thread that is preempted delays
//! the step by its own share of the work, and nobody spins while waiting for it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);
static EXPLICIT: AtomicBool = AtomicBool::new(false);

/// Threads a training step may use (1 until [`configure`] or [`set_threads`] is called).
pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed).max(1)
}

/// Sets the threads a training step may use, as asked for by the user (`--threads`).
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
    EXPLICIT.store(true, Ordering::Relaxed);
}

/// Whether the thread count was asked for with `--threads` (else it is the default).
pub fn explicit() -> bool {
    EXPLICIT.load(Ordering::Relaxed)
}

/// The default thread count: the cores this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Configures the process once, before any tensor work: candle's own operations run
/// single-threaded (their pools are sized on first use, from these variables), and training
/// steps use `requested` threads (default: [`default_threads`]). Returns the thread count.
///
/// # Safety
/// Sets environment variables: call it before any other thread exists (at the start of
/// `main`).
pub unsafe fn configure(requested: Option<usize>) -> usize {
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    match requested {
        Some(n) => set_threads(n),
        None => THREADS.store(default_threads(), Ordering::Relaxed),
    }
    threads()
}

/// Runs `f(i)` for `i` in `0..n` on the calling thread (i = 0) and the shard pool's persistent
/// threads, and returns the results in order. The threads live as long as the process, so
/// their allocator heaps stay warm from step to step.
pub fn run_shards<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if n <= 1 {
        return (0..n).map(&f).collect();
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let (first, rest) = out.split_at_mut(1);
    pool().in_place_scope(|s| {
        for (k, slot) in rest.iter_mut().enumerate() {
            let f = &f;
            s.spawn(move |_| *slot = Some(f(k + 1)));
        }
        first[0] = Some(f(0));
    });
    out.into_iter()
        .map(|r| r.expect("every shard ran"))
        .collect()
}

fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads().saturating_sub(1).max(1))
            .thread_name(|i| format!("spdlab-shard-{i}"))
            .build()
            .expect("cannot start the shard threads")
    })
}
