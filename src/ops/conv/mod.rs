//! Fast, differentiable 2-D convolutions for candle on CPU.
//!
//! candle 0.11's CPU `conv_transpose2d` is a direct per-output-pixel loop without a GEMM, and
//! its conv2d backward computes the input gradient through that same loop, which makes GAN
//! training several times slower than the arithmetic requires. This module provides `conv2d` and
//! `conv_transpose2d` as candle custom ops whose forward and backward passes are all
//! im2col / col2im plus one large GEMM from the `gemm` crate.
//!
//! Both ops are the same linear map seen from its two sides. Take a plain convolution from an
//! "image" `[B, C, H, W]` to an "output" `[B, O, Ho, Wo]` with a kernel `[O, C, k, k]`:
//! - conv2d forward                = image -> output  (`conv_forward`)
//! - conv2d grad_x                 = output -> image  (`conv_backward_data`)
//! - conv_transpose2d forward      = output -> image  (`conv_backward_data`, the image is its result)
//! - conv_transpose2d grad_x       = image -> output  (`conv_forward`)
//! - both weight gradients         = image x output   (`conv_backward_filter`)
//!
//! The backward passes of `conv2d_bias_act` and `conv_transpose2d` compute their gradients in
//! one pass over the batch (`conv_epilogue_backward`, `conv_transpose_backward`), so that the
//! per-chunk buffer both GEMMs read (the output gradient channel-major, im2col of the output
//! gradient) is built once.
//!
//! The kernels work on chunks of several batch items at once: im2col lays a chunk side by side
//! as `[C*k*k, n*Ho*Wo]`, so each pass is one GEMM with a long dimension even for the tiny
//! spatial sizes of a GAN, while the chunk's im2col buffer stays small enough to be reused from
//! cache. A kernel that covers the whole image (the generator's z -> 7x7 layer, the
//! discriminator's last layer) is a fully connected layer and skips im2col entirely.
//!
//! The 4x4 / stride-2 sampling layers between wide feature maps, which do most of a SAGAN's
//! arithmetic, go through Winograd F(4x4, 2x2) instead where its tiles fit the feature map
//! well (`winograd`): about half the multiply-adds of im2col + GEMM. Their weight gradients
//! stay on im2col.
//!
//! Only f32 CPU tensors take this path; `conv2d` and `conv_transpose2d` hand anything else to
//! candle's own ops.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};

use crate::config::Activation;
use candle_nn::BatchNorm;
use rayon::prelude::*;

use super::channel::{self as channel_ops, BatchNormAct, Epilogue};
use super::cpu::matmul::{matmul, matmul_on, MatRef};
use super::cpu::scratch::ScratchBuf;
use super::cpu::simd::vectorized;
use super::cpu::storage::{f32_slice, with_f32_data};
use super::cpu::vector_math::lane_sum;
use super::handoff;

mod winograd;

/// `y = conv2d(x, w)` without bias. `x` is `[B, Cin, H, W]`, `w` is `[Cout, Cin, k, k]` (square
/// kernel); groups 1, dilation 1. Output spatial size is `(H + 2 * padding - k) / stride + 1`.
///
/// f32 tensors on the CPU take the fast path; anything else falls back to candle's own op.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if !use_fast_path(x, w) {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    ConvGeom::for_conv2d(x.dims(), w.dims(), stride, padding)?;
    handoff::apply_op2(&x, &w, Conv2dOp { stride, padding })
}

/// `act(conv2d(x, w) + bias)` as one op: the bias and activation are applied to each output
/// chunk in place, and the convolution's own output never becomes a tensor with a gradient
/// buffer of its own. The same result as `channel_ops::bias_act(&conv2d(..), ..)`, which is
/// what anything but f32 on the CPU (or a negative leaky slope) gets.
pub fn conv2d_bias_act(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
    act: Activation,
    leaky_slope: f64,
) -> candle_core::Result<Tensor> {
    let epilogue = Epilogue::new(act, leaky_slope);
    let (Some(epilogue), true, DType::F32) = (epilogue, use_fast_path(x, w), bias.dtype()) else {
        let y = conv2d(x, w, stride, padding)?;
        return channel_ops::bias_act(&y, Some(bias), act, leaky_slope);
    };
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let geom = ConvGeom::for_conv2d(x.dims(), w.dims(), stride, padding)?;
    if bias.dims() != [geom.out_c] {
        candle_core::bail!(
            "conv2d: bias shape {:?} for {} output channels",
            bias.dims(),
            geom.out_c
        );
    }
    let op = Conv2dEpilogueOp {
        conv: Conv2dOp { stride, padding },
        epilogue,
    };
    handoff::apply_op3(&x, &w, &bias.contiguous()?, op)
}

/// Transposed convolution without bias. `x` is `[B, Cin, H, W]`, `w` is `[Cin, Cout, k, k]`
/// (candle's layout); output_padding 0, dilation 1. Output spatial size is
/// `(H - 1) * stride - 2 * padding + k`.
///
/// f32 tensors on the CPU take the fast path; anything else falls back to candle's own op.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if !use_fast_path(x, w) {
        return x.conv_transpose2d(w, padding, 0, stride, 1);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let op = ConvTranspose2dOp::new(&x, &w, stride, padding)?;
    handoff::apply_op2(&x, &w, op)
}

/// `act(batch_norm(conv_transpose2d(x, w) + bias))` (see `channel_ops::batch_norm_act`) with
/// the training-mode norm inside the convolution's op: the convolution's output is kept by the
/// op for the norm's backward instead of becoming a tensor of the graph, which would get a
/// zeroed gradient buffer and an add in candle's backward (a G layer's whole activation).
/// Anything the fused kernels do not take (evaluation, other devices) composes the two.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_bn_act(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    bias: &Tensor,
    bn: &BatchNorm,
    act: Activation,
    leaky_slope: f64,
    train: bool,
) -> candle_core::Result<Tensor> {
    let norm = match use_fast_path(x, w) {
        true => BatchNormAct::for_training(x, bn, act, leaky_slope, train),
        false => None,
    };
    let Some(norm) = norm else {
        let z = conv_transpose2d(x, w, stride, padding)?;
        return channel_ops::batch_norm_act(&z, Some(bias), bn, act, leaky_slope, train);
    };
    // The op has three operands: the norm's scale and shift travel as one.
    let (gamma, beta) = channel_ops::scale_shift(bn, train, x.device())?;
    let gamma_beta = Tensor::cat(&[&gamma, &beta], 0)?;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let op = ConvTransposeNormOp {
        conv: ConvTranspose2dOp::new(&x, &w, stride, padding)?,
        norm: norm.clone(),
        kept: Mutex::new(None),
    };
    let y = handoff::apply_op3(&x, &w, &gamma_beta, op)?;
    norm.update_running_stats(bn, Some(bias), y.elem_count())?;
    Ok(y)
}

/// The custom kernels only handle f32 on the CPU; other cases keep candle's implementation.
fn use_fast_path(x: &Tensor, w: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && w.dtype() == DType::F32
}

/// Spatial size of a transposed convolution's output, `(len - 1) * stride - 2 * padding + k`.
fn transposed_len(
    len: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<usize> {
    if len == 0 || stride == 0 {
        candle_core::bail!(
            "conv_transpose2d: input size {len} and stride {stride} must be positive"
        );
    }
    ((len - 1) * stride + k)
        .checked_sub(2 * padding)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "conv_transpose2d: padding {padding} too large for input {len}, kernel {k}, stride {stride}"
            ))
        })
}

/// Shape of one convolution, described from the plain conv2d's point of view: it maps an image
/// `[batch, img_c, img_h, img_w]` to an output `[batch, out_c, out_h, out_w]` with a kernel
/// `[out_c, img_c, k, k]`. A transposed convolution is the same geometry run backwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConvGeom {
    batch: usize,
    img_c: usize,
    img_h: usize,
    img_w: usize,
    out_c: usize,
    out_h: usize,
    out_w: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl ConvGeom {
    /// Geometry of `conv2d(x, w)` from the dims of `x [B, C, H, W]` and `w [O, C, k, k]`.
    fn for_conv2d(
        x: &[usize],
        w: &[usize],
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let [batch, img_c, img_h, img_w] = dims4("conv2d input", x)?;
        let [out_c, w_c, k, k2] = dims4("conv2d kernel", w)?;
        if w_c != img_c {
            candle_core::bail!("conv2d: input has {img_c} channels but the kernel expects {w_c}");
        }
        let geom = Self {
            batch,
            img_c,
            img_h,
            img_w,
            out_c,
            out_h: 0,
            out_w: 0,
            k,
            stride,
            padding,
        };
        let (out_h, out_w) = geom.conv_out_size(k2)?;
        Ok(Self {
            out_h,
            out_w,
            ..geom
        })
    }

    /// Geometry of a transposed convolution of `x [B, Cin, H, W]` with `w [Cin, Cout, k, k]` into
    /// an image of `op.img_h x op.img_w`: `x` is the output side, the result the image side.
    fn for_conv_transpose2d(
        x: &[usize],
        w: &[usize],
        op: &ConvTranspose2dOp,
    ) -> candle_core::Result<Self> {
        let [batch, out_c, out_h, out_w] = dims4("conv_transpose2d input", x)?;
        let [w_o, img_c, k, k2] = dims4("conv_transpose2d kernel", w)?;
        if w_o != out_c {
            candle_core::bail!(
                "conv_transpose2d: input has {out_c} channels but the kernel expects {w_o}"
            );
        }
        let geom = Self {
            batch,
            img_c,
            img_h: op.img_h,
            img_w: op.img_w,
            out_c,
            out_h,
            out_w,
            k,
            stride: op.stride,
            padding: op.padding,
        };
        if geom.conv_out_size(k2)? != (out_h, out_w) {
            candle_core::bail!(
                "conv_transpose2d: a {}x{} image does not convolve back to the {out_h}x{out_w} input",
                op.img_h,
                op.img_w
            );
        }
        Ok(geom)
    }

    /// Geometry of a weight gradient from the image `[B, C, H, W]` and the output gradient
    /// `[B, O, Ho, Wo]`, checking that they belong to one convolution.
    fn for_filter_grad(
        img: &[usize],
        out: &[usize],
        op: &FilterGradOp,
    ) -> candle_core::Result<Self> {
        let [batch, img_c, img_h, img_w] = dims4("filter-grad image", img)?;
        let [out_b, out_c, out_h, out_w] = dims4("filter-grad output", out)?;
        let geom = Self {
            batch,
            img_c,
            img_h,
            img_w,
            out_c,
            out_h,
            out_w,
            k: op.k,
            stride: op.stride,
            padding: op.padding,
        };
        if out_b != batch || geom.conv_out_size(op.k)? != (out_h, out_w) {
            candle_core::bail!("filter grad: image {img:?} and output {out:?} do not match");
        }
        Ok(geom)
    }

    /// Output size of the plain convolution; `k2` is the kernel's width, which must equal `k`.
    fn conv_out_size(&self, k2: usize) -> candle_core::Result<(usize, usize)> {
        if k2 != self.k || self.k == 0 || self.stride == 0 {
            candle_core::bail!(
                "conv: need a square, non-empty kernel and a positive stride (kernel {}x{k2}, stride {})",
                self.k,
                self.stride
            );
        }
        let len = |n: usize| {
            (n + 2 * self.padding)
                .checked_sub(self.k)
                .map(|span| span / self.stride + 1)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "conv: kernel {} larger than padded input {n} + 2 * {}",
                        self.k, self.padding
                    ))
                })
        };
        Ok((len(self.img_h)?, len(self.img_w)?))
    }

    /// Whether the kernel covers the whole unpadded image, giving a single output pixel: the
    /// convolution is then a fully connected layer on the flattened image (the generator's
    /// z -> 7x7 layer, the discriminator's last layer) and needs no im2col at all.
    fn is_dense(&self) -> bool {
        self.padding == 0 && self.k == self.img_h && self.k == self.img_w
    }

    /// Elements of one batch item's image.
    fn img_item(&self) -> usize {
        self.img_c * self.img_h * self.img_w
    }

    /// Elements of one batch item's output.
    fn out_item(&self) -> usize {
        self.out_c * self.out_plane()
    }

    fn img_len(&self) -> usize {
        self.batch * self.img_item()
    }

    fn out_len(&self) -> usize {
        self.batch * self.out_item()
    }

    fn kernel_len(&self) -> usize {
        self.out_c * self.col_rows()
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Rows of the im2col matrix: one per (image channel, kernel row, kernel column).
    fn col_rows(&self) -> usize {
        self.img_c * self.k * self.k
    }

    /// Columns of the im2col matrix: one per (batch item, output pixel).
    fn col_cols(&self) -> usize {
        self.batch * self.out_plane()
    }
}

