"""Runs the official ONNX checker (full_check: with shape inference) on each file given."""
import sys

import onnx

for path in sys.argv[1:]:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    print(f"{path}: ok (opset {model.opset_import[0].version}, ir {model.ir_version})")
