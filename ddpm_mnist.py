"""
ddpm_mnist.py: a Denoising Diffusion Probabilistic Model, from scratch, on MNIST.

A DDPM learns to make images by learning to undo noise: a fixed forward process adds
Gaussian noise over T steps until a digit is pure noise, a U-Net learns to predict that
noise, and sampling removes predicted noise step by step, from pure noise to a new digit.

    DDPM: Ho, Jain, Abbeel 2020, https://arxiv.org/abs/2006.11239  (Eq. and Alg. below)
    DDIM: Song, Meng, Ermon 2020, https://arxiv.org/abs/2010.02502 (DDIM Eq. below)

Three parts, each using only those above it: Part I, the case study's DDPM (Steps 1-5),
runs on its own; Part II adds the extensions; Part III is the tool (`--help`). README.md
has a reading path through Part I with its equations, and exercises.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# PART I: THE DDPM
# =============================================================================

# -----------------------------------------------------------------------------
# The case study's recipe in one place; every checkpoint stores it.

@dataclass
class Config:
    # Step 1: the noise schedule (DDPM Sec. 4)
    T: int = 1000                # diffusion steps
    beta_1: float = 1e-4         # noise added at the first step: almost none
    beta_T: float = 0.02         # at the last; by then x_T is close to N(0, I)
    # Step 3: the U-Net
    channels: tuple = (64, 128, 256, 256)  # widths of the 28, 14, 7 and 3 px levels
    num_res_blocks: int = 2      # residual blocks per level
    # Step 4: training
    lr: float = 2e-4             # AdamW learning rate
    weight_decay: float = 1e-4   # AdamW's decoupled weight decay
    batch_size: int = 128
    epochs: int = 50             # 50 x 468 steps = 23,400
    ema_decay: float = 0.9999    # sampling uses an average over the last ~10k steps' weights
    seed: int = 0                # the initial weights, the data order, every t and eps

# -----------------------------------------------------------------------------
# Steps 1 and 2: the noise schedule, and the forward process in closed form.
#
# The forward process adds a little Gaussian noise at each step,
#     q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),
# and since Gaussians compose, x_t can be drawn from x_0 in one jump (Eq. 4):
#     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I),
#     alpha_bar_t = (1 - beta_1) (1 - beta_2) ... (1 - beta_t).
# sqrt(alpha_bar_t) is how much of the digit is left in x_t: 1.0 at t = 1, 0.006 at t = T.
#
# Timestep convention, used everywhere below: an index t in 0..T-1 is the paper's timestep
# t+1. So betas[0] is the paper's beta_1, alphas_cumprod[T-1] is alpha_bar_T, and
# alphas_cumprod_prev[0] = 1 stands for alpha_bar_0 (no noise at all).

def extract(a, t, x):
    """Pick a[t] per batch element and shape it to broadcast over x: (B,) -> (B, 1, 1, 1)."""
    return a[t].view(-1, *([1] * (x.dim() - 1)))

def linear_betas(T, beta_1, beta_T):
    """beta_1 .. beta_T rising in a straight line, in float64 (DDPM Sec. 4)."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)

class NoiseSchedule(nn.Module):
    """The betas and all that derives from them, computed once (Key Lesson 1) in float64
    (1 - alpha_bar_t loses its digits in float32 near t = 0), stored as float32 buffers
    named as in the original DDPM code, which `.to(device)` moves."""

    def __init__(self, T=1000, beta_1=1e-4, beta_T=0.02, make_betas=linear_betas):
        super().__init__()
        self.T = T
        f32 = lambda v: v.to(torch.float32)
        betas = make_betas(T, beta_1, beta_T)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)                          # alpha_bar_t
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)   # alpha_bar_{t-1}
        self.register_buffer("betas", f32(betas))
        self.register_buffer("alphas", f32(alphas))
        self.register_buffer("alphas_cumprod", f32(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", f32(alphas_cumprod_prev))
        # for q(x_t | x_0) (Eq. 4) and for recovering x_0 from x_t and eps (Step 5)
        self.register_buffer("sqrt_alphas_cumprod", f32(alphas_cumprod.sqrt()))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", f32((1.0 - alphas_cumprod).sqrt()))
        self.register_buffer("sqrt_recip_alphas_cumprod", f32((1.0 / alphas_cumprod).sqrt()))
        self.register_buffer("sqrt_recipm1_alphas_cumprod",
                             f32((1.0 / alphas_cumprod - 1.0).sqrt()))
        # Eq. 6-7: the posterior q(x_{t-1} | x_t, x_0), the distribution of the step before x_t
        # given x_t and the clean x_0, is N(coef1 x_0 + coef2 x_t, beta_tilde_t I); Step 5 uses it
        self.register_buffer("posterior_variance",                         # beta_tilde_t
                             f32(betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef1",
                             f32(betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2",
                             f32((1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod)))
        assert self.alphas_cumprod_prev[0] == 1.0 and self.posterior_variance[0] == 0.0, \
            "index 0 must be the paper's t = 1, whose posterior is the data itself"

    def q_sample(self, x0, t, noise):
        """Step 2, Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, any t at once."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + \
            extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

# -----------------------------------------------------------------------------
# Step 3: the U-Net that predicts the noise, eps_theta(x_t, t).
#
#   x_t (B, 1, 28, 28)                                               eps_theta (B, 1, 28, 28)
#    | stem: 3x3 conv                                                  ^ GroupNorm, SiLU, 3x3 conv
#   28 px,  64 ch: 2 ResBlocks -------------- skip ---------------> cat, 2 ResBlocks
#    | down: 3x3 conv, stride 2                                        ^ up: resize, 3x3 conv
#   14 px, 128 ch: 2 ResBlocks ---------- skip ----------> cat, 2 ResBlocks
#    | down                                                   ^ up
#    7 px, 256 ch: 2 ResBlocks ----- skip -----> cat, 2 ResBlocks
#    | down                                        ^ up
#    3 px, 256 ch: 2 ResBlocks, the bottom of the U
#   t (B,) -> sinusoidal (B, 64) -> 2-layer MLP (B, 256): added inside every ResBlock
# Deep levels see the whole digit; the skips hand the decoder the detail seen on the way down.

GROUPS = 8                       # GroupNorm groups, so every width must divide by 8

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim), as in the Transformer: nearby
    t get nearby vectors, a smooth noise level, not 1000 unrelated classes (Key Lesson 3)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]                        # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)               # (B, dim)

class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, the time embedding added in between; plus the input."""

    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(GROUPS, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(t_emb)[:, :, None, None]                    # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h

class Downsample(nn.Module):
    """A 3x3 stride-2 conv. Padding 1 on even sizes (28 -> 14 -> 7), none on odd ones,
    so 7 -> 3 exactly and the three windows (rows 0-2, 2-4, 4-6) still see every pixel."""

    def __init__(self, c, size):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1 if size % 2 == 0 else 0)

    def forward(self, x):
        return self.conv(x)

class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip's size (not x2: so 3 -> 7), then a 3x3 conv."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))

class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W) images and (B,) integer timesteps -> (B, C, H, W).
    One skip per level (the original keeps one per block): 11.6M parameters, the case
    study's "about 10 million". No attention: at 7 and 3 px a conv sees the whole digit."""

    def __init__(self, channels=(64, 128, 256, 256), num_res_blocks=2, in_channels=1, size=28):
        super().__init__()
        c0, t_dim = channels[0], 4 * channels[0]
        self.c0 = c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, t_dim), nn.SiLU(),
                                      nn.Linear(t_dim, t_dim), nn.SiLU())
        self.stem = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.sizes = [size]                                             # 28, 14, 7, 3
        self.enc, self.down = nn.ModuleList(), nn.ModuleList()
        c_prev = c0
        for i, c in enumerate(channels):
            self.enc.append(nn.ModuleList([
                self.res_block(c_prev if j == 0 else c, c, t_dim, self.sizes[i])
                for j in range(num_res_blocks)]))
            if i < len(channels) - 1:
                self.down.append(Downsample(c, self.sizes[i]))
                pad = 1 if self.sizes[i] % 2 == 0 else 0                # as Downsample pads
                self.sizes.append((self.sizes[i] + 2 * pad - 3) // 2 + 1)
            c_prev = c
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):                    # 7, 14, 28 px
            c = channels[i]
            self.up.append(Upsample(channels[i + 1], c))
            self.dec.append(nn.ModuleList([
                self.res_block(2 * c if j == 0 else c, c, t_dim, self.sizes[i])
                for j in range(num_res_blocks)]))
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, c0), nn.SiLU(),
                                 nn.Conv2d(c0, in_channels, 3, padding=1))

    def res_block(self, c_in, c_out, t_dim, size):
        """The block of every level; Part II's CIFAR-10 network adds to it at some sizes."""
        return ResBlock(c_in, c_out, t_dim)

    def forward(self, x, t):
        t_emb = self.time_mlp(timestep_embedding(t, self.c0))            # (B,) -> (B, 4*c0)
        return self.unet(x, t_emb)

    def unet(self, x, t_emb):
        """Down the U and back up, every block told the noise level by t_emb."""
        h = self.stem(x)                                                # (B, c0, 28, 28)
        skips = []
        for i, blocks in enumerate(self.enc):
            for block in blocks:
                h = block(h, t_emb)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)                                     # 28 -> 14 -> 7 -> 3
        for up, blocks in zip(self.up, self.dec):
            skip = skips.pop()
            h = torch.cat([up(h, skip.shape[-2:]), skip], dim=1)        # (B, 2c, H, W), H 7, 14, 28
            for block in blocks:
                h = block(h, t_emb)
        return self.out(h)

# -----------------------------------------------------------------------------
# Step 4a: EMA of the weights.
#
# Sampling uses an exponential moving average of the weights, which averages out the noise
# of the last steps: "critical" for clean samples (Key Lesson 2). At decay 0.9999 it spans
# ~10k steps, so without a warm-up the random initial weights would still weigh e^-2.3 =
# 10% at the end of a 23k-step run; decay_n = min(decay, (1 + n) / (10 + n)) prevents that.

def ema_decay_at(n, decay):
    return min(decay, (1 + n) / (10 + n))

@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * theta, for every tensor in one fused call."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)

# -----------------------------------------------------------------------------
# Step 4b: data. MNIST is 47 MB as uint8, so it lives on the device and a batch is an index
# into it: no DataLoader workers, no per-image Python on the hot path.

def load_mnist(data_dir, train=True):
    """(N, 28, 28) uint8 images and (N,) labels, via torchvision (downloads if missing)."""
    from torchvision.datasets import MNIST          # here: a second of start-up that sample skips
    ds = MNIST(data_dir, train=train, download=True)
    return ds.data, ds.targets

def epoch_batches(n, batch_size, seed, epoch):
    """The index batches of one epoch, (n // batch_size, batch_size), a function of (seed,
    epoch) so a resumed run replays it; the partial last batch is dropped (shapes stay fixed)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2 ** 64)   # any seed fits
    perm = torch.randperm(n, generator=g)
    return perm[: n // batch_size * batch_size].view(-1, batch_size)

def to_model_range(images_uint8):
    """uint8 (B, H, W) grey or (B, H, W, 3) colour in 0..255 -> float (B, C, H, W) in [-1, 1]:
    centred at 0 on the scale of the noise eps it is mixed with, and the range x_0 is clipped to."""
    x = images_uint8.unsqueeze(1) if images_uint8.dim() == 3 else images_uint8.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0

def to_uint8(x):
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, H, W) or (B, H, W, 3), rounding to nearest."""
    u = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.squeeze(1) if u.shape[1] == 1 else u.permute(0, 2, 3, 1)

# -----------------------------------------------------------------------------
# Step 4c: training, Alg. 1.
#
#     repeat: x_0 ~ data, t ~ Uniform({1..T}), eps ~ N(0, I)
#             gradient step on || eps - eps_theta(x_t, t) ||^2,
#             x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps    (Eq. 4)
#
# Why predict the noise? The true objective, a bound on -log p(x_0), sums over t the KL
# divergence between the posterior q(x_{t-1} | x_t, x_0) and the network's step: a squared
# distance between two means, which written with eps is || eps - eps_theta ||^2 times a
# weight of t alone (Eq. 12). DDPM drops the weight (Eq. 14, L_simple): every t counts
# alike, the target has unit variance at every noise level, and the samples came out better.

@dataclass
class Batch:
    """One step's draws, Alg. 1 lines 2-4."""
    x0: torch.Tensor             # (B, C, H, W) images in [-1, 1]
    t: torch.Tensor              # (B,) indices 0..T-1, the paper's 1..T
    eps: torch.Tensor            # (B, C, H, W) ~ N(0, I)

