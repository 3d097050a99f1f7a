#!/usr/bin/env bash
# The test suite: installs the Python side the tests call (the official ONNX checker) into a
# cached .venv, then runs cargo's tests. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import onnx" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check onnx==1.23.2 numpy
fi
export SAGAN_PYTHON="$PWD/.venv/bin/python"

cargo test --release "$@"
