"""SoftVQ-VAE tokenizer: ViT encoder and decoder with 1-D latent tokens (paper Sec. 3.1, Fig. 2).

    model = make_tokenizer("L", tokens=32)         # SoftVQ-L-32: L = 32 latent tokens of D = 64
    z_q = model.encode(x)                          # x: (B, 3, H, W) in [-1, 1] -> (B, L, D)
    x_rec = model.decode(z_q)                      # -> (B, 3, H, W)
    x_rec, z_q, losses, info = model(x)            # training: z_q keeps its gradient

What is in here:
  * DINOv2-style ViT blocks (`VisionTransformer`) whose parameter names are those of the DINOv2 /
    DINO / timm state dicts, so the original `.pth` files load without renaming.
  * `SoftVQVAE`: encoder ViT over [cls, N image patches, L learnable latent tokens] -> the L latent
    outputs -> `quant_conv` -> quantizer (quantizers.py) -> `post_quant_conv` -> decoder ViT over
    [cls, N mask tokens, L latents] -> the N mask outputs -> linear head -> pixels.
  * `TokenizerConfig`, `PRESETS` (S, B, BL, L of the paper; `tiny` for CPU), `make_config`,
    `make_tokenizer`, `count_parameters` / `parameter_counts`.
  * Loaders: `load_dinov2` (encoder init, alignment teacher), `load_dino` (frozen discriminator
    backbone), `load_released` (official SoftVQ checkpoints from the model hub); `save_released`
    writes ours in that format.
  * The other alignment teachers of Table 4: `ClipViT` / `EvaViT` (timm's CLIP-B/16 and
    EVA-02-CLIP-B/16 image towers) with `load_timm_tower`, and `teacher_checkpoint` /
    `load_teacher_checkpoint` for a ViT teacher trained by this project.

Run `python tokenizer.py --count` to print the parameter count of every preset (built on the meta
device, so it is instant). Tests: `python -m pytest -q tests/test_tokenizer.py`.
`python tokenizer.py --export runs/L-64/ckpt.pt out/softvq-l-64` writes a trained tokenizer (EMA
weights; `--raw` for the live ones) in the released format (`save_released`).

This file imports only torch and the standard library (safetensors inside `load_released`,
`save_released` and `load_timm_tower`).
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantizers import QUANTIZERS

# ---- architecture constants (DINOv2 / official timm ViTs) ----
LN_EPS = 1e-6               # LayerNorm eps of DINOv2, DINO and the official tokenizer
MLP_RATIO = 4               # MLP hidden width = 4 x width
LAYERSCALE_INIT = 1e-5      # LayerScale init for randomly initialised blocks (DINOv2 / timm)
INIT_STD = 0.02             # truncated-normal std of random weights and embeddings
CLS_INIT_STD = 1e-6         # timm's cls-token init for a randomly initialised ViT
IN_CHANNELS = 3             # RGB

# Position grids are resized like timm does it (what the official code uses when it loads DINOv2
# and when an image size differs from the model's): bicubic with anti-aliasing.
POS_INTERPOLATION = "bicubic"
# FlexiViT pseudo-inverse patch-kernel resize: the resize operator whose pseudo-inverse is taken.
# timm's checkpoint filter (what the official code loads DINOv2 with) uses bicubic with
# anti-aliasing (PIL's cubic kernel); the FlexiViT paper used bilinear. Either gives the exact
# pinv property for 14 -> 16; the kernels differ slightly, so we follow the official code.
KERNEL_INTERPOLATION = "bicubic"

# Sec. 4 / Table 5: 64 tokens of D = 32 or 32 tokens of D = 64 (other L need an explicit token_dim).
TOKEN_DIMS = {64: 32, 32: 64}

# ViT sizes (width, depth, heads). timm names: vit_small / vit_base / vit_large.
VIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}

# Paper totals in millions ("Implementation Details of SoftVQ-VAE", Sec. 4.1), compared to by
# `python tokenizer.py --count` (the paper does not say whether they hold 32 or 64 tokens).
PAPER_PARAMS_M = {"S": 45, "B": 173, "BL": 391, "L": 608}

DINOV2_SOURCE = "the DINOv2 release (github.com/facebookresearch/dinov2, dinov2_vit{s,b,l}14_pretrain.pth)"
DINO_PATCH_SIZE = 16        # DINO v1 ViT-S/16 and ViT-B/16 (the discriminator backbone)
DINO_PATCH16_SIZES = ("s", "b")
DINO_SOURCE = "the DINO release (github.com/facebookresearch/dino, dino_deitsmall16_pretrain.pth)"


# =============================================================================================
# ViT building blocks (names follow the DINOv2 / timm state dicts)
# =============================================================================================
class Attention(nn.Module):
    """Multi-head self-attention: qkv with bias, softmax(q k^T / sqrt(head_dim)) v, output proj."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, S, C = x.shape
        # (B, S, 3, heads, head_dim) -> three (B, heads, S, head_dim); default scale head_dim^-0.5
        q, k, v = self.qkv(x).reshape(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, S, C))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2, hidden width MLP_RATIO x width."""

    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2); parameter name `gamma` as in the .pth."""

    def __init__(self, width, init=LAYERSCALE_INIT):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    layerscale=False (DINO v1, CLIP) has no ls1/ls2 parameters at all, so their state dicts load
    strictly; eps is the LayerNorm eps (CLIP: 1e-5); layerscale_init the gammas' initial value.
    """

    def __init__(self, width, heads, layerscale=True, eps=LN_EPS, layerscale_init=LAYERSCALE_INIT):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width, layerscale_init) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width)
        self.ls2 = LayerScale(width, layerscale_init) if layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width-dim tokens (a strided conv named `proj` as in timm;
    bias=False for CLIP, whose pre-norm makes a bias redundant)."""

    def __init__(self, patch_size, width, bias=True):
        super().__init__()
        self.proj = nn.Conv2d(IN_CHANNELS, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, width, h, w) -> (B, h*w, width)


def resize_pos_embed(pos_embed, new_grid):
    """Resize a (1, 1 + g*g, C) position embedding (cls first) to a new (h, w) grid.

    The cls position is kept; the square grid is resized bicubically with anti-aliasing (timm's
    default, which the official code relies on: 37x37 DINOv2 grid -> 16x16 at 256 px / patch 16).
    """
    old = math.isqrt(pos_embed.shape[1] - 1)
    if old * old != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed with {pos_embed.shape[1]} positions is not 1 cls + a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode=POS_INTERPOLATION, align_corners=False,
                         antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)