fn dims4(what: &str, dims: &[usize]) -> candle_core::Result<[usize; 4]> {
    <[usize; 4]>::try_from(dims)
        .map_err(|_| candle_core::Error::Msg(format!("{what}: expected 4 dims, got {dims:?}")))
}

/// conv2d as a custom op: `(x [B, C, H, W], w [O, C, k, k]) -> [B, O, Ho, Wo]`.
#[derive(Clone, Copy, Debug)]
struct Conv2dOp {
    stride: usize,
    padding: usize,
}

impl Conv2dOp {
    /// The forward on the operands' storage, with an epilogue and its bias operand if given.
    fn forward(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        epilogue: Option<(Epilogue, &CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geom = ConvGeom::for_conv2d(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let x = f32_slice(s1, l1, geom.img_len())?;
        let w = f32_slice(s2, l2, geom.kernel_len())?;
        let epilogue = match epilogue {
            Some((epilogue, s3, l3)) => Some((epilogue, f32_slice(s3, l3, geom.out_c)?)),
            None => None,
        };
        let y = conv_forward(&geom, x, w, epilogue)?;
        let shape = Shape::from((geom.batch, geom.out_c, geom.out_h, geom.out_w));
        Ok((CpuStorage::F32(y), shape))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sagan-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, _, img_h, img_w) = x.dims4()?;
        let (_, _, k, _) = w.dims4()?;
        let data_op = ConvTranspose2dOp {
            stride: self.stride,
            padding: self.padding,
            img_h,
            img_w,
        };
        // Only what the graph needs: a network's input and a frozen (detached) weight need
        // no gradient, and each skipped one is a whole GEMM.
        let grad_x = x
            .track_op()
            .then(|| grad.apply_op2_no_bwd(w, &data_op))
            .transpose()?;
        let filter_op = FilterGradOp {
            stride: self.stride,
            padding: self.padding,
            k,
        };
        let grad_w = w
            .track_op()
            .then(|| x.apply_op2_no_bwd(&grad, &filter_op))
            .transpose()?;
        Ok((grad_x, grad_w))
    }
}

/// `conv2d_bias_act` as a custom op: `(x, w, bias [O]) -> act(conv2d(x, w) + bias)`.
#[derive(Clone, Copy, Debug)]
struct Conv2dEpilogueOp {
    conv: Conv2dOp,
    epilogue: Epilogue,
}

impl CustomOp3 for Conv2dEpilogueOp {
    fn name(&self) -> &'static str {
        "sagan-conv2d-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let epilogue = Some((self.epilogue, s3, l3));
        self.conv.forward((s1, l1), (s2, l2), epilogue)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geom = ConvGeom::for_conv2d(x.dims(), w.dims(), self.conv.stride, self.conv.padding)?;
        // A whole-image kernel is one GEMM without im2col / col2im (see `conv_forward`); the
        // chunked pass below would add both (measured: a sagan-mnist28 step ~7 % slower). A
        // Winograd layer's input gradient is a Winograd transposed convolution, which shares
        // nothing with the weight gradient's im2col.
        if geom.is_dense() || geom.takes_winograd() {
            let (dz, dbias) = self.epilogue.backward(y, grad, bias)?;
            let (dx, dw) = self.conv.bwd(x, w, y, &dz)?;
            return Ok((dx, dw, dbias));
        }
        let wanted = Wanted {
            x: x.track_op(),
            w: w.track_op(),
            bias: bias.track_op(),
        };
        let grad = grad.contiguous()?;
        let grads = with_f32_data([x, w, y, &grad], |data| {
            conv_epilogue_backward(&geom, self.epilogue, data, wanted)
        })??;
        Ok((
            tensor_like(grads.dx, x)?,
            tensor_like(grads.dw, w)?,
            tensor_like(grads.dbias, bias)?,
        ))
    }
}

/// Transposed convolution as a custom op: `(x [B, Cin, H, W], w [Cin, Cout, k, k])` to
/// `[B, Cout, img_h, img_w]`. The image size is explicit so that conv2d's input gradient can
/// recover rows and columns that a strided convolution never reads (they get zero gradient).
#[derive(Clone, Copy, Debug)]
struct ConvTranspose2dOp {
    stride: usize,
    padding: usize,
    img_h: usize,
    img_w: usize,
}

impl ConvTranspose2dOp {
    /// The op for `x` [B, Cin, H, W] and `w` [Cin, Cout, k, k], its geometry checked.
    fn new(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> candle_core::Result<Self> {
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, k, _) = w.dims4()?;
        let op = Self {
            stride,
            padding,
            img_h: transposed_len(h, k, stride, padding)?,
            img_w: transposed_len(wd, k, stride, padding)?,
        };
        ConvGeom::for_conv_transpose2d(x.dims(), w.dims(), &op)?;
        Ok(op)
    }
}

impl CustomOp2 for ConvTranspose2dOp {
    fn name(&self) -> &'static str {
        "sagan-conv-transpose2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geom = ConvGeom::for_conv_transpose2d(l1.dims(), l2.dims(), self)?;
        let x = f32_slice(s1, l1, geom.out_len())?;
        let w = f32_slice(s2, l2, geom.kernel_len())?;
        let y = conv_backward_data(&geom, x, w)?;
        let shape = Shape::from((geom.batch, geom.img_c, geom.img_h, geom.img_w));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let geom = ConvGeom::for_conv_transpose2d(x.dims(), w.dims(), self)?;
        let wanted = Wanted {
            x: x.track_op(),
            w: w.track_op(),
            bias: false,
        };
        // As in `Conv2dEpilogueOp::bwd`: a whole-image kernel keeps its im2col-free GEMMs, and a
        // Winograd layer takes the Winograd convolution for its input gradient.
        if geom.is_dense() || geom.takes_winograd() {
            let (_, _, k, _) = w.dims4()?;
            let conv_op = Conv2dOp {
                stride: self.stride,
                padding: self.padding,
            };
            let grad_x = wanted
                .x
                .then(|| grad.apply_op2_no_bwd(w, &conv_op))
                .transpose()?;
            let filter_op = FilterGradOp {
                stride: self.stride,
                padding: self.padding,
                k,
            };
            let grad_w = wanted
                .w
                .then(|| grad.apply_op2_no_bwd(x, &filter_op))
                .transpose()?;
            return Ok((grad_x, grad_w));
        }
        let grads = with_f32_data([x, w, &grad], |data| {
            conv_transpose_backward(&geom, data, wanted)
        })??;
        Ok((tensor_like(grads.dx, x)?, tensor_like(grads.dw, w)?))
    }
}

/// `conv_transpose2d_bn_act`'s op: `(x, w, [gamma, beta])` to the normalised, activated output.
struct ConvTransposeNormOp {
    conv: ConvTranspose2dOp,
    norm: BatchNormAct,
    /// The convolution's output, from the forward, for the norm's backward.
    kept: Mutex<Option<Tensor>>,
}

impl CustomOp3 for ConvTransposeNormOp {
    fn name(&self) -> &'static str {
        "sagan-conv-transpose2d-bn-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(z), shape) = self.conv.cpu_fwd(s1, l1, s2, l2)? else {
            candle_core::bail!("conv-transpose + batch norm: the convolution gave no f32 data");
        };
        let c = shape.dims()[1];
        let (gamma, beta) = f32_slice(s3, l3, 2 * c)?.split_at(c);
        let y = self.norm.normalize(&z, shape.dims(), gamma, beta);
        let z = Tensor::from_vec(z, shape.clone(), &Device::Cpu)?;
        *self.kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(z);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gamma_beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "conv-transpose + batch norm: backward before forward".into(),
                )
            })?;
        let gamma = gamma_beta.narrow(0, 0, gamma_beta.elem_count() / 2)?;
        let (dz, dgamma_beta) = self.norm.gradients(&z, y, &gamma.to_vec1()?, grad)?;
        let (dx, dw) = self.conv.bwd(x, w, &z, &dz)?;
        Ok((dx, dw, gamma_beta.track_op().then_some(dgamma_beta)))
    }
}

/// `data` as a tensor shaped like `like`, where there is data.
fn tensor_like(data: Option<Vec<f32>>, like: &Tensor) -> candle_core::Result<Option<Tensor>> {
    data.map(|data| Tensor::from_vec(data, like.shape(), like.device()))
        .transpose()
}

/// Backward of a transposed convolution (`geom` seen as the plain convolution from its output
/// to its input) in one pass over the batch: per chunk, one im2col of the output gradient feeds
/// both the input gradient (`W x im2col(grad)`) and the weight gradient
/// (`x x im2col(grad)^T`), which as separate ops would each build it.
fn conv_transpose_backward(
    geom: &ConvGeom,
    [x, w, grad]: [&[f32]; 3],
    wanted: Wanted,
) -> candle_core::Result<ConvGrads> {
    let w_mat = MatRef::row_major(w, geom.out_c, geom.col_rows());
    let mut dx = vec![0f32; if wanted.x { geom.out_len() } else { 0 }];
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    let runs = for_each_run(geom, &mut dx, out_item, |run, dx, all_threads| {
        let mut filter = wanted.w.then(|| FilterGrad::new(&run.geom));
        let (mut cols, mut buf) = (ScratchBuf::take(), ScratchBuf::take());
        for (chunk, offset) in run.chunks() {
            let item = run.first + offset;
            im2col(
                &chunk,
                &grad[item * img_item..][..chunk.img_len()],
                &mut cols,
            );
            if wanted.x {
                let dx = &mut dx[offset * out_item..][..chunk.out_len()];
                forward_chunk(&chunk, w_mat, &cols, dx, &mut buf, all_threads)?;
            }
            if let Some(filter) = filter.as_mut() {
                let x = channel_major(&chunk, &x[item * out_item..][..chunk.out_len()], &mut buf);
                filter.add(&chunk, offset, &cols, x, all_threads)?;
            }
        }
        Ok(filter)
    })?;
    Ok(ConvGrads {
        dx: wanted.x.then_some(dx),
        dw: wanted
            .w
            .then(|| FilterGrad::sum(geom, runs.into_iter().flatten().collect())),
        dbias: None,
    })
}

