"""Tests of sample.py and pipeline_tiny.py (CPU, tiny random models, seconds each):
the ADM .npz that evaluate.py reads back, the grid and the nearest-neighbour check; resume keeps
finished chunks and redraws missing ones identically; other settings are refused; a 2-process
torchrun gives the same images as one process; the EMA weights are the ones sampled; DiT / MAR
checkpoints sample; --compile compiles each batch size once and gives the eager images; the
README's tiny pipeline runs end to end with reduced steps."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_script, user_error
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate    # noqa: E402
import generators  # noqa: E402
import sample      # noqa: E402
import tokenizer   # noqa: E402
import training    # noqa: E402

IMAGE_SIZE, TOKENS, DIM = 16, 16, 8
N, BATCH = 10, 4          # 10 images in chunks of 4: chunks 0-3, 4-7, 8-9


def save_models(tmp, preset="SiT-tiny"):
    """A random tiny tokenizer (train_tok.py checkpoint) and generator (train_gen.py checkpoint)."""
    torch.manual_seed(0)
    tok = tokenizer.make_tokenizer("tiny", tokens=TOKENS, token_dim=DIM, image_size=IMAGE_SIZE, enc_width=32,
                                   enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, codebook_size=64)
    with torch.no_grad():     # LayerScale 1 instead of 1e-5: the random decoder's output then depends on z
        for name, p in tok.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    state = tok.state_dict()
    training.save_checkpoint(str(tmp / "tok.pt"), {"config": dataclasses.asdict(tok.config), "model": state,
                                                   "ema": state})
    gen = generators.make_generator(preset, TOKENS, DIM, num_classes=10)
    state = gen.state_dict()
    path = tmp / f"{preset}.pt"
    training.save_checkpoint(str(path), {"config": dataclasses.asdict(gen.config), "model": state, "ema": state,
                                         "latent_mean": 0.01, "latent_std": 0.3, "tokenizer": str(tmp / "tok.pt"),
                                         "step": 0})
    return path


def run_cli(*argv):
    """Run sample.py's command line in this process (as `python sample.py ...`)."""
    run_script("sample.py", *argv)


def flags(ckpt, out, *extra):
    return ("--ckpt", ckpt, "--out", out, "--num-images", N, "--batch-size", BATCH, "--steps", 2,
            "--cfg-scale", 1.5, "--device", "cpu", *extra)


def png(out, i):
    return np.asarray(Image.open(os.path.join(out, "samples", f"{i:06d}.png")))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    ckpt = save_models(tmp)
    run_cli(*flags(ckpt, tmp / "out", "--nn-check", "builtin"))
    return tmp, ckpt


def test_npz_is_read_back_by_evaluate(sampled):
    tmp, _ = sampled
    out = tmp / "out"
    images = evaluate.load_images_npz(str(out / "samples.npz"))
    assert images.shape == (N, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert evaluate.count_images(str(out / "samples.npz")) == N
    assert all(np.array_equal(images[i], png(out, i)) for i in range(N))
    assert np.concatenate(list(evaluate.iter_images(str(out / "samples.npz"), 3))).tobytes() == images.tobytes()
    assert not np.array_equal(images[0], images[1])                 # different noise per image
    grid = Image.open(out / "grid.png")                             # 8 per row, 2 rows, 2 px padding
    assert grid.size == (8 * (IMAGE_SIZE + 2) + 2, 2 * (IMAGE_SIZE + 2) + 2)


def test_nearest_neighbour_check(sampled):
    tmp, _ = sampled
    check = json.loads((tmp / "out" / "summary.json").read_text())["nn_check"]
    assert set(check) == {"samples", "real held-out", "reconstructed held-out", "decoded random latents",
                          "uniform noise"}
    assert all(0 <= r["nn_rmse"] < 1 and 0 <= r["nn_class_match"] <= 1 for r in check.values())
    assert check["real held-out"]["nn_rmse"] < check["uniform noise"]["nn_rmse"]


def test_resume_keeps_finished_chunks_and_redraws_the_same_images(sampled, tmp_path):
    tmp, ckpt = sampled
    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out)
    original = evaluate.load_images_npz(str(out / "samples.npz"))
    Image.fromarray(np.zeros_like(original[0])).save(out / "samples" / "000000.png")   # chunk 0 finished: kept
    os.remove(out / "samples" / "000005.png")                                           # chunk 1 unfinished
    Image.fromarray(np.zeros_like(original[0])).save(out / "samples" / "000006.png")
    run_cli(*flags(ckpt, out))
    again = evaluate.load_images_npz(str(out / "samples.npz"))
    assert not again[0].any()                                         # the existing PNG was kept
    assert np.array_equal(again[1:], original[1:])                    # chunk 1 redrawn identically
    assert "cfg_scale" in user_error("sample.py", *flags(ckpt, out)[:-4], "--cfg-scale", 2.0, "--device", "cpu")


