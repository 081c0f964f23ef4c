"""Evaluation of SoftVQ-VAE tokenizers and of the generators trained on their latents.

Paper: "SoftVQ-VAE: Efficient 1-Dimensional Continuous Tokenizer" (arXiv 2412.10958), Sec. 4
("Evaluation") and App. C.3. Subcommands (`python evaluate.py <subcommand> -h` lists the flags):

  gen           IS, FID, precision and recall of generated samples against a reference, with one
                Inception pass over each set (what the ADM evaluator prints). `fid`, `is` and
                `prec-recall` compute one of them:
                    python evaluate.py gen samples.npz VIRTUAL_imagenet256_labeled.npz
                    python evaluate.py fid samples_folder/ ref_stats.npz
                    python evaluate.py is samples.npz
  stats         mean / covariance of the Inception features of an image set, written to an
                ADM-style `.npz` (`mu`, `sigma`) that `fid` accepts as the reference (`gen` and
                `prec-recall` need the reference images themselves).
  recon         rFID, PSNR, SSIM, LPIPS and codebook usage of a tokenizer on an image folder
                given by --data-path (ImageNet val in the paper; centre crops), DDP-capable:
                    torchrun --nproc_per_node=8 evaluate.py recon --ckpt tok.pt --data-path VAL
  linear-probe  top-1 of a parameter-free BatchNorm + linear classifier on the mean-pooled latents
                of a frozen tokenizer (Fig. 3a), or with --sit on the mean-pooled output of block 20
                of a SiT trained on them (Fig. 3b) (App. C.3: LAMB, lr 0.003 cosine, batch 16384,
                90 epochs).
  judge-train   train the offline judge: a small classifier on a data set (built-in or an
                ImageFolder), saved to a file; needs no downloaded weights.
  judge         "FD (built-in classifier)" (Frechet distance of the judge's 128-dim penultimate
                features; not Inception FID) and class accuracy of class-conditional samples
                (labels from the .npz's arr_1), for several image sets against one reference:
                    python evaluate.py judge --judge judge.pt --ref held.npz cfg=samples.npz
  flops         GFLOPs (multiply-accumulates, as the paper's tables) of one forward of tokenizer
                encoders/decoders and generators.
  throughput    training and sampling images/s (fp32, batch 64 as Tables 1-2) on whatever device
                is present, the fraction of the device's measured matmul peak it reaches and the
                peak memory; --compile adds the same figures compiled, and the compile time.

Image sets are a folder of PNG files or an ADM-style `.npz` whose `arr_0` is uint8 N x H x W x 3;
reference batches may instead hold `mu` / `sigma` (then FID uses them, as the ADM evaluator does).
`data.save_images_npz` / `data.load_images_npz` write / read that format (`iter_images` streams it); a file
that is not such an .npz (not a zip, no images, float or N x 3 x H x W arrays) is refused by name.
Every subcommand but `flops` takes --device (default auto: a GPU if there is one).

Pretrained files are never downloaded (a missing one is an error naming it, or "needs <file>" in
`recon`, which then reports the metrics that need no weights):
  weights-inception-2015-12-05-6726825d.pth  (--inception, or $TORCH_HOME/hub/checkpoints/)
      the TF-2015 FID Inception network converted by torch-fidelity, INCEPTION_URL below.
  vgg16-397923af.pth  (--vgg, or $TORCH_HOME/hub/checkpoints/) the torchvision VGG16 for LPIPS,
      VGG_URL below; the lpips package ships the small linear heads itself.

Tests: `python -m pytest -q tests/test_evaluate.py`.
"""

import contextlib
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import training
from data import (BUILTIN_REF_SEED, BUILTIN_VAL_SEED, check_images, check_npz_file, count_images,  # noqa: F401
                  iter_images, load_images_npz, load_labels_npz, save_images_npz)

# ---- pretrained files (never downloaded: the user puts them there) ----
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)
VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/" + VGG_FILE

# ---- metric constants ----
FID_EPS = 1e-6              # ADM / pytorch-fid: diagonal offset when sqrtm(sigma1 sigma2) is singular
FID_IMAG_ATOL = 1e-3        # ADM / pytorch-fid: largest tolerated imaginary part on sqrtm's diagonal
IS_SPLIT_SIZE = 5000        # ADM evaluator: IS over consecutive chunks of 5000 (10 at 50K, 2 at 10K)
PR_K = 3                    # Kynkaanniemi et al. 2019 / ADM evaluator: radius = 3rd nearest neighbour
PR_BATCH = 10000            # rows / columns per distance block (ADM evaluator's batch sizes)
PIXEL_MAX = 255.0           # PSNR / SSIM data range: uint8 images
SSIM_WINDOW = 11            # Wang et al. 2004 (and skimage gaussian_weights=True): 11x11 Gaussian,
SSIM_SIGMA = 1.5            # sigma 1.5,
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilisers C1 = (K1 * 255)^2, C2 = (K2 * 255)^2

# ---- linear probing (App. C.3) ----
PROBE_EPOCHS = 90
PROBE_BATCH = 16384
PROBE_LR = 0.003
PROBE_INIT_STD = 0.01       # MAE linear probe: head weights ~ N(0, 0.01), bias 0
PROBE_BN_EPS = 1e-6         # MAE linear probe: BatchNorm1d(affine=False, eps=1e-6)
SIT_PROBE_LAYER = 20        # Fig. 3b probes the output of SiT block 20

# ---- efficiency (Tables 1-2: fp32, batch 64) ----
BENCH_BATCH = 64
SAMPLING_STEPS = 250        # SiT SDE / DiT DDPM steps of the paper's samples (the models' default)
TIMED_TRAIN_STEPS = 5       # optimizer steps timed after one warm-up step
WARMUP_SAMPLING_STEPS = 2   # untimed sampling run first (kernel selection, allocator)

# allowed range of every numeric flag of every subcommand (training.check_flags)
FLAG_RANGES = {"batch_size": "> 0", "num_workers": ">= 0", "num_images": ">= 0", "grid_images": "> 0",
               "layer": "> 0", "t": "in [0, 1]", "max_train_images": ">= 0", "max_val_images": ">= 0",
               "epochs": "> 0", "probe_batch_size": "> 0", "lr": "> 0", "weight_decay": ">= 0",
               "image_size": "> 0", "batch": "> 0", "steps": "> 0", "train_steps": ">= 0",
               "builtin_size": "> 0", "val_images": "> 0"}


# ---------------------------------------------------------------------------------------------
# Devices and weight files
# ---------------------------------------------------------------------------------------------
def _all_reduce(t, device):
    """Sum a CPU tensor over DDP ranks (through `device`: NCCL needs GPU tensors); unchanged
    without a process group."""
    if not torch.distributed.is_initialized():
        return t
    t = t.to(device)
    torch.distributed.all_reduce(t)
    return t.cpu()