/// Weight gradient of a convolution: `(image [B, C, H, W], output grad [B, O, Ho, Wo])` to
/// `[O, C, k, k]`. Used only inside the other ops' backward passes, so it has no backward itself.
#[derive(Clone, Copy, Debug)]
struct FilterGradOp {
    stride: usize,
    padding: usize,
    k: usize,
}

impl CustomOp2 for FilterGradOp {
    fn name(&self) -> &'static str {
        "sagan-conv-filter-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geom = ConvGeom::for_filter_grad(l1.dims(), l2.dims(), self)?;
        let img = f32_slice(s1, l1, geom.img_len())?;
        let grad = f32_slice(s2, l2, geom.out_len())?;
        let dw = conv_backward_filter(&geom, img, grad)?;
        let shape = Shape::from((geom.out_c, geom.img_c, geom.k, geom.k));
        Ok((CpuStorage::F32(dw), shape))
    }
}

/// Target size, in f32s (4 MiB), of one chunk's im2col matrix: small enough to stay in the
/// last-level cache between the im2col / GEMM / col2im steps that touch it, large enough for an
/// efficient GEMM. Measured ~25% faster than one im2col matrix for the whole batch on the
/// sagan64 layers.
const CHUNK_COLS_BUDGET: usize = 1 << 20;

/// Fewest GEMM columns (batch items x output pixels) worth a chunk of their own.
const CHUNK_MIN_COLS: usize = 256;

/// Items per batch chunk: about `CHUNK_COLS_BUDGET` im2col elements, at least
/// `CHUNK_MIN_COLS` columns, and then evened out so that the chunk count is a multiple of the
/// thread count (chunks may run one per thread: see `for_each_chunk`).
fn chunk_items(geom: &ConvGeom) -> usize {
    let per_item = geom.col_rows() * geom.out_plane();
    let batch = geom.batch.max(1);
    let items = (CHUNK_COLS_BUDGET / per_item.max(1))
        .max(CHUNK_MIN_COLS.div_ceil(geom.out_plane().max(1)))
        .clamp(1, batch);
    let threads = rayon::current_num_threads().max(1);
    let chunks = batch.div_ceil(items).next_multiple_of(threads).min(batch);
    batch.div_ceil(chunks)
}

/// Whether chunks of `items` run one per thread: with more than one thread and at least as many
/// chunks as threads (see `for_each_chunk`).
fn chunks_per_thread(geom: &ConvGeom, items: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && geom.batch.div_ceil(items) >= threads
}

/// Reusable buffers of one chunk's pass: the im2col matrix and a layout buffer.
type ChunkBuffers = (ScratchBuf, ScratchBuf);

fn take_chunk_buffers() -> ChunkBuffers {
    (ScratchBuf::take(), ScratchBuf::take())
}

/// Runs `f(chunk geometry, dst chunk, src chunk, buffers, all_threads)` for every batch chunk,
/// `dst` and `src` split into chunks of `dst_item` and `src_item` elements per batch item.
///
/// With at least as many chunks as threads the chunks run in parallel, each on one thread with
/// single-threaded GEMMs (`all_threads` false): gemm's own threading splits every product and
/// joins after it, and im2col, GEMM and rearrangement would each fork and join per chunk, where
/// whole chunks per thread synchronise once. Fewer chunks run one after another on all threads.
fn for_each_chunk(
    geom: &ConvGeom,
    dst: &mut [f32],
    dst_item: usize,
    src: &[f32],
    src_item: usize,
    f: impl Fn(&ConvGeom, &mut [f32], &[f32], &mut ChunkBuffers, bool) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<()> {
    let items = chunk_items(geom);
    let chunk_geom = |dst: &[f32]| ConvGeom {
        batch: dst.len() / dst_item,
        ..*geom
    };
    if chunks_per_thread(geom, items) {
        dst.par_chunks_mut(items * dst_item)
            .zip(src.par_chunks(items * src_item))
            .try_for_each_init(take_chunk_buffers, |bufs, (dst, src)| {
                f(&chunk_geom(dst), dst, src, bufs, false)
            })
    } else {
        let mut bufs = take_chunk_buffers();
        dst.chunks_mut(items * dst_item)
            .zip(src.chunks(items * src_item))
            .try_for_each(|(dst, src)| f(&chunk_geom(dst), dst, src, &mut bufs, true))
    }
}

/// Plain convolution, image -> output: `out[b] = W [O, C*k*k] x im2col(img[b])`, one GEMM per
/// batch chunk over the chunk's side-by-side im2col matrix. An `epilogue` with its bias is
/// applied to each chunk's output while it is in cache.
fn conv_forward(
    geom: &ConvGeom,
    img: &[f32],
    w: &[f32],
    epilogue: Option<(Epilogue, &[f32])>,
) -> candle_core::Result<Vec<f32>> {
    if geom.takes_winograd() {
        return winograd::conv_forward(geom, img, w, epilogue);
    }
    let w_mat = MatRef::row_major(w, geom.out_c, geom.col_rows());
    let mut out = vec![0f32; geom.out_len()];
    let finish = |out: &mut [f32]| {
        if let Some((epilogue, bias)) = epilogue {
            epilogue.apply_in_place(out, bias, geom.out_plane());
        }
    };
    if geom.is_dense() {
        // out [B, O] = img [B, C*k*k] x W^T.
        let img = MatRef::row_major(img, geom.batch, geom.col_rows());
        matmul(&mut out, img, w_mat.t(), false)?;
        finish(&mut out);
        return Ok(out);
    }
    let (out_item, img_item) = (geom.out_item(), geom.img_item());
    for_each_chunk(
        geom,
        &mut out,
        out_item,
        img,
        img_item,
        |chunk, dst, img, (cols, buf), all_threads| {
            im2col(chunk, img, cols);
            forward_chunk(chunk, w_mat, cols, dst, buf, all_threads)?;
            finish(dst);
            Ok(())
        },
    )?;
    Ok(out)
}

/// `out [B, O, Ho*Wo]` of one chunk from its im2col matrix: `W [O, C*k*k] x cols`, which is
/// channel-major (`[O, B*Ho*Wo]`) and rearranged through `buf` unless the chunk is one item.
fn forward_chunk(
    chunk: &ConvGeom,
    w_mat: MatRef,
    cols: &[f32],
    out: &mut [f32],
    buf: &mut Vec<f32>,
    all_threads: bool,
) -> candle_core::Result<()> {
    let cols = MatRef::row_major(cols, chunk.col_rows(), chunk.col_cols());
    if chunk.batch == 1 {
        return matmul_on(out, w_mat, cols, false, all_threads);
    }
    buf.resize(chunk.out_len(), 0.0);
    matmul_on(buf, w_mat, cols, false, all_threads)?;
    swap_outer_dims(buf, out, chunk.out_c, chunk.batch, chunk.out_plane());
    Ok(())
}

/// Adjoint of `conv_forward`, output -> image: per batch chunk, `cols = W^T [C*k*k, O] x grad`,
/// then col2im scatter-adds every column back onto the image pixels it was read from.
fn conv_backward_data(geom: &ConvGeom, grad: &[f32], w: &[f32]) -> candle_core::Result<Vec<f32>> {
    if geom.takes_winograd() {
        return winograd::conv_backward_data(geom, grad, w);
    }
    let w_mat = MatRef::row_major(w, geom.out_c, geom.col_rows());
    let mut img = vec![0f32; geom.img_len()];
    if geom.is_dense() {
        // img [B, C*k*k] = grad [B, O] x W.
        let grad = MatRef::row_major(grad, geom.batch, geom.out_c);
        matmul(&mut img, grad, w_mat, false)?;
        return Ok(img);
    }
    let w_t = transposed_weight(geom, w);
    let w_t = MatRef::row_major(&w_t, geom.col_rows(), geom.out_c);
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    for_each_chunk(
        geom,
        &mut img,
        img_item,
        grad,
        out_item,
        |chunk, img, grad, (cols, grad_buf), all_threads| {
            let grad = channel_major(chunk, grad, grad_buf);
            cols.resize(chunk.col_rows() * chunk.col_cols(), 0.0);
            let grad = MatRef::row_major(grad, chunk.out_c, chunk.col_cols());
            matmul_on(cols, w_t, grad, false, all_threads)?;
            col2im(chunk, cols, img);
            Ok(())
        },
    )?;
    Ok(img)
}

/// `W^T [C*k*k, O]` copied row-major, for the products from the output side to the image side:
/// gemm runs them ~15-30 % faster than over the transposed view of W, and every chunk reuses
/// the copy.
fn transposed_weight(geom: &ConvGeom, w: &[f32]) -> ScratchBuf {
    let mut w_t = ScratchBuf::take();
    w_t.resize(w.len(), 0.0);
    MatRef::row_major(w, geom.out_c, geom.col_rows())
        .t()
        .copy_row_major(&mut w_t);
    w_t
}

/// Weight gradient: `dW [O, C*k*k] = sum over chunks of grad [O, n] x im2col(img)^T [n, C*k*k]`,
/// the batch sum folded into the GEMMs' inner dimension.
fn conv_backward_filter(
    geom: &ConvGeom,
    img: &[f32],
    grad: &[f32],
) -> candle_core::Result<Vec<f32>> {
    if geom.is_dense() {
        // dW [O, C*k*k] = grad^T [O, B] x img [B, C*k*k].
        let mut dw = vec![0f32; geom.kernel_len()];
        let grad_t = MatRef::row_major(grad, geom.batch, geom.out_c).t();
        let img = MatRef::row_major(img, geom.batch, geom.col_rows());
        matmul(&mut dw, grad_t, img, false)?;
        return Ok(dw);
    }
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    let partials = for_each_run(geom, &mut [], 0, |run, _, all_threads| {
        let mut filter = FilterGrad::new(&run.geom);
        let (mut cols, mut grad_buf) = (ScratchBuf::take(), ScratchBuf::take());
        for (chunk, offset) in run.chunks() {
            let item = run.first + offset;
            im2col(
                &chunk,
                &img[item * img_item..][..chunk.img_len()],
                &mut cols,
            );
            let grad = &grad[item * out_item..][..chunk.out_len()];
            let grad = channel_major(&chunk, grad, &mut grad_buf);
            filter.add(&chunk, offset, &cols, grad, all_threads)?;
        }
        Ok(filter)
    })?;
    Ok(FilterGrad::sum(geom, partials))
}

/// Consecutive batch chunks that one thread works through (or the whole batch, on all
/// threads).
struct Run {
    /// The run's geometry: the layer's, with the run's batch.
    geom: ConvGeom,
    /// The run's first batch item in the layer's batch.
    first: usize,
    /// Items per chunk, the layer's (`chunk_items`), so that every run chunks alike.
    items: usize,
}

impl Run {
    /// Each chunk's geometry and first item within the run.
    fn chunks(&self) -> impl Iterator<Item = (ConvGeom, usize)> + '_ {
        (0..self.geom.batch).step_by(self.items).map(move |offset| {
            let chunk = ConvGeom {
                batch: self.items.min(self.geom.batch - offset),
                ..self.geom
            };
            (chunk, offset)
        })
    }
}

