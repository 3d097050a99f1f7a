#!/usr/bin/env python3
"""Writes the tiny ONNX models that sagan-infer's tests run, into fixtures/onnx/.

    pip install onnx==1.23.2 numpy           # onnxruntime==1.31.1 too, for the parity file
    python3 tools/make-onnx-fixture.py [OUT_DIR]

The models follow the contract of sagan-export (input `z` float32 [batch, z_dim], output `image`
float32 [batch, C, H, W] in [-1, 1], optional `attention_<i>` [batch, N, N], sagan.* metadata),
opset 17, IR version 8, but are tiny: z [batch, 8] -> MatMul + Add -> Reshape [batch, 1, 4, 4]
-> Tanh. Weights come from a fixed numpy seed, so rerunning gives the same bytes.

  tiny-generator.onnx            a sagan export
  tiny-generator-attention.onnx  the same plus attention_0 [batch, 4, 4] (a 2x2 map)
  plain-generator.onnx           no metadata, z and image dimensions symbolic: needs --z-dim 8
  fixed-batch-generator.onnx     tiny-generator with a static batch of 4 (runs are padded)
  not-a-generator.onnx           valid ONNX whose output is [batch, 16], not an image
  not-onnx.onnx                  garbage bytes
  tiny-generator.parity.json     a fixed z and what onnxruntime (Python) computes for it, so the
                                 Rust tests check parity with the reference runtime
"""

import json
import math
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Z_DIM = 8
SIDE = 4
OPSET = 17
IR_VERSION = 8


def weights():
    rng = np.random.default_rng(20261121)
    w = (rng.standard_normal((Z_DIM, SIDE * SIDE)) / math.sqrt(Z_DIM)).astype(np.float32)
    b = (0.1 * rng.standard_normal(SIDE * SIDE)).astype(np.float32)
    wa = (rng.standard_normal((Z_DIM, 16)) / math.sqrt(Z_DIM)).astype(np.float32)
    return w, b, wa


def build(*, metadata, attention, symbolic_z=False, image_output=True, batch="batch"):
    w, b, wa = weights()
    z_shape = [batch, "z_dim" if symbolic_z else Z_DIM]
    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, z_shape)]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    nodes = [
        helper.make_node("MatMul", ["z", "W"], ["zw"]),
        helper.make_node("Add", ["zw", "b"], ["pre"]),
    ]
    if image_output:
        shape = np.array([-1, 1, SIDE, SIDE], dtype=np.int64)
        inits.append(numpy_helper.from_array(shape, "image_shape"))
        nodes += [
            helper.make_node("Reshape", ["pre", "image_shape"], ["pre4"]),
            helper.make_node("Tanh", ["pre4"], ["image"]),
        ]
        outputs = [
            # The plain model declares nothing static: sagan-infer must find C, H, W by a run.
            helper.make_tensor_value_info(
                "image",
                TensorProto.FLOAT,
                [batch, "c", "h", "w"] if symbolic_z else [batch, 1, SIDE, SIDE],
            )
        ]
    else:
        nodes.append(helper.make_node("Tanh", ["pre"], ["features"]))
        outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])]
    if attention:
        # A 2x2 feature map: N = 4 positions, rows are softmaxes over the keys.
        inits += [
            numpy_helper.from_array(wa, "Wa"),
            numpy_helper.from_array(np.array([-1, 4, 4], dtype=np.int64), "attn_shape"),
        ]
        nodes += [
            helper.make_node("MatMul", ["z", "Wa"], ["logits"]),
            helper.make_node("Reshape", ["logits", "attn_shape"], ["logits3"]),
            helper.make_node("Softmax", ["logits3"], ["attention_0"], axis=-1),
        ]
        outputs.append(
            helper.make_tensor_value_info("attention_0", TensorProto.FLOAT, ["batch", 4, 4])
        )
    graph = helper.make_graph(nodes, "tiny_generator", inputs, outputs, inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="sagan",
        producer_version="0.1.0",
    )
    model.ir_version = IR_VERSION
    if metadata:
        config = {"preset": "tiny-fixture", "z_dim": Z_DIM, "channels": 1, "image_size": SIDE}
        props = {
            "sagan.preset": "tiny-fixture",
            "sagan.model": json.dumps(config, sort_keys=True),
            "sagan.step": "0",
            "sagan.z_dim": str(Z_DIM),
            "sagan.channels": "1",
            "sagan.image_size": str(SIDE),
            "sagan.value_range": "-1,1",
            "sagan.attention_outputs": "1" if attention else "0",
            "producer": "sagan 0.1.0",
        }
        helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def parity(path):
    """A fixed z (no RNG needed on either side) and onnxruntime's output for it."""
    import onnxruntime as ort

    n = 3
    z = np.array([math.sin(0.37 * i + 0.1) * 1.7 for i in range(n * Z_DIM)], dtype=np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (image,) = sess.run(["image"], {"z": z.reshape(n, Z_DIM)})
    return {
        "onnxruntime": ort.__version__,
        "n": n,
        "z": [float(v) for v in z],
        "image_shape": list(image.shape),
        "image": [float(v) for v in image.reshape(-1)],
    }


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("fixtures", "onnx")
    os.makedirs(out, exist_ok=True)
    models = {
        "tiny-generator.onnx": build(metadata=True, attention=False),
        "tiny-generator-attention.onnx": build(metadata=True, attention=True),
        "plain-generator.onnx": build(metadata=False, attention=False, symbolic_z=True),
        "fixed-batch-generator.onnx": build(metadata=True, attention=False, batch=4),
        "not-a-generator.onnx": build(metadata=False, attention=False, image_output=False),
    }
    for name, model in models.items():
        onnx.save(model, os.path.join(out, name))
        print(f"wrote {os.path.join(out, name)}")
    with open(os.path.join(out, "not-onnx.onnx"), "wb") as f:
        f.write(b"this is not an ONNX model \x00\xff\x13\x37 just bytes\n" * 4)
    print(f"wrote {os.path.join(out, 'not-onnx.onnx')}")
    try:
        data = parity(os.path.join(out, "tiny-generator.onnx"))
    except ImportError:
        print("onnxruntime is not installed: parity file not rewritten", file=sys.stderr)
        return
    path = os.path.join(out, "tiny-generator.parity.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
