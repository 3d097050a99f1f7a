//! Access to the f32 data of a CPU tensor's storage, for custom ops' kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The storage's data range for `l`, checked to be contiguous and `len` elements long.
fn contiguous_range(l: &Layout, len: usize) -> Result<std::ops::Range<usize>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!(
            "sagan custom ops: operand must be contiguous, got strides {:?}",
            l.stride()
        );
    };
    if end - start != len {
        candle_core::bail!(
            "sagan custom ops: operand has {} elements, expected {len}",
            end - start
        );
    }
    Ok(start..end)
}

/// The contiguous f32 data of a custom op's operand, checked against the expected length.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!(
            "sagan custom ops: expected f32 storage, got {:?}",
            s.dtype()
        );
    };
    Ok(&data[contiguous_range(l, len)?])
}

/// `f32_slice` for the operand an in-place op writes.
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, len: usize) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!(
            "sagan custom ops: expected f32 storage, got {:?}",
            s.dtype()
        );
    };
    Ok(&mut data[contiguous_range(l, len)?])
}

/// `f` on the contiguous f32 data of CPU tensors, read in place: for kernels that run outside a
/// custom op's forward, such as a backward with more operands than a custom op takes.
pub fn with_f32_data<R, const N: usize>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let guards = tensors.map(Tensor::storage_and_layout);
    let mut data = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("sagan custom ops: operand is not on the CPU");
        };
        data.push(f32_slice(cpu, layout, layout.shape().elem_count())?);
    }
    match <[&[f32]; N]>::try_from(data) {
        Ok(data) => Ok(f(data)),
        Err(_) => candle_core::bail!("sagan custom ops: operand count"),
    }
}
