"""Latent bottlenecks of SoftVQ-VAE, all behind one interface.

    z_q, losses, info = quantizer(z_hat)

z_hat, z_q: (B, L, D) latent tokens (L = num_tokens, D = dim); the KL baseline alone takes
z_hat = (B, L, 2D), the mean and log-variance (each class says it: `input_factor` = 2, else 1; the
tokenizer's quant_conv outputs input_factor * D channels). `losses` is a dict of scalar terms
that are already weighted (sum them into the training loss; it may be empty). `info` is a dict of
detached scalar diagnostics for logging (codebook usage, perplexity, mean max-probability,
cos(z_hat, z_q), temperatures).

Quantizers (paper: "SoftVQ-VAE: Efficient 1-Dimensional Continuous Tokenizer", arXiv 2412.10958):
  "softvq"  SoftVQ, Eq. 4: q = Softmax(-||z_hat - C|| / tau), z = q C, plus the entropy ("kl") term
            (that literal posterior is posterior="euclid"; the default, as the official code, is
            "cosine": Softmax(cos(z_hat, C) / tau)).
            With product quantization (PQ, Eq. 12), residual quantization (RQ, Eq. 13) and both
            (R-PQ), the variants of Table 5.
  "gmmvq"   GMMVQ, Eq. 11: the same with a data-dependent inverse temperature omega(z_hat).
  "vq"      plain VQ-VAE baseline (Table 3): nearest code, straight-through, codebook + commit loss;
            cosine VQ (z_hat and codebook L2-normalised) as the official code, or metric="euclid".
  "kl"      diagonal-Gaussian KL-VAE baseline (Table 3) on (mean, log-variance) inputs.
  "ae"      identity: a plain auto-encoder (Table 3).

Build one with QUANTIZERS[name](dim, num_tokens, **kwargs); the tokenizer (tokenizer.py) does this
from its config. The file imports only torch; there is nothing to run here (tests:
`python -m pytest -q tests/test_quantizers.py`).

Numerics: the soft assignments are computed in float32 (float64 stays float64) with autocast
turned off, because logits are cosines divided by tau = 0.07 and, in the entropy term, by 0.01 —
bfloat16 would round them to a handful of distinct values. z_q comes back in that dtype. Devices
without autocast (the meta device used for parameter and FLOP counts) run the same code as is.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- defaults (paper and official config) ----
TAU = 0.07                 # Eq. 4 / Table 5: softmax temperature of SoftVQ
CODEBOOK_SIZE = 8192       # Table 5: K = 8192 is best
NUM_CODEBOOKS = 4          # Table 5: "+PQ (G=4)" is the default row (rFID 1.03); official code too
ENTROPY_WEIGHT = 0.01      # lambda_4 of the training objective (Sec. 3.3), official entropy_loss_ratio
ENTROPY_TEMP = 0.01        # official code: the entropy term uses its own temperature on raw logits
VQ_BETA = 0.25             # VQ-VAE commitment weight
KL_WEIGHT = 1e-6           # official kl_loss_weight for the KL-VAE baseline

SPLITS = ("tokens", "channels")
POSTERIORS = ("cosine", "sqeuclid", "euclid")
VQ_METRICS = ("cosine", "euclid")

EPS = 1e-10                # keeps logs and square roots finite
ENTROPY_EPS = 1e-6         # official compute_entropy_loss: log(p + 1e-6) in the batch entropy
OMEGA_MIN = 1e-2           # GMMVQ: floor of the inverse temperature, so omega(z_hat) > 0 always
LOGVAR_RANGE = (-30.0, 20.0)  # KL: clamp of log-variance (as in the LDM KL-VAE), keeps exp() finite


def _check_positive_ints(owner, **values):
    """Raise a clear ValueError unless every value is an int >= 1 (bool is not accepted)."""
    for arg, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {arg} must be a positive integer, got {value!r}")


def _check_number(owner, arg, value, positive=False):
    """Raise a clear ValueError unless value is a number >= 0 (> 0 when positive=True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"{owner}: {arg} must be a number {'>' if positive else '>='} 0, "
                         f"got {value!r}")


def _check_input(z_hat, num_tokens, width, name):
    """Raise a clear ValueError unless z_hat has shape (B, num_tokens, width)."""
    if z_hat.dim() != 3 or z_hat.shape[1] != num_tokens or z_hat.shape[2] != width:
        raise ValueError(f"{name} expects z_hat of shape (B, num_tokens={num_tokens}, {width}), "
                         f"got {tuple(z_hat.shape)}")