def draw_batch(x0, T, generator):
    """A timestep and a noise for each image: Alg. 1, lines 3 and 4."""
    t = torch.randint(0, T, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    return Batch(x0, t, eps)

def diffusion_loss(eps_model, schedule, b):
    """Alg. 1, line 5: L_simple, and each image's squared error (B,) for whoever keeps a log."""
    x_t = schedule.q_sample(b.x0, b.t, b.eps)                           # Eq. 4
    err = (b.eps - eps_model(x_t, b.t)).pow(2).mean(dim=(1, 2, 3))      # (B,)
    return err.mean(), err

@dataclass
class Parts:
    """What training works on, made by build()."""
    schedule: NoiseSchedule      # the buffers of Steps 1-2
    model: nn.Module             # theta, trained by AdamW
    ema: nn.Module               # the average of theta that sampling uses
    opt: torch.optim.Optimizer
    gen: torch.Generator         # draws every t and eps: a run is its seed
    eps_model: nn.Module         # what the loss calls: the model (Part III may wrap it)

def build(cfg, model, schedule, device):
    """The model, its EMA copy, AdamW and the generator on `device` (seed torch first)."""
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    return Parts(schedule.to(device), model, ema, opt, gen, model)

def train(cfg, data, p, start=0, on_step=None, draw=None, loss_fn=diffusion_loss):
    """Alg. 1 as one flat loop, cfg.epochs passes over `data` (uint8 images on the device).
    Part II may pass its own draw (labels, flips) and loss_fn (min-SNR); Part III passes
    on_step, the bookkeeping after each step (logs, grids, checkpoints, the clock, Ctrl-C),
    which returns True to stop. Part I alone needs none of them."""
    draw = draw or (lambda idx: draw_batch(to_model_range(data[idx]), p.schedule.T, p.gen))
    ema_params, params = list(p.ema.parameters()), list(p.model.parameters())
    steps_per_epoch = len(data) // cfg.batch_size
    for step in range(start, cfg.epochs * steps_per_epoch):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or step == start:                      # each epoch's order, drawn once
            order = epoch_batches(len(data), cfg.batch_size, cfg.seed, epoch).to(data.device)
        b = draw(order[i])                                              # Alg. 1, lines 2-4
        loss, err = loss_fn(p.eps_model, p.schedule, b)                 # line 5
        p.opt.zero_grad(set_to_none=True)
        loss.backward()
        p.opt.step()
        ema_update(ema_params, params, ema_decay_at(step, cfg.ema_decay))
        if on_step and on_step(step, loss.detach(), b.t, err.detach()):
            break

# -----------------------------------------------------------------------------
# Step 5: samplers. Both take any eps_model(x, t) and x_T ~ N(0, I), and return images in
# [-1, 1] (x_0 clipped, the default); a step function returns the mean and std of x_{t-1}
# and the x_0 it predicted, so tests check the formulas.
#
# To step back from x_t to x_{t-1}, DDPM samples the forward process's posterior
# q(x_{t-1} | x_t, x_0), a Gaussian in closed form (Eq. 6-7), with x_0 estimated from the
# predicted noise by inverting Eq. 4:
#     x_0 ~ (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)
# T small steps, each adding fresh noise (Alg. 2): "ancestral" sampling, each x_{t-1} drawn
# from its parent x_t. Why so many steps? At large t the best guess of x_0 is the blurry
# average of every digit that fits x_t (the right half of samples/denoise.gif); a step commits
# a little toward it, and the next guess, from a less noisy x, is sharper.
#
# DDIM keeps the training and the network and changes only this last part: predict x_0,
# then re-noise it to an earlier level s with the predicted noise itself (DDIM Eq. 12):
#     x_s = sqrt(alpha_bar_s) x_0 + sqrt(1 - alpha_bar_s) eps_theta        (eta = 0)
# eta scales the fresh noise a DDIM step adds: 0 none, 1 as much as DDPM's. Why the steps
# may be long: Eq. 4 trained the network at every level straight from x_0, so any subsequence
# of levels can be visited: 50 jumps instead of 1000 (Key Lesson 4). With eta = 0 a long
# jump stays accurate; II.6 says why (DDIM is Euler's method on an ODE).

DDIM_STEPS = 50                  # the case study's fast sampler: 50 of the T steps

def predict_x0(schedule, x_t, t, eps_theta, clip=True):
    """Invert Eq. 4 for x_0, clipped to the data range [-1, 1] so early, wild guesses cannot
    push samples off the digits; eps is re-derived so (x_0, eps) still add up to x_t exactly."""
    x0 = extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - \
        extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps_theta
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps_theta = (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / \
            extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return x0, eps_theta

def ddpm_step(schedule, x_t, t, eps_theta, clip=True):
    """Eq. 7 with the predicted x_0: mean of q(x_{t-1} | x_t, x_0) and sigma_t = sqrt(beta_tilde_t).
    Unclipped, this mean is exactly Alg. 2 line 4,
    (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)."""
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
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)
                   * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()                   # Eq. 16
    dir_xt = (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps_theta    # toward x_t
    mean = alpha_bar_prev.sqrt() * x0 + dir_xt
    return mean, sigma, x0

def ddim_timesteps(T, steps):
    """`steps` indices T/steps apart from T-1 down: the first step starts at x_T ~ N(0, I),
    the level sampling feeds in. steps = T visits every index, where eta = 1 is DDPM."""
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
        # Alg. 2, line 3: no noise on the last step, whose variance is 0
        z = torch.randn(x.shape, device=x.device, generator=generator) if t > 0 else 0.0
        x = mean + std * z
        if on_step:
            on_step(i, x, x0)
    return x

@torch.no_grad()
def ddim_sample(eps_model, schedule, x_T, steps=DDIM_STEPS, eta=0.0, clip_x0=True,
                generator=None, on_step=None):
    """DDIM: `steps` jumps along a subsequence of the T timesteps; eta = 0 is deterministic."""
    ts = ddim_timesteps(schedule.T, steps)
    x = x_T
    for i, t in enumerate(ts):
        t_b, t_prev = t_batch(x, t), t_batch(x, ts[i + 1] if i + 1 < len(ts) else -1)
        eps_theta = eps_model(x, t_b).float()
        mean, sigma, x0 = ddim_step(schedule, x, t_b, t_prev, eps_theta, eta, clip_x0)
        x = mean
        if eta > 0:
            x = mean + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        if on_step:
            on_step(i, x, x0)
    return x

# =============================================================================
# PART II: THE EXTENSIONS
#
# Each section adds one thing to Part I, says why, and cites its paper once. Each is off
# in the case study's recipe; Part III's RunConfig switches it on.
# =============================================================================

# -----------------------------------------------------------------------------
# II.1 Class conditioning: ask for a digit (the case study's first extension).
# One learned vector per label is added to the time embedding, so every ResBlock sees the
# digit as well as the noise level. An extra "null" label stands for "no label" (II.2).

class ConditionalUNet(UNet):
    """eps_theta(x_t, t, y): Part I's U-Net plus a label embedding; y None is the null label."""

    def __init__(self, *args, num_classes=10, **kw):
        super().__init__(*args, **kw)
        self.num_classes = num_classes                                  # also the null label
        self.label_emb = nn.Embedding(num_classes + 1, 4 * self.c0)

    def forward(self, x, t, y=None):
        y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
        return self.unet(x, self.time_mlp(timestep_embedding(t, self.c0)) + self.label_emb(y))

@dataclass
class LabelledBatch(Batch):
    y: torch.Tensor              # (B,) labels, some replaced by the null label

def drop_labels(y, p_uncond, null_label, generator):
    """Each label becomes the null label with probability p_uncond (II.2's training), so the
    one network also learns the unconditional eps(x_t, t, null) that guidance steers from."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)

def conditional_loss(eps_model, schedule, b, loss_fn=diffusion_loss):
    """Part I's loss (or any loss_fn of its shape), the batch's labels handed to the network."""
    return loss_fn(lambda x_t, t: eps_model(x_t, t, b.y), schedule, b)

# -----------------------------------------------------------------------------
# II.2 Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).
# Sampling pushes further in the direction that the label adds. The samplers take the
# guided model like any other eps_model(x, t).

def guided(eps_model, y, s, null_label):
    """eps~(x_t, t) = eps(x_t, t, null) + s * (eps(x_t, t, y) - eps(x_t, t, null)).
    s = 0 ignores y, s = 1 is the plain conditional model, s > 1 trades variety for
    fidelity to y (the paper's w is s - 1). Both terms come from one pass of the doubled batch."""
    y_and_null = torch.cat([y, torch.full_like(y, null_label)])            # (2B,)

    def eps_tilde(x, t):
        both = eps_model(torch.cat([x, x]), torch.cat([t, t]), y_and_null)  # (2B, C, H, W)
        eps_y, eps_null = both.chunk(2)                                     # 2 x (B, C, H, W)
        return eps_null + s * (eps_y - eps_null)
    return eps_tilde

# s when --guidance is not given: the smallest scale at which the committed conditional
# model drew the digit asked for 98% of the time (samples/README.md)
DEFAULT_GUIDANCE = 2.0

# -----------------------------------------------------------------------------
# II.3 The cosine schedule (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672, Eq. 17).
# With linear betas sqrt(alpha_bar_t) is already 0.16 at t = 600: the last 40% of the steps
# see almost pure noise. A cos^2 alpha_bar falls slowly at both ends instead. It is a betas
# function that Part I's NoiseSchedule takes: NoiseSchedule(T, make_betas=cosine_betas).

def cosine_betas(T, beta_1=None, beta_T=None):
    """The betas whose alpha_bar follows cos^2; the linear schedule's end points do not apply."""
    s = 0.008
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]                                          # alpha_bar(0) .. alpha_bar(T)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # clipped: no beta of 1 at t = T

# -----------------------------------------------------------------------------
# II.4 CIFAR-10: 32 px colour (the case study's fourth extension). The DDPM paper's CIFAR-10
# network adds dropout to every block and self-attention after the blocks at 16 px, so
# distant parts of an image can agree (its Sec. 4 and App. B). The data is loaded in Part III.

class SelfAttention(nn.Module):
    """Every pixel attends to every other, one head, as a residual block."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)             # (B, HW, 3C)
        q, k, v = qkv.chunk(3, dim=2)                                        # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)                                   # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))

class CifarResBlock(ResBlock):
    """Part I's ResBlock with dropout before its second conv, then attention if asked."""

    def __init__(self, c_in, c_out, t_dim, dropout, attend):
        super().__init__(c_in, c_out, t_dim)
        self.dropout = nn.Dropout(dropout)
        self.attn = SelfAttention(c_out) if attend else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(t_emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)

class CifarUNet(UNet):
    """32 px colour in and out; CifarResBlocks, attending at the levels of attn_sizes."""

    def __init__(self, channels, num_res_blocks=2, attn_sizes=(16,), dropout=0.1):
        # set first: UNet's __init__ calls res_block, which reads them
        self.attn_sizes, self.p_dropout = attn_sizes, dropout
        super().__init__(channels, num_res_blocks, in_channels=3, size=32)

    def res_block(self, c_in, c_out, t_dim, size):
        return CifarResBlock(c_in, c_out, t_dim, self.p_dropout, size in self.attn_sizes)

def random_hflip(x, generator):
    """Mirror each image left-right with probability 1/2, as the DDPM paper trained CIFAR-10."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5      # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)

def load_cifar10(data_dir, train=True):
    """CIFAR-10 as uint8 (N, 32, 32, 3) images and (N,) labels, via torchvision."""
    from torchvision.datasets import CIFAR10
    ds = CIFAR10(data_dir, train=train, download=True)
    return torch.from_numpy(ds.data), torch.tensor(ds.targets)

# -----------------------------------------------------------------------------
# II.5 Levers for a short run. A constant learning rate leaves the weights bouncing at the
# end of a two-epoch run; a warm-up and a decay to 0 let them settle. min-SNR weighting
# (Hang et al. 2023, https://arxiv.org/abs/2303.09556) turns down the nearly clean
# timesteps, whose gradients fight the noisy ones.

def lr_at(step, cfg, total):
    """The learning rate at a 0-based step: cfg.lr throughout (the case study), or with
    cfg.lr_schedule "cosine" a linear warm-up over cfg.warmup_steps and a cosine decay to 0
    at `total`. A function of the step alone, so a resumed run needs no scheduler state."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

def min_snr_weight(schedule, t, gamma):
    """min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t), for eps-prediction."""
    # from a buffer computed in float64: 1 - alpha_bar_t in float32 loses digits
    snr = schedule.sqrt_recipm1_alphas_cumprod[t] ** -2
    return snr.clamp(max=gamma) / snr

def min_snr_loss(gamma, loss_fn=diffusion_loss):
    """loss_fn with each image's error weighted by min_snr_weight: a per-image weight."""
    def weighted(eps_model, schedule, b):
        _, err = loss_fn(eps_model, schedule, b)
        return (min_snr_weight(schedule, b.t, gamma) * err).mean(), err
    return weighted

# -----------------------------------------------------------------------------
# II.6 The ODE view of sampling: what DDIM is, and a solver that needs fewer steps.
#
# Divide DDIM's eta = 0 step (Step 5) by sqrt(alpha_bar_s) and write it in the variables
# xbar = x / sqrt(alpha_bar) and sigmabar = sqrt(1 - alpha_bar) / sqrt(alpha_bar):
#     xbar_s = xbar_t + (sigmabar_s - sigmabar_t) eps_theta(x_t, t)
# That is one Euler step of d xbar / d sigmabar = eps_theta, the probability-flow ODE, whose
# paths carry N(0, I) to the data with no randomness on the way (Song et al. 2021,
# https://arxiv.org/abs/2011.13456, Sec. 4.3; the DDIM paper, Sec. 4.3). Why DDIM may take
# long steps: the network was trained on Eq. 4's one-jump marginals, so it can be asked at
# any level t with no chain of small steps before it; and a deterministic path is smooth,
# so an Euler step's error, the path's curvature times the step squared, stays small.
#
# A solver of higher order gets as far in fewer steps. DPM-Solver++(2M) (Lu et al. 2022,
# https://arxiv.org/abs/2211.01095, Alg. 2) steps in lambda = log(alpha / sigma), half the
# log signal-to-noise ratio, with alpha = sqrt(alpha_bar) and sigma = sqrt(1 - alpha_bar) (its
# alpha, not Part I's alpha_t = 1 - beta_t). It integrates the ODE's linear part exactly and
# approximates only the network's x_0, linearly in lambda through the prediction at this step
# and the one at the step before:
#     h = lambda_next - lambda_t,    r = (lambda_t - lambda_last) / h
#     D = (1 + 1 / (2r)) x0_t - 1 / (2r) x0_last             (the first step: D = x0_t)
#     x_next = (sigma_next / sigma_t) x_t - alpha_next (e^-h - 1) D
# With D = x0_t this is DDIM's step exactly, so the method is DDIM plus a correction from the
# previous prediction. The last step, to the clean image, has sigma_next = 0 and lambda =
# infinity: there r = 0 and the correction is undefined, while the first-order step's limit
# is x0_t itself. So the last step returns x0_t, as DDIM's does.
#
# Neither solver reaches the stochastic samplers on a briefly trained model: on the committed
# weights DDIM-50 scored FID 30.1, DPM-Solver++ 28.7 in 20 calls, and DDIM-50 with eta 1 11.8
# (samples/README.md). An ODE follows the network's errors faithfully to the end; fresh noise
# at each step pulls the sample back to where the network was trained and so forgets earlier
# errors (Karras et al. 2022, https://arxiv.org/abs/2206.00364, Sec. 4). A better solver fixes
# the steps, not the model.

DPM_SOLVER_STEPS = 20            # as good as DDIM-50 on the committed weights (samples/README.md)

def alpha_sigma(schedule, t):
    """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at index t, as floats;
    index -1 is the clean image, (1, 0)."""
    if t < 0:
        return 1.0, 0.0
    return schedule.sqrt_alphas_cumprod[t].item(), schedule.sqrt_one_minus_alphas_cumprod[t].item()

def half_log_snr(schedule, t):
    """lambda_t = log(alpha_t / sigma_t)."""
    alpha, sigma = alpha_sigma(schedule, t)
    return math.log(alpha / sigma)

def dpm_solver_step(schedule, x_t, t, t_next, x0, t_last=None, x0_last=None):
    """DPM-Solver++(2M), Lu et al. Alg. 2: x at index t_next (-1: the clean image) from x_t, the
    x_0 predicted at index t and, from the second step on, the x_0 predicted at t_last."""
    if t_next < 0:
        return x0                                   # the last step: the data prediction
    lambda_t = half_log_snr(schedule, t)
    h = half_log_snr(schedule, t_next) - lambda_t
    D = x0                                          # first order: DDIM's step
    if x0_last is not None:
        r = (lambda_t - half_log_snr(schedule, t_last)) / h
        D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
    alpha_next, sigma_next = alpha_sigma(schedule, t_next)
    return sigma_next / alpha_sigma(schedule, t)[1] * x_t - alpha_next * math.expm1(-h) * D

@torch.no_grad()
def dpm_solver_sample(eps_model, schedule, x_T, steps=DPM_SOLVER_STEPS, clip_x0=True,
                      generator=None, on_step=None):
    """DPM-Solver++(2M) on DDIM's timesteps: `steps` network calls, deterministic (an ODE draws
    no noise: `generator` is unused, there so the call reads as ddim_sample's)."""
    ts = ddim_timesteps(schedule.T, steps)
    x, t_last, x0_last = x_T, None, None
    for i, t in enumerate(ts):
        t_b = t_batch(x, t)
        x0, _ = predict_x0(schedule, x, t_b, eps_model(x, t_b).float(), clip_x0)
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        x = dpm_solver_step(schedule, x, t, t_next, x0, t_last, x0_last)
        t_last, x0_last = t, x0
        if on_step:
            on_step(i, x, x0)
    return x

# -----------------------------------------------------------------------------
# II.7 Flow matching (Lipman et al. 2023, https://arxiv.org/abs/2210.02747; as rectified flow,
# Liu et al. 2023, https://arxiv.org/abs/2209.03003): the same U-Net, trained to predict a
# velocity instead of a noise. (The papers put the noise at t = 0; here t = 1 is the noise, as
# in the DDPM, so t counts the same way in every part of the file.)
#
# Draw t ~ U[0, 1] and move along a straight line from the digit (t = 0) to the noise (t = 1,
# where the DDPM's x_T is):
#     x_t = (1 - t) x_0 + t eps,        v = d x_t / dt = eps - x_0
# and regress the network on v: loss || v - v_theta(x_t, t) ||^2. To sample, integrate
# dx/dt = v_theta(x, t) from t = 1 back to t = 0 with Euler steps: x <- x - dt v_theta(x, t).
#
# It is Eq. 4's family: a Gaussian path alpha_t x_0 + sigma_t eps with alpha_t = 1 - t and
# sigma_t = t in place of sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), and a target that is a
# fixed mix of the two, eps - x_0, in place of eps alone (x_0 = x_t - t v and eps = x_t +
# (1 - t) v recover both). So the network, the data and Part I's loop are the same; only the
# draw, the loss and the sampler are new. Sampling is an ODE, as in II.6, with nothing to
# convert: v_theta is the ODE's own right-hand side.

FLOW_TIME_SCALE = 999            # Part I's T - 1: the U-Net sees t in [0, 1] as index (T - 1) t

def flow_draw(x0, generator):
    """A time t ~ U[0, 1) and a noise for each image (Batch.t holds times here, not indices)."""
    t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    return Batch(x0, t, eps)

def velocity(v_model, x, t):
    """v_theta(x, t) for times t (B,) in [0, 1]. Part I's sinusoidal embedding was laid out for
    indices 0..T-1, so the U-Net is handed (T - 1) t: t = 1 sits where the DDPM's x_T does."""
    return v_model(x, FLOW_TIME_SCALE * t)

def flow_loss(v_model, schedule, b):
    """|| (eps - x_0) - v_theta(x_t, t) ||^2 with x_t = (1 - t) x_0 + t eps: Part I's loss_fn
    shape, the schedule unused, since t alone fixes the path. Returns the mean and (B,)."""
    t = b.t.view(-1, 1, 1, 1)                                           # (B,) -> (B, 1, 1, 1)
    x_t = (1 - t) * b.x0 + t * b.eps
    err = (b.eps - b.x0 - velocity(v_model, x_t, b.t)).pow(2).mean(dim=(1, 2, 3))   # (B,)
    return err.mean(), err

@torch.no_grad()
def flow_sample(v_model, x_T, steps=DDIM_STEPS, on_step=None):
    """`steps` Euler steps of equal size from t = 1 (x_T ~ N(0, I)) to t = 0. on_step gets the
    x_0 = x - t v_theta where the straight line through x would land, as DDIM's x_0."""
    x, dt = x_T, 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i * dt, device=x.device)      # (B,)
        v = velocity(v_model, x, t).float()
        x0 = x - t.view(-1, 1, 1, 1) * v
        x = x - dt * v
        if on_step:
            on_step(i, x, x0)
    return x

# =============================================================================
# PART III: THE TOOL
#
# Parts I and II are the model; this part makes it a tool: a run's config and files, exact
# resume, precision and the fast paths, several processes, sampling to files, evaluation,
# pictures, bench and the command line. None of it changes what is computed.
#
# The map: III.1 the run's config and its checks; III.2 files written whole, never over what
#   is not theirs; III.3 checkpoints; III.4 precision and fast paths; III.5 torchrun; III.6 a
#   training run's draws, loss and books; III.7 compile and CUDA graphs; III.8 sampling many;
#   III.9 evaluation; III.10 pictures; III.11 bench; III.12 the command line and main().
# One `train` call: main() parses (III.12) and turns every refusal into one line; cmd_train
#   reads the config (train_config: a preset and the flags, or the checkpoint on --resume), the
#   data (read_data, check_data), plans the steps (plan_steps) and builds the run (build_run:
#   Part I's build plus autocast, fused AdamW, DDP, compile); restore() puts a resumed run
#   back; open_books() claims the run folder (a lock, the config) and catches Ctrl-C and
#   SIGTERM; run_steps() runs Part I's train(), which calls keep_books() after each step
#   (losses, checkpoint, loss.csv, grid, the clock); close_books() says how it ended.
# =============================================================================
# the tool's imports, not the DDPM's
import argparse, contextlib, functools, io, json, os, pickle
import platform, shlex, shutil, signal, sys, tempfile, time, warnings, zipfile
from datetime import timedelta
from dataclasses import asdict, field, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

class UserError(argparse.ArgumentTypeError):
    """Bad input, one line and exit code 2: main() prints it, and argparse too where a flag's type
    raises it (hence an ArgumentTypeError)."""

def note(text):
    """A line on stderr, on a line of its own even while a progress bar is drawn there."""
    tqdm.write(text, file=sys.stderr)

def os_reason(e):
    """An OSError as the path and the system's reason: 'runs/x: Permission denied'."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or type(e).__name__}"

def first_line(e):
    """An exception as 'Type: the first line of its message'."""
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:160]}"

# -----------------------------------------------------------------------------
# III.1 What a run records: the case study's Config, each extension's switch and the tool's
# settings. The flags and every config read from a file are held to the same RANGES.

@dataclass
class RunConfig(Config):
    dataset: str = "mnist"       # II.4: "cifar10"
    schedule: str = "linear"     # II.3: "cosine"
    attn_sizes: tuple = ()       # II.4: sizes (px) of the levels with self-attention
    dropout: float = 0.0         # II.4: dropout in the residual blocks
    hflip: bool = False          # II.4: random horizontal flips
    num_classes: int = 0         # II.1: 10 to ask for a digit
    p_uncond: float = 0.1        # II.2: with num_classes, the share of labels dropped
    lr_schedule: str = "constant"  # II.5: "cosine", a warm-up then a decay to 0
    warmup_steps: int = 0        # II.5
    min_snr_gamma: float = 0.0   # II.5: 0 is plain MSE, as the case study
    objective: str = "eps"       # II.7: "flow", a velocity on the straight path
    precision: str = "auto"      # auto: by device (choose_precision); bf16, fp16 or fp32
    grid_n: int = 64             # EMA samples drawn into a grid after every epoch (0: none)
    preset: str = "paper"

PRESETS = {
    "paper": RunConfig(),
    # Measured on a 2-core AVX512-BF16 CPU (samples/README.md): a quarter of the FLOPs, a
    # shorter EMA and every II.5 lever; 79% confident digits with DDIM-50 in 12 minutes.
    "cpu": RunConfig(channels=(32, 64, 128, 128), batch_size=32, epochs=2,
                     lr=1e-3, ema_decay=0.999,
                     schedule="cosine", lr_schedule="cosine", warmup_steps=100,
                     min_snr_gamma=5.0, preset="cpu"),
    # The DDPM paper's CIFAR-10 model as far as this U-Net goes (its Sec. 4 and App. B); it
    # trained 800k steps, 100 epochs here are 39,000.
    "cifar10": RunConfig(dataset="cifar10", channels=(128, 256, 256, 256),
                         attn_sizes=(16,), dropout=0.1, hflip=True,
                         epochs=100, preset="cifar10"),
}
# (C, H, W) of each data set's images
IMAGE_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
TRAIN_IMAGES = {"mnist": 60_000, "cifar10": 50_000}
# the digits 0-9: what --cond conditions on (CIFAR-10 also has ten classes; its network here
# is unconditional)
NUM_CLASSES = 10
CHOICES = dict(dataset=tuple(IMAGE_SHAPES),
               schedule=("linear", "cosine"),
               lr_schedule=("constant", "cosine"),
               precision=("auto", "bf16", "fp16", "fp32"),
               preset=tuple(PRESETS),
               objective=("eps", "flow"))
# Every number a flag or a config may hold: (kind, lowest, highest), "float>" excluding the
# lowest. A config is read from files that anyone may hand over, so each highest is also what
# keeps a crafted one from asking for terabytes; the comments say what each bound is.
RANGES = dict(
    T=("int", 2, 10_000),                # ten times the case study's steps
    beta_1=("float>", 0, 0.999),         # at beta = 1, x_t holds no signal: black samples
    beta_T=("float>", 0, 0.999),
    num_res_blocks=("int", 1, 8),        # the U-Net's depth per level
    lr=("float>", 0, 3.4e38),            # float32's largest: AdamW updates in float32
    weight_decay=("float", 0, 10),
    batch_size=("int", 1, 1_000_000),    # as many as --n: a batch of samples
    epochs=("int", 1, 100_000),          # 2,000 times the case study's 50
    ema_decay=("float", 0, 0.999999),    # below 1: at 1 the average never moves
    seed=("int", 0, 2 ** 63 - 1),        # torch seeds are 64-bit; the grid's is seed + 1
    dropout=("float", 0, 0.99),          # at 1 every activation is dropped
    p_uncond=("float", 0, 1),            # a share of the labels
    warmup_steps=("int", 0, 10 ** 9),    # a billion steps: more than any run takes
    min_snr_gamma=("float", 0, 1e6),     # above the largest SNR (1e4 here), plain MSE
    grid_n=("int", 0, 1024),             # a grid that still fits a screen
    channel=("int", 8, 1024),            # a width of the U-Net: 1024 is 4x the case study's
    steps=("int", 1, 1000),              # sampler steps, and then at most the model's T
    eta=("float", 0, 1),                 # 0 DDIM, 1 DDPM's variance
    guidance=("float", 0, 1000),
    n=("int", 1, 10 ** 6),               # samples: 3.1 GB of CIFAR-10 images in memory
    max_minutes=("float>", 0, 10 ** 7),  # 19 years
    max_steps=("int", 1, 10 ** 9),
    ckpt_every=("int", 0, 10 ** 9),
    reps=("int", 1, 1000),               # bench's timed steps
    digits=("int", 1, 16))               # forward's rows

def is_number(v):
    """A finite int or float that a float can hold (a crafted 10**400 is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) <= sys.float_info.max           # False for inf and NaN too

def check_number(name, v, what):
    """v held to RANGES[name]; `what` names the flag or the file, and the value, in the refusal."""
    kind, lo, hi = RANGES[name]
    is_int = is_number(v) and isinstance(v, int)
    ok = is_int if kind == "int" else is_number(v)
    if not ok or v > hi or v < lo or (kind == "float>" and v == lo):
        need = "an integer" if kind == "int" else "a number"
        if kind == "float>":
            span = f"above {lo} and at most {hi}"
        else:
            span = f"from {lo} to {hi}"
        raise UserError(f"{what}: need {need} {span}")
    return v

def check_channels(channels, what="--channels"):
    def misfit(c):
        return isinstance(c, bool) or not isinstance(c, int) or c % GROUPS
    four = isinstance(channels, (tuple, list)) and len(channels) == 4
    if not four or any(misfit(c) for c in channels):
        raise UserError(f"{what} {channels!r}: need 4 widths (one per level: 28, 14, 7, 3 px "
                        f"for MNIST), each a multiple of {GROUPS} (the GroupNorm groups)")
    listed = ",".join(map(str, channels))
    return tuple(check_number("channel", c, f"{what} {listed}: width {c}") for c in channels)

def config_from_dict(d, where):
    """A RunConfig from a checkpoint's or config.json's dict, every value held to what the flags
    allow before a network is sized from it. Unknown keys are ignored and missing ones take the
    case study's values, so older files still load."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: its config is {type(d).__name__}, not a dict of settings")
    names = {f.name for f in fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in d.items() if k in names})
    for name in RANGES.keys() & d.keys():
        check_number(name, d[name], f"{where}: config {name} {d[name]!r}")
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise UserError(f"{where}: config {name} {value!r} is not one of "
                            f"{', '.join(allowed)}")
    sizes = cfg.attn_sizes
    labels_ok = cfg.num_classes in (0, NUM_CLASSES)
    sizes_ok = isinstance(sizes, (tuple, list)) and all(isinstance(a, int) for a in sizes)
    if not (labels_ok and isinstance(cfg.hflip, bool) and sizes_ok):
        raise UserError(f"{where}: config num_classes, hflip or attn_sizes is malformed")
    if cfg.num_classes and cfg.dataset != "mnist":
        raise UserError(f"{where}: --cond asks for digits; the CIFAR-10 network here is "
                        "unconditional")
    if cfg.objective == "flow" and (cfg.schedule, cfg.min_snr_gamma) != ("linear", 0):
        raise UserError(f"{where}: a flow model has no noise schedule and no min-SNR "
                        "weighting, but its config names them")
    channels = check_channels(cfg.channels, f"{where}: config channels")
    return replace(cfg, channels=channels, attn_sizes=tuple(cfg.attn_sizes))

def make_unet(cfg):
    """The network a config describes: Part I's, or a Part II extension's."""
    if cfg.dataset == "cifar10":
        return CifarUNet(cfg.channels, cfg.num_res_blocks, cfg.attn_sizes, cfg.dropout)
    if cfg.num_classes:
        return ConditionalUNet(cfg.channels, cfg.num_res_blocks, num_classes=cfg.num_classes)
    return UNet(cfg.channels, cfg.num_res_blocks)

def make_schedule(cfg):
    make_betas = cosine_betas if cfg.schedule == "cosine" else linear_betas
    return NoiseSchedule(cfg.T, cfg.beta_1, cfg.beta_T, make_betas)

def count_params(model):
    return sum(p.numel() for p in model.parameters())

# -----------------------------------------------------------------------------
# III.2 Files that survive a kill at any instant and never replace what is not theirs.

TEMP_END = ".ddpm_mnist.tmp"       # the end of every temporary name atomic_write makes
HOST = platform.node()[:40]        # in it: a folder may be shared by several machines

def temp_name(path):
    """.NAME.HOST-PID.ddpm_mnist.tmp beside `path`, NAME cut to 150 bytes so that the whole
    fits the 255 a name may have."""
    name = path.name.encode()[:150].decode(errors="ignore")
    return path.with_name(f".{name}.{HOST}-{os.getpid()}{TEMP_END}")

def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, fsync it, then rename it over `path`: a kill,
    or a power cut, at any instant leaves the old file or the new one, never half of one."""
    path = Path(path)
    remove_stale_temps(path.parent)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        raise_os_error(e, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()

def raise_os_error(e, path):
    """Raise the operating system's refusal of a write as an OSError naming `path` (a full
    disk, a file too large), also where a writer wrapped it in its own error, as torch.save's
    zip writer does; any other error as it is."""
    os_error = e if isinstance(e, OSError) else e.__context__
    if not isinstance(os_error, OSError):
        raise e
    raise OSError(os_error.errno, os_error.strerror, str(path)) from None

def stale_temp(f):
    """Whether `f` is a temporary file or folder of this program's, made on this machine by a
    process that no longer runs: a kill's leftover."""
    if not f.name.endswith(TEMP_END) or os.name == "nt":    # Windows: os.kill(pid, 0) ends it
        return False
    host, _, pid = f.name[:-len(TEMP_END)].rpartition("-")
    ours = host.endswith("." + HOST) and pid.isascii() and pid.isdigit()
    return ours and not running(int(pid))

SWEPT = set()                      # the folders this process has cleared of stale temporaries

def remove_stale_temps(folder):
    """Remove the kills' leftovers in `folder` (stale_temp). Once per folder and process, as a
    folder of 50,000 PNGs is not listed 50,000 times."""
    key = os.path.realpath(folder)
    if key in SWEPT:
        return
    SWEPT.add(key)
    for f in Path(folder).glob(".*" + TEMP_END):
        if not stale_temp(f):
            continue
        with contextlib.suppress(OSError):                  # not ours to insist on
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)                            # a png-dir's
            else:
                f.unlink()

def running(pid):
    """Whether process `pid` lives: signal 0 sends nothing, it only asks."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):    # none, or a number no PID can be
        return False
    except PermissionError:                        # another user's
        return True
    return True

def save_png(image, path):
    atomic_write(path, lambda f: image.save(f, format="PNG"))

def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))

def check_in(flag, path):
    """An input must name a file that exists."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: names a folder, not a file")
    if p.exists() and not p.is_file():
        raise UserError(f"{flag} {path}: is not a regular file (a pipe or a device); "
                        "give a file")
    if not p.is_file():
        raise UserError(f"{flag} {path}: no such file")
    return p

