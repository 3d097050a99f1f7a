#!/usr/bin/env bash
# sagan against PyTorch on this CPU, side by side in one run (tools/bench.py; --help lists the
# options). Installs what it needs on first use: PyTorch, ONNX Runtime, NumPy and safetensors
# into a cached .bench-venv (~5.5 GB: PyPI's Linux torch wheel needs the CUDA libraries it
# links even on the CPU), ONNX Runtime's CPU library for sagan-infer, and the release binaries.
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.bench-venv
packages=(torch==2.15.0 onnxruntime==1.31.1 numpy==2.4.6 safetensors==0.8.0)
if ! "$venv/bin/python" -c "import torch, onnxruntime, numpy, safetensors" 2>/dev/null; then
    echo "installing ${packages[*]} into $venv (once)" >&2
    start=$SECONDS
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
    echo "installed in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1)" >&2
fi
tools/install-onnxruntime.sh cpu >/dev/null
cargo build --release
exec "$venv/bin/python" tools/bench.py "$@"