def weight_file(filename, given=None, flag=None, url=None):
    """Path of a pretrained file: `given`, else $TORCH_HOME/hub/checkpoints/<filename>.

    Raises FileNotFoundError naming the file, where it was looked for and where to get it; we never
    download (torch.hub / lpips / torch-fidelity would, and can hang behind a silent proxy).
    """
    path = given or os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(path):
        how = f"pass {flag} PATH or " if flag else ""
        raise training.MissingFileError(f"needs {filename}: not found at {path}. Download it from {url} and "
                                        f"{how}put it in {os.path.dirname(path)}")
    return path


# ---------------------------------------------------------------------------------------------
# Image sets: PNG folders and ADM-style .npz batches
# ---------------------------------------------------------------------------------------------
def save_stats(path, mu, sigma):
    """Write Inception statistics as the ADM reference batches store them (`mu`, `sigma`)."""
    with training.atomic_write(path) as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path):
    """(mu, sigma) float64 of a stats / ADM reference .npz, or None when it holds no statistics."""
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return None
    check_npz_file(path)
    with np.load(path) as npz:
        if "mu" not in npz or "sigma" not in npz:
            return None
        return npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Inception features (TF-2015 FID network via torch-fidelity) and their statistics
# ---------------------------------------------------------------------------------------------
def load_inception(path=None, device="cpu"):
    """The TF-2015-12-05 FID Inception network of torch-fidelity, from a local weight file.

    Returns a module mapping uint8 images (B, 3, H, W) to (pool_3 (B, 2048), logits_unbiased
    (B, 1008)); it resizes to 299 x 299 itself with TF1-compatible bilinear interpolation.
    'logits_unbiased' (pool_3 @ W without the bias) is what the ADM evaluator's IS softmax uses.
    """
    path = weight_file(INCEPTION_FILE, path, "--inception", INCEPTION_URL)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    # A path is always passed: with None torch-fidelity would try to download.
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=path)
    return model.to(device).eval()


class FeatureStats:
    """Running mean and covariance of features, accumulated in float64 (sum and sum of outer
    products, sized by the first batch), so any number of batches or DDP ranks give the statistics
    of all images at once. Covariance with ddof = 1, as np.cov in the ADM evaluator / pytorch-fid /
    torch-fidelity."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def update(self, feats):
        f = feats.detach().to("cpu", torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self, device):
        """Sum over DDP ranks (a no-op without a process group); every rank must have data."""
        if not torch.distributed.is_initialized():
            return
        packed = _all_reduce(torch.cat([torch.tensor([float(self.n)], dtype=torch.float64),
                                        self.sum, self.outer.flatten()]), device)
        d = self.sum.numel()
        self.n = int(round(packed[0].item()))
        self.sum, self.outer = packed[1:1 + d], packed[1 + d:].view(d, d)

    def mean_cov(self):
        if self.n < 2:
            raise training.UserError(f"need at least 2 images for a covariance, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


@torch.no_grad()
def inception_features(inception, source, batch_size=100, device="cpu", desc="inception"):
    """pool_3 features (N, 2048) and logits_unbiased (N, 1008), float32 on the CPU, of an image
    set (PNG folder / .npz path) or of a uint8 array (N, H, W, 3)."""
    if isinstance(source, np.ndarray):
        check_images(source, "images")
        total = len(source)
        batches = (source[i:i + batch_size] for i in range(0, total, batch_size))
    else:
        total = count_images(source)
        batches = iter_images(source, batch_size)
    feats, logits = [], []
    with tqdm(total=total, desc=desc, unit="img", disable=total <= batch_size) as bar:
        for batch in batches:
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
            f, l = inception(x)
            feats.append(f.float().cpu())
            logits.append(l.float().cpu())
            bar.update(len(batch))
    return torch.cat(feats), torch.cat(logits)


# ---------------------------------------------------------------------------------------------
# Generation metrics: FID, IS, precision / recall (ADM evaluator conventions)
# ---------------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), float64.

    As the ADM evaluator / pytorch-fid: scipy.linalg.sqrtm; a non-finite root is retried with
    FID_EPS added to both diagonals; the small imaginary part that sqrtm leaves from round-off is
    dropped, and a large one (a numerical failure) is an error.
    """
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise training.UserError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                                 f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * FID_EPS
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=FID_IMAG_ATOL):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) per split; (mean, std) over splits.

    `logits`: the Inception 'logits_unbiased' (N, 1008). As the ADM evaluator
    (compute_inception_score), splits are consecutive chunks of `split_size` samples (no
    shuffling; the last chunk holds the rest, so 10 splits at 50K, 2 at 10K, 1 below 5K) and p(y)
    is each split's mean; float64. The ADM evaluator reports the mean.
    """
    logits = torch.as_tensor(logits).double()
    n = logits.shape[0]
    if n < 1 or isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
        raise ValueError(f"inception score needs >= 1 sample and a positive integer split_size, got "
                         f"{n} samples and split_size {split_size!r}")
    log_p = logits.log_softmax(dim=1)
    scores = []
    for start in range(0, n, split_size):
        part = log_p[start:start + split_size]
        log_py = part.exp().mean(0).log()                     # log p(y) of this split
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
    """Squared Euclidean distances (rows of a) x (rows of b), float32, clamped at 0."""
    d = a.pow(2).sum(1, keepdim=True) - 2.0 * a @ b.T + b.pow(2).sum(1)[None]
    return d.clamp_min_(0.0)


def manifold_radii(feats, k=PR_K, batch_size=PR_BATCH, device="cpu"):
    """Squared distance of every feature to its k-th nearest neighbour in the same set (itself,
    at distance 0, not counted), computed block by block: (batch x batch) at a time."""
    feats = feats.float()
    if len(feats) <= k:
        raise ValueError(f"precision / recall need more than k = {k} features per set, got {len(feats)}")
    radii = []
    for rows in tqdm(feats.split(batch_size), desc="radii", disable=len(feats) <= batch_size):
        rows = rows.to(device)
        # the k + 1 smallest of every column block (all of a last block with fewer columns), then
        # of their union: no N x N matrix
        best = torch.cat([_sq_dists(rows, cols.to(device)).topk(min(k + 1, len(cols)), dim=1,
                                                                largest=False).values
                          for cols in feats.split(batch_size)], dim=1)
        radii.append(best.topk(k + 1, dim=1, largest=False).values[:, k].cpu())
    return torch.cat(radii)


def _inside(queries, feats, radii, batch_size, device):
    """Fraction of `queries` inside the union of balls (feats_j, radius_j)."""
    hits = []
    for rows in queries.float().split(batch_size):
        rows, hit = rows.to(device), torch.zeros(len(rows), dtype=torch.bool, device=device)
        for cols, r in zip(feats.float().split(batch_size), radii.split(batch_size)):
            hit |= (_sq_dists(rows, cols.to(device)) <= r.to(device)[None]).any(dim=1)
        hits.append(hit.cpu())
    return torch.cat(hits).double().mean().item()


def precision_recall(real, fake, k=PR_K, batch_size=PR_BATCH, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on Inception pool_3 features.

    Precision: fraction of generated samples inside the real manifold (the union of balls around
    real features reaching their k-th neighbour); recall: fraction of real samples inside the
    generated manifold. k = 3 as the ADM evaluator.
    """
    r_real = manifold_radii(real, k, batch_size, device)
    r_fake = manifold_radii(fake, k, batch_size, device)
    precision = _inside(fake, real, r_real, batch_size, device)
    recall = _inside(real, fake, r_fake, batch_size, device)
    return precision, recall