def check_out(flag, path, suffix, inputs=(), folder=False):
    """The one rule for every file written: it has the suffix of what is written, it is none of the
    command's inputs, it never replaces a run's training checkpoint, and its folder exists and
    takes a file. Checked before any work, so a refusal loses nothing."""
    p = Path(path)
    state = holds_training_state(p) if p.is_file() else False
    no_name = p.name in ("", ".", "..")
    wrong_suffix = not folder and p.suffix.lower() != suffix
    an_input = any(same_file(i, p) for i in inputs if i is not None)
    not_empty = folder and p.exists() and (not p.is_dir() or any(p.iterdir()))
    a_folder = not folder and p.is_dir()
    read_only = p.is_file() and not p.stat().st_mode & 0o222
    dangling = p.is_symlink() and not p.exists()
    checks = [
        (no_name, "names no file; give a file name"),
        (wrong_suffix, f"must end in {suffix}, the kind of file this writes"),
        (an_input, "is an input of this command; writing it would replace it"),
        (not_empty, "is not a new or empty folder"),
        (a_folder, "is a folder; give a file name"),
        (state is True, "holds a run's training state, which only that run may replace"),
        (state is None, "cannot be read to tell that it is not a run's training checkpoint; "
                        "move it, or give another name"),
        (read_only, "is a read-only file"),
        (dangling, "is a link that leads nowhere (a loop, or a missing target); "
                   "give another name"),
        (not p.parent.is_dir(), f"the folder {p.parent} does not exist")]
    for bad, why in checks:
        if bad:
            raise UserError(f"{flag} {path}: {why}")
    if not writable(p.parent):
        raise UserError(f"{flag} {path}: the folder {p.parent} is not writable")

def same_file(a, b):
    """Whether two paths name one file, links followed (a loop of links compares as written)."""
    return os.path.realpath(a) == os.path.realpath(b)

def writable(folder):
    """Whether a file can be created in `folder`, by creating one: os.access reads permission bits
    and can say yes where creating fails (an immutable folder, a share that maps users)."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False

def holds_training_state(path):
    """Whether a file is a run's training checkpoint: True, False, or None where it cannot be read
    well enough to tell (no read permission; torch's legacy pickle format, which --resume reads
    but a weights-only peek does not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return None
    # not a zip, as torch.save writes; a pickle (b"\x80") is the legacy format
    if head != b"PK":
        return None if head[:1] == b"\x80" else False
    d = peek(path)
    if not d and Path(path).suffix == ".pt":
        return None
    return "opt" in d

def read_torch_file(path, mmap=False):
    """torch.load with weights_only=True: tensors and plain data only, so a file can never run
    code. torch's warnings about odd contents stay off the screen; the checks that follow say
    in one line what is wrong."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

def peek(path):
    """A torch file's top-level dict, its tensors left on disk (mmap); {} for anything else."""
    if not Path(path).is_file():          # a pipe would block the read
        return {}
    with contextlib.suppress(Exception):
        d = read_torch_file(path, mmap=True)
        return d if isinstance(d, dict) else {}
    return {}

def progress_bar(**kw):
    """tqdm, redrawn twice a second on a terminal but once a minute into a log or CI, where each
    redraw is a new line."""
    interval = 0.5 if sys.stderr.isatty() else 60.0
    longest = max(10.0, interval)
    return tqdm(mininterval=interval, maxinterval=longest, dynamic_ncols=True, **kw)

GRID_PAD = 2                     # white lines between the cells of a grid, in pixels
GRID_COLUMNS = 8                 # samples per row of the per-epoch grids

def grid_image(images_uint8, nrow=GRID_COLUMNS):
    """uint8 (N, H, W[, 3]) -> one picture, nrow a row, 2 px white lines around each: torchvision's
    make_grid, which makes grey RGB and leaves a lone image unframed."""
    from torchvision.utils import make_grid
    x = images_uint8.cpu()
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)     # (N, C, H, W)
    if len(x) > 1:
        g = make_grid(x, nrow, padding=GRID_PAD, pad_value=255)       # (3, H', W')
    else:
        g = F.pad(x[0], (GRID_PAD,) * 4, value=255)                   # (C, H', W')
    pixels = g[0] if x.shape[1] == 1 else g.permute(1, 2, 0)          # (H', W'[, 3])
    return Image.fromarray(pixels.numpy())

# -----------------------------------------------------------------------------
# III.3 Checkpoints: written atomically, read without running code, checked before use.

DEFAULT_CKPT = Path("runs/ddpm/ckpt.pt")
# the committed weights
SHIPPED_CKPT = Path(__file__).resolve().parent / "samples" / "ema_fp16.pt"
TRAINING_STATE = ("model", "ema", "opt", "step", "rng",
                  "epoch_loss_sum", "history", "seconds")

def load_checkpoint(path, flag="--ckpt"):
    """torch.load with weights_only=True, tensors and plain data only, so a checkpoint can never
    run code. Every failure is one line for the user."""
    path = check_in(flag, path)
    try:
        ckpt = read_torch_file(path)
    except pickle.UnpicklingError:
        raise UserError(f"{flag} {path}: refused: it holds pickled Python objects that could "
                        "run code; nothing in it was executed") from None
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint, truncated or not made by "
                        f"torch.save ({type(e).__name__})") from None
    has_config = isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)
    weights = ckpt.get("ema", ckpt.get("model")) if has_config else None
    if not isinstance(weights, dict):
        raise UserError(f"{flag} {path}: not a ddpm_mnist checkpoint (it needs 'config' and "
                        "'ema' entries)")
    return ckpt

def model_from_checkpoint(ckpt, weights="ema"):
    """The network the checkpoint's config describes, with its weights in float32 (also from the
    fp16 exports in samples/), in eval mode; weights that do not fit are one line."""
    cfg = config_from_dict(ckpt["config"], "--ckpt")
    state = ckpt.get(weights)
    if not isinstance(state, dict):
        has = ", ".join(k for k in ("ema", "model") if k in ckpt)
        raise UserError(f"--ckpt: this checkpoint has no '{weights}' weights "
                        f"(it has: {has})")
    model = make_unet(cfg)
    want = model.state_dict()

    def fits(k, v):
        w = state.get(k)
        return (isinstance(w, torch.Tensor) and w.shape == v.shape and w.layout == torch.strided
                and w.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    unfit = [k for k, v in want.items() if not fits(k, v)]   # missing or misshapen
    bad = unfit + [k for k in state if k not in want]         # then the unexpected
    if bad:
        raise UserError(f"--ckpt: its weights do not fit the network its config describes "
                        f"({len(bad)} missing, misshapen or unexpected, such as {bad[0]})")
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise UserError(f"--ckpt: {len(broken)} of its weight tensors hold NaN or infinite "
                        f"values, such as {broken[0]}; its samples would be blank")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False), cfg

def checkpoint_to_sample(ckpt_flag):
    """--ckpt if given; else runs/ddpm/ckpt.pt; else, on a fresh clone, the committed weights."""
    if ckpt_flag is not None:
        return Path(ckpt_flag)
    if DEFAULT_CKPT.exists() or not SHIPPED_CKPT.exists():
        return DEFAULT_CKPT
    return SHIPPED_CKPT

def trained_note(r):
    """How long a model trained, from an export's record (any file's: each part checked)."""
    if not (isinstance(r, dict) and is_number(r.get("step")) and is_number(r.get("epochs"))):
        return "its training length is not recorded in the file"
    text = f"trained {int(r['step']):,} steps ({r['epochs']:.1f} epochs)"
    if is_number(r.get("seconds")):
        text += f" in {r['seconds'] / 60:.1f} min"
    device = r.get("device")
    return text + f" on {device if isinstance(device, str) else 'an unrecorded device'}"

def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr

# -----------------------------------------------------------------------------
# III.4 Precision and the fast paths: autocast by device, fused AdamW, fp16's gradient scaler
# (torch.compile and CUDA graphs: III.7). Weights, AdamW's moments and the EMA stay float32 in
# every mode.

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PRECISION_NAMES = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "fp32"}
# tests use "aot_eager": the same graphs, no code generated (and no CUDA graphs: no GPU there)
COMPILE_BACKEND = "inductor"

def choose_precision(device, precision="auto"):
    """(autocast dtype or None for fp32, why)."""
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
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16, "this CPU runs bf16 natively (AVX512-BF16 or AMX)"
    if device.type == "cpu":
        return None, "this CPU has no native bf16"
    return None, f"fp32 on {device.type} (autocast there not measured)"

def cpu_has_bf16():
    # a private oneDNN query: a CPU build without it (or where it fails) runs fp32
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False

class Autocast(nn.Module):
    """model(*args) with its matmuls and convolutions in `dtype` (None: fp32) and a float32
    result; a module, so training reaches the model's parameters through it."""

    def __init__(self, model, device, dtype):
        super().__init__()
        self.model, self.device_type, self.dtype = model, device.type, dtype

    def forward(self, *args):
        on = self.dtype is not None
        with torch.autocast(self.device_type, self.dtype, enabled=on):
            return self.model(*args).float()

def make_optimizer(model, cfg, device):
    """AdamW, fused on CUDA and the CPU: one kernel for every tensor (on the 2-core CPU the
    preset's optimizer step fell from 9.3 to 3.0 ms)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                             weight_decay=cfg.weight_decay, fused=fused)

class ScaledOptimizer:
    """fp16's optimizer: step() is torch's GradScaler step (unscale, skip a step whose gradients
    overflowed, adapt the scale), and everything else the optimizer's own."""

    def __init__(self, opt, scaler):
        self.opt, self.scaler = opt, scaler

    def step(self):
        self.scaler.step(self.opt)
        self.scaler.update()

    def __getattr__(self, name):
        return getattr(self.opt, name)

def scale_loss(loss_fn, scaler):
    """loss_fn whose loss backpropagates scaled, so small fp16 gradients do not flush to 0; its
    value, which the log keeps, stays unscaled."""
    def scaled(eps_model, schedule, b):
        loss, err = loss_fn(eps_model, schedule, b)
        loss.register_hook(scaler.scale)
        return loss, err
    return scaled

def set_fast_math(device):
    if device.type == "cuda":
        # fp32 matmuls and convolutions on the tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # Shapes never change, so let cuDNN time its kernels once and keep the fastest. The price:
        # the chosen kernel may be non-deterministic, so on CUDA a resumed run matches an
        # uninterrupted one up to float rounding, not bitwise (bitwise on the CPU).
        torch.backends.cudnn.benchmark = True

