#!/usr/bin/env bash
# Checks that sagan builds with its `cuda` feature (candle's CUDA backend) on a machine with no
# GPU and no CUDA toolkit: installs the CUDA 13.4 compiler, headers and link libraries from PyPI
# into a cached venv, uses them as CUDA_HOME, and runs
# `cargo build --release --features cuda` in its own target folder.
#
# CUDA 13.4: the newest release that cudarc 0.19 (candle's CUDA bindings) supports and whose
# nvcc is on PyPI (the 12.x nvcc wheels carry ptxas only); CUDARC_CUDA_VERSION pins it so the
# build does not depend on which nvcc is found first. A driver for CUDA 13 is needed to run it.
# CUDA_COMPUTE_CAP=90 (Hopper, H100/H200) is the target when no GPU is there to ask; override it
# in the environment for other cards.
#
# The NVIDIA driver library (libcuda.so) is not on PyPI: the link step needs one, so the script
# builds a stub with the driver's function names (the driver's own libcuda.so.1 is loaded at run
# time on a GPU machine).
#
# Usage: tools/check-cuda-build.sh [--venv DIR] [--target-dir DIR]
#   --venv        where the PyPI packages go [default: .cuda-venv]
#   --target-dir  cargo's target folder for this build [default: target/cuda]
# Not part of CI: a cold build takes tens of minutes on two cores. Exits non-zero when the
# build fails; the binaries are then in TARGET_DIR/release.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.cuda-venv
target=target/cuda
while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) venv="$2"; shift ;;
        --target-dir) target="$2"; shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cuda=13.4
packages=(
    "nvidia-cuda-nvcc==13.4.*"
    # nvcc's front end and headers, pinned with it: a newer nvvm writes PTX its ptxas rejects.
    "nvidia-nvvm==13.4.*"
    "nvidia-cuda-crt==13.4.*"
    "nvidia-cuda-runtime==13.4.*"
    "nvidia-cuda-nvrtc==13.4.*"
    "nvidia-cuda-cccl>=13.0,<14"
    "nvidia-cublas==13.*"
    "nvidia-curand==10.*"
)
stamp="$venv/.installed-$cuda-2"
if [[ ! -e "$stamp" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "${packages[@]}"
    touch "$stamp"
fi
# From CUDA 13 the wheels share one toolkit-shaped folder: bin/nvcc, include/, lib/, nvvm/.
home="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
[[ -x "$home/bin/nvcc" ]] || { echo "error: no nvcc in $home (did pip install nvidia-cuda-nvcc fail?)" >&2; exit 1; }

# The unversioned names the linker looks for (the wheels ship only libfoo.so.N).
venv="$(cd "$venv" && pwd)"
links="$venv/link"
rm -rf "$links"
mkdir -p "$links"
for lib in "$home"/lib/lib*.so.*; do
    name="$(basename "$lib")"
    ln -sf "$lib" "$links/${name%%.so*}.so"
done

# The driver API stub: one empty function for each driver call that cudarc's bindings declare
# (some twice, for different CUDA versions),
# read from the cudarc source that cargo resolved, so the executable links.
cudarc="$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')"
sed -n 's/^pub unsafe fn \(cu[A-Za-z0-9_]*\)(.*/void \1(void) {}/p' "$(dirname "$cudarc")/src/driver/sys/mod.rs" | sort -u |
    cc -shared -fPIC -o "$links/libcuda.so" -Wl,-soname,libcuda.so.1 -x c -

export CUDA_HOME="$home" CUDA_PATH="$home" PATH="$home/bin:$PATH"
export LIBRARY_PATH="$links${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDARC_CUDA_VERSION=13040 CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# nvcc's host compiler: g++ (Debian: g++).
command -v g++ >/dev/null || { echo "error: nvcc needs g++ as its host compiler (Debian: g++)" >&2; exit 1; }
nvcc --version | tail -2

echo "cargo build --release --features cuda (CARGO_TARGET_DIR=$target, CUDA $cuda, sm_$CUDA_COMPUTE_CAP)"
CARGO_TARGET_DIR="$target" cargo build --release --features cuda
echo "ok: the binaries in $target/release are built with CUDA (sagan-train --device cuda)"