GEN_METRICS = ("is", "fid", "prec-recall")


def generation_metrics(samples, ref, metrics=GEN_METRICS, inception=None, batch_size=100,
                       device="cpu"):
    """IS / FID / precision-recall of `samples` (PNG folder or .npz) against `ref` (PNG folder,
    .npz images, .npz statistics, or None for IS alone), with one Inception pass over each set.
    `inception`: the network (load_inception) or the path of its weight file (None: the default
    place). Returns a dict."""
    unknown = set(metrics) - set(GEN_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; allowed: {GEN_METRICS}")
    if ("fid" in metrics or "prec-recall" in metrics) and ref is None:
        raise training.UserError("FID and precision/recall need a reference set (ref)")
    count_images(samples)  # a missing or malformed set fails before anything is loaded
    ref_stats = load_stats(ref) if ref is not None else None
    ref_needs_images = "prec-recall" in metrics or ("fid" in metrics and ref_stats is None)
    if ref_needs_images:
        count_images(ref)  # fails before the long pass when ref holds only mu / sigma
    if not isinstance(inception, nn.Module):
        inception = load_inception(inception, device)
    feats, logits = inception_features(inception, samples, batch_size, device, "samples")
    out = {"num_samples": len(feats)}
    if "is" in metrics:
        out["inception_score"], out["inception_score_std"] = inception_score(logits)
    if ref_needs_images:
        ref_feats, _ = inception_features(inception, ref, batch_size, device, "reference")
        out["num_reference"] = len(ref_feats)
    if "fid" in metrics:
        stats = FeatureStats()
        stats.update(feats)
        if ref_stats is None:  # ADM: the mu / sigma of a reference file win over its images
            ref_acc = FeatureStats()
            ref_acc.update(ref_feats)
            ref_stats = ref_acc.mean_cov()
        out["fid"] = frechet_distance(*stats.mean_cov(), *ref_stats)
    if "prec-recall" in metrics:
        out["precision"], out["recall"] = precision_recall(ref_feats, feats, device=device)
    return out


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics: PSNR, SSIM, LPIPS, codebook usage
# ---------------------------------------------------------------------------------------------
def psnr(a, b):
    """Per-image PSNR (dB) of uint8 images (B, 3, H, W), on [0, 255]; inf for identical images."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(PIXEL_MAX ** 2 / mse)


def _gaussian_window(device):
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-x ** 2 / (2 * SSIM_SIGMA ** 2))
    return g / g.sum()


def ssim(a, b):
    """Per-image SSIM (Wang et al. 2004) of uint8 images (B, 3, H, W) on [0, 255], float64.

    11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (co)variances, the map
    averaged over the positions where the window fits (no padding), per RGB channel, then over
    channels: skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1). (The official code passes
    data_range=2.0 for images on [0, 255]: we do not copy that.)
    """
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise training.UserError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape}")
    x, y = a.double(), b.double()
    C = x.shape[1]
    g = _gaussian_window(x.device)
    def blur(t):  # separable valid Gaussian filter, per channel
        t = F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, -1, 1).contiguous(), groups=C)
        return F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, -1).contiguous(), groups=C)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def load_lpips(vgg_path=None, device="cpu"):
    """LPIPS (Zhang et al. 2018, VGG variant) built offline from a local VGG16 file.

    lpips.LPIPS(net='vgg') would download VGG16 through torchvision; we build it with random VGG
    weights (pnet_rand=True; the package's own linear heads still load) and copy the torchvision
    `features.*` tensors into its five slices, which keep torchvision's layer indices.
    Inputs of the returned module: images in [-1, 1]; output (B, 1, 1, 1).
    """
    path = weight_file(VGG_FILE, vgg_path, "--vgg", VGG_URL)
    import lpips
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    vgg = torch.load(path, map_location="cpu", weights_only=True)
    slices = {name.split(".")[1]: name.split(".")[0] for name in model.net.state_dict()}
    state = {}
    for key, value in vgg.items():
        part, index, kind = key.split(".")
        if part == "features":  # the classifier is not part of LPIPS
            state[f"{slices[index]}.{index}.{kind}"] = value
    model.net.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def codebook_hits(quantizer, z_hat):
    """Bool (codebooks, K): which codewords are the argmax of at least one token of z_hat.

    SoftVQ / GMMVQ: argmax of the posterior q of every token at every residual level (Eq. 13);
    VQ: the nearest codeword. None for quantizers without a codebook (KL, AE).
    """
    import quantizers
    if isinstance(quantizer, quantizers.VectorQuantizer):
        idx = quantizer.nearest(z_hat).flatten()
        return torch.zeros(1, quantizer.codebook_size, dtype=torch.bool,
                           device=idx.device).index_fill_(1, idx, True)
    if not hasattr(quantizer, "residual_assign"):
        return None
    return quantizer.codebook_hits(quantizer.residual_assign(z_hat)[1])


# ---------------------------------------------------------------------------------------------
# Linear probing (App. C.3): parameter-free BatchNorm + linear layer, LAMB, cosine lr
# ---------------------------------------------------------------------------------------------
class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2020, Algorithm 2): Adam's bias-corrected update plus decoupled weight
    decay, rescaled per parameter tensor by the trust ratio ||w|| / ||update|| (1 when either is
    0, e.g. a zero-initialised bias). torch has no LAMB; App. C.3 uses it for linear probing."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.add_(update * trust, alpha=-group["lr"])


def train_linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=PROBE_EPOCHS,
                       batch_size=PROBE_BATCH, lr=PROBE_LR, weight_decay=0.0, device="cpu", seed=0):
    """Train BatchNorm1d(affine=False) + Linear on fixed features (N, D); returns val top-1 (%).

    App. C.3 (the MAE / DAE / REPA protocol): 90 epochs, batch 16384, LAMB, cosine decay from
    lr 0.003 to 0 over all steps, no warm-up. The paper names no weight decay: 0 by default.
    """
    g = torch.Generator().manual_seed(seed)
    dim = train_x.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=PROBE_BN_EPS), nn.Linear(dim, num_classes))
    nn.init.normal_(head[1].weight, std=PROBE_INIT_STD, generator=g)   # on the CPU: g is a CPU generator
    nn.init.zeros_(head[1].bias)
    head = head.to(device)
    opt = LAMB(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    train_x, train_y = train_x.float().to(device), train_y.long().to(device)
    head.train()
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=epochs < 10):
        order = torch.randperm(len(train_x), generator=g).to(device)
        for idx in order.split(batch_size):
            if len(idx) < 2:  # BatchNorm statistics need two samples
                continue
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        pred = torch.cat([head(x.float().to(device)).argmax(1).cpu() for x in val_x.split(batch_size)])
    return 100.0 * (pred == val_y.long().cpu()).double().mean().item()


# ---------------------------------------------------------------------------------------------
# The offline judge: a small classifier trained by this project (no Inception file needed)
# ---------------------------------------------------------------------------------------------
# Without the Inception weights, generated images still need a judge. A small CNN trained here on
# the data set (built-in or any ImageFolder) gives two numbers: the Frechet distance of its
# JUDGE_WIDTH-dim penultimate features ("FD (built-in classifier)": the FID formula on other
# features, so its values are not comparable with Inception FID), and the class accuracy of
# class-conditional samples (does a sample of class c look like class c to the judge?).
JUDGE_WIDTH = 128           # penultimate feature dimension
JUDGE_EPOCHS = 4
JUDGE_BATCH = 64
JUDGE_LR = 2e-3
JUDGE_FD_NAME = "FD (built-in classifier)"


class Judge(nn.Module):
    """Four 3x3 conv stages (32-64-128-128 channels, BatchNorm, ReLU, stride 2 from the second),
    global average pool -> JUDGE_WIDTH features -> linear class head. Inputs: (B, 3, S, S) in [-1, 1]
    at the training size S (other sizes are resized bilinearly)."""

    def __init__(self, num_classes, image_size):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        layers, c_in = [], 3
        for c_out, stride in ((32, 1), (64, 2), (128, 2), (JUDGE_WIDTH, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(JUDGE_WIDTH, num_classes)

    def features(self, x):
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def train_judge(dataset, epochs=JUDGE_EPOCHS, batch_size=JUDGE_BATCH, lr=JUDGE_LR, seed=0,
                num_workers=0, show=True):
    """Train a Judge on a data set of (image in [-1, 1], label) with AdamW and a cosine lr (CPU:
    about a minute for 4 epochs of 10K 32 px images). The data set's own augmentation applies."""
    torch.manual_seed(seed)
    judge = Judge(len(dataset.classes), dataset[0][0].shape[-1])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader), pct_start=0.15)
    judge.train()
    for epoch in range(epochs):
        correct = seen = 0
        for x, y in tqdm(loader, desc=f"judge epoch {epoch + 1}/{epochs}", unit="batch", disable=not show):
            logits = judge(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        if show:
            print(f"judge epoch {epoch + 1}: train accuracy {100 * correct / seen:.1f}%", flush=True)
    return judge.eval()


def save_judge(path, judge, classes):
    training.save_checkpoint(path, {"kind": "judge", "num_classes": judge.num_classes,
                                    "image_size": judge.image_size, "classes": list(classes),
                                    "model": judge.state_dict()})


def load_judge(path, device="cpu"):
    """A Judge saved by `evaluate.py judge-train` (a missing file names the command that makes it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"judge file not found: {path}; train one with "
                                f"`python evaluate.py judge-train --data-path DATA --out {path}`")
    state = training.load_checkpoint(path)
    if state.get("kind") != "judge":
        raise training.UserError(f"{path} is not a judge file (from `evaluate.py judge-train`)")
    judge = Judge(state["num_classes"], state["image_size"])
    judge.load_state_dict(state["model"])
    return judge.to(device).eval()


@torch.no_grad()
def judge_outputs(judge, source, batch_size=256, device="cpu"):
    """Penultimate features (N, JUDGE_WIDTH) float64 and predicted classes (N,) of an image set."""
    feats, preds = [], []
    for batch in iter_images(source, batch_size):                 # uint8 (B, H, W, 3)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        f = judge.features(x)
        feats.append(f.double().cpu())
        preds.append(judge.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def judge_metrics(judge, sets, ref, batch_size=256, device="cpu"):
    """{name: {"fd", "class_accuracy" (when the set has labels), "num_images"}} for each image set
    in `sets` (name -> .npz / PNG folder) against the reference image set `ref`."""
    ref_feats, _ = judge_outputs(judge, ref, batch_size, device)
    ref_stats = FeatureStats()
    ref_stats.update(ref_feats)
    mu_r, sigma_r = ref_stats.mean_cov()
    results = {}
    for name, source in sets.items():
        feats, preds = judge_outputs(judge, source, batch_size, device)
        stats = FeatureStats()
        stats.update(feats)
        row = {"num_images": len(feats), "fd": frechet_distance(*stats.mean_cov(), mu_r, sigma_r)}
        labels = load_labels_npz(source) if str(source).endswith(".npz") else None
        if labels is not None:
            if len(labels) != len(preds):
                raise ValueError(f"{source}: {len(labels)} labels (arr_1) for {len(preds)} images")
            row["class_accuracy"] = 100.0 * (preds.numpy() == labels).mean()
        results[name] = row
    return results


# ---------------------------------------------------------------------------------------------
# Tokenizers and data for `recon` / `linear-probe`
# ---------------------------------------------------------------------------------------------
SUBSET_SEED = 0             # --num-images / --max-*-images: a fixed random subset of the data set


def load_tokenizer_from_args(args):
    """A train_tok.py checkpoint (--ckpt, EMA weights) or a released folder (--released)."""
    if (args.ckpt is None) == (args.released is None):
        raise training.UserError("pass exactly one of --ckpt (train_tok.py checkpoint) or --released "
                                 "(folder with config.json + model.safetensors)")
    if args.ckpt is not None:
        return training.load_tokenizer(args.ckpt, ema=True, flag="--ckpt")
    import tokenizer
    return tokenizer.load_released(args.released)


def subset_indices(length, limit, rank=0, world_size=1):
    """This rank's share of all indices, or of a fixed random subset of `limit` of them (a plain
    prefix of an ImageFolder would hold only its first classes). No padding: every image once."""
    if limit and limit < length:
        indices = torch.randperm(length, generator=torch.Generator().manual_seed(SUBSET_SEED))
        indices = indices[:limit].sort().values.tolist()
    else:
        indices = list(range(length))
    return indices[rank::world_size]


def make_loader(dataset, indices, global_batch, world_size, num_workers):
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                       batch_size=max(1, global_batch // world_size),
                                       num_workers=num_workers, shuffle=False)


def _optional(loader_fn, path, device):
    """A weight-file-backed metric network, or the "needs <file>" message when its file is absent."""
    try:
        return loader_fn(path, device), None
    except FileNotFoundError as err:
        return None, str(err)


@torch.no_grad()
def reconstruction_metrics(model, loader, device, inception=None, lpips_model=None, show=True,
                           keep=None):
    """rFID / PSNR / SSIM / LPIPS / codebook usage of `model` on this rank's `loader`, reduced over
    all DDP ranks. Every metric is computed on the uint8-rounded images (what a saved PNG holds);
    rFID compares the Inception statistics of the originals with those of their reconstructions.
    Returns a dict (rFID / LPIPS only when their networks are given). `keep`, a list, receives
    (inputs, reconstructions, labels) of every batch: uint8 (B, H, W, 3) arrays and labels."""
    real_stats, rec_stats = FeatureStats(), FeatureStats()
    sums = torch.zeros(4, dtype=torch.float64)          # images, PSNR, SSIM, LPIPS
    hits, captured = None, []
    # the quantizer's input z_hat, for the dataset-level codebook usage
    hook = model.quantize.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    try:
        for x, y in tqdm(loader, desc="recon", unit="batch", disable=not show):
            x = x.to(device)
            rec = model.decode(model.encode(x))
            batch_hits = codebook_hits(model.quantize, captured.pop())
            if batch_hits is not None:
                hits = batch_hits if hits is None else hits | batch_hits
            real8, rec8 = training.to_uint8(x), training.to_uint8(rec)
            if keep is not None:
                keep.append((real8.permute(0, 2, 3, 1).cpu().numpy(), rec8.permute(0, 2, 3, 1).cpu().numpy(),
                             np.asarray(y)))
            sums[0] += len(x)
            sums[1] += psnr(real8, rec8).sum().item()
            sums[2] += ssim(real8, rec8).sum().item()
            if lpips_model is not None:
                sums[3] += lpips_model(real8.float() / 127.5 - 1, rec8.float() / 127.5 - 1).sum().item()
            if inception is not None:
                real_stats.update(inception(real8)[0])
                rec_stats.update(inception(rec8)[0])
    finally:
        hook.remove()
    sums = _all_reduce(sums, device)
    n = sums[0].item()
    out = {"num_images": int(n), "psnr": sums[1].item() / n, "ssim": sums[2].item() / n}
    if lpips_model is not None:
        out["lpips"] = sums[3].item() / n
    if hits is not None:
        hits = _all_reduce(hits.to(torch.int32).cpu(), device) > 0    # used on any rank
        out["codebook_usage"] = hits.float().mean().item()  # fraction of all G x K codewords used
    if inception is not None:
        real_stats.all_reduce(device)
        rec_stats.all_reduce(device)
        out["rfid"] = frechet_distance(*real_stats.mean_cov(), *rec_stats.mean_cov())
    return out


@torch.no_grad()
def encode_latents(model, loader, device, pool="mean", show=True, features=None):
    """Pooled latents (N, D) for mean, (N, L*D) for flatten, and labels. `features`, if given,
    maps each batch of latents z_q (B, L, D) to (B, F) features instead (SiT features, Fig. 3b).
    Under DDP rank 0 gets those of every rank (order: rank by rank; only rank 0 holds them all, as
    flattened ImageNet latents are GBs); other ranks get their own."""
    feats, labels = [], []
    for x, y in tqdm(loader, desc="encode", unit="batch", disable=not show):
        z = model.encode(x.to(device)).float()             # z_q (B, L, D), before normalisation
        if features is not None:
            feats.append(features(z).float().cpu())
        else:
            feats.append((z.mean(1) if pool == "mean" else z.flatten(1)).cpu())
        labels.append(torch.as_tensor(y))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if torch.distributed.is_initialized():
        rank0 = torch.distributed.get_rank() == 0
        parts = [None] * torch.distributed.get_world_size() if rank0 else None
        torch.distributed.gather_object((feats, labels), parts, dst=0)
        if rank0:
            feats, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return feats, labels


@torch.no_grad()
def sit_features(model, z, layer, t=0.0, generator=None):
    """Fig. 3b: features of a trained SiT for linear probing: the output of block `layer` (1-based;
    the paper probes layer 20), mean-pooled over the L tokens, for normalised latents z (B, L, D)
    taken to time t of the model's interpolant (t = 0: the clean latents; the paper names no noise
    level), with the null class as the label so that the features cannot carry it."""
    c = model.config
    if c.arch != "sit":
        raise training.UserError(f"SiT feature probing needs a SiT model, got {c.arch!r}")
    if not 1 <= layer <= c.depth:
        raise training.UserError(f"--layer must be in 1..{c.depth} for this SiT, got {layer}")
    tt = torch.full((z.shape[0],), float(t), device=z.device)
    alpha, sigma = (a.view(-1, 1, 1) for a in model.algorithm.coefficients(tt)[:2])
    noise = torch.randn(z.shape, generator=generator, device=z.device) if t > 0 else torch.zeros_like(z)
    h = model.x_embedder(alpha * z + sigma * noise) + model.pos_embed
    cond = model.t_embedder(tt) + model.y_embedder(torch.full_like(tt, c.num_classes, dtype=torch.long))
    for block in model.blocks[:layer]:
        h = block(h, cond)
    return h.mean(1)


# ---------------------------------------------------------------------------------------------
# Efficiency: GFLOPs per forward and throughput (Tables 1-2)
# ---------------------------------------------------------------------------------------------
def count_macs(fn, *args):
    """Multiply-accumulates (FLOPs / 2, the paper's "GFLOPs") of fn(*args), by torch's
    FlopCounterMode. Attention runs on the math backend while counting: the fused CPU kernel has
    no FLOP formula and would count as 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 2


def tokenizer_macs(preset, tokens, image_size):
    """(encoder, decoder) multiply-accumulates of one image for a tokenizer preset.

    Built and run on the meta device (no memory, instant). Encoder = ViT + quant_conv +
    quantizer; decoder = post_quant_conv + ViT + pixel head."""
    import tokenizer
    with torch.device("meta"):
        model = tokenizer.make_tokenizer(preset, tokens=tokens, image_size=image_size).eval()
        cfg = model.config
        x = torch.empty(1, 3, image_size, image_size)
        z = torch.empty(1, cfg.num_tokens, cfg.token_dim)
    return count_macs(model.encode, x), count_macs(model.decode, z)


def generator_macs(preset, tokens, token_dim):
    """Multiply-accumulates of one network forward at batch 1 (generators.count_macs; MAR: all L
    tokens known, one diffusion-head evaluation per token), built on the meta device."""
    import generators
    with torch.device("meta"):
        model = generators.make_generator(preset, tokens, token_dim)
    return generators.count_macs(model)[0]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_training(model, batch, steps, device, dtype):
    """Training steps (loss, backward, AdamW) after one warm-up step: {"img_per_s", "warmup_s"
    (the warm-up step's seconds: it compiles a compiled model), "peak_bytes" (of the timed steps)}."""
    c = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, c.num_tokens, c.token_dim, device=device)
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    model.train()
    training.synchronize(device)
    start = time.perf_counter()
    for i in range(steps + 1):
        if i == 1:                                          # step 0 is the warm-up
            training.synchronize(device)
            warmup, start = time.perf_counter() - start, time.perf_counter()
            training.reset_peak_memory(device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    training.synchronize(device)
    return dict(img_per_s=batch * steps / (time.perf_counter() - start), warmup_s=warmup,
                peak_bytes=training.peak_memory(device))


def time_sampling(model, batch, steps, device, dtype):
    """`model.sample` with the paper's CFG (one doubled batch; SiT guided only inside its
    interval) after a short warm-up run that meets both batch sizes: {"img_per_s", "rows"
    (network forward rows per image), "warmup_s" (it compiles a compiled model), "peak_bytes"}."""
    import generators
    c = model.config
    cfg = generators.paper_cfg(c.arch, c.num_tokens)
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    rows = []
    hook = model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            training.synchronize(device)
            start = time.perf_counter()
            model.sample(y, steps=WARMUP_SAMPLING_STEPS, **cfg)
            training.synchronize(device)
            warmup = time.perf_counter() - start
            rows.clear()
            training.reset_peak_memory(device)
            start = time.perf_counter()
            model.sample(y, steps=steps, **cfg)
            training.synchronize(device)
    finally:
        hook.remove()
    return dict(img_per_s=batch / (time.perf_counter() - start), rows=sum(rows) / batch, warmup_s=warmup,
                peak_bytes=training.peak_memory(device))


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------
def report(results, out=None):
    """Print `name: value` lines (rank 0) and write them as JSON to `out` when given."""
    if not training.is_rank0():
        return
    for key, value in results.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}", flush=True)
    if out:
        import json
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