def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; everything else follows this device."""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available() or name == "mps" and not mps:
        raise UserError(f"--device {name}: not available on this machine; use --device cpu "
                        "or auto")
    count = torch.cuda.device_count()
    if name.startswith("cuda:") and int(name[5:]) >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA devices")
    return torch.device(name)

OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")

@contextlib.contextmanager
def blame(flag, device, also=None):
    """A failed allocation in the block becomes one line naming the flag that sized it, and
    `also`, another flag that did (the network's widths, beside the batch)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        oom = isinstance(e, (MemoryError, torch.OutOfMemoryError))
        if not (oom or any(s in str(e) for s in OUT_OF_MEMORY)):
            raise
        smaller = f"a smaller {flag}" + (f" or {also}" if also else "")
        raise UserError(f"{flag}: needs more memory than {device} can allocate; "
                        f"try {smaller}") from None

# -----------------------------------------------------------------------------
# III.5 Several processes, through torchrun: every process draws the whole batch from the same
# generator and keeps its share, and DistributedDataParallel averages the gradients, so N
# processes take the same steps as one and a checkpoint resumes under any N. Not so with
# dropout (the CIFAR-10 network): each process draws its masks from its own torch generator.

def start_processes(args, cfg):
    """Under torchrun: check what every process must agree on, then join the group, giving up after
    a minute rather than waiting forever. Returns (device, rank, world)."""
    # torchrun sets these; set by hand, one wrong one would leave a process waiting
    env = os.environ
    several = env.get("WORLD_SIZE", "1") != "1"
    if several and not env.get("TORCHELASTIC_RUN_ID"):
        raise UserError(f"environment WORLD_SIZE={env['WORLD_SIZE']!r}: several processes "
                        "start with torchrun, which sets it with RANK, LOCAL_RANK and "
                        "MASTER_ADDR; unset WORLD_SIZE to run one process")
    device = resolve_device(args.device)
    if not several:
        return device, 0, 1
    rank, local_rank, world, local_world = torchrun_numbers(env)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size}: must divide evenly over the "
                        f"{world} processes (it is the global batch)")
    device = process_device(args.device, device, local_rank, local_world)
    join_group(device, rank, world)
    # one download, not one per process into the same folder
    if rank == 0:
        read_data(cfg, args.data_dir)
    torch.distributed.barrier()
    return device, rank, world

def torchrun_numbers(env):
    """(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) as torchrun sets them, each checked:
    one wrong by hand would leave a process waiting, or fail deep inside torch."""
    needed = ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if not env.get(k, "").strip()]
    if missing:
        raise UserError(f"environment WORLD_SIZE={env['WORLD_SIZE']!r} without "
                        f"{', '.join(missing)}: several processes start with torchrun, "
                        "which sets them all")
    numbers = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    odd = [k for k in numbers if not (env[k].isascii() and env[k].isdigit() and len(env[k]) < 7)]
    n = {k: int(env[k]) for k in numbers} if not odd else {}
    if odd or not (n["RANK"] < n["WORLD_SIZE"] and n["LOCAL_RANK"] < n["LOCAL_WORLD_SIZE"]):
        shown = ", ".join(f"{k}={env[k][:20]!r}" for k in numbers)
        raise UserError(f"environment {shown}: need whole numbers, RANK below WORLD_SIZE and "
                        "LOCAL_RANK below LOCAL_WORLD_SIZE; start the processes with torchrun, "
                        "which sets them")
    return n["RANK"], n["LOCAL_RANK"], n["WORLD_SIZE"], n["LOCAL_WORLD_SIZE"]

def process_device(flag, device, local_rank, local_world):
    """This process's device: CUDA device local_rank, one per process, or the CPU."""
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible < local_world:
            raise UserError(f"--device {flag}: {local_world} processes on this "
                            f"machine but {visible} visible CUDA devices; one process "
                            "per device")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--device {flag}: several processes run on CUDA (nccl) "
                        "or the CPU (gloo)")
    return device

GROUP_TIMEOUT = timedelta(minutes=30)    # torch's own default for a group

def join_group(device, rank, world):
    """Join the other processes, giving up after a minute rather than waiting forever. The
    group's timeout then grows to GROUP_TIMEOUT, since every collective keeps it: the others
    wait for process 0 while it downloads the data, writes a checkpoint or draws a grid."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:                             # NCCL connects at the first collective: inside the minute
        torch.distributed.init_process_group(backend, timeout=timedelta(minutes=1))
        torch.distributed.barrier()
    except Exception as e:
        # a store that timed out, an address that does not answer
        raise UserError(f"torchrun: process {rank} could not join the other {world - 1} "
                        f"within a minute ({type(e).__name__}); start every process "
                        "with torchrun") from None
    # public as set_timeout from torch 2.6 (or so); before, only the private name
    set_timeout = getattr(torch.distributed, "set_timeout", None)
    (set_timeout or torch.distributed.distributed_c10d._set_pg_timeout)(GROUP_TIMEOUT)

def all_sum(x, world):
    if world > 1:
        torch.distributed.all_reduce(x)     # in place: the sum over the processes
    return x

def leave(code, world):
    """End this process's part: close the process group, then exit with code (None: return)."""
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if code is not None:
        sys.exit(code)

# -----------------------------------------------------------------------------
# III.6 A training run: Part I's loop with this run's draws, loss and bookkeeping.

def read_data(cfg, data_dir, train=True):
    """The config's data set as uint8 images and labels; a missing or broken one is one line."""
    raw = Path(data_dir) / "MNIST" / "raw"
    made = [d for d in (raw, raw.parent, Path(data_dir)) if not d.exists()]
    split = "training" if train else "test"
    load = load_cifar10 if cfg.dataset == "cifar10" else load_mnist
    try:                             # here: an import that fails is not the data set's fault
        import torchvision
    except ImportError as e:
        raise UserError(f"torchvision is needed to read the data sets ({first_line(e)}); "
                        "pip install -r requirements.txt") from None
    # torchvision before 0.20 prints every download attempt on stdout: kept off it
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return check_data(cfg, data_dir, *load(data_dir, train), split)
    except UserError:
        raise
    except Exception as e:  # no network, a proxy error, a truncated file...
        for d in made:      # leave no empty folders behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        if cfg.dataset == "cifar10":
            put = f"the extracted cifar-10-batches-py folder in {data_dir}"
        else:
            put = f"the four IDX files (train-images-idx3-ubyte, ...) in {raw}"
        name = cfg.dataset.upper()
        raise UserError(f"--data-dir {data_dir}: {name} is missing or unreadable and could "
                        f"not be downloaded ({type(e).__name__}); put {put}") from None

def check_data(cfg, data_dir, images, labels, split="training"):
    """A data set as the network needs it: images of its size, one label 0..9 for each. Returns
    them."""
    C, H, W = IMAGE_SHAPES[cfg.dataset]
    want = (H, W) if C == 1 else (H, W, C)
    if len(images) == 0 or tuple(images.shape[1:]) != want:
        dims = ", ".join(map(str, want))
        raise UserError(f"--data-dir {data_dir}: its {cfg.dataset.upper()} {split} images "
                        f"are {tuple(images.shape)}; the network takes (N, {dims})")
    one_each = labels.shape == (len(images),)
    if not one_each or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise UserError(f"--data-dir {data_dir}: its {split} labels do not match its images "
                        f"({len(labels)} labels for {len(images)} images; each must be 0..9)")
    return images, labels

def training_draw(cfg, data, labels, p, rank=0, world=1):
    """Alg. 1 lines 2-4 as this run draws them: Part I's, with II.4's flips and II.1's labels.
    Under torchrun every process draws the whole batch and keeps its own slice of it."""
    B = cfg.batch_size
    # this process's share of the batch
    part = slice(rank * B // world, (rank + 1) * B // world)

    def draw(idx):
        x0 = to_model_range(data[idx])          # (B, C, H, W) in [-1, 1]
        x0 = random_hflip(x0, p.gen) if cfg.hflip else x0
        y = None
        if cfg.num_classes:
            y = drop_labels(labels[idx], cfg.p_uncond, cfg.num_classes, p.gen)
        if cfg.objective == "flow":
            b = flow_draw(x0, p.gen)
        else:
            b = draw_batch(x0, p.schedule.T, p.gen)
        if y is not None:
            b = LabelledBatch(b.x0, b.t, b.eps, y)
        if world == 1:
            return b
        return type(b)(*(getattr(b, f.name)[part] for f in fields(b)))
    return draw

def training_loss(cfg):
    """Part I's loss or II.7's, with II.1's labels if asked, weighted by II.5's min-SNR if asked
    (a flow never is: its config is refused)."""
    loss_fn = flow_loss if cfg.objective == "flow" else diffusion_loss
    if cfg.num_classes:
        loss_fn = functools.partial(conditional_loss, loss_fn=loss_fn)
    if cfg.min_snr_gamma:
        loss_fn = min_snr_loss(cfg.min_snr_gamma, loss_fn)
    return loss_fn

def build_run(cfg, device, world=1, compile=False, graph=False):
    """Part I's build() with this run's network, schedule, loss and fast paths (fused AdamW,
    autocast, DDP, compile and CUDA graphs, fp16's scaler). Returns the Parts and the loss
    function."""
    torch.manual_seed(cfg.seed)          # the initial weights, the same in every process
    p = build(cfg, make_unet(cfg), make_schedule(cfg), device)
    p.opt = make_optimizer(p.model, cfg, device)
    dtype = choose_precision(device, cfg.precision)[0]
    if world > 1:                        # averages the gradients over the processes
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        p.eps_model = DDP(p.model, device_ids=ids)
    p.eps_model = Autocast(p.eps_model, device, dtype)
    loss_fn = training_loss(cfg)
    if compile or graph:                 # DDP cuts its graph at the gradient buckets
        loss_fn = compiled(loss_fn, graph, fullgraph=world == 1)
    if dtype == torch.float16:
        scaler = torch.amp.GradScaler(device.type)
        p.opt, loss_fn = ScaledOptimizer(p.opt, scaler), scale_loss(loss_fn, scaler)
    return p, loss_fn

def is_epoch_row(row):
    """A row of a run's history as save_books writes it (loss_by_t is absent in old runs)."""
    numbers = ("epoch", "step", "mean_loss", "seconds")
    if not (isinstance(row, dict) and all(is_number(row.get(k)) for k in numbers)):
        return False
    by_t = row.get("loss_by_t", [])
    return isinstance(by_t, list) and len(by_t) <= NOISE_BINS and all(map(is_number, by_t))

def check_books(ckpt, params):
    """ValueError unless the books are what save_checkpoint writes and AdamW's moments fit the
    parameters tensor by tensor: a misfit would crash the fused step, not explain itself."""
    if not (is_number(ckpt["epoch_loss_sum"]) and is_number(ckpt["seconds"])
            and isinstance(ckpt["history"], list) and all(map(is_epoch_row, ckpt["history"]))):
        raise ValueError("epoch_loss_sum, seconds or history")
    for key in ("bin_loss_sums", "bin_counts"):
        v = ckpt.get(key, [0.0] * NOISE_BINS)
        if not (isinstance(v, list) and len(v) == NOISE_BINS and all(map(is_number, v))):
            raise ValueError(key)
    for i, state in ckpt["opt"]["state"].items():
        if not (isinstance(i, int) and 0 <= i < len(params)):
            raise ValueError(f"optimizer state for parameter {i!r}")
        for k in ("exp_avg", "exp_avg_sq"):
            v, want = state.get(k), params[i]
            is_tensor = isinstance(v, torch.Tensor)
            if not (is_tensor and v.shape == want.shape and v.dtype == want.dtype):
                raise ValueError(f"optimizer {k} of parameter {i}")

def same_kind(v, want):
    """Whether a saved option v is of the kind of this run's `want`: a number, numbers, a flag."""
    if isinstance(want, bool):
        return isinstance(v, bool)
    if isinstance(want, tuple):
        return isinstance(v, (tuple, list)) and len(v) == len(want) and all(map(is_number, v))
    return is_number(v) or not is_number(want)

def check_options(ckpt, groups):
    """ValueError unless the checkpoint's AdamW options and fp16 scaler hold numbers (and flags)
    where this run's do: a string for eps would only fail inside the first step."""
    saved = ckpt["opt"]["param_groups"]
    if not (isinstance(saved, list) and len(saved) == len(groups)):
        raise ValueError("optimizer param_groups")
    for g, mine in zip(saved, groups):
        for k, want in mine.items():
            v = g.get(k, want) if isinstance(g, dict) else None
            if k != "params" and not same_kind(v, want):
                raise ValueError(f"optimizer {k} {v!r}")
    scaler = ckpt.get("scaler") or {}
    if not (isinstance(scaler, dict) and all(map(is_number, scaler.values()))):
        raise ValueError("scaler")

def restore(ckpt, p, path):
    """Put a run back where its checkpoint left it: weights, AdamW's moments, the scaler and the
    generator of t and eps; a state that does not fit is one line. The lr is open_books' to
    set."""
    saved_on = str(ckpt.get("device", "")).split(" ")[0]         # "cpu", "cuda (H100)"
    here = p.gen.device.type
    if saved_on in ("cpu", "cuda", "mps") and saved_on != here:
        raise UserError(f"--resume: {path}: trained on {saved_on}, and its generator of t "
                        f"and eps is a {saved_on} one; resume it with --device {saved_on}")
    try:
        if not isinstance(ckpt["step"], int) or ckpt["step"] < 0:
            raise ValueError(f"step {ckpt['step']!r}")
        check_books(ckpt, list(p.model.parameters()))
        check_options(ckpt, p.opt.param_groups)
        for part in ("model", "ema", "opt"):
            getattr(p, part).load_state_dict(ckpt[part])
        if ckpt.get("scaler") and isinstance(p.opt, ScaledOptimizer):
            p.opt.scaler.load_state_dict(ckpt["scaler"])
        p.gen.set_state(ckpt["rng"])
        if "torch_rng" in ckpt:                     # older runs did not keep it
            set_torch_rng(ckpt["torch_rng"], p.gen.device)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            ArithmeticError) as e:
        raise UserError(f"--resume: {path}: its training state does not fit this run "
                        f"({first_line(e)})") from None
    return ckpt["step"]

# The loss by noise level, as improved-diffusion logs it: the mean loss of the steps whose t fell
# in each quarter of 1..T. Where the error sits is what a schedule changes.
NOISE_BINS = 4
LOSS_CHECK_EVERY = 50            # steps between NaN checks and progress-bar updates

@dataclass
class Books:
    """A run's bookkeeping, which keep_books updates after each step (Part I's on_step). Under
    torchrun every process keeps its own; process 0 alone writes and prints."""
    cfg: RunConfig               # the run's recipe
    p: Parts                     # what Part I's train() works on
    run_dir: Path                # ckpt.pt, config.json, loss.csv and the grids go here
    data_dir: str                # named in the line that says how to resume
    max_minutes: float           # stop this long after this invocation began (None: no limit)
    ckpt_every: int              # also checkpoint every this many steps (0: at epochs only)
    steps_per_epoch: int         # len(data) // batch_size
    total: int                   # the step this invocation stops at
    world: int                   # processes under torchrun
    start: int                   # the step this invocation began at
    epoch_loss: torch.Tensor     # () this epoch's step losses, summed
    bin_loss: torch.Tensor       # (NOISE_BINS,) per-image errors summed by quarter of t
    bin_count: torch.Tensor      # (NOISE_BINS,) images in each quarter
    history: list                # a row per finished epoch; kept in every checkpoint
    seconds: float               # training seconds in all; kept in every checkpoint
    seconds0: float              # of them, those before this invocation
    last_good: int = None        # the step of the last checkpoint (None: none yet)
    lock: int = None             # the run folder's lock, held by process 0
    bar: tqdm = None             # the progress bar (process 0's; disabled elsewhere)
    lead: bool = True            # process 0
    done: int = 0                # the step this invocation stopped at
    interrupted: bool = False    # Ctrl-C or SIGTERM came: stop after this step
    signum: int = None           # which of the two
    recent: list = field(default_factory=list)   # losses since the last check (GPU tensors)
    t_open: float = field(default_factory=time.time)   # when this invocation began

def open_books(args, cfg, p, ckpt, start, steps_per_epoch, total, rank, world):
    """A run's books, which keep_books updates after each step: its files, loss sums, clock and
    bar. Claims the run folder and catches Ctrl-C and SIGTERM. `ckpt`: a restored run's
    checkpoint, or None; `total`: where this invocation stops."""
    lead = rank == 0
    lock = claim_run_folder(args.run_dir, args.overwrite, cfg) if lead else None
    ck = ckpt or {}

    def saved(values):               # a checkpoint's sums go to process 0, whose totals they are
        return torch.tensor(values, device=p.gen.device) * lead
    bar = progress_bar(total=total, initial=start, unit="step", disable=not lead)
    bk = Books(cfg=cfg, p=p, run_dir=Path(args.run_dir), data_dir=args.data_dir,
               max_minutes=args.max_minutes, ckpt_every=args.ckpt_every,
               steps_per_epoch=steps_per_epoch, total=total, world=world, start=start,
               epoch_loss=saved(ck.get("epoch_loss_sum", 0.0)),
               bin_loss=saved(ck.get("bin_loss_sums", [0.0] * NOISE_BINS)),
               bin_count=saved(ck.get("bin_counts", [0.0] * NOISE_BINS)),
               history=ck.get("history", []), seconds=ck.get("seconds", 0.0),
               seconds0=ck.get("seconds", 0.0), last_good=start if ckpt else None,
               lock=lock, bar=bar, lead=lead)
    set_lr(p.opt, lr_at(start, cfg, cfg.epochs * steps_per_epoch))
    catch_signals(bk)
    return bk

def claim_run_folder(run_dir, overwrite, cfg):
    """Make the run folder and lock it, so that a second train there is refused before
    anything is written; with --overwrite remove the old run's own files (and nothing else);
    write the config. Returns the lock."""
    folder = Path(run_dir)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(run_dir)
    if overwrite:                    # the old run's own files go, and nothing else
        for f in run_files(folder):
            f.unlink()
    try:
        save_text(json.dumps(asdict(cfg), indent=2) + "\n", folder / "config.json")
    except OSError:                  # a full disk: leave no empty run folder behind
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return lock

def catch_signals(bk):
    """Ctrl-C, or SIGTERM (kill, timeout, Slurm, docker stop): finish the step, save and leave.
    A second one kills."""
    def on_signal(signum, _):
        bk.interrupted, bk.signum = True, signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

def keep_books(bk, step, loss, t, err):
    """After step `step` (0-based): add it up, decide whether to stop, check the losses, save when
    it is time, and set the next step's lr. True when the run should stop."""
    n = step + 1                                 # steps done
    cfg, spe = bk.cfg, bk.steps_per_epoch
    add_step(bk, n, loss, t, err)
    stop = should_stop(bk, n)
    ckpt_due = bk.ckpt_every and n % bk.ckpt_every == 0
    save = n % spe == 0 or stop or ckpt_due
    if len(bk.recent) == LOSS_CHECK_EVERY or save:
        check_losses(bk, n)
    bk.seconds = bk.seconds0 + time.time() - bk.t_open
    if save:
        save_books(bk, n)
    # the horizon is --epochs, not --max-steps
    set_lr(bk.p.opt, lr_at(n, cfg, cfg.epochs * spe))
    return stop

def add_step(bk, n, loss, t, err):
    """The step's loss into the epoch's sum, each image's error into its quarter of t."""
    bk.done = n
    bk.epoch_loss += loss / bk.world             # each process's loss is of its share
    bins = noise_bin(t, bk.cfg)                  # (B,) in 0..3
    # index_add_, unlike bincount, never waits for the GPU
    bk.bin_loss.index_add_(0, bins, err)
    bk.bin_count.index_add_(0, bins, torch.ones_like(err))
    bk.recent.append(loss)

