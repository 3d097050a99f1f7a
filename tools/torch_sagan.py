"""sagan's networks and training step in PyTorch: the cross-framework parity check and the peer
of tools/bench.py.

G and D are built from the preset stored in a sagan checkpoint's metadata and load its
safetensors tensors strictly (every tensor used, every weight given, shapes checked). The layers
mean what sagan's do: spectral norm with rows = output units (also for transposed convs), one
power iteration per training forward, stored u and v as they are in evaluation; self-attention
with gamma * o + x; batch norm (momentum 0.1, eps 1e-5); LeakyReLU with the preset's slope. A
training step is sagan-train's: a D step on real and fake in one batch, hinge loss, a G step
through D in evaluation mode (D's weight gradients computed and discarded), two time-scale Adam,
and the EMA of G.

Each command prints one JSON line:
  torch_sagan.py generate --generator G.safetensors --z z.npy --out images.npy
  torch_sagan.py --threads 2 train --checkpoint STEP_DIR --batch-size 64 --warmup 1 --steps 5 [--device cuda]
  torch_sagan.py --threads 2 infer --generator G.safetensors --batch 64 --warmup 3 --runs 20
  torch_sagan.py --threads 2 fit --preset models/sagan-mnist28.toml --data data/mnist --out DIR
generate evaluates the network as trained (W / sigma from the stored u and v, batch norm with
its running statistics); infer first folds spectral norm into the weights, as a PyTorch model is
served. fit trains from fresh weights (the reference of tools/experiment-reference.sh), with
sagan's step or, with --plain, a plain PyTorch SAGAN's.
"""
import argparse
import gzip
import json
import math
import os
import struct
import time
import tomllib

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMAT = "sagan-checkpoint-v1"
EPS = 1e-12  # sagan's power-iteration normalisation: x / (|x| + EPS)


def normalize(x):
    return x / (x.norm() + EPS)


class SNConv(nn.Module):
    """A spectrally normalised conv (weight [out, in, k, k]) or transposed conv ([in, out, k, k])."""

    def __init__(self, in_channels, out, kernel, stride=1, padding=0, transpose=False):
        super().__init__()
        shape = (in_channels, out, kernel, kernel) if transpose else (out, in_channels, kernel, kernel)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out))
        self.register_buffer("weight_u", torch.empty(out))
        self.register_buffer("weight_v", torch.empty(in_channels * kernel * kernel))
        self.stride, self.padding, self.transpose = stride, padding, transpose
        self.folded = False

    def normalized_weight(self, train):
        if self.folded:
            return self.weight
        w = self.weight.transpose(0, 1) if self.transpose else self.weight
        matrix = w.reshape(w.shape[0], -1)
        if train:
            with torch.no_grad():
                v = normalize(matrix.t() @ self.weight_u)
                self.weight_u.copy_(normalize(matrix @ v))
                self.weight_v.copy_(v)
        # Differentiable in W; u and v are constants, cloned (as PyTorch's spectral_norm does) so
        # that a later forward's power iteration leaves this graph's copies alone.
        sigma = torch.dot(self.weight_u.clone(), matrix @ self.weight_v.clone())
        return self.weight / sigma

    def forward(self, x, train):
        w = self.normalized_weight(train)
        conv = F.conv_transpose2d if self.transpose else F.conv2d
        return conv(x, w, self.bias, self.stride, self.padding)


