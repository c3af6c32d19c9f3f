"""
ddpm_mnist.py: a Denoising Diffusion Probabilistic Model, from scratch, on MNIST.

A DDPM learns to generate images by learning to undo noise. A fixed forward process
adds a little Gaussian noise at each of T steps until a digit becomes pure noise; a
U-Net is trained to predict the noise that was added at any step, and sampling runs
the chain backwards from pure noise, removing the predicted noise one step at a time.

    DDPM: Ho, Jain, Abbeel 2020, https://arxiv.org/abs/2006.11239  (Eq. / Alg. below)
    DDIM: Song, Meng, Ermon 2020, https://arxiv.org/abs/2010.02502 (DDIM Eq. below)

The file has two parts. Part I, "the DDPM", follows the case study's steps in order:
config, noise schedule and forward process (Steps 1-2), U-Net (Step 3), EMA, data and
training (Step 4), samplers (Step 5). It is the whole algorithm: a reader can stop at its
end. What it borrows from Part II is bookkeeping it names as such (the Run object's
files, clock and checkpoints; the choice of precision). Part II, "the tool", starts at
the banner "PART II": run files and exact resume, precision, several processes,
sampling to files, evaluation, pictures, bench and the command line.

    python ddpm_mnist.py train                      # the case-study recipe (GPU: minutes)
    python ddpm_mnist.py train --preset cpu         # a smaller recipe for a laptop CPU
    python ddpm_mnist.py train --resume             # continue a killed run exactly
    python ddpm_mnist.py sample --sampler ddim --steps 50
    python ddpm_mnist.py sample --sampler ddpm --gif --n 16 --out samples/denoise.gif
    python ddpm_mnist.py evaluate                   # FID, digit classes, copies
    python ddpm_mnist.py compare                    # DDPM-1000 vs DDIM-10..100
    python ddpm_mnist.py bench                      # throughput, FLOPs, sampling time
    python ddpm_mnist.py forward                    # one digit at growing noise levels
    python ddpm_mnist.py schedule                   # linear vs cosine: curves and noised digits
    python ddpm_mnist.py interpolate                # morph between two starting noises
    python ddpm_mnist.py progress --run-dir runs/ddpm  # the per-epoch grids in one picture
    python ddpm_mnist.py export                     # EMA weights in fp16 -> samples/ema_fp16.pt

Extensions, each off unless asked for:

    python ddpm_mnist.py train --schedule cosine    # Nichol & Dhariwal's cosine schedule
    python ddpm_mnist.py train --lr-schedule cosine --warmup-steps 100 --min-snr-gamma 5
    python ddpm_mnist.py train --preset cifar10     # 32x32 colour, the DDPM paper's CIFAR-10 model
    python ddpm_mnist.py train --preset cpu --cond --epochs 4 --run-dir runs/cond   # ask for a digit
    python ddpm_mnist.py sample --ckpt samples/ema_cond_fp16.pt --class 7
    python ddpm_mnist.py compare --ckpt samples/ema_cond_fp16.pt --guidance 0,1,2,3,5,8
    torchrun --standalone --nproc_per_node=4 ddpm_mnist.py train   # several GPUs

Until `train` has written runs/ddpm/ckpt.pt, the sampling commands use the committed
weights samples/ema_fp16.pt. Every subcommand explains its flags with --help.
"""
import argparse
import copy
import csv
import io
import json
import math
import os
import pickle
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np  # for .npz files and PIL conversions
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

# =============================================================================
# PART I: THE DDPM
# =============================================================================

# -----------------------------------------------------------------------------
# Config: the case study's recipe, in one place. argparse reads its defaults here,
# and every checkpoint stores the resolved config, so sampling rebuilds the same model.


@dataclass
class Config:
    dataset: str = "mnist"       # the images: their channels and size come from IMAGE_SHAPES
    # Step 1, noise schedule (DDPM Sec. 4: linear betas, T = 1000)
    T: int = 1000                # number of diffusion steps
    beta_1: float = 1e-4         # beta at the paper's t = 1: almost no noise added
    beta_T: float = 0.02         # beta at the paper's t = T: x_T is close to N(0, I)
    schedule: str = "linear"     # "cosine": an extension (make_betas)
    # Step 3, U-Net
    channels: tuple = (64, 128, 256, 256)  # widths of the 28, 14, 7 and 3 px levels
    num_res_blocks: int = 2      # residual blocks per level
    time_embedding: str = "sinusoidal"  # "learned" or "scalar": to check the case study's claim (UNet)
    attn_sizes: tuple = ()       # sizes (px) of the levels that get self-attention (CIFAR-10: 16)
    dropout: float = 0.0         # dropout in the residual blocks (CIFAR-10: 0.1)
    # Step 4, training
    lr: float = 2e-4             # AdamW learning rate
    weight_decay: float = 1e-4   # AdamW decoupled weight decay
    batch_size: int = 128
    epochs: int = 50             # 50 x 468 = 23,400 steps
    ema_decay: float = 0.9999    # EMA of the weights, what sampling uses
    seed: int = 0
    precision: str = "auto"      # auto: by device (choose_precision); bf16, fp16 or fp32
    hflip: bool = False          # extension: random horizontal flips (CIFAR-10, as the DDPM paper)
    grid_n: int = 64             # EMA samples drawn into a grid after every epoch (0: none)
    # Short-run levers (extensions, off in the case study; see lr_at and min_snr_weight)
    lr_schedule: str = "constant"  # "cosine": linear warm-up, then cosine decay to 0
    warmup_steps: int = 0        # steps of linear warm-up, with lr_schedule "cosine"
    min_snr_gamma: float = 0.0   # 0: plain MSE, as the case study; 5: min-SNR-gamma weighting
    # Extension, class conditioning and classifier-free guidance (the label embedding in UNet)
    num_classes: int = 0         # 0: unconditional, as the case study; 10: ask for a digit
    p_uncond: float = 0.1        # with num_classes: the share of labels dropped to "no label"
    preset: str = "paper"


PRESETS = {
    "paper": Config(),
    # Chosen by measurement on a 2-core AVX512-BF16 CPU (README, "A faster CPU recipe"):
    # half the widths is 4x fewer FLOPs; a larger learning rate and a shorter EMA suit a
    # short run; then, one lever at a time over 2 epochs, a warm-up and decay of the lr to
    # 0, min-SNR-5 weighting, the cosine schedule and batch 32 each raised the confident
    # share, to 79% with deterministic DDIM-50 in under 12 minutes.
    "cpu": Config(channels=(32, 64, 128, 128), batch_size=32, epochs=2, lr=1e-3, ema_decay=0.999,
                  schedule="cosine", lr_schedule="cosine", warmup_steps=100, min_snr_gamma=5.0, preset="cpu"),
    # Extension, CIFAR-10: the DDPM paper's CIFAR-10 model and recipe as far as this U-Net
    # goes (its Sec. 4 and App. B): widths 128-256-256-256, attention at 16 px, dropout 0.1,
    # flips. The paper trained 800k steps; 100 epochs here are 39,000 (README, CIFAR-10).
    "cifar10": Config(dataset="cifar10", channels=(128, 256, 256, 256), attn_sizes=(16,), dropout=0.1,
                      hflip=True, epochs=100, preset="cifar10"),
}
IMAGE_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}   # (C, H, W) of each data set's images
NUM_CLASSES = 10                 # digits 0-9, or CIFAR-10's ten classes: what --cond conditions on
SCHEDULES = ("linear", "cosine")
TIME_EMBEDDINGS = ("sinusoidal", "learned", "scalar")
GROUPS = 8                       # GroupNorm groups, so every width must divide by 8
DDIM_STEPS = 50                  # the case study's fast sampler: 50 of the T steps


def image_shape(cfg):
    """(C, H, W) of the images a config trains on: the one place the data's shape is set."""
    return IMAGE_SHAPES[cfg.dataset]


def config_from_dict(d):
    """Rebuild a Config from a checkpoint's plain dict. Unknown keys are ignored and
    missing ones take the case study's defaults, so older checkpoints still load."""
    names = {f.name for f in fields(Config)}
    cfg = Config(**{k: v for k, v in d.items() if k in names})
    return replace(cfg, channels=tuple(int(c) for c in cfg.channels), attn_sizes=tuple(int(a) for a in cfg.attn_sizes))


class UserError(Exception):
    """Bad input: main() prints the message as one line and exits with code 2."""


# -----------------------------------------------------------------------------
# Steps 1 and 2: the noise schedule, and the forward process in closed form.
#
# Timestep convention, used everywhere below: an index t in 0..T-1 is the paper's
# timestep t+1. So betas[0] is the paper's beta_1, alphas_cumprod[T-1] is alpha_bar_T,
# and alphas_cumprod_prev[0] = 1 stands for alpha_bar_0 (no noise at all).


def extract(a, t, x):
    """Pick a[t] per batch element and shape it to broadcast over x: (B,) -> (B, 1, 1, 1)."""
    return a[t].view(-1, *([1] * (x.dim() - 1)))


def make_betas(T, beta_1, beta_T, schedule="linear"):
    """beta_1 .. beta_T in float64. "linear" is the DDPM paper's (Sec. 4)."""
    if schedule == "linear":
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    # Extension, the cosine schedule (Nichol & Dhariwal 2021, Eq. 17): alpha_bar follows
    # cos^2, so it falls slowly at both ends and far fewer steps are spent on near-pure noise.
    s = 0.008
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]                                          # alpha_bar(0) .. alpha_bar(T)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # clipped: no beta of 1 at t = T


class NoiseSchedule(nn.Module):
    """The betas and every quantity derived from them, as float32 buffers.

    Computed once in float64 (1 - alpha_bar_t loses most of its digits in float32 near
    t = 0), then cast to float32 and registered by name, so `.to(device)` moves them and
    each name can be grepped against the original DDPM code, whose names these are.
    """

    def __init__(self, T=1000, beta_1=1e-4, beta_T=0.02, schedule="linear"):
        super().__init__()
        self.T = T
        f32 = lambda v: v.to(torch.float32)
        betas = make_betas(T, beta_1, beta_T, schedule)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)                          # alpha_bar_t
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)   # alpha_bar_{t-1}
        self.register_buffer("betas", f32(betas))
        self.register_buffer("alphas", f32(alphas))
        self.register_buffer("alphas_cumprod", f32(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", f32(alphas_cumprod_prev))
        # for q(x_t | x_0) (Eq. 4) and for recovering x_0 from x_t and eps
        self.register_buffer("sqrt_alphas_cumprod", f32(alphas_cumprod.sqrt()))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", f32((1.0 - alphas_cumprod).sqrt()))
        self.register_buffer("sqrt_recip_alphas_cumprod", f32((1.0 / alphas_cumprod).sqrt()))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", f32((1.0 / alphas_cumprod - 1.0).sqrt()))
        # Eq. 6-7: the posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I)
        self.register_buffer("posterior_variance", f32(betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef1", f32(betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2",
                             f32((1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)))
        assert self.alphas_cumprod_prev[0] == 1.0 and self.posterior_variance[0] == 0.0, \
            "index 0 must be the paper's t = 1, whose posterior is the data itself"

    def q_sample(self, x0, t, noise):
        """Step 2, Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, any t at once."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + \
            extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def make_schedule(cfg):
    """The one place a config becomes a schedule: training and every command use it."""
    return NoiseSchedule(cfg.T, cfg.beta_1, cfg.beta_T, cfg.schedule)


# -----------------------------------------------------------------------------
# Step 3: the U-Net that predicts the noise, eps_theta(x_t, t).


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim), as in the Transformer.

    Nearby t get nearby vectors, so the network sees the noise level as a smooth quantity
    rather than 1000 unrelated classes.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]                        # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)               # (B, dim)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, with one measured detour. PyTorch's CPU kernel is slow for bf16
    channels_last input with under 16 channels per group (7.9 ms against 1.0 ms in NCHW
    at 64 channels, 28 px, batch 32: README, Speed), so that case normalizes in fp32 and
    casts back; the result is the same up to bf16 rounding, and parameters are unchanged."""

    def forward(self, x):
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[1] // self.num_groups < 16
                and x.is_contiguous(memory_format=torch.channels_last)):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        return super().forward(x)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the time embedding added in between."""

    def __init__(self, c_in, c_out, t_dim, dropout=0.0):
        super().__init__()
        self.norm1 = GroupNorm(GROUPS, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = GroupNorm(GROUPS, c_out)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()   # CIFAR-10: 0.1, as DDPM
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(t_emb)[:, :, None, None]                    # (B, C) -> (B, C, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Extension for CIFAR-10: every pixel attends to every other (one head, as in the DDPM
    paper's 16 px level), so distant parts of an image can agree. A residual block."""

    def __init__(self, c):
        super().__init__()
        self.norm = GroupNorm(GROUPS, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)   # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)                                   # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """A 3x3 stride-2 conv. Padding 1 on even sizes (28 -> 14 -> 7), none on odd ones,
    so 7 -> 3 exactly and the three windows (rows 0-2, 2-4, 4-6) still see every pixel."""

    def __init__(self, c, size):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1 if size % 2 == 0 else 0)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip's size, then a 3x3 conv to its width.
    Resizing to a given size (not x2) is what makes 3 -> 7 come out right."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W) images and (B,) integer timesteps -> (B, C, H, W).

    Encoder: at each of the 4 levels (28, 14, 7, 3 px for MNIST) `num_res_blocks`
    ResBlocks, then a downsample. The 3 px level is the bottom of the U and plays the role
    of the middle block. Decoder: at 7, 14, 28 px, upsample, concatenate the encoder's
    output at that size, then `num_res_blocks` ResBlocks.

    Decoder layout, chosen for the case study's "about 10M parameters": one skip per
    level, concatenated into the first decoder block. The original DDPM U-Net keeps a
    skip after every block and has one more decoder block per level, each wider for the
    extra concatenations: more parameters than the case study's size (not built here, so
    no count is given). No attention layers for MNIST: the case study has none, and at 7 and
    3 px the convolutions already see the whole image; CIFAR-10 adds them (attn_sizes).
    """

    def __init__(self, channels=(64, 128, 256, 256), num_res_blocks=2, in_channels=1, size=28,
                 attn_sizes=(), dropout=0.0, num_classes=None, time_embedding="sinusoidal", T=1000):
        super().__init__()
        c0, t_dim = channels[0], 4 * channels[0]
        self.c0, self.T = c0, T
        # Ablation, to check the case study's claim that integer embeddings do worse (see
        # embed_time): "learned" has a table of one free vector per t; "scalar" reads t/T.
        self.time_embedding = time_embedding
        self.t_table = nn.Embedding(T, c0) if time_embedding == "learned" else None
        # 2-layer MLP on the time embedding; its SiLU'd output feeds every block
        t_in = 1 if time_embedding == "scalar" else c0
        self.time_mlp = nn.Sequential(nn.Linear(t_in, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim), nn.SiLU())
        # Extension, class conditioning: one learned vector per label and a last row for
        # "no label" (the null label, num_classes), added to the time embedding so that
        # every block sees both. Unconditional networks have no such layer.
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, t_dim) if num_classes else None
        self.stem = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.sizes = [size]
        self.enc, self.down = nn.ModuleList(), nn.ModuleList()
        c_prev = c0
        self.attn = nn.ModuleDict()          # after each block of an attention level; empty for MNIST
        for i, c in enumerate(channels):
            self.enc.append(nn.ModuleList(
                [ResBlock(c_prev if j == 0 else c, c, t_dim, dropout) for j in range(num_res_blocks)]))
            if self.sizes[i] in attn_sizes:
                self.attn.update({f"enc{i}_{j}": SelfAttention(c) for j in range(num_res_blocks)})
            if i < len(channels) - 1:
                size = self.sizes[-1]
                self.down.append(Downsample(c, size))
                self.sizes.append((size + (2 if size % 2 == 0 else 0) - 3) // 2 + 1)
            c_prev = c
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):                    # 7, 14, 28 px
            c = channels[i]
            self.up.append(Upsample(channels[i + 1], c))
            self.dec.append(nn.ModuleList(
                [ResBlock(2 * c if j == 0 else c, c, t_dim, dropout) for j in range(num_res_blocks)]))
            if self.sizes[i] in attn_sizes:
                self.attn.update({f"dec{i}_{j}": SelfAttention(c) for j in range(num_res_blocks)})
        self.out = nn.Sequential(GroupNorm(GROUPS, c0), nn.SiLU(), nn.Conv2d(c0, in_channels, 3, padding=1))

    def embed_time(self, t):
        """(B,) integer t -> what the time MLP reads: the sinusoidal embedding, as the case
        study. Ablation only: a learned table row per t, or the scalar t/T, (B, 1)."""
        if self.time_embedding == "learned":
            return self.t_table(t)
        if self.time_embedding == "scalar":
            return t.float()[:, None] / self.T
        return timestep_embedding(t, self.c0)

    def forward(self, x, t, y=None):
        t_emb = self.time_mlp(self.embed_time(t))                       # (B,) -> (B, 4*c0)
        if self.label_emb is not None:                                  # conditional; y None: no label
            t_emb = t_emb + self.label_emb(torch.full_like(t, self.num_classes) if y is None else y)
        h = self.stem(x)                                                # (B, c0, 28, 28)
        skips = []
        for i, blocks in enumerate(self.enc):
            for j, block in enumerate(blocks):
                h = block(h, t_emb)
                h = self.attn[f"enc{i}_{j}"](h) if f"enc{i}_{j}" in self.attn else h
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)                                     # 28 -> 14 -> 7 -> 3
        for up, blocks, i in zip(self.up, self.dec, reversed(range(len(self.down)))):
            skip = skips.pop()
            h = up(h, skip.shape[-2:])                                  # 3 -> 7 -> 14 -> 28
            h = torch.cat([h, skip], dim=1)                             # (B, 2c, H, W)
            for j, block in enumerate(blocks):
                h = block(h, t_emb)
                h = self.attn[f"dec{i}_{j}"](h) if f"dec{i}_{j}" in self.attn else h
        return self.out(h)