/// Runs `f(run, run's part of dst, all_threads)` on consecutive runs of chunks and returns the
/// results in batch order: one run per thread, with single-threaded GEMMs, when chunks run one
/// per thread (see `for_each_chunk`), else the whole batch as one run on all threads. `dst`
/// holds `dst_item` elements per batch item (it may be empty).
fn for_each_run<R: Send>(
    geom: &ConvGeom,
    dst: &mut [f32],
    dst_item: usize,
    f: impl Fn(&Run, &mut [f32], bool) -> candle_core::Result<R> + Sync,
) -> candle_core::Result<Vec<R>> {
    let items = chunk_items(geom);
    if !chunks_per_thread(geom, items) {
        let run = Run {
            geom: *geom,
            first: 0,
            items,
        };
        return Ok(vec![f(&run, dst, true)?]);
    }
    let chunks = geom.batch.div_ceil(items);
    let run_items = chunks.div_ceil(rayon::current_num_threads()) * items;
    let firsts = (0..geom.batch).step_by(run_items);
    let dsts: Vec<&mut [f32]> = match dst.is_empty() {
        true => firsts.clone().map(|_| Default::default()).collect(),
        false => dst.chunks_mut(run_items * dst_item).collect(),
    };
    firsts
        .zip(dsts)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(first, dst)| {
            let geom = ConvGeom {
                batch: run_items.min(geom.batch - first),
                ..*geom
            };
            f(&Run { geom, first, items }, dst, false)
        })
        .collect()
}

/// A weight gradient summed chunk by chunk: `dW [O, C*k*k] += grad [O, n] x im2col(img)^T`.
struct FilterGrad {
    /// The sum, stored transposed (`dW^T [C*k*k, O]`) when `transposed`.
    sum: Vec<f32>,
    /// gemm copies (packs) the operand that is not in its preferred layout: here im2col's
    /// matrix, C*k*k x n elements. Computed transposed, dW^T = im2col(img) x grad^T, it packs
    /// the output gradient, O x n, instead: take the order that packs the smaller one.
    transposed: bool,
}

impl FilterGrad {
    fn new(geom: &ConvGeom) -> Self {
        Self {
            sum: vec![0f32; geom.kernel_len()],
            transposed: geom.col_rows() > geom.out_c,
        }
    }

    /// Adds one chunk's product from its im2col matrix `cols` and its output gradient
    /// channel-major, `grad` [O, n]; a run's first chunk (`offset` 0) writes the sum instead.
    fn add(
        &mut self,
        chunk: &ConvGeom,
        offset: usize,
        cols: &[f32],
        grad: &[f32],
        all_threads: bool,
    ) -> candle_core::Result<()> {
        let (rows, n) = (chunk.col_rows(), chunk.col_cols());
        let cols = MatRef::row_major(cols, rows, n);
        let grad = MatRef::row_major(grad, chunk.out_c, n);
        let accumulate = offset > 0;
        match self.transposed {
            true => matmul_on(&mut self.sum, cols, grad.t(), accumulate, all_threads),
            false => matmul_on(&mut self.sum, grad, cols.t(), accumulate, all_threads),
        }
    }

    /// The runs' sums added in batch order (deterministic for a thread count), as `[O, C*k*k]`.
    fn sum(geom: &ConvGeom, runs: Vec<FilterGrad>) -> Vec<f32> {
        let mut runs = runs.into_iter();
        let Some(first) = runs.next() else {
            return vec![0f32; geom.kernel_len()];
        };
        let transposed = first.transposed;
        let mut sum = first.sum;
        for run in runs {
            sum.iter_mut().zip(run.sum).for_each(|(s, r)| *s += r);
        }
        if !transposed {
            return sum;
        }
        let mut dw = vec![0f32; sum.len()];
        MatRef::row_major(&sum, geom.col_rows(), geom.out_c)
            .t()
            .copy_row_major(&mut dw);
        dw
    }
}

/// Which of a convolution's gradients a backward computes: only what the graph tracks (a
/// network's input and a frozen weight need none, and each skipped one is a whole GEMM).
#[derive(Clone, Copy, Debug)]
struct Wanted {
    x: bool,
    w: bool,
    bias: bool,
}

/// A convolution backward's gradients, each `None` unless wanted.
struct ConvGrads {
    dx: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
    dbias: Option<Vec<f32>>,
}

/// Backward of conv2d + bias + activation in one pass over the batch: per chunk, the output
/// gradient goes through the activation's derivative and into channel-major layout in one copy,
/// and that buffer feeds the bias sum, the input gradient (`W^T x dz`, col2im) and the weight
/// gradient (`dz x im2col(x)^T`). As separate ops, the activation's gradient, the bias sum and
/// the two convolution gradients would each pass over a full-size tensor of their own.
fn conv_epilogue_backward(
    geom: &ConvGeom,
    epilogue: Epilogue,
    [x, w, y, grad]: [&[f32]; 4],
    wanted: Wanted,
) -> candle_core::Result<ConvGrads> {
    let w_t = wanted.x.then(|| transposed_weight(geom, w));
    let w_t = w_t
        .as_deref()
        .map(|w_t| MatRef::row_major(w_t, geom.col_rows(), geom.out_c));
    let mut dx = vec![0f32; if wanted.x { geom.img_len() } else { 0 }];
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    let runs = for_each_run(geom, &mut dx, img_item, |run, dx, all_threads| {
        let mut filter = wanted.w.then(|| FilterGrad::new(&run.geom));
        let mut dbias = vec![0f32; geom.out_c];
        let (mut dz, mut cols) = (ScratchBuf::take(), ScratchBuf::take());
        for (chunk, offset) in run.chunks() {
            let item = run.first + offset;
            let start = item * out_item;
            let outputs = start..start + chunk.out_len();
            grad_before_act_channel_major(
                &chunk,
                epilogue,
                &y[outputs.clone()],
                &grad[outputs],
                &mut dz,
                &mut dbias,
            );
            if let Some(w_t) = w_t {
                cols.resize(chunk.col_rows() * chunk.col_cols(), 0.0);
                let dz = MatRef::row_major(&dz, chunk.out_c, chunk.col_cols());
                matmul_on(&mut cols, w_t, dz, false, all_threads)?;
                col2im(
                    &chunk,
                    &cols,
                    &mut dx[offset * img_item..][..chunk.img_len()],
                );
            }
            if let Some(filter) = filter.as_mut() {
                // `cols` is free again: col2im has consumed the input gradient's columns.
                im2col(&chunk, &x[item * img_item..][..chunk.img_len()], &mut cols);
                filter.add(&chunk, offset, &cols, &dz, all_threads)?;
            }
        }
        Ok((filter, dbias))
    })?;
    let mut dbias = vec![0f32; geom.out_c];
    let mut filters = Vec::with_capacity(runs.len());
    for (filter, run_dbias) in runs {
        dbias.iter_mut().zip(run_dbias).for_each(|(d, r)| *d += r);
        filters.extend(filter);
    }
    Ok(ConvGrads {
        dx: wanted.x.then_some(dx),
        dw: wanted.w.then(|| FilterGrad::sum(geom, filters)),
        dbias: wanted.bias.then_some(dbias),
    })
}

/// `dz [O, B*Ho*Wo] = grad * act'(y)` for a chunk's `y` and `grad` `[B, O, Ho*Wo]`, each
/// channel's sum added to `dbias [O]`.
fn grad_before_act_channel_major(
    chunk: &ConvGeom,
    epilogue: Epilogue,
    y: &[f32],
    grad: &[f32],
    dz: &mut Vec<f32>,
    dbias: &mut [f32],
) {
    let plane = chunk.out_plane();
    dz.resize(chunk.out_len(), 0.0);
    dz.par_chunks_mut(chunk.batch * plane)
        .zip(dbias.par_iter_mut())
        .enumerate()
        .for_each(|(o, (row, dbias))| {
            vectorized(
                #[inline(always)]
                || {
                    for (b, dst) in row.chunks_exact_mut(plane).enumerate() {
                        let src = (b * chunk.out_c + o) * plane;
                        epilogue.grad_before_act(&y[src..][..plane], &grad[src..][..plane], dst);
                    }
                    *dbias += lane_sum(row, |_, v| v);
                },
            )
        });
}

/// Output-side data `[B, O, Ho*Wo]` as `[O, B*Ho*Wo]`, the GEMM operand layout; rearranged into
/// `buf` unless the batch is a single item.
fn channel_major<'a>(geom: &ConvGeom, data: &'a [f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
    if geom.batch == 1 {
        return data;
    }
    buf.resize(data.len(), 0.0);
    swap_outer_dims(data, buf, geom.batch, geom.out_c, geom.out_plane());
    buf
}

/// Copies `src [a, b, inner]` to `dst [b, a, inner]`.
fn swap_outer_dims(src: &[f32], dst: &mut [f32], a: usize, b: usize, inner: usize) {
    if inner == 0 || a == 0 {
        return;
    }
    dst.par_chunks_mut(a * inner)
        .enumerate()
        .for_each(|(j, dst_block)| {
            for (i, dst_row) in dst_block.chunks_exact_mut(inner).enumerate() {
                let start = (i * b + j) * inner;
                dst_row.copy_from_slice(&src[start..start + inner]);
            }
        });
}

impl ConvGeom {
    /// For each kernel row `ki` (and column `kj`), the output rows (columns) whose image row
    /// `oh * stride + ki - padding` (column) lies inside the image. Computed once per call so that
    /// neither divisions nor bounds checks reach the inner loops.
    fn valid_ranges(&self) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
        let ranges = |in_len, out_len| {
            (0..self.k)
                .map(|offset| valid_range(offset, self.padding, self.stride, in_len, out_len))
                .collect()
        };
        (
            ranges(self.img_h, self.out_h),
            ranges(self.img_w, self.out_w),
        )
    }
}

