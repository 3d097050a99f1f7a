//! CPU set-up for training: thread count and denormal handling.

use crate::{Error, Result};

/// Sets the worker-thread count for candle (rayon) and flushes denormals to zero on every
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
