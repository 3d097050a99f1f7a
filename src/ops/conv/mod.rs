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
//! Only f32 CPU tensors under `Backend::Fused` take this path; `conv2d` and `conv_transpose2d` hand anything else to
//! candle's own ops.
//!
//! This file holds the public functions and their custom ops; `geometry` the shape of one
//! convolution, `gemm` the passes over batch chunks, `im2col` the patch matrices and their
//! adjoint, `winograd` the 4x4 / stride-2 layers' fast path.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};

use candle_nn::BatchNorm;

use super::channel::{self, BatchNormAct, Epilogue};
use super::cpu::storage::{f32_slice, with_f32_data};
use super::handoff;
use super::Activation;

mod gemm;
mod geometry;
mod im2col;
mod winograd;

use gemm::{
    conv_backward_data, conv_backward_filter, conv_epilogue_backward, conv_forward,
    conv_transpose_backward, Wanted,
};
use geometry::ConvGeom;

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
/// buffer of its own. The same result as `channel::bias_act(&conv2d(..), ..)`, which is
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
        return channel::bias_act(&y, Some(bias), act, leaky_slope);
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

/// `act(batch_norm(conv_transpose2d(x, w) + bias))` (see `channel::batch_norm_act`) with
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
        return channel::batch_norm_act(&z, Some(bias), bn, act, leaky_slope, train);
    };
    // The op has three operands: the norm's scale and shift travel as one.
    let (gamma, beta) = channel::scale_shift(bn, train, x.device())?;
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
    super::fused_on(x.device()) && x.dtype() == DType::F32 && w.dtype() == DType::F32
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
        // chunked pass below would add both. A Winograd layer's input gradient is a Winograd
        // transposed convolution, which shares nothing with the weight gradient's im2col.
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

#[cfg(test)]
mod tests;
