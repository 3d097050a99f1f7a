//! ConvTranspose as zero insertion plus Conv, for runtimes that lack ConvTranspose
//! (candle-onnx's evaluator among them).
//!
//! A transposed conv with stride s, padding p and kernel k equals: insert s-1 zeros between
//! input pixels, pad by k-1-p, and convolve (stride 1) with the kernel flipped spatially and
//! with its in/out axes swapped. Zeros are inserted with ops every runtime has: Unsqueeze,
//! Concat with x*0 (which keeps the batch dimension symbolic) and Reshape.

use super::graph::{attr_int, attr_ints, batched, float_tensor, Dim, GraphBuilder};
use crate::{Error, Result};
use candle_onnx::onnx::{AttributeProto, ModelProto, NodeProto, TensorProto};

fn unsupported(node: &NodeProto, why: &str) -> Error {
    Error::Config(format!(
        "cannot decompose ConvTranspose '{}': {why}",
        node.name
    ))
}

fn ints<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    node.attribute
        .iter()
        .find(|a: &&AttributeProto| a.name == name)
        .map(|a| a.ints.as_slice())
}

fn floats_of(tensor: &TensorProto) -> Vec<f32> {
    if tensor.raw_data.is_empty() {
        tensor.float_data.clone()
    } else {
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// W [in, out, k, k] -> W' [out, in, k, k] with W'[o, i, y, x] = W[i, o, k-1-y, k-1-x].
fn flipped_kernel(w: &[f32], c_in: usize, c_out: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for i in 0..c_in {
        for o in 0..c_out {
            for y in 0..k {
                for x in 0..k {
                    out[((o * c_in + i) * k + y) * k + x] =
                        w[((i * c_out + o) * k + (k - 1 - y)) * k + (k - 1 - x)];
                }
            }
        }
    }
    out
}

/// Interleaves s-1 zeros after every element along `axis` (2 = height, 3 = width) of the
/// [batch, c, h, w] value `x`, giving size n*s along that axis (trailing zeros included).
fn insert_zeros(b: &mut GraphBuilder, x: &str, shape: [usize; 3], axis: usize, s: usize) -> String {
    let [c, h, w] = shape;
    let mut expanded = vec![c, h, w];
    expanded.insert(axis, 1);
    let axes = b.int64_const("axes", &[axis as i64 + 1]);
    let column = b.node("Unsqueeze", &[x, &axes], vec![], batched(&expanded));
    let zero = b.float_const("zero", &[1], &[0.0]);
    let zeros = b.node("Mul", &[&column, &zero], vec![], batched(&expanded));
    let mut parts = vec![column.as_str()];
    parts.extend(std::iter::repeat_n(zeros.as_str(), s - 1));
    expanded[axis] = s;
    let stacked = b.node(
        "Concat",
        &parts,
        vec![attr_int("axis", axis as i64 + 1)],
        batched(&expanded),
    );
    let mut merged = [c, h, w];
    merged[axis - 1] *= s;
    let target = b.int64_const(
        "shape",
        &[-1, merged[0] as i64, merged[1] as i64, merged[2] as i64],
    );
    b.node("Reshape", &[&stacked, &target], vec![], batched(&merged))
}

/// Rewrites every ConvTranspose node of `model` in place. Needs the node's input shape in the
/// graph's value_info (sagan's exports record it) and its weight as an initializer.
pub fn decompose_conv_transpose(model: &mut ModelProto) -> Result<()> {
    let Some(mut graph) = model.graph.take() else {
        return Ok(());
    };
    if graph.node.iter().all(|n| n.op_type != "ConvTranspose") {
        model.graph = Some(graph);
        return Ok(());
    }
    let nodes = std::mem::take(&mut graph.node);
    let mut b = GraphBuilder::from_graph(graph, "decomposed_");
    for node in nodes {
        if node.op_type != "ConvTranspose" {
            b.push_node(node);
            continue;
        }
        let shape = b
            .shape(&node.input[0])
            .ok_or_else(|| unsupported(&node, "its input shape is not recorded"))?;
        let [Dim::Batch, Dim::Fixed(c_in), Dim::Fixed(h), Dim::Fixed(w)] = shape[..] else {
            return Err(unsupported(&node, "input is not [batch, C, H, W]"));
        };
        let weight = b
            .initializer_named(&node.input[1])
            .ok_or_else(|| unsupported(&node, "weight is not an initializer"))?;
        let (dims, kernel) = (weight.dims.clone(), floats_of(weight));
        let [wc_in, c_out, k, k2] = dims[..] else {
            return Err(unsupported(&node, "weight is not 4-D"));
        };
        let (c_out, k) = (c_out as usize, k as usize);
        if wc_in as usize != c_in || k2 as usize != k {
            return Err(unsupported(&node, "weight shape does not match its input"));
        }
        let stride = ints(&node, "strides").map_or(1, |s| s[0] as usize);
        let pads = ints(&node, "pads").unwrap_or(&[0, 0, 0, 0]).to_vec();
        let p = pads[0] as usize;
        if pads.iter().any(|&q| q as usize != p)
            || ints(&node, "strides").is_some_and(|s| s.iter().any(|&v| v as usize != stride))
        {
            return Err(unsupported(&node, "asymmetric strides or pads"));
        }
        if ints(&node, "output_padding").is_some_and(|o| o.iter().any(|&v| v != 0)) {
            return Err(unsupported(&node, "output_padding"));
        }
        // After zero insertion the input is h*s long, s-1 zeros past the (h-1)*s+1 a
        // transposed conv dilates to; the far padding is shortened by those s-1.
        let near = (k - 1)
            .checked_sub(p)
            .ok_or_else(|| unsupported(&node, "padding larger than kernel - 1"))?;
        let far = near
            .checked_sub(stride - 1)
            .ok_or_else(|| unsupported(&node, "stride too large for its padding"))?;
        let mut x = node.input[0].clone();
        if stride > 1 {
            x = insert_zeros(&mut b, &x, [c_in, h, w], 2, stride);
            x = insert_zeros(&mut b, &x, [c_in, h * stride, w], 3, stride);
        }
        let name = b.fresh("flipped_weight");
        let flipped = b.initializer(float_tensor(
            &name,
            &[c_out, c_in, k, k],
            &flipped_kernel(&kernel, c_in, c_out, k),
        ));
        let mut inputs = vec![x.as_str(), flipped.as_str()];
        if let Some(bias) = node.input.get(2) {
            inputs.push(bias);
        }
        let (oh, ow) = ((h - 1) * stride + k - 2 * p, (w - 1) * stride + k - 2 * p);
        let (near, far) = (near as i64, far as i64);
        let attrs = vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[1, 1]),
            attr_ints("pads", &[near, near, far, far]),
        ];
        b.node_named(
            "Conv",
            &inputs,
            attrs,
            &node.output[0],
            batched(&[c_out, oh, ow]),
        );
    }
    // The rewritten graph no longer reads the original kernels.
    let mut graph = b.into_graph();
    let used: std::collections::HashSet<String> =
        graph.node.iter().flat_map(|n| n.input.clone()).collect();
    graph.initializer.retain(|t| used.contains(&t.name));
    // node_named re-recorded the outputs' value_info; keep one entry per name.
    let mut seen = std::collections::HashSet::new();
    graph.value_info.retain(|v| seen.insert(v.name.clone()));
    model.graph = Some(graph);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use candle_onnx::onnx::tensor_proto::DataType;
    use std::collections::HashMap;

    /// One ConvTranspose node against candle's conv_transpose2d, for the shapes sagan uses.
    #[test]
    fn decomposition_matches_conv_transpose() {
        for (c_in, c_out, k, s, p, h, w) in [
            (3, 2, 4, 2, 1, 3, 5),
            (4, 3, 7, 1, 0, 1, 1),
            (2, 2, 4, 1, 0, 1, 1),
            (2, 3, 3, 2, 1, 2, 2),
            (1, 1, 4, 2, 1, 4, 4),
        ] {
            let mut rng = crate::rng::stream(1, 2);
            let x = crate::rng::normal_vec(&mut rng, 2 * c_in * h * w);
            let kernel = crate::rng::normal_vec(&mut rng, c_in * c_out * k * k);
            let bias = crate::rng::normal_vec(&mut rng, c_out);
            let (oh, ow) = ((h - 1) * s + k - 2 * p, (w - 1) * s + k - 2 * p);
            let mut b = GraphBuilder::default();
            b.input("x", DataType::Float, batched(&[c_in, h, w]));
            let wk = b.float_const("w", &[c_in, c_out, k, k], &kernel);
            let bk = b.float_const("b", &[c_out], &bias);
            let (s64, p64, k64) = (s as i64, p as i64, k as i64);
            let attrs = vec![
                attr_ints("kernel_shape", &[k64, k64]),
                attr_ints("strides", &[s64, s64]),
                attr_ints("pads", &[p64; 4]),
            ];
            b.node_named(
                "ConvTranspose",
                &["x", &wk, &bk],
                attrs,
                "y",
                batched(&[c_out, oh, ow]),
            );
            b.output("y", batched(&[c_out, oh, ow]));
            let mut model = b.into_model("t", vec![]);
            decompose_conv_transpose(&mut model).unwrap();
            let xt = Tensor::from_vec(x, (2, c_in, h, w), &Device::Cpu).unwrap();
            let out =
                candle_onnx::simple_eval(&model, HashMap::from([("x".to_string(), xt.clone())]))
                    .unwrap();
            let kt = Tensor::from_vec(kernel, (c_in, c_out, k, k), &Device::Cpu).unwrap();
            let bt = Tensor::from_vec(bias, (1, c_out, 1, 1), &Device::Cpu).unwrap();
            let want = xt
                .conv_transpose2d(&kt, p, 0, s, 1)
                .unwrap()
                .broadcast_add(&bt)
                .unwrap();
            let diff = (&out["y"] - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "k{k} s{s} p{p} {h}x{w}: {diff}");
        }
    }
}
