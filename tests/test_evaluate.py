"""Tests of evaluate.py: metric math against independent references, image-set I/O, the offline
Inception / LPIPS loaders, LAMB and linear probing (separable classes must be found, also over 2
processes), recon of the EMA weights, and the other subcommands on tiny models. CPU only, no
downloads (the Inception network gets random weights saved to a temp file)."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from PIL import Image

import evaluate as E
import training


# ---- FID ----
def _reference_fid(mu1, s1, mu2, s2):
    """Independent FID: tr sqrt(S1 S2) from the symmetric eigenvalues of sqrt(S1) S2 sqrt(S1)."""
    r1 = scipy.linalg.sqrtm(s1).real
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.clip(0)).sum())


def test_feature_stats_match_numpy_and_fid_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 32))
    b = rng.normal(size=(300, 32)) * 1.2 + 0.3
    sa, sb = E.FeatureStats(), E.FeatureStats()
    for chunk in np.array_split(a, 7):  # running accumulation over uneven batches
        sa.update(torch.from_numpy(chunk).float())
    sb.update(torch.from_numpy(b).float())
    mu1, s1 = sa.mean_cov()
    mu2, s2 = sb.mean_cov()
    af = a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu1, af.mean(0), atol=1e-12)
    np.testing.assert_allclose(s1, np.cov(af, rowvar=False), atol=1e-10)

    fid = E.frechet_distance(mu1, s1, mu2, s2)
    ours_vs_tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2},
                                          verbose=False)["frechet_inception_distance"]
    assert fid > 1.0
    assert abs(fid - ours_vs_tf) < 1e-6
    assert abs(fid - _reference_fid(mu1, s1, mu2, s2)) < 1e-6
    # identical sets: 0; only a mean shift d: |d|^2
    assert abs(E.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    shift = np.linspace(-1, 1, 32)
    assert abs(E.frechet_distance(mu1, s1, mu1 + shift, s1) - (shift ** 2).sum()) < 1e-8
    with pytest.raises(ValueError, match="shape"):
        E.frechet_distance(mu1, s1, mu1[:5], s1[:5, :5])


# ---- IS ----
def test_inception_score_one_hot_and_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    C = 7
    labels = torch.arange(C * 30) % C  # every split of 3 C samples holds every class equally often
    logits = torch.nn.functional.one_hot(labels, C).double() * 60.0  # softmax ~ one-hot
    mean, std = E.inception_score(logits, split_size=3 * C)
    assert abs(mean - C) < 1e-9 and std < 1e-9
    # constant predictions: p(y|x) = p(y), KL = 0, IS = 1
    assert abs(E.inception_score(torch.zeros(50, C))[0] - 1.0) < 1e-12
    # 230 samples in splits of 23 = torch-fidelity's 10 equal splits
    random_logits = torch.randn(230, 20, generator=torch.Generator().manual_seed(0)) * 3
    ref = isc_features_to_metric(random_logits, splits=10, shuffle=False)
    assert abs(E.inception_score(random_logits, split_size=23)[0] - ref["inception_score_mean"]) < 1e-9
    with pytest.raises(ValueError, match="split_size"):
        E.inception_score(random_logits, split_size=0)


def test_inception_score_splits_of_5000_as_the_adm_evaluator():
    """ADM's compute_inception_score: consecutive chunks of 5000, so N = 10,000 gives 2 splits
    (not 10) and N = 12,000 a third, shorter one."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12000, 6, generator=g) * torch.linspace(0.5, 4.0, 12000)[:, None]

    def split_score(part):
        p = part.double().softmax(1)
        return float((p * (p.log() - p.mean(0).log())).sum(1).mean().exp())

    for n, bounds in ((10000, (0, 5000, 10000)), (12000, (0, 5000, 10000, 12000))):
        scores = [split_score(logits[a:b]) for a, b in zip(bounds, bounds[1:])]
        mean, std = E.inception_score(logits[:n])
        assert abs(mean - np.mean(scores)) < 1e-9 and abs(std - np.std(scores)) < 1e-9
    assert E.IS_SPLIT_SIZE == 5000


