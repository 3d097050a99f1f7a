//! CPU set-up for training: thread count, denormal handling and the allocator's purging.

use crate::{Error, Result};

/// Sets the worker-thread count for rayon (every kernel) and flushes denormals to zero on every
/// computing thread: GAN activations drift into denormal range and, unflushed, slow a CPU run
/// several-fold after a few hundred steps. Call once, before any tensor work.
pub fn configure(threads: Option<usize>) -> Result<usize> {
    let threads = match threads {
        Some(0) => return Err(Error::Config("--threads must be at least 1".into())),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    // candle sizes its matmul parallelism from this variable.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // Every heavy kernel runs on rayon's pool; candle's own pool only splits its small
    // elementwise ops (gradient sums), and its workers spin for a while after each op, taking
    // a core from rayon's threads; on the calling thread alone they take none.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    flush_denormals();
    // A second call (e.g. several trainings in one test process) finds the pool already built.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(|_| flush_denormals())
        .build_global();
    Ok(threads)
}

/// Sets FTZ and DAZ in this thread's MXCSR.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes only this thread's SSE control register; FTZ|DAZ change no
    // result other than denormals, which become zero.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= 0x8040;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
    }
}

/// mimalloc's `mi_option_purge_delay` (milliseconds before freed memory goes back to the OS;
/// -1: never). libmimalloc-sys exposes option ids only as numbers; Cargo.toml pins the version
/// this one is read from (its `mimalloc.h`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps memory that mimalloc frees mapped for its next allocation. A training step frees and
/// reallocates the same buffers, so every return to the OS comes back as page faults on the
/// next step; peak memory is what the process holds anyway. Only meaningful in a binary whose
/// global allocator is mimalloc (sagan-train); call before the first tensor work.
pub fn keep_freed_memory() {
    // SAFETY: writes one of mimalloc's option words, which it reads only when it purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