class VisionTransformer(nn.Module):
    """DINOv2-style ViT: cls token, learned absolute 2-D positions (cls included), pre-norm blocks.

    img_size / patch_size fix the stored position grid; any other image size divisible by the patch
    size works (the grid is resized on the fly). layerscale=False gives DINO v1 blocks.
    patch_embed=False drops the patch embedding (the tokenizer's decoder feeds mask tokens).
    eps (LayerNorm eps) and patch_bias serve the CLIP tower (ClipViT).

    Parameter names: cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv,
    attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm.* (= DINOv2/DINO .pth keys).
    """

    def __init__(self, img_size, patch_size, width, depth, heads, layerscale=True, patch_embed=True,
                 eps=LN_EPS, patch_bias=True, layerscale_init=LAYERSCALE_INIT):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.width, self.grid = patch_size, width, img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, width, patch_bias) if patch_embed else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, width))
        self.blocks = nn.ModuleList(Block(width, heads, layerscale, eps, layerscale_init) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=CLS_INIT_STD)      # timm's ViT init (official random init)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)

    def grid_size(self, height, width):
        """Patch grid (h, w) of an image; ValueError unless both sides divide by the patch size."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}; "
                             f"allowed sizes are multiples of {p} (e.g. {p * self.grid})")
        return height // p, width // p

    def add_cls_and_pos(self, tokens, grid):
        """[cls, tokens] + pos_embed (cls position included, timm/DINOv2 order). tokens: (B, h*w, C)."""
        pos = resize_pos_embed(self.pos_embed, grid)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + pos

    def embed(self, x):
        """Images (B, 3, H, W) -> [cls, patches] with positions, (B, 1 + N, C): the input of block 0."""
        if x.dim() != 4 or x.shape[1] != IN_CHANNELS:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if self.patch_embed is None:
            raise ValueError("this ViT was built with patch_embed=False and cannot embed images")
        grid = self.grid_size(x.shape[2], x.shape[3])
        return self.add_cls_and_pos(self.patch_embed(x), grid)

    def forward(self, tokens):
        """Blocks then the final LayerNorm over an already embedded sequence (B, S, C)."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, x, return_blocks=None, include_embed=False):
        """Features of images x (B, 3, H, W) for teachers and discriminators.

        return_blocks=None: the final-LayerNorm tokens (B, 1 + N, C), cls first (patch tokens are
            [:, 1:]); what the alignment teacher uses (DINOv2 last layer, normalised).
        return_blocks=(2, 5, 8, 11): a list with the (un-normalised) output of each listed block,
            0-based, in block order, each (B, 1 + N, C); include_embed=True puts the block-0 input
            (patch embedding + cls + positions) first. The official DINO discriminator taps exactly
            these: the embedding and blocks 2, 5, 8, 11 of ViT-S/16, and adds the cls token to every
            patch token ("readout") itself. Blocks after the last tap are not run.
        """
        x = self.embed(x)
        if return_blocks is None:
            return self(x)
        wanted = set(return_blocks)
        if not wanted <= set(range(len(self.blocks))):
            raise ValueError(f"return_blocks {sorted(wanted)} must be block indices in "
                             f"0..{len(self.blocks) - 1}")
        features = [x] if include_embed else []
        for i, block in enumerate(self.blocks[: max(wanted, default=-1) + 1]):
            x = block(x)
            if i in wanted:
                features.append(x)
        return features