def should_stop(bk, n):
    """At the last step; or at --max-minutes, Ctrl-C or SIGTERM, which several processes agree on
    every LOSS_CHECK_EVERY steps, so that none waits alone in a collective."""
    limit = bk.max_minutes
    late = limit is not None and time.time() - bk.t_open > 60 * limit
    if bk.world > 1 and n % LOSS_CHECK_EVERY == 0:
        flags = [float(bk.interrupted), float(late)]
        votes = torch.tensor(flags, device=bk.epoch_loss.device)
        votes = all_sum(votes, bk.world)
        bk.interrupted, late = bool(votes[0]), bool(votes[1])
    if n >= bk.total:
        return True
    return (bk.interrupted or late) and (bk.world == 1 or n % LOSS_CHECK_EVERY == 0)

def save_books(bk, n):
    """The sums to process 0, an epoch's row when one ended, the checkpoint, then the epoch's
    loss.csv and grid: the checkpoint first, so a grid that fails loses no training."""
    cfg, spe = bk.cfg, bk.steps_per_epoch
    sums = (bk.epoch_loss, bk.bin_loss, bk.bin_count)
    # the totals, on process 0 alone
    for total in sums:
        total.copy_(all_sum(total, bk.world) * bk.lead)
    if n % spe == 0:
        by_t = (bk.bin_loss / bk.bin_count.clamp(min=1)).tolist()
        mean_loss = bk.epoch_loss.item() / spe
        bk.history.append(dict(epoch=n // spe, step=n, seconds=bk.seconds,
                               mean_loss=mean_loss, loss_by_t=by_t))
        for total in sums:
            total.zero_()
    if bk.lead:
        save_checkpoint(bk, n)
    bk.last_good = n
    if bk.lead and n % spe == 0:
        write_loss_csv(bk.history, bk.run_dir / "loss.csv", cfg)
        # after the checkpoint: resume with a smaller --grid-n
        if cfg.grid_n:
            grid = bk.run_dir / f"grid_epoch{n // spe:03d}.png"
            with blame("--grid-n", bk.p.gen.device):
                epoch_grid(bk.p, cfg, grid)

def last_checkpoint(bk):
    if bk.last_good is None:
        return "no checkpoint was written"
    ckpt = bk.run_dir / "ckpt.pt"
    return f"the last good checkpoint is {ckpt} (step {bk.last_good})"

def check_losses(bk, n):
    """Stop at the first NaN or infinite loss since the last check, naming its step."""
    # (k,): the whole batch's losses
    recent = all_sum(torch.stack(bk.recent), bk.world) / bk.world
    bad = (~torch.isfinite(recent)).nonzero()
    if len(bad):
        end_run(bk)
        if bk.lead:
            bad_step = n - len(bk.recent) + int(bad[0]) + 1
            note(f"error: the loss became NaN or infinite at step {bad_step}; "
                 f"{last_checkpoint(bk)}. Try a smaller --lr, or --precision fp32.")
        leave(1, bk.world)
    mean_loss = recent.mean().item()
    # images/s of this invocation: tqdm's own rate stays unset until a redraw, a minute into a log
    images = (n - bk.start) * bk.cfg.batch_size
    seconds = max(time.time() - bk.t_open, 1e-9)
    # refresh=False: tqdm redraws at its own pace
    bk.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images / seconds:.0f}",
                       refresh=False)
    bk.bar.update(len(bk.recent))
    bk.recent = []

def save_checkpoint(bk, step):
    p, dev = bk.p, bk.p.gen.device
    scaler = getattr(p.opt, "scaler", None)
    if dev.type == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(dev)})"
    else:
        device = dev.type
    ckpt = dict(config=asdict(bk.cfg),
                model=p.model.state_dict(), ema=p.ema.state_dict(),
                opt=p.opt.state_dict(),
                scaler=scaler.state_dict() if scaler else {},
                step=step, rng=p.gen.get_state(), torch_rng=torch_rng_state(dev),
                steps_per_epoch=bk.steps_per_epoch,
                epoch_loss_sum=bk.epoch_loss.item(),
                bin_loss_sums=bk.bin_loss.tolist(), bin_counts=bk.bin_count.tolist(),
                history=bk.history, seconds=bk.seconds,
                versions=dict(torch=str(torch.__version__)), device=device)
    atomic_write(bk.run_dir / "ckpt.pt", lambda f: torch.save(ckpt, f))

def torch_rng_state(device):
    """torch's own generators, which dropout draws its masks from (II.4's CIFAR-10 network):
    kept, so that a resumed run draws the masks the uninterrupted one would."""
    state = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state

def set_torch_rng(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

def resume_command(bk):
    """The command that continues this run, quoted for a shell."""
    return (f"python ddpm_mnist.py train --run-dir {shlex.quote(str(bk.run_dir))} "
            f"--data-dir {shlex.quote(str(bk.data_dir))} --resume")

def end_run(bk):
    """What every end of a run undoes: the bar, the signal handlers, the run folder's lock."""
    bk.bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if bk.lock is not None:
        os.close(bk.lock)
        bk.lock = None

def close_books(bk):
    end_run(bk)
    ckpt = bk.run_dir / "ckpt.pt"
    if bk.interrupted and bk.lead:
        note(f"interrupted: saved {ckpt} at step {bk.done}; continue with\n"
             f"  {resume_command(bk)}")
    elif bk.lead:
        unfinished = bk.done < bk.cfg.epochs * bk.steps_per_epoch
        more = "; continue with --resume" if unfinished else ""
        print(f"saved {ckpt} at step {bk.done} ({bk.seconds:.0f} s of training){more}")
    code = 128 + bk.signum if bk.interrupted else None   # 130 Ctrl-C, 143 SIGTERM
    leave(code, bk.world)

def noise_bin(t, cfg):
    """Each image's quarter of the noise levels, 0..NOISE_BINS-1: of the indices 0..T-1, or of a
    flow's times in [0, 1) (II.7)."""
    if cfg.objective == "flow":
        return (t * NOISE_BINS).long().clamp(max=NOISE_BINS - 1)
    return t * NOISE_BINS // cfg.T

def noise_bin_names(cfg):
    """loss.csv's columns for noise_bin's quarters, in the paper's t (or the flow's time)."""
    if cfg.objective == "flow":
        edges = [b / NOISE_BINS for b in range(NOISE_BINS + 1)]    # times in [0, 1]
        return [f"loss_t{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges, edges[1:])]
    # the first index of each quarter, ceil(b T / 4), as noise_bin's floor(4 t / T) draws
    # them; the paper's t is the index + 1
    edges = [-(-b * cfg.T // NOISE_BINS) for b in range(NOISE_BINS + 1)]
    return [f"loss_t{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:])]

def write_loss_csv(history, path, cfg):
    bins = noise_bin_names(cfg)
    lines = [",".join(["epoch", "step", "mean_loss", "seconds", *bins])]
    # numbers only, so no field needs quoting; loss_by_t is absent in old runs
    for row in history:
        cells = [str(row["epoch"]), str(row["step"]),
                 f"{row['mean_loss']:.6f}", f"{row['seconds']:.1f}"]
        cells += [f"{v:.6f}" for v in row.get("loss_by_t", [])]
        lines.append(",".join(cells))
    save_text("\n".join(lines) + "\n", path)

def digit_rows(n, ncol, num_classes):
    """Labels for n samples laid out ncol to a row: row r asks for class r mod num_classes."""
    return (torch.arange(n) // ncol) % num_classes

def epoch_grid(p, cfg, path):
    """EMA samples from the same starting noise every epoch, so the grids show progress."""
    device = p.schedule.betas.device
    same_noise = torch.Generator().manual_seed(cfg.seed + 1)
    x_T = torch.randn(cfg.grid_n, *IMAGE_SHAPES[cfg.dataset], generator=same_noise)
    dtype = choose_precision(device, cfg.precision)[0]
    eps_model = Autocast(p.ema, device, dtype)
    # a conditional run: one digit per row of the grid
    if cfg.num_classes:
        digits = digit_rows(cfg.grid_n, GRID_COLUMNS, cfg.num_classes).to(device)
        eps_model = guided(eps_model, digits, DEFAULT_GUIDANCE, cfg.num_classes)
    x_T = x_T.to(device)
    if cfg.objective == "flow":
        x0 = flow_sample(eps_model, x_T)
    else:
        x0 = ddim_sample(eps_model, p.schedule, x_T)
    save_png(grid_image(to_uint8(x0), GRID_COLUMNS), path)

# -----------------------------------------------------------------------------
# III.7 Compiled, and CUDA graphs. A step of this small network is hundreds of small kernels,
# and on a GPU their launches, not their arithmetic, set the pace. torch.compile fuses them;
# its "reduce-overhead" mode also records the compiled forward and backward as CUDA graphs
# (cudagraph trees), each replayed with one launch. The fused AdamW and the foreach EMA stay
# outside, a few launches each, so a step is a few dozen launches instead of several hundred.

# calls before the graphs replay: a compile, a warm-up run and a recording, and two to spare
# for a recompile, so that bench times replays alone
GRAPH_WARMUP = 5

def graph_unsupported(device, world=1):
    """Why CUDA graphs cannot run here, or None."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if world > 1:
        return "several processes synchronize their gradients outside any graph"
    return None

def compiled(fn, graph=False, fullgraph=False):
    """fn through torch.compile, replayed from CUDA graphs if `graph`. A compiler that cannot
    run (a cache folder it cannot write, no C compiler) is said in one line, and fn runs as it
    is from then on; an error in fn itself is raised as it is."""
    flag, mode = ("--cuda-graph", dict(mode="reduce-overhead")) if graph else ("--compile", {})
    try:                             # the first torch.compile imports and makes its cache
        fast = torch.compile(fn, fullgraph=fullgraph, backend=COMPILE_BACKEND, **mode)
        from torch._dynamo.exc import BackendCompilerFailed
    except OSError as e:
        return compile_failed(fn, flag, os_reason(e))

    def call(*args):
        nonlocal fast
        if fast is fn:               # after a failed compile
            return fn(*args)
        if graph:                    # a new step: the last step's graph outputs are done with
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = fast(*args)
        except BackendCompilerFailed as e:
            fast = compile_failed(fn, flag, first_line(e.inner_exception))
            return fn(*args)
        return clone_outputs(out) if graph else out
    return call

def compile_failed(fn, flag, why):
    note(f"note: {flag}: the compiler cannot run ({why}); the steps run as they are")
    return fn

def clone_outputs(out):
    """A graph's outputs are its own buffers, which the next replay writes over: copies."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(v.clone() for v in out)

# -----------------------------------------------------------------------------
# III.8 Sampling many: batches, one progress bar, the output formats, and the fast path.

@dataclass
class Sampler:
    """Which sampler, and how: what `sample`, `evaluate` and the pictures pass around."""
    # "ddpm": Alg. 2, all T steps; "ddim": `steps` jumps;
    # "dpm++": II.6's solver; "euler": a flow model's (II.7)
    name: str = "ddim"
    steps: int = DDIM_STEPS
    eta: float = 0.0
    clip_x0: bool = True

    def timesteps(self, T):
        """The indices t visited, in order; a flow's times."""
        if self.name == "ddpm":
            return list(range(T - 1, -1, -1))
        if self.name == "euler":
            return [1 - i / self.steps for i in range(self.steps)]
        return ddim_timesteps(T, self.steps)

    def __call__(self, eps_model, schedule, x_T, generator=None, on_step=None):
        if self.name == "ddpm":
            return ddpm_sample(eps_model, schedule, x_T, self.clip_x0, generator, on_step)
        if self.name == "dpm++":
            return dpm_solver_sample(eps_model, schedule, x_T, self.steps, self.clip_x0,
                                     on_step=on_step)
        if self.name == "euler":
            return flow_sample(eps_model, x_T, self.steps, on_step)
        return ddim_sample(eps_model, schedule, x_T, self.steps, self.eta, self.clip_x0,
                           generator, on_step)

def fast_eps_model(eps_model, device, compile=False, graph=False):
    """The sampling commands' --compile and --cuda-graph: the network compiled, and replayed
    from CUDA graphs at each step. The samplers' few elementwise ops per step stay eager."""
    why_not = graph_unsupported(device) if graph else None
    if why_not:
        note(f"note: --cuda-graph: {why_not}; the steps run without CUDA graphs")
    graph = graph and not why_not
    return compiled(eps_model, graph) if compile or graph else eps_model

@dataclass
class Guidance:
    """What a conditional model is asked for (II.2): one label per sample, and the scale s."""
    labels: torch.Tensor         # (N,) int64
    scale: float
    null_label: int              # the network's "no label", its num_classes

    def eps_model_for(self, eps_model, device, start=0, stop=None):
        """eps_model guided towards the labels of samples [start, stop)."""
        labels = self.labels[start:stop].to(device)
        return guided(eps_model, labels, self.scale, self.null_label)

def generate(eps_model, schedule, sampler, shape, seed=0, batch_size=256, guidance=None):
    """shape[0] samples as uint8 (N, H, W[, 3]), in batches. x_T comes from a CPU generator,
    so the same seed gives the same starting noise on every device."""
    n, device = shape[0], schedule.betas.device
    # x_T from the CPU's generator; the noise the steps add from the device's
    g_noise = torch.Generator().manual_seed(seed)
    g_step = torch.Generator(device).manual_seed(seed + 1)
    steps = math.ceil(n / batch_size) * len(sampler.timesteps(schedule.T))
    desc = f"{sampler.name} x{n}"
    out = []
    with progress_bar(total=steps, unit="step", desc=desc, leave=False) as bar:
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            x_T = torch.randn(size, *shape[1:], generator=g_noise).to(device)
            model = eps_model
            if guidance:
                model = guidance.eps_model_for(eps_model, device, start, start + size)
            x_0 = sampler(model, schedule, x_T, g_step, on_step=lambda *_: bar.update())
            out.append(to_uint8(x_0).cpu())
    return torch.cat(out)

def batch_flag(args):
    """The flag that sizes a batch of samples: --batch-size, or --n when all fit in one."""
    return "--batch-size" if args.n > args.batch_size else "--n"

def grid_columns(n):
    """Samples per row of a `sample` grid: a square-ish picture."""
    return max(1, round(math.sqrt(n)))

def write_samples(images, out, fmt, labels=None):
    """png: one grid to look at; npz: the exact uint8 arrays to measure (and the labels asked of
    a conditional model); png-dir: one file per sample, what standard FID tools read."""
    if fmt == "png":
        save_png(grid_image(images, nrow=grid_columns(len(images))), out)
    elif fmt == "npz":
        arrays = dict(images=images.numpy())
        if labels is not None:
            arrays["labels"] = labels.numpy()
        # compressed in memory first: numpy before 2.0 leaves its zip file open when a write
        # fails, and closing it later prints a second error
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write(out, lambda f: f.write(buf.getbuffer()))
    else:
        write_png_dir(images, Path(out))

def write_png_dir(images, out):
    """One PNG per sample, written into a temporary folder beside `out` and renamed to it at
    the end: an error leaves no half-written folder."""
    out = Path(os.path.realpath(out))    # a link to an empty folder: the folder
    remove_stale_temps(out.parent)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)      # this PID's own, from a killed earlier life
    tmp.mkdir()
    try:
        for i, im in enumerate(images):
            Image.fromarray(im.numpy()).save(tmp / f"{i:06d}.png")
        os.replace(tmp, out)             # over nothing, or over an empty folder
    except Exception as e:
        raise_os_error(e, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

# the most samples --n makes, with labels: 32 x 32 x 3 bytes and an int64 each, 1 MiB to spare
NPZ_LIMIT = RANGES["n"][2] * (32 * 32 * 3 + 8) + 2 ** 20

def npz_size(path):
    """The bytes an .npz holds once decompressed, from its zip directory (0 if not a zip)."""
    try:
        with zipfile.ZipFile(path) as z:
            return sum(i.file_size for i in z.infolist())
    except zipfile.BadZipFile:
        return 0

def read_samples(path):
    """uint8 images (N, 28, 28) and, if the file holds them, the labels they were asked for."""
    check_in("--samples", path)
    size, most = npz_size(path), RANGES["n"][2]
    if size > NPZ_LIMIT:
        raise UserError(f"--samples {path}: would take {size / 1e9:.1f} GB once "
                        f"decompressed, more than {most:,} samples; refused unread")
    try:
        # an object array would need pickle: refused
        with np.load(path, allow_pickle=False) as z:
            a = z["images"] if "images" in z.files else z[z.files[0]]
            y = z["labels"] if "labels" in z.files else None
    except Exception as e:
        why = f"not a readable .npz of arrays ({type(e).__name__})"
        raise UserError(f"--samples {path}: {why}") from None
    if not all(isinstance(v, np.ndarray) for v in (a, y) if v is not None):
        raise UserError(f"--samples {path}: not a readable .npz of arrays (a member is not "
                        "a .npy array)")
    shape_ok = a.ndim == 3 and a.shape[1:] == (28, 28)
    if not shape_ok or a.dtype != np.uint8 or len(a) < 2:
        raise UserError(f"--samples {path}: holds {a.dtype} {tuple(a.shape)}; "
                        "need uint8 (N, 28, 28) with N >= 2")
    if y is not None:
        kind_ok = y.shape == (len(a),) and y.dtype.kind in "iu"
        if not kind_ok or y.min() < 0 or y.max() >= NUM_CLASSES:
            got = f"{y.dtype} {tuple(y.shape)}"
            raise UserError(f"--samples {path}: its labels are {got}; "
                            f"need (N,) integers 0..{NUM_CLASSES - 1}, one per image")
    labels = None if y is None else torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(a.copy()), labels

# -----------------------------------------------------------------------------
# III.9 Evaluation: are the samples digits, all ten of them, and not copies?
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
            conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]

        # one flat Sequential: (B, 1, 28, 28) -> features (B, 128)
        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),       # 28 -> 14
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),      # 14 -> 7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.body(x))

CLASSIFIER_EPOCHS, CLASSIFIER_BATCH = 3, 128
# the classifier's augmentation: random shifts of up to 2 px
SHIFT = 2

def train_classifier(images, labels, device, seed=0, epochs=CLASSIFIER_EPOCHS):
    """Adam with a one-cycle schedule and random shifts: >99% test accuracy in 3 epochs. The
    shifts matter: generated digits are not centred as carefully as MNIST's."""
    images, labels = images.to(device), labels.to(device)
    torch.manual_seed(seed)
    clf = Classifier().to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    steps = max(1, epochs * (len(images) // CLASSIFIER_BATCH))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    H, W = images.shape[1:]
    for epoch in range(epochs):
        for idx in epoch_batches(len(images), CLASSIFIER_BATCH, seed, epoch).to(device):
            # padded with the background, -1: (B, 1, H + 4, W + 4)
            x = F.pad(to_model_range(images[idx]), (SHIFT,) * 4, value=-1.0)
            # one shift per batch
            dx, dy = torch.randint(0, 2 * SHIFT + 1, (2,)).tolist()
            shifted = x[:, :, dy:dy + H, dx:dx + W]              # (B, 1, H, W)
            loss = F.cross_entropy(clf(shifted), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval().requires_grad_(False)

def classifier_cache(path, data_dir, device):
    """The cached classifier with its test accuracy and the test set's feature statistics,
    trained and written on first use; a file that is not one is refused in one line."""
    path = Path(path)
    if path.exists():
        return load_classifier(path, device)
    return make_classifier(path, data_dir, device)

def load_classifier(path, device):
    """(the classifier, its cache) from a file classifier_cache wrote, or one line."""
    try:
        # a folder fails here too
        c = read_torch_file(path)
        clf = Classifier()
        weights = c["model"] if isinstance(c, dict) else None
        clf.load_state_dict(weights)   # the right tensors, or it raises
        numbers_ok = (isinstance(c["test_accuracy"], float) and 0 <= c["test_accuracy"] <= 1
                      and isinstance(c["n_test"], int))
        shapes_ok = (c["test_mu"].shape == (128,)
                     and c["test_sigma"].shape == (128, 128))
        finite = all(torch.isfinite(c[k]).all() for k in ("test_mu", "test_sigma"))
        if not (numbers_ok and shapes_ok and finite):
            raise ValueError
    except Exception:
        why = ("not an evaluation classifier made by this program; "
               "delete it to train one there, or give another path")
        raise UserError(f"--classifier {path}: {why}") from None
    return clf.to(device).eval().requires_grad_(False), c

def make_classifier(path, data_dir, device):
    """Train the classifier on MNIST, score it on the test set and cache both in `path`."""
    # the nearest folder that exists: the cache's missing folders would be made in it
    ancestors = [path.parent, *path.parent.parents]
    folder = next(a for a in ancestors if a.exists())
    if not writable(folder):       # said now, not after minutes of training
        raise UserError(f"--classifier {path}: {folder} is not writable, "
                        "so it cannot be cached there")
    images, labels = read_data(RunConfig(), data_dir)
    # fewer: not one step, and every score meaningless
    if len(images) < CLASSIFIER_BATCH:
        raise UserError(f"--data-dir {data_dir}: {len(images)} training images cannot "
                        "train the evaluation classifier; it needs at least "
                        f"{CLASSIFIER_BATCH}")
    test_x, test_y = read_data(RunConfig(), data_dir, train=False)   # before the training
    print(f"training the evaluation classifier (once; cached in {path})")
    clf = train_classifier(images, labels, device)
    feats, probs = classify(clf, test_x, device)
    mu, sigma = gaussian_fit(feats)
    accuracy = float((probs.argmax(1) == test_y).double().mean())
    c = dict(model=clf.state_dict(), test_accuracy=accuracy,
             test_mu=mu, test_sigma=sigma, n_test=len(test_x))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(c, f))
    return clf.to(device), c

@torch.no_grad()
def classify(clf, images_uint8, device, batch_size=1000):
    """uint8 (N, 28, 28) -> (features (N, 128) float64, softmax probabilities (N, 10))."""
    feats, probs = [], []
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start:start + batch_size].to(device)
        f = clf.body(to_model_range(batch))                     # (B, 128)
        feats.append(f.double().cpu())
        probs.append(F.softmax(clf.head(f), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)

def gaussian_fit(feats):
    """Mean and covariance of (N, D) features, float64."""
    return feats.mean(0), torch.cov(feats.T)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians. Tr (S1 S2)^(1/2) is
    the sum of the square roots of the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2), so a
    symmetric eigensolver does, with no complex sqrtm."""
    def sqrt_psd(m):
        w, v = torch.linalg.eigh(m)
        return (v * w.clamp(min=0).sqrt()) @ v.T
    s1 = sqrt_psd(sigma1.double())
    eigenvalues = torch.linalg.eigvalsh(s1 @ sigma2.double() @ s1)
    tr_covmean = eigenvalues.clamp(min=0).sqrt().sum()      # Tr (S1 S2)^(1/2)
    d = (mu1 - mu2).double()
    tr1, tr2 = sigma1.double().trace(), sigma2.double().trace()
    return float(d @ d + tr1 + tr2 - 2 * tr_covmean)

def fid(feats, cache):
    """The one FID: features against the MNIST test set's, in the classifier's feature space."""
    mu, sigma = gaussian_fit(feats)
    return frechet_distance(mu, sigma, cache["test_mu"], cache["test_sigma"])

def class_stats(probs, confident=0.9):
    """Class histogram of the argmax, shares of the rarest and commonest class, and the share
    of samples whose top probability is at least `confident`."""
    counts = torch.bincount(probs.argmax(1), minlength=10)
    shares = counts.double() / len(probs)
    is_confident = probs.max(1).values >= confident
    return dict(class_counts=counts.tolist(),
                rarest_share=float(shares.min()),
                commonest_share=float(shares.max()),
                confident_share=float(is_confident.double().mean()))

def memorization(samples, train_images, test_images, device, n=1000):
    """Nearest-training-image distance (L2, pixels in [0, 1]) of samples against that of real
    test digits, which the model never saw: copies of the training set would sit far below."""
    ref = train_images.to(device).flatten(1).float() / 255      # (N_train, 784)

    def nearest(images):
        """The first n images' distances to their nearest training image, 500 at a time."""
        dists = []
        for chunk in images[:n].split(500):
            x = chunk.to(device).flatten(1).float() / 255       # (B, 784)
            dists.append(torch.cdist(x, ref).min(1).values.cpu())
        return torch.cat(dists)

    d_samples, d_real = nearest(samples), nearest(test_images)
    p1 = float(d_real.quantile(0.01))
    closer = (d_samples < p1).double().mean()
    return dict(n_memo=len(d_samples),
                nn_dist_samples_median=float(d_samples.median()),
                nn_dist_real_test_median=float(d_real.median()),
                real_test_p01=p1,
                share_closer_than_real_p01=float(closer))

def class_accuracy(probs, labels):
    """II.1's models: the share of samples classified as the digit they were asked for, overall
    and per digit (None for a digit no sample asked for)."""
    hit = (probs.argmax(1) == labels).double()
    per_digit = []
    for d in range(NUM_CLASSES):
        asked = labels == d
        per_digit.append(float(hit[asked].mean()) if asked.any() else None)
    return dict(class_accuracy=float(hit.mean()),
                class_accuracy_per_digit=per_digit)

def same_digit_distance(images, labels):
    """II.1's models: the mean L2 distance (pixels in [0, 1]) between two samples asked for the
    same digit: how varied one digit's samples are."""
    x = images.flatten(1).double() / 255                # (N, 784)
    means = []
    for d in labels.unique():
        same = x[labels == d]
        if len(same) > 1:                               # a pair at least
            means.append(torch.pdist(same).mean())
    return float(torch.stack(means).mean())

def evaluate_samples(samples, clf, cache, train_x, test_x, device, seed=0, labels=None):
    """Everything `evaluate` reports for uint8 samples (N, 28, 28), with class accuracy when
    the labels they were asked for are known; train_x and test_x: MNIST's images."""
    feats, probs = classify(clf, samples, device)
    gen = torch.Generator().manual_seed(seed)
    real = train_x[torch.randperm(len(train_x), generator=gen)[:len(samples)]]
    real_feats = classify(clf, real, device)[0]
    r = dict(feature_extractor="ddpm_mnist Classifier, penultimate layer (128-d)",
             classifier_test_accuracy=cache["test_accuracy"],
             fid_reference=f"MNIST test set ({cache['n_test']} images)",
             n=len(samples),
             fid=fid(feats, cache),
             # the floor: as many real digits
             fid_real_train=fid(real_feats, cache),
             **class_stats(probs),
             **memorization(samples, train_x, test_x, device))
    if labels is not None:
        r.update(class_accuracy(probs, labels))
    return r

# -----------------------------------------------------------------------------
# III.10 Pictures that teach: the forward process, the denoising trajectory, DDPM against
# DDIM. Every t on a picture is the paper's.

def labeled_grid(cells, row_labels=(), col_labels=(), scale=2):
    """uint8 cells (R, C, H, W[, 3]) -> a PIL image: grid_image of the cells, `scale` times
    larger, with labels left of the rows and under the columns."""
    C = cells.shape[1]
    cell_h, cell_w = scale * cells.shape[2], scale * cells.shape[3]
    flat = cells.flatten(0, 1)                          # (R * C, H, W[, 3])
    # each pixel a scale x scale block: (R * C, cell_h, cell_w[, 3])
    big = flat.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    grid = grid_image(big, nrow=C)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1))).textlength
    left = 0                            # room for the widest row label
    if len(row_labels):
        left = 8 + int(max(measure(str(l), font=font) for l in row_labels))
    lines = max((str(l).count("\n") + 1 for l in col_labels), default=0)
    # 13 px: a line of the font
    size = (left + grid.width, grid.height + 13 * lines + 4 * bool(lines))
    img = Image.new(grid.mode, size, "white")
    img.paste(grid, (left, 0))
    draw = ImageDraw.Draw(img)
    for r, label in enumerate(row_labels):              # beside the middle of its row
        y = GRID_PAD + r * (cell_h + GRID_PAD) + cell_h // 2 - 6
        draw.text((4, y), str(label), fill=0, font=font)
    under = grid.height + 2
    for c, label in enumerate(col_labels):              # under the left of its column
        x = left + GRID_PAD + c * (cell_w + GRID_PAD) + 2
        draw.multiline_text((x, under), str(label), fill=0, font=font, spacing=2)
    return img

FORWARD_T = (1, 50, 100, 200, 400, 600, 800, 1000)   # the paper's t: index t - 1

def forward_picture(images_uint8, schedule, ts=FORWARD_T, seed=0):
    """Step 2 made visible: each digit a row, noised in closed form (Eq. 4) at each paper t;
    under each column t and sqrt(alpha_bar_t), the weight of the digit left in x_t."""
    x0 = to_model_range(images_uint8)                   # (R, 1, 28, 28)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cols, labels = [], []
    for t in ts:                                        # index t - 1
        x_t = schedule.q_sample(x0, t_batch(x0, t - 1), noise)
        cols.append(to_uint8(x_t))                      # (R, 28, 28)
        signal = schedule.sqrt_alphas_cumprod[t - 1]
        labels.append(f"t={t}\nsignal {signal:.3f}")
    cells = torch.stack(cols, dim=1)                    # (R, C, 28, 28)
    return labeled_grid(cells, col_labels=labels, scale=3)

def paper_t_after(ts, i):
    """The paper's t of what a sampler holds after its i-th step: the step from index ts[i]
    lands on index ts[i + 1], which is the paper's ts[i + 1] + 1, or on x_0 at the end."""
    return ts[i + 1] + 1 if i + 1 < len(ts) else 0

def frame_indices(num_steps, max_frames=50):
    """The sampler steps that become GIF frames: all up to 50, else 50 spread evenly, the
    last included."""
    k = min(num_steps, max_frames)
    return sorted({round(i * (num_steps - 1) / max(k - 1, 1)) for i in range(k)})

def denoising_gif(eps_model, schedule, x_T, sampler, generator, path, ms=80, hold_ms=1500):
    """A GIF of x_t (left) beside the model's current guess of x_0 (right), captioned, each frame
    `ms` long, the last held so the finished digits can be seen. Returns the number of frames."""
    ts, frames = sampler.timesteps(schedule.T), []
    keep, nrow = set(frame_indices(len(ts))), grid_columns(len(x_T))

    def on_step(i, x, x0):
        if i not in keep:
            return
        left = grid_image(to_uint8(x), nrow)
        right = grid_image(to_uint8(x0), nrow)
        # a 12 px gap between the two, 16 px above them for the captions
        img = Image.new(left.mode, (2 * left.width + 12, left.height + 16), "white")
        img.paste(left, (0, 16))
        img.paste(right, (left.width + 12, 16))
        if sampler.name == "euler":         # a flow's time runs from 1 to 0
            t = f"{1 - (i + 1) / len(ts):.2f}"
        else:
            t = paper_t_after(ts, i)
        ImageDraw.Draw(img).text((2, 2), f"x_t, t={t}", fill=0)
        ImageDraw.Draw(img).text((left.width + 14, 2), "predicted x_0", fill=0)
        frames.append(img)

    sampler(eps_model, schedule, x_T, generator, on_step)
    durations = [ms] * (len(frames) - 1) + [hold_ms]    # the last frame held

    def write(f):
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                       duration=durations, loop=0, optimize=False)

    atomic_write(path, write)
    return len(frames)