def main_gen(args):
    """gen / fid / is / prec-recall."""
    metrics = {"gen": GEN_METRICS, "fid": ("fid",), "is": ("is",),
               "prec-recall": ("prec-recall",)}[args.command]
    with training.distributed(args.device) as (_, _, _, device):
        report(generation_metrics(args.samples, getattr(args, "ref", None), metrics, args.inception,
                                  args.batch_size, device), args.out)


def main_stats(args):
    count_images(args.source)  # a missing or malformed set fails before the network is loaded
    with training.distributed(args.device) as (_, _, _, device):
        feats, _ = inception_features(load_inception(args.inception, device), args.source,
                                      args.batch_size, device)
        stats = FeatureStats()
        stats.update(feats)
        save_stats(args.out, *stats.mean_cov())
        print(f"wrote mu / sigma of {stats.n} images to {args.out}")


def main_recon(args):
    with training.distributed(args.device) as (rank, _, world, device):
        if args.save_npz and world > 1:
            raise training.UserError("--save-npz writes from one process: run recon without torchrun")
        model = load_tokenizer_from_args(args).to(device).eval()
        dataset = data.make_dataset(args.data_path, model.config.image_size, train=False,
                                    seed=BUILTIN_VAL_SEED)
        loader = make_loader(dataset, subset_indices(len(dataset), args.num_images, rank, world),
                             args.batch_size, world, args.num_workers)
        inception, no_inception = _optional(load_inception, args.inception, device)
        lpips_model, no_lpips = _optional(load_lpips, args.vgg, device)
        keep = [] if args.save_npz else None
        results = reconstruction_metrics(model, loader, device, inception, lpips_model, rank == 0, keep)
        report(results, args.out)
        if args.save_npz:                 # the images and their reconstructions, with labels (arr_1)
            inputs, recons, labels = (np.concatenate(a) for a in zip(*keep))
            for path, images in ((f"{args.save_npz}-inputs.npz", inputs), (f"{args.save_npz}-recons.npz", recons)):
                save_images_npz(path, images, labels=labels)
            print(f"wrote {args.save_npz}-inputs.npz and {args.save_npz}-recons.npz ({len(labels)} images)")
        for name, missing in (("rFID", no_inception), ("LPIPS", no_lpips)):
            if missing:
                training.print0(f"{name}: {missing}")
        if args.grid and rank == 0:   # images spread evenly over the set (so over its classes), top,
            picks = torch.linspace(0, len(dataset) - 1, min(args.grid_images, len(dataset))).long()
            x = torch.stack([dataset[int(i)][0] for i in picks]).to(device)    # reconstructions below
            with torch.no_grad():
                x_rec = model(x)[0]
            training.save_image_grid(torch.cat([x, x_rec]), args.grid, nrow=x.shape[0])
            print(f"grid: {args.grid} (top: inputs, bottom: reconstructions)")


