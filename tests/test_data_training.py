"""Tests of data.py and training.py (CPU, tiny, seconds): built-in data, ImageFolder with a corrupt
file (named once, counted as a file), every PIL mode read as 8-bit RGB (16-bit scaled), resumable
sampling, atomic checkpoints (the previous one kept, verification, kill points inside a write),
wrong-kind checkpoints, run folders (--resume / --overwrite), log truncation, flag ranges, the
one-line user errors, config refusal, RNG round trip, EMA, NaN guard, image grids, lr schedule,
load_tokenizer, compile_module with inductor (eager random draws, exact resume)."""

import dataclasses
import json
import multiprocessing
import os
import random
import struct
import zlib
from types import SimpleNamespace

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


def test_builtin_render_cache_changes_nothing(monkeypatch):
    """The in-memory cache of rendered images gives the same items as rendering every time, a
    cached image is not altered by the flips handed out, and sets too large for it render each time."""
    cached = data.SyntheticShapes(num_images=20, image_size=16, seed=3)
    monkeypatch.setattr(data.SyntheticShapes, "CACHE_BYTES", 0)
    uncached = data.SyntheticShapes(num_images=20, image_size=16, seed=3)
    assert cached._cache is not None and uncached._cache is None
    keys = [(i % 5, f"k{j}") for j, i in enumerate(range(40))] + list(range(20)) * 2
    for key in keys:
        (xa, ya), (xb, yb) = cached[key], uncached[key]
        assert torch.equal(xa, xb) and ya == yb
        xa.fill_(0)                                                  # the caller owns its tensor
    assert len(cached._cache) == 20


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
    for epoch in range(3):                                            # the bad file is drawn every epoch
        for i in range(len(ds)):
            x, y = ds[(i, f"{epoch}-{i}")]
            assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and y in (0, 1)
    assert ds.skipped == 1                                            # one distinct file, not 3 skips
    assert capsys.readouterr().out.count("broken.jpg") == 1          # named once
    # through loader workers (2 epochs, new workers each): counted in the main process, once
    ds2 = data.ImageFolder(str(tmp_path), image_size=32, train=False)
    loader = DataLoader(ds2, batch_size=7, num_workers=2)
    for _ in range(2):
        x, y = next(iter(loader))
    assert x.shape == (7, 3, 32, 32) and ds2.skipped == 1


def _png16_rgb(path, rgb):
    """A 16-bit-per-channel RGB PNG of one colour (PIL cannot write these)."""
    arr = np.broadcast_to(np.array(rgb, dtype=">u2"), (40, 40, 3))
    raw = b"".join(b"\x00" + row.tobytes() for row in arr)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body)))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _write_mode(path, mode):
    """A flat 40x40 image file in PIL mode `mode`; returns the RGB it must read as (None: what
    PIL's own .convert("RGB") gives for that file)."""
    if mode == "P":
        img = Image.new("P", (40, 40), 3)
        img.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
        img.save(path + ".png")
        return path + ".png", (10, 200, 30)
    if mode == "I;16":                               # a 16-bit grey PNG: 0..65535 -> 0..255
        Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(path + ".png")
        return path + ".png", (128, 128, 128)
    if mode == "I;16B":
        Image.new("I;16B", (40, 40), 65535).save(path + ".tif")
        return path + ".tif", (255, 255, 255)
    if mode == "I":                                  # PIL opens 16-bit PGM files as mode I
        with open(path + ".pgm", "wb") as f:
            f.write(b"P5 40 40 65535\n" + np.full(1600, 1000, dtype=">u2").tobytes())
        return path + ".pgm", (4, 4, 4)
    if mode == "RGB;16":
        _png16_rgb(path + ".png", (0x8000, 0xFFFF, 0x00FF))
        return path + ".png", (128, 255, 0)
    colour, expected, ext = {"1": (1, (255, 255, 255), "png"), "L": (77, (77, 77, 77), "png"),
                             "LA": ((77, 0), (77, 77, 77), "png"),               # alpha dropped
                             "RGB": ((10, 20, 30), (10, 20, 30), "png"),
                             "RGBA": ((10, 20, 30, 0), (10, 20, 30), "png"),    # not composited
                             "CMYK": ((0, 255, 255, 0), None, "tif"), "YCbCr": ((76, 85, 255), None, "tif"),
                             "LAB": ((50, 20, 200), None, "tif"), "F": (100.0, (100, 100, 100), "tif")}[mode]
    Image.new(mode, (40, 40), colour).save(f"{path}.{ext}")
    return f"{path}.{ext}", expected


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "F",
                                  "I;16", "I;16B", "I", "RGB;16"])
