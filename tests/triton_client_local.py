"""Runs tools/triton_client.py's pipeline with ONNX Runtime in place of the server: its latents,
classes and grid, the model run locally. Lets the tests compare the client with sagan-infer
without a Triton server.

Usage: python tests/triton_client_local.py MODEL.onnx SEED COUNT COLUMNS OUT.png
       python tests/triton_client_local.py --latents SEED N Z_DIM [TRUNCATION]
           (prints the latents' float32 bit patterns, one hex word per value)
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import triton_client  # noqa: E402

if sys.argv[1] == "--latents":
    seed, n, z_dim = (int(a) for a in sys.argv[2:5])
    truncation = float(sys.argv[5]) if len(sys.argv) > 5 else None
    z = triton_client.latents(seed, n, z_dim, truncation)
    print(" ".join(f"{b:08x}" for b in z.view(np.uint32).ravel()))
    sys.exit(0)

import onnxruntime as ort  # noqa: E402

model, seed, count, columns, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
z = triton_client.latents(seed, count, int(meta["sagan.z_dim"]))
feed = {"z": z}
if int(meta["sagan.num_classes"]):
    feed["class"] = triton_client.grid_classes(count, columns, int(meta["sagan.num_classes"]), [])
images = session.run(["image"], feed)[0]
triton_client.write_png(out, triton_client.grid_image(images, columns))
