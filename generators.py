"""Generative models on SoftVQ latents: DiT, SiT and MAR, with their algorithms kept apart.

Paper: "SoftVQ-VAE: Efficient 1-Dimensional Continuous Tokenizer" (arXiv 2412.10958), Sec. 2.2,
Sec. 4 and App. C.2. The generators model normalised latents z of shape (B, L, D) (L = 64 tokens of
D = 32, or L = 32 of D = 64), class-conditionally on ImageNet labels.

Networks (hold the weights; official parameter names, so released SiT/DiT files load unchanged):
  DiT   adaLN-Zero transformer over the L tokens (patch size 1: x_embedder = Linear(D -> width)),
        fixed 1-D sin-cos position embedding. DiT and SiT share it; DiT outputs 2*D (epsilon and
        learned sigma), SiT outputs D (velocity). XL = 28 blocks x 1152 wide x 16 heads = 675M.
  MAR   MAE-style encoder-decoder transformer + a per-token MLP diffusion head (Li et al. 2024).
Algorithms (no weights; each wraps any model_fn(x, t, y)):
  GaussianDiffusion  DDPM, cosine noise schedule, epsilon prediction + learned sigma (hybrid loss of
                     improved DDPM), 1000 training steps, respaced ancestral sampling ("ddpm").
  Interpolant        x_t = alpha_t x + sigma_t eps, velocity prediction, cosine or linear path,
                     samplers "sde" (Euler-Maruyama), "ode-euler", "ode-heun".
  MAR masked generation (MAR.loss / MAR.sample): random order, cosine masking schedule, linear CFG
                     schedule, GaussianDiffusion on the per-token head.
Classifier-free guidance always runs ONE doubled batch [cond; null] (guided_prediction).

Public API: GeneratorConfig, GEN_PRESETS, make_generator(preset, num_tokens, token_dim,
num_classes=1000, **overrides), build_generator(config), model.loss(x, y), model.sample(y, steps,
cfg_scale, guidance_interval, sampler, temperature, generator), SAMPLERS, PAPER_CFG / paper_cfg,
load_released(folder), save_released(model, folder, latent_mean, latent_std), count_params,
count_macs, model_stats.

    model = make_generator("SiT-XL", num_tokens=64, token_dim=32)
    loss = model.loss(z, y)                                  # z: normalised latents, y: labels
    z = model.sample(y, cfg_scale=1.75, guidance_interval=(0.0, 0.7))

Time conventions: SiT time t in [0, 1], t = 0 data and t = 1 noise (the official SoftVQ / REPA
sampler). DiT timesteps are integers k in [0, 1000), k = 0 least noisy; a guidance interval
[lo, hi] is applied to DiT at t = k / 1000 — the DDPM cosine schedule abar_k = cos^2(pi/2 (k/T + s)
/ (1 + s)) is, up to s = 0.008, the SiT cosine path alpha_t^2 at t = k/T, so one interval means
nearly the same noise levels for both.

Run `python generators.py --flops` for parameter counts and GFLOPs (multiply-accumulates, batch 1)
of DiT-XL / SiT-XL at 32 and 64 tokens and MAR-H, beside the paper's Table 1. Tests:
`python -m pytest -q tests/test_generators.py`. This file imports only torch (safetensors is
imported inside load_released / save_released).

Export a trained SiT / DiT (and its tokenizer) in the released format, EMA weights by default:
    python generators.py --export runs/sit-xl-L-64/ckpt.pt out/sit-xl_softvq-l-64 \
        --tokenizer-out out/softvq-l-64
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- constants (paper App. C.2, official DiT / SiT / REPA / MAR code) ----
FREQ_EMBED_DIM = 256        # sinusoidal timestep features fed to t_embedder.mlp (DiT)
MAX_PERIOD = 10000          # period of the sinusoidal time / position features
NORM_EPS = 1e-6             # LayerNorm eps everywhere (DiT, MAR)
COSINE_S = 0.008            # offset of the Nichol & Dhariwal cosine noise schedule
MAX_BETA = 0.999            # beta clip of the cosine schedule
SDE_LAST_T = 0.04           # SDE sampler: last noisy time; one noise-free drift step goes 0.04 -> 0
LOGNORMAL_MEAN, LOGNORMAL_STD = 0.0, 1.0    # official sit_loss.py "lognormal": sigma = exp(N(0, 1))
MASK_RATIO_STD = 0.25       # MAR: truncated normal of mask ratios centred at 1.0, std 0.25

ARCHS = ("dit", "sit", "mar")
SAMPLERS = {"dit": ("ddpm",), "sit": ("sde", "ode-euler", "ode-heun"), "mar": ("ddpm",)}


def check_sampling(arch, sampler, temperature=1.0, guidance_interval=(0.0, 1.0)):
    """Refuse sampling settings that `arch` cannot use, before anything is sampled (ValueError
    naming the setting; sample.py calls it up front and shows the message as a one-line error):
    a sampler of another family (SAMPLERS), a temperature with an ODE sampler (the temperature
    scales injected noise, and ODE samplers inject none) and a guidance interval for MAR (its CFG
    follows its own linear schedule)."""
    if sampler not in SAMPLERS[arch]:
        raise ValueError(f"the {sampler} sampler does not sample {arch.upper()}: its samplers are "
                         f"{', '.join(SAMPLERS[arch])}")
    if sampler.startswith("ode") and temperature not in (None, 1.0):
        raise ValueError(f"temperature {temperature} with the {sampler} sampler: the temperature scales "
                         "injected noise and ODE samplers inject none (use an SDE sampler)")
    if arch == "mar" and tuple(guidance_interval) != (0.0, 1.0):
        raise ValueError("MAR uses its linear CFG schedule; guidance_interval must be (0.0, 1.0)")
NOISE_SCHEDULES = ("cosine", "linear")
PATHS = ("cosine", "linear")
T_SAMPLINGS = ("uniform", "lognormal")

# Paper App. C.2: CFG scales found by grid search; SiT with guidance interval [0, 0.7] of t.
PAPER_CFG = {
    "dit": {64: dict(cfg_scale=1.35, guidance_interval=(0.0, 1.0)),
            32: dict(cfg_scale=1.45, guidance_interval=(0.0, 1.0))},
    "sit": {64: dict(cfg_scale=1.75, guidance_interval=(0.0, 0.7)),
            32: dict(cfg_scale=2.25, guidance_interval=(0.0, 0.7))},
    "mar": {64: dict(cfg_scale=3.0, guidance_interval=(0.0, 1.0)),
            32: dict(cfg_scale=3.0, guidance_interval=(0.0, 1.0))},
}

# Paper Table 1: GFLOPs per forward (multiply-accumulates) on SoftVQ latents.
PAPER_GFLOPS = {("DiT-XL", 32): 14.52, ("DiT-XL", 64): 28.81, ("SiT-XL", 32): 14.73,
                ("SiT-XL", 64): 29.23, ("MAR-H", 32): 67.93, ("MAR-H", 64): 86.55}


@dataclass
class GeneratorConfig:
    arch: str = "sit"               # "dit" | "sit" | "mar"
    width: int = 1152               # DiT/SiT width; MAR encoder width
    depth: int = 28                 # DiT/SiT blocks; MAR encoder blocks
    heads: int = 16
    num_tokens: int = 64            # L
    token_dim: int = 32             # D
    num_classes: int = 1000         # label `num_classes` is the null class used for CFG
    class_dropout: float = 0.1      # label drop probability in training (CFG)
    mlp_ratio: float = 4.0
    sampler: str = "sde"            # default sampler, see SAMPLERS
    sampling_steps: int = 250       # DiT / SiT default sampling steps
    # ---- DiT: GaussianDiffusion ----
    learn_sigma: bool = False       # DiT presets: True, output 2*D (epsilon, sigma); SiT: ignored
    diffusion_steps: int = 1000     # training steps T (DiT and the MAR head)
    noise_schedule: str = "cosine"  # App. C.2: cosine for DiT (linear gave very similar results)
    # ---- SiT: Interpolant ----
    path: str = "cosine"            # App. C.2: cosine; official README trains "linear" (see README)
    t_sampling: str = "uniform"     # "uniform" | "lognormal" (sigma = exp(N(0, 1)) mapped to t)
    # ---- MAR ----
    dec_width: int = 1280
    dec_depth: int = 20
    dec_heads: int = 16
    head_width: int = 1536          # per-token diffusion MLP
    head_depth: int = 12
    head_sampling_steps: int = 100
    diffusion_batch_mul: int = 4    # each token's loss is evaluated 4x with independent t / noise
    mask_ratio_min: float = 0.7
    buffer_size: int = 64           # class-embedding tokens prepended to the encoder sequence
    dropout: float = 0.1            # MAR attention and projection dropout


def _dit(width, depth, heads, **kw):
    return GeneratorConfig(arch="dit", width=width, depth=depth, heads=heads, sampler="ddpm",
                           learn_sigma=True, **kw)


def _sit(width, depth, heads, **kw):
    return GeneratorConfig(arch="sit", width=width, depth=depth, heads=heads, sampler="sde",
                           learn_sigma=False, **kw)


def _mar(width, depth, heads, head_width, head_depth, **kw):
    return GeneratorConfig(arch="mar", width=width, depth=depth, heads=heads, dec_width=width,
                           dec_depth=depth, dec_heads=heads, head_width=head_width,
                           head_depth=head_depth, sampler="ddpm", **kw)


# Sizes: DiT/SiT S/B/L/XL as the DiT paper; MAR B/L/H encoder = decoder as LTH14/mar, with the
# diffusion-head sizes of its README (B 6x1024, L 8x1280, H 12x1536). Tiny: CPU tests and demos.
GEN_PRESETS = {
    "DiT-S": _dit(384, 12, 6), "DiT-B": _dit(768, 12, 12), "DiT-L": _dit(1024, 24, 16),
    "DiT-XL": _dit(1152, 28, 16), "DiT-tiny": _dit(64, 2, 4),
    "SiT-S": _sit(384, 12, 6), "SiT-B": _sit(768, 12, 12), "SiT-L": _sit(1024, 24, 16),
    "SiT-XL": _sit(1152, 28, 16), "SiT-tiny": _sit(64, 2, 4),
    "MAR-B": _mar(768, 12, 12, 1024, 6), "MAR-L": _mar(1024, 16, 16, 1280, 8),
    "MAR-H": _mar(1280, 20, 16, 1536, 12),
    "MAR-tiny": _mar(64, 2, 4, 64, 2, buffer_size=4),
}


# =====================================================================================
# Building blocks
# =====================================================================================

def timestep_embedding(t, dim=FREQ_EMBED_DIM):
    """Sinusoidal features of (possibly fractional) times t (N,) -> (N, dim), [cos | sin] (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(length, dim):
    """Fixed 1-D position embedding (length, dim), sin on even and cos on odd channels.

    This is the official SoftVQ DiT/SiT layout (`positionalencoding1d`); released checkpoints carry
    the buffer anyway."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(MAX_PERIOD) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift; shift/scale are per sample (B, W), x (B, L, W) or (B, W)."""
    if x.dim() > shift.dim():
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv (timm names `qkv`, `proj`)."""

    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, W)))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm names). DiT uses the tanh GELU, MAR the exact one."""

    def __init__(self, width, hidden, approximate="none", dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (256) -> Linear -> SiLU -> Linear (official `t_embedder.mlp`)."""

    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t))


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class (index num_classes) for CFG."""

    def __init__(self, num_classes, width):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y):
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """adaLN-Zero block: conditioning c gives shift/scale/gate for attention and MLP (DiT Fig. 3)."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear to the output channels (DiT and the MAR head)."""

    def __init__(self, width, out_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Block(nn.Module):
    """Pre-norm ViT block (timm `Block`) with attention/projection dropout, used by MAR."""

    def __init__(self, width, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=NORM_EPS)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=NORM_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio), dropout=dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ResBlock(nn.Module):
    """MAR head block: x + gate * MLP(modulate(LN(x))), conditioning y = time + token condition."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


def _init_weights(module):
    """DiT/MAR init: xavier-uniform Linear weights, zero biases (adaLN-Zero layers zeroed after)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def _zero(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


# =====================================================================================
# Classifier-free guidance
# =====================================================================================

def guided_prediction(model_fn, x, t, y, y_null, scale, channels=None):
    """CFG with ONE doubled batch: out = uncond + scale * (cond - uncond).

    y_null is the unconditional condition (null labels, or MAR's unconditional head conditions).
    `channels` limits guidance to the first channels (the epsilon part of a learned-sigma output);
    the remaining channels (sigma) are taken from the conditional half, as in DiT."""
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
    cond, uncond = out.chunk(2)
    if channels is None:
        return uncond + scale * (cond - uncond)
    guided = uncond[..., :channels] + scale * (cond[..., :channels] - uncond[..., :channels])
    return torch.cat([guided, cond[..., channels:]], dim=-1)


def _predict(model_fn, x, t, y, y_null, scale, channels=None):
    """Conditional prediction when scale == 1 (one plain pass), else CFG."""
    if scale == 1.0:
        return model_fn(x, t, y)
    return guided_prediction(model_fn, x, t, y, y_null, scale, channels)


def _randn(shape, like, generator):
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _expand(a, x):
    """Per-sample coefficients (N,) (CPU float64 tables) -> broadcastable to x, on x's device.
    The host-to-device copy is asynchronous: no device sync in the training / sampling loops."""
    return a.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, *([1] * (x.dim() - 1)))


def _check_interval(guidance_interval):
    lo, hi = guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval}")
    return lo, hi