def make_unet(cfg):
    """The network a config describes, its input shaped like the config's images."""
    C, H, _ = image_shape(cfg)
    return UNet(cfg.channels, cfg.num_res_blocks, C, H, cfg.attn_sizes, cfg.dropout, cfg.num_classes or None,
                cfg.time_embedding, cfg.T)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Step 4a: EMA of the weights.
#
# Sampling uses an exponential moving average of the weights: it averages out the noise
# of the last few thousand SGD steps, which the case study found "critical" for clean
# samples. With decay 0.9999 the average spans ~10k steps, almost half of a 23k-step run,
# so without a warm-up the random initial weights would still weigh e^-2.3 = 10% at the
# end. The warm-up decay_n = min(decay, (1 + n) / (10 + n)) makes the early average short.


def ema_decay_at(n, decay):
    return min(decay, (1 + n) / (10 + n))


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * theta, for every tensor in one fused call."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


# -----------------------------------------------------------------------------
# Step 4b: data. MNIST as one uint8 tensor on the device.
#
# The whole training set is 47 MB as uint8, so it lives on the device and a batch is an
# index into it: no DataLoader workers, no per-image Python on the hot path.


def mnist_raw_folder(data_dir):
    return Path(data_dir) / "MNIST" / "raw"


def load_mnist(data_dir, train=True):
    """(N, 28, 28) uint8 images and (N,) labels, via torchvision (downloads if missing)."""
    # Imported here, not at the top: torchvision pulls in torch._dynamo, a second of start-up
    # that every command not reading MNIST (sample, interpolate, bench) can skip.
    from torchvision.datasets import MNIST
    raw = mnist_raw_folder(data_dir)
    made = [p for p in (raw, raw.parent, Path(data_dir)) if not p.exists()]
    try:
        ds = MNIST(data_dir, train=train, download=True)
    except Exception as e:  # no network, a proxy error, a partial file...
        for p in made:  # leave no empty folders behind
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise UserError(f"--data-dir {data_dir}: MNIST is missing and could not be downloaded "
                        f"({type(e).__name__}); put the four IDX files (train-images-idx3-ubyte, ...) "
                        f"in {raw}") from None
    return ds.data, ds.targets


def load_cifar10(data_dir, train=True):
    """Extension: CIFAR-10 as uint8 (N, 32, 32, 3) images and (N,) labels, via torchvision
    (downloads if missing; offline, put cifar-10-batches-py in --data-dir)."""
    from torchvision.datasets import CIFAR10
    try:
        ds = CIFAR10(data_dir, train=train, download=True)
    except Exception as e:
        raise UserError(f"--data-dir {data_dir}: CIFAR-10 is missing and could not be downloaded "
                        f"({type(e).__name__}); put the extracted cifar-10-batches-py folder in {data_dir}") from None
    return torch.from_numpy(ds.data), torch.tensor(ds.targets)


def load_data(cfg, data_dir, train=True):
    """The config's data set as uint8 images, (N, H, W) or (N, H, W, 3), and labels: the one
    place to add one."""
    return load_cifar10(data_dir, train) if cfg.dataset == "cifar10" else load_mnist(data_dir, train)


def random_hflip(x, generator):
    """Extension for CIFAR-10: mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5      # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def epoch_batches(n, batch_size, seed, epoch):
    """The index batches of one epoch, (n // batch_size, batch_size).

    The order depends only on (seed, epoch), so a resumed run replays it exactly. The
    last partial batch is dropped so every step has the same shape (a different tail
    is dropped each epoch).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    steps = n // batch_size
    return perm[: steps * batch_size].view(steps, batch_size)


def to_model_range(images_uint8):
    """uint8 images in 0..255, (B, H, W) grey or (B, H, W, 3) colour as image files lay them
    out -> float (B, C, H, W) in [-1, 1], as the network takes them."""
    x = images_uint8.unsqueeze(1) if images_uint8.dim() == 3 else images_uint8.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def to_uint8(x):
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, H, W) or (B, H, W, 3), rounding to nearest."""
    u = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.squeeze(1) if u.shape[1] == 1 else u.permute(0, 2, 3, 1)


# -----------------------------------------------------------------------------
# Step 4c: training, Alg. 1.


def diffusion_loss(eps_model, schedule, x0, generator, min_snr_gamma=0.0, part=slice(None), y=None):
    """Alg. 1: t ~ Uniform, eps ~ N(0, I), loss = || eps - eps_theta(x_t, t) ||^2 (with labels
    y, a conditional model's eps_theta(x_t, t, y)). Also returns each image's t and squared
    error, detached, for the loss-by-noise-level log."""
    B = x0.shape[0]
    t = torch.randint(0, schedule.T, (B,), device=x0.device, generator=generator)  # paper's 1..T
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    # torchrun (Part II): several processes each draw the whole batch's t and eps and keep
    # their own share, so N processes take the same steps as one. Alone, part keeps all.
    x0, t, eps = x0[part], t[part], eps[part]
    x_t = schedule.q_sample(x0, t, eps)
    eps_theta = eps_model(x_t, t) if y is None else eps_model(x_t, t, y[part])
    per_image = (eps_theta - eps).pow(2).mean(dim=(1, 2, 3))           # (B,)
    if not min_snr_gamma:
        loss = F.mse_loss(eps_theta, eps)
    else:
        loss = (min_snr_weight(schedule, t, min_snr_gamma) * per_image).mean()
    return loss, t, per_image.detach()


def min_snr_weight(schedule, t, gamma):
    """Extension, min-SNR-gamma weighting (Hang et al. 2023): for eps-prediction the loss
    at t is scaled by min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t).
    It turns down the many nearly clean timesteps, whose gradients fight the noisy ones."""
    snr = schedule.sqrt_recipm1_alphas_cumprod[t] ** -2   # from float64: 1 - alpha_bar_t in float32 loses digits
    return snr.clamp(max=gamma) / snr


def drop_labels(y, p_uncond, null_label, generator):
    """Extension, classifier-free guidance training (Ho & Salimans 2022): each label becomes
    the null label with probability p_uncond, so one network learns both eps(x_t, t, y) and
    the unconditional eps(x_t, t, null) that guidance (Step 5) steers away from."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def lr_at(step, cfg, total):
    """The learning rate at a 0-based step: constant, as the case study; or, a short-run
    lever, a linear warm-up over cfg.warmup_steps and a cosine decay to 0 at `total`.
    A function of the step alone, so a resumed run needs no scheduler state. The horizon
    comes from --epochs: --max-steps and --max-minutes stop a run early but do not bend it."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, cfg, device):
    # Fused AdamW updates every tensor in one kernel instead of ~6 small ops per tensor:
    # on the 2-core CPU it cut the preset's optimizer step from 9.3 to 3.0 ms.
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


@dataclass
class Parts:
    """What training works on, built once by build()."""
    schedule: NoiseSchedule      # the buffers of Steps 1-2
    model: nn.Module             # theta, trained by AdamW
    ema: nn.Module               # the average of theta that sampling uses
    opt: torch.optim.Optimizer
    eps_model: object            # model, maybe compiled, under autocast: what the loss calls
    scaler: torch.amp.GradScaler  # fp16 only: scales the loss so small gradients do not flush to 0
    # the images of each batch this process trains on: all, unless torchrun splits the batch
    part: slice = field(default_factory=lambda: slice(None))


def build(cfg, device, compile=False):
    """The schedule, the network, its float32 EMA copy and the optimizer, on `device`."""
    model = make_unet(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)   # eval: no dropout when it samples
    dtype, _ = choose_precision(device, cfg.precision)
    return Parts(make_schedule(cfg).to(device), model, ema, make_optimizer(model, cfg, device),
                 eps_model_for_training(model, device, cfg, compile),
                 torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def eps_model_for_training(model, device, cfg, compile=False):
    fwd = torch.compile(model) if compile else model        # checkpoints keep the plain names
    return with_autocast(fwd, device, choose_precision(device, cfg.precision)[0])


def train_step(p, x0, generator, step, cfg, y=None):
    """One optimizer step and one EMA update; returns the loss (a 0-d device tensor),
    and each image's t and error for the log."""
    loss, t, per_image = diffusion_loss(p.eps_model, p.schedule, x0, generator, cfg.min_snr_gamma, p.part, y)
    p.opt.zero_grad(set_to_none=True)
    p.scaler.scale(loss).backward()     # with the scaler off (bf16, fp32) these three lines
    p.scaler.step(p.opt)                # are loss.backward() and opt.step(); with fp16 a step
    p.scaler.update()                   # whose gradients overflowed is skipped, and the scale shrinks
    ema_update(list(p.ema.parameters()), list(p.model.parameters()), ema_decay_at(step, cfg.ema_decay))
    return loss.detach(), t, per_image


def train(cfg, run):
    """Alg. 1 as one flat loop. The algorithm is all here; `run` (Part II) keeps the
    files, the clock and Ctrl-C, and checkpoints so that a killed run resumes exactly."""
    images, labels = load_data(cfg, run.data_dir)
    data, labels = images.to(run.device), labels.to(run.device)  # (N, 28, 28) uint8 (MNIST), (N,)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size}: larger than the {len(data)} training images")
    p = build(cfg, run.device, run.compile)
    gen = torch.Generator(run.device).manual_seed(cfg.seed)  # draws every t and eps (and flips, dropped labels)
    start = run.begin(cfg, p, gen, steps_per_epoch)         # 0, or the step a checkpoint saved
    total = run.total_steps                                 # the planned steps, or fewer with --max-steps
    horizon = cfg.epochs * steps_per_epoch                  # where a decaying lr reaches 0
    for step in range(start, total + 1):
        last_step = step == total or (step > start and run.should_stop(step))
        if step > start:
            run.after_step(step, last_step, p, gen)         # loss check, loss.csv, grid, checkpoint
        if last_step:
            break
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or step == start:                         # a new epoch, or the first step after a resume
            batches = epoch_batches(len(data), cfg.batch_size, cfg.seed, epoch).to(run.device)
        x0 = to_model_range(data[batches[i]])               # (B, C, H, W) in [-1, 1]
        x0 = random_hflip(x0, gen) if cfg.hflip else x0     # CIFAR-10 only
        # Extension, class conditioning: the batch's labels, some dropped for guidance
        y = drop_labels(labels[batches[i]], cfg.p_uncond, cfg.num_classes, gen) if cfg.num_classes else None
        for group in p.opt.param_groups:
            group["lr"] = lr_at(step, cfg, horizon)
        run.record(*train_step(p, x0, gen, step, cfg, y))
    run.finish(step)
    return p


# -----------------------------------------------------------------------------
# Step 5: samplers. Both take any eps_model(x, t) and the starting noise x_T, and return
# images in [-1, 1]. A step function returns the mean and standard deviation of
# x_{t-1} given x_t, so tests can check the formulas without sampling.