/// Output indices `o` (of `out_len`) whose input index `o * stride + offset - padding` lies in
/// `0..in_len`.
fn valid_range(
    offset: usize,
    padding: usize,
    stride: usize,
    in_len: usize,
    out_len: usize,
) -> Range<usize> {
    let lo = padding.saturating_sub(offset).div_ceil(stride);
    let hi = if in_len + padding > offset {
        (in_len + padding - offset - 1) / stride + 1
    } else {
        0
    };
    let hi = hi.min(out_len);
    lo.min(hi)..hi
}

/// im2col for a batch into `cols` (resized to `[C*k*k, B*Ho*Wo]`): row `(c, ki, kj)`, column
/// `(b, oh, ow)` holds `img[b, c, oh * s + ki - p, ow * s + kj - p]`, zero in the padding.
fn im2col(geom: &ConvGeom, img: &[f32], cols: &mut Vec<f32>) {
    cols.resize(geom.col_rows() * geom.col_cols(), 0.0);
    if geom.is_k4_s2_p1() {
        im2col_k4_s2_p1(geom, img, cols);
    } else {
        im2col_gather(geom, img, cols);
    }
}

/// `im2col` for `ConvGeom::is_k4_s2_p1`, one task per (channel, kernel row): per item, the
/// image rows of the kernel row's parity (`K4_S2_TAPS`) are split once into their even and odd
/// columns, and each kernel column's row is one of the two halves, shifted as `K4_S2_TAPS`
/// says (`PlaneShifts`): long contiguous loops over the whole output plane instead of four
/// per output row of 7 to 32 pixels, whose set-up was their cost (1.4-2.3x, hot).
fn im2col_k4_s2_p1(geom: &ConvGeom, img: &[f32], cols: &mut [f32]) {
    let (out_w, img_w) = (geom.out_w, geom.img_w);
    let (row_len, out_plane, plane) = (geom.col_cols(), geom.out_plane(), geom.img_h * img_w);
    if row_len == 0 {
        return;
    }
    let shifts = PlaneShifts::new(geom);
    cols.par_chunks_mut(4 * row_len).enumerate().for_each_init(
        ScratchBuf::take,
        |halves, (c_ki, dst)| {
            vectorized(
                #[inline(always)]
                || {
                    let (c, ki) = (c_ki / 4, c_ki % 4);
                    let (parity, row_offset) = K4_S2_TAPS[ki];
                    halves.resize(2 * out_plane, 0.0);
                    let (even, odd) = halves.split_at_mut(out_plane);
                    for b in 0..geom.batch {
                        let src = &img[(b * geom.img_c + c) * plane..][..plane];
                        let rows = src.chunks_exact(img_w).skip(parity).step_by(2);
                        for ((row, even), odd) in rows
                            .zip(even.chunks_exact_mut(out_w))
                            .zip(odd.chunks_exact_mut(out_w))
                        {
                            deinterleave(row, even, odd);
                        }
                        let (d0, rest) = dst.split_at_mut(row_len);
                        let (d1, rest) = rest.split_at_mut(row_len);
                        let (d2, d3) = rest.split_at_mut(row_len);
                        let [d0, d1, d2, d3] =
                            [d0, d1, d2, d3].map(|row| &mut row[b * out_plane..][..out_plane]);
                        // Kernel columns 0-3 as `K4_S2_TAPS` has them, spelt out: with
                        // constant column offsets each call compiles to its own loop (looked
                        // up from the table in a loop, the kernel ran ~20 % slower at 7x7).
                        shifts.apply::<false>(d0, odd, row_offset, -1);
                        shifts.apply::<false>(d1, even, row_offset, 0);
                        shifts.apply::<false>(d2, odd, row_offset, 0);
                        shifts.apply::<false>(d3, even, row_offset, 1);
                    }
                },
            )
        },
    );
}

/// For each index `k` of a 4-wide, stride-2, padding-1 kernel: the parity of the image rows
/// (columns) it reads and the output offset `d` at which it reads them: output row `t` reads
/// image row `2 (t + d) + parity` (kernel row 0 reads `2t - 1`, 1 `2t`, 2 `2t + 1`, 3 `2t + 2`).
const K4_S2_TAPS: [(usize, isize); 4] = [(1, -1), (0, 0), (1, 0), (0, 1)];

/// Shifted copies and sums between flattened `out_h x out_w` planes, for the 4x4 / stride-2
/// im2col and col2im: a shift by whole rows is a contiguous range; a shift by a column also
/// masks the pixels whose neighbour in that direction lies outside the row.
struct PlaneShifts {
    out_w: usize,
    /// Whether pixel `p` has a left neighbour in its row.
    has_left: Vec<bool>,
    /// Whether pixel `p` has a right neighbour in its row.
    has_right: Vec<bool>,
}

impl PlaneShifts {
    fn new(geom: &ConvGeom) -> Self {
        let (out_w, out_plane) = (geom.out_w, geom.out_plane());
        Self {
            out_w,
            has_left: (0..out_plane).map(|p| p % out_w > 0).collect(),
            has_right: (0..out_plane).map(|p| p % out_w + 1 < out_w).collect(),
        }
    }

    /// `dst[(t, u)] (+)= src[(t + rows, u + cols)]` (`cols` in -1..=1), `ADD` summing onto
    /// `dst`, else writing it with zeros where the source pixel lies outside the plane.
    #[inline(always)]
    fn apply<const ADD: bool>(&self, dst: &mut [f32], src: &[f32], rows: isize, cols: isize) {
        let mask = match cols {
            0 => None,
            c if c > 0 => Some(&self.has_right[..]),
            _ => Some(&self.has_left[..]),
        };
        let shift = rows * self.out_w as isize + cols;
        let n = dst.len().saturating_sub(shift.unsigned_abs());
        let (to, from) = match shift >= 0 {
            true => (0, shift.unsigned_abs().min(dst.len())),
            false => (dst.len() - n, 0),
        };
        let to = to..to + n;
        if !ADD {
            dst[..to.start].fill(0.0);
            dst[to.end..].fill(0.0);
        }
        let (dst, src) = (&mut dst[to.clone()], &src[from..from + n]);
        match (mask, ADD) {
            (Some(mask), true) => {
                for ((d, &s), &keep) in dst.iter_mut().zip(src).zip(&mask[to]) {
                    *d += if keep { s } else { 0.0 };
                }
            }
            (Some(mask), false) => {
                for ((d, &s), &keep) in dst.iter_mut().zip(src).zip(&mask[to]) {
                    *d = if keep { s } else { 0.0 };
                }
            }
            (None, true) => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s),
            (None, false) => dst.copy_from_slice(src),
        }
    }
}

/// `even[u] = src[2u]`, `odd[u] = src[2u + 1]`.
#[inline(always)]
fn deinterleave(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let n = even.len();
    let (src, odd) = (&src[..2 * n], &mut odd[..n]);
    for u in 0..n {
        even[u] = src[2 * u];
        odd[u] = src[2 * u + 1];
    }
}

/// `im2col` for any geometry: per im2col row, a gather of output-row length per output row.
fn im2col_gather(geom: &ConvGeom, img: &[f32], cols: &mut [f32]) {
    let ConvGeom {
        img_h,
        img_w,
        out_h,
        out_w,
        k,
        stride,
        padding,
        ..
    } = *geom;
    let plane = img_h * img_w;
    let row_len = geom.col_cols();
    if row_len == 0 {
        return;
    }
    let (oh_ranges, ow_ranges) = geom.valid_ranges();
    cols.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, dst)| {
            vectorized(
                #[inline(always)]
                || {
                    let (c, ki, kj) = (row / (k * k), row / k % k, row % k);
                    let (oh_range, ow_range) = (oh_ranges[ki].clone(), ow_ranges[kj].clone());
                    if ow_range.len() < out_w || oh_range.len() < out_h {
                        dst.fill(0.0);
                    }
                    if ow_range.is_empty() {
                        return;
                    }
                    let iw0 = ow_range.start * stride + kj - padding;
                    for (b, dst_b) in dst.chunks_exact_mut(out_h * out_w).enumerate() {
                        let src = &img[(b * geom.img_c + c) * plane..][..plane];
                        for oh in oh_range.clone() {
                            let ih = oh * stride + ki - padding;
                            let src_row = &src[ih * img_w..][..img_w];
                            let dst_row = &mut dst_b[oh * out_w..][..out_w];
                            let dst = &mut dst_row[ow_range.clone()];
                            match stride {
                                1 => dst.copy_from_slice(&src_row[iw0..iw0 + dst.len()]),
                                // Indexed with a constant stride the gather vectorises:
                                // im2col of the stride-2 layers 25-35 % faster than with
                                // `step_by` (microbenchmark).
                                2 => {
                                    let src = &src_row[iw0..iw0 + 2 * dst.len() - 1];
                                    for (t, d) in dst.iter_mut().enumerate() {
                                        *d = src[2 * t];
                                    }
                                }
                                _ => {
                                    let src_iter = src_row[iw0..].iter().step_by(stride);
                                    for (d, s) in dst.iter_mut().zip(src_iter) {
                                        *d = *s;
                                    }
                                }
                            }
                        }
                    }
                },
            )
        });
}

/// col2im for a batch, the adjoint of `im2col`: every entry of `cols` is added onto the pixel
/// of `img` (zeroed by the caller) it would have been read from. Each task owns one `(b, c)`
/// image plane, so the scatter needs no synchronisation.
fn col2im(geom: &ConvGeom, cols: &[f32], img: &mut [f32]) {
    if geom.is_k4_s2_p1() {
        col2im_k4_s2_p1(geom, cols, img);
    } else {
        col2im_scatter(geom, cols, img);
    }
}

impl ConvGeom {
    /// The 4x4, stride-2, padding-1 kernel of every SAGAN up- and down-sampling layer, on an
    /// image of twice the output's (even) size.
    fn is_k4_s2_p1(&self) -> bool {
        (self.k, self.stride, self.padding) == (4, 2, 1)
            && (self.img_h, self.img_w) == (2 * self.out_h, 2 * self.out_w)
    }
}

