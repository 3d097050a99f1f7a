//! The building blocks of the kernels: strided GEMM, vectorised loops and their run-time SIMD
//! dispatch, per-thread scratch buffers, and access to a CPU tensor's f32 data.

pub(in crate::ops) mod matmul;
pub(in crate::ops) mod scratch;
pub(in crate::ops) mod simd;
pub(in crate::ops) mod storage;
pub(in crate::ops) mod vector_math;
