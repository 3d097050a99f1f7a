#!/usr/bin/env bash
# Installs the ONNX Runtime shared library that sagan-infer loads at run time, from the official
# PyPI wheel (the library inside has no Python dependency), into the project-local
# .onnxruntime/<variant>/lib, where sagan-infer looks for it without any environment variable.
#
# Usage: tools/install-onnxruntime.sh [cpu|gpu]     (default: cpu)
#
#   cpu  onnxruntime==1.31.1      (~24 MB): CPU execution provider only
#   gpu  onnxruntime-gpu==1.31.1  (~244 MB): adds the CUDA and TensorRT providers; they need
#        CUDA 13 + cuDNN 9 (and TensorRT 10.x, libnvinfer.so.10, for --provider tensorrt)
#        installed on the machine. Without them registration fails and sagan-infer says so.
#
# Idempotent: a complete install is left alone. Needs python3 with pip (or pip3) and unzip or
# python3's zipfile module.
set -euo pipefail

version="1.31.1"
variant="${1:-cpu}"
case "$variant" in
    cpu) package="onnxruntime" ;;
    gpu) package="onnxruntime-gpu" ;;
    -h | --help)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "error: unknown variant '$variant' (expected cpu or gpu)" >&2
        exit 2
        ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.onnxruntime/$variant"
lib="$dest/lib/libonnxruntime.so.$version"
stamp="$dest/.installed-$package-$version"

print_result() {
    echo "ONNX Runtime $version ($variant) is in $dest/lib"
    echo "sagan-infer finds it there when run from $root; elsewhere:"
    echo "  export ORT_DYLIB_PATH=$lib"
}

if [[ -f "$stamp" && -s "$lib" ]]; then
    print_result
    exit 0
fi

if python3 -m pip --version >/dev/null 2>&1; then
    pip=(python3 -m pip)
elif command -v pip3 >/dev/null 2>&1; then
    pip=(pip3)
else
    echo "error: pip is not installed; it is needed to fetch $package==$version from PyPI" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The wheel's ABI tag must match some Python, not ours: the library inside is the same in every
# cp3xx wheel, so ask for one explicitly and do not depend on the local interpreter's version.
echo "fetching $package==$version from PyPI ..."
"${pip[@]}" download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
    --dest "$tmp" "$package==$version"
wheel="$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "error: pip downloaded no wheel for $package==$version" >&2
    exit 1
fi

mkdir -p "$tmp/unpacked"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$wheel" 'onnxruntime/capi/*.so*' -d "$tmp/unpacked"
else
    python3 -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("onnxruntime/capi/") and ".so" in n])' \
        "$wheel" "$tmp/unpacked"
fi

capi="$tmp/unpacked/onnxruntime/capi"
if [[ ! -s "$capi/libonnxruntime.so.$version" ]]; then
    echo "error: $(basename "$wheel") has no onnxruntime/capi/libonnxruntime.so.$version" >&2
    exit 1
fi

# Stage the whole lib folder next to the destination and swap it in with renames, so an
# interrupted run never leaves a half-copied library where sagan-infer would find it.
mkdir -p "$dest"
stage="$dest/.lib.tmp$$"
rm -rf "$stage"
mkdir -p "$stage"
# The runtime (and, for gpu, libonnxruntime_providers_{shared,cuda,tensorrt}.so, which ONNX
# Runtime loads from its own directory). The Python extension module is not needed.
for f in "$capi"/libonnxruntime*.so*; do
    cp "$f" "$stage/"
done
ln -sf "libonnxruntime.so.$version" "$stage/libonnxruntime.so"
ln -sf "libonnxruntime.so.$version" "$stage/libonnxruntime.so.1"
rm -rf "$dest/lib.old"
if [[ -d "$dest/lib" ]]; then
    mv "$dest/lib" "$dest/lib.old"
fi
mv "$stage" "$dest/lib"
rm -rf "$dest/lib.old"
rm -f "$dest"/.installed-*
touch "$stamp"

ls -l "$dest/lib"
print_result
