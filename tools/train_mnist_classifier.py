#!/usr/bin/env python3
"""Trains the small MNIST classifier that sagan-eval uses as its default feature network, with
numpy only, and exports it to ONNX.

    tools/fetch-mnist.sh data/mnist
    pip install numpy onnx==1.23.2            # onnxruntime==1.31.1 too, for the parity check
    python3 tools/train_mnist_classifier.py --data data/mnist [--out fixtures]

Network: an MLP 784-256-128-10 with ReLU, trained with Adam (minibatch 128, fixed seed) on the
60000 MNIST training digits; test accuracy is measured on the 10000 t10k digits.

Why an MLP: torch is not installable here, and a numpy MLP trains to ~98% in a few minutes on
two cores (10 epochs, ~30 s each), whereas a numpy CNN takes far longer for a point or so more.
FID needs features that separate digit shapes, not a record accuracy.

The ONNX file (opset 17, IR 8) takes `image` float32 [batch, 1, 28, 28] in [-1, 1] (sagan's
value range: pixel / 127.5 - 1) and returns `features` float32 [batch, 128] (the second hidden
layer, after ReLU: the Frechet distance is computed on these) and `logits` float32 [batch, 10]
(the Inception-style score uses their softmax). Written: OUT/NAME.onnx and OUT/NAME.md
(NAME: --name, default mnist-classifier; `--data data/fashion-mnist --name fashion-classifier` gives the Fashion-MNIST network the experiments use).
"""

import argparse
import gzip
import os
import struct
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20261121
HIDDEN = (256, 128)
CLASSES = 10
OPSET = 17
IR_VERSION = 8


