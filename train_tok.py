"""Train a SoftVQ-VAE tokenizer with the paper's full objective (Sec. 3.3-3.4, Eq. 7, App. C.1).

    L = L_recon + l1 * LPIPS + l2 * L_adv + l3 * L_align + l4 * L_kl,   l = (1.0, 0.2, 0.1, 0.01)

  * L_recon: L2 on pixels in [-1, 1].
  * LPIPS (VGG16, `lpips` package), weight warmed up linearly over 10K steps (App. C.1).
  * L_adv: hinge loss against a frozen DINO ViT-S/16 discriminator with trainable heads on the
    patch embedding and blocks 2, 5, 8, 11; DiffAugment, consistency regularisation (4.0) and LeCAM
    (0.001) for the discriminator; it starts at step 20K (App. C.1, as VAR [99]); VQGAN's adaptive
    weight only with --disc-adaptive-weight (off, as the official config).
  * L_align (Sec. 3.3, Eq. 5-6): each latent token, repeated N/L times, is mapped by an MLP
    projector onto the patch tokens of a frozen teacher (DINOv2 ViT-L by default; --teacher picks
    DINOv2-S/B, CLIP-B/16, EVA-02-CLIP-B/16 as in Table 4, or a ViT saved by this project);
    loss = -cosine similarity.
  * L_kl: the quantizer's entropy term (quantizers.py), already weighted by l4.
  AdamW (0.9, 0.95), wd 1e-4, lr 1e-4 x global_batch / 256 with 5K warm-up steps and cosine decay
  to 1e-5, grad clip 1.0, global batch 256, 250K iterations, bf16 autocast, EMA 0.9999.

Run:
  python train_tok.py --preset tiny --tokens 16 --token-dim 32   # CPU, built-in data -> runs/tiny-16/
  torchrun --nproc_per_node=8 train_tok.py --tokens 32 --data-path /imagenet/train   # SoftVQ-L-32
  python train_tok.py --benchmark 5 --preset S --image-size 128 --batch 2             # speed, JSON
  ... --compile            # torch.compile the networks (with --benchmark: eager and compiled side by side)
  ... --resume                                       # continue <out-dir>/<name>/ckpt.pt exactly
  ... --overwrite                                    # start a run folder that holds a checkpoint again

Pretrained files are never downloaded. By default they are read from $TORCH_HOME/hub/checkpoints/
(vgg16-397923af.pth, dino_deitsmall16_pretrain.pth, dinov2_vit{s,b,l}14_pretrain.pth, and for
--teacher clip-b16 / eva02-clip-b16 the timm model-hub model.safetensors saved as
vit_base_patch16_clip_224.openai.safetensors / eva02_base_patch16_clip_224.merged2b.safetensors) or from the
--vgg-path / --dino-path / --teacher-path / --encoder-init flags. A missing file stops a full run at
start (naming each file); the tiny preset turns that term off and says so. --fake-pretrained uses
randomly initialised stand-ins of the same networks (tiny ones under --preset tiny) so that every
loss term runs without any file (tests, --benchmark).

Outputs in <out-dir>/<name>/ (default runs/<preset>-<tokens>/): ckpt.pt (model, EMA, projector,
discriminator heads, both optimizers, step, data position, RNG states of every rank, config; load
with training.load_tokenizer) and ckpt-prev.pt (the checkpoint before it, the fallback of --resume
when ckpt.pt is damaged), log.jsonl (one JSON line per log step), recon_<step>.png (top: inputs,
bottom: reconstructions). A folder holding a checkpoint is never started again silently: pass
--resume to continue it or --overwrite to replace it. On --resume the schedule and the loss
weights may change (RESUMABLE_FLAGS: a line says what changed); the model, seed, batch and data
order may not.
"""

import argparse
import dataclasses
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
import tokenizer
import training

