#!/usr/bin/env python3
"""Regenerates the small test fixtures under fixtures/ (all but fixtures/mnist/).

Deterministic: run it from the repository root with Python 3.11+ and Pillow
(`pip install pillow`); the pictures are drawn, not random.
"""

import gzip
import struct
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent / "fixtures"


def circle(size, mode, fg, bg):
    img = Image.new(mode, size, bg)
    w, h = size
    r = min(w, h) // 2 - 2
    cx, cy = w // 2, h // 2
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    return img


def square(size, mode, fg, bg):
    img = Image.new(mode, size, bg)
    w, h = size
    s = min(w, h) // 2 - 2
    cx, cy = w // 2, h // 2
    ImageDraw.Draw(img).rectangle((cx - s, cy - s, cx + s, cy + s), fill=fg)
    return img


def write_gzip(path, data):
    # mtime=0 and no file name in the header, so the bytes do not depend on when or where.
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as g:
        g.write(data)


def main():
    images = ROOT / "images-small"
    (images / "circles").mkdir(parents=True, exist_ok=True)
    (images / "squares").mkdir(parents=True, exist_ok=True)
    # Different sizes and aspect ratios; RGB, grayscale and RGBA; one upper-case .JPG.
    circle((40, 30), "RGB", (220, 40, 40), (250, 250, 250)).save(images / "circles" / "wide.png")
    circle((24, 24), "L", 255, 0).save(images / "circles" / "gray.png")
    circle((32, 48), "RGB", (40, 40, 200), (255, 255, 200)).save(images / "circles" / "tall.JPG", quality=90)
    square((36, 36), "RGB", (30, 160, 30), (0, 0, 0)).save(images / "squares" / "green.png")
    square((50, 20), "L", 200, 30).save(images / "squares" / "gray-wide.jpg", quality=90)
    square((20, 28), "RGBA", (250, 200, 0, 255), (0, 0, 0, 0)).save(images / "squares" / "alpha.png")
    square((30, 30), "RGB", (255, 255, 255), (90, 0, 90)).save(images / "squares" / "white.jpeg", quality=90)

    corrupt = ROOT / "corrupt"
    corrupt.mkdir(parents=True, exist_ok=True)
    (corrupt / "not-an-image.png").write_bytes(b"this is plain text, not a PNG\n")
    # An IDX header that claims 100 images of 28x28 followed by the pixels of only 5.
    header = struct.pack(">IIII", 0x00000803, 100, 28, 28)
    pixels = bytes((i * 7) % 256 for i in range(5 * 28 * 28))
    write_gzip(corrupt / "truncated-images-idx3-ubyte.gz", header + pixels)

    no_images = ROOT / "no-images"
    no_images.mkdir(parents=True, exist_ok=True)
    (no_images / "README.txt").write_text(
        "A directory without any .png/.jpg image: loading it as a dataset must fail.\n"
    )


if __name__ == "__main__":
    main()