def read_idx(data_dir, stem):
    """An IDX file of `data_dir`, gzip-compressed (`stem`.gz) or raw, as a uint8 array."""
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            with opener(path, "rb") as f:
                raw = f.read()
            break
    else:
        sys.exit(f"error: {data_dir} has no {stem}[.gz]; fetch MNIST with tools/fetch-mnist.sh {data_dir}")
    magic, count = struct.unpack(">II", raw[:8])
    dims = magic & 0xFF
    shape = (count,) + struct.unpack(">" + "I" * (dims - 1), raw[8 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        sys.exit(f"error: {path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def load(data_dir, split):
    images = read_idx(data_dir, f"{split}-images-idx3-ubyte")
    labels = read_idx(data_dir, f"{split}-labels-idx1-ubyte").astype(np.int64)
    # sagan's value range: 0 -> -1, 255 -> 1.
    x = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
    return x, labels


def init_params(rng):
    sizes = (28 * 28,) + HIDDEN + (CLASSES,)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        # He initialisation, for ReLU layers.
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        params += [w, np.zeros(fan_out, dtype=np.float32)]
    return params


def forward(params, x):
    """Returns (activations of each layer, logits); activations[-1] are the features."""
    w1, b1, w2, b2, w3, b3 = params
    h1 = np.maximum(x @ w1 + b1, 0.0)
    h2 = np.maximum(h1 @ w2 + b2, 0.0)
    return (x, h1, h2), h2 @ w3 + b3


def gradients(params, x, y):
    w1, _, w2, _, w3, _ = params
    (x, h1, h2), logits = forward(params, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    d3 = p
    d3[np.arange(len(y)), y] -= 1.0
    d3 /= len(y)
    d2 = (d3 @ w3.T) * (h2 > 0)
    d1 = (d2 @ w2.T) * (h1 > 0)
    grads = [x.T @ d1, d1.sum(0), h1.T @ d2, d2.sum(0), h2.T @ d3, d3.sum(0)]
    return loss, grads


def accuracy(params, x, y):
    correct = 0
    for start in range(0, len(x), 1000):
        _, logits = forward(params, x[start : start + 1000])
        correct += int((logits.argmax(axis=1) == y[start : start + 1000]).sum())
    return correct / len(x)


def train(x, y, epochs, batch, lr):
    rng = np.random.default_rng(SEED)
    params = init_params(rng)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    for epoch in range(epochs):
        # Cosine decay to 0 over the run: the last epochs settle instead of bouncing.
        order = rng.permutation(len(x))
        start_time = time.time()
        losses = []
        for start in range(0, len(x) - batch + 1, batch):
            idx = order[start : start + batch]
            loss, grads = gradients(params, x[idx], y[idx])
            losses.append(loss)
            step += 1
            progress = step / (epochs * (len(x) // batch))
            rate = lr * 0.5 * (1.0 + np.cos(np.pi * progress))
            for p, g, mi, vi in zip(params, grads, m, v):
                mi *= beta1
                mi += (1 - beta1) * g
                vi *= beta2
                vi += (1 - beta2) * g * g
                m_hat = mi / (1 - beta1**step)
                v_hat = vi / (1 - beta2**step)
                p -= (rate * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} "
            f"({time.time() - start_time:.1f} s)",
            flush=True,
        )
    return params


def export(params, test_accuracy, path):
    w1, b1, w2, b2, w3, b3 = params
    names = ["w1", "b1", "w2", "b2", "w3", "b3"]
    inits = [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names)]
    inits.append(numpy_helper.from_array(np.array([-1, 28 * 28], dtype=np.int64), "flat_shape"))
    nodes = [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h1_pre"]),
        helper.make_node("Add", ["h1_pre", "b1"], ["h1_bias"]),
        helper.make_node("Relu", ["h1_bias"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2_pre"]),
        helper.make_node("Add", ["h2_pre", "b2"], ["h2_bias"]),
        helper.make_node("Relu", ["h2_bias"], ["features"]),
        helper.make_node("MatMul", ["features", "w3"], ["logits_pre"]),
        helper.make_node("Add", ["logits_pre", "b3"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mnist_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", HIDDEN[-1]]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
        ],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="sagan tools/train_mnist_classifier.py",
    )
    model.ir_version = IR_VERSION
    for key, value in (
        ("sagan.feature_net", "mnist-mlp"),
        ("sagan.input_range", "-1,1"),
        ("sagan.test_accuracy", f"{test_accuracy:.4f}"),
    ):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def check_parity(params, path, x):
    """Runs the export with onnxruntime (when installed) and compares it with numpy."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: parity check skipped")
        return
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    features, logits = session.run(["features", "logits"], {"image": x.reshape(-1, 1, 28, 28)})
    (_, _, h2), expected = forward(params, x)
    diff = max(np.abs(features - h2).max(), np.abs(logits - expected).max())
    print(f"onnxruntime parity: max |diff| {diff:.2e}")
    if diff > 1e-3:
        sys.exit(f"error: onnxruntime disagrees with numpy by {diff}")


def write_card(path, name, data, train_count, test_accuracy, epochs, size):
    with open(path, "w") as f:
        f.write(f"""# {name}.onnx

The default feature network of `sagan-eval` for 1x28x28 data (MNIST-like digits): a numpy-trained
MLP 784-256-128-10 with ReLU.

- Input `image`: float32 [batch, 1, 28, 28] in [-1, 1] (sagan's range: pixel / 127.5 - 1).
- Output `features`: float32 [batch, 128], the second hidden layer after ReLU. The Frechet
  distance (FID) is computed on these.
- Output `logits`: float32 [batch, 10]. The Inception-style score uses their softmax.
- Metadata: `sagan.feature_net` = `mnist-mlp`, `sagan.input_range` = `-1,1`,
  `sagan.test_accuracy` = `{test_accuracy:.4f}`.
- ONNX opset {OPSET}, IR version {IR_VERSION}; {size} bytes.

Trained on the {train_count} training images of `{data}` ({epochs} epochs, Adam, batch 128, cosine learning
rate decay, seed {SEED}). Test accuracy on its t10k images: **{100 * test_accuracy:.2f}%**.

FID values computed with this network are only comparable with other values computed with the
same network: they are not the Inception-v3 FID that papers report.

## Regenerate

    tools/fetch-mnist.sh data/mnist
    python3 -m venv .venv && .venv/bin/pip install numpy onnx==1.23.2 onnxruntime==1.31.1
    .venv/bin/python tools/train_mnist_classifier.py --data data/mnist

The seed is fixed, but the result can differ in the last bits from machine to machine (BLAS
summation order), so a regenerated file is equivalent, not byte-identical.

## License

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, CC BY-SA 3.0; these weights
are derived from it.
""")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with the MNIST IDX files (tools/fetch-mnist.sh)")
    parser.add_argument("--out", default="fixtures", help="output folder (default: fixtures)")
    parser.add_argument("--name", default="mnist-classifier",
                        help="file names: OUT/NAME.onnx and OUT/NAME.md (default: mnist-classifier)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    x_train, y_train = load(args.data, "train")
    x_test, y_test = load(args.data, "t10k")
    print(f"{args.data}: {len(x_train)} training, {len(x_test)} test images")
    params = train(x_train, y_train, args.epochs, args.batch, args.lr)
    test_accuracy = accuracy(params, x_test, y_test)
    print(f"test accuracy: {100 * test_accuracy:.2f}%")

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, args.name + ".onnx")
    export(params, test_accuracy, onnx_path)
    check_parity(params, onnx_path, x_test[:256])
    size = os.path.getsize(onnx_path)
    write_card(os.path.join(args.out, args.name + ".md"), args.name, args.data, len(x_train), test_accuracy,
               args.epochs, size)
    print(f"wrote {onnx_path} ({size} bytes) and {args.name}.md")


if __name__ == "__main__":
    main()
