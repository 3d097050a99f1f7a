//! Which implementation the layers' ops take: sagan's fused CPU kernels or candle's own ops.

use std::cell::Cell;
use std::thread::LocalKey;

use candle_core::Device;

/// The implementation of the layers' ops on the CPU. On any other device only candle's own
/// ops run (the kernels have no GPU code), whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The fused kernels for f32 CPU tensors; candle's ops for everything else.
    #[default]
    Fused,
    /// candle's own ops (conv2d, conv_transpose2d, matmul, softmax, batch norm, ...) with
    /// candle's backward, on the CPU too: the path a GPU takes.
    Generic,
}

thread_local! {
    // Per thread, not per process: the choice is read where a graph is built, on the thread that
    // runs the forward, and tests that run side by side must not see each other's.
    static BACKEND: Cell<Backend> = const { Cell::new(Backend::Fused) };
}

/// The backend of this thread.
pub fn backend() -> Backend {
    BACKEND.with(Cell::get)
}

/// Runs `f` with this thread's ops on `backend`, restoring the previous choice after (also when
/// `f` panics).
pub fn with_backend<R>(backend: Backend, f: impl FnOnce() -> R) -> R {
    with_cell(&BACKEND, backend, f)
}

/// Runs `f` with the thread-local `cell` set to `value`, restoring its previous value after
/// (also when `f` panics).
pub(crate) fn with_cell<T: Copy + 'static, R>(
    cell: &'static LocalKey<Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(cell, cell.with(|c| c.replace(value)));
    f()
}

/// Whether the fused kernels may take tensors on `device`.
pub(crate) fn fused_on(device: &Device) -> bool {
    device.is_cpu() && backend() == Backend::Fused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_backend_is_scoped_to_the_thread_and_the_call() {
        assert!(fused_on(&Device::Cpu));
        with_backend(Backend::Generic, || {
            assert!(!fused_on(&Device::Cpu));
            let other = std::thread::spawn(|| fused_on(&Device::Cpu));
            assert!(
                other.join().unwrap(),
                "another thread kept the fused kernels"
            );
        });
        assert!(fused_on(&Device::Cpu));
        let caught = std::panic::catch_unwind(|| with_backend(Backend::Generic, || panic!()));
        assert!(caught.is_err());
        assert_eq!(
            backend(),
            Backend::Fused,
            "a panic left the generic backend on"
        );
    }
}