def init_weights(module):
    """Random init: truncated normal (std 0.02) for linear/conv weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:            # CLIP's patch embedding, EVA's k projection
            nn.init.zeros_(module.bias)


def unpatchify(x, grid, patch_size):
    """(B, h*w, p*p*3) -> (B, 3, h*p, w*p). Each vector is ordered (row in patch, column in patch,
    channel), as the official decoder head: reshape (B, h, w, p, p, 3), permute to (B, 3, h, p, w, p)."""
    (h, w), p = grid, patch_size
    x = x.reshape(x.shape[0], h, w, p, p, IN_CHANNELS)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], IN_CHANNELS, h * p, w * p)


# =============================================================================================
# Config and presets
# =============================================================================================
@dataclass
class TokenizerConfig:
    """Everything needed to rebuild a SoftVQVAE (checkpoints store dataclasses.asdict of it)."""
    image_size: int = 256           # training resolution; the stored position grid is image/patch
    patch_size: int = 16            # Sec. 4: patch 16 (N = 256 image tokens at 256 px)
    enc_width: int = 384
    enc_depth: int = 12
    enc_heads: int = 6
    dec_width: int = 384
    dec_depth: int = 12
    dec_heads: int = 6
    num_tokens: int = 64            # L latent tokens
    token_dim: int = 32             # D channels per latent token
    quantizer: str = "softvq"       # a key of quantizers.QUANTIZERS
    codebook_size: int = 8192       # Table 5: K = 8192
    num_codebooks: int = 4          # Table 5: PQ with G = 4 (official: 4 segments of the L tokens)
    codebook_split: str = "tokens"  # "tokens" (official) or "channels" (Eq. 12)
    residual_depth: int = 1         # RQ levels (Eq. 13); 1 = none
    tau: Union[float, str] = 0.07   # Eq. 4 / Table 5; or "learnable"
    posterior: str = "cosine"       # "cosine" (official), "sqeuclid", "euclid" (see quantizers.py)
    entropy_weight: float = 0.01    # lambda_4 (Eq. 7) of the Eq. 4 "kl" term
    entropy_temp: float = 0.01      # official: the entropy term's own temperature
    vq_beta: float = 0.25           # VQ baseline commitment weight (Table 3)
    vq_metric: str = "cosine"       # VQ baseline: "cosine" (official, L2-normalised) or "euclid"
    kl_weight: float = 1e-6         # KL-VAE baseline weight (Table 3)
    # LayerScale gammas of randomly initialised blocks: timm's DINOv2 value 1e-5 (official); a
    # DINOv2-initialised encoder loads its own. The tiny preset, random on both sides, uses 1.0.
    layerscale_init: float = LAYERSCALE_INIT
    # Routing init (not in the paper; see routing_init_): start the random encoder and decoder as a
    # local autoencoder, latent j <-> patch region j. The tiny preset uses it; official: False.
    routing_init: bool = False


def _vit_dims(prefix, size):
    width, depth, heads = VIT_SIZES[size]
    return {f"{prefix}_width": width, f"{prefix}_depth": depth, f"{prefix}_heads": heads}


PRESETS = {
    # Sec. 4: S / B / L use the same ViT size for encoder and decoder; BL = ViT-B enc + ViT-L dec.
    "S": TokenizerConfig(**_vit_dims("enc", "s"), **_vit_dims("dec", "s")),
    "B": TokenizerConfig(**_vit_dims("enc", "b"), **_vit_dims("dec", "b")),
    "BL": TokenizerConfig(**_vit_dims("enc", "b"), **_vit_dims("dec", "l")),
    "L": TokenizerConfig(**_vit_dims("enc", "l"), **_vit_dims("dec", "l")),
    # CPU preset (~1M parameters): 32x32 images, 8x8 patches (N = 16), small codebooks; random init
    # on both sides, so LayerScale at 1.0 and the routing init (README "Why the tiny tokenizer stalled").
    "tiny": TokenizerConfig(image_size=32, patch_size=8, enc_width=96, enc_depth=4, enc_heads=3,
                            dec_width=96, dec_depth=4, dec_heads=3, codebook_size=1024, layerscale_init=1.0,
                            routing_init=True),
}

# quantizer name -> (its keyword argument, the config field that fills it)
QUANTIZER_ARGS = {
    "softvq": (("codebook_size", "codebook_size"), ("num_codebooks", "num_codebooks"),
               ("split", "codebook_split"), ("residual_depth", "residual_depth"), ("tau", "tau"),
               ("posterior", "posterior"), ("entropy_weight", "entropy_weight"),
               ("entropy_temp", "entropy_temp")),
    "gmmvq": (("codebook_size", "codebook_size"), ("num_codebooks", "num_codebooks"),
              ("split", "codebook_split"), ("residual_depth", "residual_depth"),
              ("entropy_weight", "entropy_weight"), ("entropy_temp", "entropy_temp")),
    "vq": (("codebook_size", "codebook_size"), ("beta", "vq_beta"), ("metric", "vq_metric")),
    "kl": (("kl_weight", "kl_weight"),),
    "ae": (),
}


# =============================================================================================
# Routing init: a spatial prior for a tokenizer trained from scratch
# =============================================================================================
# With random weights every attention map is uniform: the encoder's latent tokens see only the
# image's average and the decoder's mask tokens (which differ only by their positions) only the
# latents' average. Both halves must learn position-selective attention before any detail passes,
# and neither learns it while the other is blind (a saddle; README "Why the tiny tokenizer
# stalled"). The official model never meets this: its encoder starts from DINOv2, whose attention
# is already local. routing_init_ wires the random blocks so that the untrained tokenizer starts as
# a local autoencoder (latent j reads patch region j; mask token i reads the latent of its region),
# a starting point that training is free to leave. It only sets initial values (the same
# architecture and parameters), like mimetic init of self-attention (Trockman & Kolter, 2023).
ROUTING_QK_GAIN = 3.0       # beta of q.k = beta <p_i, p_j>: 99.7% of the attention on the own region
ROUTING_SUBPOSITION = 0.1   # a patch's own code beside its region's: small, so that a latent attends
                            # to its patches about as much as to itself


def routing_regions(num_tokens, grid):
    """Which patches each latent token starts with: (region of every patch (h*w,), region of every
    latent (L,)). L < N: the latents tile the (h, w) patch grid in rectangles, as square as L
    allows (L = 32 on 8x8 patches: 2x1 patches each); L >= N: L / N latents per patch."""
    h, w = grid
    if num_tokens >= h * w:
        if num_tokens % (h * w):
            raise ValueError(f"routing_init needs L = {num_tokens} latent tokens to be a multiple of "
                             f"the {h}x{w} = {h * w} patches, or to tile them; choose another number "
                             f"of tokens or routing_init=False")
        return torch.arange(h * w), torch.arange(num_tokens) % (h * w)
    cols = next(c for c in range(math.isqrt(num_tokens - 1) + 1, num_tokens + 1) if num_tokens % c == 0)
    rows = num_tokens // cols
    if h % rows or w % cols:
        raise ValueError(f"routing_init needs the L = {num_tokens} latent tokens to tile the "
                         f"{h}x{w} patch grid ({rows}x{cols} latents do not); choose another "
                         f"number of tokens or routing_init=False")
    patch_region = torch.arange(h)[:, None] // (h // rows) * cols + torch.arange(w)[None, :] // (w // cols)
    return patch_region.flatten(), torch.arange(num_tokens)


@torch.no_grad()
def routing_init_(model):
    """Re-initialise a random SoftVQVAE in place as a local autoencoder (config.routing_init).

    Every block's channels are split: the first P = head_dim carry position only, the rest content.
      * positions: region j (routing_regions) gets a random code r_j on the P channels; patch (or
        mask) position i = r_region(i) + ROUTING_SUBPOSITION * its own code s_i; the encoder's and
        the decoder's latent positions = the codes of their regions. The patch embedding, post_quant_conv and the latent
        and mask tokens write nothing to the position channels.
      * attention: every head's q and k read the position channels only (W_q = W_k = sqrt(beta) I),
        so a token attends to the tokens of its own region; values and the output projection copy
        the content channels (W_o W_v = I on them), so what is attended to is passed on unchanged.
    The MLPs, quant_conv, the quantizer and the pixel head keep their random init.
    """
    cfg = model.config
    grid = (cfg.image_size // cfg.patch_size,) * 2
    patch_region, latent_region = routing_regions(cfg.num_tokens, grid)
    regions = min(cfg.num_tokens, grid[0] * grid[1])
    for vit, latent_pos, own_token in ((model.encoder.model, model.encoder.latent_pos_embed,
                                        model.encoder.latent_tokens),
                                       (model.decoder.model, model.decoder.latent_pos_embed,
                                        model.decoder.mask_token)):
        width, heads = vit.width, vit.blocks[0].attn.heads
        P = width // heads
        codes = torch.randn(regions, P)                                # r_j
        own = torch.randn(grid[0] * grid[1], P)                        # s_i
        vit.pos_embed.zero_()                                          # cls: no position
        vit.pos_embed[0, 1:, :P] = codes[patch_region] + ROUTING_SUBPOSITION * own
        latent_pos.zero_()
        latent_pos[0, :, :P] = codes[latent_region]
        own_token[..., :P] = 0
        eye_pos, eye_content = torch.eye(P, width), torch.eye(width)[P:]
        for block in vit.blocks:
            qkv, proj = block.attn.qkv, block.attn.proj
            qkv.weight.zero_(), qkv.bias.zero_(), proj.weight.zero_(), proj.bias.zero_()
            for h in range(heads):                                     # q rows, then k rows
                qkv.weight[h * P:(h + 1) * P] = ROUTING_QK_GAIN ** 0.5 * eye_pos
                qkv.weight[width + h * P:width + (h + 1) * P] = ROUTING_QK_GAIN ** 0.5 * eye_pos
            qkv.weight[2 * width + P:] = eye_content                   # v: content channels
            proj.weight[P:] = eye_content
    for layer, vit in ((model.encoder.model.patch_embed.proj, model.encoder.model),
                       (model.post_quant_conv, model.decoder.model)):
        P = vit.width // vit.blocks[0].attn.heads
        layer.weight[:P] = 0
        layer.bias[:P] = 0


# =============================================================================================
# The tokenizer
# =============================================================================================
class Encoder(nn.Module):
    """ViT over [cls, N patches, L latent tokens]; returns the L latent outputs (Sec. 3.1)."""

    def __init__(self, cfg):
        super().__init__()
        self.model = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.enc_width, cfg.enc_depth,
                                       cfg.enc_heads, layerscale_init=cfg.layerscale_init)
        # Sec. 3.1: L extra 1-D learnable tokens with their own 1-D learned positions.
        self.latent_tokens = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.enc_width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.enc_width))
        nn.init.normal_(self.latent_tokens, std=INIT_STD)              # official init
        nn.init.trunc_normal_(self.latent_pos_embed, std=INIT_STD)

    def forward(self, x):
        tokens = self.model.embed(x)                                  # [cls, patches] + pos
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)
        tokens = self.model(torch.cat([tokens, latents], dim=1))      # blocks + final LayerNorm
        return tokens[:, -latents.shape[1]:]                          # keep the L latent outputs


class Decoder(nn.Module):
    """ViT over [cls, N mask tokens, L latents]; the N mask outputs regress pixels (Sec. 3.1).

    The official decoder also carries a timm patch embedding that it never uses; it is not built here
    (load_released drops it).
    """

    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.model = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.dec_width, cfg.dec_depth,
                                       cfg.dec_heads, patch_embed=False, layerscale_init=cfg.layerscale_init)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dec_width))
        self.to_pixel = nn.Linear(cfg.dec_width, IN_CHANNELS * cfg.patch_size ** 2)
        nn.init.normal_(self.mask_token, std=INIT_STD)                 # official init; the pixel
        nn.init.trunc_normal_(self.latent_pos_embed, std=INIT_STD)     # head keeps nn.Linear's own

    def forward(self, z, grid):
        """z: (B, L, dec_width) after post_quant_conv; grid: output patch grid (h, w)."""
        num_patches = grid[0] * grid[1]
        masks = self.mask_token.expand(z.shape[0], num_patches, -1)
        tokens = self.model.add_cls_and_pos(masks, grid)              # [cls, masks] + 2-D pos
        tokens = self.model(torch.cat([tokens, z + self.latent_pos_embed], dim=1))
        pixels = self.to_pixel(tokens[:, 1:1 + num_patches])          # the N mask positions
        return unpatchify(pixels, grid, self.patch_size)


class SoftVQVAE(nn.Module):
    """SoftVQ-VAE (Fig. 2): encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder.

    Module names follow the official checkpoints (encoder.*, quant_conv, quantize, post_quant_conv,
    decoder.*) so released weights map with a few documented renames (see load_released).
    Buffers latent_mean / latent_std (scalars, default 0 / 1) carry the latent normalisation that
    generators use, (z_q - mean) / std (Sec. 4); released checkpoints fill them from vq_mean / vq_std.
    """

    def __init__(self, config):
        super().__init__()
        if config.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {config.quantizer!r}; allowed: {sorted(QUANTIZERS)}")
        self.config = config
        self.encoder = Encoder(config)
        # KL: mean and log-variance straight from the encoder width (official), 2D outputs
        self.quant_conv = nn.Linear(config.enc_width,
                                    config.token_dim * QUANTIZERS[config.quantizer].input_factor)
        kwargs = {arg: getattr(config, field) for arg, field in QUANTIZER_ARGS[config.quantizer]}
        self.quantize = QUANTIZERS[config.quantizer](config.token_dim, config.num_tokens, **kwargs)
        self.post_quant_conv = nn.Linear(config.token_dim, config.dec_width)
        self.decoder = Decoder(config)
        # quant_conv / post_quant_conv keep nn.Linear's default init (uniform, bound 1/sqrt(fan_in)),
        # as the official nn.Linear layers: about 5x the 0.02 of the ViT weights at D = 32, so the
        # decoder's latents start on a par with their position embeddings.
        self.register_buffer("latent_mean", torch.zeros(()))
        self.register_buffer("latent_std", torch.ones(()))
        if config.routing_init:
            routing_init_(self)

    def _encode(self, x):
        """Images -> (z_q, losses, info) from the quantizer."""
        z_hat = self.quant_conv(self.encoder(x))                      # (B, L, D)
        return self.quantize(z_hat)

    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> quantized latents z_q (B, L, D), not normalised.

        Train/eval mode decides sampling where a quantizer has it (KL samples only in training)."""
        return self._encode(x)[0]

    def decode(self, z_q, image_size=None):
        """Latents (B, L, D) -> images (B, 3, H, W); image_size (int or (H, W)) defaults to the
        config's. The same L latents decode at any size divisible by the patch size."""
        L, D = self.config.num_tokens, self.config.token_dim
        if z_q.dim() != 3 or tuple(z_q.shape[1:]) != (L, D):
            raise ValueError(f"decode expects latents of shape (B, {L}, {D}), got {tuple(z_q.shape)}")
        size = self.config.image_size if image_size is None else image_size
        height, width = (size, size) if isinstance(size, int) else size
        grid = self.decoder.model.grid_size(height, width)
        return self.decoder(self.post_quant_conv(z_q), grid)

    def forward(self, x):
        """x (B, 3, H, W) -> (x_rec, z_q, losses, info); x_rec has x's size, z_q keeps its grad."""
        z_q, losses, info = self._encode(x)
        return self.decode(z_q, tuple(x.shape[2:])), z_q, losses, info