def main_linear_probe(args):
    with training.distributed(args.device) as (rank, _, world, device):
        features = None
        if args.sit is None:                            # Fig. 3a: the tokenizer's latents
            model = load_tokenizer_from_args(args).to(device).eval()
        else:                                           # Fig. 3b: a SiT's intermediate features
            tok_path = args.ckpt or args.released        # None: the one the SiT checkpoint names
            sit, model, mean, std, _ = training.load_models(SimpleNamespace(ckpt=args.sit, tokenizer=tok_path),
                                                          flag="--sit")
            sit, model = sit.to(device), model.to(device)
            g = torch.Generator(device).manual_seed(SUBSET_SEED + rank)
            features = lambda z: sit_features(sit, (z - mean) / std, args.layer, args.t, g)
        size = model.config.image_size
        splits = {}
        for name, path, limit, seed in (("train", args.train_path, args.max_train_images, 0),
                                        ("val", args.val_path, args.max_val_images, BUILTIN_VAL_SEED)):
            dataset = data.make_dataset(path, size, train=False, seed=seed)  # centre crops
            loader = make_loader(dataset, subset_indices(len(dataset), limit, rank, world),
                                 args.batch_size, world, args.num_workers)
            splits[name] = encode_latents(model, loader, device, args.pool, rank == 0, features)
            if name == "train":
                num_classes = len(dataset.classes)
        if rank == 0:
            top1 = train_linear_probe(*splits["train"], *splits["val"], num_classes, args.epochs,
                                      args.probe_batch_size, args.lr, args.weight_decay, device)
            report({"train_images": len(splits["train"][0]), "val_images": len(splits["val"][0]),
                    "feature_dim": splits["train"][0].shape[1], "top1": top1}, args.out)