# -----------------------------------------------------------------------------
# III.11 bench: what a step costs in each mode, clocks synchronized with the GPU, after a
# warm-up.

RECIPE_IMAGES = 50 * (TRAIN_IMAGES["mnist"] // 128) * 128     # the case study's 50 epochs

def sync(device):
    """Wait for the GPU's queue to drain: its kernels run after the Python that launched them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

def timed(fn, device):
    """Wall-clock seconds of fn(), the GPU's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0

def forward_gflop(cfg, device):
    """GFLOP of one image's forward pass, as torch's FLOP counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    shape = IMAGE_SHAPES[cfg.dataset]
    x, t = torch.randn(2, *shape, device=device), torch.zeros(2, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as fc:
        make_unet(cfg).to(device)(x, t)
    return fc.get_total_flops() / 2e9

def time_steps(cfg, data, device, mode, reps):
    """(the run's Parts, seconds of warm-up, seconds a step): `reps` steps of Part I's loop
    timed after the first ones, which allocate, search kernels and compile."""
    graph = "graph" in mode
    p, loss_fn = build_run(cfg, device, compile="compiled" in mode, graph=graph)
    warm, marks = GRAPH_WARMUP if graph else 3, []

    def on_step(step, *_):
        if step + 1 in (warm, warm + reps):
            sync(device)
            marks.append(time.perf_counter())
        return step + 1 >= warm + reps
    t0 = time.perf_counter()
    train(cfg, data, p, 0, on_step, training_draw(cfg, data, None, p), loss_fn)
    return p, marks[0] - t0, (marks[1] - marks[0]) / reps

def time_samplers(p, cfg, device, mode):
    """Seconds for DDIM-50 and DDPM-T on one batch, with the mode's fast path."""
    dtype = choose_precision(device, cfg.precision)[0]
    compile = "compiled" in mode
    eps_model = fast_eps_model(Autocast(p.ema, device, dtype), device, compile, "graph" in mode)
    x_T = torch.randn(cfg.batch_size, *IMAGE_SHAPES[cfg.dataset], device=device)
    Sampler("ddim", GRAPH_WARMUP)(eps_model, p.schedule, x_T)    # compile, record

    def run(sampler):
        return timed(lambda: sampler(eps_model, p.schedule, x_T), device)
    if device.type == "cuda":
        return [run(Sampler()), run(Sampler("ddpm", cfg.T))]
    step_s = run(Sampler("ddim", 5)) / 5      # 1000 steps take minutes on a CPU: extrapolated
    return [50 * step_s, cfg.T * step_s]

def bench(cfg, device, reps=5, modes=("eager",)):
    """The training step in each mode side by side (the warm-up holds compile and capture), and
    both samplers for a batch."""
    set_fast_math(device)
    cfg, B = replace(cfg, epochs=10 ** 6), cfg.batch_size          # room for any steps
    g = torch.Generator().manual_seed(0)
    data = to_uint8(torch.rand(2 * B, *IMAGE_SHAPES[cfg.dataset], generator=g) * 2 - 1)
    data = data.to(device)
    dtype, why = choose_precision(device, cfg.precision)
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"{torch.get_num_threads()} threads"
    print(f"device {device} ({card}), {PRECISION_NAMES[dtype]} ({why}), batch {B}, "
          f"torch {torch.__version__}")
    gflop = forward_gflop(cfg, device)
    print(f"{'mode':17} {'warm-up s':>9} {'ms/step':>8} {'images/s':>9} {'TFLOP/s':>8} "
          f"{'50 epochs':>9} {'DDIM-50 s':>9} {'DDPM-1000 s':>11}  (sampling: one batch)")
    for mode in modes:
        why_not = graph_unsupported(device) if "graph" in mode else None
        if why_not:
            print(f"{mode:17} not possible: {why_not}")
            continue
        p, warm_s, step_s = time_steps(cfg, data, device, mode, reps)
        ddim_s, ddpm_s = time_samplers(p, cfg, device, mode)
        tflop_s = 3 * gflop * B / step_s / 1e3          # forward and backward: 3 forwards
        recipe_min = RECIPE_IMAGES * step_s / B / 60
        print(f"{mode:17} {warm_s:9.1f} {1e3 * step_s:8.1f} {B / step_s:9,.0f} {tflop_s:8.2f}"
              f" {recipe_min:7.1f} m {ddim_s:9.2f} {ddpm_s:11.2f}")
    extrapolated = "" if device.type == "cuda" else "; sampling extrapolated from 5 steps"
    print(f"UNet: {count_params(p.model):,} parameters, channels {cfg.channels}; {gflop:.3f} "
          f"GFLOP forward per image, TFLOP/s counts 3 x that" + extrapolated)

# -----------------------------------------------------------------------------
# III.12 The command line: a parser per command, the flags several commands share added by one
# function per group, each flag declared once with its help. Every check that can fail runs
# before slow work starts or any file is written.

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not a usage block), exit code 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

def number(name):
    """An argparse type: a number held to RANGES[name], refused in one line naming what is
    allowed."""
    def parse(s):
        try:
            v = int(s) if RANGES[name][0] == "int" else float(s)
        except ValueError:
            v = s                                  # refused below, as not a number
        return check_number(name, v, f"'{s}'")
    return parse

def channels_arg(s):
    try:
        return check_channels(tuple(int(c) for c in s.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{s}' is not a comma-separated list of integers") from None
    except UserError as e:       # without check_channels' "--channels ...:", which argparse adds
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

def device_arg(s):
    index = s[5:]
    if s in ("auto", "cpu", "cuda", "mps") or (s.startswith("cuda:") and index.isascii()
                                               and index.isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"'{s}' is not one of auto, cpu, cuda, cuda:N, mps")

def guidance_list(s):
    return [number("guidance")(v) for v in s.split(",")]

# --- the flag groups ---

def add_device(p):
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                        "(default: auto)")

def add_data_dir(p):
    p.add_argument("--data-dir", default="data",
                   help="folder holding MNIST/raw (or cifar-10-batches-py); downloaded there "
                        "if missing (default: data)")

def add_fast(p):
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step (slower start, faster steps)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="compiled, and each step replayed from CUDA graphs (on one CUDA "
                        "device; elsewhere a note, and the run goes on without them)")

def add_precision(p):
    p.add_argument("--precision", choices=CHOICES["precision"], default="auto",
                   help="auto: bf16 autocast where the device runs it natively (CUDA 8.0+, "
                        "AVX512-BF16 CPUs), fp16 with a gradient scaler on CUDA 7.x, else "
                        "fp32 (default: auto)")

def add_model(p):
    """The checkpoint a sampling command reads, and how it runs."""
    p.add_argument("--ckpt", help=f"checkpoint to load (default: {DEFAULT_CKPT}, or the "
                                  "committed samples/ema_fp16.pt until you have trained)")
    add_device(p)
    add_precision(p)
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="the EMA weights or the raw trained ones (default: ema)")
    add_fast(p)

def add_sampler(p):
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++", "euler"),
                   help="ddpm: all T ancestral steps; ddim: --steps jumps; dpm++: "
                        "DPM-Solver++(2M), --steps network calls (II.6); euler: a flow "
                        "model's (II.7) (default: ddim, or euler for a flow model)")
    p.add_argument("--steps", type=number("steps"),
                   help=f"steps of ddim, dpm++ or euler, 1..T (default: {DDIM_STEPS}, "
                        f"{DPM_SOLVER_STEPS} for dpm++; DDPM always takes all T)")
    p.add_argument("--eta", type=number("eta"), default=0.0,
                   help="DDIM noise, 0..1: 0 deterministic, 1 like DDPM (default: 0)")
    p.add_argument("--no-clip", action="store_true",
                   help="do not clip the predicted x_0 to [-1, 1]")