def _compute_dtype(z_hat):
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (see the header)."""
    return torch.promote_types(z_hat.dtype, torch.float32)


def _autocast_off(device):
    """Context that turns autocast off on `device` (see the header); a no-op on devices that have
    no autocast, such as meta, where torch.autocast(device_type="meta") would raise."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _mean_cos(a, b):
    """Mean cosine similarity between corresponding tokens of a and b (B, L, D)."""
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8).mean()


def _entropy(p):
    """Shannon entropy (nats) over the last axis; 0 * log 0 counts as 0."""
    return -(p * p.clamp_min(EPS).log()).sum(-1)


# =============================================================================================
# SoftVQ and GMMVQ: soft assignment to a learnable codebook (shared machinery)
# =============================================================================================
class _SoftCodebook(nn.Module):
    """Product/residual soft quantization; subclasses only say how sharp the posterior is
    (inverse_temperature) and what to log about it (_temperature_info).

    Groups (product quantization, Eq. 12): the latent is cut into G = num_codebooks groups, each
    with its own codebook of K codewords.
      split="tokens"   (official code): the L tokens are cut into G contiguous segments of L/G
                       tokens; codeword width d = D; `embedding` is (G, K, D) as the official
                       `quantize.embedding` (4, 8192, D).
      split="channels" (paper Eq. 12): the D channels of every token are cut into G groups of
                       d = D/G channels; `embedding` is (G, K, D/G).
    Internally every level works on a grouped view (B, G, N, d): N = L/G tokens per segment for the
    token split, N = L tokens for the channel split. Posteriors have shape (B, G, N, K).

    Residual levels (RQ, Eq. 13) reuse the same codebooks: Eq. 13 applies one operator SoftVQ(.)
    at every level, as in RQ-VAE [55] which shares its codebook across depths. So `embedding`
    has the same shape for any residual_depth and the parameter count does not grow with depth.
    """

    input_factor = 1

    def __init__(self, dim, num_tokens, codebook_size, num_codebooks, split, residual_depth,
                 posterior, entropy_weight, entropy_temp):
        super().__init__()
        name = type(self).__name__
        _check_positive_ints(name, dim=dim, num_tokens=num_tokens, codebook_size=codebook_size,
                             num_codebooks=num_codebooks, residual_depth=residual_depth)
        if split not in SPLITS:
            raise ValueError(f"{name}: split must be one of {SPLITS}, got {split!r}")
        if split == "tokens" and num_tokens % num_codebooks:
            raise ValueError(f"{name}: split='tokens' needs num_tokens ({num_tokens}) divisible by "
                             f"num_codebooks ({num_codebooks}); allowed num_codebooks are the "
                             f"divisors of {num_tokens}, or use split='channels'")
        if split == "channels" and dim % num_codebooks:
            raise ValueError(f"{name}: split='channels' needs dim ({dim}) divisible by "
                             f"num_codebooks ({num_codebooks}); allowed num_codebooks are the "
                             f"divisors of {dim}, or use split='tokens'")
        if posterior not in POSTERIORS:
            raise ValueError(f"{name}: posterior must be one of {POSTERIORS}, got {posterior!r}")
        _check_number(name, "entropy_weight", entropy_weight)
        _check_number(name, "entropy_temp", entropy_temp, positive=True)

        self.dim, self.num_tokens = dim, num_tokens
        self.codebook_size, self.num_codebooks = codebook_size, num_codebooks
        self.split, self.residual_depth, self.posterior = split, residual_depth, posterior
        self.entropy_weight, self.entropy_temp = float(entropy_weight), float(entropy_temp)
        width = dim if split == "tokens" else dim // num_codebooks
        # Official init: uniform(-1/K, 1/K), then L2-normalised (official l2_norm, our cosine
        # posterior). Left at norm ~1/K, the gradient through F.normalize would be ~K times
        # larger and AdamW would rotate the codewords far faster than the rest of the model
        # learns. The Euclidean forms (sqeuclid, euclid and GMMVQ; not in the official code) start
        # from the same unit-norm codewords: at norm ~1/K every codeword is equally far from
        # z_hat, the posterior is uniform and z = q C ~ 0, so the decoder sees nothing and the
        # tokenizer stays at the mean image (GMMVQ, CIFAR-10 16 x 16, 600 steps: 13.9 dB with
        # the raw uniform init, 22.1 dB with unit-norm codewords; README "The CIFAR-10 study").
        C = torch.empty(num_codebooks, codebook_size, width).uniform_(-1.0 / codebook_size,
                                                                       1.0 / codebook_size)
        self.embedding = nn.Parameter(F.normalize(C, dim=-1))

    # ---- grouping (PQ, Eq. 12) ----
    def _split(self, x):
        """(B, L, W) -> (B, G, N, W') grouped view (W' = W for tokens, W/G for channels)."""
        B, L, W = x.shape
        G = self.num_codebooks
        if self.split == "tokens":
            return x.reshape(B, G, L // G, W)            # segment g = tokens [g*L/G, (g+1)*L/G)
        return x.reshape(B, L, G, W // G).transpose(1, 2)  # group g = channels [g*D/G, (g+1)*D/G)

    def _merge(self, x):
        """Inverse of _split: (B, G, N, W') -> (B, L, W)."""
        B, G, N, W = x.shape
        if self.split == "tokens":
            return x.reshape(B, G * N, W)
        return x.transpose(1, 2).reshape(B, N, G * W)

    def codewords(self, dtype=None):
        """The codewords that z is built from, (G, K, d): L2-normalised for the cosine posterior."""
        C = self.embedding if dtype is None else self.embedding.to(dtype)
        return F.normalize(C, dim=-1) if self.posterior == "cosine" else C

    def inverse_temperature(self, r):
        """Multiplier of the scores, broadcastable to (B, G, N, K): 1/tau or omega(r)."""
        raise NotImplementedError

    def _temperature_info(self, z_hat):
        """Detached scalar diagnostics of the temperature for `info`."""
        raise NotImplementedError

    # ---- one level of soft quantization ----
    def assign(self, r):
        """Softly quantize r (B, L, D) with the codebooks (Eq. 4 / Eq. 11, grouped as Eq. 12).

        Returns (z, probs, scores):
          z      (B, L, D)     q C, the soft-quantized latent;
          probs  (B, G, N, K)  the posterior q, sums to 1 over K;
          scores (B, G, N, K)  temperature-free similarities: cos(r, c) for "cosine", -||r - c||^2
                               for "sqeuclid", -||r - c|| for "euclid"; logits = scores * 1/tau.
        Computed in float32 (float64 stays float64) with autocast off.
        """
        dtype = _compute_dtype(r)
        with _autocast_off(r.device):
            r = r.to(dtype)
            parts = self._split(r)                                   # (B, G, N, d)
            C = self.codewords(dtype)                                # (G, K, d)
            if self.posterior == "cosine":
                # Official form: r and C L2-normalised, score = cosine similarity. The codebook
                # is detached inside the logits; it still learns through z = q C below.
                scores = torch.einsum("bgnd,gkd->bgnk", F.normalize(parts, dim=-1), C.detach())
            else:
                # ||r - c||^2 = |r|^2 - 2 r.c + |c|^2, without materialising (B, G, N, K, d).
                d2 = (parts.pow(2).sum(-1, keepdim=True)
                      - 2.0 * torch.einsum("bgnd,gkd->bgnk", parts, C)
                      + C.pow(2).sum(-1)[None, :, None, :]).clamp_min(0.0)
                # "sqeuclid": the usual reading of Eq. 4; "euclid": Eq. 4 literally (the norm).
                scores = -d2 if self.posterior == "sqeuclid" else -d2.clamp_min(EPS).sqrt()
            logits = scores * self.inverse_temperature(r)            # Eq. 4: -||.|| / tau
            probs = logits.softmax(dim=-1)
            z = self._merge(torch.einsum("bgnk,gkd->bgnd", probs, C))  # Eq. 4: z = q C
        return z, probs, scores

    def residual_assign(self, z_hat):
        """All residual levels (RQ, Eq. 13): z_0 = 0, r_0 = z_hat, z_l = z_{l-1} + SoftVQ(r_{l-1}).

        The residual is what is still unexplained: r_l = r_{l-1} - SoftVQ(r_{l-1}) (= z_hat - z_l;
        Eq. 13 prints r_l = r_{l-1} - z_l, which differs from level 2 on; see README).
        residual_depth = 1 is plain SoftVQ (with PQ when num_codebooks > 1).
        Returns (z_q (B, L, D), [probs of each level], [scores of each level]) (see assign).
        """
        z_q, r = 0.0, z_hat
        all_probs, all_scores = [], []
        for _ in range(self.residual_depth):
            z, probs, scores = self.assign(r)
            z_q, r = z_q + z, r - z
            all_probs.append(probs)
            all_scores.append(scores)
        return z_q, all_probs, all_scores

    def _entropy_loss(self, scores):
        """Eq. 4 "kl" term H(q) - H(E_batch q) (derivation Eq. 10), weighted by lambda_4.

        As in the official code it is computed on the raw scores with its own temperature
        (entropy_temp = 0.01, not tau), over the local batch, with the rows of all codebooks
        (and residual levels) flattened together: (rows, K); H(q) from log_softmax, H(E_batch q)
        with log(p + 1e-6).
        Minimising it makes each token's assignment confident (low H(q)) while spreading the
        batch over many codewords (high H(E q)), i.e. KL to the uniform prior over K codes.
        """
        logits = torch.cat([s.reshape(-1, self.codebook_size) for s in scores]) / self.entropy_temp
        probs = logits.softmax(dim=-1)
        per_token = -(probs * logits.log_softmax(dim=-1)).sum(-1).mean()  # H(q)
        avg = probs.mean(dim=0)
        batch = -(avg * (avg + ENTROPY_EPS).log()).sum()                    # H(E_batch q)
        return self.entropy_weight * (per_token - batch)

    def _rows_per_codebook(self, probs):
        """Posteriors of all levels as (G, rows, K): the rows that each codebook scored."""
        G, K = self.num_codebooks, self.codebook_size
        return torch.cat([q.transpose(0, 1).reshape(G, -1, K) for q in probs], dim=1)

    @torch.no_grad()
    def codebook_hits(self, probs):
        """Bool (G, K): which codewords are the argmax of at least one row of the posteriors
        `probs` (the list that residual_assign returns). evaluate.py ORs these over a data set."""
        p = self._rows_per_codebook(probs)
        return torch.zeros(p.shape[0], p.shape[2], dtype=torch.bool, device=p.device).scatter_(
            1, p.argmax(dim=-1), True)

    @torch.no_grad()
    def _codebook_info(self, probs):
        """usage, perplexity and max_prob from the posteriors of all levels."""
        p = self._rows_per_codebook(probs)
        return {
            # fraction of the G*K codewords that are the argmax of at least one token in the batch
            "usage": self.codebook_hits(probs).float().mean(),
            # exp(entropy) of the batch-averaged posterior, per codebook, mean over codebooks
            "perplexity": _entropy(p.mean(dim=1)).exp().mean(),
            # mean over tokens of max_k q_k: 1 = hard VQ, 1/K = uniform
            "max_prob": p.amax(dim=-1).mean(),
        }

    def forward(self, z_hat):
        _check_input(z_hat, self.num_tokens, self.dim, type(self).__name__)
        z_q, all_probs, all_scores = self.residual_assign(z_hat)
        losses = {}
        if self.entropy_weight > 0:
            losses["entropy"] = self._entropy_loss(all_scores)
        info = self._codebook_info(all_probs)
        info["cos"] = _mean_cos(z_hat.detach(), z_q.detach())
        info.update(self._temperature_info(z_hat))
        return z_q, losses, info


class SoftVQ(_SoftCodebook):
    """SoftVQ (Eq. 4) with product (Eq. 12) and residual (Eq. 13) variants (Table 5).

    dim, num_tokens     D and L of the latent tokens (B, L, D).
    codebook_size       K codewords per codebook (Table 5: 8192).
    num_codebooks       G groups of product quantization (Table 5: G = 4 default, 1 = no PQ).
    split               "tokens" (official, G segments of L/G tokens) or "channels" (Eq. 12).
    residual_depth      levels of residual quantization (1 = no RQ; >1 with G > 1 is R-PQ).
    tau                 softmax temperature (Table 5: 0.07), or "learnable" (log tau is learned,
                        starting at 0.07).
    posterior           "cosine" (official, default), "sqeuclid" or "euclid" (see assign()).
    entropy_weight      weight of the Eq. 4 "kl" term (lambda_4 = 0.01); 0 turns it off.
    entropy_temp        temperature of that term on the raw scores (official 0.01).
    """

    def __init__(self, dim, num_tokens, codebook_size=CODEBOOK_SIZE, num_codebooks=NUM_CODEBOOKS,
                 split="tokens", residual_depth=1, tau=TAU, posterior="cosine",
                 entropy_weight=ENTROPY_WEIGHT, entropy_temp=ENTROPY_TEMP):
        super().__init__(dim, num_tokens, codebook_size, num_codebooks, split, residual_depth,
                         posterior, entropy_weight, entropy_temp)
        if tau == "learnable":
            # Table 5 "learnable": learn log tau so that tau stays positive.
            self.log_tau = nn.Parameter(torch.tensor(math.log(TAU)))
        elif isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0:
            self.log_tau = None
            self.fixed_tau = float(tau)
        else:
            raise ValueError(f"SoftVQ: tau must be a number > 0 or 'learnable', got {tau!r}")

    @property
    def tau(self):
        """Current temperature: a float, or a 0-dim tensor (with gradient) when learnable."""
        return self.fixed_tau if self.log_tau is None else self.log_tau.exp()

    def inverse_temperature(self, r):
        return 1.0 / self.fixed_tau if self.log_tau is None else (-self.log_tau).exp().to(r.dtype)

    def _temperature_info(self, z_hat):
        # a detached device tensor either way: no .item(), so no device sync per step
        if self.log_tau is None:
            return {"tau": torch.full((), self.fixed_tau, device=z_hat.device)}
        return {"tau": self.log_tau.detach().exp()}


class GMMVQ(_SoftCodebook):
    """GMMVQ (Eq. 11, App. B.2): q = Softmax(-omega(z_hat) ||z_hat - C||_2), z = q C.

    omega(r) > 0 is a per-token inverse temperature predicted from the token itself by a small head
    owned by the quantizer: omega = softplus(Linear(r)) + OMEGA_MIN. With split="tokens" one omega
    per token; with split="channels" one per token and channel group (Linear(D -> G)). The same
    head serves every residual level. The head starts at omega = 1/0.07 for every token (zero
    weights, matching bias), i.e. GMMVQ starts out as SoftVQ with the literal Eq. 4 posterior
    ("euclid") and tau = 0.07. Arguments as SoftVQ, without tau and posterior.
    """

    def __init__(self, dim, num_tokens, codebook_size=CODEBOOK_SIZE, num_codebooks=NUM_CODEBOOKS,
                 split="tokens", residual_depth=1, entropy_weight=ENTROPY_WEIGHT,
                 entropy_temp=ENTROPY_TEMP):
        super().__init__(dim, num_tokens, codebook_size, num_codebooks, split, residual_depth,
                         "euclid", entropy_weight, entropy_temp)
        self.omega_head = nn.Linear(dim, 1 if split == "tokens" else num_codebooks)
        nn.init.zeros_(self.omega_head.weight)
        start = 1.0 / TAU - OMEGA_MIN
        nn.init.constant_(self.omega_head.bias, start + math.log(-math.expm1(-start)))  # softplus^-1

    def omega(self, r):
        """Inverse temperatures, (B, G, N, 1): one per row of the posterior."""
        with _autocast_off(r.device):
            r = r.to(_compute_dtype(r))
            w = F.softplus(F.linear(r, self.omega_head.weight.to(r.dtype),
                                    self.omega_head.bias.to(r.dtype))) + OMEGA_MIN
        return self._split(w)

    def inverse_temperature(self, r):
        return self.omega(r)

    @torch.no_grad()
    def _temperature_info(self, z_hat):
        w = self.omega(z_hat)  # first level (r_0 = z_hat)
        return {"omega_mean": w.mean(), "omega_min": w.min(), "omega_max": w.max()}


# =============================================================================================
# Baselines of Table 3
# =============================================================================================
class VectorQuantizer(nn.Module):
    """Plain VQ-VAE: nearest codeword, straight-through gradient, codebook + beta * commit loss.

    metric="cosine" (default, the official VQ: codebook_l2_norm): z_hat and the codewords are
    L2-normalised before the nearest-codeword search, both losses and the straight-through
    estimator, so z_q is a unit codeword (the codebook is also normalised at init).
    metric="euclid": the textbook VQ-VAE on the raw vectors.
    """

    input_factor = 1

    def __init__(self, dim, num_tokens, codebook_size=CODEBOOK_SIZE, beta=VQ_BETA, metric="cosine"):
        super().__init__()
        _check_positive_ints("VectorQuantizer", dim=dim, num_tokens=num_tokens,
                             codebook_size=codebook_size)
        _check_number("VectorQuantizer", "beta", beta)
        if metric not in VQ_METRICS:
            raise ValueError(f"VectorQuantizer: metric must be one of {VQ_METRICS}, got {metric!r}")
        self.dim, self.num_tokens, self.codebook_size, self.beta = dim, num_tokens, codebook_size, beta
        self.metric = metric
        C = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.embedding = nn.Parameter(F.normalize(C, dim=-1) if metric == "cosine" else C)

    def _project(self, x):
        """What the search and losses see: unit vectors for the cosine metric, else x."""
        return F.normalize(x, dim=-1) if self.metric == "cosine" else x

    def nearest(self, z_hat):
        """Index (B, L) of the nearest codeword of every token (squared Euclidean distance between
        the projected vectors; for unit vectors the largest cosine)."""
        dtype = _compute_dtype(z_hat)
        with _autocast_off(z_hat.device):
            z, C = self._project(z_hat.to(dtype)), self._project(self.embedding.to(dtype))
            d2 = z.pow(2).sum(-1, keepdim=True) - 2.0 * z @ C.t() + C.pow(2).sum(-1)
        return d2.argmin(dim=-1)

    def forward(self, z_hat):
        _check_input(z_hat, self.num_tokens, self.dim, "VectorQuantizer")
        dtype = _compute_dtype(z_hat)
        with _autocast_off(z_hat.device):
            z_e = self._project(z_hat.to(dtype))
            idx = self.nearest(z_hat)
            z = self._project(self.embedding.to(dtype))[idx]
        losses = {
            "codebook": F.mse_loss(z, z_e.detach()),            # moves codewords to the encoder
            "commit": self.beta * F.mse_loss(z_e, z.detach()),  # keeps the encoder near its code
        }
        z_q = z_e + (z - z_e).detach()  # straight-through: forward z, backward identity (to z_e)
        with torch.no_grad():
            idx = idx.flatten()   # codeword counts (scatter_add, unlike bincount, also runs on meta)
            counts = torch.zeros(self.codebook_size, device=idx.device).scatter_add_(
                0, idx, torch.ones_like(idx, dtype=torch.float32))
            info = {
                "usage": (counts > 0).float().mean(),
                "perplexity": _entropy(counts / counts.sum()).exp(),
                "cos": _mean_cos(z_e, z),
            }
        return z_q, losses, info


class DiagonalGaussian(nn.Module):
    """KL-VAE baseline: z_hat (B, L, 2D) holds the mean and log-variance of each token (the
    official KL model's quant_conv maps the encoder width straight to 2D; no layer in between).

    Training mode samples z = mean + std * eps; eval mode returns the mean. The KL to N(0, I) is
    summed over the L x D latent of an image and averaged over the batch (LDM KL-VAE convention,
    which kl_weight = 1e-6 is tuned for).
    """

    input_factor = 2

    def __init__(self, dim, num_tokens, kl_weight=KL_WEIGHT):
        super().__init__()
        _check_positive_ints("DiagonalGaussian", dim=dim, num_tokens=num_tokens)
        _check_number("DiagonalGaussian", "kl_weight", kl_weight)
        self.dim, self.num_tokens, self.kl_weight = dim, num_tokens, kl_weight

    def forward(self, z_hat):
        _check_input(z_hat, self.num_tokens, 2 * self.dim, "DiagonalGaussian")
        with _autocast_off(z_hat.device):
            mean, logvar = z_hat.to(_compute_dtype(z_hat)).chunk(2, dim=-1)
            logvar = logvar.clamp(*LOGVAR_RANGE)
            std = (0.5 * logvar).exp()
            z_q = mean + std * torch.randn_like(mean) if self.training else mean
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2)).mean()
        info = {"kl": kl.detach(), "std": std.detach().mean()}
        return z_q, {"kl": self.kl_weight * kl}, info


class Identity(nn.Module):
    """Plain auto-encoder: no bottleneck beyond the small latent, no losses."""

    input_factor = 1

    def __init__(self, dim, num_tokens):
        super().__init__()
        _check_positive_ints("Identity", dim=dim, num_tokens=num_tokens)
        self.dim, self.num_tokens = dim, num_tokens

    def forward(self, z_hat):
        _check_input(z_hat, self.num_tokens, self.dim, "Identity")
        return z_hat, {}, {}


QUANTIZERS = {"softvq": SoftVQ, "gmmvq": GMMVQ, "vq": VectorQuantizer, "kl": DiagonalGaussian,
              "ae": Identity}
