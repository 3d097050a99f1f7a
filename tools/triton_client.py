"""Asks a Triton Inference Server for images from a model exported by `sagan-export --triton`,
and writes them as one grid PNG, as `sagan-infer` does.

The latents are sagan-infer's, bit for bit: the same ChaCha8 stream (rand_chacha 0.9, seeded
through rand_core's PCG32 seed_from_u64, stream 3) and rand_distr 0.5's ziggurat normal sampler,
reimplemented below. So `--seed S` gives the images `sagan-infer --seed S` gives on the same
model (up to the server's arithmetic: another provider, or TensorRT FP16, moves pixels slightly).
The latent size, classes and value range come from the model's config (sagan's parameters).

Needs: pip install "tritonclient[http]" numpy

Examples:
  python tools/triton_client.py --model sagan64                    # 64 images, seed 0
  python tools/triton_client.py --url host:8000 --model digits --count 80 --columns 8 --seed 3
  python tools/triton_client.py --model digits --class 7 --count 16 --out samples/
"""
import argparse
import math
import os
import struct
import sys
import zlib

import numpy as np

# --------------------------------------------------------------------------------------------
# sagan-infer's latents

FIXED_Z_STREAM = 3  # sagan's rng::streams::FIXED_Z
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


def _pcg32_seed(state):
    """rand_core's SeedableRng::seed_from_u64: 32 seed bytes from PCG32 outputs."""
    words = []
    for _ in range(8):
        state = (state * 6364136223846793005 + 11634580027462260723) & MASK64
        xorshifted = (((state >> 18) ^ state) >> 27) & MASK32
        rot = state >> 59
        words.append(((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & MASK32)
    return words


def _rotl(v, c):
    return ((v << c) & MASK32) | (v >> (32 - c))


class ChaCha8:
    """The ChaCha8 keystream as rand_chacha's ChaCha8Rng reads it, 64 bits at a time."""

    def __init__(self, seed, stream):
        self.key = _pcg32_seed(seed)
        self.stream = stream
        self.counter = 0
        self.words = []

    def _block(self):
        c = self.counter
        state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *self.key,
                 c & MASK32, c >> 32, self.stream & MASK32, self.stream >> 32]
        x = list(state)
        for _ in range(4):  # 8 rounds: 4 double rounds
            for a, b, c_, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                                (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
                x[a] = (x[a] + x[b]) & MASK32; x[d] = _rotl(x[d] ^ x[a], 16)
                x[c_] = (x[c_] + x[d]) & MASK32; x[b] = _rotl(x[b] ^ x[c_], 12)
                x[a] = (x[a] + x[b]) & MASK32; x[d] = _rotl(x[d] ^ x[a], 8)
                x[c_] = (x[c_] + x[d]) & MASK32; x[b] = _rotl(x[b] ^ x[c_], 7)
        self.counter += 1
        return [(x[i] + state[i]) & MASK32 for i in range(16)]

    def next_u64(self):
        if not self.words:
            self.words = self._block()
        lo, hi = self.words[0], self.words[1]
        del self.words[:2]
        return lo | (hi << 32)


def _ziggurat_tables():
    """rand_distr's ZIG_NORM_X and ZIG_NORM_F, recomputed the way its generator script did and
    rounded through the 18 decimals the Rust source keeps."""
    r, v = 3.6541528853610088, 0.00492867323399
    f = lambda x: math.exp(-x * x / 2.0)
    x = [v / f(r), r] + [0.0] * 255
    for i in range(2, 256):
        x[i] = math.sqrt(-2.0 * math.log(v / x[i - 1] + f(x[i - 1])))
    fx = [f(t) for t in x]
    # The one entry whose recomputation differs (by one ulp) from rand_distr's table.
    fx[94] = 0.206405406398679298
    as_source = lambda t: float("%.18f" % t)
    return [as_source(t) for t in x], [as_source(t) for t in fx]


ZIG_X, ZIG_F = _ziggurat_tables()
ZIG_R = 3.654152885361008796


def _f64(bits):
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _open01(rng):
    return _f64((rng.next_u64() >> 12) | 0x3FF0000000000000) - (1.0 - 2.0**-53)


def standard_normal(rng):
    """rand_distr 0.5's StandardNormal for f64 (the f32 one casts it)."""
    while True:
        bits = rng.next_u64()
        i = bits & 0xFF
        u = _f64((bits >> 12) | 0x4000000000000000) - 3.0
        x = u * ZIG_X[i]
        if abs(x) < ZIG_X[i + 1]:
            return x
        if i == 0:
            tail_x, tail_y = 1.0, 0.0
            while -2.0 * tail_y < tail_x * tail_x:
                tail_x = math.log(_open01(rng)) / ZIG_R
                tail_y = math.log(_open01(rng))
            return tail_x - ZIG_R if u < 0.0 else ZIG_R - tail_x
        uniform = (rng.next_u64() >> 11) * 2.0**-53
        if ZIG_F[i + 1] + (ZIG_F[i] - ZIG_F[i + 1]) * uniform < math.exp(-x * x / 2.0):
            return x


def latents(seed, n, z_dim, truncation=None):
    """sagan-infer's latents for `seed`: float32 [n, z_dim]; with `truncation`, every value
    with |z| > truncation is redrawn from the same stream."""
    rng = ChaCha8(seed, FIXED_Z_STREAM)
    out = np.empty(n * z_dim, np.float32)
    for k in range(n * z_dim):
        while True:
            v = np.float32(standard_normal(rng))
            if truncation is None or abs(v) <= truncation:
                break
        out[k] = v
    return out.reshape(n, z_dim)


def grid_classes(n, columns, num_classes, classes):
    """sagan-infer's classes: row r gets classes[r % len] or, with none given, r % num_classes."""
    rows = [i // columns for i in range(n)]
    if classes:
        return np.array([classes[r % len(classes)] for r in rows], np.int64)
    return np.array([r % num_classes for r in rows], np.int64)


# --------------------------------------------------------------------------------------------
# sagan-infer's grid PNG

GAP, GAP_COLOR, GRID_MIN_SIDE = 2, (32, 32, 32), 64


def to_u8(images):
    """[-1, 1] to 0..255 as sagan does: in float32, rounded half away from zero; NaN black."""
    v = (np.clip(images.astype(np.float32), -1, 1) + np.float32(1)) * np.float32(127.5)
    v = np.floor(v.astype(np.float64) + 0.5)
    return np.nan_to_num(v, nan=0.0).astype(np.uint8)


def grid_image(images, columns):
    """NCHW float images in [-1, 1] to an RGB grid [H, W, 3] uint8, laid out as sagan's."""
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    scale = max(1, -(-GRID_MIN_SIDE // max(h, w)))
    tiles = to_u8(images).transpose(0, 2, 3, 1)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=3)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw = h * scale, w * scale
    rows = -(-n // columns)
    canvas = np.empty((rows * (th + GAP) + GAP, columns * (tw + GAP) + GAP, 3), np.uint8)
    canvas[:] = GAP_COLOR
    for i in range(n):
        y, x = GAP + (i // columns) * (th + GAP), GAP + (i % columns) * (tw + GAP)
        canvas[y:y + th, x:x + tw] = tiles[i]
    return canvas


def write_png(path, rgb):
    """An 8-bit RGB PNG, written to a temporary name and renamed into place."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The server


def model_info(client, model):
    """What the client needs from the model's config: sizes, classes, batch limit."""
    config = client.get_model_config(model)
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    if "sagan.z_dim" not in params:
        raise SystemExit(f"error: model '{model}' has no sagan.z_dim parameter: not a sagan-export --triton model")
    inputs = {i["name"] for i in config["input"]}
    return {
        "z_dim": int(params["sagan.z_dim"]),
        "num_classes": int(params.get("sagan.num_classes", "0")) if "class" in inputs else 0,
        "max_batch": int(config.get("max_batch_size", 0)),
    }


def request(client, model, z, classes):
    """Sends one request for the images of latents `z` (and `classes`); returns its handle."""
    import tritonclient.http as http

    inputs = [http.InferInput("z", list(z.shape), "FP32")]
    inputs[0].set_data_from_numpy(z, binary_data=True)
    if classes is not None:
        inputs.append(http.InferInput("class", [len(classes), 1], "INT64"))
        inputs[1].set_data_from_numpy(classes.reshape(-1, 1), binary_data=True)
    outputs = [http.InferRequestedOutput("image", binary_data=True)]
    return client.async_infer(model, inputs, outputs=outputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8000", help="the server's HTTP endpoint (host:port)")
    parser.add_argument("--model", required=True, help="the model's name in the repository")
    parser.add_argument("--count", type=int, default=64, help="number of images")
    parser.add_argument("--columns", type=int, help="images per grid row [default: sqrt(count), rounded up]")
    parser.add_argument("--seed", type=int, default=0, help="latent seed, as sagan-infer --seed")
    parser.add_argument("--truncation", type=float, help="redraw latent values with |z| > T, as sagan-infer")
    parser.add_argument("--class", dest="classes", type=lambda s: [int(k) for k in s.split(",")], default=[],
                        help="conditional models: K or K,K,... by grid row [default: row r gets class r]")
    parser.add_argument("--batch", type=int, help="images per request [default: the model's max batch]")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (the server batches concurrent ones)")
    parser.add_argument("--out", default="samples", help="output folder")
    args = parser.parse_args()
    if min(args.count, args.concurrency, args.columns or 1) < 1:
        sys.exit("error: --count, --columns and --concurrency must be at least 1")
    if args.truncation is not None and not args.truncation >= 1e-3:
        sys.exit("error: --truncation must be a positive number >= 0.001")

    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(args.url, concurrency=args.concurrency)
    try:
        info = model_info(client, args.model)
        columns = args.columns or math.ceil(math.sqrt(args.count))
        z = latents(args.seed, args.count, info["z_dim"], args.truncation)
        classes = None
        if info["num_classes"]:
            if any(k < 0 or k >= info["num_classes"] for k in args.classes):
                sys.exit(f"error: --class out of range: the model has {info['num_classes']} classes")
            classes = grid_classes(args.count, columns, info["num_classes"], args.classes)
        elif args.classes:
            sys.exit("error: the model is unconditional: --class does not apply")
        batch = args.batch or info["max_batch"] or args.count
        if not 1 <= batch <= max(info["max_batch"], 1):
            sys.exit(f"error: --batch must be 1 to {info['max_batch']} (the model's max batch)")
        pending, images = [], []
        for i in range(0, args.count, batch):
            if len(pending) == args.concurrency:
                images.append(pending.pop(0).get_result().as_numpy("image"))
            pending.append(request(client, args.model, z[i:i + batch],
                                   None if classes is None else classes[i:i + batch]))
        images = np.concatenate(images + [p.get_result().as_numpy("image") for p in pending])
    except (InferenceServerException, OSError) as e:
        sys.exit(f"error: {args.url}: {e}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"seed{args.seed}-grid.png")
    write_png(path, grid_image(images, columns))
    _, c, h, w = images.shape
    print(f"wrote {path} ({args.count} images of {h}x{w}, {min(columns, args.count)} per row) from {args.url}")


if __name__ == "__main__":
    main()