def make_config(preset, tokens=64, quantizer="softvq", **overrides):
    """TokenizerConfig of a preset with L = tokens latent tokens and the named quantizer.

    tokens=64 picks D = 32 and tokens=32 picks D = 64 (Sec. 4); any other L needs token_dim=...
    overrides: any other TokenizerConfig field (e.g. image_size=512, codebook_size=4096).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {list(PRESETS)}")
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; allowed: {sorted(QUANTIZERS)}")
    allowed = {f.name for f in dataclasses.fields(TokenizerConfig)} - {"num_tokens", "quantizer"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown config fields {unknown} (num_tokens and quantizer are the "
                         f"`tokens` and `quantizer` arguments); allowed: {sorted(allowed)}")
    token_dim = overrides.pop("token_dim", TOKEN_DIMS.get(tokens))
    if token_dim is None:
        raise ValueError(f"tokens={tokens} has no default token dimension (defaults exist for "
                         f"{sorted(TOKEN_DIMS)}); pass token_dim=...")
    return dataclasses.replace(PRESETS[preset], num_tokens=tokens, token_dim=token_dim,
                               quantizer=quantizer, **overrides)


def make_tokenizer(preset, tokens=64, quantizer="softvq", **overrides):
    """Build a SoftVQVAE from a preset name, L = tokens and a quantizer name (see make_config)."""
    return SoftVQVAE(make_config(preset, tokens, quantizer, **overrides))


# =============================================================================================
# Parameter counts
# =============================================================================================
def count_parameters(module):
    """Number of parameters (buffers such as latent_mean / latent_std are not counted)."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(presets=("S", "B", "BL", "L", "tiny"), tokens=(32, 64)):
    """{(preset, L): {"encoder", "quantizer", "decoder", "total"}} built on the meta device.

    encoder = encoder ViT + latent tokens + quant_conv; quantizer = codebooks;
    decoder = post_quant_conv + mask token + decoder ViT (no patch embedding) + pixel head."""
    counts = {}
    for preset in presets:
        for L in tokens:
            with torch.device("meta"):
                model = make_tokenizer(preset, tokens=L)
            parts = {
                "encoder": count_parameters(model.encoder) + count_parameters(model.quant_conv),
                "quantizer": count_parameters(model.quantize),
                "decoder": count_parameters(model.decoder) + count_parameters(model.post_quant_conv),
            }
            parts["total"] = sum(parts.values())
            counts[(preset, L)] = parts
    return counts


def print_parameter_counts():
    """Print the parameter table of every preset at 32 and 64 tokens next to the paper's totals."""
    print(f"{'preset':<7}{'L':>4}{'D':>5}{'encoder':>11}{'quantizer':>11}{'decoder':>11}"
          f"{'total':>11}{'paper':>9}")
    for (preset, L), parts in parameter_counts().items():
        paper = f"{PAPER_PARAMS_M[preset]}M" if preset in PAPER_PARAMS_M and L == 64 else "-"
        print(f"{preset:<7}{L:>4}{TOKEN_DIMS[L]:>5}"
              + "".join(f"{parts[k] / 1e6:>10.2f}M" for k in ("encoder", "quantizer", "decoder",
                                                              "total"))
              + f"{paper:>9}")


# =============================================================================================
# DINOv2 / DINO v1 weights (encoder init, alignment teacher, discriminator backbone)
# =============================================================================================
def resample_patch_kernel(weight, new_size):
    """FlexiViT pseudo-inverse resize of a conv patch kernel (C, 3, h, w) -> (C, 3, n, n).

    With B the (n*n, h*w) matrix of the linear resize operator (KERNEL_INTERPOLATION with
    anti-aliasing, as timm; column j is the resize of the j-th basis patch), the new kernel is
    pinv(B^T) w, so that for any patch x:
    <resize(x), w_new> = x^T B^T pinv(B^T) w = <x, w> (exact when upsampling, e.g. 14 -> 16).
    """
    C, I, h, w = weight.shape
    if (h, w) == (new_size, new_size):
        return weight
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    resized = F.interpolate(basis, size=(new_size, new_size), mode=KERNEL_INTERPOLATION,
                            align_corners=False, antialias=True)
    B = resized.reshape(h * w, new_size * new_size).T                # (n*n, h*w)
    new = weight.double().reshape(C * I, h * w) @ torch.linalg.pinv(B.T).T
    return new.reshape(C, I, new_size, new_size).to(weight.dtype)