class SNLinear(nn.Module):
    """A spectrally normalised linear layer, weight [out, in]."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.register_buffer("weight_u", torch.empty(out_features))
        self.register_buffer("weight_v", torch.empty(in_features))
        self.folded = False

    def normalized_weight(self, train):
        if self.folded:
            return self.weight
        if train:
            with torch.no_grad():
                v = normalize(self.weight.t() @ self.weight_u)
                self.weight_u.copy_(normalize(self.weight @ v))
                self.weight_v.copy_(v)
        return self.weight / torch.dot(self.weight_u.clone(), self.weight @ self.weight_v.clone())

    def forward(self, x, train):
        return F.linear(x, self.normalized_weight(train), self.bias)


class BatchNorm(nn.Module):
    """candle-nn's BatchNorm: batch statistics and running-stat updates in training. With
    `num_classes` > 0 it is sagan's conditional batch norm: no affine weights, a gain and a bias
    row per class instead."""

    def __init__(self, channels, num_classes=0):
        super().__init__()
        if num_classes:
            self.gain = nn.Parameter(torch.empty(num_classes, channels))
            self.bias = nn.Parameter(torch.empty(num_classes, channels))
            self.weight = None
        else:
            self.weight = nn.Parameter(torch.empty(channels))
            self.bias = nn.Parameter(torch.empty(channels))
        self.register_buffer("running_mean", torch.empty(channels))
        self.register_buffer("running_var", torch.empty(channels))
        self.conditional = bool(num_classes)

    def forward(self, x, train, classes=None):
        if not self.conditional:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, train, 0.1, 1e-5)
        y = F.batch_norm(x, self.running_mean, self.running_var, None, None, train, 0.1, 1e-5)
        return y * self.gain[classes][:, :, None, None] + self.bias[classes][:, :, None, None]


class ConvLayer(nn.Module):
    def __init__(self, in_channels, spec, leaky_slope):
        super().__init__()
        self.conv = SNConv(in_channels, spec["out"], spec["kernel"], spec.get("stride", 1),
                           spec.get("padding", 0), transpose=spec["type"] == "conv_transpose")
        self.bn = BatchNorm(spec["out"]) if spec.get("batch_norm") else None
        self.act = spec.get("act", "none")
        self.leaky_slope = leaky_slope

    def forward(self, x, train, classes=None):
        y = self.conv(x, train)
        if self.bn is not None:
            y = self.bn(y, train)
        return activation(y, self.act, self.leaky_slope)


def activation(y, act, leaky_slope):
    if act == "relu":
        return F.relu(y)
    if act == "leaky_relu":
        return F.leaky_relu(y, leaky_slope)
    if act == "tanh":
        return torch.tanh(y)
    return y


class LinearLayer(nn.Module):
    """The flattened input to out x size x size (the ResNet generator's first layer)."""

    def __init__(self, in_features, spec):
        super().__init__()
        self.shape = (spec["out"], spec["size"], spec["size"])
        self.linear = SNLinear(in_features, spec["out"] * spec["size"] ** 2)

    def forward(self, x, train, classes=None):
        return self.linear(x.flatten(1), train).reshape(x.shape[0], *self.shape)


class NormLayer(nn.Module):
    def __init__(self, channels, spec, leaky_slope):
        super().__init__()
        self.bn = BatchNorm(channels)
        self.act, self.leaky_slope = spec["act"], leaky_slope

    def forward(self, x, train, classes=None):
        return activation(self.bn(x, train), self.act, self.leaky_slope)


class GeneratorBlock(nn.Module):
    """CBN, ReLU, 2x nearest upsample, 3x3 conv, CBN, ReLU, 3x3 conv; shortcut 1x1 conv + upsample."""

    def __init__(self, channels, spec, num_classes):
        super().__init__()
        out, self.upsample = spec["out"], spec.get("upsample", True)
        self.norm1 = BatchNorm(channels, num_classes)
        self.conv1 = SNConv(channels, out, 3, padding=1)
        self.norm2 = BatchNorm(out, num_classes)
        self.conv2 = SNConv(out, out, 3, padding=1)
        self.shortcut = SNConv(channels, out, 1) if channels != out or self.upsample else None

    def forward(self, x, train, classes=None):
        up = (lambda t: F.interpolate(t, scale_factor=2, mode="nearest")) if self.upsample else (lambda t: t)
        h = self.conv1(up(F.relu(self.norm1(x, train, classes))), train)
        h = self.conv2(F.relu(self.norm2(h, train, classes)), train)
        skip = self.shortcut(up(x), train) if self.shortcut is not None else x
        return h + skip


class SelfAttention(nn.Module):
    """query/key 1x1 convs to C/8, value C to C; softmax over the keys; y = gamma * o + x.
    Pooled (the official code's form): keys and values 2x2 max-pooled, value C/2 with an output
    1x1 conv back to C."""

    def __init__(self, channels, pooled=False):
        super().__init__()
        self.query = SNConv(channels, channels // 8, 1)
        self.key = SNConv(channels, channels // 8, 1)
        self.value = SNConv(channels, channels // 2 if pooled else channels, 1)
        self.output = SNConv(channels // 2, channels, 1) if pooled else None
        self.gamma = nn.Parameter(torch.empty(1))
        self.pooled = pooled

    def forward(self, x, train, classes=None):
        b, c, h, w = x.shape
        keys = lambda t: (F.max_pool2d(t, 2) if self.pooled else t).flatten(2)
        q = self.query(x, train).reshape(b, -1, h * w)
        k = keys(self.key(x, train))
        v = keys(self.value(x, train))
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        o = (v @ attention.transpose(1, 2)).reshape(b, -1, h, w)
        if self.output is not None:
            o = self.output(o, train)
        return self.gamma * o + x


class Net(nn.Module):
    """The preset's layer list for G or D; tensor names as sagan's (layers.{i}.conv.weight, ...)."""

    def __init__(self, layers, in_shape, leaky_slope, num_classes=0):
        super().__init__()
        self.layers = nn.ModuleList()
        channels, size = in_shape[0], in_shape[1]
        for spec in layers:
            kind = spec["type"]
            if kind == "attention":
                self.layers.append(SelfAttention(channels, spec.get("pooled", False)))
            elif kind in ("conv", "conv_transpose"):
                self.layers.append(ConvLayer(channels, spec, leaky_slope))
            elif kind == "linear":
                self.layers.append(LinearLayer(channels * size * size, spec))
                size = spec["size"]
            elif kind == "generator_block":
                self.layers.append(GeneratorBlock(channels, spec, num_classes))
            elif kind == "batch_norm":
                self.layers.append(NormLayer(channels, spec, leaky_slope))
            else:
                raise SystemExit(f"layer type '{kind}' is not implemented in tools/torch_sagan.py")
            channels = spec.get("out", channels)

    def forward(self, x, train, classes=None):
        for layer in self.layers:
            x = layer(x, train, classes)
        return x


class Generator(Net):
    def __init__(self, preset):
        num_classes = preset.get("num_classes", 0)
        super().__init__(preset["generator"]["layers"], (preset["z_dim"], 1), preset["leaky_slope"], num_classes)
        self.z_dim, self.num_classes = preset["z_dim"], num_classes

    def forward(self, z, train, classes=None):
        return super().forward(z.reshape(z.shape[0], self.z_dim, 1, 1), train, classes)


class Discriminator(Net):
    def __init__(self, preset):
        super().__init__(preset["discriminator"]["layers"], (preset["channels"], preset["image_size"]),
                         preset["leaky_slope"])

    def forward(self, x, train):
        return super().forward(x, train).flatten()


def fold_spectral_norm(net):
    """Divides every weight by its sigma once, as torch.nn.utils.remove_spectral_norm does for
    serving (sagan's export folds it too): evaluation then skips the per-call W / sigma."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (SNConv, SNLinear)):
                module.weight.copy_(module.normalized_weight(False))
                module.folded = True


def load(path):
    """The network a sagan checkpoint file holds, and the file's metadata."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise SystemExit(f"{path}: not a sagan checkpoint")
    preset = json.loads(meta["model"])
    net = Discriminator(preset) if meta["kind"] == "discriminator" else Generator(preset)
    net.load_state_dict(load_file(path), strict=True)
    return net, meta


def mnist_images(channels, size, path=None):
    """MNIST training digits as uint8 [n, channels, size, size]: an IDX file (raw or .gz), a
    directory holding train-images-idx3-ubyte[.gz], or by default sagan-train's built-in MNIST."""
    path = path or os.path.join(ROOT, "fixtures/mnist/train-images-idx3-ubyte.gz")
    if os.path.isdir(path):
        names = [os.path.join(path, n) for n in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")]
        path = next((n for n in names if os.path.exists(n)), names[-1])
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    n, rows, cols = struct.unpack(">III", data[4:16])
    images = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).reshape(n, 1, rows, cols)
    if (rows, cols) != (size, size):
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, channels, -1, -1).contiguous()


class Trainer:
    """sagan-train's step: n_dis D steps (real and fake in one batch), one G step, the EMA.

    `plain` makes it the step of a plain PyTorch SAGAN instead (heykeetae/Self-Attention-GAN's
    layout): D runs on real and fake as two forwards, and D stays in training mode in the G
    step, so each forward through D is one more power iteration of its spectral norms."""

    def __init__(self, g, d, ema, cfg, images, freeze_d=True, plain=False, device="cpu"):
        self.device = torch.device(device)
        g, d = g.to(self.device), d.to(self.device)
        ema = ema.to(self.device) if ema is not None else None
        self.g, self.d, self.ema, self.images = g, d, ema, images
        if cfg["loss"] != "hinge":
            raise SystemExit(f"only the hinge loss is implemented here, not {cfg['loss']}")
        self.batch_size, self.n_dis, self.ema_decay = cfg["batch_size"], cfg["n_dis"], cfg["ema_decay"]
        betas = (cfg["beta1"], cfg["beta2"])
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg["lr_g"], betas=betas, eps=1e-8)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg["lr_d"], betas=betas, eps=1e-8)
        self.step = 0
        self.freeze_d, self.plain = freeze_d, plain
        self.order, self.cursor = torch.randperm(len(images)), 0

    @classmethod
    def from_checkpoint(cls, step_dir, batch_size, freeze_d=True, device="cpu"):
        g, meta = load(os.path.join(step_dir, "generator.safetensors"))
        d, _ = load(os.path.join(step_dir, "discriminator.safetensors"))
        cfg = dict(json.loads(meta["train"]), batch_size=batch_size)
        ema = load(os.path.join(step_dir, "generator_ema.safetensors"))[0] if cfg["ema_decay"] is not None else None
        preset = json.loads(meta["model"])
        images = mnist_images(preset["channels"], preset["image_size"])
        return cls(g, d, ema, cfg, images, freeze_d, device=device)

    def real_batch(self):
        # Epochs of random permutations, as sagan-train draws its batches.
        if self.cursor + self.batch_size > len(self.images):
            self.order, self.cursor = torch.randperm(len(self.images)), 0
        index = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.images[index].to(self.device).float() / 127.5 - 1.0

    def latents(self):
        return torch.randn(self.batch_size, self.g.z_dim, device=self.device)

    def train_step(self):
        b = self.batch_size
        for _ in range(self.n_dis):
            fake = self.g(self.latents(), True).detach()
            if self.plain:
                d_real, d_fake = self.d(self.real_batch(), True), self.d(fake, True)
            else:
                logits = self.d(torch.cat([self.real_batch(), fake]), True)
                d_real, d_fake = logits[:b], logits[b:]
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        # D frozen for the G step (BigGAN-PyTorch's toggle_grad, StudioGAN likewise): its weight
        # gradients would be discarded, and sagan does not compute them either.
        self.d.requires_grad_(not self.freeze_d)
        g_loss = -self.d(self.g(self.latents(), True), self.plain).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.d.requires_grad_(True)
        self.opt_g.step()
        self.step += 1
        if self.ema is not None:
            self.update_ema()
        return d_loss.item(), g_loss.item()

    @torch.no_grad()
    def update_ema(self):
        # Trained weights are averaged; buffers (BN statistics, u, v) copied, as sagan does.
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        for avg, w in zip(self.ema.parameters(), self.g.parameters()):
            avg.lerp_(w, 1 - decay)
        for avg, w in zip(self.ema.buffers(), self.g.buffers()):
            avg.copy_(w)


@torch.no_grad()
def initialise(net, scheme, power_iterations):
    """Fresh weights. `pytorch`: the layers' own default (weight and bias uniform in
    +-1/sqrt(fan_in), fan_in = dimension 1 times the kernel area); `normal`: N(0, 0.02), zero
    bias (DCGAN); `xavier`: Glorot uniform, zero bias (the official TensorFlow SAGAN);
    `orthogonal`: orthogonal weights, PyTorch's default bias (BigGAN-PyTorch). u and v start as
    normalised Gaussians refined by `power_iterations` (PyTorch's spectral_norm does 15)."""
    for m in net.modules():
        if isinstance(m, (SNConv, SNLinear)):
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(m.bias, -bound, bound)
            if scheme == "pytorch":
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            elif scheme == "normal":
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.orthogonal_(m.weight)
            if scheme in ("normal", "xavier"):
                m.bias.zero_()
            m.weight_u.copy_(normalize(torch.randn_like(m.weight_u)))
            m.weight_v.copy_(normalize(torch.randn_like(m.weight_v)))
            for _ in range(power_iterations):
                m.normalized_weight(True)
        elif isinstance(m, BatchNorm):
            for p in (m.weight, getattr(m, "gain", None)):
                if p is not None:
                    p.fill_(1.0)
            m.bias.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
        elif isinstance(m, SelfAttention):
            m.gamma.zero_()


def save_checkpoint(net, path, kind, preset, cfg, step):
    """`net` as a sagan checkpoint file, which sagan-export and sagan-eval read."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "kind": kind, "model": json.dumps(preset), "train": json.dumps(cfg),
            "step": str(step), "seed": str(cfg["seed"]), "producer": "tools/torch_sagan.py"}
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def images_per_s(times, batch):
    return batch * len(times) / sum(times)


def cmd_generate(args):
    g, _ = load(args.generator)
    classes = torch.from_numpy(np.load(args.classes)) if args.classes else None
    with torch.inference_mode():
        images = g(torch.from_numpy(np.load(args.z)), False, classes)
    np.save(args.out, images.numpy())
    return {"images": images.shape[0]}


def cmd_train(args):
    trainer = Trainer.from_checkpoint(args.checkpoint, args.batch_size, freeze_d=not args.no_freeze_d,
                                      device=args.device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        d_loss, g_loss = trainer.train_step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if not (np.isfinite(d_loss) and np.isfinite(g_loss)):
        raise SystemExit(f"training diverged: d_loss {d_loss}, g_loss {g_loss}")
    out = {"images_per_s": images_per_s(times, args.batch_size), "step_s": times, "d_loss": d_loss,
           "g_loss": g_loss}
    if trainer.device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    return out


def cmd_fit(args):
    with open(args.preset, "rb") as f:
        preset = tomllib.load(f)
    preset.setdefault("leaky_slope", 0.1)
    if preset.get("num_classes", 0):
        raise SystemExit(f"{args.preset}: fit trains unconditional presets only")
    preset_training = preset.get("training", {})
    cfg = {"steps": args.steps, "batch_size": 64, "lr_d": 4e-4, "lr_g": 1e-4, "beta1": 0.0, "beta2": 0.9,
           "n_dis": 1, "loss": "hinge", "ema_decay": 0.999, "seed": args.seed, "data": args.data}
    cfg.update({k: v for k, v in preset_training.items() if k in cfg and k != "steps"})
    for key in ("lr_d", "lr_g", "n_dis", "batch_size"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    torch.manual_seed(args.seed)
    g, ema, d = Generator(preset), Generator(preset), Discriminator(preset)
    initialise(g, args.init, args.sn_warmup)
    initialise(d, args.init, args.sn_warmup)
    ema.load_state_dict(g.state_dict())
    images = mnist_images(preset["channels"], preset["image_size"], args.data)
    trainer = Trainer(g, d, ema, cfg, images, plain=args.plain)
    save = {int(s) for s in args.save.split(",")} | {args.steps}
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "metrics.jsonl"), "a")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        d_loss, g_loss = trainer.train_step()
        if not (math.isfinite(d_loss) and math.isfinite(g_loss)):
            raise SystemExit(f"training diverged at step {step}: d_loss {d_loss}, g_loss {g_loss}")
        if step % 50 == 0:
            log.write(json.dumps({"step": step, "d_loss": d_loss, "g_loss": g_loss,
                                  "elapsed_s": time.perf_counter() - start}) + "\n")
            log.flush()
        if step in save:
            step_dir = os.path.join(args.out, "checkpoints", f"step-{step:08d}")
            save_checkpoint(g, os.path.join(step_dir, "generator.safetensors"), "generator", preset, cfg, step)
            save_checkpoint(ema, os.path.join(step_dir, "generator_ema.safetensors"), "generator_ema", preset, cfg, step)
    return {"steps": args.steps, "seconds": time.perf_counter() - start}


def cmd_infer(args):
    g, _ = load(args.generator)
    fold_spectral_norm(g)
    z = torch.randn(args.batch, g.z_dim)
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.runs):
            start = time.perf_counter()
            g(z, False)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    return {"images_per_s": images_per_s(times, args.batch)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="images of a generator checkpoint for the latents in a .npy")
    p.add_argument("--generator", required=True)
    p.add_argument("--z", required=True)
    p.add_argument("--classes", help="int64 classes [n] in a .npy, for a class-conditional preset")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_generate)
    p = sub.add_parser("train", help="training images/s from a sagan checkpoint step directory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-freeze-d", action="store_true",
                   help="compute (and discard) D's weight gradients in the G step, as "
                        "heykeetae/Self-Attention-GAN does")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (PyTorch eager; losses are "
                   "read with .item(), which waits for the GPU, so the step times are whole)")
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("fit", help="train an unconditional preset from fresh weights on MNIST, writing sagan "
                                      "checkpoints (generator, generator_ema) that sagan-export reads")
    p.add_argument("--preset", required=True, help="a preset .toml (models/)")
    p.add_argument("--data", required=True, help="MNIST: an IDX file or a directory (tools/fetch-mnist.sh)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--save", default="1000", help="comma-separated steps to checkpoint at (and the last)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--init", choices=["pytorch", "normal", "xavier", "orthogonal"], default="pytorch")
    p.add_argument("--sn-warmup", type=int, default=15,
                   help="power iterations at initialisation (torch.nn.utils.parametrizations.spectral_norm: 15)")
    p.add_argument("--plain", action="store_true",
                   help="a plain PyTorch SAGAN's step: D on real and fake as two forwards, D training in the G step")
    p.add_argument("--lr-d", type=float)
    p.add_argument("--lr-g", type=float)
    p.add_argument("--n-dis", type=int)
    p.add_argument("--batch-size", type=int)
    p.set_defaults(run=cmd_fit)
    p = sub.add_parser("infer", help="generator images/s, evaluation mode")
    p.add_argument("--generator", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    p.set_defaults(run=cmd_infer)
    args = parser.parse_args()
    # Before any compute, so that the intra-op threads inherit it: GAN activations drift into
    # denormal range and unflushed they slow a CPU run several-fold (sagan flushes too).
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    print(json.dumps(args.run(args)))


if __name__ == "__main__":
    main()
