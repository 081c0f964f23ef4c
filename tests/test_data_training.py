"""Tests of data.py and training.py (CPU, tiny, seconds): built-in data, ImageFolder with a corrupt
file, resumable sampling, atomic checkpoints, config refusal, RNG round trip, EMA, NaN guard,
image grids, lr schedule, load_tokenizer."""

import dataclasses
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader

import data
import tokenizer
import training


# ---- data.py ----

def test_builtin_deterministic_and_class_conditional():
    a = data.SyntheticShapes(num_images=20, image_size=24, num_classes=5, seed=3)
    b = data.SyntheticShapes(num_images=20, image_size=24, num_classes=5, seed=3)
    c = data.SyntheticShapes(num_images=20, image_size=24, num_classes=5, seed=4)
    for i in range(20):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and ya == yb == i % 5
        assert xa.shape == (3, 24, 24) and xa.dtype == torch.float32
        assert -1.0 <= xa.min() and xa.max() <= 1.0
    assert not torch.equal(a[0][0], c[0][0])                      # the seed matters
    # keyed access (sampler path): same key -> same augmentation; the flip is the only augmentation
    keys = [(7, f"k{j}") for j in range(16)]
    outs = [a[k][0] for k in keys]
    assert all(torch.equal(o, a[k][0]) for o, k in zip(outs, keys))
    plain = torch.from_numpy(a.render(7)[0]).permute(2, 0, 1) * 2 - 1
    flipped = plain.flip(-1)
    assert all(torch.allclose(o, plain) or torch.allclose(o, flipped) for o in outs)
    assert any(torch.allclose(o, flipped) for o in outs) and any(torch.allclose(o, plain) for o in outs)


def _write_tree(root):
    """2 classes: 3 good images each (png/jpg/webp, odd sizes), 1 corrupt jpg, 1 ignored txt."""
    rng = np.random.default_rng(0)
    for cls, sizes in (("cat", [(40, 50), (64, 33), (37, 37)]), ("dog", [(80, 45), (33, 90), (48, 48)])):
        os.makedirs(root / cls / "sub")
        for j, (w, h) in enumerate(sizes):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(root / cls / ("sub" if j == 2 else "") / f"{j}.{['png', 'jpg', 'webp'][j]}")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_skips_and_counts_corrupt(tmp_path, capsys):
    _write_tree(tmp_path)
    ds = data.ImageFolder(str(tmp_path), image_size=32, train=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 7             # the .txt is ignored
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and y in (0, 1)
    assert ds.skipped >= 1
    assert "broken.jpg" in capsys.readouterr().out                   # the skip names the file
    # through loader workers: counted in the main process too
    ds2 = data.ImageFolder(str(tmp_path), image_size=32, train=False)
    loader = DataLoader(ds2, batch_size=7, num_workers=2)
    x, y = next(iter(loader))
    assert x.shape == (7, 3, 32, 32) and ds2.skipped >= 1


def test_crops():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 300, 3), dtype=np.uint8))
    assert data.center_crop_arr(img, 64).size == (64, 64)
    crops = {np.asarray(data.random_crop_arr(img, 64, random.Random(s))).tobytes() for s in range(5)}
    assert all(len(c) == 64 * 64 * 3 for c in crops) and len(crops) > 1  # random, right size


def test_missing_or_empty_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.make_dataset(str(tmp_path / "nowhere"), 32)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.make_dataset(str(tmp_path), 32)
    with pytest.raises(ValueError, match="data-path"):
        data.make_dataset(None, 32)


def test_resumable_sampler():
    ds = data.SyntheticShapes(num_images=50, image_size=8)
    full = list(data.ResumableSampler(ds, rank=0, world_size=2, seed=1).__iter__())
    other = data.ResumableSampler(ds, rank=1, world_size=2, seed=1)
    assert not {i for i, _ in full} & {i for i, _ in other}          # ranks get disjoint shards
    s = data.ResumableSampler(ds, rank=0, world_size=2, seed=1)
    s.set_position(0, 10)
    assert list(s) == full[10:] and len(s) == len(full) - 10          # resume = the same tail
    s.set_position(1, 0)
    assert [i for i, _ in s] != [i for i, _ in full]                  # new epoch, new order