def _read_pth(path, what, source):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights not found: {path}; get the file from {source}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_vit_weights(vit, state, ignore=()):
    """Copy a state dict in vit's own layout (DINO / DINOv2, timm's CLIP / EVA-02 towers) into `vit`
    (strict), resampling what depends on size.

    The patch kernel is resized to vit's patch size (resample_patch_kernel, e.g. 14 -> 16) and the
    position grid to vit's grid (resize_pos_embed, e.g. 37x37 -> 16x16; cls position kept).
    Keys in `ignore` are dropped first. Missing / unexpected keys or wrong shapes -> ValueError
    naming them. Returns vit (its train mode and requires_grad are left as they were).
    """
    state = {k: v for k, v in state.items() if k not in ignore}
    expected = vit.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the ViT: missing keys {missing}; "
                         f"unexpected keys {unexpected}")
    state["patch_embed.proj.weight"] = resample_patch_kernel(state["patch_embed.proj.weight"],
                                                             vit.patch_size)
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], (vit.grid, vit.grid))
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"state dict shapes do not match the ViT: {wrong}")
    vit.load_state_dict(state)
    return vit


def load_dinov2(path, model_or_size, img_size=256, patch_size=16):
    """Load an original DINOv2 checkpoint (dinov2_vit{s,b,l}14_pretrain.pth, no registers).

    model_or_size: a VisionTransformer to fill (e.g. model.encoder.model for the encoder init of
    Sec. 4), or "s" / "b" / "l" to build one at img_size / patch_size (e.g. the frozen alignment
    teacher of Sec. 3.3 at the training resolution with patch 16: N = (img_size / 16)^2 tokens).
    The 14x14 kernel becomes 16x16 by the FlexiViT pseudo-inverse resize, the 37x37 position grid
    is resized bicubically, the cls token is kept; DINOv2's `mask_token` (iBOT masking) has no use
    here and is ignored. Returns the VisionTransformer; freezing (.eval().requires_grad_(False)) is
    the caller's choice.
    """
    if not (isinstance(model_or_size, VisionTransformer) or model_or_size in VIT_SIZES):
        raise ValueError(f"model_or_size must be a VisionTransformer or one of {list(VIT_SIZES)}, "
                         f"got {model_or_size!r}")
    state = _read_pth(path, "DINOv2", DINOV2_SOURCE)
    vit = model_or_size if isinstance(model_or_size, VisionTransformer) else \
        VisionTransformer(img_size, patch_size, *VIT_SIZES[model_or_size])
    return load_vit_weights(vit, state, ignore=("mask_token",))


def load_dino(path, model_or_size="s", img_size=224):
    """Load an original DINO v1 checkpoint (dino_deitsmall16_pretrain.pth: ViT-S/16, no LayerScale,
    pos_embed 197 = 1 + 14x14) into a VisionTransformer without LayerScale.

    model_or_size: a VisionTransformer(..., layerscale=False) to fill, or "s" / "b" to build one at
    img_size with patch 16 (the official discriminator resizes every input to 224 first).
    Returns the VisionTransformer; use forward_features(x, return_blocks=(2, 5, 8, 11),
    include_embed=True) for the discriminator's taps.
    """
    if not (isinstance(model_or_size, VisionTransformer) or model_or_size in DINO_PATCH16_SIZES):
        raise ValueError(f"model_or_size must be a VisionTransformer or one of "
                         f"{list(DINO_PATCH16_SIZES)}, got {model_or_size!r}")
    state = _read_pth(path, "DINO", DINO_SOURCE)
    vit = model_or_size if isinstance(model_or_size, VisionTransformer) else \
        VisionTransformer(img_size, DINO_PATCH_SIZE, *VIT_SIZES[model_or_size], layerscale=False)
    return load_vit_weights(vit, state)

# =============================================================================================
# Other alignment teachers (Table 4): CLIP and EVA-02-CLIP image towers in timm's layout, and
# ViTs saved by this project. Same rule as DINOv2: built at the tokenizer's resolution with the
# teacher's patch size, so the patch tokens lie on the tokenizer's token grid (kernel resampled
# by the FlexiViT pseudo-inverse, position grid bicubically, as timm does when the official code
# calls create_model(name, pretrained=True, img_size=..., patch_size=16)).
# =============================================================================================
CLIP_LN_EPS = 1e-5          # timm: norm_layer=partial(LayerNorm, eps=1e-5) for every *_clip_* ViT
EVA_MLP_RATIO = 4 * 2 / 3   # timm eva02_*: SwiGLU hidden width int(width * 4 * 2 / 3) (2048 at B)
EVA_ROPE_REF_GRID = 16      # timm eva02_base_patch16_clip_224: ref_feat_shape=(16, 16)
EVA_ROPE_THETA = 10000.0    # timm RotaryEmbeddingCat temperature
# the 512-d contrastive projection of both towers: unused (the teacher takes the patch tokens)
TIMM_HEAD_KEYS = ("head.weight", "head.bias")


class ClipViT(VisionTransformer):
    """The CLIP ViT image tower exactly as timm builds `vit_base_patch16_clip_224` (the official
    code's `vit_base_patch16_clip_224.openai` teacher): the DINO-style ViT without LayerScale, with
    a bias-free patch embedding, a LayerNorm `norm_pre` after the position embedding (timm
    pre_norm=True), LayerNorm eps 1e-5, and exact GELU. (OpenAI's own CLIP uses QuickGELU, which
    timm builds only for the `*_clip_quickgelu_*` names; the official code, and so we, use timm's
    GELU model with OpenAI's weights.) Keys: cls_token, pos_embed, patch_embed.proj.weight,
    norm_pre.*, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm.*."""

    def __init__(self, img_size, patch_size, width, depth, heads):
        super().__init__(img_size, patch_size, width, depth, heads, layerscale=False, eps=CLIP_LN_EPS,
                         patch_bias=False)
        self.norm_pre = nn.LayerNorm(width, eps=CLIP_LN_EPS)

    def embed(self, x):
        return self.norm_pre(super().embed(x))


def eva_rope(grid, head_dim):
    """(sin, cos), each (h*w, head_dim): EVA-02's 2-D rotary embedding as timm builds it
    (RotaryEmbeddingCat, in_pixels=False, grid indexing 'ij', interleaved pairs). head_dim/4
    frequencies 1 / 10000^(i / (head_dim/4)) act on the row coordinate (first half of the channels)
    and on the column coordinate (second half); coordinates are index / side * 16, so any grid spans
    the 16x16 reference grid of pre-training. Computed in float32 on the CPU, as timm does."""
    n = head_dim // 4
    bands = 1.0 / EVA_ROPE_THETA ** (torch.arange(n, dtype=torch.float32) / n)
    rows, cols = (torch.arange(s, dtype=torch.float32) / s * EVA_ROPE_REF_GRID for s in grid)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)       # (h, w, 2)
    angles = (coords.unsqueeze(-1) * bands).reshape(grid[0] * grid[1], 2 * n)      # rows, then cols
    angles = angles.repeat_interleave(2, dim=-1)      # one angle per (even, odd) channel pair
    return angles.sin(), angles.cos()


def apply_rope(x, rope):
    """Rotate each (even, odd) channel pair of x (..., N, head_dim) by its angle: timm's
    apply_rot_embed, x * cos + rot(x) * sin with rot(x) = (-x1, x0, -x3, x2, ...)."""
    sin, cos = rope
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)
    return (x * cos + rotated * sin).to(x.dtype)