def test_compiled_sampling_compiles_once_per_batch_size(tmp_path, compile_backend):
    """--compile (training.compile_generator, static shapes): 10 images in chunks of 4, 4, 2, four
    SDE steps at t = 1, 0.68, 0.36, 0.04 with CFG on [0, 0.5], i.e. the plain batch for two steps
    and CFG's doubled batch for two: network batches 4, 8 (twice) and 2, 4 (the last chunk) are
    3 shapes, compiled once each for the 12 calls (a recompilation per step would give 12, up to
    dynamo's limit); the images equal the eager run's to one grey level (rounding)."""
    from torch._dynamo.utils import counters
    ckpt = save_models(tmp_path)
    extra = ("--steps", 4, "--guidance-interval", 0.0, 0.5)
    run_cli(*flags(ckpt, tmp_path / "eager", *extra))
    graphs = counters["stats"]["unique_graphs"]
    run_cli(*flags(ckpt, tmp_path / "compiled", *extra, "--compile"))
    assert counters["stats"]["unique_graphs"] - graphs == 3 and not counters["graph_break"]
    for i in range(N):
        eager, compiled = png(tmp_path / "eager", i).astype(int), png(tmp_path / "compiled", i).astype(int)
        assert np.abs(eager - compiled).max() <= 1, i


def test_sampling_uses_the_ema_weights(tmp_path):
    """The paper samples with EMA weights: a checkpoint whose EMA differs from its live weights (the
    generator's and those of the tokenizer it names) gives the images of a checkpoint holding only
    the EMA weights, not those of one holding only the live weights. (sample.py has no --raw.)"""
    path = save_models(tmp_path)
    gen, tok = training.load_checkpoint(str(path)), training.load_checkpoint(str(tmp_path / "tok.pt"))
    g = torch.Generator().manual_seed(1)
    live = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in ck["model"].items()} for ck in (gen, tok)]
    ema = [gen["ema"], tok["ema"]]

    def images(name, weights, averaged):        # checkpoints holding `weights` live, `averaged` as EMA
        folder = tmp_path / name
        os.makedirs(folder)
        training.save_checkpoint(str(folder / "tok.pt"), dict(tok, model=weights[1], ema=averaged[1]))
        training.save_checkpoint(str(folder / "gen.pt"), dict(gen, model=weights[0], ema=averaged[0],
                                                              tokenizer=str(folder / "tok.pt")))
        run_cli("--ckpt", folder / "gen.pt", "--out", folder / "out", "--num-images", 2, "--batch-size", 2,
                "--steps", 2, "--cfg-scale", 1.5, "--device", "cpu")
        return evaluate.load_images_npz(str(folder / "out" / "samples.npz"))

    both = images("both", live, ema)
    assert np.array_equal(both, images("ema-only", ema, ema))
    assert not np.array_equal(both, images("live-only", live, live))


@pytest.mark.parametrize("preset", ["DiT-tiny", "MAR-tiny"])
def test_dit_and_mar_checkpoints_sample(tmp_path, preset):
    ckpt = save_models(tmp_path, preset)
    run_cli("--ckpt", ckpt, "--out", tmp_path / "out", "--num-images", 3, "--batch-size", 3, "--steps", 2,
            "--cfg-scale", 1.5, "--device", "cpu")
    assert evaluate.load_images_npz(str(tmp_path / "out" / "samples.npz")).shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_two_process_torchrun_gives_the_same_images(sampled, tmp_path):
    tmp, ckpt = sampled
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "sample.py", *map(str, flags(ckpt, tmp_path / "out"))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = evaluate.load_images_npz(str(tmp_path / "out" / "samples.npz"))
    assert np.array_equal(two, evaluate.load_images_npz(str(tmp / "out" / "samples.npz")))


def test_pipeline_script_runs_end_to_end(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "pipeline_tiny.py"), "--runs", str(tmp_path), "--judge-images", "200",
           "--judge-epochs", "1", "--tok-iters", "2", "--gen-images", "64", "--gen-steps", "2", "--num-images", "20",
           "--sample-steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (tmp_path / "eval-tiny" / "table.txt").read_text()
    cfg = sample.PRESETS["tiny"]["cfg_scale"]
    for row in ("real held-out images (floor)", "tokenizer reconstructions", f"samples, CFG {cfg}",
                "samples, no CFG", "decoded random latents (ceiling)", "FD (built-in classifier)",
                "tokenizer PSNR", "mean training image PSNR", "judge accuracy on real held-out images",
                "time: total"):
        assert row in table, row
    judged = json.loads((tmp_path / "eval-tiny" / "judge.json").read_text())["sets"]
    assert all(row["num_images"] == 20 for row in judged.values())        # every row: the same N
    assert (tmp_path / "samples-tiny" / "grid.png").is_file()
    samples = str(tmp_path / "samples-tiny" / "samples.npz")
    assert evaluate.load_images_npz(samples).shape == (20, 32, 32, 3)
    assert evaluate.load_labels_npz(samples).tolist() == [i % 10 for i in range(20)]   # arr_1