/// `col2im` for `ConvGeom::is_k4_s2_p1`, per image plane through its four parity sub-images:
/// the pixels `(2t + py, 2u + px)` take the two kernel rows of parity `py` and the two kernel
/// columns of parity `px` (`K4_S2_TAPS`), so each sub-image is the sum of four of the plane's
/// kernel-tap rows, each shifted back by its taps' offsets (`PlaneShifts`), in long contiguous
/// loops over the whole flattened plane; the sub-images are then interleaved into the image.
/// A gather per image row made loops of output-row length (7 to 32 here) and spent its time
/// setting them up (1.3-2x, hot).
fn col2im_k4_s2_p1(geom: &ConvGeom, cols: &[f32], img: &mut [f32]) {
    let (out_w, row_len, out_plane) = (geom.out_w, geom.col_cols(), geom.out_plane());
    let plane = geom.img_h * geom.img_w;
    if plane == 0 {
        return;
    }
    let shifts = PlaneShifts::new(geom);
    img.par_chunks_mut(plane)
        .enumerate()
        .for_each_init(ScratchBuf::take, |subs, (bc, dst)| {
            vectorized(
                #[inline(always)]
                || {
                    let (b, c) = (bc / geom.img_c, bc % geom.img_c);
                    subs.resize(4 * out_plane, 0.0);
                    let tap = |ki: usize, kj: usize| {
                        let row = (c * 4 + ki) * 4 + kj;
                        &cols[row * row_len + b * out_plane..][..out_plane]
                    };
                    // Each sub-image's kernel rows and columns (parity 0: 1 and 3, parity 1:
                    // 2 and 0, as `K4_S2_TAPS` has them; the unshifted tap first, a plain
                    // copy), spelt out so that every call's shifts are constants (from a
                    // table in a loop: ~10 % slower at 7x7).
                    let (even_even, rest) = subs.split_at_mut(out_plane);
                    let (even_odd, rest) = rest.split_at_mut(out_plane);
                    let (odd_even, odd_odd) = rest.split_at_mut(out_plane);
                    sum_taps(&shifts, even_even, tap, [1, 3], [1, 3]);
                    sum_taps(&shifts, even_odd, tap, [1, 3], [2, 0]);
                    sum_taps(&shifts, odd_even, tap, [2, 0], [1, 3]);
                    sum_taps(&shifts, odd_odd, tap, [2, 0], [2, 0]);
                    let [even_even, even_odd, odd_even, odd_odd] =
                        [0, 1, 2, 3].map(|parity| &subs[parity * out_plane..][..out_plane]);
                    for (t, rows) in dst.chunks_exact_mut(4 * out_w).enumerate() {
                        let (even_row, odd_row) = rows.split_at_mut(2 * out_w);
                        let at = t * out_w..(t + 1) * out_w;
                        interleave(even_row, &even_even[at.clone()], &even_odd[at.clone()]);
                        interleave(odd_row, &odd_even[at.clone()], &odd_odd[at]);
                    }
                },
            )
        });
}

/// One parity sub-image of `col2im_k4_s2_p1`: the sum of the kernel taps `(ki, kj)` for
/// `ki` in `rows` and `kj` in `cols`, each `[near, far]` (the kernel index at output offset
/// 0, then the other), each tap shifted back by its output offsets.
#[inline(always)]
fn sum_taps<'a>(
    shifts: &PlaneShifts,
    sub: &mut [f32],
    tap: impl Fn(usize, usize) -> &'a [f32],
    rows: [usize; 2],
    cols: [usize; 2],
) {
    let back = |k: usize| -K4_S2_TAPS[k].1;
    let ([near_row, far_row], [near_col, far_col]) = (rows, cols);
    let (row_shift, col_shift) = (back(far_row), back(far_col));
    shifts.apply::<false>(sub, tap(near_row, near_col), back(near_row), back(near_col));
    shifts.apply::<true>(sub, tap(far_row, near_col), row_shift, back(near_col));
    shifts.apply::<true>(sub, tap(near_row, far_col), back(near_row), col_shift);
    shifts.apply::<true>(sub, tap(far_row, far_col), row_shift, col_shift);
}

/// `dst[2u] = even[u]`, `dst[2u + 1] = odd[u]`.
#[inline(always)]
fn interleave(dst: &mut [f32], even: &[f32], odd: &[f32]) {
    let n = even.len();
    let (dst, odd) = (&mut dst[..2 * n], &odd[..n]);
    for u in 0..n {
        dst[2 * u] = even[u];
        dst[2 * u + 1] = odd[u];
    }
}

