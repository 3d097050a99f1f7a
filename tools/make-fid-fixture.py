#!/usr/bin/env python3
"""Writes the Frechet-distance fixture that sagan's eval tests compare against, so CI checks
the Rust FID against the reference computation without needing scipy.

    pip install numpy scipy onnx==1.23.2
    python3 tools/make-fid-fixture.py [OUT_DIR]      (default: fixtures/fid)

Two sets of correlated, non-Gaussian 16-d feature vectors (float32, fixed seed), and what the
usual FID code (pytorch-fid's calculate_frechet_distance: scipy.linalg.sqrtm of S1 S2) computes
for them in float64:

  features_a.json   {"dim": 16, "features": [...]}   300 vectors, row-major
  features_b.json   {"dim": 16, "features": [...]}   200 vectors, shifted and rescaled
  expected.json     {"fid": ..., "mean_a": [...], "cov_a_trace": ...}

and a feature network whose output is not called `features`, for sagan-eval's
--features-output tests:

  embedding-net.onnx  image float32 [batch, 1, 28, 28] -> `embedding` float32 [batch, 8]
                      (a fixed random projection; no logits, no metadata)
  embedding-net-batch4-range01.onnx
                      the same projection with a fixed batch of 4 and `sagan.input_range`
                      = "0,1": checks batch padding and the input range mapping
"""

import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from scipy import linalg

DIM = 16
SEED = 20261121


def features(rng, n, shift, scale):
    mixing = rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
    # ReLU like a network's features: skewed and with many zeros, not Gaussian.
    x = np.maximum(rng.standard_normal((n, DIM)) @ mixing * scale + shift, 0.0)
    return x.astype(np.float32)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's formula, as used to report FID in papers."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def embedding_net(weights, path, batch="batch", input_range=None):
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
        ],
        "embedding_net",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, 28, 28])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 8])],
        [
            numpy_helper.from_array(np.array([-1, 28 * 28], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(weights, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if input_range:
        onnx.helper.set_model_props(model, {"sagan.input_range": input_range})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("fixtures", "fid")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    a = features(rng, 300, 0.2, 1.0)
    b = features(rng, 200, 0.5, 1.4)
    stats = []
    for x in (a, b):
        x64 = x.astype(np.float64)
        stats.append((x64.mean(axis=0), np.cov(x64, rowvar=False)))
    fid = frechet_distance(*stats[0], *stats[1])
    for name, x in (("features_a.json", a), ("features_b.json", b)):
        with open(os.path.join(out, name), "w") as f:
            json.dump({"dim": DIM, "features": [float(v) for v in x.ravel()]}, f)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(
            {
                "fid": fid,
                "mean_a": [float(v) for v in stats[0][0]],
                "cov_a_trace": float(np.trace(stats[0][1])),
            },
            f,
            indent=1,
        )
    weights = (rng.standard_normal((28 * 28, 8)) / 28).astype(np.float32)
    embedding_net(weights, os.path.join(out, "embedding-net.onnx"))
    embedding_net(weights, os.path.join(out, "embedding-net-batch4-range01.onnx"), 4, "0,1")
    print(f"FID {fid:.10f}; wrote {out}/features_a.json, features_b.json, expected.json, embedding-net*.onnx")


if __name__ == "__main__":
    main()
