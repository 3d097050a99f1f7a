#!/usr/bin/env bash
# The test suite: installs what the tests call (in a cached .venv: the official ONNX checker,
# ONNX Runtime plus tritonclient's ModelConfig protobuf for the Triton repository checks, and
# TensorBoard's event reader; ONNX Runtime's CPU library in .onnxruntime/cpu), then runs cargo's
# tests. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import onnx, onnxruntime, tritonclient.grpc.model_config_pb2, tensorboard" 2>/dev/null; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # `python -m pip`, not .venv/bin/pip: a copied or moved .venv's pip script still names the
    # Python it was made with, and would install there.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check onnx==1.23.2 numpy \
        onnxruntime==1.31.1 "tritonclient[grpc]==2.73.0" tensorboard==2.21.0
fi
export SAGAN_PYTHON="$PWD/.venv/bin/python"
# sagan-infer's tests load the CPU ONNX Runtime from .onnxruntime/cpu.
tools/install-onnxruntime.sh cpu

cargo test --release "$@"
