"""Checks Triton model directories written by `sagan-export --triton` without a server.

For each REPO/NAME given: config.pbtxt must parse as Triton's own ModelConfig message (the
protobuf shipped in tritonclient), and every version's model.onnx, as ONNX Runtime reads it, must
have exactly the inputs and outputs the config declares (names, data types, and the shapes after
the batch dimension, reshape applied), with a symbolic batch dimension. Each model is then run
with the shapes Triton would feed it: its warm-up batches, zeros per the config.

Usage: python tools/check_triton.py REPO/NAME [REPO/NAME ...]
"""
import os
import sys

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

ONNX_TYPES = {"tensor(float)": mc.TYPE_FP32, "tensor(int64)": mc.TYPE_INT64}
NUMPY_TYPES = {mc.TYPE_FP32: np.float32, mc.TYPE_INT64: np.int64}


class Mismatch(Exception):
    pass


def expect(ok, msg):
    if not ok:
        raise Mismatch(msg)


def model_shape(tensor):
    """The shape the model sees after the batch dimension: dims, or reshape when set."""
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


def check_tensors(kind, declared, actual):
    names = sorted(t.name for t in declared)
    expect(names == sorted(a.name for a in actual), f"{kind}s {names} vs ONNX {[a.name for a in actual]}")
    by_name = {a.name: a for a in actual}
    for t in declared:
        a = by_name[t.name]
        expect(len(t.dims) > 0, f"{kind} {t.name}: Triton needs at least one dimension")
        expect(
            ONNX_TYPES.get(a.type) == t.data_type,
            f"{kind} {t.name}: {mc.DataType.Name(t.data_type)} vs ONNX {a.type}",
        )
        expect(isinstance(a.shape[0], str), f"{kind} {t.name}: ONNX batch dimension {a.shape[0]!r} is not symbolic")
        expect(model_shape(t) == list(a.shape[1:]), f"{kind} {t.name}: {model_shape(t)} vs ONNX {a.shape[1:]}")
        if t.HasField("reshape"):
            expect(
                int(np.prod(t.dims)) == int(np.prod(t.reshape.shape)),
                f"{kind} {t.name}: dims {list(t.dims)} cannot reshape to {list(t.reshape.shape)}",
            )


def check_model_dir(model_dir):
    name = os.path.basename(os.path.normpath(model_dir))
    with open(os.path.join(model_dir, "config.pbtxt")) as f:
        config = text_format.Parse(f.read(), mc.ModelConfig())
    expect(config.name == name, f"name {config.name!r} vs directory {name!r}")
    expect(config.platform == "onnxruntime_onnx", f"platform {config.platform!r}")
    expect(config.max_batch_size > 0, f"max_batch_size {config.max_batch_size}")
    preferred = list(config.dynamic_batching.preferred_batch_size)
    expect(config.HasField("dynamic_batching") and preferred, "no dynamic batching")
    expect(all(0 < b <= config.max_batch_size for b in preferred), f"preferred sizes {preferred}")
    expect(len(config.instance_group) == 1 and config.instance_group[0].count >= 1, "instance_group")
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if accelerators:
        expect(config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU, "TensorRT on CPU instances")
        expect([a.name for a in accelerators] == ["tensorrt"], "accelerator")
        expect(accelerators[0].parameters["precision_mode"] in ("FP16", "FP32"), "precision_mode")
    params = {k: v.string_value for k, v in config.parameters.items()}
    inputs = {t.name: t for t in config.input}
    expect(params.get("sagan.z_dim") == str(model_shape(inputs["z"])[0]), f"sagan.z_dim {params.get('sagan.z_dim')} vs z {model_shape(inputs['z'])}")
    expect(("class" in inputs) == (params.get("sagan.num_classes", "0") != "0"), "class input vs sagan.num_classes")
    expect(len(config.model_warmup) >= 1, "no model_warmup")
    for warmup in config.model_warmup:
        expect(0 < warmup.batch_size <= config.max_batch_size, f"warm-up batch {warmup.batch_size}")
        expect(sorted(warmup.inputs) == sorted(inputs), f"warm-up inputs {sorted(warmup.inputs)}")
        for key, value in warmup.inputs.items():
            expect(list(value.dims) == list(inputs[key].dims), f"warm-up {key} dims {list(value.dims)}")
            expect(value.data_type == inputs[key].data_type and value.zero_data, f"warm-up {key}")

    versions = sorted(int(v) for v in os.listdir(model_dir) if v.isdigit() and not v.startswith("0"))
    expect(versions, "no version directory")
    for version in versions:
        path = os.path.join(model_dir, str(version), "model.onnx")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        check_tensors("input", config.input, session.get_inputs())
        check_tensors("output", config.output, session.get_outputs())
        meta = session.get_modelmeta().custom_metadata_map
        if version == versions[-1]:
            for key, value in params.items():
                expect(meta.get(key) == value, f"parameter {key}={value!r} vs model.onnx {meta.get(key)!r}")
        for warmup in config.model_warmup:
            n = warmup.batch_size
            feed = {
                t.name: np.zeros([n] + model_shape(t), NUMPY_TYPES[t.data_type])
                for t in config.input
            }
            outputs = dict(zip([o.name for o in config.output], session.run(None, feed)))
            for o in config.output:
                got = list(outputs[o.name].shape)
                expect(got == [n] + model_shape(o), f"{o.name} of warm-up batch {n}: shape {got}")
    return name, versions, config


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    failed = False
    for model_dir in sys.argv[1:]:
        try:
            name, versions, config = check_model_dir(model_dir)
            shapes = ", ".join(f"{t.name} {list(t.dims)}" for t in list(config.input) + list(config.output))
            print(f"{model_dir}: ok ({name}, versions {versions}, max batch {config.max_batch_size}; {shapes})")
        except (Mismatch, OSError, text_format.ParseError, KeyError) as e:
            print(f"{model_dir}: {type(e).__name__}: {e}", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