def add_batch(p, n, batch_size):
    """How many samples, in batches of how many, from which starting noise."""
    p.add_argument("--n", type=number("n"), default=n, help=f"samples (default: {n})")
    p.add_argument("--batch-size", type=number("batch_size"), default=batch_size,
                   help=f"samples per batch (default: {batch_size})")
    p.add_argument("--seed", type=number("seed"), default=0,
                   help="seed of the starting noise (default: 0)")

def add_guidance(p):
    p.add_argument("--guidance", type=number("guidance"),
                   help="conditional models: guidance scale s, 0..1000; 0 ignores the class, "
                        "1 is the plain conditional model, larger draws the class more surely "
                        f"and less varied (default: {DEFAULT_GUIDANCE})")

def add_scoring(p):
    """What evaluate and compare score with: the MNIST classifier and the data."""
    add_data_dir(p)
    p.add_argument("--classifier", default="runs/mnist_classifier.pt",
                   help="cached classifier (.pt), trained there on first use "
                        "(default: runs/mnist_classifier.pt)")

def add_preset(p, help):
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper", help=help)

# train's recipe flags: each defaults to None, so that "given" means typed, and the help says
# each preset's value
RECIPE = dict(
    dataset="images to learn; the network follows their channels and size (II.4)",
    epochs="passes over the training images",
    batch_size="images per step",
    lr="AdamW learning rate",
    channels="widths of the 4 levels, multiples of 8",
    ema_decay="EMA decay, below 1",
    seed="seed for init, data order and noise",
    precision="autocast, or auto by device",
    grid_n="EMA samples in each epoch's grid, 0 for none",
    schedule="noise schedule (II.3)",
    lr_schedule="constant, or warm-up then cosine decay to 0 (II.5)",
    warmup_steps="linear lr warm-up steps (II.5)",
    min_snr_gamma="min-SNR loss weighting, 0 for plain MSE (II.5)",
    objective="what the network learns: eps, the noise (Part I), or flow, a velocity (II.7)")

def shown(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

def preset_default(name):
    """'(default: X)', or each preset's where they differ: no help states a default that a
    preset overrides."""
    values = {k: shown(getattr(cfg, name)) for k, cfg in PRESETS.items()}
    if len(set(values.values())) == 1:
        return f"(default: {values['paper']})"
    each = ", ".join(f"{v} with --preset {k}" for k, v in values.items())
    return f"(default: {each})"

def add_recipe(p):
    for name, text in RECIPE.items():
        if name == "channels":
            kind = dict(type=channels_arg)
        elif name in RANGES:
            kind = dict(type=number(name))
        else:
            kind = dict(choices=CHOICES[name])
        p.add_argument("--" + name.replace("_", "-"), **kind,
                       help=f"{text} {preset_default(name)}")

# --- one block per command ---

def add_train(sub):
    p = command(sub, "train", cmd_train, "train a DDPM (Alg. 1)",
                "Train the U-Net; writes ckpt.pt, config.json, loss.csv and per-epoch EMA "
                "sample grids into --run-dir. Defaults come from --preset.")
    add_data_dir(p)
    p.add_argument("--run-dir", default="runs/ddpm",
                   help="the run's folder (default: runs/ddpm)")
    add_device(p)
    add_fast(p)
    add_preset(p, "paper: the case study's recipe; cpu: a 4x cheaper network and a short "
                  "run for a laptop CPU; cifar10: the DDPM paper's CIFAR-10 model "
                  "(default: paper)")
    add_recipe(p)
    p.add_argument("--cond", action="store_true",
                   help="a class-conditional model, for sample --class (II.1)")
    p.add_argument("--p-uncond", type=number("p_uncond"),
                   help="with --cond: share of labels dropped to 'no label', 0..1 "
                        f"(default: {PRESETS['paper'].p_uncond})")
    p.add_argument("--max-steps", type=number("max_steps"),
                   help="stop at this step of the run, with a checkpoint")
    p.add_argument("--max-minutes", type=number("max_minutes"),
                   help="stop after this many minutes of this invocation, with a checkpoint")
    p.add_argument("--ckpt-every", type=number("ckpt_every"), default=0,
                   help="also checkpoint every N steps, so a kill loses at most N "
                        "(default: 0, every epoch only)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/ckpt.pt, exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that has a checkpoint")

def add_sample(sub):
    p = command(sub, "sample", cmd_sample,
                "draw digits with DDPM, DDIM, DPM-Solver++ or a flow's Euler steps",
                "Sample from a checkpoint's EMA weights into a PNG grid, an .npz, a folder "
                "of PNGs, or a denoising GIF.")
    add_model(p)
    add_sampler(p)
    add_batch(p, n=64, batch_size=256)
    p.add_argument("--class", dest="digit", choices=[*map(str, range(NUM_CLASSES)), "all"],
                   help="conditional models: the digit to draw, or all: one digit per row "
                        "(default: all)")
    add_guidance(p)
    p.add_argument("--format", choices=("png", "npz", "png-dir"), default="png",
                   help="png: one grid; npz: uint8 array 'images', (N, 28, 28) for MNIST or "
                        "(N, 32, 32, 3) for CIFAR-10; png-dir: one PNG per sample, for "
                        "pytorch-fid or clean-fid (default: png)")
    p.add_argument("--gif", action="store_true",
                   help="an animated GIF of x_t beside the predicted x_0, the --n samples "
                        "in one batch")
    p.add_argument("--out", help="output path (default: samples/<sampler>_<steps>.png, .npz, "
                                 ".gif or folder)")

def add_evaluate(sub):
    p = command(sub, "evaluate", cmd_evaluate, "FID, digit classes and copies of samples",
                "Score N samples (generated, or read from --samples) with a cached MNIST "
                "classifier; prints a table and writes a JSON report.")
    add_model(p)
    add_sampler(p)
    add_batch(p, n=10000, batch_size=500)
    add_scoring(p)
    add_guidance(p)
    p.add_argument("--samples", help="score this .npz (uint8 'images', (N, 28, 28)) instead "
                                     "of sampling")
    p.add_argument("--out", help="report path, .json (default: evaluate.json beside "
                                 "--samples, else beside the checkpoint, or in the current "
                                 "folder for the committed weights)")

def add_compare(sub):
    p = command(sub, "compare", cmd_compare, "the samplers side by side, same noise",
                "From one starting noise: DDPM (all T steps), DDIM eta=0 at 10, 20, 50, 100 "
                "steps, DDIM eta=1 at 50 and DPM-Solver++ at 10 and 20 (a flow model: Euler "
                "at 10, 20, 50), or with --guidance guidance scales; a table and a picture.")
    add_model(p)
    add_batch(p, n=1000, batch_size=500)
    add_scoring(p)
    p.add_argument("--guidance", type=guidance_list,
                   help="conditional models: compare these guidance scales (DDIM-50), e.g. "
                        "0,1,2,3,5,8: one picture row per digit, one column per scale")
    p.add_argument("--out", help="picture path (default: samples/compare.png, or "
                                 "samples/guidance.png)")

def add_bench(sub):
    p = command(sub, "bench", cmd_bench, "time a training step in each mode, and the samplers",
                "The training step eager, compiled (--compile) and replayed from CUDA graphs "
                "(--cuda-graph) side by side, with the warm-up each costs, images/s, "
                "TFLOP/s, and the time to sample a batch with DDIM-50 and DDPM-1000.")
    add_device(p)
    add_precision(p)
    add_fast(p)
    p.add_argument("--batch-size", type=number("batch_size"), default=128,
                   help="images per step (default: 128, the case study's, for every preset)")
    add_preset(p, "the network to time (default: paper)")
    p.add_argument("--channels", type=channels_arg,
                   help="widths of the 4 levels (default: the preset's)")
    p.add_argument("--reps", type=number("reps"), default=5, help="timed steps (default: 5)")

def add_forward(sub):
    p = command(sub, "forward", cmd_forward,
                "picture: real digits noised at t = 1 .. 1000 (Step 2)")
    add_data_dir(p)
    p.add_argument("--seed", type=number("seed"), default=0,
                   help="seed of the digits and the noise (default: 0)")
    p.add_argument("--out", default="samples/forward.png",
                   help="output path (default: samples/forward.png)")
    p.add_argument("--n", type=number("digits"), default=4,
                   help="digits, one per row, 1..16 (default: 4)")
    p.add_argument("--schedule", choices=CHOICES["schedule"], default="linear",
                   help="noise schedule (default: linear)")

def add_export(sub):
    p = command(sub, "export", cmd_export,
                "a checkpoint's EMA weights alone, in fp16: a small file to share",
                "Write the EMA weights in float16 with the config and how long the model "
                "trained, nothing else: a quarter of the checkpoint's size. Every command "
                "that takes --ckpt reads it.")
    p.add_argument("--out", default="samples/ema_fp16.pt",
                   help="output path (default: samples/ema_fp16.pt)")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT),
                   help=f"checkpoint to export (default: {DEFAULT_CKPT})")

def command(sub, name, func, help, description=None):
    """A command's parser; running it calls func(args)."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(func=func)
    return p

def build_parser():
    ap = Parser(prog="ddpm_mnist.py", description=__doc__.split("\n\n")[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_train, add_sample, add_evaluate, add_compare, add_bench, add_forward,
                add_export):
        add(sub)
    return ap

# --- the commands: each checks what it can before slow work starts or a file is written ---

# the run's length and its pictures, not its model
RESUME_MAY_CHANGE = ("epochs", "grid_n")
# what train writes
RUN_FILES = ("ckpt.pt", "config.json", "loss.csv", "grid_epoch*.png")   # what train writes

def run_files(folder):
    """A run's own files in `folder`: its checkpoint, config and loss.csv, the grids as
    save_books names them (grid_epoch001.png), and its killed writes' temporaries; regular
    files only."""
    def own(f):
        number = f.name[len("grid_epoch"):-len(".png")]
        grid = f.name.startswith("grid_epoch") and f.name.endswith(".png") \
            and number.isascii() and number.isdigit()
        named = f.name in RUN_FILES or grid or stale_temp(f)
        return named and f.is_file() and not f.is_symlink()
    return sorted(f for f in Path(folder).iterdir() if own(f))

def lock_folder(folder):
    """Hold an exclusive lock on the run folder while this process lives: a second train there is
    refused, and the lock dies with the process, so a kill leaves nothing to clean by hand."""
    try:
        import fcntl
    except ImportError:
        # Windows: no such lock; one train per folder is the user's care
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--run-dir {folder}: another train is running in it; "
                        "wait for it to end, or give another folder") from None
    return fd

def train_config(args):
    """The preset overlaid with the flags given; on --resume, the checkpoint's config. Returns
    the config and the checkpoint to resume from (read once, here)."""
    given = recipe_given(args)
    if not args.run_dir.strip():
        raise UserError("--run-dir: empty; name the run's folder")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: choose one")
    if args.resume:
        return resumed_config(args, given)
    check_new_run(args)
    if given.get("objective") == "flow":
        given = flow_settings(args.preset, given)
    cfg = replace(PRESETS[args.preset], **given)
    return config_from_dict(asdict(cfg), "train"), None

def recipe_given(args):
    """The recipe flags typed: they default to None, so that a preset's value is overridden
    only by what the user asked for."""
    given = {name: getattr(args, name) for name in RECIPE if getattr(args, name) is not None}
    if args.p_uncond is not None and not args.cond:
        raise UserError(f"--p-uncond {args.p_uncond}: only with --cond "
                        "(it drops labels of a class-conditional model)")
    if args.cond:
        given["num_classes"] = NUM_CLASSES
        if args.p_uncond is not None:
            given["p_uncond"] = args.p_uncond
    return given

def check_new_run(args):
    """A new run goes into a new or empty folder, or with --overwrite into a run's own."""
    folder = Path(args.run_dir)
    if (folder / "ckpt.pt").exists() and not args.overwrite:
        raise UserError(f"--run-dir {args.run_dir}: already holds a checkpoint; "
                        "add --resume to continue it or --overwrite to start over")
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
        own = ", ".join(RUN_FILES)
        raise UserError(f"--run-dir {args.run_dir}: holds files but no checkpoint; "
                        "give a new or empty folder, or --overwrite to remove "
                        f"a run's own files there ({own}) and train in it")

def resumed_config(args, given):
    """(the run's own config, its checkpoint): the flags may lengthen the run, not change it."""
    path = Path(args.run_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path, "--resume")
    missing = [k for k in TRAINING_STATE if k not in ckpt]
    if missing:
        absent = ", ".join(missing)
        raise UserError(f"--resume: {path} has no training state ({absent} missing); "
                        "it looks like an `export` file, which can be sampled from but "
                        "not trained further")
    saved = config_from_dict(ckpt["config"], f"--resume: {path}")
    if args.cond and not saved.num_classes:
        raise UserError(f"--cond: {path} is an unconditional run; "
                        "a resumed run keeps its config")
    if saved.num_classes and not args.cond:
        raise UserError(f"--resume: {path} is a class-conditional run; "
                        "add --cond to resume it")
    # the same run: another lr or width would make another model; only its length grows
    for k, v in given.items():
        if k not in RESUME_MAY_CHANGE and v != getattr(saved, k):
            flag, was = "--" + k.replace("_", "-"), getattr(saved, k)
            raise UserError(f"{flag} {v}: differs from the checkpoint's {was}; "
                            "a resumed run keeps its config "
                            "(only --epochs and --grid-n may change)")
    longer = {k: given[k] for k in RESUME_MAY_CHANGE if k in given}
    return replace(saved, **longer), ckpt

# a flow has no betas and no SNR weight
FLOW_UNUSED = dict(schedule="linear", min_snr_gamma=0.0)

def flow_settings(preset, given):
    """--objective flow's recipe: a flag that cannot apply to a flow is refused; a preset's value
    that cannot is dropped, with a line that says so."""
    for name, off in FLOW_UNUSED.items():
        if name in given and given[name] != off:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {given[name]}: a flow model (--objective flow) "
                            "has no noise schedule and no min-SNR weighting; leave it out")
    dropped = []
    for name, off in FLOW_UNUSED.items():
        value = getattr(PRESETS[preset], name)
        if value != off:
            dropped.append(f"{name} {value}")
    if dropped:
        these = " and ".join(dropped)
        note(f"note: --objective flow: the preset's {these} do not apply to a "
             "flow model; left out")
    return {**FLOW_UNUSED, **given}

def cmd_train(args):
    cfg, ckpt = train_config(args)
    check_run_folder(args.run_dir)
    device, rank, world = start_processes(args, cfg)
    set_fast_math(device)
    images, labels = read_data(cfg, args.data_dir)
    spe, total = plan_steps(args, cfg, ckpt, len(images))
    graph, step_mode = fast_path(args, device, world)
    with blame("--batch-size", device, also="--channels"):
        p, loss_fn = build_run(cfg, device, world, args.compile, graph)
        start = restore(ckpt, p, Path(args.run_dir) / "ckpt.pt") if ckpt else 0
    if rank == 0:
        dtype, why = choose_precision(device, cfg.precision)
        precision = f"{PRECISION_NAMES[dtype]} ({why})"
        resumed_at = start if ckpt else None
        describe_run(cfg, p, device, world, precision, spe, resumed_at, step_mode)
    bk = open_books(args, cfg, p, ckpt, start, spe, total, rank, world)
    run_steps(bk, images, labels, loss_fn, rank)
    close_books(bk)

def check_run_folder(run_dir):
    """train makes the folder and its parents: the nearest that exists must be a writable
    folder."""
    folder = Path(run_dir)
    existing = next(a for a in [folder, *folder.parents] if a.exists())
    if not existing.is_dir():
        raise UserError(f"--run-dir {run_dir}: {existing} is a file")
    if not writable(existing):
        raise UserError(f"--run-dir {run_dir}: {existing} is not writable")

def plan_steps(args, cfg, ckpt, n_images):
    """(steps per epoch, the step this invocation stops at), refused where there is no step to
    take or the data is not the run's."""
    spe = n_images // cfg.batch_size
    if ckpt and ckpt.get("steps_per_epoch", spe) != spe:
        raise UserError(f"--data-dir {args.data_dir}: {n_images} training images make {spe} "
                        f"steps an epoch, and the run took {ckpt['steps_per_epoch']}; resume "
                        "it on its own data")
    if spe == 0:
        raise UserError(f"--batch-size {cfg.batch_size}: larger than the {n_images} "
                        "training images")
    total = min(args.max_steps or math.inf, cfg.epochs * spe)
    if ckpt and isinstance(ckpt["step"], int) and ckpt["step"] >= total:
        raise UserError(f"--resume: {Path(args.run_dir) / 'ckpt.pt'} is at step "
                        f"{ckpt['step']} already; give more --epochs (or a larger --max-steps) "
                        f"than the {total} steps asked for")
    return spe, total

def fast_path(args, device, world):
    """(whether to replay CUDA graphs, how a step runs, in words)."""
    why_not = graph_unsupported(device, world) if args.cuda_graph else None
    graph = args.cuda_graph and not why_not
    step_mode = "compiled" if args.compile or graph else "eager"
    if graph:
        step_mode += " and replayed from CUDA graphs"
    elif args.cuda_graph:
        step_mode += f" (--cuda-graph: {why_not})"
    return graph, step_mode

def run_steps(bk, images, labels, loss_fn, rank):
    """Part I's loop with this run's draws and books. A full disk, or a step or grid out of
    memory, stops the run with exit code 1 and names its last checkpoint."""
    cfg, p, device = bk.cfg, bk.p, bk.p.gen.device
    try:
        with blame("--batch-size", device, also="--channels"):
            data = images.to(device)
            draw = training_draw(cfg, data, labels.to(device), p, rank, bk.world)
            on_step = functools.partial(keep_books, bk)
            train(cfg, data, p, bk.start, on_step, draw, loss_fn)
    except (OSError, UserError) as e:
        end_run(bk)
        if bk.lead:
            why = os_reason(e) if isinstance(e, OSError) else str(e)
            note(f"error: {why}; {last_checkpoint(bk)}")
        leave(1, bk.world)

def describe_run(cfg, p, device, world, precision, spe, resumed_at, step_mode):
    """train's first lines: how the recipe departs from the case study's, then the run."""
    paper = PRESETS["paper"]
    # the tool's own settings, not the recipe's
    not_recipe = ("preset", "precision", "seed", "grid_n")
    changes = []
    for f in fields(RunConfig):
        ours, case_study = getattr(cfg, f.name), getattr(paper, f.name)
        if f.name not in not_recipe and ours != case_study:
            changes.append(f"{f.name} {ours} (case study: {case_study})")
    if changes:
        print(f"recipe: --preset {cfg.preset}, departing from the case study's in")
    for change in changes:
        print(f"  {change}")
    line = f"UNet: {count_params(p.model):,} parameters, channels {cfg.channels}"
    if cfg.num_classes:
        line += f", class-conditional (p_uncond {cfg.p_uncond})"
    line += f"; device {device}"
    if world > 1:
        line += f" x {world} processes"
    line += f"; {precision}; {spe} steps/epoch, {cfg.epochs} epochs"
    if resumed_at is not None:
        line += f"; resuming at step {resumed_at}"
    print(line)
    if resumed_at is not None:
        print("resume: the run's own recipe, from its checkpoint; config.json and "
              "--preset are not read again, and only --epochs and --grid-n may change")
    print(f"step: {step_mode}")
    if device.type == "cpu" and cfg.preset == "paper":
        note("note: the case-study recipe takes many hours on a CPU; `--preset cpu` "
             "makes digits in about 12 minutes on 2 cores (README, Set up)")