def main_flops(args):
    import tokenizer
    print(f"{'tokenizer':9} {'L':>3} {'D':>3} {'encoder':>8} {'decoder':>8}   "
          f"(GFLOPs = multiply-accumulates of one {args.image_size}px image)")
    for preset in args.tokenizers:
        for L in args.tokens:
            enc, dec = tokenizer_macs(preset, L, args.image_size)
            print(f"{preset:9} {L:>3} {tokenizer.TOKEN_DIMS[L]:>3} {enc / 1e9:8.2f} {dec / 1e9:8.2f}")
    import generators
    print(f"{'generator':9} {'L':>3} {'D':>3} {'GFLOPs':>8} {'paper':>8}   (one forward, batch 1)")
    for preset in args.models:
        for L in args.tokens:
            paper = generators.PAPER_GFLOPS.get((preset, L))
            macs = generator_macs(preset, L, tokenizer.TOKEN_DIMS[L])
            print(f"{preset:9} {L:>3} {tokenizer.TOKEN_DIMS[L]:>3} {macs / 1e9:8.2f} "
                  f"{'-' if paper is None else f'{paper:.2f}':>8}")


def main_throughput(args):
    """Per model: training and sampling images/s, FLOP/s, the matmul peak (TFLOP/s, measured after
    each line) and the fraction of it reached (MAR: "-", its work per step varies), peak memory.
    --compile adds two lines: the same model compiled (training.compile_generator), with the
    compile time (the compiled warm-ups' excess over the eager ones), then eager again
    (training.force_eager), so that a drift of the machine's speed during the run shows."""
    import generators
    import tokenizer
    with training.distributed(args.device) as (_, _, _, device):
        dtype = DTYPES[args.dtype]
        torch.manual_seed(0)
        # the matmul peak is measured again after each line's timing (the fraction's denominator):
        # a machine whose speed drifts (shared CPUs, clocks) then shows it
        print(f"device: {training.device_name(device)}, {args.dtype}")
        print(f"{'model':8} {'L':>3} {'batch':>5} {'steps':>5} {'mode':>8} {'train img/s':>11} "
              f"{'sample img/s':>12} {'fwd/img':>7} {'TFLOP/s':>8} {'peak':>7} {'of peak':>7} "
              f"{'peak GB':>7} {'compile s':>9}")
        for preset in args.models:
            for L in args.tokens:
                D = tokenizer.TOKEN_DIMS[L]
                with torch.device(device):
                    model = generators.make_generator(preset, L, D)
                steps = args.steps or (L if model.config.arch == "mar" else model.config.sampling_steps)
                for mode in ("eager", "compiled", "eager") if args.compile else ("eager",):
                    if mode == "compiled":                  # in place, after the eager figures
                        training.compile_generator(model)
                    eager = args.compile and mode == "eager"
                    with training.force_eager() if eager else contextlib.nullcontext():
                        train = (time_training(model, args.batch, args.train_steps, device, dtype)
                                 if args.train_steps else None)
                        sample = time_sampling(model, args.batch, steps, device, dtype)
                    peak = training.peak_flops(device, dtype)
                    if model.config.arch == "mar":  # encoder length and head calls vary per step
                        achieved, fraction = "-", "-"
                    else:  # every forward row: one network forward over L tokens, 2 FLOPs per MAC
                        flops = generator_macs(preset, L, D) * 2 * sample["rows"] * sample["img_per_s"]
                        achieved, fraction = f"{flops / 1e12:8.4f}", f"{flops / peak:7.1%}"
                    warmup = sample["warmup_s"] + (train["warmup_s"] if train else 0.0)
                    if mode == "eager":
                        eager_warmup, compile_s = warmup, "-"
                    else:
                        compile_s = f"{warmup - eager_warmup:9.1f}"
                    peak_gb = max(sample["peak_bytes"], train["peak_bytes"] if train else 0) / 2 ** 30
                    train_s = f"{train['img_per_s']:11.4g}" if train else "-"
                    print(f"{preset:8} {L:>3} {args.batch:>5} {steps:>5} {mode:>8} {train_s:>11} "
                          f"{sample['img_per_s']:12.4g} {sample['rows']:7.0f} {achieved:>8} {peak / 1e12:7.3f} "
                          f"{fraction:>7} {peak_gb:7.2f} {compile_s:>9}", flush=True)
                del model