# ---- constants of the recipe (App. C.1 and the official code) ----
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # DINO / DINOv2 input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
DISC_SIZE = 224                           # official discriminator resizes every input to 224x224
DISC_BLOCKS = (2, 5, 8, 11)               # DINO ViT-S/16 blocks tapped (plus the patch embedding)
DISC_KERNEL = 9                           # heads: residual Conv1d over the token sequence (VAR)
LEAKY_SLOPE = 0.2
LECAM_DECAY = 0.999                       # EMA of the mean real / fake logits for LeCAM [101]
ADV_AUG = (0.2, 0.5)                      # DiffAugment for the hinge terms: cutout ratio, prob per entry
CR_AUG = (0.5, 1.0)                       # DiffAugment for consistency regularisation [119]
TRANSLATE_RATIO = 0.125                   # DiffAugment translation: up to 1/8 of the image
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4    # VQGAN adaptive weight: denominator offset, clamp
VIT_SIZE_OF_WIDTH = {384: "s", 768: "b", 1024: "l"}   # encoder width -> DINOv2 file for --encoder-init
VGG_FILE = "vgg16-397923af.pth"
DINO_FILE = "dino_deitsmall16_pretrain.pth"
SOURCES = {VGG_FILE: "torchvision's VGG16 ImageNet weights (download.pytorch.org/models/vgg16-397923af.pth)",
           DINO_FILE: "the DINO release (github.com/facebookresearch/dino)",
           "dinov2": "the DINOv2 release (github.com/facebookresearch/dinov2)"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP input normalisation (timm's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)    # OPENAI_CLIP_MEAN / _STD; EVA-02-CLIP uses it too)
# --teacher (Sec. 3.3, Table 4): default file name in hub checkpoints (None: --teacher-path only),
# where to get it, input mean / std (vit-file: from the file), architecture ("dinov2", size) /
# ("timm", tokenizer.TIMM_TOWERS name) / ("file", None), and the (width, depth, heads) of its
# full-size stand-in under --fake-pretrained.
TEACHERS = {
    **{f"dinov2-{s}": dict(file=f"dinov2_vit{s}14_pretrain.pth", source=SOURCES["dinov2"],
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, arch=("dinov2", s),
                           dims=tokenizer.VIT_SIZES[s]) for s in ("s", "b", "l")},
    **{kind: dict(file=f"{name}.safetensors", source=f"model.safetensors of huggingface.co/timm/{name}",
                  mean=CLIP_MEAN, std=CLIP_STD, arch=("timm", name), dims=tokenizer.TIMM_TOWERS[name][1])
       for kind, name in (("clip-b16", "vit_base_patch16_clip_224.openai"),
                          ("eva02-clip-b16", "eva02_base_patch16_clip_224.merged2b"))},
    "vit-file": dict(file=None, source="a teacher saved by this project with tokenizer.teacher_checkpoint",
                     mean=None, std=None, arch=("file", None), dims=tokenizer.VIT_SIZES["s"]),
}
DEFAULT_TEACHER = "dinov2-l"              # official softvq-l-64.yaml: vit_large_patch14_dinov2
# stand-in architectures (--fake-pretrained): (width, depth, heads); the real ones, or tiny ones
FAKE_DINO = {"full": (384, 12, 6), "tiny": (32, 12, 2)}
FAKE_TEACHER = {"tiny": (32, 2, 2)}       # full-size stand-in: TEACHERS[...]["dims"]

# Defaults that differ between the paper's run and the CPU preset (None on the command line).
FULL_DEFAULTS = dict(global_batch=256, iters=250_000, lr=1e-4, min_lr=1e-5, warmup=5000,
                     lpips_warmup=10_000, disc_start=20_000, ema=0.9999, proj_dim=1024,
                     teacher_patch=16, data_path=None, num_workers=8, log_every=50,
                     vis_every=5000, ckpt_every=5000)
TINY_DEFAULTS = dict(global_batch=16, iters=2000, lr=0.048, min_lr=1e-4, warmup=100,  # lr: 3e-3 at batch 16
                     lpips_warmup=50, disc_start=100, ema=0.99, proj_dim=64,
                     teacher_patch=4, data_path=data.BUILTIN, num_workers=0, log_every=50,
                     vis_every=500, ckpt_every=500)
# Excluded from the resume config check: flags that do not change what is computed, file locations
# (files get moved; their contents are not checked) and the encoder init (used only at step 0).
# The run folder's own name is a location too: a copied or renamed run folder can be resumed.
# --compile changes the arithmetic only by rounding, so a run may be resumed with or without it.
RUN_ONLY_FLAGS = {"resume", "overwrite", "stop_at", "log_every", "vis_every", "ckpt_every", "num_workers",
                  "out_dir", "name", "benchmark", "benchmark_warmup", "benchmark_profile", "data_path",
                  "vgg_path", "dino_path", "teacher_path", "encoder_init", "compile"}
# May differ on --resume (e.g. a lower lr after a NaN stop): the schedule, clipping and the
# objective's weights and start steps. The rest (model, seed, batch, data order) may not.
RESUMABLE_FLAGS = {"lr", "min_lr", "warmup", "iters", "grad_clip", "lpips_weight", "lpips_warmup",
                   "disc_weight", "disc_start", "cr_weight", "lecam_weight", "align_weight"}
# Flags that override a TokenizerConfig field of the preset's quantizer (Table 5 ablations); None
# keeps the preset's value. --tau is a number > 0 or "learnable".
QUANTIZER_FLAGS = ("codebook_size", "num_codebooks", "residual_depth", "tau", "entropy_weight")
# Allowed range of every numeric flag (training.check_flags), checked before anything is built.
FLAG_RANGES = {"image_size": "> 0", "tokens": "> 0", "token_dim": "> 0", "codebook_size": "> 0", "entropy_weight": ">= 0",
               "num_codebooks": "> 0", "residual_depth": "> 0", "builtin_size": "> 0", "num_workers": ">= 0", "global_batch": "> 0",
               "micro_batch": "> 0", "iters": "> 0", "lr": "> 0", "min_lr": ">= 0", "warmup": ">= 0",
               "weight_decay": ">= 0", "beta1": "in [0, 1)", "beta2": "in [0, 1)", "grad_clip": ">= 0",
               "ema": "in [0, 1)", "lpips_weight": ">= 0", "lpips_warmup": ">= 0", "disc_weight": ">= 0",
               "disc_start": ">= 0", "cr_weight": ">= 0", "lecam_weight": ">= 0", "align_weight": ">= 0",
               "proj_dim": "> 0", "teacher_patch": "> 0", "seed": ">= 0", "log_every": "> 0",
               "vis_every": "> 0", "ckpt_every": "> 0", "stop_at": "> 0", "benchmark": ">= 0",
               "benchmark_warmup": ">= 0"}


# ---- pieces of the objective ----

def imagenet_normalize(x):
    """[-1, 1] images -> ImageNet mean/std normalisation (the input DINO and DINOv2 expect)."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def diff_augment(x, cutout_ratio, prob):
    """DiffAugment (Zhao et al. 2020) 'color,translation,cutout' on images in [-1, 1], as the
    official code calls it: one coin per policy entry, so each of the three entries is applied to
    the whole batch with probability `prob`; `color` is one entry (brightness, saturation and
    contrast together). Per-image random strengths. Differentiable w.r.t. x. Coin flips use the
    CPU generator (no device sync)."""
    B, _, H, W = x.shape
    dev = x.device
    if torch.rand(()) < prob:                                     # color:
        x = x + (torch.rand(B, 1, 1, 1, device=dev) - 0.5)        #   brightness + U(-0.5, 0.5)
        m = x.mean(1, keepdim=True)                               #   saturation x U(0, 2) around grey
        x = (x - m) * (torch.rand(B, 1, 1, 1, device=dev) * 2) + m
        m = x.mean((1, 2, 3), keepdim=True)                       #   contrast x U(0.5, 1.5) around mean
        x = (x - m) * (torch.rand(B, 1, 1, 1, device=dev) + 0.5) + m
    b = torch.arange(B, device=dev).view(B, 1, 1)
    if torch.rand(()) < prob:                                     # translation, zero padded
        sy, sx = int(H * TRANSLATE_RATIO + 0.5), int(W * TRANSLATE_RATIO + 0.5)
        ty = torch.randint(-sy, sy + 1, (B, 1, 1), device=dev)
        tx = torch.randint(-sx, sx + 1, (B, 1, 1), device=dev)
        gy = (torch.arange(H, device=dev).view(1, H, 1) + ty + 1).clamp(0, H + 1)
        gx = (torch.arange(W, device=dev).view(1, 1, W) + tx + 1).clamp(0, W + 1)
        x = F.pad(x, (1, 1, 1, 1))[b, :, gy, gx].permute(0, 3, 1, 2)   # (B, H, W, C) -> (B, C, H, W)
    if torch.rand(()) < prob:                                     # cutout: a zeroed square per image
        ch, cw = int(H * cutout_ratio + 0.5), int(W * cutout_ratio + 0.5)
        oy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=dev)
        ox = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=dev)
        gy = (torch.arange(ch, device=dev).view(1, ch, 1) + oy - ch // 2).clamp(0, H - 1)
        gx = (torch.arange(cw, device=dev).view(1, 1, cw) + ox - cw // 2).clamp(0, W - 1)
        mask = torch.ones(B, H, W, dtype=x.dtype, device=dev)
        mask[b, gy, gx] = 0
        x = x * mask.unsqueeze(1)
    return x.contiguous()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again the sum over ranks: every rank's loss depends on the
    global statistics, so each rank's input receives the gradients of all ranks' losses (what
    SyncBatchNorm does internally). Works on any backend that can all-reduce (gloo on CPUs)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def global_sum(x):
    """x summed over all ranks (differentiable); x itself without a process group or with one rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(x)
    return x


class BatchNormSync(nn.Module):
    """Discriminator-head BatchNorm as the official DinoDiscriminator's default norm_type='sbn'
    (SyncBatchNorm): per channel over (images, tokens) of every rank's images of one view (one
    official discriminator call), batch statistics only, biased variance. The input holds `views`
    equal batches (real, fake, ... concatenated); each gets its own statistics, as separate calls
    would. nn.SyncBatchNorm refuses CPU tensors, so the sums are all-reduced here (global_sum):
    the same statistics on gloo and NCCL, and on one process the local batch's. Input (B, C, N)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, views):
        B, C, N = x.shape
        g = x.float().view(views, B // views, C, N)
        # two passes (mean, then centred squares) over the global batch: no E[x^2] - E[x]^2
        # cancellation; the element count travels with the sums
        count = g.new_full((views, 1), g.shape[1] * N)
        sums = global_sum(torch.cat([g.sum((1, 3)), count], dim=1))          # (views, C + 1)
        total = sums[:, C:]
        mean = (sums[:, :C] / total)[:, None, :, None]
        var = (global_sum((g - mean).square().sum((1, 3))) / total)[:, None, :, None]
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return (g.view(B, C, N) * self.weight[:, None] + self.bias[:, None]).to(x.dtype)


def sn_conv(c_in, c_out, kernel):
    """Spectrally normalised Conv1d over the token sequence (circular padding as in VAR)."""
    conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.utils.parametrizations.spectral_norm(conv, eps=1e-12)


class DiscHead(nn.Module):
    """One tap's head (VAR): SNConv1d(k=1)-BN-LeakyReLU, then a residual
    (x + SNConv1d(k=9)-BN-LeakyReLU(x)) / sqrt(2), then SNConv1d -> one logit per token."""

    def __init__(self, width):
        super().__init__()
        self.conv_in, self.bn_in = sn_conv(width, width, 1), BatchNormSync(width)
        self.conv_res, self.bn_res = sn_conv(width, width, DISC_KERNEL), BatchNormSync(width)
        self.conv_out = sn_conv(width, 1, 1)

    def forward(self, x, views):
        x = F.leaky_relu(self.bn_in(self.conv_in(x), views), LEAKY_SLOPE)
        x = (x + F.leaky_relu(self.bn_res(self.conv_res(x), views), LEAKY_SLOPE)) / math.sqrt(2)
        return self.conv_out(x)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT-S/16 + one trainable head per tap (App. C.1, "as in [99]" = VAR): the taps
    are the patch embedding and blocks 2, 5, 8, 11, each tap's patch tokens plus its cls token
    (VAR's "readout"). Output: (B, 5 x 196) logits. Inputs in [-1, 1] of any size are resized to
    224x224 first (bicubic up, area down; a random 224 crop half the time when larger), as the
    official discriminator does.

    `logits(views)` runs several image batches ("views": real, fake, and their augmentations) in one
    backbone pass and one pass of the heads, with BatchNorm statistics kept per view (identical to
    separate calls); spectral norm then does one power iteration per call, i.e. per update (as
    Miyato et al.), where separate calls would do one per view."""

    def __init__(self, dino):
        super().__init__()
        self.dino = dino.eval().requires_grad_(False)
        self.heads = nn.ModuleList(DiscHead(dino.width) for _ in range(len(DISC_BLOCKS) + 1))

    def train(self, mode=True):               # the backbone stays in eval mode
        super().train(mode)
        self.dino.eval()
        return self

    @staticmethod
    def to_input(x):
        x = imagenet_normalize(x.float())
        H, W = x.shape[-2:]
        if H > DISC_SIZE and W > DISC_SIZE and torch.rand(()) < 0.5:
            top = int(torch.randint(0, H - DISC_SIZE + 1, ()))
            left = int(torch.randint(0, W - DISC_SIZE + 1, ()))
            return x[..., top:top + DISC_SIZE, left:left + DISC_SIZE]
        if (H, W) != (DISC_SIZE, DISC_SIZE):
            x = F.interpolate(x, size=(DISC_SIZE, DISC_SIZE), mode="area" if H > DISC_SIZE else "bicubic")
        return x

    def features(self, views):
        """Frozen-backbone tap features of the concatenated views (the backbone has no batch
        interaction, so one pass serves all): a list of 5 tensors (sum of B, C, N)."""
        return self.taps(torch.cat([self.to_input(v) for v in views]))

    def taps(self, x):
        """The backbone on 224x224 inputs -> the 5 taps with the readout (patches + cls), (B, C, N)."""
        taps = self.dino.forward_features(x, return_blocks=DISC_BLOCKS, include_embed=True)
        return [(t[:, 1:] + t[:, :1]).transpose(1, 2) for t in taps]

    def heads_logits(self, feats, views):
        """Heads on features of `views` equal-size views -> (sum of B, 5N) logits. The heads run in
        fp32 even under bf16 autocast: spectral norm's power iteration (a matrix-vector product that
        CUDA autocast would do in bf16) estimates sigma, and the heads are small."""
        with torch.autocast(device_type=feats[0].device.type, enabled=False):
            return torch.cat([head(f.float(), views).flatten(1) for head, f in zip(self.heads, feats)], dim=1)

    def forward(self, x):
        return self.heads_logits(self.features([x]), 1)

    def compile(self, **kwargs):
        """torch.compile (training.compile_module) the work of every call, in place: the backbone's
        taps and the heads; preparing the views (resize, random crop) stays eager. Parameter names
        are unchanged."""
        self.taps = torch.compile(self.taps, **kwargs)
        self.heads_logits = torch.compile(self.heads_logits, **kwargs)


class Teacher(nn.Module):
    """Alignment target of Sec. 3.3: a frozen ViT (DINOv2, CLIP, EVA-02-CLIP or this project's; Table
    4) run at the training resolution with its patch embedding resampled to `teacher_patch`
    (official: 16, so N = (H/16)^2 patch tokens) on inputs normalised with its own mean / std;
    returns the final-LayerNorm patch tokens (B, N, C); `.width = C`."""

    def __init__(self, vit, mean, std):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.width, self.mean, self.std = vit.width, mean, std

    def train(self, mode=True):               # always frozen, always eval
        return super().train(False)

    def forward(self, x):
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return self.vit.forward_features(((x + 1) / 2 - mean) / std)[:, 1:]


def make_teacher(kind, path, image_size, patch_size, stand_in=None):
    """The frozen teacher `kind` (a TEACHERS key) read from `path`, built at image_size with its
    patch tokens at patch_size. stand_in=(width, depth, heads): a randomly initialised network of
    the same architecture instead of the file (--fake-pretrained; vit-file: a DINOv2-style ViT
    with ImageNet normalisation)."""
    spec = TEACHERS[kind]
    family, name = spec["arch"]
    mean, std = spec["mean"], spec["std"]
    if family == "dinov2":
        vit = (tokenizer.VisionTransformer(image_size, patch_size, *stand_in) if stand_in else
               tokenizer.load_dinov2(path, name, img_size=image_size, patch_size=patch_size))
    elif family == "timm":
        vit = (tokenizer.TIMM_TOWERS[name][0](image_size, patch_size, *stand_in) if stand_in else
               tokenizer.load_timm_tower(path, name, img_size=image_size, patch_size=patch_size))
    elif stand_in:
        vit = tokenizer.VisionTransformer(image_size, patch_size, *stand_in)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        vit, mean, std = tokenizer.load_teacher_checkpoint(path, image_size, patch_size)
    return Teacher(vit, mean, std)


def adaptive_weight(rec_loss, adv_loss, last_layer):
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7), the official --disc-adaptive-weight:
    lambda = ||grad_w L_rec|| / (||grad_w L_adv|| + 1e-4) at the decoder's last layer w (the pixel
    head), clamped to [0, 1e4] and detached, so the adversarial gradient reaching the decoder is
    scaled to the reconstruction's. L_rec is the pixel loss plus the weighted LPIPS, as official;
    computed per rank on its local batch."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + ADAPTIVE_EPS)).clamp(0.0, ADAPTIVE_MAX).detach()