def predict_x0(schedule, x_t, t, eps_theta, clip=True):
    """Invert Eq. 4 for x_0. Clipping to [-1, 1] (the data range) keeps early, wild
    predictions from pushing samples off the image manifold; eps is then re-derived so
    the pair (x_0, eps) still adds up to x_t exactly."""
    x0 = extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - \
        extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps_theta
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps_theta = (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / \
            extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return x0, eps_theta


def ddpm_step(schedule, x_t, t, eps_theta, clip=True):
    """Eq. 7 with the predicted x_0: mean of q(x_{t-1} | x_t, x_0) and sigma_t = sqrt(beta_tilde_t).
    Unclipped, this mean is exactly Alg. 2 line 4, (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)."""
    x0, _ = predict_x0(schedule, x_t, t, eps_theta, clip)
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + \
        extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, extract(schedule.posterior_variance, t, x_t).sqrt(), x0


def ddim_step(schedule, x_t, t, t_prev, eps_theta, eta=0.0, clip=True):
    """DDIM Eq. 12 from index t to index t_prev (-1 means the clean image, alpha_bar = 1)."""
    x0, eps_theta = predict_x0(schedule, x_t, t, eps_theta, clip)
    alpha_bar_t = extract(schedule.alphas_cumprod, t, x_t)
    alpha_bar_prev = schedule.alphas_cumprod[t_prev.clamp(min=0)]
    alpha_bar_prev = torch.where(t_prev >= 0, alpha_bar_prev, torch.ones_like(alpha_bar_prev))
    alpha_bar_prev = alpha_bar_prev.view(-1, 1, 1, 1)                         # (B,) -> (B, 1, 1, 1)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()  # Eq. 16
    mean = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps_theta
    return mean, sigma, x0


def ddim_timesteps(T, steps):
    """`steps` indices spaced T/steps apart, starting at T-1: the first step must start from
    the pure-noise level x_T ~ N(0, I), which is what sampling feeds in. steps = T gives
    every index T-1 .. 0, where eta = 1 is exactly DDPM."""
    return [round(T - 1 - i * T / steps) for i in range(steps)]


def t_batch(x, t):
    """The timestep index t for every image of the batch x, (B,)."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def ddpm_sample(eps_model, schedule, x_T, clip_x0=True, generator=None, on_step=None):
    """Alg. 2: T ancestral steps from x_T ~ N(0, I) with the posterior variance."""
    x = x_T
    for i, t in enumerate(range(schedule.T - 1, -1, -1)):
        t_b = t_batch(x, t)
        mean, std, x0 = ddpm_step(schedule, x, t_b, eps_model(x, t_b).float(), clip_x0)
        z = torch.randn(x.shape, device=x.device, generator=generator) if t > 0 else 0.0  # Alg. 2, line 3
        x = mean + std * z
        if on_step:
            on_step(i, x, x0)
    return x


@torch.no_grad()
def ddim_sample(eps_model, schedule, x_T, steps=DDIM_STEPS, eta=0.0, clip_x0=True, generator=None, on_step=None):
    """DDIM: `steps` jumps along a subsequence of the T timesteps; eta = 0 is deterministic."""
    ts = ddim_timesteps(schedule.T, steps)
    x = x_T
    for i, t in enumerate(ts):
        t_b, t_prev = t_batch(x, t), t_batch(x, ts[i + 1] if i + 1 < len(ts) else -1)
        mean, sigma, x0 = ddim_step(schedule, x, t_b, t_prev, eps_model(x, t_b).float(), eta, clip_x0)
        x = mean
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        if on_step:
            on_step(i, x, x0)
    return x


# -----------------------------------------------------------------------------
# Extension, classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).
# A conditional network, trained with some labels dropped (drop_labels), predicts the noise
# both for a digit y and for no label. Sampling pushes further in the direction that y adds:
# the samplers above take the result as any other eps_model(x, t).


def guided(eps_model, y, s, null_label):
    """eps~(x_t, t) = eps(x_t, t, null) + s * (eps(x_t, t, y) - eps(x_t, t, null)).
    s = 0 ignores y, s = 1 is the plain conditional model, s > 1 trades diversity for
    fidelity to y. The paper writes (1 + w) eps(y) - w eps(null): its w is s - 1. Both
    terms come from one forward pass over the doubled batch."""
    y_and_null = torch.cat([y, torch.full_like(y, null_label)])            # (2B,)

    def eps_tilde(x, t):
        both = eps_model(torch.cat([x, x]), torch.cat([t, t]), y_and_null)  # (2B, C, H, W)
        eps_y, eps_null = both.chunk(2)                                     # 2 x (B, C, H, W)
        return eps_null + s * (eps_y - eps_null)
    return eps_tilde


# s when --guidance is not given: the smallest scale whose samples were the digit asked for
# at least 98% of the time, for the CPU conditional model (README, "Ask for a digit")
DEFAULT_GUIDANCE = 2.0


def digit_rows(n, ncol, num_classes):
    """Labels for n samples laid out ncol to a row: row r asks for class r mod num_classes."""
    return (torch.arange(n) // ncol) % num_classes


# =============================================================================
# PART II: THE TOOL
#
# Everything above is the DDPM. Everything below makes it a tool: files that survive
# a kill, checkpoints and exact resume, sampling to files, evaluation, pictures, bench
# and the command line. None of it changes what the model computes.
# =============================================================================

# -----------------------------------------------------------------------------
# Files that survive a kill at any instant, and progress bars fit for log files.


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, fsync it, then rename it over `path`.

    A rename within one folder is atomic, so a kill at any instant leaves either the old
    file or the new one, never a truncated one; the old one stays until the new is whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_folder(path.parent)


def fsync_folder(folder):
    """Make a rename durable by syncing its folder. Windows cannot open a folder as a file
    (PermissionError); there NTFS's own journal is all there is, so skip it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:        # some file systems refuse fsync on folders; the data is synced
        pass
    finally:
        os.close(fd)


def precision_name(dtype):
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "fp32"}[dtype]


def save_png(image, path):
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def progress_bar(**kw):
    """tqdm, redrawn twice a second on a terminal but once a minute when stderr is a log
    file or CI: there every redraw is a new line, and a DDPM-1000 run wrote hundreds."""
    interval = 0.5 if sys.stderr.isatty() else 60.0
    return tqdm(mininterval=interval, maxinterval=max(10.0, interval), dynamic_ncols=True, **kw)


GRID_PAD = 2                     # white lines between the cells of a grid, in pixels
GRID_COLUMNS = 8                 # samples per row of the per-epoch grids


def to_image(a):
    """uint8 (H, W) or (H, W, 3) tensor -> PIL grey or RGB image."""
    return Image.fromarray(a.cpu().numpy())


def grid_image(images_uint8, nrow=GRID_COLUMNS, pad=GRID_PAD):
    """uint8 (N, H, W) or (N, H, W, 3) -> one grid, nrow images a row, white lines
    between them (torchvision's make_grid layout)."""
    n, h, w = images_uint8.shape[:3]
    rows, cols = math.ceil(n / nrow), min(nrow, n)
    canvas = torch.full((pad + rows * (h + pad), pad + cols * (w + pad), *images_uint8.shape[3:]), 255,
                        dtype=torch.uint8)
    for i, im in enumerate(images_uint8.cpu()):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return to_image(canvas)


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read without ever running code.

DEFAULT_CKPT = Path("runs/ddpm/ckpt.pt")
# The committed weights, found beside this file wherever the command is run from.
SHIPPED_CKPT = Path(__file__).resolve().parent / "samples" / "ema_fp16.pt"