def main_judge_train(args):
    if args.val_path is None and args.data_path != data.BUILTIN:   # builtin: held-out images exist
        raise training.UserError("judge-train on an ImageFolder needs --val-path (held-out images for "
                                 "its accuracy; the training images would overstate it)")
    dataset = data.make_dataset(args.data_path, args.image_size, train=True, seed=0,
                                builtin_size=args.builtin_size)
    judge = train_judge(dataset, args.epochs, args.batch_size, args.lr, num_workers=args.num_workers)
    held = data.make_dataset(args.val_path or args.data_path, args.image_size, train=False,
                             seed=BUILTIN_VAL_SEED, builtin_size=args.val_images)
    loader = make_loader(held, subset_indices(len(held), args.val_images), 256, 1, args.num_workers)
    with torch.no_grad():
        correct = sum((judge(x).argmax(1) == y).sum().item() for x, y in loader)
    save_judge(args.out, judge, dataset.classes)
    report({"judge": args.out, "held_out_images": len(loader.dataset),
            "held_out_accuracy": 100.0 * correct / len(loader.dataset)}, args.json)


def main_judge(args):
    judge = load_judge(args.judge)
    sets = dict(s.split("=", 1) if "=" in s else (s, s) for s in args.sets)
    results = judge_metrics(judge, sets, args.ref, args.batch_size)
    width = max(len(k) for k in results)
    print(f"{'set':<{width}}  {'images':>6}  {JUDGE_FD_NAME:>24}  {'class accuracy (%)':>18}")
    for name, row in results.items():
        acc = f"{row['class_accuracy']:.1f}" if "class_accuracy" in row else "-"
        print(f"{name:<{width}}  {row['num_images']:>6}  {row['fd']:>24.3f}  {acc:>18}")
    if args.out:
        import json
        with training.atomic_write(args.out, "w") as f:
            json.dump({"ref": args.ref, "metric": JUDGE_FD_NAME, "sets": results}, f, indent=2)


COMMANDS = {"gen": main_gen, "fid": main_gen, "is": main_gen, "prec-recall": main_gen,
            "stats": main_stats, "recon": main_recon, "linear-probe": main_linear_probe,
            "flops": main_flops, "throughput": main_throughput, "judge-train": main_judge_train,
            "judge": main_judge}


