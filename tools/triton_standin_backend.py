"""A stand-in for Triton's ONNX Runtime backend, for tools/triton-e2e.sh: a Python-based backend
(installed as BACKENDS/onnxruntime/model.py) that serves `platform: "onnxruntime_onnx"` models
with onnxruntime on the CPU. The Triton servers installable from PyPI (nvidia-pytriton's) carry
only the Python backend; with this one they load sagan-export's repositories unchanged, so the
server's config validation, dynamic batching, warm-up and HTTP protocol are the real ones. Not
covered: the real backend's own code (its reshape handling, TensorRT, GPU instances).
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        # The shape each input has in the graph, after the batch dimension (reshape applied).
        self.inputs = {
            i["name"]: [int(d) for d in (i["reshape"].get("shape", []) if "reshape" in i else i["dims"])]
            for i in config["input"]
        }
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        # The requests Triton's dynamic batcher gathered run as one batch, as the real backend's.
        sizes, feeds = [], {name: [] for name in self.inputs}
        for request in requests:
            for name, shape in self.inputs.items():
                t = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                feeds[name].append(t.reshape([t.shape[0]] + shape))
            sizes.append(len(feeds["z"][-1]))
        feed = {name: np.concatenate(parts) for name, parts in feeds.items()}
        results = self.session.run(self.outputs, feed)
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, r[start:start + n]) for name, r in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