def test_every_image_mode_reads_as_8_bit_rgb(tmp_path, mode):
    """ImageFolder reads every mode as torchvision / ADM (.convert("RGB")), 16-bit scaled to 8 bits
    (a 16-bit PNG read by .convert alone is nearly white: 32768 -> 255)."""
    (tmp_path / "c").mkdir()
    path, expected = _write_mode(str(tmp_path / "c" / "img"), mode)
    if expected is None:
        expected = Image.open(path).convert("RGB").getpixel((0, 0))
    x, _ = data.ImageFolder(str(tmp_path), image_size=32, train=False)[0]
    pixels = ((x + 1) * 127.5).round().flatten(1)                     # (3, 32 * 32), flat image
    assert (pixels == pixels[:, :1]).all()
    assert np.abs(pixels[:, 0].numpy() - np.array(expected)).max() <= 1, (pixels[:, 0], expected)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    (tmp_path / "c").mkdir()
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "c" / "ramp.png")
    x = data.open_rgb(str(tmp_path / "c" / "ramp.png"))
    assert x.mode == "RGB"
    grey = np.asarray(x)[..., 0].astype(float)
    assert np.abs(grey - ramp / 257).max() <= 0.5 and abs(grey.mean() - 127.5) < 1


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
    assert os.listdir(tmp_path) == ["ckpt.pt"]                             # no temp file left, no rotation
    with pytest.raises(FileNotFoundError):
        training.load_checkpoint(str(tmp_path / "none.pt"))


def test_config_mismatch_names_fields():
    cfg = {"lr": 1e-4, "tokens": 64, "preset": "L"}
    assert training.check_config(cfg, dict(cfg)) == {}
    with pytest.raises(training.UserError) as err:
        training.check_config(cfg, {**cfg, "lr": 2e-4, "tokens": 32, "extra": 1}, "my ckpt")
    msg = str(err.value)
    assert "my ckpt" in msg and "lr" in msg and "tokens" in msg and "extra" in msg and "preset" not in msg
    assert "\n" not in msg                                           # one line
    # fields that may change on --resume are returned, the others still refused
    changes = training.check_config(cfg, {**cfg, "lr": 2e-4}, may_change={"lr"})
    assert changes == {"lr": (1e-4, 2e-4)} and training.describe_changes(changes) == "lr 0.0001 -> 0.0002"
    with pytest.raises(training.UserError, match="tokens") as err:
        training.check_config(cfg, {**cfg, "lr": 2e-4, "tokens": 32}, may_change={"lr"})
    assert "lr" not in str(err.value).split("fields:")[1]


# ---- checkpoints: the previous one kept, verification, kinds ----