# ---- precision / recall ----
def test_precision_recall_blocks_and_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=g)
    assert E.precision_recall(real, real.clone(), batch_size=64) == (1.0, 1.0)
    assert E.precision_recall(real, real + 100.0, batch_size=64) == (0.0, 0.0)
    fake = torch.randn(250, 16, generator=g) + 0.7  # partly overlapping
    p, r = E.precision_recall(real, fake, batch_size=64)
    assert (p, r) == E.precision_recall(real, fake, batch_size=10000)  # blocking changes nothing
    # torch-fidelity's convention: features_1 generated, features_2 real -> (precision, recall)
    p_tf, r_tf = calculate_precision_recall_full(fake.double(), real.double(), neighborhood=3)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95
    assert abs(p - p_tf) <= 1 / 250 and abs(r - r_tf) <= 1 / 300  # at most one borderline point


def test_precision_recall_when_the_last_block_holds_at_most_k_rows():
    """N mod block size in {1, 2, 3} (N = 10,001 at the ADM block size of 10,000; here blocks of
    64): the last block has <= k rows; radii and P/R equal the one-block computation."""
    g = torch.Generator().manual_seed(0)
    for n in (65, 66, 67):
        real, fake = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g) + 0.5
        radii = E.manifold_radii(real, batch_size=64)
        full = E._sq_dists(real, real).sort(dim=1).values[:, E.PR_K]   # k-th neighbour, self excluded
        assert torch.allclose(radii, full)
        assert E.precision_recall(real, fake, batch_size=64) == E.precision_recall(real, fake, batch_size=256)
    with pytest.raises(ValueError, match="more than k = 3"):
        E.manifold_radii(torch.randn(3, 8))


# ---- PSNR / SSIM ----
def _reference_ssim(a, b):
    """skimage-style SSIM written independently: scipy.ndimage Gaussian (truncate 3.5 -> 11 taps),
    population statistics, the border (where the window does not fit) cropped, channels averaged."""
    scores = []
    for c in range(3):
        x, y = a[c].astype(np.float64), b[c].astype(np.float64)
        f = lambda t: scipy.ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        scores.append(s[5:-5, 5:-5].mean())
    return float(np.mean(scores))


def test_psnr_ssim_against_hand_computed_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(20, 230, (2, 3, 24, 20), generator=g, dtype=torch.uint8)
    # a constant offset of 5 grey levels: MSE = 25, PSNR = 10 log10(255^2 / 25)
    np.testing.assert_allclose(E.psnr(a, a + 5).numpy(), 10 * np.log10(255 ** 2 / 25), atol=1e-12)
    assert torch.isinf(E.psnr(a, a)).all()
    np.testing.assert_allclose(E.ssim(a, a).numpy(), 1.0, atol=1e-12)
    noisy = (a.float() + torch.randn(a.shape, generator=g) * 20).round().clamp(0, 255).to(torch.uint8)
    ours = E.ssim(a, noisy)
    for i in range(2):
        assert abs(ours[i].item() - _reference_ssim(a[i].numpy(), noisy[i].numpy())) < 1e-10
    assert 0.1 < ours.mean() < 0.95
    with pytest.raises(ValueError, match="at least 11"):
        E.ssim(a[..., :8, :8], a[..., :8, :8])
    # to_uint8 rounds [-1, 1] to the nearest grey level
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, -1)
    assert training.to_uint8(x).flatten().tolist() == [0, 0, 128, 191, 255, 255]


# ---- image sets ----
def test_npz_and_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 12, 10, 3), dtype=np.uint8)
    path = str(tmp_path / "samples.npz")
    E.save_images_npz(path, images)
    np.testing.assert_array_equal(E.load_images_npz(path), images)
    with np.load(path) as data:  # what the ADM evaluator reads
        np.testing.assert_array_equal(data["arr_0"], images)
    assert E.count_images(path) == 7
    np.testing.assert_array_equal(np.concatenate(list(E.iter_images(path, 3))), images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    assert E.count_images(str(folder)) == 7
    np.testing.assert_array_equal(np.concatenate(list(E.iter_images(str(folder), 4))), images)
    # statistics files
    stats = str(tmp_path / "stats.npz")
    E.save_stats(stats, np.arange(3.0), np.eye(3))
    mu, sigma = E.load_stats(stats)
    np.testing.assert_array_equal(mu, np.arange(3.0))
    assert E.load_stats(path) is None  # images only
    with pytest.raises(ValueError, match="arr_0"):
        E.count_images(stats)
    with pytest.raises(ValueError, match="uint8"):
        E.save_images_npz(path, images.astype(np.float32))
    with pytest.raises(FileNotFoundError):
        E.count_images(str(tmp_path / "missing.npz"))


# ---- Inception (random weights saved to a temp file: never a download) ----
@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    folder = tmp_path_factory.mktemp("inception")
    empty = str(folder / "empty.pth")
    torch.save({}, empty)
    mp = pytest.MonkeyPatch()
    mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    try:  # build once with the weight loading bypassed, keep its random weights
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=empty)
    finally:
        mp.undo()
    path = str(folder / E.INCEPTION_FILE)
    torch.save(model.state_dict(), path)
    return path