class EvaAttention(nn.Module):
    """EVA-02 attention (timm EvaAttention, qkv_fused=False, scale_attn_inner=True): separate q / k /
    v projections, k without bias; RoPE on q and k of the patch tokens (the cls token is not rotated);
    a LayerNorm on the heads' output before `proj`."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope):
        B, S, C = x.shape
        q, k, v = (p(x).reshape(B, S, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], rope)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], rope)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(self.norm(x.transpose(1, 2).reshape(B, S, C)))


class SwiGLU(nn.Module):
    """EVA-02 MLP (timm SwiGLU with scale_mlp=True): fc2(norm(silu(fc1_g(x)) * fc1_x(x)))."""

    def __init__(self, width):
        super().__init__()
        hidden = int(width * EVA_MLP_RATIO)
        self.fc1_g = nn.Linear(width, hidden)
        self.fc1_x = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class EvaBlock(nn.Module):
    """Pre-norm EVA-02 block without LayerScale: x + attn(norm1(x), rope), then x + mlp(norm2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = EvaAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = SwiGLU(width)

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class EvaViT(VisionTransformer):
    """The EVA-02-CLIP image tower exactly as timm builds `eva02_base_patch16_clip_224` (the
    official code's `eva02_base_patch16_clip_224.merged2b` teacher, not the MIM-only EVA-02):
    patch embedding with bias, cls token, absolute positions (cls included) and, in every block,
    2-D RoPE (eva_rope), separate q/k/v, a LayerNorm inside attention and a SwiGLU MLP with its own
    LayerNorm; final LayerNorm `norm` (LayerNorm eps 1e-6 throughout). Keys: cls_token, pos_embed,
    patch_embed.proj.*, blocks.{i}.{norm1, attn.q_proj, attn.k_proj.weight, attn.v_proj, attn.norm,
    attn.proj, norm2, mlp.fc1_g, mlp.fc1_x, mlp.norm, mlp.fc2}, norm.*."""

    def __init__(self, img_size, patch_size, width, depth, heads):
        super().__init__(img_size, patch_size, width, 0, heads)    # embeddings and the final norm
        self.head_dim = width // heads
        self.blocks = nn.ModuleList(EvaBlock(width, heads) for _ in range(depth))
        self.blocks.apply(init_weights)

    def forward(self, tokens, grid):
        """Blocks then the final LayerNorm over [cls, h*w patches] (B, 1 + h*w, C)."""
        sin, cos = eva_rope(grid, self.head_dim)
        rope = (sin.to(tokens.device), cos.to(tokens.device))
        for block in self.blocks:
            tokens = block(tokens, rope)
        return self.norm(tokens)

    def forward_features(self, x):
        """Final-LayerNorm tokens (B, 1 + N, C) of images x (B, 3, H, W), cls first (timm's
        forward_features; what the alignment teacher takes, as [:, 1:])."""
        return self(self.embed(x), self.grid_size(x.shape[2], x.shape[3]))


# timm model-hub name -> (tower, (width, depth, heads)); files: huggingface.co/timm/<name>
TIMM_TOWERS = {"vit_base_patch16_clip_224.openai": (ClipViT, (768, 12, 12)),
               "eva02_base_patch16_clip_224.merged2b": (EvaViT, (768, 12, 12))}


def load_timm_tower(path, tower, img_size=224, patch_size=16):
    """Load the model.safetensors of the timm model-hub repository `timm/<name>` (timm's state-dict
    layout, loaded strictly; the unused contrastive head `head.*` is dropped).

    tower: a ClipViT / EvaViT to fill, or a TIMM_TOWERS name to build one at img_size / patch_size
    (the alignment teacher: the tokenizer's resolution and patch 16). The 16x16 kernel is resampled
    when patch_size differs and the 14x14 position grid is resized to the new grid (load_vit_weights).
    Missing / unexpected keys or wrong shapes -> ValueError naming them. Returns the tower; freezing
    is the caller's choice.
    """
    names = {cls: name for name, (cls, _) in TIMM_TOWERS.items()}
    if isinstance(tower, VisionTransformer) and type(tower) in names:
        name = names[type(tower)]
    elif tower in TIMM_TOWERS:
        name = tower
    else:
        raise ValueError(f"tower must be a ClipViT / EvaViT or one of {list(TIMM_TOWERS)}, got {tower!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} weights not found: {path}; get model.safetensors from the "
                                f"model hub (huggingface.co/timm/{name})")
    from safetensors.torch import load_file
    state = {k: v.float() for k, v in load_file(path).items()}      # the hub may hold fp16 tensors
    if not isinstance(tower, VisionTransformer):
        cls, dims = TIMM_TOWERS[name]
        tower = cls(img_size, patch_size, *dims)
    return load_vit_weights(tower, state, ignore=TIMM_HEAD_KEYS)


# A ViT teacher trained by this project (--teacher vit-file): one torch.save'd dict
#   {"format": TEACHER_FORMAT, "arch": {"img_size", "patch_size", "width", "depth", "heads",
#    "layerscale"}, "mean": [r, g, b], "std": [r, g, b], "state_dict": VisionTransformer state dict}
# mean / std: the input normalisation it was trained with, on pixels in [0, 1].
TEACHER_FORMAT = "softvq-vit-teacher-1"
TEACHER_ARCH = ("img_size", "patch_size", "width", "depth", "heads", "layerscale")


def teacher_checkpoint(vit, mean, std):
    """The dict to save (torch.save / training.save_checkpoint) for a DINO-style VisionTransformer
    `vit` trained as a teacher on inputs ((x + 1) / 2 - mean) / std; --teacher vit-file loads it."""
    if type(vit) is not VisionTransformer or vit.patch_embed is None or not len(vit.blocks):
        raise ValueError("a teacher file holds a VisionTransformer with a patch embedding and blocks")
    arch = {"img_size": vit.grid * vit.patch_size, "patch_size": vit.patch_size, "width": vit.width,
            "depth": len(vit.blocks), "heads": vit.blocks[0].attn.heads,
            "layerscale": isinstance(vit.blocks[0].ls1, LayerScale)}
    return {"format": TEACHER_FORMAT, "arch": arch, "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "state_dict": {k: v.detach().cpu() for k, v in vit.state_dict().items()}}


def load_teacher_checkpoint(path, img_size, patch_size):
    """Load a teacher_checkpoint file into a VisionTransformer at img_size / patch_size (kernel and
    position grid resampled as for DINOv2). Returns (vit, mean, std). A file that is not in this
    format, or whose state dict does not match its own `arch`, is a ValueError naming what differs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher file not found: {path} (a dict written from "
                                f"tokenizer.teacher_checkpoint by this project)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path} is not a teacher file of format {TEACHER_FORMAT!r} "
                         f"(tokenizer.teacher_checkpoint)")
    arch = ckpt["arch"]
    if sorted(arch) != sorted(TEACHER_ARCH):
        raise ValueError(f"{path}: arch must have the fields {list(TEACHER_ARCH)}, has {sorted(arch)}")
    with torch.device("meta"):
        expected = VisionTransformer(**arch).state_dict()
    state = ckpt["state_dict"]
    wrong = sorted(k for k in set(expected) | set(state)
                   if k not in state or k not in expected or state[k].shape != expected[k].shape)
    if wrong:
        raise ValueError(f"{path}: state_dict does not match its arch {arch}; keys missing, "
                         f"unexpected or of another shape: {wrong}")
    vit = VisionTransformer(img_size, patch_size, arch["width"], arch["depth"], arch["heads"],
                            arch["layerscale"])
    return load_vit_weights(vit, state), tuple(ckpt["mean"]), tuple(ckpt["std"])


# =============================================================================================
# Released checkpoints (official SoftVQModel: config.json + model.safetensors)
# =============================================================================================
# Official timm names of the ViTs (config.json encoder_model / decoder_model) -> our size key.
RELEASED_VITS = {"vit_small_patch14_dinov2.lvd142m": "s", "vit_base_patch14_dinov2.lvd142m": "b",
                 "vit_large_patch14_dinov2.lvd142m": "l"}
# Key mapping official -> ours. Everything not listed keeps its name.
RELEASED_DROPPED = (
    "quantize.codebook_used",     # usage statistics buffer of the official quantizer
    "decoder.model.patch_embed.",  # the official decoder's timm patch embedding, never used
    "projection.",                # the alignment projector (training only, Sec. 3.3)
)
RELEASED_RENAMED = {"decoder.to_pixel.model.": "decoder.to_pixel."}  # official head wraps a Linear
OFFICIAL_USAGE_SLOTS = 65536      # length of each official codebook_used row
# config.json fields whose official value is the only one this loader reproduces
RELEASED_REQUIRED_VALUES = {"enc_type": "vit", "dec_type": "vit", "use_rope": False,
                            "use_ape": True, "to_pixel": "linear", "dec_cls_token": True,
                            "codebook_l2_norm": True}


def config_from_released(fields):
    """TokenizerConfig from the fields of an official config.json (raises on what we cannot load),
    or of one of our exports that the official fields cannot describe (config_from_export)."""
    if EXPORT_CONFIG_KEY in fields:       # defined with save_released, below
        return config_from_export(fields)
    needed = ("encoder_model", "decoder_model", "image_size", "enc_patch_size", "dec_patch_size",
              "num_latent_tokens", "codebook_embed_dim", "codebook_size", "num_codebooks", "tau")
    absent = [k for k in needed if k not in fields]
    if absent:
        raise ValueError(f"config.json lacks the fields {absent}")
    for key in ("encoder_model", "decoder_model"):
        if fields[key] not in RELEASED_VITS:
            raise ValueError(f"config.json {key}={fields[key]!r} is not supported; allowed: "
                             f"{list(RELEASED_VITS)}")
    unsupported = {k: fields[k] for k, v in RELEASED_REQUIRED_VALUES.items()
                   if k in fields and fields[k] != v}
    if unsupported:
        raise ValueError(f"config.json settings {unsupported} are not supported; this loader "
                         f"needs {RELEASED_REQUIRED_VALUES}")
    if fields["enc_patch_size"] != fields["dec_patch_size"]:
        raise ValueError(f"enc_patch_size {fields['enc_patch_size']} != dec_patch_size "
                         f"{fields['dec_patch_size']} is not supported")
    return TokenizerConfig(
        image_size=fields["image_size"], patch_size=fields["enc_patch_size"],
        **_vit_dims("enc", RELEASED_VITS[fields["encoder_model"]]),
        **_vit_dims("dec", RELEASED_VITS[fields["decoder_model"]]),
        num_tokens=fields["num_latent_tokens"], token_dim=fields["codebook_embed_dim"],
        quantizer="softvq", codebook_size=fields["codebook_size"],
        num_codebooks=fields["num_codebooks"], codebook_split="tokens", residual_depth=1,
        tau=fields["tau"], posterior="cosine",  # codebook_l2_norm: the cosine posterior
        entropy_weight=fields.get("entropy_loss_ratio", TokenizerConfig.entropy_weight),
        kl_weight=fields.get("kl_loss_weight", TokenizerConfig.kl_weight))


def load_released_state_dict(model, state, latent_mean=0.0, latent_std=1.0):
    """Map an official state dict onto `model` and load it strictly.

    Drops RELEASED_DROPPED keys, renames RELEASED_RENAMED prefixes, fills latent_mean / latent_std;
    any other unknown key, a missing key or a wrong shape -> ValueError naming it. Floating tensors
    are loaded as float32. Works on a model built on the meta device (tensors are assigned).
    """
    mapped = {}
    for key, value in state.items():
        if key.startswith(RELEASED_DROPPED):
            continue
        for old, new in RELEASED_RENAMED.items():
            if key.startswith(old):
                key = new + key[len(old):]
        mapped[key] = value.float() if value.is_floating_point() else value
    mapped["latent_mean"] = torch.tensor(float(latent_mean))
    mapped["latent_std"] = torch.tensor(float(latent_std))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(mapped)), sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise ValueError(f"released checkpoint does not match the model: missing keys {missing}; "
                         f"unexpected keys {unexpected}")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in mapped.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"released checkpoint shapes do not match the model: {wrong}")
    model.load_state_dict(mapped, assign=True)
    return model


def released_state_dict(model):
    """Inverse mapping: our model's weights under the official names and shapes (what a released
    model.safetensors holds, without the optional projection.*). The official-only tensors that we
    do not use are filled with zeros: quantize.codebook_used and the decoder patch embedding."""
    state = {}
    for key, value in model.state_dict().items():
        if key in ("latent_mean", "latent_std"):
            continue                      # these travel as vq_mean / vq_std in config.json
        for old, new in RELEASED_RENAMED.items():
            if key.startswith(new):
                key = old + key[len(new):]
        state[key] = value
    cfg, device = model.config, model.latent_mean.device
    state["quantize.codebook_used"] = torch.zeros(cfg.num_codebooks, OFFICIAL_USAGE_SLOTS,
                                                  device=device)
    state["decoder.model.patch_embed.proj.weight"] = torch.zeros(
        cfg.dec_width, IN_CHANNELS, cfg.patch_size, cfg.patch_size, device=device)
    state["decoder.model.patch_embed.proj.bias"] = torch.zeros(cfg.dec_width, device=device)
    return state


def load_released(folder):
    """Load an official released SoftVQ tokenizer from a local folder (config.json +
    model.safetensors, e.g. a download of the SoftVQVAE/softvq-l-64 model-hub repo), or one that
    save_released wrote.

    Sizes come from config.json (encoder_model / decoder_model, never from the folder name);
    vq_mean / vq_std fill latent_mean / latent_std. Returns the model in eval mode.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"released tokenizer folder not found: {folder} (it must hold "
                                f"config.json and model.safetensors from the model hub)")
    paths = {name: os.path.join(folder, name) for name in ("config.json", "model.safetensors")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"released tokenizer file not found: {path}")
    from safetensors.torch import load_file
    with open(paths["config.json"]) as f:
        fields = json.load(f)
    config = config_from_released(fields)
    with torch.device("meta"):            # no random init: every tensor comes from the file
        model = SoftVQVAE(config)
    load_released_state_dict(model, load_file(paths["model.safetensors"]),
                             fields.get("vq_mean", 0.0), fields.get("vq_std", 1.0))
    return model.eval()


