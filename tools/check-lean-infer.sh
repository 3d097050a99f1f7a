#!/usr/bin/env bash
# sagan-infer must not carry candle: build it without the training half and look for candle's
# symbols in the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --no-default-features --features infer --bin sagan-infer
bin=target/release/sagan-infer
if nm -C "$bin" | grep -qi candle; then
    echo "sagan-infer links candle code:" >&2
    nm -C "$bin" | grep -i candle | head >&2
    exit 1
fi
echo "sagan-infer (lean build): $(stat -c %s "$bin") bytes, no candle symbols"
# Leave the default build's binaries in place for whoever runs next.
cargo build --release --bin sagan-infer
