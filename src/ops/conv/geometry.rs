//! The shape of one convolution (`ConvGeom`), seen from the plain conv2d's side.

use super::{ConvTranspose2dOp, FilterGradOp};

/// Shape of one convolution, described from the plain conv2d's point of view: it maps an image
/// `[batch, img_c, img_h, img_w]` to an output `[batch, out_c, out_h, out_w]` with a kernel
/// `[out_c, img_c, k, k]`. A transposed convolution is the same geometry run backwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ConvGeom {
    pub(super) batch: usize,
    pub(super) img_c: usize,
    pub(super) img_h: usize,
    pub(super) img_w: usize,
    pub(super) out_c: usize,
    pub(super) out_h: usize,
    pub(super) out_w: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl ConvGeom {
    /// Geometry of `conv2d(x, w)` from the dims of `x [B, C, H, W]` and `w [O, C, k, k]`.
    pub(super) fn for_conv2d(
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
    pub(super) fn for_conv_transpose2d(
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
    pub(super) fn for_filter_grad(
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
    pub(super) fn conv_out_size(&self, k2: usize) -> candle_core::Result<(usize, usize)> {
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
    pub(super) fn is_dense(&self) -> bool {
        self.padding == 0 && self.k == self.img_h && self.k == self.img_w
    }

    /// Elements of one batch item's image.
    pub(super) fn img_item(&self) -> usize {
        self.img_c * self.img_h * self.img_w
    }

    /// Elements of one batch item's output.
    pub(super) fn out_item(&self) -> usize {
        self.out_c * self.out_plane()
    }

    pub(super) fn img_len(&self) -> usize {
        self.batch * self.img_item()
    }

    pub(super) fn out_len(&self) -> usize {
        self.batch * self.out_item()
    }

    pub(super) fn kernel_len(&self) -> usize {
        self.out_c * self.col_rows()
    }

    pub(super) fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Rows of the im2col matrix: one per (image channel, kernel row, kernel column).
    pub(super) fn col_rows(&self) -> usize {
        self.img_c * self.k * self.k
    }

    /// Columns of the im2col matrix: one per (batch item, output pixel).
    pub(super) fn col_cols(&self) -> usize {
        self.batch * self.out_plane()
    }
}

fn dims4(what: &str, dims: &[usize]) -> candle_core::Result<[usize; 4]> {
    <[usize; 4]>::try_from(dims)
        .map_err(|_| candle_core::Error::Msg(format!("{what}: expected 4 dims, got {dims:?}")))
}
