#!/usr/bin/env python3
"""Writes a copy of a generator checkpoint (safetensors) with every attention gamma set to VALUE.

Attention gammas start at 0 and are still ~1e-4 after a few training steps, so an export of
such a checkpoint computes almost nothing through its attention layers; with gamma = 0.8 a
parity check (tools/gpu-check.sh) compares the attention path too. Standard library only, so
that it runs on a machine with nothing but python3.

Usage: tools/set-attention-gamma.py SRC DST [VALUE]   (VALUE defaults to 0.8)
"""
import json
import os
import struct
import sys


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    value = float(sys.argv[3]) if len(sys.argv) == 4 else 0.8
    try:
        with open(src, "rb") as f:
            data = bytearray(f.read())
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
    except (OSError, ValueError, struct.error) as e:
        print(f"error: {src}: not a safetensors file ({e})", file=sys.stderr)
        return 1
    base = 8 + size
    changed = 0
    for name, tensor in header.items():
        if name == "__metadata__" or not name.endswith(".gamma"):
            continue
        if tensor.get("dtype") != "F32":
            print(f"error: {src}: {name} is {tensor.get('dtype')}, not F32", file=sys.stderr)
            return 1
        start, end = tensor["data_offsets"]
        count = (end - start) // 4
        data[base + start : base + end] = struct.pack(f"<{count}f", *([value] * count))
        changed += 1
    if os.path.exists(dst):
        print(f"error: {dst} exists; not overwriting it", file=sys.stderr)
        return 1
    tmp = f"{dst}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)
    print(f"{dst}: {changed} attention gamma(s) set to {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