# ---- training.py ----

def test_atomic_save_and_load(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    state = {"w": torch.arange(5.0), "step": 3, "cfg": {"a": (1, 2), "b": "x"}}
    training.save_checkpoint(path, state)
    loaded = training.load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3 and loaded["cfg"] == state["cfg"]

    def crash(obj, f):          # a save that dies half-way through writing
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        training.save_checkpoint(path, {"w": torch.zeros(5)})
    assert torch.equal(training.load_checkpoint(path)["w"], state["w"])  # old checkpoint intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]                             # no temp file left
    with pytest.raises(FileNotFoundError):
        training.load_checkpoint(str(tmp_path / "none.pt"))


def test_config_mismatch_names_fields():
    cfg = {"lr": 1e-4, "tokens": 64, "preset": "L"}
    training.check_config(cfg, dict(cfg))
    with pytest.raises(ValueError) as err:
        training.check_config(cfg, {**cfg, "lr": 2e-4, "tokens": 32, "extra": 1}, "my ckpt")
    msg = str(err.value)
    assert "my ckpt" in msg and "lr" in msg and "tokens" in msg and "extra" in msg and "preset" not in msg


def test_rng_round_trip():
    state = training.rng_state()
    random.gauss(0, 1)                     # leaves a cached gaussian in python's state
    state = training.rng_state()
    a = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    training.set_rng_state(state)
    b = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_ema_math():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)        # frozen: stored, never averaged
    model.register_buffer("stat", torch.zeros(()))
    ema = training.EMA(model)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(5.0)
        model.stat.fill_(7.0)
    ema.update(model, decay=0.9)
    assert torch.allclose(ema.state_dict()["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.allclose(ema.state_dict()["bias"], model.bias - 5.0)  # frozen: unchanged
    assert ema.state_dict()["stat"] == 7.0                             # buffers copied
    fresh = nn.Linear(3, 2)
    fresh.register_buffer("stat", torch.zeros(()))
    fresh.load_state_dict(ema.state_dict())                            # model-compatible keys


def test_nan_guard():
    guard = training.NanGuard(max_in_a_row=3)
    assert guard.ok(torch.tensor(1.0), torch.tensor(2.0))
    assert not guard.ok(torch.tensor(float("nan")), torch.tensor(2.0))
    assert not guard.ok(torch.tensor(1.0), torch.tensor(float("inf")))
    assert guard.ok(torch.tensor(1.0))                                  # resets the streak
    assert guard.skipped == 2 and guard.in_a_row == 0
    guard.ok(torch.tensor(float("nan")))
    guard.ok(torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="3 steps in a row"):
        guard.ok(torch.tensor(float("inf")))


def test_image_grid(tmp_path):
    x = torch.rand(5, 3, 8, 10) * 2 - 1
    training.save_image_grid(x, str(tmp_path / "g.png"), nrow=3, padding=2)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (2 * 10 + 2, 3 * 12 + 2, 3)
    expected = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
    assert np.abs(img[2:10, 2:12].astype(float) - expected).max() <= 1


def test_cosine_lr():
    lr = [training.cosine_lr(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)   # linear warm-up
    assert lr[60] == pytest.approx(0.55)                                  # half-way down the cosine
    assert lr[110] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_load_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = tokenizer.make_tokenizer("tiny", tokens=16, token_dim=8, enc_depth=1, dec_depth=1)
    ema = training.EMA(model)
    with torch.no_grad():
        model.latent_std.fill_(0.5)
        for p in model.parameters():
            p.add_(0.01)
    path = str(tmp_path / "tok.pt")
    training.save_checkpoint(path, {"config": dataclasses.asdict(model.config), "model": model.state_dict(),
                                    "ema": ema.state_dict(), "step": 1})
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    raw = training.load_tokenizer(path, ema=False)
    assert float(raw.latent_std) == 0.5 and not raw.training
    model.eval()
    assert torch.equal(raw.encode(x), model.encode(x))
    averaged = training.load_tokenizer(path)                          # EMA weights by default
    assert not torch.equal(averaged.encode(x), model.encode(x))