def _flip_byte(path, where=0.5):
    raw = bytearray(open(path, "rb").read())
    raw[int(len(raw) * where)] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_checkpoint_keeps_previous_and_verifies(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    prev = str(tmp_path / "ckpt-prev.pt")
    for step in (1, 2, 3):
        training.save_checkpoint(path, {"w": torch.full((4096,), float(step)), "step": step})
    assert training.load_checkpoint(path)["step"] == 3 and training.load_checkpoint(prev)["step"] == 2
    assert training.checkpoint_problem(path) is None
    # a flipped byte in the tensor data: torch.load alone would return wrong weights silently
    _flip_byte(path)
    assert "corrupt" in training.checkpoint_problem(path)
    with pytest.raises(training.UserError) as err:
        training.load_checkpoint(path, flag="--ckpt")
    msg = str(err.value)
    assert path in msg and "corrupt" in msg and f"--ckpt {prev}" in msg      # names the file to use
    # a corrupt checkpoint is not kept as the fallback: the next save replaces it, prev stays
    training.save_checkpoint(path, {"w": torch.full((4096,), 4.0), "step": 4})
    assert training.load_checkpoint(path)["step"] == 4 and training.load_checkpoint(prev)["step"] == 2
    # a file cut short (a copy interrupted): named, with what is wrong
    with open(path, "rb") as f:
        head = f.read(1000)
    open(path, "wb").write(head)
    with pytest.raises(training.UserError, match="truncated") as err:
        training.load_checkpoint(path)
    assert path in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training.load_checkpoint(str(tmp_path / "none.pt"))


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    path, prev = str(tmp_path / "ckpt.pt"), str(tmp_path / "ckpt-prev.pt")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        training.resume_checkpoint(path, None)
    for step in (1, 2):
        training.save_checkpoint(path, {"kind": "tokenizer", "config": {}, "step": step, "w": torch.ones(4096)})
    assert training.resume_checkpoint(path, "tokenizer")[0]["step"] == 2
    _flip_byte(path, 0.3)
    ckpt, used = training.resume_checkpoint(path, "tokenizer")
    assert ckpt["step"] == 1 and used == prev
    out = capsys.readouterr().out
    assert path in out and "resuming from the previous checkpoint" in out and prev in out
    os.remove(path)                          # killed between the two renames of a save
    assert training.resume_checkpoint(path, "tokenizer")[1] == prev
    _flip_byte(prev)
    with pytest.raises(training.UserError, match="previous one"):
        training.resume_checkpoint(path, "tokenizer")


def test_wrong_kind_of_checkpoint_is_named(tmp_path):
    tok, gen, legacy = (str(tmp_path / f"{n}.pt") for n in ("tok", "gen", "legacy"))
    training.save_checkpoint(tok, {"kind": "tokenizer", "config": {"image_size": 32}})
    training.save_checkpoint(gen, {"kind": "generator", "config": {"arch": "sit"}})
    training.save_checkpoint(legacy, {"config": {"arch": "sit"}})          # written before "kind" existed
    with pytest.raises(training.UserError) as err:
        training.load_checkpoint(tok, "generator", "--ckpt")
    assert str(err.value) == (f"'{tok}': this is a tokenizer checkpoint; --ckpt needs a generator "
                              f"checkpoint (from train_gen.py)")
    with pytest.raises(training.UserError, match="this is a generator checkpoint; --tokenizer needs a "
                                                 r"tokenizer checkpoint \(from train_tok.py\)"):
        training.load_tokenizer(gen)
    with pytest.raises(training.UserError, match="this is a generator checkpoint"):
        training.load_tokenizer(legacy, flag="--ckpt")
    assert training.load_checkpoint(legacy, "generator")["config"] == {"arch": "sit"}


def _write_and_die(path, point):
    os.environ[training.KILL_ENV] = f"ckpt.pt:2:{point}"
    training.save_checkpoint(path, {"w": torch.ones(100000), "step": 1})       # 1st write: not hit
    training.save_checkpoint(path, {"w": torch.zeros(100000), "step": 2})      # 2nd: killed in it
    os._exit(0)                                                                # not reached


@pytest.mark.parametrize("point", training.KILL_POINTS)
def test_kill_inside_a_checkpoint_write(tmp_path, point):
    """SOFTVQ_KILL_IN_WRITE kills the process (SIGKILL) at the named point of its n-th write: what
    it leaves is what a kill -9 there would leave, and the step-1 checkpoint always survives."""
    path = str(tmp_path / "ckpt.pt")
    child = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(path, point))
    child.start()
    child.join(60)
    assert child.exitcode == -9
    temps = [f for f in os.listdir(tmp_path) if ".pt.tmp" in f]
    assert len(temps) == 1
    size = os.path.getsize(tmp_path / temps[0])
    full = os.path.getsize(path if point != "rotate" else tmp_path / "ckpt-prev.pt")
    assert {"start": size == 0, "middle": 0 < size < full, "end": size >= full * 0.99,
            "rotate": not os.path.exists(path)}[point]
    ckpt, _ = training.resume_checkpoint(path, None)
    assert ckpt["step"] == 1
    training.remove_stale_temps(str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# ---- run folders, logs, flags, one-line errors ----

def test_prepare_run_folder_refuses_overwrite_unless_asked(tmp_path):
    folder = str(tmp_path / "run")
    kwargs = dict(holds=("ckpt.pt", "ckpt-prev.pt"), outputs=("ckpt*.pt", "log.jsonl"), what="run", flag="--name")
    training.prepare_run_folder(folder, False, False, **kwargs)           # nothing there: fine
    os.makedirs(folder)
    for name in ("ckpt.pt", "log.jsonl", "notes.txt", "ckpt.pt.tmp1234"):
        open(os.path.join(folder, name), "w").close()
    with pytest.raises(training.UserError, match="already holds a run .ckpt.pt.: pass --resume"):
        training.prepare_run_folder(folder, False, False, **kwargs)
    with pytest.raises(training.UserError, match="pass one"):
        training.prepare_run_folder(folder, True, True, **kwargs)
    training.prepare_run_folder(folder, True, False, **kwargs)            # --resume keeps the files
    assert sorted(os.listdir(folder)) == ["ckpt.pt", "log.jsonl", "notes.txt"]   # stale temp removed
    training.prepare_run_folder(folder, False, True, **kwargs)            # --overwrite deletes its own
    assert os.listdir(folder) == ["notes.txt"]


def test_open_log_drops_lines_past_the_checkpoint(tmp_path):
    path = str(tmp_path / "log.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)))
        f.write('{"step": 6, "lo')                                      # cut short by a kill
    with training.open_log(path, 3) as f:
        f.write(json.dumps({"step": 4}) + "\n")
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4]
    training.open_log(path, 0).close()                                   # a fresh run
    assert open(path).read() == ""


def test_check_flags():
    ranges = {"iters": "> 0", "warmup": ">= 0", "ema": "in [0, 1)", "t": "in [0, 1]", "betas": "in [0, 1)"}
    training.check_flags(SimpleNamespace(iters=1, warmup=0, ema=0.0, t=1.0, betas=[0.9, 0.95]), ranges)
    training.check_flags(SimpleNamespace(iters=None), ranges)             # unset and absent flags pass
    for bad, message in ((dict(iters=0), "--iters must be > 0 (got 0)"), (dict(iters=-3), "--iters must be > 0"),
                         (dict(warmup=-1), "--warmup must be >= 0"), (dict(ema=1.0), "--ema must be in [0, 1)"),
                         (dict(ema=1.5), "got 1.5"), (dict(t=1.01), "--t must be in [0, 1]"),
                         (dict(betas=[0.9, 1.0]), "--betas"), (dict(iters=float("nan")), "--iters"),
                         (dict(warmup=float("inf")), "--warmup")):
        with pytest.raises(training.UserError, match=message.replace("[", r"\[").replace("(", r"\(")
                           .replace(")", r"\)")):
            training.check_flags(SimpleNamespace(**bad), ranges)


def test_run_main_prints_user_errors_as_one_line(capsys):
    def user():
        raise training.UserError("--lr must be > 0 (got 0.0)")
    with pytest.raises(SystemExit) as exit_info:
        training.run_main(user)
    assert exit_info.value.code == "error: --lr must be > 0 (got 0.0)"      # stderr, exit status 1
    with pytest.raises(SystemExit, match="No such file"):
        training.run_main(lambda: open("/nonexistent/x.json"))            # a wrong path: named
    def released():                                                      # as the model files raise it
        raise FileNotFoundError("released tokenizer folder not found: x/")
    with pytest.raises(SystemExit, match="error: released tokenizer folder not found: x/"):
        training.run_main(released)
    with pytest.raises(ZeroDivisionError):                               # a bug keeps its traceback
        training.run_main(lambda: 1 / 0)
    with pytest.raises(ValueError, match="not a user error"):
        training.run_main(lambda: int("not a user error"))


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
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(5.0)
        model.stat.fill_(7.0)
    ema.update(model, decay=0.9)
    assert torch.allclose(ema.state_dict()["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.equal(ema.state_dict()["bias"], b0)                     # frozen: unchanged
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
    with pytest.raises(training.UserError, match="3 steps in a row"):   # run_main: one line, no traceback
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


def _count_unreadable(rank, init_file, marked, out):
    """One of two gloo ranks: an ImageFolder stand-in whose flags mark `marked[rank]`."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ds = SimpleNamespace(_bad=torch.zeros(6, dtype=torch.bool))
    ds._bad[list(marked[rank])] = True
    ds.skipped = int(ds._bad.sum())
    out[rank] = (ds.skipped, training.unreadable_images(ds, torch.device("cpu")))
    dist.destroy_process_group()


def test_unreadable_images_counts_every_rank_each_file_once(tmp_path):
    """bad_images in train_tok's log: the distinct unreadable files of all ranks, not rank 0's."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Manager().dict()
    marked = {0: [0], 1: [0, 2, 5]}                      # file 0 met by both ranks: counted once
    procs = [ctx.Process(target=_count_unreadable, args=(r, str(tmp_path / "init"), marked, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert out[0] == (1, 3) and out[1] == (3, 3)
    assert training.unreadable_images(SimpleNamespace(skipped=4), torch.device("cpu")) == 4   # one process


def test_compile_module_with_inductor_draws_eager_randoms_and_resumes_exactly():
    """training.compile_module with inductor itself (the CI's one C++ compile, a two-layer net; the
    stages' compile tests capture graphs only, conftest.py): dropout inside the compiled forward
    draws from torch's generator as eager dropout does (fallback_random), so three compiled AdamW
    steps give the eager losses to 1e-6 relative and leave the generator where eager steps leave it;
    the state_dict keys have no `_orig_mod.`; steps 2-3 rerun from step 1's (weights, AdamW, RNG)
    state end bit-identical."""
    import copy
    import torch._dynamo

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 1))
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)

    def step(net, opt, x):
        loss = net(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    x = torch.randn(16, 8)
    (eager, opt_e), (compiled, opt_c) = make(), make()
    torch._dynamo.reset()
    try:
        training.compile_module(compiled)
        assert compiled.state_dict().keys() == eager.state_dict().keys()
        torch.manual_seed(1)
        losses_e, after_e = [step(eager, opt_e, x) for _ in range(3)], torch.rand(4)
        torch.manual_seed(1)
        losses_c = [step(compiled, opt_c, x)]
        saved = (copy.deepcopy(compiled.state_dict()), copy.deepcopy(opt_c.state_dict()), torch.get_rng_state())
        losses_c += [step(compiled, opt_c, x) for _ in range(2)]
        after_c, weights = torch.rand(4), copy.deepcopy(compiled.state_dict())
        assert losses_c == pytest.approx(losses_e, rel=1e-6) and torch.equal(after_c, after_e)
        compiled.load_state_dict(saved[0])
        opt_c.load_state_dict(saved[1])
        torch.set_rng_state(saved[2])
        assert [step(compiled, opt_c, x) for _ in range(2)] == losses_c[1:]
        assert all(torch.equal(v, compiled.state_dict()[k]) for k, v in weights.items())
    finally:
        torch._dynamo.reset()
