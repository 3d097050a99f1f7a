//! Runtime dispatch of the kernels' own loops (everything outside gemm, which dispatches
//! itself) to the widest vector instructions the CPU has. The crate is compiled for baseline
//! x86-64 (SSE2) so that it runs anywhere; the same loops compiled for AVX2 or AVX-512 run
//! faster on a CPU that has them.
//!
//! Only the code inlined into `vectorized`'s argument is compiled for the wider target, so
//! the kernels it runs are `#[inline(always)]`. The results do not depend on the target: Rust
//! never fuses a multiply and an add on its own, and the kernels' reductions fix their order
//! in explicit lanes (`vector_math`).
//!
//! `SAGAN_SIMD=baseline` or `SAGAN_SIMD=avx2` caps the level (`avx512`: no cap) (like PyTorch's
//! `ATEN_CPU_CAPABILITY`): to rule the dispatch out when chasing a problem, and for the test
//! that every level trains the same weights.

/// `f()`, compiled for AVX-512 or AVX2 + FMA where the CPU has them.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the CPU has the features these functions are compiled for.
        Level::Avx512 => return unsafe { avx512(f) },
        Level::Avx2 => return unsafe { avx2(f) },
        Level::Baseline => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
/// Instruction-set levels, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Baseline,
    Avx2,
    Avx512,
}

#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        let avx512 = has!("avx512f") && has!("avx512vl") && has!("avx512bw");
        let detected = match (avx2, avx512) {
            (true, true) => Level::Avx512,
            (true, false) => Level::Avx2,
            _ => Level::Baseline,
        };
        let cap = match std::env::var("SAGAN_SIMD").as_deref() {
            Ok("baseline") => Level::Baseline,
            Ok("avx2") => Level::Avx2,
            Ok("avx512") | Err(_) => Level::Avx512,
            Ok(other) => {
                tracing::warn!(
                    "SAGAN_SIMD={other:?} is not one of baseline, avx2, avx512; \
                     using the CPU's widest level"
                );
                Level::Avx512
            }
        };
        detected.min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