def test_inception_features_and_missing_file(inception_path, tmp_path):
    model = E.load_inception(inception_path)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    feats, logits = E.inception_features(model, images, batch_size=2)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(feats).all() and feats.std() > 0
    with pytest.raises(FileNotFoundError, match=E.INCEPTION_FILE) as err:
        E.load_inception(str(tmp_path / "nowhere.pth"))
    assert "torch-fidelity/releases" in str(err.value)


class FakeInception(torch.nn.Module):
    """Stands in for the Inception network where only the plumbing is tested (the real one needs
    ~10 GFLOPs per image): uint8 (B, 3, H, W) -> (12 pooled colour features, 10 logits)."""

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)
        return f, f[:, :10] * 5


def test_generation_metrics_end_to_end(tmp_path, monkeypatch, capsys):
    """gen / fid / stats on small sets: FID of a set with itself is ~0, against its statistics file
    the same as against its images; precision and recall of a set with itself are 1."""
    rng = np.random.default_rng(1)
    samples, other = str(tmp_path / "samples.npz"), str(tmp_path / "other.npz")
    E.save_images_npz(samples, rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    E.save_images_npz(other, rng.integers(0, 200, (30, 16, 16, 3), dtype=np.uint8))
    fake = FakeInception()
    same = E.generation_metrics(samples, samples, E.GEN_METRICS, fake, batch_size=16)
    assert abs(same["fid"]) < 1e-8 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["inception_score"] > 1.0 and same["num_samples"] == 40
    # the stats subcommand writes the reference statistics; FID against them = against the images
    monkeypatch.setattr(E, "load_inception", lambda path, device: fake)
    stats = str(tmp_path / "stats.npz")
    E.main(SimpleNamespace(device="cpu", command="stats", source=other, out=stats, inception=None, batch_size=16))
    vs_images = E.generation_metrics(samples, other, ("fid",), fake, batch_size=16)["fid"]
    out = str(tmp_path / "fid.json")
    E.main(SimpleNamespace(device="cpu", command="fid", samples=samples, ref=stats, inception=None, batch_size=16,
                           out=out))
    assert vs_images > 1e-3 and f"fid: {vs_images:.6g}" in capsys.readouterr().out
    with open(out) as f:
        assert abs(json.load(f)["fid"] - vs_images) < 1e-9 * vs_images
    with pytest.raises(ValueError, match="arr_0"):  # precision/recall need reference images
        E.generation_metrics(samples, stats, ("prec-recall",), fake, batch_size=16)


# ---- LPIPS (VGG weights from a local file only) ----
def test_lpips_offline_loader(tmp_path):
    import torchvision
    with pytest.raises(FileNotFoundError, match="needs " + E.VGG_FILE):
        E.load_lpips(str(tmp_path / E.VGG_FILE))
    # a stand-in for torchvision's VGG16 file: random convolutions under its `features.*` names
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    path = str(tmp_path / E.VGG_FILE)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    model = E.load_lpips(path)
    torch.testing.assert_close(model.net.state_dict()["slice5.28.weight"], features[28].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max() < 1e-6 and (model(x, -x) > 0).all()


# ---- codebook usage ----
def test_codebook_hits_follow_the_nearest_codewords():
    import quantizers
    q = quantizers.SoftVQ(dim=8, num_tokens=4, codebook_size=16, num_codebooks=2).eval()
    C = torch.nn.functional.normalize(q.embedding.detach(), dim=-1)  # (2, 16, 8)
    # tokens 0-1 use codebook 0, tokens 2-3 codebook 1 (split over tokens)
    z_hat = torch.stack([C[0, 3], C[0, 3], C[1, 5], C[1, 9]])[None] * 2.0
    hits = E.codebook_hits(q, z_hat)
    assert hits.shape == (2, 16) and hits.sum() == 3
    assert hits[0, 3] and hits[1, 5] and hits[1, 9]
    vq = quantizers.VectorQuantizer(dim=8, num_tokens=4, codebook_size=16)
    assert E.codebook_hits(vq, vq.embedding.detach()[[1, 1, 2, 7]][None]).nonzero()[:, 1].tolist() == [1, 2, 7]
    assert E.codebook_hits(quantizers.Identity(8, 4), z_hat) is None


# ---- LAMB and linear probing ----
def test_lamb_reduces_a_toy_loss():
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(20, 5, generator=g), torch.randn(20, generator=g)
    w = torch.nn.Parameter(torch.randn(5, generator=g))
    opt = E.LAMB([w], lr=0.05)
    loss0 = ((A @ w - b) ** 2).mean().item()
    for _ in range(300):
        loss = ((A @ w - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    best = torch.linalg.lstsq(A, b[:, None]).solution.squeeze(1)
    optimum = ((A @ best - b) ** 2).mean().item()
    assert loss.item() - optimum < 0.02 * (loss0 - optimum)  # closes 98% of the gap


def test_linear_probe_on_separable_latents():
    g = torch.Generator().manual_seed(0)
    C, D = 5, 8
    centres = torch.randn(C, D, generator=g) * 3
    def make(n):
        y = torch.randint(0, C, (n,), generator=g)
        return centres[y] + torch.randn(n, D, generator=g) + 10.0, y  # offset: BN must remove it
    (tx, ty), (vx, vy) = make(2000), make(500)
    assert E.train_linear_probe(tx, ty, vx, vy, C, epochs=20, batch_size=256, lr=0.01) > 95.0


# ---- subcommands on a tiny tokenizer / tiny generators ----
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A train_tok.py-style checkpoint of the tiny SoftVQ tokenizer (the official random init, not
    the tiny preset's routing init: every latent then carries the image's mean colour, which the
    colour-class probes below read; LayerScale 1, else the latents would hardly depend on the image)."""
    import dataclasses
    import tokenizer
    torch.manual_seed(0)
    model = tokenizer.make_tokenizer("tiny", tokens=16, token_dim=8, routing_init=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    path = str(tmp_path_factory.mktemp("tok") / "tok.pt")
    training.save_checkpoint(path, {"config": dataclasses.asdict(model.config),
                                    "model": model.state_dict(), "ema": model.state_dict(), "step": 0})
    return path


def test_recon_reports_what_needs_no_weights(tiny_ckpt, tmp_path, monkeypatch, capsys):
    args = SimpleNamespace(device="cpu", command="recon", ckpt=tiny_ckpt, released=None, data_path="builtin",
                           num_images=10, batch_size=4, num_workers=0,
                           inception=str(tmp_path / E.INCEPTION_FILE), vgg=str(tmp_path / E.VGG_FILE),
                           out=str(tmp_path / "recon.json"), grid=str(tmp_path / "grid.png"), grid_images=4,
                           save_npz=str(tmp_path / "held"))
    E.main(args)
    printed = capsys.readouterr().out
    assert f"rFID: needs {E.INCEPTION_FILE}" in printed and f"LPIPS: needs {E.VGG_FILE}" in printed
    from PIL import Image
    assert Image.open(args.grid).size == (4 * 34 + 2, 2 * 34 + 2)      # 4 inputs over 4 reconstructions
    with open(args.out) as f:
        results = json.load(f)
    assert results["num_images"] == 10 and "rfid" not in results
    assert 0 < results["psnr"] < 60 and -1 <= results["ssim"] <= 1
    assert 0 < results["codebook_usage"] <= 1
    inputs, recons = E.load_images_npz(args.save_npz + "-inputs.npz"), E.load_images_npz(args.save_npz + "-recons.npz")
    assert inputs.shape == recons.shape == (10, 32, 32, 3) and not np.array_equal(inputs, recons)
    psnr = E.psnr(torch.from_numpy(inputs).permute(0, 3, 1, 2), torch.from_numpy(recons).permute(0, 3, 1, 2))
    assert abs(psnr.mean().item() - results["psnr"]) < 1e-4               # the same images as the metric
    assert len(E.load_labels_npz(args.save_npz + "-inputs.npz")) == 10
    # with a feature network present the rFID is computed too (stand-in network: fast)
    monkeypatch.setattr(E, "load_inception", lambda path, device: FakeInception())
    E.main(args)
    with open(args.out) as f:
        with_fid = json.load(f)
    assert np.isfinite(with_fid["rfid"]) and with_fid["psnr"] == results["psnr"]


def test_recon_uses_the_ema_weights(tiny_ckpt, tmp_path):
    """evaluate.py measures a train_tok.py checkpoint's EMA weights (what the paper evaluates): with
    EMA != live weights, recon reports the numbers of an EMA-only checkpoint, not of a live-only
    one; linear-probe loads the tokenizer the same way. (No --raw flag is offered.)"""
    ckpt = training.load_checkpoint(tiny_ckpt)
    g = torch.Generator().manual_seed(1)
    live = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in ckpt["model"].items()}

    def recon(name, weights, averaged):
        path = str(tmp_path / f"{name}.pt")
        training.save_checkpoint(path, dict(ckpt, model=weights, ema=averaged))
        args = SimpleNamespace(device="cpu", command="recon", ckpt=path, released=None, data_path="builtin",
                               num_images=4, batch_size=4, num_workers=0, inception=str(tmp_path / "none"),
                               vgg=str(tmp_path / "none"), out=str(tmp_path / f"{name}.json"), grid=None,
                               save_npz=None)
        E.main(args)
        with open(args.out) as f:
            return json.load(f)

    both = recon("both", live, ckpt["ema"])
    assert both == recon("ema-only", ckpt["ema"], ckpt["ema"])
    assert both["psnr"] != recon("live-only", live, live)["psnr"]
    probe_model = E.load_tokenizer_from_args(SimpleNamespace(ckpt=str(tmp_path / "both.pt"), released=None))
    assert all(torch.equal(probe_model.state_dict()[k], v) for k, v in ckpt["ema"].items())


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """ImageFolder train/ and val/ trees of 3 classes that even a random tokenizer separates:
    noisy red, green and blue images (16 per class to train on, 8 to validate)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 8)):
        for c, rgb in enumerate(((220, 40, 40), (40, 200, 60), (50, 60, 220))):
            os.makedirs(root / split / f"class{c}")
            for i in range(count):
                pixels = np.array(rgb)[None, None] + rng.normal(0, 25, (32, 32, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / f"class{c}" / f"{i}.png")
    return str(root / "train"), str(root / "val")


# probe settings that reach 100% on the colour classes with a correct pipeline (chance: 33%)
PROBE = dict(pool="mean", epochs=50, probe_batch_size=16, lr=0.01, weight_decay=0.0, batch_size=20, num_workers=0,
             device="cpu")


def test_linear_probe_subcommand(tiny_ckpt, colours, tmp_path):
    """Separable classes must be found: a high accuracy needs each latent paired with its label."""
    args = SimpleNamespace(command="linear-probe", ckpt=tiny_ckpt, released=None, sit=None, train_path=colours[0],
                           val_path=colours[1], max_train_images=0, max_val_images=0,
                           out=str(tmp_path / "probe.json"), **PROBE)
    E.main(args)
    with open(args.out) as f:
        results = json.load(f)
    assert results["train_images"] == 48 and results["val_images"] == 24
    assert results["feature_dim"] == 8 and results["top1"] > 90


def test_sit_features_are_block_outputs_of_the_forward():
    """Fig. 3b features = the mean over tokens of block `layer`'s output in a normal forward pass
    with the null class (a hook on the real forward must see the same tensor)."""
    import generators
    torch.manual_seed(0)
    sit = generators.make_generator("SiT-tiny", 16, 8, num_classes=10).eval()
    for block in sit.blocks:                      # adaLN-Zero init makes blocks identities: perturb
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    z, seen = torch.randn(3, 16, 8), []
    hook = sit.blocks[1].register_forward_hook(lambda m, i, out: seen.append(out.mean(1)))
    with torch.no_grad():
        sit(z, torch.zeros(3), torch.full((3,), 10))           # t = 0, null class
    hook.remove()
    assert torch.allclose(E.sit_features(sit, z, layer=2), seen[0], atol=1e-6)
    assert not torch.allclose(E.sit_features(sit, z, layer=1), seen[0], atol=1e-3)
    noisy = E.sit_features(sit, z, layer=2, t=0.5, generator=torch.Generator().manual_seed(0))
    assert noisy.shape == (3, sit.config.width) and not torch.allclose(noisy, seen[0], atol=1e-3)
    with pytest.raises(ValueError, match="--layer"):
        E.sit_features(sit, z, layer=sit.config.depth + 1)


def test_linear_probe_of_sit_features(tiny_ckpt, colours, tmp_path):
    import dataclasses
    import generators
    sit = generators.make_generator("SiT-tiny", 16, 8, num_classes=10)
    path = str(tmp_path / "sit.pt")
    training.save_checkpoint(path, {"config": dataclasses.asdict(sit.config), "model": sit.state_dict(),
                                    "ema": sit.state_dict(), "tokenizer": tiny_ckpt,
                                    "latent_mean": 0.1, "latent_std": 2.0})
    args = SimpleNamespace(command="linear-probe", ckpt=None, released=None, sit=path, layer=1, t=0.0,
                           train_path=colours[0], val_path=colours[1], max_train_images=0, max_val_images=0,
                           out=str(tmp_path / "probe.json"), **PROBE)
    E.main(args)
    with open(args.out) as f:
        results = json.load(f)
    assert results["train_images"] == 48 and results["feature_dim"] == sit.config.width
    assert results["top1"] > 90


def test_flops_meta_count_equals_a_real_forward():
    """The meta-device counts equal FlopCounterMode on real CPU models (attention included)."""
    import generators
    import tokenizer
    enc, dec = E.tokenizer_macs("tiny", 64, 32)
    model = tokenizer.make_tokenizer("tiny", tokens=64).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    assert enc == E.count_macs(model.encode, x) and dec == E.count_macs(model.decode, z)
    sit = generators.make_generator("SiT-tiny", 64, 32).eval()
    real = E.count_macs(sit, torch.zeros(1, 64, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert E.generator_macs("SiT-tiny", 64, 32) == real
    # attention is counted: QK^T and AV, 2 * L^2 * width per block
    c = sit.config
    linear = generators.count_macs(sit)[1]
    assert real - linear == c.depth * 2 * 64 * 64 * c.width


def test_throughput_counts_cfg_forwards(capsys, compile_backend):
    """Forward rows per image from the guidance interval; with --compile (conftest.py: the
    backends) three lines per model, eager, compiled (with its compile time) and eager again, with
    the same rows."""
    E.main(SimpleNamespace(device="cpu", command="throughput", models=["SiT-tiny", "DiT-tiny"], tokens=[64],
                           batch=2, steps=2, train_steps=1, dtype="fp32", compile=True))
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(row[0], row[4]) for row in lines] == [(m, mode) for m in ("SiT-tiny", "DiT-tiny")
                                                   for mode in ("eager", "compiled", "eager")]
    # SiT SDE, 2 steps at t = 1 and 0.04: CFG (doubled batch) only inside [0, 0.7] -> 1 + 2 rows
    # DiT DDPM, 2 steps at k = 999 and 0, CFG everywhere -> 2 + 2 rows per image
    for row in lines:
        assert row[7] == {"SiT-tiny": "3", "DiT-tiny": "4"}[row[0]], row
        assert float(row[5]) > 0 and float(row[6]) > 0 and float(row[9]) > 0 and row[10].endswith("%")
        assert row[12] == "-" if row[4] == "eager" else np.isfinite(float(row[12])), row


def test_recon_two_process_torchrun_equals_one_process(tiny_ckpt, tmp_path):
    """DDP (2 gloo processes): each image evaluated once, sums and codebook hits gathered."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        out = str(tmp_path / f"recon{len(launcher)}.json")
        subprocess.run([sys.executable, *launcher, os.path.join(root, "evaluate.py"), "recon",
                        "--ckpt", tiny_ckpt, "--data-path", "builtin", "--num-images", "9",
                        "--batch-size", "4", "--num-workers", "0", "--out", out,
                        "--inception", str(tmp_path / "none"), "--vgg", str(tmp_path / "none")],
                       check=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, timeout=120)
        with open(out) as f:
            results.append(json.load(f))
    single, ddp = results
    assert ddp["num_images"] == single["num_images"] == 9
    for key in ("psnr", "ssim", "codebook_usage"):
        assert abs(ddp[key] - single[key]) < 1e-9 * max(1.0, abs(single[key])), key


def test_linear_probe_two_process_torchrun_gathers_every_image(tiny_ckpt, colours, tmp_path):
    """DDP (2 gloo processes): rank 0 gathers every rank's latents with their labels (odd counts:
    uneven shards); the separable classes are still found."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "probe.json")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(root, "evaluate.py"), "linear-probe", "--ckpt", tiny_ckpt,
                    "--train-path", colours[0], "--val-path", colours[1], "--max-train-images", "41",
                    "--max-val-images", "19", "--epochs", "50", "--lr", "0.01", "--probe-batch-size", "16",
                    "--batch-size", "8", "--num-workers", "0", "--out", out], check=True, cwd=root,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=120)
    with open(out) as f:
        results = json.load(f)
    assert results["train_images"] == 41 and results["val_images"] == 19
    assert results["feature_dim"] == 8 and results["top1"] > 90