# =============================================================================================
# Export in the released format (what we train -> config.json + model.safetensors)
# =============================================================================================
# Official ModelArgs fields (the schema of ../shared/reference/official-softvq-s-64.config.json)
# that do not depend on the model: what our architecture is (RELEASED_REQUIRED_VALUES, the usage
# buffer) and the training-only or CNN-only settings at the released values. One change from the
# released files: enc_pretrained is False (they say True), so the official code builds the
# encoder without first downloading DINOv2 weights that model.safetensors then replaces.
RELEASED_FIXED_FIELDS = {
    **RELEASED_REQUIRED_VALUES, "codebook_show_usage": True, "commit_loss_beta": 0.0,
    "vq_loss_ratio": 0.0, "dropout_p": 0.0, "enc_drop_path_rate": 0.0, "dec_drop_path_rate": 0.0,
    "enc_token_drop": 0.0, "enc_token_drop_max": 0.6, "enc_tuning_method": "full",
    "dec_tuning_method": "full", "enc_pretrained": False, "dec_pretrained": False,
    "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256,
    "rope_mixed": False, "rope_theta": 10.0, "repa": False, "repa_align": "repeat",
    "repa_loss_weight": 0.1, "repa_model": "vit_large_patch14_dinov2.lvd142m",
    "repa_patch_size": 16, "repa_proj_dim": 1024,
}
# What the official fields cannot say (the tiny preset, widths without a timm name, the channel
# split, residual levels, the sqeuclid / euclid posteriors, a learnable tau, GMMVQ, VQ / KL / AE)
# goes into this extra field: the whole TokenizerConfig, which config_from_released reads back.
EXPORT_CONFIG_KEY = "softvq_vae_config"
# encoder_model / decoder_model of such an export: not a timm name, so the official SoftVQModel
# stops while building ("... not found") instead of loading the weights into another model
# (its from_pretrained is not strict by default).
NOT_OFFICIAL_VIT = f"see {EXPORT_CONFIG_KEY}"
# TokenizerConfig fields that only training reads (loss terms, the random init): when they alone
# differ from what the official fields give back, the official code still reproduces the outputs.
TRAINING_ONLY_FIELDS = ("entropy_temp", "vq_beta", "layerscale_init", "routing_init")


