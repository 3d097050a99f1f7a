#!/usr/bin/env bash
# Checks that sagan builds with its `cuda` feature (candle's CUDA backend) on a machine with no
# GPU and no CUDA toolkit: installs the CUDA 13.4 compiler, headers and link libraries from PyPI
# into a cached venv, uses them as CUDA_HOME, and runs
# `cargo build --release --features cuda` in its own target folder.
#
# CUDA 13.4: the newest release that cudarc 0.19 (candle's CUDA bindings) supports and whose
# nvcc is on PyPI (the 12.x nvcc wheels carry ptxas only); CUDARC_CUDA_VERSION pins it so the
# build does not depend on which nvcc is found first. A driver for CUDA 13 is needed to train on
# the GPU.
# CUDA_COMPUTE_CAP=90 (Hopper, H100/H200) is the target when no GPU is there to ask; override it
# in the environment for other cards.
#
# The binary must start, and train with --device cpu, on a machine without the NVIDIA driver or
# the CUDA libraries; --device cuda there is a one-line error. So no CUDA library may be linked:
# - candle makes cudarc link the driver and the CUDA libraries (its `dynamic-linking` feature),
#   which cannot be turned off from here. The script builds with a copy of cudarc whose build
#   script turns on its `dynamic-loading` code instead (libraries opened on first use), patched
#   in on cargo's command line: Cargo.toml and Cargo.lock stay as they are.
# - candle-kernels links the CUDA runtime (libcudart) for kernels sagan never calls; the linker
#   gets the static runtime under that name, and it opens the driver only when used.
# Then it checks the built sagan-train on this machine: --help starts, --device cuda fails in
# one line, and --device cpu trains.
#
# Usage: tools/check-cuda-build.sh [--venv DIR] [--target-dir DIR]
#   --venv        where the PyPI packages go [default: .cuda-venv]
#   --target-dir  cargo's target folder for this build [default: target/cuda]
# Not part of CI: a cold build takes tens of minutes on two cores. Exits non-zero when the
# build or a check fails; the binaries are in TARGET_DIR/release.
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

# The unversioned names the linker looks for (the wheels ship only libfoo.so.N); libcudart.so is
# a linker script that gives it the static runtime.
venv="$(cd "$venv" && pwd)"
links="$venv/link"
rm -rf "$links"
mkdir -p "$links"
for lib in "$home"/lib/lib*.so.*; do
    name="$(basename "$lib")"
    ln -sf "$lib" "$links/${name%%.so*}.so"
done
[[ -e "$home/lib/libcudart_static.a" ]] || { echo "error: no libcudart_static.a in $home/lib" >&2; exit 1; }
rm "$links/libcudart.so"
echo "INPUT($home/lib/libcudart_static.a)" >"$links/libcudart.so"

# cudarc, as cargo resolved it, copied once per version with its build script edited: where
# candle asks for `dynamic-linking` it turns on `dynamic-loading` (the cfg cudarc's own
# `fallback-dynamic-loading` sets) instead of emitting the link flags.
cudarc_src="$(dirname "$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')")"
cudarc="$venv/patched/$(basename "$cudarc_src")"
if [[ ! -e "$cudarc/.patched" ]]; then
    rm -rf "$cudarc" "$cudarc.tmp"
    mkdir -p "$venv/patched"
    cp -a "$cudarc_src" "$cudarc.tmp"
    python3 - "$cudarc.tmp/build.rs" <<'PY'
import sys
path = sys.argv[1]
old = '#[cfg(feature = "dynamic-linking")]\n    dynamic_linking(major, minor);\n'
new = '#[cfg(feature = "dynamic-linking")]\n    println!("cargo:rustc-cfg=feature=\\"dynamic-loading\\"");\n'
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"error: {path}: the dynamic_linking call to replace is not there (another cudarc?)")
open(path, "w").write(text.replace(old, new))
PY
    touch "$cudarc.tmp/.patched"
    mv "$cudarc.tmp" "$cudarc"
fi

export CUDA_HOME="$home" CUDA_PATH="$home" PATH="$home/bin:$PATH"
export LIBRARY_PATH="$links${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDARC_CUDA_VERSION=13040 CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# nvcc's host compiler: g++ (Debian: g++).
command -v g++ >/dev/null || { echo "error: nvcc needs g++ as its host compiler (Debian: g++)" >&2; exit 1; }
nvcc --version | tail -2

echo "cargo build --release --features cuda (CARGO_TARGET_DIR=$target, CUDA $cuda, sm_$CUDA_COMPUTE_CAP)"
# The patch rewrites Cargo.lock's cudarc entry: put the file back as it was.
lock="$(mktemp)"
cp Cargo.lock "$lock"
trap 'cp "$lock" Cargo.lock; rm -f "$lock"' EXIT
CARGO_TARGET_DIR="$target" cargo build --release --features cuda \
    --config "patch.crates-io.cudarc.path=\"$cudarc\""
cp "$lock" Cargo.lock
echo "ok: the binaries in $target/release are built with CUDA (sagan-train --device cuda)"

# The checks, on this machine as it is (no CUDA library on the library path).
bin="$target/release/sagan-train"
runs="$(mktemp -d)"
trap 'cp "$lock" Cargo.lock; rm -rf "$lock" "$runs"' EXIT
failed=0
fail() { echo "FAILED: $1" >&2; failed=1; }
needed="$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
if grep -Eq 'lib(cuda|cudart|cublas|cublasLt|curand|nvrtc)\.so' <<<"$needed"; then
    fail "sagan-train links a CUDA library: $needed"
else
    echo "ok: sagan-train links no CUDA library ($needed)"
fi
status=0
env -u LD_LIBRARY_PATH "$bin" --help >/dev/null || status=$?
[[ $status -eq 0 ]] && echo "ok: sagan-train --help starts" || fail "sagan-train --help: exit $status"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    # No driver here: --device cuda must be one line naming it (RUST_LOG=off: no log lines).
    status=0
    err="$(RUST_LOG=off env -u LD_LIBRARY_PATH "$bin" --device cuda --steps 1 --out "$runs/cuda" 2>&1 >/dev/null)" || status=$?
    if [[ $status -eq 1 && $(wc -l <<<"$err") -eq 1 && $err == *libcuda.so.1* ]]; then
        echo "ok: --device cuda without the driver: exit 1, $err"
    else
        fail "--device cuda without the driver: exit $status, stderr:"$'\n'"$err"
    fi
else
    echo "skipped: --device cuda without the driver (this machine has libcuda.so.1)"
fi
status=0
env -u LD_LIBRARY_PATH "$bin" --device cpu --steps 2 --batch-size 4 --threads 2 --log-every 1 \
    --checkpoint-every 2 --no-tensorboard --out "$runs/cpu" || status=$?
if [[ $status -eq 0 && -e "$runs/cpu/checkpoints/step-00000002/generator.safetensors" ]]; then
    echo "ok: --device cpu trains (2 steps, a checkpoint)"
else
    fail "--device cpu: exit $status, no checkpoint of step 2"
fi
exit "$failed"
