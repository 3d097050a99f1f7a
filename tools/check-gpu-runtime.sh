#!/usr/bin/env bash
# Checks a GPU install of tools/install-onnxruntime.sh gpu on any machine, GPU or not:
#
#  1. every shared library that the libraries of the install link (DT_NEEDED, readelf) resolves
#     inside the install, or to the base system (glibc, libstdc++, libgcc, zlib), or is the
#     NVIDIA driver's libcuda.so.1, which only a driver install provides; the CUDA and TensorRT
#     provider libraries are listed with every library they pull in;
#  2. sagan-infer --provider cuda and --provider tensorrt get past every library: on a machine
#     without a GPU they must fail with "no CUDA-capable device", not with a missing library
#     (with a GPU they must run).
#
# Usage: tools/check-gpu-runtime.sh [INSTALL] [--bin DIR]
#   INSTALL  the install folder [default: .onnxruntime/gpu]
#   --bin    the folder of sagan-infer [default: target/release]
# Not part of CI: the install is gigabytes. Exits non-zero when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."

install=.onnxruntime/gpu
bin=target/release
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin="$2"; shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) install="$1" ;;
    esac
    shift
done
for tool in readelf ldconfig; do
    command -v "$tool" >/dev/null || { echo "error: $tool is needed (Debian: binutils, libc-bin)" >&2; exit 2; }
done
[[ -s "$install/lib/libonnxruntime.so" ]] || { echo "error: $install has no lib/libonnxruntime.so: run tools/install-onnxruntime.sh gpu" >&2; exit 2; }
install="$(cd "$install" && pwd)"

# The base system's libraries that the NVIDIA and ONNX Runtime libraries may link.
base="libc.so.6 libm.so.6 libdl.so.2 librt.so.1 libpthread.so.0 ld-linux-x86-64.so.2 libstdc++.so.6 libgcc_s.so.1 libz.so.1"
driver=libcuda.so.1

declare -A by_soname # soname -> file in the install
while IFS= read -r f; do
    soname="$(readelf -d "$f" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
    by_soname["${soname:-$(basename "$f")}"]="$f"
    by_soname["$(basename "$f")"]="$f"
done < <(find "$install" -type f -name '*.so*' | sort)

ldcache="$(ldconfig -p)"
needed() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }

# Where one needed library comes from: "install", "system", "driver" or "MISSING".
resolve() {
    if [[ -n "${by_soname[$1]:-}" ]]; then
        echo install
    elif [[ "$1" == "$driver" ]]; then
        echo driver
    elif [[ " $base " == *" $1 "* && "$ldcache" == *$'\t'"$1 "* ]]; then
        echo system
    else
        echo MISSING
    fi
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failed=0
echo "== 1. what the libraries of $install link"
missing=0
files=0
while IFS= read -r f; do
    files=$((files + 1))
    for n in $(needed "$f"); do
        if [[ "$(resolve "$n")" == MISSING ]]; then
            echo "MISSING: ${f#"$install"/} needs $n"
            missing=$((missing + 1))
        fi
    done
done < <(find "$install" -type f -name '*.so*' | sort)
echo "$files libraries; $missing links that resolve neither inside the install nor to the base system nor the driver"
[[ $missing == 0 ]] || failed=1

# Every library a provider pulls in, each once, with where it comes from.
closure() {
    local -A seen=()
    local queue=("$1") lib
    while [[ ${#queue[@]} -gt 0 ]]; do
        lib="${queue[0]}"
        queue=("${queue[@]:1}")
        for n in $(needed "$lib"); do
            [[ -n "${seen[$n]:-}" ]] && continue
            seen[$n]=1
            local from
            from="$(resolve "$n")"
            case "$from" in
                install)
                    echo "  $n  install: ${by_soname[$n]#"$install"/}"
                    queue+=("${by_soname[$n]}")
                    ;;
                system) echo "  $n  base system" ;;
                driver) echo "  $n  NVIDIA driver (not part of the install)" ;;
                *) echo "  $n  MISSING" ;;
            esac
        done
    done
}
for provider in cuda tensorrt; do
    lib="$install/lib/libonnxruntime_providers_$provider.so"
    echo
    echo "-- libonnxruntime_providers_$provider.so links:"
    closure "$lib" >"$tmp/closure"
    grep -v " base system$" "$tmp/closure" | sort -k2,2 -k1,1
    echo "  base system: $(grep " base system$" "$tmp/closure" | awk '{print $1}' | sort | tr '\n' ' ')"
done

echo
echo "== 2. sagan-infer --provider cuda / tensorrt with this install"
infer="$bin/sagan-infer"
[[ -x "$infer" ]] || { echo "error: $infer not found: cargo build --release" >&2; exit 2; }
gpu=0
nvidia-smi -L >/dev/null 2>&1 && gpu=1
for provider in cuda tensorrt; do
    out="$(ORT_DYLIB_PATH="$install/lib/libonnxruntime.so" "$infer" --model fixtures/onnx/tiny-generator.onnx \
        --provider "$provider" --count 1 --out "$tmp/$provider" 2>&1)"
    rc=$?
    echo "\$ sagan-infer --provider $provider  (exit $rc)"
    echo "$out" | sed 's/^/  /'
    if [[ $gpu == 1 ]]; then
        [[ $rc == 0 ]] || { echo "FAIL: a GPU is present and --provider $provider did not run"; failed=1; }
    elif [[ $rc == 0 || "$out" != *"no CUDA-capable device"* ]]; then
        echo "FAIL: expected the no-device error for --provider $provider"
        failed=1
    fi
done

echo
if [[ $failed == 0 ]]; then
    echo "OK: the install is complete; only the driver (and a GPU) are missing here"
else
    echo "FAILED"
fi
exit $failed
