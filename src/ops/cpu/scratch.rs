//! Per-thread reusable buffers for the kernels' temporaries (im2col matrices, layout copies).
//!
//! A kernel call would otherwise allocate its temporaries afresh, and fresh memory is zeroed
//! by the allocator (or faulted in from the OS) before the kernel overwrites it anyway: a
//! memset of a few MiB per convolution. Buffers taken here come back to the taking thread's
//! pool on drop, with their old contents, for the next kernel to size and overwrite.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps: as many as one kernel holds at once.
const KEPT_PER_THREAD: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A temporary buffer from the calling thread's pool. Its contents are stale: size it with
/// `resize` (which writes only elements past the old length) and overwrite what is read.
#[derive(Debug)]
pub(in crate::ops) struct ScratchBuf(Vec<f32>);

impl ScratchBuf {
    pub(in crate::ops) fn take() -> Self {
        Self(
            POOL.with(|pool| pool.borrow_mut().pop())
                .unwrap_or_default(),
        )
    }
}

impl ScratchBuf {
    /// The buffer's first `len` elements, stale, growing it (never shrinking it) to have
    /// them: the pool hands its buffers to temporaries of every size, and a buffer resized
    /// down and up again would be zero-filled past its shorter length each time.
    pub(in crate::ops) fn grown_to(&mut self, len: usize) -> &mut [f32] {
        if self.0.len() < len {
            self.0.resize(len, 0.0);
        }
        &mut self.0[..len]
    }
}

impl Drop for ScratchBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        // `try_with`: a buffer dropped while the thread's locals are torn down is just freed.
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if buf.capacity() > 0 && pool.len() < KEPT_PER_THREAD {
                pool.push(buf);
            }
        });
    }
}

impl Deref for ScratchBuf {
    type Target = Vec<f32>;

    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl DerefMut for ScratchBuf {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_their_thread() {
        let mut buf = ScratchBuf::take();
        buf.resize(1000, 1.0);
        let ptr = buf.as_ptr();
        drop(buf);
        let again = ScratchBuf::take();
        assert_eq!(
            (again.as_ptr(), again.len()),
            (ptr, 1000),
            "the same buffer, contents kept"
        );
        let other = std::thread::spawn(|| ScratchBuf::take().capacity())
            .join()
            .unwrap();
        assert_eq!(other, 0, "another thread has its own pool");
    }
}