def main(args):
    # Metrics in full fp32 (training.py: the precision policy): PyTorch lets cuDNN convolutions use
    # TF32 on Ampere and newer GPUs by default, which would shift the Inception (FID / IS) and VGG
    # (LPIPS) features.
    training.check_flags(args, FLAG_RANGES)
    training.set_precision_policy(train=False)
    COMMANDS[args.command](args)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def device(p):
        p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda")

    def common(p, out=True):
        device(p)
        p.add_argument("--inception", default=None,
                       help=f"{INCEPTION_FILE} (default: $TORCH_HOME/hub/checkpoints/)")
        p.add_argument("--batch-size", type=int, default=100, help="images per Inception batch")
        if out:
            p.add_argument("--out", default=None, help="also write the results to this JSON file")

    for name, text in (("gen", "IS, FID, precision and recall"), ("fid", "FID"),
                       ("prec-recall", "precision and recall (k = 3)")):
        p = sub.add_parser(name, help=f"{text} of samples against a reference")
        p.add_argument("samples", help="PNG folder or .npz (arr_0 uint8 N x H x W x 3)")
        p.add_argument("ref", help="PNG folder, .npz images, or .npz statistics (mu, sigma)")
        common(p)
    p = sub.add_parser("is", help="Inception score (splits of 5000, as the ADM evaluator)")
    p.add_argument("samples", help="PNG folder or .npz (arr_0 uint8 N x H x W x 3)")
    common(p)
    p = sub.add_parser("stats", help="write mu / sigma of an image set (an FID reference)")
    p.add_argument("source", help="PNG folder or .npz images")
    p.add_argument("out", help="output .npz")
    common(p, out=False)

    def tokenizer_args(p):
        device(p)
        p.add_argument("--ckpt", default=None, help="train_tok.py checkpoint (its EMA weights)")
        p.add_argument("--released", default=None, help="released folder: config.json + model.safetensors")
        p.add_argument("--batch-size", type=int, default=64, help="global batch (split over ranks)")
        p.add_argument("--num-workers", type=int, default=8)
        p.add_argument("--out", default=None, help="also write the results to this JSON file")

    p = sub.add_parser("recon", help="rFID, PSNR, SSIM, LPIPS, codebook usage of a tokenizer")
    tokenizer_args(p)
    p.add_argument("--data-path", default=None,
                   help=f"ImageFolder of evaluation images (ImageNet val), or '{data.BUILTIN}'")
    p.add_argument("--num-images", type=int, default=0, help="a fixed random subset (0: all)")
    p.add_argument("--inception", default=None, help=f"{INCEPTION_FILE} (rFID)")
    p.add_argument("--vgg", default=None, help=f"{VGG_FILE} (LPIPS)")
    p.add_argument("--grid", default=None, help="also save a PNG: images spread over the set and their reconstructions")
    p.add_argument("--grid-images", type=int, default=16, help="images in --grid")
    p.add_argument("--save-npz", default=None, metavar="PREFIX",
                   help="also write PREFIX-inputs.npz and PREFIX-recons.npz (uint8, labels in arr_1)")

    p = sub.add_parser("linear-probe", help="linear probing of tokenizer latents (Fig. 3a) or SiT features (3b)")
    tokenizer_args(p)
    p.add_argument("--sit", default=None,
                   help="probe this SiT's features instead (train_gen.py ckpt, or released folder with "
                        "--ckpt/--released for its tokenizer); a train_gen ckpt names its tokenizer")
    p.add_argument("--layer", type=int, default=SIT_PROBE_LAYER, help="SiT block whose output is probed (1-based)")
    p.add_argument("--t", type=float, default=0.0, help="interpolant time of the probed latents (0 = clean)")
    p.add_argument("--train-path", default=None, help=f"ImageFolder (ImageNet train) or '{data.BUILTIN}'")
    p.add_argument("--val-path", default=None, help=f"ImageFolder (ImageNet val) or '{data.BUILTIN}'")
    p.add_argument("--max-train-images", type=int, default=0, help="a fixed random subset (0: all)")
    p.add_argument("--max-val-images", type=int, default=0, help="a fixed random subset (0: all)")
    p.add_argument("--pool", choices=("mean", "flatten"), default="mean",
                   help="mean over the L tokens (D features) or all L x D values")
    p.add_argument("--epochs", type=int, default=PROBE_EPOCHS)
    p.add_argument("--probe-batch-size", type=int, default=PROBE_BATCH)
    p.add_argument("--lr", type=float, default=PROBE_LR)
    p.add_argument("--weight-decay", type=float, default=0.0)

    p = sub.add_parser("judge-train", help="train the offline classifier judge on a data set")
    p.add_argument("--data-path", required=True, help=f"ImageFolder (training split) or '{data.BUILTIN}'")
    p.add_argument("--val-path", default=None, help="held-out ImageFolder for its accuracy (needed "
                                                    "with an ImageFolder; builtin: its held-out images)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--builtin-size", type=int, default=10000, help="training images of the built-in set")
    p.add_argument("--val-images", type=int, default=2000, help="held-out images for the accuracy")
    p.add_argument("--epochs", type=int, default=JUDGE_EPOCHS)
    p.add_argument("--batch-size", type=int, default=JUDGE_BATCH)
    p.add_argument("--lr", type=float, default=JUDGE_LR)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", required=True, help="the judge file to write (e.g. runs/judge.pt)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")

    p = sub.add_parser("judge", help=f"{JUDGE_FD_NAME} and class accuracy of image sets")
    p.add_argument("--judge", required=True, help="file from `evaluate.py judge-train`")
    p.add_argument("--ref", required=True, help="reference images (.npz or PNG folder), e.g. held-out data")
    p.add_argument("sets", nargs="+", help="image sets, NAME=PATH or PATH (.npz with labels in arr_1 "
                                           "gives the class accuracy)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the results to this JSON file")

    p = sub.add_parser("flops", help="GFLOPs (multiply-accumulates) per forward")
    p.add_argument("--tokenizers", nargs="+", default=["S", "B", "BL", "L"])
    p.add_argument("--models", nargs="+", default=["DiT-XL", "SiT-XL", "MAR-H"])
    p.add_argument("--tokens", type=int, nargs="+", choices=(64, 32), default=[64, 32],
                   help="latent tokens L (D = 32 for 64, 64 for 32)")
    p.add_argument("--image-size", type=int, default=256)

    p = sub.add_parser("throughput", help="training / sampling images/s and fraction of peak")
    device(p)
    p.add_argument("--models", nargs="+", default=["SiT-XL", "DiT-XL"])
    p.add_argument("--tokens", type=int, nargs="+", choices=(64, 32), default=[64, 32],
                   help="latent tokens L (D = 32 for 64, 64 for 32)")
    p.add_argument("--batch", type=int, default=BENCH_BATCH)
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default: the model's, {SAMPLING_STEPS} for DiT / SiT)")
    p.add_argument("--train-steps", type=int, default=TIMED_TRAIN_STEPS,
                   help="timed training steps (0: no training measurement)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true",
                   help="also time each model torch.compiled (training.compile_generator): a second line, "
                        "with the compile time")
    training.run_main(lambda: main(parser.parse_args()))
