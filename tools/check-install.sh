#!/usr/bin/env bash
# The README's `cargo install --path .` must put the four commands in place, each answering
# --version with its own name. Run after the tests: with their target directory and lock file
# the install reuses their release build instead of compiling everything again.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
start=$SECONDS
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
    cargo install --quiet --path . --locked --offline --root "$root"
expected="sagan-eval sagan-export sagan-infer sagan-train"
installed=$(ls "$root/bin" | tr '\n' ' ' | sed 's/ $//')
if [ "$installed" != "$expected" ]; then
    echo "cargo install put [$installed] in $root/bin, expected [$expected]" >&2
    exit 1
fi
for bin in $expected; do
    version=$("$root/bin/$bin" --version)
    if [[ "$version" != "$bin "[0-9]* ]]; then
        echo "$bin --version printed '$version'" >&2
        exit 1
    fi
done
echo "cargo install --path .: $expected, each runs --version ($((SECONDS - start)) s)"