def make_projector(token_dim, hidden, out_dim):
    """Sec. 3.3 / Eq. 6: MLP D -> hidden -> hidden -> teacher width with SiLU (as REPA)."""
    return nn.Sequential(nn.Linear(token_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


def align_loss(projected, target):
    """Eq. 5-6: -mean_n cos(y[n], MLP(z_r[n])) with z_r = each of the L latents repeated N/L times.
    The MLP acts per token, so MLP(repeat(z)) = repeat(MLP(z)): we project the L latents and compare
    each with its N/L consecutive teacher tokens (same value, N/L times less projector work).
    projected: (B, L, C) = MLP(z); target: (B, N, C) teacher patch tokens."""
    B, L, C = projected.shape
    N = target.shape[1]
    if N % L:
        raise training.UserError(f"alignment needs N/L integer: the teacher gives N = {N} tokens for L = {L} "
                                 f"latents; change --teacher-patch or --tokens")
    p = F.normalize(projected.float(), dim=-1).unsqueeze(2)                     # (B, L, 1, C)
    y = F.normalize(target.float(), dim=-1).view(B, L, N // L, C)               # (B, L, N/L, C)
    return -(p * y).sum(-1).mean()


class LPIPS(nn.Module):
    """LPIPS-VGG (the `lpips` package, v0.1 linear heads shipped with it). The VGG16 trunk is read
    from `vgg_path` here and never downloaded; vgg_path=None keeps a randomly initialised trunk (tests,
    benchmark). Same value as lpips.LPIPS(net='vgg')(rec, target).mean(); the target's features are
    computed without autograd (no gradient is needed there).
    Training mode switches on the dropout (p = 0.5) in front of each linear head, as the official
    loss module's .train() does (its LPIPS is built with use_dropout=True): an unbiased but noisy
    estimate of the same distance. The VGG trunk has no dropout or BatchNorm, so eval mode gives
    exactly the package's value."""

    def __init__(self, vgg_path=None):
        super().__init__()
        import lpips
        # Built on the meta device: torchvision's VGG16 would otherwise initialise its 120M-parameter
        # classifier (unused by LPIPS) at every start. Then materialise and fill what LPIPS uses.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")    # torchvision's "pretrained is deprecated" warning
            lp = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        lp = lp.to_empty(device="cpu")
        lp.scaling_layer = lpips.ScalingLayer()                    # its constant buffers
        heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
        lp.load_state_dict(torch.load(heads, map_location="cpu", weights_only=True), strict=False)
        convs = {f"features.{i}": m for s in lp.net.children() for i, m in s.named_children()
                 if isinstance(m, nn.Conv2d)}                      # VGG16 trunk, torchvision numbering
        if vgg_path is None:
            for conv in convs.values():                            # torchvision's VGG init
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        else:
            state = torch.load(vgg_path, map_location="cpu", weights_only=True)
            for name, conv in convs.items():
                conv.weight.data.copy_(state[f"{name}.weight"])
                conv.bias.data.copy_(state[f"{name}.bias"])
        # channels-last: the layout oneDNN / cuDNN convolutions run fastest in (same values)
        self.lp = lp.requires_grad_(False).to(memory_format=torch.channels_last)
        self.normalize = lpips.normalize_tensor
        self.eval()                            # built in eval mode; train_tok switches it to train

    def features(self, x):
        x = self.lp.scaling_layer(x).contiguous(memory_format=torch.channels_last)
        return [self.normalize(f) for f in self.lp.net(x)]

    def forward(self, rec, target):
        with torch.no_grad():
            target_feats = self.features(target)
        dist_per_layer = [lin((a - b) ** 2).mean((2, 3))
                          for lin, a, b in zip(self.lp.lins, self.features(rec), target_feats)]
        return torch.stack(dist_per_layer).sum(0).mean()


class Generator(nn.Module):
    """What the generator optimiser trains: the tokenizer and the alignment projector, in one module
    so that DDP synchronises both. Returns (x_rec, MLP(z_q) or None, quantizer losses, info)."""

    def __init__(self, tok, projector):
        super().__init__()
        self.tokenizer, self.projector = tok, projector

    def forward(self, x):
        x_rec, z_q, losses, info = self.tokenizer(x)
        return x_rec, (self.projector(z_q) if self.projector is not None else None), losses, info


def hub_file(name):
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def resolve(args):
    """Fill the flags left unset (None) with the preset's defaults; --benchmark implies
    --fake-pretrained. Returns args."""
    preset_defaults = TINY_DEFAULTS if args.preset == "tiny" else FULL_DEFAULTS
    for k, v in preset_defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.benchmark:
        args.fake_pretrained = True
    if args.teacher_size is not None:                  # deprecated alias of --teacher dinov2-<size>
        alias = f"dinov2-{args.teacher_size}"
        if args.teacher not in (None, alias):
            raise training.UserError(f"--teacher-size {args.teacher_size} contradicts --teacher {args.teacher}")
        warnings.warn(f"--teacher-size is deprecated: use --teacher {alias}", FutureWarning)
        args.teacher = alias
    del args.teacher_size
    args.teacher = args.teacher or DEFAULT_TEACHER
    if args.tau is not None and args.tau != "learnable":
        try:
            args.tau = float(args.tau)
        except ValueError:
            raise training.UserError(f"--tau must be a number > 0 or 'learnable' (got {args.tau!r})") from None
        if not args.tau > 0 or math.isinf(args.tau):
            raise training.UserError(f"--tau must be a number > 0 or 'learnable' (got {args.tau})")
    training.check_flags(args, FLAG_RANGES)
    return args


def main(args):
    training.set_precision_policy(train=True)
    with training.distributed(args.device) as (rank, _, world, device):
        run(resolve(args), rank, world, device)


def setup(args, world, device):
    """Everything one training iteration uses, built from resolved args on this rank: the models
    and frozen networks of the objective, EMA, both optimisers, and the two update steps
    generator_step(x, step) -> (logs, reconstructions) and discriminator_step(x, recs, step) -> logs.
    compile_networks() compiles (--compile) every network the two steps run, in place.
    Returned as a SimpleNamespace (tests call the steps directly, with the tiny preset)."""
    print0 = training.print0
    overrides = {k: getattr(args, k) for k in QUANTIZER_FLAGS + ("image_size", "token_dim")
                 if getattr(args, k) is not None}
    try:
        with torch.device("meta"):                      # the config only (nothing allocated)
            tok_cfg = tokenizer.make_tokenizer(args.preset, tokens=args.tokens, quantizer=args.quantizer,
                                               **overrides).config
    except ValueError as err:                           # built from the flags alone: their values
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        raise training.UserError(f"--preset {args.preset} --tokens {args.tokens} --quantizer "
                                 f"{args.quantizer} {given}: {err}".rstrip()) from err
    image_size = tok_cfg.image_size
    run_name = args.name or f"{args.preset}-{args.tokens}"
    out_dir = os.path.join(args.out_dir, run_name)
    scale = "tiny" if args.preset == "tiny" else "full"

    # ---- pretrained files: check all of them before building anything big ----
    teacher_spec = TEACHERS[args.teacher]
    if (args.align_weight > 0 and teacher_spec["file"] is None and args.teacher_path is None
            and not args.fake_pretrained):
        raise ValueError(f"--teacher {args.teacher} needs --teacher-path FILE ({teacher_spec['source']})")
    wanted = {}                                         # term -> path of its file
    if args.lpips_weight > 0:
        wanted["LPIPS"] = args.vgg_path or hub_file(VGG_FILE)
    if args.disc_weight > 0:
        wanted["adversarial"] = args.dino_path or hub_file(DINO_FILE)
    if args.align_weight > 0 and (args.teacher_path or teacher_spec["file"]):   # vit-file: a path
        wanted["alignment"] = args.teacher_path or hub_file(teacher_spec["file"])
    encoder_init = args.encoder_init
    if encoder_init == "auto":
        size = VIT_SIZE_OF_WIDTH.get(tok_cfg.enc_width)
        if size is not None and scale == "full":
            encoder_init = hub_file(f"dinov2_vit{size}14_pretrain.pth")
        else:
            encoder_init = None
    elif encoder_init == "none":
        encoder_init = None
    if encoder_init is not None:
        wanted["encoder init"] = encoder_init
    if args.fake_pretrained:
        print0("--fake-pretrained: random stand-ins replace VGG, DINO and the teacher; no encoder init")
        wanted, encoder_init = {}, None
    missing = {term: path for term, path in wanted.items() if not os.path.isfile(path)}
    if missing and scale == "full":
        source = {"alignment": teacher_spec["source"]}
        files = "; ".join(f"{term}: {path} (from "
                          f"{source.get(term) or SOURCES.get(os.path.basename(path), SOURCES['dinov2'])})"
                          for term, path in missing.items())
        raise training.MissingFileError(f"pretrained files missing: {files}. They are never downloaded: put "
                                        f"each file at the path shown, or pass --vgg-path / --dino-path / "
                                        f"--teacher-path / --encoder-init, or --fake-pretrained for random "
                                        f"stand-ins")
    for term, path in missing.items():
        print0(f"tiny preset: {path} not found -> {term} term off")
        if term == "encoder init":
            encoder_init = None
        else:
            setattr(args, {"LPIPS": "lpips_weight", "adversarial": "disc_weight",
                           "alignment": "align_weight"}[term], 0.0)

    # ---- run folder and resume check: refuse a checkpoint of another configuration before building ----
    train_cfg = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS}
    train_cfg["world_size"] = world                      # the data order depends on it
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if not args.benchmark:
        training.prepare_run_folder(out_dir, args.resume, args.overwrite, holds=("ckpt.pt", "ckpt-prev.pt"),
                                    outputs=("ckpt.pt", "ckpt-prev.pt", "log.jsonl", "recon_*.png"),
                                    what="tokenizer run", flag="--name")
    if args.resume and not args.benchmark:
        ckpt, used = training.resume_checkpoint(ckpt_path, "tokenizer")
        training.check_config(ckpt["config"], dataclasses.asdict(tok_cfg), f"{used} (tokenizer)",
                              defaults=training.dataclass_defaults(tokenizer.TokenizerConfig))
        saved = {k: v for k, v in ckpt["train_config"].items() if k not in RUN_ONLY_FLAGS}
        # a quantizer flag added since the checkpoint was written is absent from it; unset (None),
        # it keeps the preset's value, as the code did before the flag existed
        changed = training.check_config(saved, train_cfg, f"{used} (training)", may_change=RESUMABLE_FLAGS,
                                        defaults={k: None for k in QUANTIZER_FLAGS})
        for key, flag, term, on in (("disc_heads", "--disc-weight", "adversarial", args.disc_weight > 0),
                                    ("projector", "--align-weight", "alignment", args.align_weight > 0)):
            had = ckpt[key] is not None                  # these terms carry trained state
            if had != on:
                raise training.UserError(f"--resume can change {flag} but not turn the {term} term "
                                         f"{'off' if had else 'on'}: {used} was trained "
                                         f"{'with' if had else 'without'} it")
        if ckpt["step"] > args.iters:
            raise training.UserError(f"--iters {args.iters} is below the step of {used} ({ckpt['step']})")
        if changed:
            print0(f"--resume with changed settings: {training.describe_changes(changed)}")

    # ---- model ----
    torch.manual_seed(args.seed)                       # identical initial weights on every rank
    tok = tokenizer.SoftVQVAE(tok_cfg)
    if encoder_init is not None and not args.resume:
        tokenizer.load_dinov2(encoder_init, tok.encoder.model)     # Sec. 4: encoder from DINOv2
        print0(f"encoder initialised from {encoder_init}")

    # ---- frozen networks of the objective ----
    lpips_loss = LPIPS(None if args.fake_pretrained else wanted["LPIPS"]) if args.lpips_weight > 0 else None
    disc = None
    if args.disc_weight > 0:
        if args.fake_pretrained:
            dino = tokenizer.VisionTransformer(DISC_SIZE, 16, *FAKE_DINO[scale], layerscale=False)
        else:
            dino = tokenizer.load_dino(wanted["adversarial"])
        disc = DinoDiscriminator(dino)
    teacher = None
    if args.align_weight > 0:
        stand_in = FAKE_TEACHER.get(scale, teacher_spec["dims"]) if args.fake_pretrained else None
        teacher = make_teacher(args.teacher, wanted.get("alignment"), image_size, args.teacher_patch,
                               stand_in)
        print0(f"alignment teacher {args.teacher}"
               + (" (random stand-in)" if stand_in else f" from {wanted['alignment']}"))
    projector = (make_projector(tok_cfg.token_dim, args.proj_dim, teacher.width)
                 if teacher is not None else None)
    gen = Generator(tok, projector).to(device).train()
    for m in (lpips_loss, disc, teacher):
        if m is not None:
            m.to(device).train()
    gen_ddp = DDP(gen, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else gen
    ema = training.EMA(tok)                              # EMA of the tokenizer only (not frozen nets)
    terms = [n for n, on in (("recon", True), ("LPIPS", lpips_loss), ("adversarial", disc),
                             ("alignment", teacher)) if on]
    print0(f"tokenizer {tok_cfg.enc_width}/{tok_cfg.dec_width} wide, L={tok_cfg.num_tokens} "
           f"D={tok_cfg.token_dim}, {tokenizer.count_parameters(tok) / 1e6:.2f}M params at {image_size}px; "
           f"loss terms: {', '.join(terms)} + quantizer; world size {world} on {device}")

    # ---- optimisers (App. C.1) ----
    def adamw(module):
        # weight decay on matrices only (not biases, norms, LayerScale), as timm/the official code
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        # fused: one kernel per step instead of ~10 passes over every tensor (much faster on CPU too)
        return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt = adamw(gen)
    opt_d = adamw(disc.heads) if disc is not None else None
    if args.global_batch % world:
        raise training.UserError(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    local_batch = args.global_batch // world
    micro = args.micro_batch or local_batch
    if local_batch % micro:
        raise training.UserError(f"per-rank batch {local_batch} is not divisible by --micro-batch {micro}")
    base_lr = args.lr * args.global_batch / 256        # App. C.1: lr 1e-4 at batch 256, scaled
    use_bf16 = training.use_bf16(args.precision, device)      # App. C.1: bf16 on accelerators
    autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    guard, guard_d = training.NanGuard(), training.NanGuard()
    lecam_ema = torch.zeros(2, device=device)           # EMA of mean (real, fake) logits

    # ---- one training iteration: generator step, then discriminator step (official order) ----
    def generator_step(x, step):
        """Eq. 7 on this rank's batch x (split into micro-batches). Returns (logs, reconstructions)."""
        lpips_w = args.lpips_weight * min(1.0, (step + 1) / max(1, args.lpips_warmup))  # App. C.1 warm-up
        disc_on = disc is not None and step >= args.disc_start
        if disc is not None:
            disc.heads.requires_grad_(False)    # gradients flow to the image only, not the heads' weights
        opt.zero_grad(set_to_none=True)
        logs, recs = {}, []
        chunks = x.split(micro)
        for i, xm in enumerate(chunks):
            sync = i == len(chunks) - 1 or world == 1
            with nullcontext() if sync else gen_ddp.no_sync():
                with autocast():
                    x_rec, projected, q_losses, info = gen_ddp(xm)
                    x_rec = x_rec.float()
                    parts = {"recon": F.mse_loss(x_rec, xm), **q_losses}
                    loss = parts["recon"] + sum(q_losses.values())
                    if lpips_loss is not None:
                        parts["lpips"] = lpips_loss(x_rec, xm)
                        loss = loss + lpips_w * parts["lpips"]
                    if teacher is not None:
                        with torch.no_grad():                     # the teacher runs once, no graph
                            target = teacher(xm)
                        parts["align"] = align_loss(projected, target)
                        loss = loss + args.align_weight * parts["align"]
                    if disc_on:                                   # hinge generator loss on augmented recon
                        parts["adv"] = -disc(diff_augment(x_rec, *ADV_AUG)).float().mean()
                        adv_w = args.disc_weight
                        if args.disc_adaptive_weight:
                            parts["adv_lambda"] = adaptive_weight(
                                parts["recon"] + lpips_w * parts.get("lpips", 0.0), parts["adv"],
                                tok.decoder.to_pixel.weight)
                            adv_w = adv_w * parts["adv_lambda"]
                        loss = loss + adv_w * parts["adv"]
                (loss * (xm.shape[0] / x.shape[0])).backward()
            recs.append(x_rec.detach())
            for k, v in {**parts, "loss": loss, **{f"q_{k}": v for k, v in info.items()}}.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float() * (xm.shape[0] / x.shape[0])
        grad_norm = nn.utils.clip_grad_norm_(gen.parameters(), args.grad_clip or math.inf)
        lr = training.cosine_lr(step, base_lr, args.warmup, args.iters, args.min_lr)
        if guard.ok(logs["loss"], grad_norm):           # skip (no update) on NaN/inf, on every rank
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            ema.update(tok, args.ema)
        logs.update(grad_norm=grad_norm.detach(), lr=torch.tensor(lr), lpips_w=torch.tensor(lpips_w))
        return logs, recs

    def discriminator_step(x, recs, step):
        """Hinge + LeCAM + consistency regularisation on real x and detached reconstructions."""
        if disc is None or step < args.disc_start:       # before disc-start the discriminator is idle
            return {}
        disc.heads.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        logs = {}
        for xm, rm in zip(x.split(micro), recs):
            with autocast():
                with torch.no_grad():                   # frozen backbone: one pass, no graph, 4 views
                    feats = disc.features([diff_augment(xm, *ADV_AUG), diff_augment(rm, *ADV_AUG),
                                           diff_augment(xm, *CR_AUG), diff_augment(rm, *CR_AUG)])
                real, fake, real_cr, fake_cr = disc.heads_logits(feats, 4).float().chunk(4)
                hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
                with torch.no_grad():                   # LeCAM EMA of the global mean logits
                    means = torch.stack([real.mean(), fake.mean()])
                    if world > 1:
                        dist.all_reduce(means)
                        means /= world
                    lecam_ema.copy_(torch.where(torch.isfinite(means),
                                                LECAM_DECAY * lecam_ema + (1 - LECAM_DECAY) * means, lecam_ema))
                lecam = F.relu(real - lecam_ema[1]).pow(2).mean() + F.relu(lecam_ema[0] - fake).pow(2).mean()
                cr = F.mse_loss(torch.cat([real, fake]), torch.cat([real_cr, fake_cr]))
                # official: disc weight scales hinge + LeCAM, consistency regularisation has its own
                d_loss = args.disc_weight * (hinge + args.lecam_weight * lecam) + args.cr_weight * cr
            (d_loss * (xm.shape[0] / x.shape[0])).backward()
            parts = {"d_loss": d_loss, "d_hinge": hinge, "d_lecam": lecam, "d_cr": cr,
                     "logit_real": real.mean(), "logit_fake": fake.mean()}
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v.detach() * (xm.shape[0] / x.shape[0])
        if world > 1:
            training.average_gradients(disc.heads.parameters())
        grad_norm = nn.utils.clip_grad_norm_(disc.heads.parameters(), args.grad_clip or math.inf)
        if guard_d.ok(logs["d_loss"], grad_norm):
            for g in opt_d.param_groups:
                g["lr"] = training.cosine_lr(step, base_lr, args.warmup, args.iters, args.min_lr)
            opt_d.step()
        logs["d_grad_norm"] = grad_norm.detach()
        return logs

    def compile_networks():
        """--compile: the tokenizer with its projector, LPIPS, the teacher, the discriminator's
        backbone and heads; static shapes (a fixed micro-batch; the discriminator sees 1 and 4 views,
        with and without gradients: 7 graphs, each compiled once). In place: DDP wraps the compiled
        generator module (called inside DDP's forward, its graph is split at DDP's gradient buckets
        by dynamo's DDPOptimizer, so the all-reduces overlap the backward), and EMA and checkpoints
        read its parameters under their own names."""
        for m in (gen, lpips_loss, teacher, disc):
            if m is not None:
                training.compile_module(m)

    return SimpleNamespace(
        tok_cfg=tok_cfg, train_cfg=train_cfg, run_name=run_name, out_dir=out_dir, ckpt_path=ckpt_path,
        ckpt=ckpt if args.resume else None, ckpt_used=used if args.resume else None, image_size=image_size, local_batch=local_batch, micro=micro,
        base_lr=base_lr, use_bf16=use_bf16, tok=tok, projector=projector, gen=gen, ema=ema, opt=opt,
        lpips=lpips_loss, teacher=teacher, disc=disc, opt_d=opt_d, guard=guard, guard_d=guard_d,
        lecam_ema=lecam_ema, generator_step=generator_step, discriminator_step=discriminator_step,
        compile_networks=compile_networks)


def run(args, rank, world, device):
    print0 = training.print0
    t = setup(args, world, device)
    local_batch, image_size, use_bf16 = t.local_batch, t.image_size, t.use_bf16
    generator_step, discriminator_step = t.generator_step, t.discriminator_step

    # ---- benchmark: N timed iterations on a fixed random batch, every term active ----
    # With --compile the same run compiles the networks, then times compiled and eager iterations
    # in turn (the eager code through training.force_eager), so that a machine whose speed drifts
    # (shared CPUs, clocks) slows both alike: the figures side by side, the speed-up, and the
    # compile time (the first compiled iteration's excess).
    if args.benchmark:
        from torch.utils.flop_counter import FlopCounterMode
        step = max(args.disc_start, args.lpips_warmup)          # full LPIPS weight, discriminator on
        x = torch.rand(local_batch, 3, image_size, image_size, device=device) * 2 - 1
        tables = []                                             # --benchmark-profile's output

        def measure(n, compiled=False, profile=False):
            """(seconds per iteration, peak memory in bytes) over n iterations; compiled=False runs
            the eager code also after --compile; profile: under torch.profiler (its table is kept)."""
            training.reset_peak_memory(device)
            profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                               ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
                        if profile else nullcontext())
            eager = training.force_eager() if args.compile and not compiled else nullcontext()
            training.synchronize(device)
            t0 = time.perf_counter()
            with profiler, eager:
                for _ in range(n):
                    discriminator_step(x, generator_step(x, step)[1], step)
                training.synchronize(device)
            sec = (time.perf_counter() - t0) / n
            if profile:
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                tables.append(("compiled" if compiled else "eager",
                               profiler.key_averages().table(sort_by=key, row_limit=25)))
            return sec, training.peak_memory(device)

        for _ in range(args.benchmark_warmup):
            measure(1)
        with FlopCounterMode(display=False) as count_gen:     # counted eagerly, before any compiling
            _, recs = generator_step(x, step)
        with FlopCounterMode(display=False) as count_disc:
            discriminator_step(x, recs, step)
        flops = count_gen.get_total_flops() + count_disc.get_total_flops()
        if not args.compile:
            sec, peak = measure(args.benchmark, profile=args.benchmark_profile)
        else:
            t.compile_networks()
            first, _ = measure(1, compiled=True)                 # compiles every graph
            for _ in range(args.benchmark_warmup - 1):
                measure(1, compiled=True)
            rounds = [(measure(1), measure(1, compiled=True)) for _ in range(args.benchmark)]
            sec = sum(e[0] for e, _ in rounds) / args.benchmark
            sec_c = sum(c[0] for _, c in rounds) / args.benchmark
            peak, peak_c = max(e[1] for e, _ in rounds), max(c[1] for _, c in rounds)
            if args.benchmark_profile:
                measure(args.benchmark, profile=True)
                measure(args.benchmark, compiled=True, profile=True)
        # The device's dense-matmul FLOP/s in the training precision, measured here: the fraction
        # of it the step reaches is the model FLOP utilisation, and peak / (FLOPs per image) is the
        # fastest this step could run on this device at its FLOP count. (CPUs: fp32 even under
        # --precision bf16, whose matmuls most CPUs emulate far below the fp32 rate.)
        peak_bf16 = use_bf16 and device.type != "cpu"
        matmul = training.peak_flops(device, torch.bfloat16 if peak_bf16 else torch.float32)
        result = {"img_per_s": round(local_batch * world / sec, 3),
                  "ms_per_step": round(sec * 1000, 1),
                  "peak_mem_gb": round(peak / 2 ** 30, 2),
                  "gflops_per_image": round(flops / local_batch / 1e9, 1),
                  "gflops_gen_step": round(count_gen.get_total_flops() / local_batch / 1e9, 1),
                  "gflops_disc_step": round(count_disc.get_total_flops() / local_batch / 1e9, 1),
                  "achieved_tflops": round(flops / sec / 1e12, 4),
                  "matmul_peak_tflops": round(matmul / 1e12, 4),
                  "mfu": round(flops / sec / matmul, 3),
                  "img_per_s_at_peak": round(matmul * local_batch / flops, 3)}
        if args.compile:
            result.update(img_per_s_compiled=round(local_batch * world / sec_c, 3),
                          ms_per_step_compiled=round(sec_c * 1000, 1),
                          peak_mem_gb_compiled=round(peak_c / 2 ** 30, 2),
                          achieved_tflops_compiled=round(flops / sec_c / 1e12, 4),
                          mfu_compiled=round(flops / sec_c / matmul, 3),
                          speedup=round(sec / sec_c, 3), compile_s=round(first - sec_c, 1))
        result.update(device=training.device_name(device), preset=args.preset, tokens=args.tokens,
                      image_size=image_size, batch=local_batch, precision="bf16" if use_bf16 else "fp32")
        print0(json.dumps(result))
        for name, table in tables:
            print0(f"{name}:\n{table}")
        return

    # ---- data ----
    dataset = data.make_dataset(args.data_path, image_size, train=True, seed=args.seed,
                                builtin_size=args.builtin_size)
    sampler = data.ResumableSampler(dataset, rank, world, seed=args.seed)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # global RNG left untouched
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise training.UserError(f"{len(dataset)} images are fewer than one global batch ({args.global_batch})")
    print0(f"data: {args.data_path} ({len(dataset)} images, {steps_per_epoch} steps per epoch)")

    # ---- resume ----
    step, epoch, batch_in_epoch = 0, 0, 0
    if args.resume:
        t.tok.load_state_dict(t.ckpt["model"])
        t.ema.load_state_dict(t.ckpt["ema"])
        t.opt.load_state_dict(t.ckpt["opt"])
        if t.projector is not None:
            t.projector.load_state_dict(t.ckpt["projector"])
        if t.disc is not None:
            t.disc.heads.load_state_dict(t.ckpt["disc_heads"])
            t.opt_d.load_state_dict(t.ckpt["opt_disc"])
        t.lecam_ema.copy_(t.ckpt["lecam_ema"])
        t.guard.load_state_dict(t.ckpt["nan_guard"])
        t.guard_d.load_state_dict(t.ckpt["nan_guard_disc"])
        step, epoch, batch_in_epoch = t.ckpt["step"], t.ckpt["epoch"], t.ckpt["batch_in_epoch"]
        training.set_rng_state(t.ckpt["rng"][rank], device)
        print0(f"resumed {t.ckpt_used} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    else:
        torch.manual_seed(args.seed * world + rank)      # per-rank augmentation randomness (DiT style)
    if args.compile:
        t.compile_networks()
        print0("--compile: the networks are compiled in their first steps (minutes), then run fused")

    def save():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, training.rng_state(device))
        else:
            rngs = [training.rng_state(device)]
        if rank == 0:
            training.save_checkpoint(t.ckpt_path, {
                "kind": "tokenizer", "config": dataclasses.asdict(t.tok_cfg), "train_config": t.train_cfg,
                "model": t.tok.state_dict(), "ema": t.ema.state_dict(), "opt": t.opt.state_dict(),
                "projector": t.projector.state_dict() if t.projector is not None else None,
                "disc_heads": t.disc.heads.state_dict() if t.disc is not None else None,
                "opt_disc": t.opt_d.state_dict() if t.opt_d is not None else None,
                "lecam_ema": t.lecam_ema.cpu(), "nan_guard": t.guard.state_dict(),
                "nan_guard_disc": t.guard_d.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "rng": [{k: v.cpu() for k, v in r.items()} for r in rngs]})

    # ---- loop ----
    if rank == 0:
        os.makedirs(t.out_dir, exist_ok=True)
    log_file = training.open_log(os.path.join(t.out_dir, "log.jsonl"), step) if rank == 0 else None
    running, n_running, t_log = {}, 0, time.perf_counter()
    ckpt_due = False
    stop = min(args.iters, args.stop_at or args.iters)
    print0(f"training {t.run_name}: steps {step} -> {stop} of {args.iters}, global batch "
           f"{args.global_batch} ({world} x {local_batch // t.micro} x {t.micro}), lr {t.base_lr:.2e}, "
           f"{'bf16 autocast' if use_bf16 else 'fp32'}, out {t.out_dir}")
    while step < stop:
        sampler.set_position(epoch, batch_in_epoch * local_batch)
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            logs, recs = generator_step(x, step)
            logs.update(discriminator_step(x, recs, step))
            step += 1
            batch_in_epoch += 1
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            for k, v in logs.items():
                running[k] = running.get(k, 0.0) + v.to(device)
            n_running += 1
            if step % args.log_every == 0 or step == stop:
                keys = sorted(running)
                vals = torch.stack([running[k].float() for k in keys]) / n_running
                if world > 1:
                    dist.all_reduce(vals)
                    vals /= world
                elapsed = time.perf_counter() - t_log
                rec = {"step": step, **dict(zip(keys, vals.tolist())),
                       "img_per_s": n_running * args.global_batch / elapsed,
                       "nan_skipped": t.guard.skipped + t.guard_d.skipped,
                       "bad_images": training.unreadable_images(dataset, device)}
                print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in rec.items()))
                if log_file:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                running, n_running, t_log = {}, 0, time.perf_counter()
            if rank == 0 and (step % args.vis_every == 0 or step == stop):
                n = min(8, x.shape[0], recs[0].shape[0])
                training.save_image_grid(torch.cat([x[:n], recs[0][:n]]),
                                         os.path.join(t.out_dir, f"recon_{step:07d}.png"), nrow=n)
            # A checkpoint due during a streak of skipped NaN/inf steps waits for the next good step:
            # the NanGuard stop promises that the last checkpoint was written before the streak.
            ckpt_due = ckpt_due or step % args.ckpt_every == 0
            if step == stop or (ckpt_due and t.guard.in_a_row == 0 and t.guard_d.in_a_row == 0):
                save()
                ckpt_due = False
            if step >= stop:
                break
    if log_file:
        log_file.close()
    if world > 1:                                        # DDP sanity check: same weights everywhere
        tensors = list(t.tok.state_dict().values()) + list(t.disc.heads.parameters() if t.disc else [])
        mine = torch.stack([v.detach().double().sum() for v in tensors]).to(device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        if not all(torch.equal(every[0], e) for e in every):
            raise RuntimeError("ranks ended with different weights (DDP out of sync)")
        print0(f"all {world} ranks hold identical weights")
    print0(f"done: {t.ckpt_path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    def both(k):          # help suffix for flags whose default depends on the preset
        return f" (default {FULL_DEFAULTS[k]}; tiny preset {TINY_DEFAULTS[k]})"
    # model
    p.add_argument("--preset", default="L", choices=list(tokenizer.PRESETS), help="tokenizer size (Sec. 4)")
    p.add_argument("--tokens", type=int, default=64,
                   help="latent tokens L (64 -> D 32, 32 -> D 64; any other L needs --token-dim)")
    p.add_argument("--token-dim", type=int, default=None, help="channels D per latent token "
                   "(default: 32 for 64 tokens, 64 for 32)")
    p.add_argument("--quantizer", default="softvq", choices=sorted(tokenizer.QUANTIZERS),
                   help="a quantizers.QUANTIZERS key (Table 3 baselines)")
    p.add_argument("--codebook-size", type=int, default=None,
                   help="K codewords per codebook (Table 5; default: the preset's, 8192; tiny 1024)")
    p.add_argument("--num-codebooks", type=int, default=None,
                   help="G product-quantization codebooks (Table 5 PQ; default 4; 1: no PQ)")
    p.add_argument("--residual-depth", type=int, default=None,
                   help="residual quantization levels (Table 5 RQ, R-PQ with G > 1; default 1: no RQ)")
    p.add_argument("--tau", default=None,
                   help="SoftVQ softmax temperature, a number or 'learnable' (Eq. 4, Table 5; default 0.07)")
    p.add_argument("--entropy-weight", type=float, default=None,
                   help="lambda_4 of the SoftVQ / GMMVQ entropy term (Eq. 4 and 7; default 0.01; 0: off)")
    p.add_argument("--image-size", type=int, default=None, help="resolution (default: the preset's, 256)")
    p.add_argument("--encoder-init", default="auto",
                   help="DINOv2 .pth for the encoder (Sec. 4); auto: dinov2_vit{s,b,l}14_pretrain.pth of "
                        "the encoder's width in $TORCH_HOME/hub/checkpoints (none for tiny); none: random")
    # data
    p.add_argument("--data-path", default=None, help="ImageFolder root or 'builtin'" + both("data_path"))
    p.add_argument("--builtin-size", type=int, default=10000, help="images in the built-in data set")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers/rank" + both("num_workers"))
    # optimisation (App. C.1)
    p.add_argument("--global-batch", "--batch", type=int, default=None,
                   help="images per step over all ranks" + both("global_batch"))
    p.add_argument("--micro-batch", type=int, default=None, help="per-rank micro-batch (grad accumulation)")
    p.add_argument("--iters", type=int, default=None, help="training steps" + both("iters"))
    p.add_argument("--lr", type=float, default=None, help="peak lr at batch 256 (x batch/256)" + both("lr"))
    p.add_argument("--min-lr", type=float, default=None, help="final lr of the cosine" + both("min_lr"))
    p.add_argument("--warmup", type=int, default=None, help="lr warm-up steps" + both("warmup"))
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, 0: none")
    p.add_argument("--ema", type=float, default=None, help="EMA decay" + both("ema"))
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype; auto: bf16 on GPUs, fp32 on CPUs")
    # objective (Eq. 7, App. C.1)
    p.add_argument("--lpips-weight", type=float, default=1.0, help="lambda_1, LPIPS-VGG")
    p.add_argument("--lpips-warmup", type=int, default=None, help="LPIPS warm-up" + both("lpips_warmup"))
    p.add_argument("--disc-weight", type=float, default=0.2, help="lambda_2, adversarial")
    p.add_argument("--disc-start", type=int, default=None, help="discriminator start" + both("disc_start"))
    p.add_argument("--disc-adaptive-weight", action="store_true",
                   help="scale the adversarial term by VQGAN's adaptive weight at the decoder's last "
                        "layer (official option, off by default as in the official config)")
    p.add_argument("--cr-weight", type=float, default=4.0, help="consistency regularisation")
    p.add_argument("--lecam-weight", type=float, default=0.001, help="LeCAM regularisation")
    p.add_argument("--align-weight", type=float, default=0.1, help="lambda_3, representation alignment")
    p.add_argument("--proj-dim", type=int, default=None, help="projector hidden width" + both("proj_dim"))
    p.add_argument("--teacher", default=None, choices=list(TEACHERS),
                   help=f"alignment teacher (Sec. 3.3, Table 4; default {DEFAULT_TEACHER}); vit-file: a ViT "
                        "saved by this project (tokenizer.teacher_checkpoint) given by --teacher-path")
    p.add_argument("--teacher-size", default=None, choices=["s", "b", "l"],
                   help="deprecated: --teacher dinov2-<size>")
    p.add_argument("--teacher-patch", type=int, default=None, help="teacher patch" + both("teacher_patch"))
    # pretrained files (never downloaded)
    p.add_argument("--vgg-path", default=None, help=f"LPIPS trunk (default hub checkpoints/{VGG_FILE})")
    p.add_argument("--dino-path", default=None, help=f"discriminator (default hub checkpoints/{DINO_FILE})")
    p.add_argument("--teacher-path", default=None,
                   help="teacher file (default hub checkpoints/dinov2_vit<size>14_pretrain.pth, "
                        "<timm name>.safetensors for clip-b16 / eva02-clip-b16; vit-file: required)")
    p.add_argument("--fake-pretrained", action="store_true",
                   help="random stand-ins for VGG, DINO and the teacher")
    # run
    p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--name", default=None, help="run folder (default <preset>-<tokens>)")
    p.add_argument("--log-every", type=int, default=None, help="steps per log line" + both("log_every"))
    p.add_argument("--vis-every", type=int, default=None, help="steps per recon grid" + both("vis_every"))
    p.add_argument("--ckpt-every", type=int, default=None, help="steps per checkpoint" + both("ckpt_every"))
    p.add_argument("--resume", action="store_true",
                   help="continue <out-dir>/<name>/ckpt.pt exactly (or ckpt-prev.pt if it is damaged); "
                        "--lr, --min-lr, --warmup, --iters, --grad-clip and the loss weights / start steps may change")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a run folder that holds a checkpoint (deletes its checkpoints, log, grids)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop with a checkpoint after this step (the lr schedule still ends at --iters)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the tokenizer, LPIPS, the teacher and the discriminator (the first "
                        "steps compile); with --benchmark: eager and compiled figures and the compile time")
    p.add_argument("--benchmark", type=int, default=0, help="time N iterations, print one JSON line, exit")
    p.add_argument("--benchmark-warmup", type=int, default=1, help="untimed iterations before timing")
    p.add_argument("--benchmark-profile", action="store_true",
                   help="also print torch.profiler's table of the ops that take the time (slower; with "
                        "--compile a second table, compiled)")
    training.run_main(lambda: main(p.parse_args()))
