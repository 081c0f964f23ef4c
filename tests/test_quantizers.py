"""Tests of quantizers.py: shapes, losses, gradients and the invariants of SoftVQ (Eq. 4),
its product (Eq. 12) and residual (Eq. 13) variants, GMMVQ (Eq. 11) and the VQ / KL / AE baselines.

Run: python -m pytest -q tests/test_quantizers.py   (CPU, tiny sizes, a few seconds)
"""

import pytest
import torch
import torch.nn.functional as F

from quantizers import QUANTIZERS, GMMVQ, SoftVQ, VectorQuantizer, DiagonalGaussian

B, L, D, K = 3, 8, 6, 16   # batch, tokens, dim, codebook size


def _z(seed=0, b=B, l=L, d=D):
    return torch.randn(b, l, d, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def _spread_codebook(q, seed=1):
    """Replace the tiny uniform(-1/K, 1/K) init by unit-scale codewords so posteriors are sharp."""
    with torch.no_grad():
        q.embedding.copy_(torch.randn(q.embedding.shape, generator=torch.Generator().manual_seed(seed)))
    return q


ALL = [
    ("softvq", dict(codebook_size=K, num_codebooks=1)),
    ("softvq", dict(codebook_size=K, num_codebooks=2, split="tokens")),
    ("softvq", dict(codebook_size=K, num_codebooks=2, split="channels", posterior="sqeuclid")),
    ("softvq", dict(codebook_size=K, num_codebooks=2, residual_depth=2, posterior="euclid")),
    ("softvq", dict(codebook_size=K, num_codebooks=2, tau="learnable")),
    ("gmmvq", dict(codebook_size=K, num_codebooks=2)),
    ("gmmvq", dict(codebook_size=K, num_codebooks=3, split="channels", residual_depth=2)),
    ("vq", dict(codebook_size=K)),
    ("vq", dict(codebook_size=K, metric="euclid")),
    ("kl", dict()),
    ("ae", dict()),
]


@pytest.mark.parametrize("name,kwargs", ALL)
def test_shapes_losses_gradients(name, kwargs):
    torch.manual_seed(0)
    q = QUANTIZERS[name](D, L, **kwargs)
    z_hat = _z(d=q.input_factor * D)          # KL: mean and log-variance
    z_q, losses, info = q(z_hat)
    assert z_q.shape == (B, L, D)
    assert torch.isfinite(z_q).all()
    for k, v in {**losses, **info}.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    for v in info.values():
        assert not v.requires_grad
    if name in ("softvq", "gmmvq"):
        assert set(losses) == {"entropy"}
        assert {"usage", "perplexity", "max_prob", "cos"} <= set(info)
        assert 0 < info["usage"] <= 1 and 1 / K <= info["max_prob"] <= 1
        assert 1 <= info["perplexity"] <= K * (1 + 1e-5)
    expected_losses = {"vq": {"codebook", "commit"}, "kl": {"kl"}, "ae": set()}
    if name in expected_losses:
        assert set(losses) == expected_losses[name]
    loss = z_q.pow(2).sum() + sum(losses.values())
    loss.backward()
    assert z_hat.grad is not None and z_hat.grad.abs().sum() > 0
    for pname, p in q.named_parameters():  # codebook, learnable tau, GMM head, KL head
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_softvq_probabilities_sum_to_one():
    for posterior in ("cosine", "sqeuclid", "euclid"):
        q = SoftVQ(D, L, codebook_size=K, num_codebooks=2, posterior=posterior)
        z, probs, scores = q.assign(_z())
        assert probs.shape == scores.shape == (B, 2, L // 2, K)
        assert torch.allclose(probs.sum(-1), torch.ones(B, 2, L // 2), atol=1e-5)
        assert (probs >= 0).all()


@pytest.mark.parametrize("posterior", ["cosine", "sqeuclid"])
def test_small_tau_is_hard_vq(posterior):
    q = _spread_codebook(SoftVQ(D, L, codebook_size=K, num_codebooks=1, tau=1e-6,
                                posterior=posterior, entropy_weight=0.0))
    z_hat = _z().detach()
    z_q, _, info = q(z_hat)
    C = q.embedding[0]
    if posterior == "cosine":
        idx = (F.normalize(z_hat, dim=-1) @ F.normalize(C, dim=-1).t()).argmax(-1)
        hard = F.normalize(C, dim=-1)[idx]
    else:
        idx = torch.cdist(z_hat, C.expand(B, K, D)).argmin(-1)
        hard = C[idx]
    assert torch.allclose(z_q, hard, atol=1e-5)
    assert info["max_prob"] > 0.999
    # with a normal temperature the output is a genuine mixture, not the nearest codeword
    q_soft = _spread_codebook(SoftVQ(D, L, codebook_size=K, num_codebooks=1, tau=1.0,
                                     posterior=posterior))
    assert not torch.allclose(q_soft(z_hat)[0], hard, atol=1e-3)


def test_sqeuclid_with_double_tau_equals_cosine_on_unit_vectors():
    cos_q = _spread_codebook(SoftVQ(D, L, codebook_size=K, num_codebooks=2, tau=0.07))
    sq_q = SoftVQ(D, L, codebook_size=K, num_codebooks=2, tau=0.14, posterior="sqeuclid")
    with torch.no_grad():
        sq_q.embedding.copy_(F.normalize(cos_q.embedding, dim=-1))
    z_hat = F.normalize(_z().detach(), dim=-1)
    _, p_cos, _ = cos_q.assign(z_hat)
    _, p_sq, _ = sq_q.assign(z_hat)
    assert torch.allclose(p_cos, p_sq, atol=1e-5)
    # the literal Eq. 4 form (distance, not squared) is a different posterior
    eu_q = SoftVQ(D, L, codebook_size=K, num_codebooks=2, tau=0.14, posterior="euclid")
    eu_q.load_state_dict(sq_q.state_dict())
    assert not torch.allclose(p_cos, eu_q.assign(z_hat)[1], atol=1e-3)


@pytest.mark.parametrize("split", ["tokens", "channels"])
def test_product_split_uses_own_codebook(split):
    G = 2
    q = _spread_codebook(SoftVQ(D, L, codebook_size=K, num_codebooks=G, split=split,
                                posterior="sqeuclid", tau=1.0))
    width = D if split == "tokens" else D // G
    assert q.embedding.shape == (G, K, width)
    z_hat = _z().detach()
    before = q(z_hat)[0]
    with torch.no_grad():
        q.embedding[1] += 0.5            # perturb codebook 1 only
    after = q(z_hat)[0]
    changed = (after - before).abs() > 1e-6
    if split == "tokens":   # segment 1 = tokens L/2 .. L-1
        assert not changed[:, : L // 2].any() and changed[:, L // 2:].all()
    else:                   # group 1 = channels D/2 .. D-1 of every token
        assert not changed[..., : D // 2].any() and changed[..., D // 2:].all()


def test_residual_levels_add_up():
    q = _spread_codebook(SoftVQ(D, L, codebook_size=K, num_codebooks=2, residual_depth=3,
                                posterior="sqeuclid", tau=0.5))
    z_hat = _z().detach()
    z_q, _, _ = q(z_hat)
    # Eq. 13 by hand: z_l = z_{l-1} + SoftVQ(r_{l-1}), r_l = r_{l-1} - SoftVQ(r_{l-1})
    r, levels = z_hat, []
    for _ in range(3):
        z = q.assign(r)[0]
        levels.append(z)
        r = r - z
    assert torch.allclose(z_q, sum(levels), atol=1e-5)
    assert torch.allclose(z_hat - z_q, r, atol=1e-5)      # r_l = z_hat - z_l
    assert not torch.allclose(levels[1], torch.zeros_like(levels[1]))
    # a deeper stack explains more of z_hat here (the residual shrinks)
    one = SoftVQ(D, L, codebook_size=K, num_codebooks=2, posterior="sqeuclid", tau=0.5)
    one.load_state_dict(q.state_dict())
    assert (z_hat - z_q).norm() < (z_hat - one(z_hat)[0]).norm()


@pytest.mark.parametrize("metric", ["cosine", "euclid"])
def test_vq_straight_through_and_losses(metric):
    q = _spread_codebook(VectorQuantizer(D, L, codebook_size=K, metric=metric))
    z_hat = _z()
    z_q, losses, _ = q(z_hat)
    # cosine VQ (official l2_norm): search, output and losses on unit vectors
    z_e = F.normalize(z_hat, dim=-1) if metric == "cosine" else z_hat
    C = F.normalize(q.embedding, dim=-1) if metric == "cosine" else q.embedding
    idx = q.nearest(z_hat)
    assert torch.equal(idx, torch.cdist(z_e, C.expand(B, K, D)).argmin(-1))
    assert torch.allclose(z_q, C[idx], atol=1e-6)  # forward: the nearest codeword
    g = torch.randn(B, L, D)
    (grad,) = torch.autograd.grad(z_q, z_hat, g, retain_graph=True)
    (expected,) = torch.autograd.grad(z_e, z_hat, g, retain_graph=True)
    assert torch.allclose(grad, expected)  # d z_q / d z_e = identity (straight-through)
    mse = F.mse_loss(z_e, C[idx])
    assert torch.allclose(losses["codebook"], mse) and torch.allclose(losses["commit"], 0.25 * mse)


def test_vq_default_is_cosine_with_unit_codebook():
    """Official VQ (codebook_l2_norm): cosine metric, codebook L2-normalised at init. On inputs of
    very different norms the cosine and Euclidean searches pick different codewords."""
    q = VectorQuantizer(D, L, codebook_size=K)
    assert q.metric == "cosine"
    assert torch.allclose(q.embedding.norm(dim=-1), torch.ones(K), atol=1e-6)
    z_hat = _z().detach() * torch.linspace(0.01, 10.0, L).view(1, L, 1)
    z_q = q(z_hat)[0]
    assert torch.allclose(z_q.norm(dim=-1), torch.ones(B, L), atol=1e-5)
    eu = VectorQuantizer(D, L, codebook_size=K, metric="euclid")
    assert eu.embedding.abs().max() <= 1 / K                  # raw uniform(-1/K, 1/K) init
    _spread_codebook(q)                                       # codewords of different norms
    eu.load_state_dict(q.state_dict())
    assert not torch.equal(eu.nearest(z_hat), q.nearest(z_hat))


def test_kl_samples_in_train_and_uses_mean_in_eval():
    q = DiagonalGaussian(D, L, kl_weight=1.0)
    assert q.input_factor == 2 and not list(q.parameters())   # moments come from quant_conv
    moments = torch.randn(B, L, 2 * D, generator=torch.Generator().manual_seed(0))
    q.train()
    assert not torch.allclose(q(moments)[0], q(moments)[0])
    q.eval()
    a, losses, info = q(moments)
    assert torch.equal(a, q(moments)[0])
    mean, logvar = moments.chunk(2, dim=-1)
    assert torch.equal(a, mean)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2)).mean()
    assert torch.allclose(losses["kl"], kl, atol=1e-5) and losses["kl"] > 0
    with pytest.raises(ValueError, match="12"):               # (B, L, D) is not (B, L, 2D)
        q(moments[..., :D])


def test_gmmvq_temperatures_positive_and_data_dependent():
    q = GMMVQ(D, L, codebook_size=K, num_codebooks=2)
    assert torch.allclose(q.omega(_z()), torch.full((B, 2, L // 2, 1), 1 / 0.07), atol=1e-4)
    with torch.no_grad():
        q.omega_head.weight.normal_(std=5.0)  # any head output stays positive
    w = q.omega(_z())
    assert w.shape == (B, 2, L // 2, 1) and (w > 0).all() and w.std() > 0
    _, _, info = q(_z())
    assert 0 < info["omega_min"] < info["omega_max"]
    qc = GMMVQ(D, L, codebook_size=K, num_codebooks=3, split="channels")
    assert qc.omega(_z()).shape == (B, 3, L, 1)


def test_learnable_tau():
    q = SoftVQ(D, L, codebook_size=K, num_codebooks=2, tau="learnable")
    assert abs(q.tau.item() - 0.07) < 1e-6
    z_q, losses, info = q(_z())
    (z_q.pow(2).sum() + losses["entropy"]).backward()
    assert q.log_tau.grad is not None and q.log_tau.grad != 0
    assert abs(info["tau"].item() - 0.07) < 1e-6
    assert SoftVQ(D, L, codebook_size=K, tau=0.1).tau == 0.1


def test_entropy_loss_rewards_confident_and_diverse_assignments():
    q = _spread_codebook(SoftVQ(D, L, codebook_size=K, num_codebooks=1, posterior="sqeuclid"))
    C = q.embedding[0].detach()
    diverse = C[torch.arange(B * L) % K].reshape(B, L, D)   # each token on its own codeword
    collapsed = C[0].expand(B, L, D)                          # every token on the same codeword
    loss_div = q(diverse)[1]["entropy"]
    loss_col = q(collapsed)[1]["entropy"]
    assert loss_div < loss_col
    assert torch.allclose(loss_col, torch.tensor(0.0), atol=1e-4)   # H(q) = H(E q) = 0
    assert loss_div < -0.01 * 2.0                                    # about -0.01 * log(16)
    assert "entropy" not in SoftVQ(D, L, codebook_size=K, entropy_weight=0.0)(diverse)[1]


def test_default_matches_official_layout():
    q = SoftVQ(32, 64)
    assert q.embedding.shape == (4, 8192, 32) and q.tau == 0.07 and q.posterior == "cosine"
    assert [n for n, _ in q.named_parameters()] == ["embedding"]


def test_codebook_init_is_normalised_for_every_posterior():
    """Official softvq.py: uniform(-1/K, 1/K), then L2-normalised at init (l2_norm). The
    Euclidean forms and GMMVQ start from unit-norm codewords too: at the raw norm ~1/K every
    codeword is equally far from z_hat, and the posterior is uniform whatever z_hat is."""
    torch.manual_seed(0)
    q = SoftVQ(32, 64)
    assert torch.allclose(q.embedding.norm(dim=-1), torch.ones(4, 8192), atol=1e-5)
    assert q.embedding.std() > 0.1                           # directions still random, not equal
    z_hat = F.normalize(_z().detach(), dim=-1)
    for q in (SoftVQ(D, L, codebook_size=K, posterior="sqeuclid"),
              SoftVQ(D, L, codebook_size=K, posterior="euclid"), GMMVQ(D, L, codebook_size=K)):
        assert torch.allclose(q.embedding.norm(dim=-1), torch.ones_like(q.embedding[..., 0]), atol=1e-5)
        # the posterior depends on z_hat at init: its max probability is well above uniform
        _, probs, _ = q.assign(z_hat)
        assert probs.amax(-1).mean() > 5 / K, type(q).__name__


def test_entropy_term_matches_hand_computation_with_official_offset():
    """H(q) - H(E_batch q) on scores / 0.01 with log(p + 1e-6) in the batch entropy (official
    compute_entropy_loss), in float64: a 1e-10 clamp instead would differ by ~1e-5 here."""
    q = _spread_codebook(SoftVQ(D, L, codebook_size=K, num_codebooks=2, entropy_weight=1.0))
    z_hat = _z().detach().double()
    _, _, scores = q.residual_assign(z_hat)
    logits = scores[0].reshape(-1, K) / 0.01
    p = logits.softmax(-1)
    per_token = -(p * logits.log_softmax(-1)).sum(-1).mean()
    avg = p.mean(0)
    hand = per_token - (-(avg * torch.log(avg + 1e-6)).sum())
    loss = q(z_hat)[1]["entropy"]
    assert loss.dtype == torch.float64
    assert abs(loss.item() - hand.item()) < 1e-12
    clamped = per_token - (-(avg * avg.clamp_min(1e-10).log()).sum())
    assert abs(clamped.item() - hand.item()) > 1e-6          # the offset is visible at this tolerance


def test_bfloat16_autocast_computes_in_float32():
    q = SoftVQ(D, L, codebook_size=K, num_codebooks=2)
    z_hat = _z().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, _, _ = q(z_hat.bfloat16())
    assert z_q.dtype == torch.float32
    assert torch.allclose(z_q, q(z_hat.bfloat16().float())[0], atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: SoftVQ(D, L, num_codebooks=3),                          # 8 tokens not divisible by 3
    lambda: SoftVQ(D, L, num_codebooks=4, split="channels"),        # 6 channels not divisible by 4
    lambda: SoftVQ(D, L, split="rows"),
    lambda: SoftVQ(D, L, posterior="dot"),
    lambda: SoftVQ(D, L, tau=0.0),
    lambda: SoftVQ(D, L, tau="learned"),
    lambda: SoftVQ(D, L, residual_depth=0),
    lambda: SoftVQ(D, L, entropy_temp=0),
    lambda: GMMVQ(D, L, num_codebooks=5),
    lambda: VectorQuantizer(D, L, beta=-1.0),
    lambda: VectorQuantizer(D, L, metric="dot"),
    lambda: DiagonalGaussian(D, L, kl_weight=-1.0),
])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_error_messages_name_allowed_values():
    with pytest.raises(ValueError, match="divisors of 8"):
        SoftVQ(D, L, num_codebooks=3)
    with pytest.raises(ValueError, match="cosine"):
        SoftVQ(D, L, posterior="dot")
    with pytest.raises(ValueError, match="learnable"):
        SoftVQ(D, L, tau=-1)


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_wrong_input_shape_raises(name):
    q = QUANTIZERS[name](D, L, **({"codebook_size": K} if name in ("softvq", "gmmvq", "vq") else {}))
    W = q.input_factor * D
    for bad in (torch.randn(B, L + 1, W), torch.randn(B, L, W + 1), torch.randn(L, W)):
        with pytest.raises(ValueError, match="num_tokens"):
            q(bad)