/// `col2im` for any geometry, as a scatter: per image plane, each kernel tap's output rows are
/// added onto the image rows they were read from.
fn col2im_scatter(geom: &ConvGeom, cols: &[f32], img: &mut [f32]) {
    let ConvGeom {
        img_c,
        img_h,
        img_w,
        out_w,
        k,
        stride,
        padding,
        ..
    } = *geom;
    let plane = img_h * img_w;
    let (row_len, out_plane) = (geom.col_cols(), geom.out_plane());
    if plane == 0 {
        return;
    }
    let (oh_ranges, ow_ranges) = geom.valid_ranges();
    img.par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
        vectorized(
            #[inline(always)]
            || {
                let (b, c) = (bc / img_c, bc % img_c);
                for (ki, oh_range) in oh_ranges.iter().enumerate() {
                    for (kj, ow_range) in ow_ranges.iter().enumerate() {
                        if ow_range.is_empty() {
                            continue;
                        }
                        let row = (c * k + ki) * k + kj;
                        let src = &cols[row * row_len + b * out_plane..][..out_plane];
                        let iw0 = ow_range.start * stride + kj - padding;
                        for oh in oh_range.clone() {
                            let ih = oh * stride + ki - padding;
                            let src_row = &src[oh * out_w..][..out_w];
                            let dst_row = &mut dst[ih * img_w..][..img_w];
                            if stride == 1 {
                                let dst_seg = &mut dst_row[iw0..iw0 + ow_range.len()];
                                for (d, s) in dst_seg.iter_mut().zip(&src_row[ow_range.clone()]) {
                                    *d += *s;
                                }
                            } else {
                                let dst_iter = dst_row[iw0..].iter_mut().step_by(stride);
                                for (d, s) in dst_iter.zip(&src_row[ow_range.clone()]) {
                                    *d += *s;
                                }
                            }
                        }
                    }
                }
            },
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    /// One layer shape: batch, input channels, output channels, input height and width,
    /// kernel, stride, padding.
    #[derive(Clone, Copy, Debug)]
    struct Case {
        b: usize,
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        k: usize,
        s: usize,
        p: usize,
    }

    #[allow(clippy::too_many_arguments)] // a positional table of layer shapes reads best
    const fn case(
        b: usize,
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        k: usize,
        s: usize,
        p: usize,
    ) -> Case {
        Case {
            b,
            cin,
            cout,
            h,
            w,
            k,
            s,
            p,
        }
    }

    const CONV_CASES: &[Case] = &[
        case(1, 1, 1, 5, 5, 1, 1, 0),
        case(3, 2, 3, 8, 6, 3, 1, 1),
        case(3, 3, 4, 9, 7, 3, 2, 1),
        case(1, 4, 2, 10, 12, 4, 2, 1),
        case(3, 2, 5, 11, 9, 7, 1, 0),
        case(3, 5, 1, 7, 7, 7, 1, 0),
        case(1, 1, 8, 28, 28, 4, 2, 1),
        case(3, 1, 4, 14, 10, 4, 2, 1),
        case(3, 3, 2, 6, 5, 4, 1, 0),
        case(2, 3, 3, 5, 8, 1, 2, 0),
        case(3, 2, 2, 7, 6, 3, 2, 0),
        case(3, 2, 3, 13, 11, 7, 2, 1),
        case(3, 6, 3, 8, 8, 4, 2, 1),
        case(3, 4, 2, 1, 1, 1, 1, 0),
        // Winograd (`ConvGeom::takes_winograd`), on a side the tiles do not divide.
        case(8, 16, 24, 14, 22, 4, 2, 1),
        // Large enough to be split into chunks.
        case(3, 128, 3, 17, 17, 4, 1, 1),
    ];

    const CONV_T_CASES: &[Case] = &[
        case(3, 128, 256, 1, 1, 7, 1, 0),
        case(3, 16, 8, 1, 1, 4, 1, 0),
        case(3, 6, 4, 7, 7, 4, 2, 1),
        case(1, 4, 1, 14, 14, 4, 2, 1),
        case(3, 3, 5, 5, 7, 3, 1, 1),
        case(3, 2, 3, 4, 6, 3, 2, 1),
        case(1, 1, 1, 3, 3, 1, 1, 0),
        case(3, 2, 2, 5, 4, 3, 2, 0),
        case(2, 3, 2, 6, 5, 7, 1, 0),
        case(3, 4, 3, 4, 5, 7, 2, 1),
        case(2, 3, 2, 4, 4, 1, 2, 0),
        case(1, 1, 3, 6, 3, 4, 1, 1),
        // Winograd (`ConvGeom::takes_winograd`), on a side the tiles do not divide.
        case(8, 24, 16, 7, 11, 4, 2, 1),
        // Large enough to be split into chunks.
        case(3, 3, 128, 16, 16, 4, 1, 1),
    ];

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn to_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Asserts `got` matches `want` to 1e-4 of `want`'s magnitude.
    fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
        crate::ops::testing::assert_close(got, want, 1e-4, what);
    }

    fn conv_inputs(c: &Case, seed: u64) -> (Tensor, Tensor) {
        (
            randn(&[c.b, c.cin, c.h, c.w], seed),
            randn(&[c.cout, c.cin, c.k, c.k], seed + 1),
        )
    }

    fn conv_t_inputs(c: &Case, seed: u64) -> (Tensor, Tensor) {
        (
            randn(&[c.b, c.cin, c.h, c.w], seed),
            randn(&[c.cin, c.cout, c.k, c.k], seed + 1),
        )
    }

    fn candle_conv(x: &Tensor, w: &Tensor, c: &Case) -> Tensor {
        x.conv2d(w, c.p, c.s, 1, 1).unwrap()
    }

    fn candle_conv_t(x: &Tensor, w: &Tensor, c: &Case) -> Tensor {
        x.conv_transpose2d(w, c.p, 0, c.s, 1).unwrap()
    }

    fn ours_conv(x: &Tensor, w: &Tensor, c: &Case) -> Tensor {
        conv2d(x, w, c.s, c.p).unwrap()
    }

    fn ours_conv_t(x: &Tensor, w: &Tensor, c: &Case) -> Tensor {
        conv_transpose2d(x, w, c.s, c.p).unwrap()
    }

    type Op = fn(&Tensor, &Tensor, &Case) -> Tensor;

    /// Gradients of `(op(x, w) * r).sum_all()` w.r.t. `x` and `w`, for a fixed random `r`.
    fn grads(op: Op, x: &Tensor, w: &Tensor, c: &Case) -> (Tensor, Tensor) {
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let y = op(xv.as_tensor(), wv.as_tensor(), c);
        let r = randn(y.dims(), 99);
        let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (
            g.get(xv.as_tensor()).unwrap().clone(),
            g.get(wv.as_tensor()).unwrap().clone(),
        )
    }

    /// The geometries of `conv2d` on `conv` and of `conv_transpose2d` on `conv_t`.
    fn case_geoms(conv: Case, conv_t: Case) -> [ConvGeom; 2] {
        let c = conv;
        let conv = ConvGeom::for_conv2d(
            &[c.b, c.cin, c.h, c.w],
            &[c.cout, c.cin, c.k, c.k],
            c.s,
            c.p,
        );
        let c = conv_t;
        let op = ConvTranspose2dOp {
            stride: c.s,
            padding: c.p,
            img_h: transposed_len(c.h, c.k, c.s, c.p).unwrap(),
            img_w: transposed_len(c.w, c.k, c.s, c.p).unwrap(),
        };
        let conv_t = ConvGeom::for_conv_transpose2d(
            &[c.b, c.cin, c.h, c.w],
            &[c.cin, c.cout, c.k, c.k],
            &op,
        );
        [conv.unwrap(), conv_t.unwrap()]
    }

    #[test]
    fn large_cases_are_split_into_chunks() {
        let threads = rayon::current_num_threads();
        let last = |cases: &[Case]| cases[cases.len() - 1];
        for geom in case_geoms(last(CONV_CASES), last(CONV_T_CASES)) {
            let items = chunk_items(&geom);
            let chunks = geom.batch.div_ceil(items);
            assert!(chunks > 1, "{geom:?}: {items} items per chunk");
            // As many chunks as the budget needs, evened out over the threads.
            assert!(chunks % threads == 0 || items == 1, "{chunks} chunks");
        }
    }

    #[test]
    fn the_winograd_cases_take_winograd() {
        let before_last = |cases: &[Case]| cases[cases.len() - 2];
        for geom in case_geoms(before_last(CONV_CASES), before_last(CONV_T_CASES)) {
            assert!(geom.takes_winograd(), "{geom:?}");
        }
    }

    #[test]
    fn fused_bias_and_activation_match_the_separate_ops() {
        use crate::ops::testing::assert_grads_close;
        let acts = [
            (Activation::LeakyRelu, 0.1),
            (Activation::Relu, 0.0),
            (Activation::Tanh, 0.0),
            (Activation::None, 0.0),
        ];
        // Every conv case (strided, padded, chunked, dense) with each activation in turn.
        for (i, c) in CONV_CASES.iter().enumerate() {
            let (act, slope) = acts[i % acts.len()];
            let (x, w) = conv_inputs(c, i as u64 * 10 + 7);
            let (x, w) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let b = Var::from_tensor(&randn(&[c.cout], i as u64 + 50)).unwrap();
            let fused = conv2d_bias_act(&x, &w, &b, c.s, c.p, act, slope).unwrap();
            let y = conv2d(&x, &w, c.s, c.p).unwrap();
            let separate = channel_ops::bias_act(&y, Some(&b), act, slope).unwrap();
            let what = format!("{c:?} {act:?}");
            assert_close(&fused, &separate, &what);
            let r = randn(fused.dims(), 98);
            let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let vars = [(&x, "x"), (&w, "w"), (&b, "bias")];
            assert_grads_close(&grads(&fused), &grads(&separate), &vars, 1e-5, &what);
        }
    }

    /// `f` on a rayon pool of `threads` threads: the kernels split batches into runs and chunks
    /// by the thread count.
    fn on_threads(threads: usize, f: impl FnOnce() + Send) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(f);
    }

    #[test]
    fn fused_backward_computes_only_tracked_gradients_on_any_thread_count() {
        use crate::ops::testing::assert_grads_close;
        // x or w left untracked (a network's input, a frozen weight): the other gradients are
        // the all-tracked reference's, and the untracked operand gets none.
        // The op's operand: the variable's tensor where tracked, else a plain copy of its value.
        let operand = |var: &Var, track: bool| match track {
            true => var.as_tensor().clone(),
            false => var.as_tensor().detach(),
        };
        let var = |t: &Tensor| Var::from_tensor(t).unwrap();
        for threads in [1, 2, 3] {
            on_threads(threads, || {
                for (i, c) in CONV_CASES.iter().enumerate() {
                    for (track_x, track_w) in [(true, false), (false, true)] {
                        let what = format!("{c:?} threads {threads} x {track_x} w {track_w}");
                        let (x, w) = conv_inputs(c, i as u64 + 300);
                        let (xv, wv) = (var(&x), var(&w));
                        let bv = var(&randn(&[c.cout], i as u64 + 301));
                        let (x_in, w_in) = (operand(&xv, track_x), operand(&wv, track_w));
                        let slope = 0.1;
                        let fused = conv2d_bias_act(
                            &x_in,
                            &w_in,
                            &bv,
                            c.s,
                            c.p,
                            Activation::LeakyRelu,
                            slope,
                        )
                        .unwrap();
                        let y = conv2d(&xv, &wv, c.s, c.p).unwrap();
                        let reference =
                            channel_ops::bias_act(&y, Some(&bv), Activation::LeakyRelu, slope)
                                .unwrap();
                        let r = randn(fused.dims(), 97);
                        let grads =
                            |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                        let (got, want) = (grads(&fused), grads(&reference));
                        let mut vars = vec![(&bv, "bias")];
                        for (var, name, track) in [(&xv, "x", track_x), (&wv, "w", track_w)] {
                            match track {
                                true => vars.push((var, name)),
                                false => assert!(got.get(var).is_none(), "{what}: d{name}"),
                            }
                        }
                        assert_grads_close(&got, &want, &vars, 1e-5, &what);
                    }
                }
                for (i, c) in CONV_T_CASES.iter().enumerate() {
                    for (track_x, track_w) in [(true, false), (false, true), (true, true)] {
                        let what = format!("{c:?} threads {threads} x {track_x} w {track_w}");
                        let (x, w) = conv_t_inputs(c, i as u64 + 400);
                        let (xv, wv) = (var(&x), var(&w));
                        let (x_in, w_in) = (operand(&xv, track_x), operand(&wv, track_w));
                        let got = ours_conv_t(&x_in, &w_in, c);
                        let r = randn(got.dims(), 99); // as `grads` weights its reference
                        let g = (got * r).unwrap().sum_all().unwrap().backward().unwrap();
                        let (want_x, want_w) = grads(candle_conv_t, &x, &w, c);
                        for (var, want, track, name) in
                            [(&xv, want_x, track_x, "x"), (&wv, want_w, track_w, "w")]
                        {
                            match track {
                                true => assert_close(g.get(var).unwrap(), &want, &what),
                                false => assert!(g.get(var).is_none(), "{what}: d{name}"),
                            }
                        }
                    }
                }
            });
        }
    }

    #[test]
    fn whole_image_kernels_take_the_dense_path() {
        let dense =
            |x: &[usize], w: &[usize], p| ConvGeom::for_conv2d(x, w, 1, p).unwrap().is_dense();
        assert!(dense(&[3, 5, 7, 7], &[1, 5, 7, 7], 0));
        assert!(!dense(&[3, 5, 7, 7], &[1, 5, 7, 7], 1));
        assert!(!dense(&[3, 5, 7, 8], &[1, 5, 7, 7], 0));
    }

    /// A 4x4 / stride-2 / padding-1 conv's geometry from its output size.
    fn k4_s2_p1_geom(batch: usize, img_c: usize, out_h: usize, out_w: usize) -> ConvGeom {
        let x = [batch, img_c, 2 * out_h, 2 * out_w];
        let geom = ConvGeom::for_conv2d(&x, &[1, img_c, 4, 4], 2, 1).unwrap();
        assert!(geom.is_k4_s2_p1() && (geom.out_h, geom.out_w) == (out_h, out_w));
        geom
    }

    #[test]
    fn k4_s2_p1_col2im_gathers_what_the_scatter_adds() {
        // (batch, image channels, output height, output width)
        for (batch, img_c, out_h, out_w) in
            [(1, 1, 1, 1), (2, 3, 7, 7), (3, 2, 4, 5), (1, 2, 16, 3)]
        {
            let geom = k4_s2_p1_geom(batch, img_c, out_h, out_w);
            let cols = to_vec(&randn(&[geom.col_rows() * geom.col_cols()], 7));
            let mut want = vec![0f32; geom.img_len()];
            col2im_scatter(&geom, &cols, &mut want);
            // NaN where a pixel would be left unwritten.
            let mut got = vec![f32::NAN; geom.img_len()];
            col2im_k4_s2_p1(&geom, &cols, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{geom:?} pixel {i}: {g} vs {w}"
                );
            }
        }
        let odd = ConvGeom::for_conv2d(&[1, 1, 7, 8], &[1, 1, 4, 4], 2, 1).unwrap();
        assert!(!odd.is_k4_s2_p1());
    }

    #[test]
    fn k4_s2_p1_im2col_matches_the_general_gather() {
        for (batch, img_c, out_h, out_w) in
            [(1, 1, 1, 1), (2, 3, 7, 7), (3, 2, 4, 5), (1, 2, 16, 3)]
        {
            let geom = k4_s2_p1_geom(batch, img_c, out_h, out_w);
            let img = to_vec(&randn(&[geom.img_len()], 11));
            // NaN where an entry would be left unwritten.
            let mut want = vec![f32::NAN; geom.col_rows() * geom.col_cols()];
            im2col_gather(&geom, &img, &mut want);
            let mut got = want.clone();
            got.fill(f32::NAN);
            im2col_k4_s2_p1(&geom, &img, &mut got);
            assert!(
                !want.is_empty() && !want.iter().any(|v| v.is_nan()),
                "{geom:?}"
            );
            assert_eq!(got, want, "{geom:?}");
        }
    }

    #[test]
    fn conv2d_forward_matches_candle() {
        for (i, c) in CONV_CASES.iter().enumerate() {
            let (x, w) = conv_inputs(c, i as u64 * 10);
            assert_close(
                &ours_conv(&x, &w, c),
                &candle_conv(&x, &w, c),
                &format!("{c:?}"),
            );
        }
    }

    #[test]
    fn conv_transpose2d_forward_matches_candle() {
        for (i, c) in CONV_T_CASES.iter().enumerate() {
            let (x, w) = conv_t_inputs(c, i as u64 * 10);
            assert_close(
                &ours_conv_t(&x, &w, c),
                &candle_conv_t(&x, &w, c),
                &format!("{c:?}"),
            );
        }
    }

    /// candle's conv2d backward derives one output_padding from the height and applies it to
    /// the width too, so it fails when a strided conv leaves a different number of unread rows
    /// and columns; those cases are left to `gradients_match_finite_differences`.
    fn candle_conv2d_backward_works(c: &Case) -> bool {
        let unread = |n: usize| (n + 2 * c.p - c.k) % c.s;
        unread(c.h) == unread(c.w)
    }

    #[test]
    fn conv2d_backward_matches_candle() {
        for (i, c) in CONV_CASES
            .iter()
            .enumerate()
            .filter(|(_, c)| candle_conv2d_backward_works(c))
        {
            let (x, w) = conv_inputs(c, i as u64 * 10 + 5);
            let (gx, gw) = grads(ours_conv, &x, &w, c);
            let (want_x, want_w) = grads(candle_conv, &x, &w, c);
            assert_close(&gx, &want_x, &format!("grad x {c:?}"));
            assert_close(&gw, &want_w, &format!("grad w {c:?}"));
        }
    }

    #[test]
    fn conv_transpose2d_backward_matches_candle() {
        for (i, c) in CONV_T_CASES.iter().enumerate() {
            let (x, w) = conv_t_inputs(c, i as u64 * 10 + 5);
            let (gx, gw) = grads(ours_conv_t, &x, &w, c);
            let (want_x, want_w) = grads(candle_conv_t, &x, &w, c);
            assert_close(&gx, &want_x, &format!("grad x {c:?}"));
            assert_close(&gw, &want_w, &format!("grad w {c:?}"));
        }
    }

    #[test]
    fn transposed_conv_with_batch_norm_matches_the_separate_ops() {
        // The whole-image kernel (dense path), the 4x4 / stride-2 kernels (im2col and
        // Winograd), a general one.
        for (i, c) in [
            CONV_T_CASES[1],
            CONV_T_CASES[2],
            CONV_T_CASES[CONV_T_CASES.len() - 2],
            CONV_T_CASES[5],
        ]
        .iter()
        .enumerate()
        {
            for act in [Activation::Relu, Activation::LeakyRelu] {
                let what = format!("{c:?} {act:?}");
                let (x, w) = conv_t_inputs(c, i as u64 * 10 + 3);
                let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
                let bias = randn(&[c.cout], 8);
                let [(fused_map, fused_bn), (ref_map, ref_bn)] = testing::batch_norms(c.cout);
                let fused =
                    conv_transpose2d_bn_act(&xv, &wv, c.s, c.p, &bias, &fused_bn, act, 0.1, true)
                        .unwrap();
                let z = conv_transpose2d(&xv, &wv, c.s, c.p).unwrap();
                let reference =
                    channel_ops::batch_norm_act(&z, Some(&bias), &ref_bn, act, 0.1, true).unwrap();
                assert_close(&fused, &reference, &format!("{what} forward"));
                let r = randn(fused.dims(), 9);
                let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let (g_fused, g_ref) = (grads(&fused), grads(&reference));
                for (var, name) in [(&xv, "x"), (&wv, "w")] {
                    assert_close(
                        g_fused.get(var).unwrap(),
                        g_ref.get(var).unwrap(),
                        &format!("{what} d{name}"),
                    );
                }
                testing::assert_batch_norms_close(
                    (&fused_map, &fused_bn, &g_fused),
                    (&ref_map, &ref_bn, &g_ref),
                    1e-4,
                    &what,
                );
            }
        }
    }

    /// Central differences of `(op(x, w) * r).sum_all()` at a few entries of `x` and `w`.
    fn check_finite_differences(op: Op, x: &Tensor, w: &Tensor, c: &Case) {
        let r = randn(op(x, w, c).dims(), 7);
        let loss = |x: &Tensor, w: &Tensor| -> f32 {
            (op(x, w, c) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let g = (op(xv.as_tensor(), wv.as_tensor(), c) * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = g.backward().unwrap();
        let analytic = [
            to_vec(g.get(xv.as_tensor()).unwrap()),
            to_vec(g.get(wv.as_tensor()).unwrap()),
        ];
        let eps = 1e-2f32;
        for (which, t) in [x, w].into_iter().enumerate() {
            let base = to_vec(t);
            for idx in [0, base.len() / 3, base.len() / 2, base.len() - 1] {
                let shifted = |delta: f32| {
                    let mut v = base.clone();
                    v[idx] += delta;
                    Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
                };
                let (plus, minus) = (shifted(eps), shifted(-eps));
                let numeric = if which == 0 {
                    (loss(&plus, w) - loss(&minus, w)) / (2.0 * eps)
                } else {
                    (loss(x, &plus) - loss(x, &minus)) / (2.0 * eps)
                };
                let want = analytic[which][idx];
                assert!(
                    (numeric - want).abs() <= 1e-2 * want.abs().max(1.0),
                    "{c:?} input {which} index {idx}: numeric {numeric} vs analytic {want}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let c = case(2, 3, 4, 7, 6, 3, 2, 1);
        let (x, w) = conv_inputs(&c, 1);
        check_finite_differences(ours_conv, &x, &w, &c);
        let c = case(2, 3, 2, 4, 5, 4, 2, 1);
        let (x, w) = conv_t_inputs(&c, 2);
        check_finite_differences(ours_conv_t, &x, &w, &c);
    }

    /// A conv -> relu -> transposed conv network: `backward` must reach both weights, with the
    /// same gradients as the same network built from candle's ops.
    #[test]
    fn ops_compose_in_a_network() {
        let x = randn(&[2, 3, 8, 8], 1);
        let w1 = Var::from_tensor(&randn(&[5, 3, 4, 4], 2)).unwrap();
        let w2 = Var::from_tensor(&randn(&[5, 3, 4, 4], 3)).unwrap();
        let target = randn(&[2, 3, 8, 8], 4);
        let loss = |conv: &dyn Fn(&Tensor, &Tensor) -> Tensor,
                    conv_t: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let h = conv(&x, w1.as_tensor()).relu().unwrap();
            let y = conv_t(&h, w2.as_tensor());
            let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
            let g = loss.backward().unwrap();
            (
                g.get(w1.as_tensor()).cloned(),
                g.get(w2.as_tensor()).cloned(),
            )
        };
        let (g1, g2) = loss(&|x, w| conv2d(x, w, 2, 1).unwrap(), &|x, w| {
            conv_transpose2d(x, w, 2, 1).unwrap()
        });
        let (want1, want2) = loss(&|x, w| x.conv2d(w, 1, 2, 1, 1).unwrap(), &|x, w| {
            x.conv_transpose2d(w, 1, 0, 2, 1).unwrap()
        });
        let (g1, g2) = (g1.expect("grad reaches w1"), g2.expect("grad reaches w2"));
        assert!(to_vec(&g1).iter().any(|v| *v != 0.0) && to_vec(&g2).iter().any(|v| *v != 0.0));
        assert_close(&g1, &want1.unwrap(), "w1");
        assert_close(&g2, &want2.unwrap(), "w2");
    }

    #[test]
    fn non_contiguous_inputs_are_accepted() {
        let x = randn(&[3, 2, 6, 5], 1).transpose(2, 3).unwrap();
        let w = randn(&[4, 2, 3, 3], 2);
        let c = case(3, 2, 4, 5, 6, 3, 1, 1);
        assert_close(
            &ours_conv(&x, &w, &c),
            &candle_conv(&x, &w, &c),
            "transposed input",
        );
    }

    #[test]
    fn other_dtypes_fall_back_to_candle() {
        let c = case(2, 3, 4, 6, 5, 3, 2, 1);
        let (x, w) = conv_inputs(&c, 3);
        let (x, w) = (
            x.to_dtype(DType::F64).unwrap(),
            w.to_dtype(DType::F64).unwrap(),
        );
        let y = ours_conv(&x, &w, &c);
        assert_eq!(y.dtype(), DType::F64);
        assert_close(&y, &candle_conv(&x, &w, &c), "f64 conv2d");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = randn(&[1, 2, 3, 3], 1);
        assert!(
            conv2d(&x, &randn(&[4, 3, 3, 3], 2), 1, 0).is_err(),
            "channel mismatch"
        );
        assert!(
            conv2d(&x, &randn(&[4, 2, 5, 5], 2), 1, 0).is_err(),
            "kernel larger than input"
        );
        assert!(
            conv2d(&x, &randn(&[4, 2, 3, 2], 2), 1, 0).is_err(),
            "non-square kernel"
        );
        assert!(
            conv_transpose2d(&x, &randn(&[3, 4, 3, 3], 2), 1, 0).is_err(),
            "channel mismatch"
        );
    }

    /// Best wall time of `f` over a few runs, after one warm-up run: the minimum is the most
    /// stable statistic on a machine shared with other jobs.
    fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
        f();
        (0..reps)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Forward and forward+backward timings of the sagan layer shapes at batch 64, against
    /// candle's own ops. Run with
    /// `RAYON_NUM_THREADS=2 cargo test --release bench_against_candle -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_against_candle() {
        let layers: [(&str, bool, Case); 8] = [
            (
                "ConvT 128->256 k7 s1 p0, 1x1",
                true,
                case(64, 128, 256, 1, 1, 7, 1, 0),
            ),
            (
                "ConvT 256->128 k4 s2 p1, 7x7",
                true,
                case(64, 256, 128, 7, 7, 4, 2, 1),
            ),
            (
                "ConvT 128->1 k4 s2 p1, 14x14",
                true,
                case(64, 128, 1, 14, 14, 4, 2, 1),
            ),
            (
                "Conv 1->64 k4 s2 p1, 28x28",
                false,
                case(64, 1, 64, 28, 28, 4, 2, 1),
            ),
            (
                "Conv 64->128 k4 s2 p1, 14x14",
                false,
                case(64, 64, 128, 14, 14, 4, 2, 1),
            ),
            (
                "Conv 128->1 k7 s1 p0, 7x7",
                false,
                case(64, 128, 1, 7, 7, 7, 1, 0),
            ),
            (
                "ConvT 256->128 k4 s2 p1, 8x8",
                true,
                case(64, 256, 128, 8, 8, 4, 2, 1),
            ),
            (
                "Conv 128->256 k4 s2 p1, 16x16",
                false,
                case(64, 128, 256, 16, 16, 4, 2, 1),
            ),
        ];
        let reps = 5;
        println!(
            "threads: {}; times are the best of {reps} runs",
            rayon::current_num_threads()
        );
        println!(
            "f+b: forward, loss = (y * r).sum_all(), backward to x and w; 'loss' is that loss's"
        );
        println!("own backward on a plain Var of y's shape, excluded from the conv-only speedup");
        println!(
            "{:<30} {:>9} {:>9} {:>6} {:>10} {:>10} {:>8} {:>6} {:>9}",
            "layer", "fwd cndl", "fwd ours", "x", "f+b cndl", "f+b ours", "loss", "x", "x conv"
        );
        for (name, transposed, c) in layers {
            let (x, w) = if transposed {
                conv_t_inputs(&c, 1)
            } else {
                conv_inputs(&c, 1)
            };
            let (candle_op, ours_op): (Op, Op) = if transposed {
                (candle_conv_t, ours_conv_t)
            } else {
                (candle_conv, ours_conv)
            };
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let y = ours_op(&x, &w, &c);
            let r = randn(y.dims(), 2);
            let yv = Var::from_tensor(&y).unwrap();
            let fwd = |op: Op| time_ms(reps, || drop(op(&x, &w, &c)));
            let fwd_bwd = |op: Op| {
                time_ms(reps, || {
                    let y = op(xv.as_tensor(), wv.as_tensor(), &c);
                    drop((y * &r).unwrap().sum_all().unwrap().backward().unwrap());
                })
            };
            let loss = time_ms(reps, || {
                drop(
                    (yv.as_tensor() * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap(),
                );
            });
            let (fc, fo) = (fwd(candle_op), fwd(ours_op));
            let (bc, bo) = (fwd_bwd(candle_op), fwd_bwd(ours_op));
            let conv_only = if bo > loss {
                format!("{:.1}x", (bc - loss) / (bo - loss))
            } else {
                "n/a".to_string()
            };
            println!(
                "{name:<30} {fc:>7.1}ms {fo:>7.1}ms {:>5.1}x {bc:>8.1}ms {bo:>8.1}ms {loss:>6.1}ms {:>5.1}x {conv_only:>9}",
                fc / fo,
                bc / bo,
            );
        }
    }
}
