use super::gemm::chunk_items;
use super::im2col::{col2im_k4_s2_p1, col2im_scatter, im2col_gather, im2col_k4_s2_p1};
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
    let conv_t =
        ConvGeom::for_conv_transpose2d(&[c.b, c.cin, c.h, c.w], &[c.cin, c.cout, c.k, c.k], &op);
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
        let separate = channel::bias_act(&y, Some(&b), act, slope).unwrap();
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
                    let fused =
                        conv2d_bias_act(&x_in, &w_in, &bv, c.s, c.p, Activation::LeakyRelu, slope)
                            .unwrap();
                    let y = conv2d(&xv, &wv, c.s, c.p).unwrap();
                    let reference =
                        channel::bias_act(&y, Some(&bv), Activation::LeakyRelu, slope).unwrap();
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
    let dense = |x: &[usize], w: &[usize], p| ConvGeom::for_conv2d(x, w, 1, p).unwrap().is_dense();
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
    for (batch, img_c, out_h, out_w) in [(1, 1, 1, 1), (2, 3, 7, 7), (3, 2, 4, 5), (1, 2, 16, 3)] {
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
    for (batch, img_c, out_h, out_w) in [(1, 1, 1, 1), (2, 3, 7, 7), (3, 2, 4, 5), (1, 2, 16, 3)] {
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
                channel::batch_norm_act(&z, Some(&bias), &ref_bn, act, 0.1, true).unwrap();
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
    println!("f+b: forward, loss = (y * r).sum_all(), backward to x and w; 'loss' is that loss's");
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