def recorded_config(path):
    """The config a checkpoint records, read without its weights, so the flags can be checked
    against its model before any work; the case study's if the file cannot be read (loading it
    then says why)."""
    d = peek(path)
    if not d and Path(path).is_file():     # torch's legacy format cannot be peeked: read whole
        with contextlib.suppress(UserError):
            d = load_checkpoint(path)
    with contextlib.suppress(UserError):
        return config_from_dict(d.get("config"), f"--ckpt {path}")
    return RunConfig()

def sampler_from_args(args, cfg):
    """The Sampler the flags ask for, held to the model of config cfg: a flow model integrates
    its velocity (euler), a noise model takes ddim, dpm++ or ddpm; DDPM takes all T steps, and
    only DDIM has eta."""
    flow = cfg.objective == "flow"
    name = args.sampler or ("euler" if flow else "ddim")
    if flow and name != "euler":
        raise UserError(f"--sampler {name}: this checkpoint is a flow model "
                        "(train --objective flow), which samples with --sampler euler")
    if name == "euler" and not flow:
        raise UserError("--sampler euler: integrates a flow model's velocity, and this "
                        "checkpoint predicts noise; use ddim, dpm++ or ddpm")
    if name == "ddpm" and args.steps not in (None, cfg.T):
        raise UserError(f"--steps {args.steps}: DDPM always takes all T={cfg.T} steps; "
                        "use --sampler ddim for fewer")
    if name == "ddpm" and args.eta:
        raise UserError("--eta: only DDIM has eta; DDPM's noise is fixed by the "
                        "posterior variance")
    if name in ("dpm++", "euler") and args.eta:
        raise UserError(f"--eta: only DDIM has eta; {name} is deterministic")
    if name == "euler" and args.no_clip:
        raise UserError("--no-clip: a flow model's Euler steps predict no x_0 to clip")
    steps = args.steps or (DPM_SOLVER_STEPS if name == "dpm++" else DDIM_STEPS)
    if name in ("ddim", "dpm++") and steps > cfg.T:
        raise UserError(f"--steps {steps}: this model has T={cfg.T} timesteps, "
                        f"so at most {cfg.T}")
    if name == "ddpm":
        steps = cfg.T
    return Sampler(name, steps, args.eta, not args.no_clip)

def load_for_sampling(args, out, suffix, folder=False, classifier=None):
    """What every sampling command does first: its output checked against its inputs, then the
    model, ready to call on its device. Returns the model, its schedule and config. `classifier`:
    evaluate's and compare's, checked too, and then the model must draw digits."""
    path = checkpoint_to_sample(args.ckpt)
    check_out("--out", out, suffix, [path, classifier], folder)
    if classifier is not None:
        check_classifier(classifier, [path])
    device, ckpt = resolve_device(args.device), load_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, args.weights)
    if classifier is not None and cfg.dataset != "mnist":
        raise UserError(f"--ckpt {path}: a {cfg.dataset} model, and evaluate/compare score "
                        "digits with an MNIST classifier; for CIFAR-10 write PNGs (sample "
                        "--format png-dir --n 50000) and use pytorch-fid or clean-fid against "
                        "the CIFAR-10 training set, as the DDPM paper measured")
    if args.ckpt is None and path == SHIPPED_CKPT:
        trained = trained_note(ckpt.get("trained"))
        note(f"note: no {DEFAULT_CKPT} yet, so using the committed weights samples/ema_fp16.pt "
             f"(preset {cfg.preset}, {cfg.dataset.upper()}, {trained}); "
             "`python ddpm_mnist.py train` makes your own")
    dtype = choose_precision(device, args.precision)[0]
    eps_model = Autocast(model.to(device), device, dtype)
    eps_model = fast_eps_model(eps_model, device, args.compile, args.cuda_graph)
    return eps_model, make_schedule(cfg).to(device), cfg

def guidance_from_args(args, cfg, n, ncol):
    """II.2: the labels and scale a conditional model samples with (--class, --guidance), laid out
    ncol to a row; None for an unconditional model, which has no label to ask for."""
    digit = getattr(args, "digit", None)
    if not cfg.num_classes and (digit is not None or args.guidance is not None):
        flag = "--class" if digit is not None else "--guidance"
        raise UserError(f"{flag}: this checkpoint is unconditional (trained without "
                        f"--cond); {flag} needs a class-conditional model")
    if not cfg.num_classes:
        return None
    if digit in (None, "all"):
        labels = digit_rows(n, ncol, cfg.num_classes)
    else:
        labels = torch.full((n,), int(digit))
    scale = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    return Guidance(labels, scale, cfg.num_classes)

def cmd_sample(args):
    if args.gif and args.format != "png":
        raise UserError("--gif: writes a GIF; leave --format at png")
    recorded = recorded_config(checkpoint_to_sample(args.ckpt))
    sampler = sampler_from_args(args, recorded)
    suffixes = {"png": ".png", "npz": ".npz", "png-dir": ""}
    ext = ".gif" if args.gif else suffixes[args.format]
    # dpm++ -> dpmpp: no "+" in a file name
    out = args.out or f"samples/{sampler.name.replace('+', 'p')}_{sampler.steps}{ext}"
    folder = args.format == "png-dir"
    eps_model, schedule, cfg = load_for_sampling(args, out, ext, folder=folder)
    device, t0 = schedule.betas.device, time.time()
    shape = (args.n, *IMAGE_SHAPES[cfg.dataset])
    guide = guidance_from_args(args, cfg, args.n, grid_columns(args.n))
    with blame("--n" if args.gif else batch_flag(args), device):   # a GIF is one batch
        if args.gif:  # the seeds of generate(), so a GIF ends on the grid `sample` would draw
            noise = torch.Generator().manual_seed(args.seed)
            x_T = torch.randn(shape, generator=noise).to(device)
            steps = torch.Generator(device).manual_seed(args.seed + 1)
            model = guide.eps_model_for(eps_model, device) if guide else eps_model
            n_frames = denoising_gif(model, schedule, x_T, sampler, steps, out)
        else:
            images = generate(eps_model, schedule, sampler, shape, args.seed,
                              args.batch_size, guide)
            write_samples(images, out, args.format, guide.labels if guide else None)
    dt = time.time() - t0
    what = f"{n_frames} frames" if args.gif else f"{args.n} samples"
    line = f"wrote {out}: {what}, {sampler.name} {sampler.steps} steps"
    if guide:
        line += f", guidance {guide.scale:g}"
    line += f", {dt:.1f} s on {device}"
    if not args.gif:
        line += f" ({1e3 * dt / args.n:.1f} ms per sample)"
    print(line)

def report_table(r):
    """evaluate's report, a line for each entry, shares in percent."""
    def show(k, v):
        if "share" in k or k.endswith("accuracy"):
            return f"{100 * v:.2f}%"
        if k.endswith("digit"):         # "-": a digit no sample asked for
            cells = []
            for d, a in enumerate(v):
                cells.append(f"{d}:-" if a is None else f"{d}:{100 * a:.0f}%")
            return " ".join(cells)
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = [f"{k.replace('_', ' '):32} {show(k, v)}" for k, v in r.items()]
    return f"N={r['n']} samples\n" + "\n".join(lines)

def check_classifier(path, inputs):
    """evaluate's and compare's --classifier, before any sampling: one that exists is read and
    checked, a new one will be written as .pt."""
    if any(i is not None and same_file(i, path) for i in inputs):
        raise UserError(f"--classifier {path}: is also another input or output "
                        "of this command")
    if Path(path).exists():
        load_classifier(Path(path), torch.device("cpu"))
    elif Path(path).suffix != ".pt":
        raise UserError(f"--classifier {path}: must end in .pt, "
                        "the classifier this writes on first use")

def cmd_evaluate(args):
    if args.n < 2:
        raise UserError(f"--n {args.n}: FID fits a covariance, "
                        "which needs at least 2 samples")
    if args.samples:
        device = resolve_device(args.device)
        out, samples, labels, (train_x, test_x), source = samples_from_file(args)
    else:
        sampler = sampler_from_args(args, recorded_config(checkpoint_to_sample(args.ckpt)))
        device = resolve_device(args.device)
        out, samples, labels, (train_x, test_x), source = samples_from_model(args, sampler,
                                                                           device)
    clf, cache = classifier_cache(args.classifier, args.data_dir, device)
    r = evaluate_samples(samples, clf, cache, train_x, test_x, device,
                         args.seed, labels)
    r.update(source)                        # where the samples came from
    print(report_table(r))
    save_text(json.dumps(r, indent=2) + "\n", out)
    print(f"wrote {out}")

def mnist_images(data_dir):
    """MNIST's training and test images, which evaluate scores samples against."""
    train_x = read_data(RunConfig(), data_dir)[0]
    return train_x, read_data(RunConfig(), data_dir, train=False)[0]

# evaluate's flags that only its sampling reads, at their defaults
SAMPLING_DEFAULTS = dict(guidance=None, weights="ema", sampler=None, steps=None, eta=0.0,
                         no_clip=False, compile=False, cuda_graph=False)

def samples_from_file(args):
    """evaluate --samples: (report path, the samples, their labels or None, MNIST's training
    and test images, where the samples came from)."""
    for name, default in SAMPLING_DEFAULTS.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag}: with --samples nothing is sampled; leave it out")
    if args.out:
        out = Path(args.out)
    else:                                   # beside what it scores
        out = check_in("--samples", args.samples).with_name("evaluate.json")
    check_out("--out", out, ".json", [args.samples, args.classifier])
    check_classifier(args.classifier, [args.samples])
    samples, labels = read_samples(args.samples)
    source = dict(samples_from=f"read from {args.samples}", samples_file=str(args.samples))
    return out, samples, labels, mnist_images(args.data_dir), source

def samples_from_model(args, sampler, device):
    """evaluate's own samples: (report path, the samples, the labels asked for or None,
    MNIST's training and test images, how the samples were drawn)."""
    # samples/ is the project's: a report on committed weights goes to the current folder
    path = checkpoint_to_sample(args.ckpt)
    committed = same_file(path.parent, SHIPPED_CKPT.parent)
    beside = "evaluate.json" if committed else path.with_name("evaluate.json")
    out = Path(args.out or beside)
    eps_model, schedule, cfg = load_for_sampling(args, out, ".json",
                                                 classifier=args.classifier)
    guide = guidance_from_args(args, cfg, args.n, 1)      # conditional: digits 0-9 in turn
    real = mnist_images(args.data_dir)      # now: no data set fails before sampling
    t0 = time.time()
    shape = (args.n, *IMAGE_SHAPES[cfg.dataset])
    with blame(batch_flag(args), device):
        samples = generate(eps_model, schedule, sampler, shape, args.seed,
                           args.batch_size, guide)
    how = f"{sampler.name} {sampler.steps} steps, eta {sampler.eta}"
    if guide:
        how += f", guidance {guide.scale:g}"
    how += f", {args.weights} weights, {time.time() - t0:.0f} s on {device}"
    source = dict(samples_from=how, ckpt=str(path))
    if guide:
        source["guidance"] = guide.scale
    labels = guide.labels if guide else None
    return out, samples, labels, real, source

def compare_rows(cfg):
    """compare's samplers for this model: DDPM's T steps, DDIM at 10, 20, 50 and 100 steps and
    at 50 with eta 1, DPM-Solver++ at 10 and 20 (II.6), each only where the model's T has that
    many steps; or a flow model's Euler at 10, 20 and 50 (II.7)."""
    if cfg.objective == "flow":
        return [(f"Euler {k}", Sampler("euler", k)) for k in (10, 20, 50)]
    rows = [(f"DDPM {cfg.T}", Sampler("ddpm", cfg.T))]
    rows += [(f"DDIM {k}", Sampler("ddim", k)) for k in (10, 20, 50, 100)]
    rows += [("DDIM 50, eta 1", Sampler("ddim", 50, eta=1.0))]
    rows += [(f"DPM++ {k}", Sampler("dpm++", k)) for k in (10, 20)]
    return [(name, sampler) for name, sampler in rows if sampler.steps <= cfg.T]

def cmd_compare(args):
    """Samplers, or with --guidance guidance scales (II.2), from the same x_T and labels: a table
    of scores and a picture of the first samples of each."""
    default = "samples/guidance.png" if args.guidance else "samples/compare.png"
    out = args.out or default
    eps_model, schedule, cfg = load_for_sampling(
        args, out, ".png", classifier=args.classifier)
    if args.guidance and not cfg.num_classes:
        raise UserError("--guidance: this checkpoint is unconditional (trained without "
                        "--cond), so it has no guidance to compare")
    if args.n < 2 * (cfg.num_classes if args.guidance else 1):
        raise UserError(f"--n {args.n}: FID needs 2 samples, and comparing guidance "
                        f"2 of each of the {cfg.num_classes} classes")
    if args.guidance:
        picture = compare_guidance(args, eps_model, schedule, cfg)
    else:
        picture = compare_samplers(args, eps_model, schedule, cfg)
    save_png(picture, out)
    print(f"wrote {out}")

def score_runs(args, eps_model, schedule, cfg, runs):
    """Each (name, sampler, guidance scale) of `runs` from the same x_T, and on a conditional
    model the same labels, digits 0-9 in turn: a row of scores and the images of each."""
    device = schedule.betas.device
    clf, cache = classifier_cache(args.classifier, args.data_dir, device)
    labels = digit_rows(args.n, 1, cfg.num_classes) if cfg.num_classes else None
    shape = (args.n, *IMAGE_SHAPES[cfg.dataset])
    rows, images = [], []
    for name, sampler, scale in runs:
        t0 = time.time()
        guide = None if labels is None else Guidance(labels, scale, cfg.num_classes)
        with blame(batch_flag(args), device):
            x = generate(eps_model, schedule, sampler, shape, args.seed, args.batch_size, guide)
        ms = 1e3 * (time.time() - t0) / args.n                  # sampling alone, per sample
        feats, probs = classify(clf, x, device)
        row = dict(name=name, fid=fid(feats, cache), ms=ms)
        row.update(class_stats(probs))
        if labels is not None:
            row.update(class_accuracy(probs, labels))
        rows.append(row)
        images.append(x)
    return rows, images, labels

def compare_header(args, labels):
    """compare's first line: what every row of the table shares."""
    same = "the same x_T"
    if labels is not None:
        same += " and labels (digits 0-9 in turn)"
    return (f"N={args.n} per row, seed {args.seed}, {same}; "
            "FID in classifier features vs MNIST test")

def compare_samplers(args, eps_model, schedule, cfg):
    """Each sampler of compare_rows: a row of the table and of the picture each."""
    runs = [(name, sampler, DEFAULT_GUIDANCE) for name, sampler in compare_rows(cfg)]
    rows, images, labels = score_runs(args, eps_model, schedule, cfg, runs)
    print(compare_header(args, labels))
    print(f"{'sampler':16} {'FID':>8} {'confident':>9} {'rarest':>7} {'ms/sample':>10}")
    for r in rows:
        print(f"{r['name']:16} {r['fid']:8.3f} {100 * r['confident_share']:8.1f}% "
              f"{100 * r['rarest_share']:6.1f}% {r['ms']:10.2f}")
    cells = torch.stack([x[:10] for x in images])           # (samplers, 10, H, W)
    return labeled_grid(cells, row_labels=[r["name"] for r in rows])

def compare_guidance(args, eps_model, schedule, cfg):
    """The default sampler (DDIM-50, or a flow's Euler-50) at each scale of --guidance: a row of
    the table and a column of the picture each, a picture row per digit."""
    sampler = Sampler("euler") if cfg.objective == "flow" else Sampler()
    runs = [(f"{s:g}", sampler, s) for s in args.guidance]
    rows, images, labels = score_runs(args, eps_model, schedule, cfg, runs)
    header = compare_header(args, labels)
    print(f"{header}; {sampler.name} {sampler.steps} steps; spread: mean "
          "distance between two samples of a digit")
    print(f"{'guidance':>8} {'FID':>8} {'class acc':>9} {'confident':>9} {'spread':>7}")
    for r, x in zip(rows, images):
        spread = same_digit_distance(x, labels)
        print(f"{r['name']:>8} {r['fid']:8.3f} {100 * r['class_accuracy']:8.1f}% "
              f"{100 * r['confident_share']:8.1f}% {spread:7.3f}")
    # (digits, scales, H, W)
    cells = torch.stack([x[:cfg.num_classes] for x in images], dim=1)
    return labeled_grid(cells, row_labels=range(cfg.num_classes),
                        col_labels=[f"s={r['name']}" for r in rows])

def cmd_bench(args):
    cfg = replace(PRESETS[args.preset], precision=args.precision, batch_size=args.batch_size)
    if args.channels:
        cfg = replace(cfg, channels=args.channels)
    device = resolve_device(args.device)
    modes = ["eager"]
    if args.compile:
        modes.append("compiled")
    if args.cuda_graph:
        modes.append("compiled + graph")
    with blame("--batch-size", device, also="--channels"):
        bench(cfg, device, args.reps, modes)

def cmd_forward(args):
    check_out("--out", args.out, ".png")
    images, _ = read_data(RunConfig(), args.data_dir)
    gen = torch.Generator().manual_seed(args.seed)
    images = images[torch.randperm(len(images), generator=gen)[:args.n]]
    schedule = make_schedule(RunConfig(schedule=args.schedule))
    save_png(forward_picture(images, schedule, seed=args.seed), args.out)
    ts = ", ".join(map(str, FORWARD_T))
    print(f"wrote {args.out}: {len(images)} digits at t = {ts}, {args.schedule} schedule")

def cmd_export(args):
    check_out("--out", args.out, ".pt", [args.ckpt])
    ckpt = load_checkpoint(args.ckpt)
    model, cfg = model_from_checkpoint(ckpt)    # checks the weights fit the config
    trained = ckpt.get("trained")               # an export's own record, kept as it is
    step = ckpt.get("step")
    if not isinstance(trained, dict) and isinstance(step, int) and is_number(step):
        # a run's: how long it trained; older runs did not save their steps per epoch
        spe = ckpt.get("steps_per_epoch")
        if not (isinstance(spe, int) and spe > 0):
            spe = max(1, TRAIN_IMAGES[cfg.dataset] // cfg.batch_size)
        trained = dict(step=ckpt["step"], epochs=ckpt["step"] / spe,
                       seconds=ckpt.get("seconds"), device=ckpt.get("device"))
    # fp16 keeps 11 bits of mantissa; the weights of a trained net lie far inside its range
    ema = {k: v.half() for k, v in model.state_dict().items()}
    record = dict(ema=ema, config=asdict(cfg), trained=trained)
    atomic_write(args.out, lambda f: torch.save(record, f))
    mb = Path(args.out).stat().st_size / 1e6
    print(f"wrote {args.out}: {count_params(model):,} EMA weights in fp16, "
          f"{mb:.1f} MB; {trained_note(record['trained'])}")

def main(argv=None):
    """Parse, run the command, and turn every UserError and every error of the operating system
    (a name too long, a loop of links, no permission, a full disk) into one line and exit code 2:
    bad input never shows a traceback. Ctrl-C before training's own handler is exit code 130."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_reason(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    main()
