#!/usr/bin/env bash
# The test suite: installs what the tests call (the official ONNX checker in a cached .venv,
# ONNX Runtime's CPU library in .onnxruntime/cpu), then runs cargo's tests. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import onnx" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check onnx==1.23.2 numpy
fi
export SAGAN_PYTHON="$PWD/.venv/bin/python"
# sagan-infer's tests load the CPU ONNX Runtime from .onnxruntime/cpu.
tools/install-onnxruntime.sh cpu

cargo test --release "$@"