def save_checkpoint(path, cfg, p, step, state):
    ckpt = dict(config=asdict(cfg), model=p.model.state_dict(), ema=p.ema.state_dict(),
                opt=p.opt.state_dict(), scaler=p.scaler.state_dict(), step=step, **state,
                versions=dict(torch=str(torch.__version__)))
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, flag="--ckpt"):
    """torch.load with weights_only=True: tensors and plain data only, so a checkpoint
    can never run code. Every failure is one line for the user, never a traceback."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file (train first, or use --ckpt samples/ema_fp16.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{flag} {path}: refused: it holds pickled Python objects that could run code; "
                        "nothing in it was executed") from None
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint, truncated or not made by torch.save "
                        f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or \
            not isinstance(ckpt.get("ema", ckpt.get("model")), dict):
        raise UserError(f"{flag} {path}: not a ddpm_mnist checkpoint (it needs 'config' and 'ema' entries)")
    return ckpt


def checkpoint_to_sample(ckpt_flag):
    """The checkpoint a sampling command reads: --ckpt if given; else runs/ddpm/ckpt.pt; else,
    on a fresh clone with nothing trained yet, the committed weights, said in one line."""
    if ckpt_flag is not None:
        return Path(ckpt_flag)
    if DEFAULT_CKPT.exists() or not SHIPPED_CKPT.exists():
        return DEFAULT_CKPT
    cfg = config_from_dict(load_checkpoint(SHIPPED_CKPT)["config"])
    print(f"note: no {DEFAULT_CKPT} yet, so using the committed weights samples/ema_fp16.pt "
          f"(preset {cfg.preset}, {cfg.dataset.upper()}; samples/README.md says how it was trained); "
          f"`python ddpm_mnist.py train` makes your own", file=sys.stderr)
    return SHIPPED_CKPT


def model_from_checkpoint(ckpt, weights="ema", flag="--ckpt"):
    """Rebuild the network that the checkpoint's config describes and load its weights
    (float32, also from the fp16 file in samples/)."""
    cfg = config_from_dict(ckpt["config"])
    check_channels(cfg.channels, flag)
    state = ckpt.get(weights)
    if not isinstance(state, dict):
        raise UserError(f"{flag}: this checkpoint has no '{weights}' weights (it has: "
                        f"{', '.join(k for k in ('ema', 'model') if k in ckpt)})")
    model = make_unet(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag}: its weights do not fit the network its config describes "
                        f"(channels {cfg.channels}): {first}") from None
    return model.eval().requires_grad_(False), cfg


def check_channels(channels, flag="--channels"):
    if len(channels) != 4 or any(c < GROUPS or c % GROUPS for c in channels):
        raise UserError(f"{flag} {','.join(map(str, channels))}: need 4 widths (one per level: 28, 14, 7, 3 px "
                        f"for MNIST), each a positive multiple of {GROUPS} (the GroupNorm groups)")


TRAINING_STATE = ("model", "ema", "opt", "step", "rng", "epoch_loss_sum", "history", "seconds")


def check_resumable(ckpt, path):
    """--resume needs the whole training state; an `export` file holds the EMA alone."""
    missing = [k for k in TRAINING_STATE if k not in ckpt]
    if missing:
        raise UserError(f"--resume: {path} has no training state ({', '.join(missing)} missing); it looks like "
                        "an `export` file, which can be sampled from but not trained further")


def restore(ckpt, p, gen):
    """Put a run back exactly where its checkpoint left it: weights, optimizer moments,
    the generator that draws t and eps, and the running loss of the current epoch."""
    p.model.load_state_dict(ckpt["model"])
    p.ema.load_state_dict(ckpt["ema"])
    p.opt.load_state_dict(ckpt["opt"])
    if ckpt.get("scaler"):                   # fp16 runs only; empty for bf16 and fp32
        p.scaler.load_state_dict(ckpt["scaler"])
    gen.set_state(ckpt["rng"])
    state = {k: ckpt[k] for k in ("epoch_loss_sum", "history", "seconds")}
    state.update({k: ckpt.get(k, [0.0] * NOISE_BINS) for k in ("bin_loss_sums", "bin_counts")})  # older runs: none
    return ckpt["step"], state


# -----------------------------------------------------------------------------
# The run: what train() hands its bookkeeping to. It owns the run folder, the clock,
# the progress bar and Ctrl-C; the algorithm stays in train().


class NonFiniteLoss(Exception):
    pass


def check_finite(recent, first_step):
    """recent: the per-step losses since the last check. Raise at the first bad step.
    Checking in windows keeps the GPU from waiting on the CPU at every step."""
    if not recent:
        return
    losses = torch.stack(recent).cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise NonFiniteLoss(first_step + int(bad[0]) + 1)          # steps count from 1


# The loss by noise level, as improved-diffusion logs it: the mean loss of the steps whose
# t fell in each quarter of 1..T. Where the error sits, and which quarter training still
# improves, is what a schedule changes.
NOISE_BINS = 4


def bin_names(T):
    return [f"loss_t{b * T // NOISE_BINS + 1}-{(b + 1) * T // NOISE_BINS}" for b in range(NOISE_BINS)]


def write_loss_csv(history, path, T):
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["epoch", "step", "mean_loss", "seconds", *bin_names(T)])
    for row in history:
        by_t = [f"{v:.6f}" for v in row.get("loss_by_t", [])]  # absent in runs from older versions
        w.writerow([row["epoch"], row["step"], f"{row['mean_loss']:.6f}", f"{row['seconds']:.1f}", *by_t])
    save_text(out.getvalue(), path)


def epoch_grid(p, cfg, path):
    """EMA samples from the same starting noise every epoch, so the grids show progress."""
    device = p.schedule.betas.device
    x_T = torch.randn(cfg.grid_n, *image_shape(cfg), generator=torch.Generator().manual_seed(cfg.seed + 1))
    eps_model = with_autocast(p.ema, device, choose_precision(device, cfg.precision)[0])
    if cfg.num_classes:                      # a conditional run: one digit per row of the grid
        y = digit_rows(cfg.grid_n, GRID_COLUMNS, cfg.num_classes).to(device)
        eps_model = guided(eps_model, y, DEFAULT_GUIDANCE, cfg.num_classes)
    x0 = ddim_sample(eps_model, p.schedule, x_T.to(device), steps=DDIM_STEPS)
    save_png(grid_image(to_uint8(x0), GRID_COLUMNS), path)


LOSS_CHECK_EVERY = 50            # steps between NaN checks and progress-bar updates


@dataclass
class Run:
    """One training run's files and clock. train() calls begin, record, should_stop,
    after_step and finish; nothing here changes what is trained.

    Under torchrun (rank, world from the environment) every process runs the same loop on
    its share of each batch; process 0 alone writes files and prints. The running sums are
    kept so that adding them over the processes gives the totals of the whole batch."""
    run_dir: Path
    device: torch.device
    data_dir: str = "data"
    ckpt: dict = None            # the checkpoint to resume from, loaded once by train_config
    max_steps: int = None
    max_minutes: float = None
    ckpt_every: int = 0
    compile: bool = False
    rank: int = 0
    world: int = 1

    def begin(self, cfg, p, gen, steps_per_epoch):
        """Restore a checkpoint when resuming, make the folder, start the clock, the bar and
        the Ctrl-C flag; under torchrun, wrap the model and take this process's share.
        Returns the step to start from."""
        self.cfg, self.steps_per_epoch, self.lead = cfg, steps_per_epoch, self.rank == 0
        self.run_dir, self.ckpt_path = Path(self.run_dir), Path(self.run_dir) / "ckpt.pt"
        self.total_steps = min(self.max_steps or math.inf, cfg.epochs * steps_per_epoch)
        fresh = dict(epoch_loss_sum=0.0, history=[], seconds=0.0, bin_loss_sums=[0.0] * NOISE_BINS,
                     bin_counts=[0.0] * NOISE_BINS)
        step, self.state = restore(self.ckpt, p, gen) if self.ckpt else (0, fresh)
        if step >= self.total_steps:
            raise UserError(f"--resume: {self.ckpt_path} is at step {step} already; give more --epochs "
                            f"(or a larger --max-steps) than the {self.total_steps} steps asked for")
        if self.world > 1:
            share_the_batch(p, cfg, self)
        if self.lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_text(json.dumps(asdict(cfg), indent=2) + "\n", self.run_dir / "config.json")
        dtype, why = choose_precision(self.device, cfg.precision)
        self.say(f"UNet: {count_params(p.model):,} parameters, channels {cfg.channels}"
                 + (f", class-conditional (p_uncond {cfg.p_uncond})" if cfg.num_classes else "")
                 + f"; device {self.device}"
                 + (f" x {self.world} processes" if self.world > 1 else "")
                 + f"; {precision_name(dtype)} ({why}); {steps_per_epoch} steps/epoch, {cfg.epochs} epochs"
                 + (f"; resuming at step {step}" if step else ""))
        if self.device.type == "cpu" and cfg.preset == "paper":
            self.say("note: the case-study recipe takes many hours on a CPU; `--preset cpu` makes digits in "
                     "about 12 minutes on 2 cores (README, CPU preset)", file=sys.stderr)
        self.last_good = step if self.ckpt else None
        self.t_start, self.seconds0, self.step_at_begin = time.time(), self.state["seconds"], step
        self.recent, self.recent_from = [], step     # losses not yet checked: a check syncs with the GPU
        # the saved sums are totals; they go to process 0, so that the sum over processes is right
        keep = 1.0 if self.lead else 0.0
        self.loss_sum = torch.tensor(keep * self.state["epoch_loss_sum"], device=self.device)
        self.bin_loss_sums = torch.tensor(self.state["bin_loss_sums"], device=self.device) * keep
        self.bin_counts = torch.tensor(self.state["bin_counts"], device=self.device) * keep
        self.bar = progress_bar(total=self.total_steps, initial=step, unit="step", disable=not self.lead)
        # Ctrl-C sets a flag instead of killing mid-step, so the loop can save and leave;
        # a second Ctrl-C kills as usual.
        self.interrupted = False
        self.old_sigint = signal.signal(signal.SIGINT, self.on_sigint)
        return step

    def say(self, text, file=None):
        if self.lead:
            print(text, file=file)

    def on_sigint(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def record(self, loss, t, per_image):
        self.loss_sum += loss / self.world      # each process's loss is the mean of its share
        self.recent.append(loss)
        bins = t * NOISE_BINS // self.cfg.T                     # (B,) in 0..3; index_add_, unlike
        self.bin_loss_sums.index_add_(0, bins, per_image)       # bincount, never waits for the GPU
        self.bin_counts.index_add_(0, bins, torch.ones_like(per_image))

    def should_stop(self, step):
        """Ctrl-C, or --max-minutes used up: either way the step just taken is saved. Several
        processes agree every LOSS_CHECK_EVERY steps, so that none waits alone in a collective."""
        out_of_time = self.max_minutes is not None and time.time() - self.t_start > 60 * self.max_minutes
        if self.world == 1:
            return self.interrupted or out_of_time
        if step % LOSS_CHECK_EVERY:
            return False
        votes = all_sum(torch.tensor([float(self.interrupted), float(out_of_time)], device=self.device), self)
        self.interrupted = bool(votes[0])
        return bool(votes.sum())

    def after_step(self, step, last_step, p, gen):
        """`step` steps are done: check the losses, write the epoch's files, checkpoint."""
        end_of_epoch = step % self.steps_per_epoch == 0
        save_now = end_of_epoch or last_step or (self.ckpt_every and step % self.ckpt_every == 0)
        if len(self.recent) == LOSS_CHECK_EVERY or save_now:
            self.check_losses(step)
        self.state["seconds"] = self.seconds0 + time.time() - self.t_start
        if save_now:
            self.gather_sums()
        if end_of_epoch:
            self.end_epoch(step // self.steps_per_epoch, step, p)
        if save_now and self.lead:  # written last, so a kill before it replays this epoch end exactly
            self.state.update(epoch_loss_sum=self.loss_sum.item(), bin_loss_sums=self.bin_loss_sums.tolist(),
                              bin_counts=self.bin_counts.tolist())
            save_checkpoint(self.ckpt_path, self.cfg, p, step, dict(self.state, rng=gen.get_state()))
        self.last_good = step if save_now else self.last_good

    def gather_sums(self):
        """Several processes: put the totals on process 0 and zeros elsewhere."""
        if self.world > 1:
            for total in (self.loss_sum, self.bin_loss_sums, self.bin_counts):
                all_sum(total, self)
                total.mul_(1.0 if self.lead else 0.0)

    def check_losses(self, step):
        recent = all_sum(torch.stack(self.recent), self) / self.world    # (k,): the batch's losses
        try:
            check_finite(list(recent), self.recent_from)
        except NonFiniteLoss as e:
            self.bar.close()
            signal.signal(signal.SIGINT, self.old_sigint)
            kept = f"the last good checkpoint is {self.ckpt_path} (step {self.last_good})" \
                if self.last_good is not None else "no checkpoint was written"
            self.say(f"error: the loss became NaN or infinite at step {e.args[0]}; {kept}. "
                     f"Try a smaller --lr, or --precision fp32.", file=sys.stderr)
            leave(1, self)
        # images/s since training began, grids and checkpoints included; tqdm's own rate is
        # unset until its first redraw, which in a log file comes a minute in
        img_s = (step - self.step_at_begin) * self.cfg.batch_size / max(time.time() - self.t_start, 1e-9)
        self.bar.set_postfix(loss=f"{recent.mean().item():.4f}", img_s=f"{img_s:.0f}")
        self.bar.update(len(self.recent))
        self.recent, self.recent_from = [], step

    def end_epoch(self, epoch, step, p):
        """The per-epoch outputs: a loss.csv row and a grid of EMA samples."""
        by_t = (self.bin_loss_sums / self.bin_counts.clamp(min=1)).tolist()
        self.state["history"].append(dict(epoch=epoch, step=step, seconds=self.state["seconds"],
                                          mean_loss=self.loss_sum.item() / self.steps_per_epoch, loss_by_t=by_t))
        for total in (self.loss_sum, self.bin_loss_sums, self.bin_counts):
            total.zero_()
        if self.lead:
            write_loss_csv(self.state["history"], self.run_dir / "loss.csv", self.cfg.T)
            if self.cfg.grid_n:
                epoch_grid(p, self.cfg, self.run_dir / f"grid_epoch{epoch:03d}.png")

    def finish(self, step):
        self.bar.close()
        signal.signal(signal.SIGINT, self.old_sigint)
        if self.interrupted:
            self.say(f"interrupted: saved {self.ckpt_path} at step {step}; continue with\n"
                     f"  python ddpm_mnist.py train --run-dir {self.run_dir} --resume", file=sys.stderr)
            leave(130, self)
        self.say(f"saved {self.ckpt_path} at step {step} ({self.state['seconds']:.0f} s of training)"
                 + ("; continue with --resume" if step < self.total_steps else ""))
        leave(None, self)


# --- several processes: torchrun -------------------------------------------------------


def all_sum(x, run):
    """Sum x over the processes, in place (a no-op with one process)."""
    if run.world > 1:
        torch.distributed.all_reduce(x)
    return x


def leave(code, run):
    """End this process's part: close the process group (if any), then exit with code."""
    if run.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if code is not None:
        sys.exit(code)


def share_the_batch(p, cfg, run):
    """Wrap the model in DistributedDataParallel (it averages the gradients over the
    processes) and keep this process's slice of every batch (diffusion_loss's `part`)."""
    from torch.nn.parallel import DistributedDataParallel
    ids = [run.device.index] if run.device.type == "cuda" else None
    ddp = DistributedDataParallel(p.model, device_ids=ids)
    p.eps_model = eps_model_for_training(ddp, run.device, cfg, run.compile)
    share = cfg.batch_size // run.world
    p.part = slice(run.rank * share, (run.rank + 1) * share)


def torchrun_env():
    """(rank, local rank, world size, processes on this machine) as torchrun sets them;
    (0, 0, 1, 1) without it."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), world, int(env.get("LOCAL_WORLD_SIZE", world))


def start_processes(args, cfg):
    """Under torchrun: check what every process must agree on, then join the group.
    Returns (device, rank, world). Bad input fails in every process before any waiting."""
    rank, local_rank, world, local_world = torchrun_env()
    device = resolve_device(args.device)
    if world == 1:
        return device, 0, 1
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size}: must divide evenly over the {world} processes "
                        "(it is the global batch)")
    if device.type == "cuda":
        if torch.cuda.device_count() < local_world:
            raise UserError(f"--device {args.device}: {local_world} processes on this machine but "
                            f"{torch.cuda.device_count()} visible CUDA devices; one process per device")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--device {args.device}: several processes run on CUDA (nccl) or the CPU (gloo)")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0:             # one download, not one per process into the same folder
        load_data(cfg, args.data_dir)
    torch.distributed.barrier()
    return device, rank, world


# -----------------------------------------------------------------------------
# Precision: which autocast, by device. Part I's build() asks choose_precision.


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def choose_precision(device, precision="auto"):
    """(autocast dtype or None for fp32, why). Weights, optimizer state and EMA stay
    float32 whatever this says; only matmuls and convolutions run in lower precision."""
    if precision != "auto":
        return AMP_DTYPES[precision], f"--precision {precision}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cc = f"compute capability {major}.{minor}"
        if major >= 8:
            return torch.bfloat16, f"{cc} runs bf16 natively"
        if major == 7:   # V100, T4: bf16 is emulated there (slow); fp16 tensor cores are not
            return torch.float16, f"{cc} has fp16 tensor cores but only emulated bf16"
        return None, f"{cc} has no tensor cores"
    if device.type == "cpu":
        if cpu_has_bf16():
            return torch.bfloat16, "this CPU runs bf16 natively (AVX512-BF16 or AMX)"
        return None, "this CPU has no native bf16"
    return None, f"fp32 on {device.type} (autocast there not measured)"


def cpu_has_bf16():
    # a private oneDNN query: a CPU build without it (or one where it fails) runs fp32
    query = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:
        return False


def with_autocast(model, device, dtype):
    """model(x, t) with its matmuls and convs in `dtype` (None: as is, fp32), and a
    float32 result."""
    if dtype is None:
        return model

    def eps_model(*args):
        with torch.autocast(device.type, dtype=dtype):
            return model(*args).float()
    return eps_model


def set_fast_math(device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        # Shapes never change, so let cuDNN time its kernels once and keep the fastest. The
        # price: the chosen kernel may be non-deterministic, so on CUDA a resumed run matches
        # an uninterrupted one up to float rounding, not bitwise (bitwise on the CPU).
        torch.backends.cudnn.benchmark = True


def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; everything else follows this device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return torch.device(name)


# -----------------------------------------------------------------------------
# Sampling many: batches, one progress bar, and the three output formats.


@dataclass
class Sampler:
    """Which sampler, and how: what `sample`, `evaluate` and the pictures pass around."""
    name: str = "ddim"           # "ddpm": Alg. 2, all T steps; "ddim": `steps` jumps
    steps: int = DDIM_STEPS
    eta: float = 0.0
    clip_x0: bool = True

    def timesteps(self, T):
        """The indices t visited, in order."""
        return list(range(T - 1, -1, -1)) if self.name == "ddpm" else ddim_timesteps(T, self.steps)

    def __call__(self, eps_model, schedule, x_T, generator=None, on_step=None):
        if self.name == "ddpm":
            return ddpm_sample(eps_model, schedule, x_T, self.clip_x0, generator, on_step)
        return ddim_sample(eps_model, schedule, x_T, self.steps, self.eta, self.clip_x0, generator, on_step)


@dataclass
class Guidance:
    """Extension: what a conditional model is asked for: one label per sample and the scale
    s of guided()."""
    labels: torch.Tensor         # (N,) int64
    scale: float
    null_label: int              # the network's "no label", its num_classes

    def eps_model_for(self, eps_model, device, start=0, stop=None):
        """guided(eps_model) for samples start..stop: what the samplers call."""
        return guided(eps_model, self.labels[start:stop].to(device), self.scale, self.null_label)


def generate(eps_model, schedule, sampler, shape, seed=0, batch_size=256, guidance=None):
    """shape[0] samples as uint8 (N, H, W), made in batches. x_T comes from a CPU generator,
    so the same seed gives the same starting noise on every device. `guidance`: labels and
    scale for a conditional model."""
    n, device = shape[0], schedule.betas.device
    g_noise = torch.Generator().manual_seed(seed)
    g_step = torch.Generator(device).manual_seed(seed + 1)     # DDPM's and DDIM(eta>0)'s z
    steps = len(sampler.timesteps(schedule.T))
    out = []
    with progress_bar(total=math.ceil(n / batch_size) * steps, desc=f"{sampler.name} x{n}", unit="step",
                      leave=False) as bar:
        for start in range(0, n, batch_size):
            x_T = torch.randn(min(batch_size, n - start), *shape[1:], generator=g_noise).to(device)
            stop = start + len(x_T)
            model = eps_model if guidance is None else guidance.eps_model_for(eps_model, device, start, stop)
            x0 = sampler(model, schedule, x_T, g_step, on_step=lambda *_: bar.update())
            out.append(to_uint8(x0).cpu())
    return torch.cat(out)


def grid_columns(n):
    """Samples per row of a `sample` grid: a square-ish picture."""
    return max(1, round(math.sqrt(n)))


def write_samples(images, out, fmt, labels=None):
    """png: one square-ish grid to look at; npz: exact uint8 arrays to measure (and the
    labels asked for, from a conditional model); png-dir: one file per sample, the input
    standard FID tools expect."""
    if fmt == "png":
        save_png(grid_image(images, nrow=grid_columns(len(images))), out)
    elif fmt == "npz":
        arrays = dict(images=images.numpy()) if labels is None else dict(images=images.numpy(), labels=labels.numpy())
        atomic_write(out, lambda f: np.savez_compressed(f, **arrays))
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            save_png(to_image(im), Path(out) / f"{i:06d}.png")


def read_labels(path, n):
    """Extension: the labels a conditional model was asked for, if the .npz holds them
    (`sample --format npz` writes them), else None."""
    with np.load(path, allow_pickle=False) as z:
        if "labels" not in z.files:
            return None
        y = z["labels"]
    if y.shape != (n,) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise UserError(f"--samples {path}: its labels are {y.dtype} {tuple(y.shape)}; need (N,) integers "
                        f"0..{NUM_CLASSES - 1}, one per image")
    return torch.from_numpy(y.astype(np.int64))


def read_samples(path):
    """uint8 (N, 28, 28) from an .npz with an 'images' array; one clear line if it is not."""
    try:
        with np.load(path, allow_pickle=False) as z:
            a = z["images"] if "images" in z.files else z[z.files[0]]
    except Exception as e:
        raise UserError(f"--samples {path}: not a readable .npz ({type(e).__name__})") from None
    H, W = IMAGE_SHAPES["mnist"][1:]
    if a.ndim != 3 or a.shape[1:] != (H, W) or a.dtype != np.uint8 or len(a) < 2:
        raise UserError(f"--samples {path}: holds {a.dtype} {tuple(a.shape)}; need uint8 (N, {H}, {W}) with N >= 2")
    return torch.from_numpy(a.copy())


# -----------------------------------------------------------------------------
# Evaluation: are the samples digits, all ten of them, and not copies?
#
# A small CNN classifier, trained once on MNIST and cached, serves three purposes: its
# predictions give the class histogram and the share of confident samples, and its
# penultimate features are the space for a Frechet distance (FID) that, unlike Inception
# FID, was trained on digits. FIDs from different feature extractors are not comparable,
# so every number printed says which extractor, reference set and N it used.


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.body = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2),          # 28 -> 14
                                  *block(32, 64), *block(64, 64), nn.MaxPool2d(2),         # 14 -> 7
                                  nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def features(self, x):          # (B, 1, 28, 28) in [-1, 1] -> (B, 128), the FID space
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


CLASSIFIER_EPOCHS = 3
CLASSIFIER_BATCH = 128
SHIFT = 2                        # the classifier's augmentation: random shifts of up to 2 px


def train_classifier(data_dir, device, seed=0, epochs=CLASSIFIER_EPOCHS):
    """Adam with a one-cycle schedule and random shifts: >99% test accuracy in 3 epochs.
    The shifts matter: generated digits are not centred as carefully as MNIST's."""
    images, labels = load_mnist(data_dir, train=True)
    images, labels = images.to(device), labels.to(device)
    torch.manual_seed(seed)
    clf = Classifier().to(device)
    steps = epochs * (len(images) // CLASSIFIER_BATCH)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    clf.train()
    H, W = images.shape[1:]
    for epoch in range(epochs):
        for idx in epoch_batches(len(images), CLASSIFIER_BATCH, seed, epoch).to(device):
            x = F.pad(to_model_range(images[idx]), (SHIFT,) * 4, value=-1.0)   # (B, 1, H + 4, W + 4)
            dx, dy = torch.randint(0, 2 * SHIFT + 1, (2,)).tolist()             # one shift per batch
            loss = F.cross_entropy(clf(x[:, :, dy:dy + H, dx:dx + W]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def classify(clf, images_uint8, device, batch_size=1000):
    """uint8 (N, 28, 28) -> (features (N, 128) float64, softmax probabilities (N, 10))."""
    feats, probs = [], []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[start:start + batch_size].to(device))
        f = clf.features(x)
        feats.append(f.double().cpu())
        probs.append(F.softmax(clf.head(f), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


def gaussian_fit(feats):
    """Mean and covariance of (N, D) features, float64."""
    return feats.mean(0), torch.cov(feats.T)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric
    matrix, so a symmetric eigensolver suffices and no complex sqrtm is needed.
    """
    def sqrt_psd(m):
        w, v = torch.linalg.eigh(m)
        return (v * w.clamp(min=0).sqrt()) @ v.T
    s1 = sqrt_psd(sigma1.double())
    tr_covmean = torch.linalg.eigvalsh(s1 @ sigma2.double() @ s1).clamp(min=0).sqrt().sum()
    d = (mu1 - mu2).double()
    return float(d @ d + sigma1.double().trace() + sigma2.double().trace() - 2 * tr_covmean)


def class_stats(probs, confident=0.9):
    """Class histogram of the argmax, shares of the rarest and commonest class, and the
    share of samples whose top probability is at least `confident`."""
    counts = torch.bincount(probs.argmax(1), minlength=10)
    shares = counts.double() / len(probs)
    return dict(class_counts=counts.tolist(), rarest_share=float(shares.min()),
                commonest_share=float(shares.max()),
                confident_share=float((probs.max(1).values >= confident).double().mean()))


def nearest_distances(queries_uint8, ref_uint8, device):
    """Per query, the L2 distance (pixels in [0, 1]) to its nearest image in ref."""
    ref = ref_uint8.to(device).flatten(1).float() / 255
    out = []
    for q in queries_uint8.split(500):
        d = torch.cdist(q.to(device).flatten(1).float() / 255, ref)    # (500, N_ref)
        out.append(d.min(1).values.cpu())
    return torch.cat(out)


def load_cache_file(path, flag):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable file ({type(e).__name__}); delete it to rebuild it") from None


def classifier_cache(path, data_dir, device):
    """The cached classifier with its test accuracy and the test set's feature statistics;
    trained and written on first use."""
    path = Path(path)
    if path.exists():
        c = load_cache_file(path, "--classifier")
        clf = Classifier()
        clf.load_state_dict(c["model"])
        return clf.to(device).eval().requires_grad_(False), c
    print(f"training the evaluation classifier (once; cached in {path})")
    clf = train_classifier(data_dir, device)
    test_x, test_y = load_mnist(data_dir, train=False)
    feats, probs = classify(clf, test_x, device)
    mu, sigma = gaussian_fit(feats)
    c = dict(model=clf.state_dict(), test_accuracy=float((probs.argmax(1) == test_y).double().mean()),
             test_mu=mu, test_sigma=sigma, n_test=len(test_x))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(c, f))
    return clf.to(device), c


def fid_floor(clf, cache, train_images, n, device, seed=0):
    """FID of n real training images: the floor any model is measured against."""
    idx = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
    feats, _ = classify(clf, train_images[idx], device)
    return frechet_distance(*gaussian_fit(feats), cache["test_mu"], cache["test_sigma"])


def memorization(samples, train_images, test_images, device, n=1000):
    """Nearest-training-image distance of samples against that of real test digits, which
    the model never saw: copies of the training set would sit far below the real ones."""
    d_samples = nearest_distances(samples[:n], train_images, device)
    d_real = nearest_distances(test_images[:n], train_images, device)
    p1 = float(d_real.quantile(0.01))
    return dict(n_memo=len(d_samples), nn_dist_samples_median=float(d_samples.median()),
                nn_dist_real_test_median=float(d_real.median()), real_test_p01=p1,
                share_closer_than_real_p01=float((d_samples < p1).double().mean()))


def class_accuracy(probs, labels):
    """Extension, conditional models: the share of samples the classifier assigns to the
    digit they were asked for, overall and per digit."""
    hit = (probs.argmax(1) == labels).double()
    return dict(class_accuracy=float(hit.mean()),      # None for a digit no sample asked for
                class_accuracy_per_digit=[float(hit[labels == d].mean()) if (labels == d).any() else None
                                          for d in range(NUM_CLASSES)])


def same_digit_distance(images, labels):
    """Extension, conditional models: the mean L2 distance (pixels in [0, 1]) between two
    samples asked for the same digit: how varied one digit's samples are."""
    x = images.flatten(1).double() / 255
    return float(torch.stack([torch.pdist(x[labels == d]).mean() for d in labels.unique()
                              if (labels == d).sum() > 1]).mean())


def evaluate_samples(samples, clf, cache, data_dir, device, seed=0, labels=None):
    """Everything `evaluate` reports, for uint8 samples (N, 28, 28), and with the labels a
    conditional model was asked for, its class accuracy."""
    train_x, _ = load_mnist(data_dir, train=True)
    test_x, _ = load_mnist(data_dir, train=False)
    feats, probs = classify(clf, samples, device)
    n = len(samples)
    return dict(
        feature_extractor="ddpm_mnist Classifier, penultimate layer (128-d)",
        classifier_test_accuracy=cache["test_accuracy"],
        fid_reference=f"MNIST test set ({cache['n_test']} images)",
        n=n,
        fid=frechet_distance(*gaussian_fit(feats), cache["test_mu"], cache["test_sigma"]),
        fid_real_train=fid_floor(clf, cache, train_x, n, device, seed),
        **class_stats(probs),
        **memorization(samples, train_x, test_x, device),
        **(class_accuracy(probs, labels) if labels is not None else {}))




# -----------------------------------------------------------------------------
# Pictures that teach: the forward process, the denoising trajectory, interpolation,
# DDPM against DDIM, and training progress. All are grids of image cells with labels.
# Every t printed on a picture is the paper's t (1..T, 0 for the clean image).


def labeled_grid(cells, row_labels=(), col_labels=(), scale=2, pad=GRID_PAD):
    """cells: uint8 (R, C, H, W) or (R, C, H, W, 3) -> a PIL image, labels left of rows and
    under columns."""
    R, C, H, W = cells.shape[:4]
    mode, white = ("RGB", (255, 255, 255)) if cells.dim() == 5 else ("L", 255)
    sh, sw = H * scale, W * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left = int(max((measure.textlength(str(l), font=font) for l in row_labels), default=0)) + 8 if row_labels else 0
    lines = max((str(l).count("\n") + 1 for l in col_labels), default=0)
    line_h = 13                  # the default font's line height, in pixels
    img = Image.new(mode, (left + pad + C * (sw + pad), pad + R * (sh + pad) + line_h * lines + (4 if lines else 0)), white)
    draw = ImageDraw.Draw(img)
    for r in range(R):
        for c in range(C):
            tile = to_image(cells[r, c]).resize((sw, sh), Image.NEAREST)
            img.paste(tile, (left + pad + c * (sw + pad), pad + r * (sh + pad)))
        if row_labels:
            draw.text((4, pad + r * (sh + pad) + sh // 2 - 6), str(row_labels[r]), fill=0, font=font)
    for c, label in enumerate(col_labels):
        draw.multiline_text((left + pad + c * (sw + pad) + 2, pad + R * (sh + pad) + 2), str(label),
                            fill=0, font=font, spacing=2)
    return img


FORWARD_T = (1, 50, 100, 200, 400, 600, 800, 1000)   # the paper's t: index t - 1


def forward_picture(images_uint8, schedule, ts=FORWARD_T, seed=0):
    """Step 2 made visible: each digit a row, noised in closed form (Eq. 4) at each paper
    t. Under each column: t and sqrt(alpha_bar_t), the weight of the digit left in x_t."""
    x0 = to_model_range(images_uint8)                                       # (R, 1, 28, 28)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cols = [to_uint8(schedule.q_sample(x0, t_batch(x0, t - 1), noise)) for t in ts]   # C x (R, 28, 28)
    labels = [f"t={t}\nsignal {schedule.sqrt_alphas_cumprod[t - 1]:.3f}" for t in ts]
    return labeled_grid(torch.stack(cols, dim=1), col_labels=labels, scale=3)


SCHEDULE_COLORS = {"linear": (31, 119, 180), "cosine": (230, 120, 20)}


def line_plot(curves, title, size=(380, 240), margin=(46, 26, 14, 34)):
    """A line chart drawn with Pillow: curves {name: (xs, ys)}, axes with ticks, a legend.
    margin is (left, top, right, bottom) in pixels, room for the tick labels and title."""
    W, H = size
    ml, mt, mr, mb = margin
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs_all = [x for xs, _ in curves.values() for x in xs]
    ys_all = [y for _, ys in curves.values() for y in ys]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    px = lambda x: ml + (x - x0) / (x1 - x0) * (W - ml - mr)
    py = lambda y: H - mb - (y - y0) / (y1 - y0) * (H - mt - mb)
    d.rectangle([ml, mt, W - mr, H - mb], outline=(0, 0, 0))
    for v in nice_ticks(y0, y1):
        d.line([ml - 4, py(v), ml, py(v)], fill=(0, 0, 0))
        d.text((2, py(v) - 6), f"{v:g}", fill=(0, 0, 0))
    for v in nice_ticks(x0, x1):
        d.line([px(v), H - mb, px(v), H - mb + 4], fill=(0, 0, 0))
        d.text((px(v) - 10, H - mb + 6), f"{v:g}", fill=(0, 0, 0))
    d.text((ml, 6), title, fill=(0, 0, 0))
    d.text(((W + ml) // 2 - 4, H - 14), "t", fill=(0, 0, 0))
    for k, (name, (xs, ys)) in enumerate(curves.items()):
        d.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=SCHEDULE_COLORS.get(name, (0, 0, 0)), width=2)
        lx, ly = W - mr - 90, mt + 8 + 14 * k                        # the legend, top right
        d.line([lx, ly + 6, lx + 16, ly + 6], fill=SCHEDULE_COLORS.get(name, (0, 0, 0)), width=2)
        d.text((lx + 20, ly), name, fill=(0, 0, 0))
    return img


def nice_ticks(lo, hi, n=5):
    """About n round tick values between lo and hi: steps of 1, 2 or 5 times a power of 10."""
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def schedule_picture(images_uint8, schedules, seed=0):
    """The schedules side by side: sqrt(alpha_bar_t) (how much digit is left) and
    log SNR_t = log(alpha_bar_t / (1 - alpha_bar_t)) against the paper's t, and below
    them the same digits noised under each schedule at the same t (one strip each)."""
    t = list(range(1, schedules["linear"].T + 1))
    signal = {k: (t, s.sqrt_alphas_cumprod.tolist()) for k, s in schedules.items()}
    log_snr = {k: (t, (-2 * s.sqrt_recipm1_alphas_cumprod.double().log()).tolist()) for k, s in schedules.items()}
    plots = [line_plot(signal, "sqrt(alpha_bar_t): the digit left in x_t"),
             line_plot(log_snr, "log SNR_t = log(alpha_bar_t / (1 - alpha_bar_t))")]
    strips = [(k, forward_picture(images_uint8, s, seed=seed).convert("RGB")) for k, s in schedules.items()]
    W = max(sum(p.width for p in plots), max(s.width for _, s in strips))
    label_h = 16
    H = plots[0].height + sum(s.height + label_h for _, s in strips)
    img = Image.new("RGB", (W, H), "white")
    img.paste(plots[0], (0, 0))
    img.paste(plots[1], (plots[0].width, 0))
    y, d = plots[0].height, ImageDraw.Draw(img)
    for name, strip in strips:
        d.text((4, y + 2), f"{name} schedule: the same digits and noise (Eq. 4)", fill=SCHEDULE_COLORS[name])
        img.paste(strip, (0, y + label_h))
        y += strip.height + label_h
    return img


def frame_indices(num_steps, max_frames=50):
    """Which sampler iterations become GIF frames: all of them up to 50, else 50 spread
    evenly, always including the last."""
    k = min(num_steps, max_frames)
    return sorted({round(i * (num_steps - 1) / max(k - 1, 1)) for i in range(k)})


def paper_t_after(ts, i):
    """The paper's t of the state a sampler holds after its i-th step: the step from index
    ts[i] lands on index ts[i + 1], which is the paper's ts[i + 1] + 1, or on x_0 at the end."""
    return ts[i + 1] + 1 if i + 1 < len(ts) else 0


def denoising_gif(eps_model, schedule, x_T, sampler, generator):
    """Frames of x_t (left) beside the model's current guess of x_0 (right), per step."""
    ts = sampler.timesteps(schedule.T)
    keep = set(frame_indices(len(ts)))
    nrow = grid_columns(len(x_T))
    frames = []

    def on_step(i, x, x0):
        if i in keep:
            frames.append(gif_frame(to_uint8(x).cpu(), to_uint8(x0).cpu(), paper_t_after(ts, i), nrow))

    sampler(eps_model, schedule, x_T, generator, on_step)
    return frames


def gif_frame(x_t, x0, t, nrow):
    """Two grids side by side with a caption: the noisy state and the predicted x_0."""
    left, right = grid_image(x_t, nrow), grid_image(x0, nrow)
    w, h = left.size
    caption_h, gap = 16, 12
    img = Image.new(left.mode, (2 * w + gap, h + caption_h), "white")
    img.paste(left, (0, caption_h))
    img.paste(right, (w + gap, caption_h))
    draw = ImageDraw.Draw(img)
    draw.text((2, 2), f"x_t, t={t}", fill=0)
    draw.text((w + gap + 2, 2), "predicted x_0", fill=0)
    return img


def save_gif(frames, path, ms=80, hold_ms=1500):
    """Each frame `ms` long; the last one held so the finished digits can be seen."""
    durations = [ms] * (len(frames) - 1) + [hold_ms]
    atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                duration=durations, loop=0, optimize=False))


def slerp(z0, z1, alpha):
    """Spherical interpolation. Gaussian noise in 784 dimensions lies near a sphere of
    radius 28; a straight line between two such points passes well inside it (norm ~20 at
    the middle), noise the model never saw, while slerp stays on the sphere."""
    cos = (z0 * z1).sum() / (z0.norm() * z1.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def interpolation_noise(rows, cols, seed, shape=IMAGE_SHAPES["mnist"]):
    """(rows * cols, C, H, W): each row slerps from one random x_T to another."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 2, *shape, generator=g)
    alphas = torch.linspace(0, 1, cols)
    return torch.stack([slerp(z[r, 0], z[r, 1], a) for r in range(rows) for a in alphas])


def progress_picture(run_dir, epochs, n=8):
    """The first n samples of the chosen per-epoch grids, one row per epoch. A row has as
    many samples as the narrowest grid holds, so a run with a small --grid-n still works."""
    found = {int(m[1]): p for p in Path(run_dir).glob("grid_epoch*.png") if (m := re.fullmatch(r"grid_epoch(\d+)\.png", p.name))}
    have = sorted(found)
    # a short run shows every epoch; a long one the chosen ones and always its last
    chosen = have if len(have) <= 6 else sorted({e for e in epochs if e in found} | {have[-1]})
    cfg_file = Path(run_dir) / "config.json"
    cfg = config_from_dict(json.loads(cfg_file.read_text())) if cfg_file.exists() else Config()
    C, H, W = image_shape(cfg)
    grids = [torch.from_numpy(np.array(Image.open(found[e]).convert("L" if C == 1 else "RGB"))) for e in chosen]
    n = min([n] + [(g.shape[1] - GRID_PAD) // (W + GRID_PAD) for g in grids])
    cell = lambda g, c: g[GRID_PAD:GRID_PAD + H, GRID_PAD + c * (W + GRID_PAD): GRID_PAD + c * (W + GRID_PAD) + W]
    rows = [torch.stack([cell(g, c) for c in range(n)]) for g in grids]
    return labeled_grid(torch.stack(rows), row_labels=[f"epoch {e}" for e in chosen]), chosen


# -----------------------------------------------------------------------------
# bench: what a step costs, measured honestly (synchronized clocks, after a warm-up).


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Wall-clock seconds of fn(), with the GPU's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def forward_flops(model, shape, device):
    """Forward FLOPs per image, counted by torch.utils.flop_counter (convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, *shape, device=device)
    with FlopCounterMode(display=False) as fc:
        model(x, torch.zeros(2, dtype=torch.long, device=device))
    return fc.get_total_flops() / 2


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process, in MB


BENCH_WARMUP_STEPS = 3           # the first steps pay for allocation, cuDNN's search and compile
MNIST_TRAIN_IMAGES = 60_000
CIFAR10_TRAIN_IMAGES = 50_000
DDPM_CIFAR10_STEPS = 800_000      # the DDPM paper's CIFAR-10 training, at batch 128


class RecomputedSchedule(NoiseSchedule):
    """For `bench --recompute-schedule` only: Eq. 4 with alpha_bar_t rebuilt from the betas
    at every call (a cumulative product of 1 - beta on the device, in float32), to measure
    what the case study's precomputed buffers save."""

    def q_sample(self, x0, t, noise):
        alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)
        return extract(alpha_bar.sqrt(), t, x0) * x0 + extract((1.0 - alpha_bar).sqrt(), t, x0) * noise


def bench(cfg, device, batch_size, reps=5, compile=False, recompute_schedule=False):
    set_fast_math(device)
    torch.manual_seed(0)
    cfg = replace(cfg, batch_size=batch_size)
    p = build(cfg, device, compile)
    if recompute_schedule:
        p.schedule = RecomputedSchedule(cfg.T, cfg.beta_1, cfg.beta_T, cfg.schedule).to(device)
        print("schedule: alpha_bar recomputed from the betas in every training step (--recompute-schedule)")
    shape = image_shape(cfg)
    gflop = forward_flops(p.model, shape, device) / 1e9
    x0 = torch.rand(batch_size, *shape, device=device) * 2 - 1      # stand-in images: the cost is the same
    gen = torch.Generator(device).manual_seed(0)
    print(f"UNet: {count_params(p.model):,} parameters, channels {cfg.channels}; {gflop:.3f} GFLOP forward per image")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    dtype, why = choose_precision(device, cfg.precision)
    print(f"device {device} ({card}), {precision_name(dtype)} ({why}), batch {batch_size}, torch {torch.__version__}")
    t_warm = timed(lambda: [train_step(p, x0, gen, 0, cfg) for _ in range(BENCH_WARMUP_STEPS)], device)
    phases = {"forward+loss": [], "backward": [], "optimizer": [], "ema": []}
    for _ in range(reps):
        box = {}
        phases["forward+loss"].append(timed(lambda: box.update(loss=diffusion_loss(p.eps_model, p.schedule, x0, gen)[0]),
                                            device))
        p.opt.zero_grad(set_to_none=True)
        phases["backward"].append(timed(lambda: box["loss"].backward(), device))
        phases["optimizer"].append(timed(p.opt.step, device))
        phases["ema"].append(timed(lambda: ema_update(list(p.ema.parameters()), list(p.model.parameters()),
                                                      cfg.ema_decay), device))
    step_s = timed(lambda: [train_step(p, x0, gen, 0, cfg) for _ in range(reps)], device) / reps
    med = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
    paper = PRESETS["paper"]
    paper_images = paper.epochs * (MNIST_TRAIN_IMAGES // paper.batch_size) * paper.batch_size
    print(f"warm-up ({BENCH_WARMUP_STEPS} steps{', compile' if compile else ''}): {t_warm:.1f} s")
    print("train step, ms: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in med.items())
          + f"; whole step {1e3 * step_s:.1f}")
    print(f"train throughput: {batch_size / step_s:,.0f} images/s; {3 * gflop * batch_size / step_s / 1e3:.2f} TFLOP/s "
          f"achieved (3 x forward FLOPs)" + (f"; one {paper.epochs}-epoch MNIST recipe = "
                                              f"{paper_images / (batch_size / step_s) / 60:.1f} min"
                                              if cfg.dataset == "mnist" else ""))
    if cfg.dataset == "cifar10":
        steps = cfg.epochs * (CIFAR10_TRAIN_IMAGES // cfg.batch_size)
        print(f"CIFAR-10 at this speed: the preset's {cfg.epochs} epochs ({steps:,} steps of {cfg.batch_size}) = "
              f"{steps * step_s / 3600:.1f} h; the DDPM paper's {DDPM_CIFAR10_STEPS:,} steps = "
              f"{DDPM_CIFAR10_STEPS * step_s / 3600:.1f} h")
    bench_sampling(with_autocast(p.ema, device, dtype), p.schedule, (batch_size, *shape))
    print(f"peak memory: {peak_memory_mb(device):,.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")


def bench_sampling(eps_model, schedule, shape):
    device = schedule.betas.device
    x_T = torch.randn(*shape, device=device)
    ddim_sample(eps_model, schedule, x_T, steps=2)                      # warm-up
    if device.type == "cuda":
        ddim_s = timed(lambda: ddim_sample(eps_model, schedule, x_T, steps=DDIM_STEPS), device)
        ddpm_s = timed(lambda: ddpm_sample(eps_model, schedule, x_T), device)
        how = "measured"
    else:  # 1000 steps take minutes on a CPU: time a few and extrapolate
        k = 5
        per_step = timed(lambda: ddim_sample(eps_model, schedule, x_T, steps=k), device) / k
        ddim_s, ddpm_s, how = DDIM_STEPS * per_step, schedule.T * per_step, f"extrapolated from {k} timed steps"
    print(f"sampling, batch {shape[0]}: DDIM-{DDIM_STEPS} {ddim_s:.2f} s, DDPM-{schedule.T} {ddpm_s:.2f} s ({how})")


# -----------------------------------------------------------------------------
# Command line. Every check that can fail does so here, before any slow work starts.


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not a usage block), exit code 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# argparse types: each turns a bad value into one line naming what is allowed, which the
# Parser above prints with the flag's name. Checking here, at parse time, is what lets a
# bad flag fail before any model is built or any file is touched.


def int_in(lo, hi=None):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{s}' is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}..{hi if hi is not None else 'inf'}")
        return v
    return parse


def float_over(lo, strict):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{s}' is not a number") from None
        if not math.isfinite(v) or v < lo or (strict and v == lo):     # "nan" parses as a float
            raise argparse.ArgumentTypeError(f"{s} must be {'>' if strict else '>='} {lo}")
        return v
    return parse


def decay_arg(s):
    v = float_over(0, strict=False)(s)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"{s} must be below 1 (0.9999 averages ~10k steps)")
    return v


def prob_arg(s):
    v = float_over(0, strict=False)(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{s} must be a probability, 0..1")
    return v


def class_arg(s):
    if s == "all":
        return s
    if not s.isdigit() or int(s) >= NUM_CLASSES:
        raise argparse.ArgumentTypeError(f"'{s}' is not a class: need 0..{NUM_CLASSES - 1} or all")
    return int(s)


def scales_arg(s):
    """A comma-separated list of guidance scales, each >= 0."""
    return [float_over(0, strict=False)(v) for v in s.split(",")]


def channels_arg(s):
    try:
        ch = tuple(int(c) for c in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of integers") from None
    try:
        check_channels(ch)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return ch


def device_arg(s):
    if s in ("auto", "cpu", "cuda", "mps") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"'{s}' is not one of auto, cpu, cuda, cuda:N, mps")


def check_out(flag, path, folder=False):
    """The output must go to an existing, writable folder, and must not be a folder
    itself (or, for folder outputs, must be a new or empty folder)."""
    p = Path(path)
    parent = p.parent
    if folder:
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise UserError(f"{flag} {path}: exists and is not an empty folder; pick a new folder")
    elif p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {parent} does not exist")
    # Try a real write: os.access can say yes where creating a file still fails (root in
    # /proc, some network mounts), and finding out after an hour of sampling loses the hour.
    try:
        with open(parent / f".ddpm_write_test.{os.getpid()}", "wb"):
            pass
        os.unlink(parent / f".ddpm_write_test.{os.getpid()}")
    except OSError:
        raise UserError(f"{flag} {path}: the folder {parent} is not writable") from None


def check_run_dir(path):
    """A run folder may not exist yet (train makes it and its parents), but the nearest
    folder that does exist must be writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"--run-dir {path}: is a file, not a folder")
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not os.access(existing, os.W_OK) or not existing.is_dir():
        raise UserError(f"--run-dir {path}: {existing} is not a writable folder")


DEFAULTS = Config()
TRAIN_FLAGS = ("epochs", "batch_size", "lr", "channels", "ema_decay", "seed", "precision", "grid_n",
               "schedule", "lr_schedule", "warmup_steps", "min_snr_gamma", "dataset", "time_embedding")


def preset_default(name):
    """'(default: paper X, cpu Y)' for a Config field, so no help text states a default
    that a preset overrides."""
    show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    values = {preset: show(getattr(cfg, name)) for preset, cfg in PRESETS.items()}
    if len(set(values.values())) == 1:
        return f"(default: {values['paper']})"
    return "(default: " + ", ".join(f"{v} with --preset {k}" for k, v in values.items()) + ")"


# One declaration per shared flag, so its help reads the same in every subcommand.

def add_device(p):
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)")


def add_seed(p, what="the starting noise"):
    p.add_argument("--seed", type=int_in(0), default=0, help=f"seed of {what} (default: 0)")


def add_data_dir(p):
    p.add_argument("--data-dir", default="data",
                   help="folder holding MNIST/raw (or cifar-10-batches-py); downloaded there if missing "
                        "(default: data)")


def add_precision(p, default="auto"):
    p.add_argument("--precision", choices=("auto", *AMP_DTYPES), default=default,
                   help="auto: bf16 autocast where the device runs it natively (CUDA 8.0+, AVX512-BF16 "
                        "CPUs), fp16 with a gradient scaler on CUDA 7.x, else fp32 (default: auto)")


def add_ckpt(p):
    p.add_argument("--ckpt", help=f"checkpoint to load (default: {DEFAULT_CKPT}, or the committed "
                                  "samples/ema_fp16.pt until you have trained)")


def add_sampler_args(p):
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim",
                   help="ddpm: all T ancestral steps; ddim: --steps jumps (default: ddim)")
    p.add_argument("--steps", type=int_in(1, DEFAULTS.T),
                   help=f"DDIM steps, 1..{DEFAULTS.T} (default: {DDIM_STEPS}; DDPM always takes all {DEFAULTS.T})")
    p.add_argument("--eta", type=float_over(0, strict=False), default=0.0,
                   help="DDIM noise: 0 deterministic, 1 like DDPM (default: 0)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")


def add_guidance(p):
    """Extension, for class-conditional checkpoints (train --cond)."""
    p.add_argument("--class", dest="digit", type=class_arg,
                   help="conditional models: the digit to draw, 0..9, or all: one digit per row (default: all)")
    p.add_argument("--guidance", type=float_over(0, strict=False),
                   help="conditional models: guidance scale s; 0 ignores the class, 1 is the plain conditional "
                        f"model, larger draws the class more surely and less varied (default: {DEFAULT_GUIDANCE})")


def add_weights(p):
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="the EMA weights or the raw trained ones (default: ema)")


def add_eval_args(p):
    add_data_dir(p)
    p.add_argument("--classifier", default="runs/mnist_classifier.pt",
                   help="cached classifier, trained here on first use (default: runs/mnist_classifier.pt)")
    add_seed(p)


def add_train_parser(sub):
    p = sub.add_parser("train", help="train a DDPM on MNIST (Alg. 1)",
                       description="Train the U-Net; writes ckpt.pt, config.json, loss.csv and per-epoch "
                                   "EMA sample grids into --run-dir. Defaults come from --preset.")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="paper: the case study's recipe; cpu: a 4x cheaper network and a short run for "
                        "a laptop CPU; cifar10: the DDPM paper's CIFAR-10 model (default: paper)")
    p.add_argument("--dataset", choices=tuple(IMAGE_SHAPES),
                   help=f"images to learn; the network follows their channels and size {preset_default('dataset')}")
    p.add_argument("--epochs", type=int_in(1), help=f"passes over the training images {preset_default('epochs')}")
    p.add_argument("--batch-size", type=int_in(1), help=f"images per step {preset_default('batch_size')}")
    p.add_argument("--lr", type=float_over(0, strict=True), help=f"AdamW learning rate {preset_default('lr')}")
    p.add_argument("--channels", type=channels_arg,
                   help=f"widths of the 4 levels, multiples of 8 {preset_default('channels')}")
    p.add_argument("--ema-decay", type=decay_arg, help=f"EMA decay, below 1 {preset_default('ema_decay')}")
    p.add_argument("--seed", type=int_in(0), help=f"seed for init, data order and noise {preset_default('seed')}")
    add_precision(p, default=None)
    p.add_argument("--grid-n", type=int_in(0), help=f"EMA samples in each epoch's grid, 0 for none "
                                                    f"{preset_default('grid_n')}")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"noise schedule {preset_default('schedule')}")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help=f"constant, or warm-up then cosine decay to 0 {preset_default('lr_schedule')}")
    p.add_argument("--warmup-steps", type=int_in(0), help=f"linear lr warm-up steps {preset_default('warmup_steps')}")
    p.add_argument("--min-snr-gamma", type=float_over(0, strict=False),
                   help=f"min-SNR loss weighting, 0 for plain MSE {preset_default('min_snr_gamma')}")
    p.add_argument("--time-embedding", choices=TIME_EMBEDDINGS,
                   help="what the network is told of t: sinusoidal (the case study), learned (a table, one "
                        f"vector per integer t) or scalar (t/T) {preset_default('time_embedding')}")
    p.add_argument("--cond", action="store_true",
                   help="extension: a class-conditional model, for sample --class and --guidance")
    p.add_argument("--p-uncond", type=prob_arg,
                   help=f"with --cond: share of labels dropped to 'no label', 0..1 (default: {DEFAULTS.p_uncond})")
    add_data_dir(p)
    p.add_argument("--run-dir", default="runs/ddpm", help="where the run's files go (default: runs/ddpm)")
    add_device(p)
    p.add_argument("--max-steps", type=int_in(1), help="stop after this many steps in all, with a checkpoint")
    p.add_argument("--max-minutes", type=float_over(0, strict=True), help="stop after this many minutes, with a checkpoint")
    p.add_argument("--ckpt-every", type=int_in(0), default=0,
                   help="also checkpoint every N steps, so a kill loses at most N (default: 0, every epoch only)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt, exactly")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that has a checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slower start, faster steps)")
    p.set_defaults(func=cmd_train)


def add_sample_parser(sub):
    p = sub.add_parser("sample", help="draw digits with DDPM or DDIM (Alg. 2, DDIM Eq. 12)",
                       description="Sample from a checkpoint's EMA weights into a PNG grid, an .npz, "
                                   "a folder of PNGs, or a denoising GIF.")
    add_device(p)
    add_ckpt(p)
    add_precision(p)
    add_sampler_args(p)
    p.add_argument("--n", type=int_in(1), default=64, help="number of samples (default: 64)")
    p.add_argument("--batch-size", type=int_in(1), default=256, help="samples per batch (default: 256)")
    p.add_argument("--format", choices=("png", "npz", "png-dir"), default="png",
                   help="png: one grid; npz: uint8 array 'images', (N, 28, 28) for MNIST or (N, 32, 32, 3) "
                        "for CIFAR-10; png-dir: one PNG per sample, for pytorch-fid or clean-fid (default: png)")
    p.add_argument("--gif", action="store_true",
                   help="write an animated GIF of x_t beside the predicted x_0 at every step instead")
    p.add_argument("--out", help="output path (default: samples/<sampler>_<steps>.png, .npz, .gif or folder)")
    add_weights(p)
    add_guidance(p)
    add_seed(p)
    p.set_defaults(func=cmd_sample)


def add_evaluate_parser(sub):
    p = sub.add_parser("evaluate", help="FID, digit classes and memorization of samples",
                       description="Score N samples (generated, or read from --samples) with a cached MNIST "
                                   "classifier; prints a table and writes a JSON report.")
    add_device(p)
    add_ckpt(p)
    add_precision(p)
    add_sampler_args(p)
    add_eval_args(p)
    p.add_argument("--n", type=int_in(2), default=10000, help="samples to generate and score (default: 10000)")
    p.add_argument("--batch-size", type=int_in(1), default=500, help="samples per batch (default: 500)")
    p.add_argument("--samples", help="score this .npz (uint8 'images', (N, 28, 28)) instead of sampling")
    add_weights(p)
    p.add_argument("--guidance", type=float_over(0, strict=False),
                   help=f"conditional models: guidance scale s; adds class accuracy (default: {DEFAULT_GUIDANCE})")
    p.add_argument("--out", help="report path (default: evaluate.json beside --samples, else beside the "
                                 "checkpoint, or in the current folder for the committed weights)")
    p.set_defaults(func=cmd_evaluate)


def add_compare_parser(sub):
    p = sub.add_parser("compare", help="DDPM-1000 against DDIM at 10-100 steps, same noise",
                       description="From one starting noise: DDPM (all T steps), DDIM eta=0 at 10, 20, 50, "
                                   "100 steps and DDIM eta=1 at 50; a table and a picture.")
    add_device(p)
    add_ckpt(p)
    add_precision(p)
    add_eval_args(p)
    p.add_argument("--n", type=int_in(2), default=1000, help="samples per sampler (default: 1000)")
    p.add_argument("--batch-size", type=int_in(1), default=500, help="samples per batch (default: 500)")
    add_weights(p)
    p.add_argument("--guidance", type=scales_arg,
                   help="conditional models: compare these guidance scales (DDIM-50) instead of the samplers, "
                        "e.g. 0,1,2,3,5,8; the picture is then one row per digit, one column per scale")
    p.add_argument("--out", help="picture path (default: samples/compare.png, or samples/guidance.png "
                                 "with --guidance)")
    p.set_defaults(func=cmd_compare)


def add_bench_parser(sub):
    p = sub.add_parser("bench", help="time a training step and the samplers",
                       description="Train-step time by phase, images/s, FLOPs and TFLOP/s, sampling time "
                                   "for a batch, peak memory.")
    add_device(p)
    add_precision(p)
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper", help="network to time (default: paper)")
    p.add_argument("--channels", type=channels_arg, help="widths of the 4 levels (default: the preset's)")
    p.add_argument("--batch-size", type=int_in(1), default=128, help="images per step (default: 128)")
    p.add_argument("--reps", type=int_in(1), default=5, help="timed repetitions (default: 5)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--recompute-schedule", action="store_true",
                   help="rebuild alpha_bar from the betas in every training step instead of reading the "
                        "precomputed buffers, to time what they save")
    p.set_defaults(func=cmd_bench)


def add_forward_parser(sub):
    p = sub.add_parser("forward", help="picture: real digits noised at t = 1 .. 1000 (Step 2)")
    add_data_dir(p)
    p.add_argument("--n", type=int_in(1, 16), default=4, help="digits, one per row (default: 4)")
    add_seed(p, "the choice of digits and the noise")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear", help="noise schedule (default: linear)")
    p.add_argument("--out", default="samples/forward.png", help="picture path (default: samples/forward.png)")
    p.set_defaults(func=cmd_forward)


def add_schedule_parser(sub):
    p = sub.add_parser("schedule", help="picture: the linear and cosine schedules, curves and noised digits")
    add_data_dir(p)
    p.add_argument("--n", type=int_in(1, 16), default=2, help="digits, one row each per schedule (default: 2)")
    add_seed(p, "the choice of digits and the noise")
    p.add_argument("--out", default="samples/schedule.png", help="picture path (default: samples/schedule.png)")
    p.set_defaults(func=cmd_schedule)


def add_interpolate_parser(sub):
    p = sub.add_parser("interpolate", help="picture: DDIM from slerped noises morphs one digit into another")
    add_device(p)
    add_ckpt(p)
    add_precision(p)
    p.add_argument("--rows", type=int_in(1, 16), default=4, help="pairs of noises (default: 4)")
    p.add_argument("--cols", type=int_in(2, 32), default=10, help="steps from one to the other (default: 10)")
    p.add_argument("--steps", type=int_in(1, DEFAULTS.T), default=DDIM_STEPS, help=f"DDIM steps (default: {DDIM_STEPS})")
    add_guidance(p)
    add_seed(p, "the noises")
    p.add_argument("--out", default="samples/interpolate.png", help="picture path (default: samples/interpolate.png)")
    p.set_defaults(func=cmd_interpolate)


def add_progress_parser(sub):
    p = sub.add_parser("progress", help="picture: a run's per-epoch EMA grids, one row per epoch")
    p.add_argument("--run-dir", default="runs/ddpm", help="run folder with grid_epochNNN.png (default: runs/ddpm)")
    p.add_argument("--epochs", default="1,5,10,20,30,50",
                   help="epochs to show when the run has more than 6 grids (fewer: all of them), plus always "
                        "the last (default: 1,5,10,20,30,50)")
    p.add_argument("--n", type=int_in(1, 8), default=8,
                   help="samples per row, at most what the grids hold (default: 8)")
    p.add_argument("--out", default="samples/progress.png", help="picture path (default: samples/progress.png)")
    p.set_defaults(func=cmd_progress)


def add_export_parser(sub):
    p = sub.add_parser("export", help="a checkpoint's EMA weights alone, in fp16: a small file to share",
                       description="Write the EMA weights in float16 with the config, nothing else (no "
                                   "optimizer, no raw weights): a quarter of the checkpoint's size. Every "
                                   "command that takes --ckpt reads it.")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help=f"checkpoint to export (default: {DEFAULT_CKPT})")
    p.add_argument("--out", default="samples/ema_fp16.pt", help="file to write (default: samples/ema_fp16.pt)")
    p.set_defaults(func=cmd_export)


def build_parser():
    ap = Parser(prog="ddpm_mnist.py", description=__doc__.split("\n\n")[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_train_parser, add_sample_parser, add_evaluate_parser, add_compare_parser,
                add_bench_parser, add_forward_parser, add_schedule_parser, add_interpolate_parser,
                add_progress_parser, add_export_parser):
        add(sub)
    return ap


# --- subcommands --------------------------------------------------------------
# Each checks everything it can before slow work starts or any file is written.


def train_config(args):
    """The preset, overlaid with the flags given; on --resume, the checkpoint's config.
    Returns the config and the checkpoint to resume from (read once, here)."""
    # Train flags default to None, so "given" means typed on the command line: a preset's
    # value is only overridden by what the user asked for.
    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.p_uncond is not None and not args.cond:
        raise UserError(f"--p-uncond {args.p_uncond}: only with --cond (it drops labels of a class-conditional model)")
    if args.cond:
        given.update(num_classes=NUM_CLASSES, **({"p_uncond": args.p_uncond} if args.p_uncond is not None else {}))
    ckpt_path = Path(args.run_dir) / "ckpt.pt"
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: choose one")
    if args.resume:
        if not ckpt_path.exists():
            raise UserError(f"--resume: there is no {ckpt_path} to resume from")
        ckpt = load_checkpoint(ckpt_path, "--resume")
        check_resumable(ckpt, ckpt_path)
        saved = config_from_dict(ckpt["config"])
        if args.cond != bool(saved.num_classes):
            raise UserError(f"--cond: {ckpt_path} is an unconditional run; a resumed run keeps its config" if args.cond
                            else f"--resume: {ckpt_path} is a class-conditional run; add --cond to resume it")
        # a resumed run must be the same run: a changed lr or width would silently make a
        # different model from the same checkpoint; only its length may grow
        for k, v in given.items():
            if k != "epochs" and v != getattr(saved, k):
                raise UserError(f"--{k.replace('_', '-')} {v}: differs from the checkpoint's {getattr(saved, k)}; "
                                "a resumed run keeps its config (only --epochs may change)")
        return replace(saved, **{k: v for k, v in given.items() if k == "epochs"}), ckpt
    if ckpt_path.exists() and not args.overwrite:
        raise UserError(f"--run-dir {args.run_dir}: already holds a checkpoint; add --resume to continue it "
                        "or --overwrite to start over")
    return replace(PRESETS[args.preset], **given), None


def cmd_train(args):
    cfg, ckpt = train_config(args)
    check_run_dir(args.run_dir)
    device, rank, world = start_processes(args, cfg)
    set_fast_math(device)
    torch.manual_seed(cfg.seed)                              # the initial weights, the same in every process
    train(cfg, Run(args.run_dir, device, data_dir=args.data_dir, ckpt=ckpt, max_steps=args.max_steps,
                   max_minutes=args.max_minutes, ckpt_every=args.ckpt_every, compile=args.compile,
                   rank=rank, world=world))


def sampler_from_args(args, T):
    """The Sampler the flags ask for; DDPM takes all T steps and has no eta."""
    if args.sampler == "ddpm":
        if args.steps not in (None, T):
            raise UserError(f"--steps {args.steps}: DDPM always takes all T={T} steps; use --sampler ddim for fewer")
        if args.eta:
            raise UserError("--eta: only DDIM has eta; DDPM's noise is fixed by the posterior variance")
        return Sampler("ddpm", T, 0.0, not args.no_clip)
    return Sampler("ddim", DDIM_STEPS if args.steps is None else args.steps, args.eta, not args.no_clip)


def load_for_sampling(args, ckpt_path):
    """The checks every sampling command shares, then the model, ready to call, on its device."""
    device = resolve_device(args.device)
    model, cfg = model_from_checkpoint(load_checkpoint(ckpt_path), getattr(args, "weights", "ema"))
    eps_model = with_autocast(model.to(device), device, choose_precision(device, args.precision)[0])
    return eps_model, make_schedule(cfg).to(device), cfg


def guidance_from_args(args, cfg, n, ncol):
    """Extension: the labels and scale a conditional model samples with (--class, --guidance),
    laid out ncol to a row; None for an unconditional model, which has no label to ask for."""
    digit, s = getattr(args, "digit", None), args.guidance
    if not cfg.num_classes:
        if digit is not None or s is not None:
            flag = "--class" if digit is not None else "--guidance"
            raise UserError(f"{flag}: this checkpoint is unconditional (trained without --cond); {flag} needs a "
                            "class-conditional model")
        return None
    labels = digit_rows(n, ncol, cfg.num_classes) if digit in (None, "all") else torch.full((n,), digit)
    return Guidance(labels, DEFAULT_GUIDANCE if s is None else s, cfg.num_classes)


def guidance_note(guidance):
    return "" if guidance is None else f", guidance {guidance.scale:g}"


def cmd_sample(args):
    if args.gif and args.format != "png":
        raise UserError("--gif: writes a GIF; leave --format at png")
    sampler = sampler_from_args(args, DEFAULTS.T)
    # the output is checked before the model loads: a wrong suffix or folder is caught at once
    ext = ".gif" if args.gif else {"png": ".png", "npz": ".npz", "png-dir": ""}[args.format]
    out = args.out or f"samples/{sampler.name}_{sampler.steps}{ext}"
    if ext and Path(out).suffix.lower() != ext:
        raise UserError(f"--out {out}: with {'--gif' if args.gif else '--format ' + args.format} the file must end in {ext}")
    check_out("--out", out, folder=args.format == "png-dir")
    eps_model, schedule, cfg = load_for_sampling(args, checkpoint_to_sample(args.ckpt))
    device, t0 = schedule.betas.device, time.time()
    if args.gif:  # the same seeds as generate(), so a GIF ends on the grid `sample` would draw
        guide = guidance_from_args(args, cfg, args.n, grid_columns(args.n))
        if guide:
            eps_model = guide.eps_model_for(eps_model, device)
        x_T = torch.randn(args.n, *image_shape(cfg), generator=torch.Generator().manual_seed(args.seed)).to(device)
        frames = denoising_gif(eps_model, schedule, x_T, sampler, torch.Generator(device).manual_seed(args.seed + 1))
        save_gif(frames, out)
        print(f"wrote {out}: {len(frames)} frames, {sampler.name} {sampler.steps} steps{guidance_note(guide)}, "
              f"{time.time() - t0:.1f} s")
        return
    guide = guidance_from_args(args, cfg, args.n, grid_columns(args.n))
    images = generate(eps_model, schedule, sampler, (args.n, *image_shape(cfg)), args.seed, args.batch_size, guide)
    dt = time.time() - t0
    write_samples(images, out, args.format, guide.labels if guide else None)
    print(f"wrote {out}: {args.n} samples, {sampler.name} {sampler.steps} steps{guidance_note(guide)}, {dt:.1f} s "
          f"on {device} ({1e3 * dt / args.n:.1f} ms per sample)")


def report_table(r):
    counts = " ".join(f"{d}:{c}" for d, c in enumerate(r["class_counts"]))
    lines = [
        f"{'samples':28} {r['n']}",
        f"{'FID (classifier features)':28} {r['fid']:.3f}   vs {r['fid_reference']}, N={r['n']}",
        f"{'FID of real train images':28} {r['fid_real_train']:.3f}   (the floor: N={r['n']} real digits)",
        f"{'feature extractor':28} {r['feature_extractor']}, test accuracy {100 * r['classifier_test_accuracy']:.2f}%",
        f"{'confident (p >= 0.9)':28} {100 * r['confident_share']:.2f}%",
        f"{'rarest / commonest class':28} {100 * r['rarest_share']:.1f}% / {100 * r['commonest_share']:.1f}%",
        f"{'class counts':28} {counts}",
        f"{'nearest-train distance':28} samples {r['nn_dist_samples_median']:.3f}, real test digits "
        f"{r['nn_dist_real_test_median']:.3f} (median L2, pixels in [0, 1], N={r['n_memo']})",
        f"{'closer than 99% of real':28} {100 * r['share_closer_than_real_p01']:.1f}% of samples "
        f"(copies would show here)"]
    if "class_accuracy" in r:                # a conditional model's samples, with the labels asked for
        how = f", guidance {r['guidance']:g}" if "guidance" in r else ""
        per_digit = " ".join(f"{d}:{'-' if a is None else f'{100 * a:.0f}%'}"
                             for d, a in enumerate(r["class_accuracy_per_digit"]))
        lines += [f"{'class accuracy':28} {100 * r['class_accuracy']:.2f}% of samples are the digit asked for{how}",
                  f"{'  per digit':28} {per_digit}"]
    return "\n".join(lines)


def evaluate_out(args, ckpt_path):
    """Where the report goes: --out, else beside what was scored. The committed weights'
    folder is the project's, so their report goes to the current folder instead."""
    if args.out:
        return Path(args.out)
    if args.samples:
        return Path(args.samples).with_name("evaluate.json")
    return Path("evaluate.json") if ckpt_path.resolve() == SHIPPED_CKPT else ckpt_path.with_name("evaluate.json")


def only_digits(cfg, ckpt_path):
    """evaluate and compare measure with an MNIST digit classifier; say so for other data."""
    if cfg.dataset != "mnist":
        raise UserError(f"--ckpt {ckpt_path}: a {cfg.dataset} model, and evaluate/compare score digits with an MNIST "
                        "classifier; for CIFAR-10 write PNGs (sample --format png-dir --n 50000) and use pytorch-fid "
                        "or clean-fid against the CIFAR-10 training set, as the DDPM paper measured")


def cmd_evaluate(args):
    sampler = sampler_from_args(args, DEFAULTS.T)
    ckpt_path = None if args.samples else checkpoint_to_sample(args.ckpt)
    out = evaluate_out(args, ckpt_path)
    check_out("--out", out)
    device = resolve_device(args.device)
    if args.samples:
        if args.guidance is not None or args.weights != "ema":
            raise UserError(f"{'--guidance' if args.guidance is not None else '--weights'}: with --samples nothing is "
                            "sampled; leave it out")
        samples = read_samples(args.samples)
        labels = read_labels(args.samples, len(samples))
        source = dict(samples_from=f"read from {args.samples}", samples_file=str(args.samples))
    else:
        eps_model, schedule, cfg = load_for_sampling(args, ckpt_path)
        only_digits(cfg, ckpt_path)
        guide = guidance_from_args(args, cfg, args.n, 1)       # conditional: digits 0-9 in turn
        load_mnist(args.data_dir, train=True)                 # fail now, not after sampling
        t0 = time.time()
        samples = generate(eps_model, schedule, sampler, (args.n, *image_shape(cfg)), args.seed, args.batch_size,
                           guide)
        labels = guide.labels if guide else None
        source = dict(samples_from=f"{sampler.name} {sampler.steps} steps, eta {sampler.eta}{guidance_note(guide)}, "
                                   f"{args.weights} weights, {time.time() - t0:.0f} s on {device}",
                      ckpt=str(ckpt_path), **({"guidance": guide.scale} if guide else {}))
    clf, cache = classifier_cache(args.classifier, args.data_dir, device)
    r = evaluate_samples(samples, clf, cache, args.data_dir, device, args.seed, labels)
    r.update(source)
    print(report_table(r))
    save_text(json.dumps(r, indent=2) + "\n", out)
    print(f"wrote {out}")


COMPARE = (("DDPM 1000", Sampler("ddpm", 1000)), ("DDIM 10", Sampler("ddim", 10)),
           ("DDIM 20", Sampler("ddim", 20)), ("DDIM 50", Sampler("ddim", 50)),
           ("DDIM 100", Sampler("ddim", 100)), ("DDIM 50, eta 1", Sampler("ddim", 50, eta=1.0)))


def cmd_compare(args):
    out = args.out or ("samples/guidance.png" if args.guidance else "samples/compare.png")
    check_out("--out", out)
    ckpt_path = checkpoint_to_sample(args.ckpt)
    eps_model, schedule, cfg = load_for_sampling(args, ckpt_path)
    only_digits(cfg, ckpt_path)
    if args.guidance and not cfg.num_classes:
        raise UserError("--guidance: this checkpoint is unconditional (trained without --cond), so it has no "
                        "guidance to compare")
    if args.guidance and args.n < 2 * cfg.num_classes:
        raise UserError(f"--n {args.n}: comparing guidance needs at least two samples of each of the "
                        f"{cfg.num_classes} classes, --n {2 * cfg.num_classes} or more")
    device = schedule.betas.device
    clf, cache = classifier_cache(args.classifier, args.data_dir, device)
    if args.guidance:
        return compare_guidance(args, eps_model, schedule, cfg, clf, cache, out)
    # a conditional model is compared at the default guidance, asked for digits 0-9 in turn
    guide = Guidance(digit_rows(args.n, 1, cfg.num_classes), DEFAULT_GUIDANCE, cfg.num_classes) \
        if cfg.num_classes else None
    rows, firsts = [], []
    for name, sampler in COMPARE:
        t0 = time.time()
        images = generate(eps_model, schedule, sampler, (args.n, *image_shape(cfg)), args.seed, args.batch_size,
                          guide)
        dt = time.time() - t0
        feats, probs = classify(clf, images, device)
        rows.append(dict(sampler=name, fid=frechet_distance(*gaussian_fit(feats), cache["test_mu"], cache["test_sigma"]),
                         ms_per_sample=1e3 * dt / args.n, **class_stats(probs)))
        firsts.append(images[:10])
    print(f"N={args.n} per sampler, seed {args.seed}, same x_T for all{guidance_note(guide)}; "
          "FID in classifier features vs MNIST test")
    print(f"{'sampler':16} {'FID':>8} {'confident':>9} {'rarest':>7} {'ms/sample':>10}")
    for r in rows:
        print(f"{r['sampler']:16} {r['fid']:8.3f} {100 * r['confident_share']:8.1f}% {100 * r['rarest_share']:6.1f}% "
              f"{r['ms_per_sample']:10.2f}")
    save_png(labeled_grid(torch.stack(firsts), row_labels=[r["sampler"] for r in rows]), out)
    print(f"wrote {out}")


def compare_guidance(args, eps_model, schedule, cfg, clf, cache, out):
    """Extension: the classifier-free guidance trade-off. The same x_T and labels (digits
    0-9 in turn) at every scale; per scale FID, class accuracy, confident share, and the
    spread of each digit's samples. The picture: one row per digit, one column per scale."""
    labels = digit_rows(args.n, 1, cfg.num_classes)
    rows, firsts = [], []
    for s in args.guidance:
        images = generate(eps_model, schedule, Sampler(), (args.n, *image_shape(cfg)), args.seed, args.batch_size,
                          Guidance(labels, s, cfg.num_classes))
        feats, probs = classify(clf, images, device=schedule.betas.device)
        rows.append(dict(guidance=s, fid=frechet_distance(*gaussian_fit(feats), cache["test_mu"], cache["test_sigma"]),
                         **class_accuracy(probs, labels), **class_stats(probs),
                         same_digit_distance=same_digit_distance(images, labels)))
        firsts.append(images[:cfg.num_classes])                        # digits 0-9, the same x_T at every scale
    print(f"N={args.n} per scale (digits 0-9 in turn), seed {args.seed}, DDIM-{DDIM_STEPS}, same x_T and labels "
          "for all; FID in classifier features vs MNIST test; spread: mean distance between two samples of a digit")
    print(f"{'guidance':>8} {'FID':>8} {'class acc':>9} {'confident':>9} {'spread':>7}")
    for r in rows:
        print(f"{r['guidance']:8g} {r['fid']:8.3f} {100 * r['class_accuracy']:8.1f}% {100 * r['confident_share']:8.1f}% "
              f"{r['same_digit_distance']:7.3f}")
    cells = torch.stack(firsts, dim=1)                                  # (digits, scales, H, W)
    save_png(labeled_grid(cells, row_labels=range(cfg.num_classes), col_labels=[f"s={s:g}" for s in args.guidance]), out)
    print(f"wrote {out}")


def cmd_bench(args):
    cfg = PRESETS[args.preset]
    cfg = replace(cfg, precision=args.precision, **({"channels": args.channels} if args.channels else {}))
    bench(cfg, resolve_device(args.device), args.batch_size, args.reps, args.compile, args.recompute_schedule)


def some_digits(args):
    """--n training digits picked by --seed."""
    images, _ = load_mnist(args.data_dir, train=True)
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:args.n]]


def cmd_forward(args):
    check_out("--out", args.out)
    schedule = make_schedule(replace(DEFAULTS, schedule=args.schedule))
    save_png(forward_picture(some_digits(args), schedule, seed=args.seed), args.out)
    print(f"wrote {args.out}: {args.n} digits at t = {', '.join(map(str, FORWARD_T))}, {args.schedule} schedule")


def cmd_schedule(args):
    check_out("--out", args.out)
    schedules = {k: make_schedule(replace(DEFAULTS, schedule=k)) for k in SCHEDULES}
    save_png(schedule_picture(some_digits(args), schedules, seed=args.seed), args.out)
    print(f"wrote {args.out}: {', '.join(SCHEDULES)}; {args.n} digits at t = {', '.join(map(str, FORWARD_T))}")


def cmd_interpolate(args):
    check_out("--out", args.out)
    eps_model, schedule, cfg = load_for_sampling(args, checkpoint_to_sample(args.ckpt))
    x_T = interpolation_noise(args.rows, args.cols, args.seed, image_shape(cfg)).to(schedule.betas.device)
    guide = guidance_from_args(args, cfg, args.rows * args.cols, args.cols)     # conditional: a digit per row
    if guide:
        eps_model = guide.eps_model_for(eps_model, x_T.device)
    x0 = ddim_sample(eps_model, schedule, x_T, steps=args.steps)        # eta = 0: a function of x_T
    cells = to_uint8(x0).cpu().unflatten(0, (args.rows, args.cols))          # (rows, cols, H, W[, 3])
    save_png(labeled_grid(cells), args.out)
    print(f"wrote {args.out}: {args.rows} rows of {args.cols}, DDIM {args.steps} steps")


def cmd_progress(args):
    try:
        epochs = [int(e) for e in args.epochs.split(",")]
    except ValueError:
        raise UserError(f"--epochs {args.epochs}: need a comma-separated list of integers") from None
    if not list(Path(args.run_dir).glob("grid_epoch*.png")):
        raise UserError(f"--run-dir {args.run_dir}: holds no grid_epochNNN.png (train writes one per epoch)")
    check_out("--out", args.out)
    img, chosen = progress_picture(args.run_dir, epochs, args.n)
    save_png(img, args.out)
    print(f"wrote {args.out}: epochs {', '.join(map(str, chosen))}")


def cmd_export(args):
    out = Path(args.out)
    if out.suffix != ".pt":
        raise UserError(f"--out {out}: must end in .pt")
    # an export holds no optimizer state: written over its own checkpoint, training could
    # never resume, so that one path is refused
    if out.exists() and out.resolve() == Path(args.ckpt).resolve():
        raise UserError(f"--out {out}: is the --ckpt itself; writing over it would lose the training state")
    check_out("--out", out)
    model, cfg = model_from_checkpoint(load_checkpoint(args.ckpt))   # checks the weights fit the config
    # fp16 keeps 11 bits of mantissa; the weights of a trained net lie far inside its range
    ema = {k: v.half() for k, v in model.state_dict().items()}
    atomic_write(out, lambda f: torch.save({"ema": ema, "config": asdict(cfg)}, f))
    print(f"wrote {out}: {count_params(model):,} EMA weights in fp16, {out.stat().st_size / 1e6:.1f} MB")


def main(argv=None):
    """Parse, run the subcommand, and turn every UserError into one line and exit code 2:
    bad input never shows a traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