# =====================================================================================
# Algorithm 1: DDPM with the cosine schedule and learned sigma (DiT; also the MAR head)
# =====================================================================================

def _mean_flat(a):
    return a.flatten(1).mean(1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_nll(x, mean, log_scale):
    """-log p(x) of a Gaussian integrated over 8-bit bins of [-1, 1] (DDPM's decoder term).

    DiT and MAR keep this image-space term for latents too (only for t = 0, 1/1000 of draws); we
    do the same, with the exact normal CDF instead of their tanh approximation."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1.0 / 255))
    log_probs = torch.where(
        x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
        torch.where(x > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                    torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_probs


class GaussianDiffusion:
    """DDPM (Ho et al.) with improved-DDPM choices: cosine schedule, learned variance.

    The model returns epsilon (D channels), plus with learn_sigma D channels v in [-1, 1] that
    interpolate log-variance between the posterior variance beta~_t and beta_t (Nichol & Dhariwal
    Eq. 15). Loss = MSE(eps) + (T / 1000) * L_vlb term with the mean frozen, i.e. lambda = 0.001 on
    the T-term VLB (iDDPM Sec. 3.1; DiT `RESCALED_MSE`). Sampling respaces to fewer steps.
    The schedule tables are float64 on the CPU (also when the model is built inside a
    `torch.device(...)` context): they are indexed by CPU timestep indices and copied per use."""

    def __init__(self, num_steps=1000, schedule="cosine", learn_sigma=True):
        if schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")
        self.num_steps, self.learn_sigma = num_steps, learn_sigma
        steps = torch.arange(num_steps + 1, dtype=torch.float64, device="cpu") / num_steps
        if schedule == "cosine":   # Nichol & Dhariwal Eq. 17
            abar = torch.cos((steps + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=MAX_BETA)
        else:                      # DDPM linear schedule, scaled to num_steps as in DiT
            scale = 1000 / num_steps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64,
                                   device="cpu")
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.train_coefs = self._coefficients(torch.arange(num_steps, device="cpu"))

    def _coefficients(self, timesteps):
        """Posterior coefficients for the (respaced) chain visiting `timesteps` (increasing)."""
        abar = self.alphas_cumprod[timesteps]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1 - abar / abar_prev
        post_var = betas * (1 - abar_prev) / (1 - abar)
        # the posterior variance is 0 at the first step: clip its log to the next value (iDDPM);
        # a one-step chain has no next value, and its variance is never used (no noise at i = 0)
        first = post_var[1:2] if len(post_var) > 1 else betas[:1]
        post_logvar = torch.log(torch.cat([first, post_var[1:]]))
        return dict(
            sqrt_abar=abar.sqrt(), sqrt_1m_abar=(1 - abar).sqrt(),
            sqrt_recip_abar=(1 / abar).sqrt(), sqrt_recipm1_abar=(1 / abar - 1).sqrt(),
            coef_x0=betas * abar_prev.sqrt() / (1 - abar),
            coef_xt=(1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            post_logvar=post_logvar, log_beta=torch.log(betas),
            # fixed "large" variance (DiT with learn_sigma=False): beta_t, first step beta~_1
            fixed_logvar=torch.log(torch.cat([first, betas[1:]])))

    def _p_mean_logvar(self, out, x_t, i, c):
        """Mean and log-variance of p(x_{t-1} | x_t) from the model output; i indexes chain c."""
        D = x_t.shape[-1]
        eps = out[..., :D]
        x0 = _expand(c["sqrt_recip_abar"][i], x_t) * x_t - _expand(c["sqrt_recipm1_abar"][i], x_t) * eps
        mean = _expand(c["coef_x0"][i], x_t) * x0 + _expand(c["coef_xt"][i], x_t) * x_t
        if self.learn_sigma:
            frac = (out[..., D:] + 1) / 2
            logvar = frac * _expand(c["log_beta"][i], x_t) + (1 - frac) * _expand(c["post_logvar"][i], x_t)
        else:
            logvar = _expand(c["fixed_logvar"][i], x_t).expand_as(x_t)
        return mean, logvar

    def training_losses(self, model_fn, x, y):
        """Per-sample hybrid loss (B,) at t ~ U{0..T-1}."""
        c, D = self.train_coefs, x.shape[-1]
        i = torch.randint(0, self.num_steps, (x.shape[0],), device="cpu")  # indexes the CPU tables
        t = i.to(x.device, non_blocking=True)
        noise = torch.randn_like(x)
        x_t = _expand(c["sqrt_abar"][i], x) * x + _expand(c["sqrt_1m_abar"][i], x) * noise
        out = model_fn(x_t, t.float(), y).to(x.dtype)
        mse = _mean_flat((noise - out[..., :D]) ** 2)
        if not self.learn_sigma:
            return mse
        # VLB term trains only sigma: the epsilon channels are detached (iDDPM Sec. 3.1)
        frozen = torch.cat([out[..., :D].detach(), out[..., D:]], dim=-1)
        mean, logvar = self._p_mean_logvar(frozen, x_t, i, c)
        true_mean = _expand(c["coef_x0"][i], x) * x + _expand(c["coef_xt"][i], x) * x_t
        true_logvar = _expand(c["post_logvar"][i], x)
        kl = _mean_flat(_normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = _mean_flat(_discretized_gaussian_nll(x, mean, 0.5 * logvar)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse + vb * (self.num_steps / 1000.0)

    @torch.no_grad()
    def sample(self, model_fn, noise, y, y_null, steps=250, cfg_scale=1.0,
               guidance_interval=(0.0, 1.0), temperature=1.0, generator=None):
        """Ancestral sampling on `steps` evenly respaced timesteps (DiT's `space_timesteps`).

        CFG is applied at timestep k when lo <= k / T <= hi (see the file header)."""
        lo, hi = _check_interval(guidance_interval)
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps}")
        timesteps = torch.linspace(0, self.num_steps - 1, steps, dtype=torch.float64,
                                   device="cpu").round().long()
        c = self._coefficients(timesteps)
        x, D = noise, noise.shape[-1]
        for i in reversed(range(steps)):
            k = timesteps[i].item()
            t = torch.full((x.shape[0],), float(k), device=x.device)
            scale = cfg_scale if lo <= k / self.num_steps <= hi else 1.0
            out = _predict(model_fn, x, t, y, y_null, scale, channels=D).to(x.dtype)
            rows = torch.full((x.shape[0],), i, device="cpu")    # CPU index into the chain tables
            mean, logvar = self._p_mean_logvar(out, x, rows, c)
            if i > 0:
                mean = mean + torch.exp(0.5 * logvar) * temperature * _randn(x.shape, x, generator)
            x = mean
        return x


# =====================================================================================
# Algorithm 2: stochastic interpolant with velocity prediction (SiT)
# =====================================================================================

class Interpolant:
    """x_t = alpha_t x + sigma_t eps (paper Eq. 3), t = 0 data, t = 1 noise; the model predicts
    the velocity v = alpha'_t x + sigma'_t eps with an MSE loss (SiT / REPA).

    Path: cosine by default (paper App. C.2). The official README trains its SiT with
    `--path-type linear --weighting lognormal` but samples the released models with
    `--path-type cosine`; here one path serves both (path="linear", t_sampling="lognormal" is the
    README's training recipe, and load_released samples with cosine as the README does)."""

    def __init__(self, path="cosine", t_sampling="uniform"):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
        self.path, self.t_sampling = path, t_sampling

    def coefficients(self, t):
        """alpha_t, sigma_t and their time derivatives."""
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        a = t * math.pi / 2
        return torch.cos(a), torch.sin(a), -math.pi / 2 * torch.sin(a), math.pi / 2 * torch.cos(a)

    def sample_t(self, n, device):
        if self.t_sampling == "uniform":
            return torch.rand(n, device=device)
        # log-normal sigma = sigma_t / alpha_t, mapped to t of the path (official sit_loss.py):
        # linear t = sigma / (1 + sigma), cosine t = 2/pi atan(sigma); median t = 0.5 on both
        sigma = torch.exp(LOGNORMAL_MEAN + LOGNORMAL_STD * torch.randn(n, device=device))
        return sigma / (1 + sigma) if self.path == "linear" else 2 / math.pi * torch.atan(sigma)

    def training_losses(self, model_fn, x, y):
        """Per-sample velocity MSE (B,)."""
        t = self.sample_t(x.shape[0], x.device)
        alpha, sigma, d_alpha, d_sigma = (_expand(a, x) for a in self.coefficients(t))
        noise = torch.randn_like(x)
        v = model_fn(alpha * x + sigma * noise, t, y).to(x.dtype)
        return _mean_flat((v - (d_alpha * x + d_sigma * noise)) ** 2)

    def score(self, v, x_t, t):
        """Score -E[eps | x_t] / sigma_t from the velocity: solve the 2x2 system
        x_t = a x + s eps, v = a' x + s' eps for eps (finite for every t in (0, 1])."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(torch.as_tensor(t, dtype=torch.float64))
        eps = (alpha * v - d_alpha * x_t) / (alpha * d_sigma - d_alpha * sigma)
        return -eps / sigma

    @torch.no_grad()
    def sample(self, model_fn, noise, y, y_null, steps=250, sampler="sde", cfg_scale=1.0,
               guidance_interval=(0.0, 1.0), temperature=1.0, generator=None):
        """Integrate from t = 1 (noise) to t = 0 (data) with `steps` model evaluations per path
        step (Heun: 2 per step but the last). CFG applies when lo <= t_step <= hi."""
        lo, hi = _check_interval(guidance_interval)
        if sampler not in SAMPLERS["sit"]:
            raise ValueError(f"sampler must be one of {SAMPLERS['sit']}, got {sampler!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")

        def velocity(x, t, t_step):
            scale = cfg_scale if lo <= t_step <= hi else 1.0
            return _predict(model_fn, x, torch.full((x.shape[0],), t, device=x.device), y, y_null,
                            scale).to(x.dtype)

        x = noise
        if sampler in ("ode-euler", "ode-heun"):
            ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
            for i in range(steps):
                t, t_next = ts[i], ts[i + 1]
                v = velocity(x, t, t)
                x_next = x + (t_next - t) * v
                if sampler == "ode-heun" and i < steps - 1:   # trapezoid; guidance decided at t
                    x_next = x + (t_next - t) * 0.5 * (v + velocity(x_next, t_next, t))
                x = x_next
            return x
        # SDE, Euler-Maruyama on the reverse SDE dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW:
        # any w >= 0 gives the same marginals; w(t) = 2t is the official (REPA) choice. The last
        # step (0.04 -> 0) is the drift only, no noise (the "denoise" step).
        ts = torch.linspace(1.0, SDE_LAST_T, steps, dtype=torch.float64).tolist() + [0.0]
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            w = 2 * t
            v = velocity(x, t, t)
            x = x + (t_next - t) * (v - 0.5 * w * self.score(v, x, t).to(x.dtype))
            if i < steps - 1:
                x = x + math.sqrt(w * (t - t_next)) * temperature * _randn(x.shape, x, generator)
        return x


# =====================================================================================
# Network 1: DiT / SiT
# =====================================================================================

class DiT(nn.Module):
    """adaLN-Zero transformer over L latent tokens with patch size 1; DiT and SiT share it.

    forward(x (B, L, D), t (B,), y (B,)) -> (B, L, 2D) for DiT with learned sigma, else (B, L, D).
    t: DiT timestep index in [0, 1000) (float), SiT time in [0, 1]. y = num_classes is the null
    class. `loss` and `sample` hand `self` to the algorithm (GaussianDiffusion or Interpolant)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.learn_sigma = c.arch == "dit" and c.learn_sigma
        self.x_embedder = nn.Linear(c.token_dim, c.width)
        self.t_embedder = TimestepEmbedder(c.width)
        self.y_embedder = LabelEmbedder(c.num_classes, c.width)
        self.register_buffer("pos_embed", sincos_1d(c.num_tokens, c.width)[None])
        self.blocks = nn.ModuleList(DiTBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.width, c.token_dim * (2 if self.learn_sigma else 1))
        if c.arch == "dit":
            self.algorithm = GaussianDiffusion(c.diffusion_steps, c.noise_schedule, self.learn_sigma)
        else:
            self.algorithm = Interpolant(c.path, c.t_sampling)
        # ---- init (DiT): xavier, N(0, 0.02) embeddings, adaLN-Zero and zero output ----
        self.apply(_init_weights)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            _zero(block.adaLN_modulation[-1])
        _zero(self.final_layer.adaLN_modulation[-1])
        _zero(self.final_layer.linear)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)

    def loss(self, x, y):
        """Training loss on normalised latents x (B, L, D); labels dropped to the null class with
        probability class_dropout (0.1) for classifier-free guidance."""
        drop = torch.rand(y.shape[0], device=y.device) < self.config.class_dropout
        y = torch.where(drop, torch.full_like(y, self.config.num_classes), y)
        return self.algorithm.training_losses(self, x, y).mean()

    @torch.no_grad()
    def sample(self, y, steps=None, cfg_scale=1.0, guidance_interval=(0.0, 1.0), sampler=None,
               temperature=1.0, generator=None):
        """Latents (B, L, D) in the normalised space for labels y (B,); eval mode inside."""
        c = self.config
        sampler = sampler or c.sampler
        check_sampling(c.arch, sampler, temperature, guidance_interval)
        noise = torch.randn((y.shape[0], c.num_tokens, c.token_dim), generator=generator,
                            device=y.device)
        y_null = torch.full_like(y, c.num_classes)
        kw = dict(steps=steps or c.sampling_steps, cfg_scale=cfg_scale,
                  guidance_interval=guidance_interval, temperature=temperature, generator=generator)
        was_training = self.training
        self.eval()
        try:
            if c.arch == "dit":
                return self.algorithm.sample(self, noise, y, y_null, **kw)
            return self.algorithm.sample(self, noise, y, y_null, sampler=sampler, **kw)
        finally:
            self.train(was_training)


# =====================================================================================
# Network 2 + algorithm 3: MAR (masked autoregression with a per-token diffusion head)
# =====================================================================================

class DiffusionHead(nn.Module):
    """MAR's per-token denoiser MLP: (x_t (N, D), t (N,), z (N, cond)) -> (N, 2D) (eps, sigma)."""

    def __init__(self, token_dim, width, depth, cond_dim):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self.apply(_init_weights)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            _zero(block.adaLN_modulation[-1])
        _zero(self.final_layer.adaLN_modulation[-1])
        _zero(self.final_layer.linear)

    def forward(self, x, t, z):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(z)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class MAR(nn.Module):
    """MAE-style encoder/decoder over [64 class-buffer tokens; L tokens] (Li et al. 2024).

    forward(tokens (B, L, D), keep_idx (B, n), class_emb (B, W)) -> per-token conditions z
    (B, L, dec_width). keep_idx lists the known (unmasked) token positions; the encoder sees only
    the buffer and those, the decoder all positions with a learned mask token in the others.
    Names follow LTH14/mar (the head is `head` instead of `diffloss.net`)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        L, W, Wd, buf = c.num_tokens, c.width, c.dec_width, c.buffer_size
        self.class_emb = nn.Embedding(c.num_classes, W)
        self.fake_latent = nn.Parameter(torch.zeros(1, W))          # the "null class" of CFG
        # ---- encoder ----
        self.z_proj = nn.Linear(c.token_dim, W)
        self.z_proj_ln = nn.LayerNorm(W, eps=NORM_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + L, W))
        self.encoder_blocks = nn.ModuleList(Block(W, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(W, eps=NORM_EPS)
        # ---- decoder ----
        self.decoder_embed = nn.Linear(W, Wd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Wd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + L, Wd))
        self.decoder_blocks = nn.ModuleList(Block(Wd, c.dec_heads, c.mlp_ratio, c.dropout)
                                            for _ in range(c.dec_depth))
        self.decoder_norm = nn.LayerNorm(Wd, eps=NORM_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Wd))
        # ---- init (MAR): N(0, 0.02) for embeddings/tokens, xavier Linear; then the head ----
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        self.apply(_init_weights)
        self.head = DiffusionHead(c.token_dim, c.head_width, c.head_depth, Wd)
        self.diffusion = GaussianDiffusion(c.diffusion_steps, c.noise_schedule, learn_sigma=True)

    def forward(self, tokens, keep_idx, class_emb):
        B, L, D = tokens.shape
        buf, pos = self.config.buffer_size, self.encoder_pos_embed_learned
        # ---- encoder on [class buffer; known tokens] ----
        kept = tokens.gather(1, keep_idx[..., None].expand(-1, -1, D))
        kept_pos = pos[:, buf:].expand(B, -1, -1).gather(1, keep_idx[..., None].expand(-1, -1, pos.shape[-1]))
        x = torch.cat([class_emb[:, None] + pos[:, :buf], self.z_proj(kept) + kept_pos], dim=1)
        x = self.z_proj_ln(x)
        for block in self.encoder_blocks:
            x = block(x)
        x = self.decoder_embed(self.encoder_norm(x))
        # ---- decoder on [buffer; all L positions], mask token where unknown ----
        Wd = x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(B, L, Wd)
        full = full.scatter(1, keep_idx[..., None].expand(-1, -1, Wd), x[:, buf:])
        x = torch.cat([x[:, :buf], full], dim=1) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned

    def _mask_ratio(self):
        """One ratio per batch from N(1, 0.25) truncated to [mask_ratio_min, 1] (inverse CDF)."""
        # on the CPU whatever the default device: .item() below then needs no device sync
        lo = torch.special.ndtr(torch.tensor((self.config.mask_ratio_min - 1.0) / MASK_RATIO_STD,
                                             device="cpu"))
        u = lo + torch.rand((), device="cpu") * (0.5 - lo)    # ndtr(0) = 0.5 is the upper end
        return (1.0 + MASK_RATIO_STD * torch.special.ndtri(u)).clamp(self.config.mask_ratio_min, 1.0).item()

    def loss(self, x, y):
        """Masked-token diffusion loss on latents x (B, L, D) with labels y (B,)."""
        c = self.config
        B, L, D = x.shape
        cls = self.class_emb(y)
        drop = (torch.rand(B, device=x.device) < c.class_dropout)[:, None]
        cls = torch.where(drop, self.fake_latent.expand(B, -1), cls)
        orders = torch.rand(B, L, device=x.device).argsort(dim=1)   # random generation order
        num_masked = math.ceil(L * self._mask_ratio())
        z = self(x, orders[:, num_masked:], cls)
        mask = torch.zeros(B, L, device=x.device).scatter(1, orders[:, :num_masked], 1.0)
        # each token is denoised diffusion_batch_mul times (independent t and noise); masked only
        n = c.diffusion_batch_mul
        losses = self.diffusion.training_losses(
            self.head, x.reshape(B * L, D).repeat(n, 1), z.reshape(B * L, -1).repeat(n, 1))
        mask = mask.reshape(B * L).repeat(n)
        return (losses * mask).sum() / mask.sum()

    @torch.no_grad()
    def sample(self, y, steps=None, cfg_scale=1.0, guidance_interval=(0.0, 1.0), sampler=None,
               temperature=1.0, generator=None):
        """Generate (B, L, D) latents in `steps` = num_iter iterations (default L, one token per
        step; at most L). Step s predicts the tokens that leave the mask as the masked count follows
        L cos(pi/2 (s+1)/num_iter) (MaskGIT); CFG scale rises linearly with the fraction generated,
        1 + (cfg - 1) (L - masked) / L (MAR "linear"); each new token is drawn by the head with
        head_sampling_steps DDPM steps at that scale and `temperature`."""
        c = self.config
        B, L, D = y.shape[0], c.num_tokens, c.token_dim
        num_iter = steps or L
        check_sampling("mar", sampler or "ddpm", temperature, guidance_interval)
        if not 1 <= num_iter <= L:
            raise ValueError(f"MAR steps (num_iter) must be in [1, num_tokens={L}], got {num_iter}")
        was_training = self.training
        self.eval()
        try:
            tokens = torch.zeros(B, L, D, device=y.device)
            orders = torch.rand(B, L, generator=generator, device=y.device).argsort(dim=1)
            cls, null = self.class_emb(y), self.fake_latent.expand(B, -1)
            num_masked = L                             # positions orders[:, :num_masked] are masked
            for step in range(num_iter):
                keep = orders[:, num_masked:]
                if cfg_scale == 1.0:
                    z_cond = z_null = self(tokens, keep, cls)
                else:
                    z = self(tokens.repeat(2, 1, 1), keep.repeat(2, 1), torch.cat([cls, null]))
                    z_cond, z_null = z.chunk(2)
                # masked count after this step: cosine schedule, at least 1 fewer, at least 1 left
                cosine = math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))
                mask_len = max(1, min(num_masked - 1, cosine))
                next_masked = 0 if step == num_iter - 1 else mask_len
                pred = orders[:, next_masked:num_masked]                       # (B, n)
                idx = pred[..., None].expand(-1, -1, z_cond.shape[-1])
                zc, zn = (z.gather(1, idx).reshape(-1, z.shape[-1]) for z in (z_cond, z_null))
                scale = 1.0 + (cfg_scale - 1.0) * (L - mask_len) / L
                noise = _randn((zc.shape[0], D), tokens, generator)
                new = self.diffusion.sample(self.head, noise, zc, zn, steps=c.head_sampling_steps,
                                            cfg_scale=scale, temperature=temperature, generator=generator)
                tokens = tokens.scatter(1, pred[..., None].expand(-1, -1, D), new.view(B, -1, D))
                num_masked = next_masked
            return tokens
        finally:
            self.train(was_training)


# =====================================================================================
# Construction, released weights, parameter / FLOP counts
# =====================================================================================

def build_generator(config):
    """The network for a GeneratorConfig (e.g. rebuilt from a checkpoint's asdict config)."""
    if config.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {config.arch!r}")
    if config.sampler not in SAMPLERS[config.arch]:
        raise ValueError(f"sampler for {config.arch} must be one of {SAMPLERS[config.arch]}, "
                         f"got {config.sampler!r}")
    return MAR(config) if config.arch == "mar" else DiT(config)


def _check_overrides(overrides):
    """ValueError naming any key that is not a GeneratorConfig field."""
    allowed = {f.name for f in fields(GeneratorConfig)}
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(f"unknown GeneratorConfig fields {sorted(unknown)}; allowed: {sorted(allowed)}")


def make_generator(preset, num_tokens, token_dim, num_classes=1000, **overrides):
    """Network of a named preset for L = num_tokens latents of D = token_dim channels."""
    if preset not in GEN_PRESETS:
        raise ValueError(f"unknown generator preset {preset!r}; choose from {sorted(GEN_PRESETS)}")
    _check_overrides(overrides)
    config = replace(GEN_PRESETS[preset], num_tokens=num_tokens, token_dim=token_dim,
                     num_classes=num_classes, **overrides)
    return build_generator(config)


def paper_cfg(arch, num_tokens):
    """The paper's CFG settings (App. C.2) as keyword arguments of `sample`."""
    if arch not in PAPER_CFG or num_tokens not in PAPER_CFG[arch]:
        raise ValueError(f"no paper CFG for arch={arch!r}, tokens={num_tokens}; known: "
                         f"{ {a: sorted(v) for a, v in PAPER_CFG.items()} }")
    return dict(PAPER_CFG[arch][num_tokens])


# Keys of a released file that are training-only heads: REPA-style SiT training can add
# `projectors.*` (alignment MLPs). They are not part of sampling and are skipped on load.
IGNORED_RELEASED_PREFIXES = ("projectors.",)


def load_released(folder, **overrides):
    """Build DiT / SiT from an official release (or one of ours, save_released): `config.json` +
    `model.safetensors`.

    Shapes come from the weights: L from pos_embed, D from x_embedder, width from x_embedder,
    depth from the blocks, learned sigma from final_layer.linear (2*D outputs). heads,
    mlp_ratio and num_classes come from config.json when present (else 16, 4, table rows - 1).
    Arch: "sit" if config.json has `path_type` (the SiT class's argument), "dit" if it has
    `learn_sigma` (the DiT class's), else DiT when sigma is learned and SiT otherwise. SiT samples
    with the cosine path, as the official README does for its released SiT models (override with
    path="linear"). Our exports also carry EXPORT_CONFIG_KEY (the whole GeneratorConfig: path,
    samplers, schedules come from it; it must agree with the weights) and the latent statistics
    the generator was trained with, kept as `model.latent_stats = (mean, std)` (None when
    config.json has none, as in the official releases: then the tokenizer's vq_mean / vq_std
    apply). Strict: missing or unexpected keys and shape mismatches raise ValueError naming them
    (`projectors.*` is skipped, see IGNORED_RELEASED_PREFIXES). overrides: other GeneratorConfig
    fields (sampling settings such as path or sampling_steps)."""
    _check_overrides(overrides)
    paths = {name: os.path.join(folder, name) for name in ("config.json", "model.safetensors")}
    missing_files = [p for p in paths.values() if not os.path.isfile(p)]
    if missing_files:
        raise FileNotFoundError(f"released generator folder lacks {missing_files}")
    from safetensors.torch import load_file
    with open(paths["config.json"]) as f:
        meta = json.load(f)
    state = {k: v for k, v in load_file(paths["model.safetensors"]).items()
             if not k.startswith(IGNORED_RELEASED_PREFIXES)}
    for key in ("pos_embed", "x_embedder.weight", "final_layer.linear.weight"):
        if key not in state:
            raise ValueError(f"{paths['model.safetensors']} lacks {key!r}: not a DiT/SiT state dict")
    L, width = state["pos_embed"].shape[1:]
    D = state["x_embedder.weight"].shape[1]
    out = state["final_layer.linear.weight"].shape[0]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if "path_type" in meta:
        arch = "sit"
    elif "learn_sigma" in meta:
        arch = "dit"
    else:
        arch = "dit" if out == 2 * D else "sit"
    if arch == "sit" and out != D:
        raise ValueError(f"SiT release with {out} output channels; expected D = {D}")
    if arch == "dit" and meta.get("learn_sigma", out == 2 * D) != (out == 2 * D):
        raise ValueError(f"config.json learn_sigma={meta['learn_sigma']} but the final layer has "
                         f"{out} outputs (D = {D})")
    for name, value in (("input_size", L), ("in_channels", D), ("hidden_size", width), ("depth", depth)):
        if name in meta and meta[name] != value:
            raise ValueError(f"config.json {name}={meta[name]} disagrees with the weights ({value})")
    saved = config_from_export(meta[EXPORT_CONFIG_KEY]) if EXPORT_CONFIG_KEY in meta else None
    base = saved or GEN_PRESETS["DiT-XL" if arch == "dit" else "SiT-XL"]
    config = replace(base, arch=arch, num_tokens=L, token_dim=D, width=width, depth=depth,
                     heads=meta.get("num_heads", base.heads), mlp_ratio=meta.get("mlp_ratio", base.mlp_ratio),
                     num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1
                     if "y_embedder.embedding_table.weight" in state else base.num_classes,
                     learn_sigma=out == 2 * D)
    if saved is not None:
        wrong = [f"{f.name}: {getattr(saved, f.name)} vs {getattr(config, f.name)}" for f in fields(config)
                 if getattr(saved, f.name) != getattr(config, f.name)]
        if wrong:
            raise ValueError(f"config.json {EXPORT_CONFIG_KEY} disagrees with the weights and official "
                             f"fields (saved vs found): {wrong}")
    stats = [float(meta[k]) for k in ("latent_mean", "latent_std") if k in meta]
    if len(stats) == 1:
        raise ValueError("config.json holds only one of latent_mean / latent_std")
    model = build_generator(replace(config, **overrides))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"released weights do not match {arch.upper()} (L={L}, D={D}, width={width}, "
                         f"depth={depth}): missing keys {missing}, unexpected keys {unexpected}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"released weights have wrong shapes (file vs model): {wrong}")
    model.load_state_dict(state)
    model.latent_stats = tuple(stats) or None
    return model.eval()


# ---- export in the released format (what we train -> config.json + model.safetensors) ----
# Extra config.json field of our exports: the whole GeneratorConfig (the official SiT / DiT
# classes ignore it: SiT passes unknown fields on as block keyword arguments that its blocks do
# not read, and huggingface_hub drops them for DiT).
EXPORT_CONFIG_KEY = "softvq_generator_config"


def config_from_export(saved):
    """GeneratorConfig from an EXPORT_CONFIG_KEY dict, which must hold exactly its fields."""
    known = {f.name for f in fields(GeneratorConfig)}
    got = set(saved) if isinstance(saved, dict) else set()
    if got != known:
        raise ValueError(f"config.json {EXPORT_CONFIG_KEY} must hold exactly the GeneratorConfig fields: "
                         f"missing {sorted(known - got)}, unknown {sorted(got - known)}")
    return GeneratorConfig(**saved)


def released_state_dict(model):
    """The tensors of a released SiT / DiT file: our names and shapes are the official ones
    (SiT-XL/1, DiT-XL/1 with vae_1d). MAR has no released layout and is refused."""
    if model.config.arch not in ("sit", "dit"):
        raise ValueError(f"cannot export arch {model.config.arch!r}: only SiT and DiT have a released "
                         f"(official) layout")
    return dict(model.state_dict())


def released_config(model, latent_mean, latent_std):
    """config.json of a SiT / DiT export: the official class's constructor arguments (what
    huggingface_hub's save_pretrained writes for SiT / DiT with vae_1d=True, patch size 1), the
    latent mean / std the generator was trained with and EXPORT_CONFIG_KEY (read by load_released)."""
    released_state_dict(model)                                     # refuses MAR
    c = model.config
    fields_ = {"input_size": c.num_tokens, "in_channels": c.token_dim, "hidden_size": c.width,
               "depth": c.depth, "num_heads": c.heads, "mlp_ratio": c.mlp_ratio, "patch_size": 1,
               "vae_1d": True, "class_dropout_prob": c.class_dropout, "num_classes": c.num_classes}
    if c.arch == "sit":
        fields_.update(path_type=c.path, decoder_hidden_size=c.width, use_cfg=c.class_dropout > 0,
                       qk_norm=False)                            # official SiT blocks require qk_norm
    else:
        fields_.update(learn_sigma=model.learn_sigma)
    fields_.update(latent_mean=float(latent_mean), latent_std=float(latent_std),
                   **{EXPORT_CONFIG_KEY: dict(asdict(c), learn_sigma=model.learn_sigma)})  # SiT: False
    return fields_


def save_released(model, folder, latent_mean, latent_std):
    """Write a SiT / DiT as a released folder: config.json (released_config) + model.safetensors
    (released_state_dict). load_released(folder) gives back the same network, config and
    latent_stats. Non-finite weights are refused, naming them. Returns the config.json fields."""
    from tokenizer import write_released_folder      # deferred: this file imports only torch
    meta = released_config(model, latent_mean, latent_std)
    write_released_folder(folder, meta, released_state_dict(model))
    return meta


def export_checkpoint(ckpt, folder, ema=True, tokenizer_folder=None):
    """Export a train_gen.py checkpoint (EMA weights, or the live ones with ema=False) with its
    latent mean / std to `folder`; with tokenizer_folder, also its tokenizer (the EMA weights that
    train_gen.py encoded with) carrying those statistics as vq_mean / vq_std, so the pair samples
    as it was trained. Returns (generator fields, tokenizer fields or None)."""
    import training            # deferred: this model file imports only torch at import time
    if tokenizer_folder is not None and os.path.abspath(tokenizer_folder) == os.path.abspath(folder):
        raise ValueError(f"the generator and its tokenizer need two folders, got {folder} for both")
    state = training.load_checkpoint(ckpt)
    config = state.get("config")
    if not isinstance(config, dict) or "arch" not in config:
        hint = (": it is a train_tok.py checkpoint, export it with python tokenizer.py --export"
                if isinstance(config, dict) and "quantizer" in config else "")
        raise ValueError(f"'{ckpt}' is not a train_gen.py checkpoint{hint}")
    _check_overrides(config)
    key = "ema" if ema else "model"
    if key not in state:
        raise ValueError(f"'{ckpt}' holds no '{key}' weights (keys: {sorted(state)})")
    model = build_generator(GeneratorConfig(**config))
    model.load_state_dict(state[key])
    mean, std = float(state["latent_mean"]), float(state["latent_std"])
    meta = save_released(model, folder, mean, std)
    if tokenizer_folder is None:
        return meta, None
    import tokenizer
    return meta, tokenizer.export_checkpoint(state["tokenizer"], tokenizer_folder, latent_mean=mean,
                                             latent_std=std)


def count_params(model):
    """Trainable + frozen parameters (buffers such as DiT's fixed pos_embed not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model, batch=1, n_keep=None):
    """Multiply-accumulates of one forward (FLOPs / 2), counted by torch's FlopCounterMode.

    Returns (total, linear, attention): `linear` = matmuls of Linear layers, `attention` = the
    rest, i.e. the QK^T and AV products (FlopCounterMode counts no norms or activations). Runs
    on the model's device; on the meta device it needs no memory and takes about a second.
    MAR: encoder over the 64 buffer + n_keep known tokens (default: all L), decoder over 64 + L,
    and one diffusion-head evaluation per token."""
    from torch.utils.flop_counter import FlopCounterMode
    c = model.config
    dev = next(model.parameters()).device
    x = torch.zeros(batch, c.num_tokens, c.token_dim, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    # the math SDPA backend: fused CPU/GPU attention kernels have no FLOP formula and count as 0
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        if c.arch == "mar":
            n_keep = c.num_tokens if n_keep is None else n_keep
            keep = torch.arange(n_keep, device=dev).expand(batch, -1)
            z = model(x, keep, model.class_emb(y))
            model.head(x.reshape(-1, c.token_dim), torch.zeros(batch * c.num_tokens, device=dev),
                       z.reshape(batch * c.num_tokens, -1))
        else:
            model(x, torch.zeros(batch, device=dev), y)
    counts = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops()
    linear = counts.get("addmm", 0) + counts.get("mm", 0)
    return total / 2, linear / 2, (total - linear) / 2


def model_stats():
    """Lines with parameter counts and GMACs of DiT-XL / SiT-XL / MAR-H beside the paper."""
    lines = [f"{'model':8} {'L':>3} {'D':>3} {'params':>9} {'GFLOPs':>7} {'linear':>7} {'attn':>6} "
             f"{'paper':>6}  (GFLOPs = multiply-accumulates of one forward, batch 1)"]
    for preset in ("DiT-XL", "SiT-XL", "MAR-H"):
        for L, D in ((32, 64), (64, 32)):
            with torch.device("meta"):
                model = make_generator(preset, L, D)
            settings = [("", None)] if preset != "MAR-H" else [(" all known", L), (" all masked", 0)]
            for label, n_keep in settings:
                total, linear, attn = count_macs(model, n_keep=n_keep)
                lines.append(f"{preset:8} {L:>3} {D:>3} {count_params(model) / 1e6:8.2f}M {total / 1e9:7.2f} "
                             f"{linear / 1e9:7.2f} {attn / 1e9:6.2f} {PAPER_GFLOPS[(preset, L)]:6.2f}{label}")
    with torch.device("meta"):
        mar_h = make_generator("MAR-H", 256, 16)
    lines.append(f"MAR-H at MAR's own setting (256 tokens of D = 16): {count_params(mar_h) / 1e6:.1f}M "
                 f"parameters (MAR README: 943M)")
    lines.append("MAR-H rows: encoder over the 64 class-buffer tokens + the known tokens (all L, or none "
                 "as in the first generation step), decoder over 64 + L, one head evaluation per token.")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flops", action="store_true", help="print parameter counts and GFLOPs")
    parser.add_argument("--export", nargs=2, metavar=("CKPT", "OUTDIR"),
                        help="write a train_gen.py SiT / DiT checkpoint to OUTDIR in the released format "
                             "(config.json + model.safetensors, with its latent mean / std)")
    parser.add_argument("--raw", action="store_true",
                        help="with --export: the live weights instead of the EMA weights")
    parser.add_argument("--tokenizer-out", metavar="DIR",
                        help="with --export: also export the checkpoint's tokenizer to DIR, its vq_mean / "
                             "vq_std set to the generator's latent mean / std")
    args = parser.parse_args()
    if (args.raw or args.tokenizer_out) and not args.export:
        parser.error("--raw and --tokenizer-out only apply to --export")
    if args.flops:
        print(model_stats())
    elif args.export:
        meta, tok_fields = export_checkpoint(*args.export, ema=not args.raw, tokenizer_folder=args.tokenizer_out)
        print(f"wrote {os.path.join(args.export[1], 'config.json')} and model.safetensors "
              f"({meta[EXPORT_CONFIG_KEY]['arch'].upper()}, latent mean {meta['latent_mean']:.6g}, "
              f"std {meta['latent_std']:.6g})")
        if tok_fields is not None:
            import tokenizer
            print(tokenizer.describe_export(tok_fields, args.tokenizer_out))
    else:
        parser.print_help()