def config_from_export(fields):
    """TokenizerConfig of an export with the EXPORT_CONFIG_KEY field (all TokenizerConfig fields);
    the official fields it also holds must agree with it (ValueError naming them)."""
    saved = fields[EXPORT_CONFIG_KEY]
    known = {f.name for f in dataclasses.fields(TokenizerConfig)}
    if not isinstance(saved, dict) or set(saved) != known:
        got = set(saved) if isinstance(saved, dict) else set()
        raise ValueError(f"config.json {EXPORT_CONFIG_KEY} must hold exactly the TokenizerConfig "
                         f"fields: missing {sorted(known - got)}, unknown {sorted(got - known)}")
    config = TokenizerConfig(**saved)
    implied = {"image_size": config.image_size, "enc_patch_size": config.patch_size,
               "dec_patch_size": config.patch_size, "num_latent_tokens": config.num_tokens,
               "codebook_embed_dim": config.token_dim, "codebook_size": config.codebook_size,
               "num_codebooks": config.num_codebooks}
    wrong = {k: f"{fields[k]} vs {v}" for k, v in implied.items() if k in fields and fields[k] != v}
    if wrong:
        raise ValueError(f"config.json fields disagree with its {EXPORT_CONFIG_KEY} "
                         f"(field vs {EXPORT_CONFIG_KEY}): {wrong}")
    return config


def _official_vit_name(config, prefix):
    dims = tuple(getattr(config, f"{prefix}_{k}") for k in ("width", "depth", "heads"))
    return next((name for name, size in RELEASED_VITS.items() if VIT_SIZES[size] == dims),
                NOT_OFFICIAL_VIT)


def released_config(model, latent_mean=None, latent_std=None):
    """The config.json fields of `model` in the official schema (see RELEASED_FIXED_FIELDS).

    vq_mean / vq_std: latent_mean / latent_std when given (e.g. the statistics a generator was
    trained with), else the model's own buffers. When the official fields cannot describe the
    model exactly, EXPORT_CONFIG_KEY holds the whole TokenizerConfig; when the difference changes
    the outputs, encoder_model / decoder_model are NOT_OFFICIAL_VIT (see official_loadable)."""
    cfg = model.config
    fields = dict(
        RELEASED_FIXED_FIELDS, image_size=cfg.image_size, base_image_size=cfg.image_size,
        enc_patch_size=cfg.patch_size, dec_patch_size=cfg.patch_size,
        encoder_model=_official_vit_name(cfg, "enc"), decoder_model=_official_vit_name(cfg, "dec"),
        num_latent_tokens=cfg.num_tokens, codebook_embed_dim=cfg.token_dim,
        codebook_size=cfg.codebook_size, num_codebooks=cfg.num_codebooks,
        tau=TokenizerConfig.tau if cfg.tau == "learnable" else cfg.tau,  # learned: in the weights
        entropy_loss_ratio=cfg.entropy_weight, kl_loss_weight=cfg.kl_weight,
        vq_mean=float(model.latent_mean if latent_mean is None else latent_mean),
        vq_std=float(model.latent_std if latent_std is None else latent_std))
    try:
        official = config_from_released(fields)           # what the official fields say
    except ValueError:                                    # e.g. no timm ViT of these sizes
        official = None
    differ = [f.name for f in dataclasses.fields(cfg)
              if official is None or getattr(official, f.name) != getattr(cfg, f.name)]
    if differ:
        fields[EXPORT_CONFIG_KEY] = dataclasses.asdict(cfg)
    if set(differ) - set(TRAINING_ONLY_FIELDS):
        fields["encoder_model"] = fields["decoder_model"] = NOT_OFFICIAL_VIT
    return fields


def official_loadable(fields):
    """Whether the official SoftVQModel builds from these config.json fields and, given the
    exported weights, computes what our model computes."""
    return fields["encoder_model"] in RELEASED_VITS and fields["decoder_model"] in RELEASED_VITS


def save_released(model, folder, latent_mean=None, latent_std=None):
    """Write `model` as a released tokenizer: folder/config.json (released_config) and
    folder/model.safetensors under the official key names (released_state_dict: the inverse of
    load_released's mapping, with the official usage buffer and unused decoder patch embedding,
    zero-filled). tokenizer.load_released(folder) gives back a model with bit-identical outputs.
    Non-finite weights are refused, naming them. Returns the config.json fields."""
    fields = released_config(model, latent_mean, latent_std)
    write_released_folder(folder, fields, released_state_dict(model))
    return fields


def write_released_folder(folder, fields, state_dict):
    """folder/config.json (fields) + folder/model.safetensors (state_dict), as the model hub's
    save_pretrained writes them; non-finite weights are refused, naming them. Serves the tokenizer
    and the generators' save_released."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise ValueError(f"cannot export non-finite weights: {bad}")
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(fields, f, indent=2, sort_keys=True)  # as huggingface_hub's save_pretrained


def export_checkpoint(ckpt, folder, ema=True, latent_mean=None, latent_std=None):
    """Export a train_tok.py checkpoint (its EMA weights, or the live ones with ema=False) or a
    released folder with save_released; returns the config.json fields."""
    import training            # deferred: this model file imports only torch at import time
    if os.path.isdir(ckpt):
        model = load_released(ckpt)
    else:
        model = training.load_tokenizer(ckpt, ema=ema)
    return save_released(model, folder, latent_mean, latent_std)


def describe_export(fields, folder):
    """One line for the command line: what was written and who can load it."""
    if official_loadable(fields):
        who = "the official SoftVQModel.from_pretrained and tokenizer.load_released load it"
    else:
        who = (f"only tokenizer.load_released loads it (its {EXPORT_CONFIG_KEY} field holds what "
               "the official config cannot express; the official code refuses it)")
    return (f"wrote {os.path.join(folder, 'config.json')} and model.safetensors "
            f"(vq_mean {fields['vq_mean']:.6g}, vq_std {fields['vq_std']:.6g}): {who}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", action="store_true",
                        help="print the parameter count of every preset at 32 and 64 tokens")
    parser.add_argument("--export", nargs=2, metavar=("CKPT", "OUTDIR"),
                        help="write a train_tok.py checkpoint (or a released folder) to OUTDIR in "
                             "the released format: config.json + model.safetensors")
    parser.add_argument("--raw", action="store_true",
                        help="with --export: the live weights instead of the EMA weights")
    args = parser.parse_args()
    if args.raw and not args.export:
        parser.error("--raw only applies to --export")
    if args.count:
        print_parameter_counts()
    elif args.export:
        print(describe_export(export_checkpoint(*args.export, ema=not args.raw), args.export[1]))
    else:
        parser.print_help()
