"""Tests of train_gen.py (CPU, tiny models, seconds each):
latent caching (image + flip, labels, mean / std over the whole set, a tokenizer's own statistics
win; an interrupted cache resumed keeping its finished shards, a finished one never replaced
silently), the normalisation round trip, exact resume (cache and on-the-fly; the schedule may
change, the batch may not), a 2-process gloo torchrun run of caching + training (MAR-tiny:
warm-up and grad clipping), 2 ranks = 1 rank after two steps, a NaN step that moves neither
the weights nor the EMA, and --compile: the eager losses, exact resume."""

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data        # noqa: E402
import generators  # noqa: E402
import tokenizer   # noqa: E402
import train_gen   # noqa: E402
import training    # noqa: E402

IMAGES = 40        # built-in images in the test caches
IMAGE_SIZE, TOKENS, DIM = 16, 16, 8


def save_tokenizer(path, mean=None, std=None):
    """A random ~30K-parameter tokenizer as a train_tok.py checkpoint; optional latent statistics
    (as a released tokenizer carries them)."""
    torch.manual_seed(0)
    tok = tokenizer.make_tokenizer("tiny", tokens=TOKENS, token_dim=DIM, image_size=IMAGE_SIZE, enc_width=32,
                                   enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, codebook_size=64)
    if mean is not None:
        tok.latent_mean.fill_(mean)
        tok.latent_std.fill_(std)
    state = tok.state_dict()
    training.save_checkpoint(str(path), {"config": dataclasses.asdict(tok.config), "model": state, "ema": state})
    return tok.eval()


def run_cli(*argv):
    """Run train_gen.py's command line in this process (as `python train_gen.py ...`)."""
    run_script("train_gen.py", *argv)


def cache_args(tok_path, cache_dir):
    return ("--cache-latents", "--tokenizer", tok_path, "--data-path", "builtin", "--builtin-size", IMAGES,
            "--cache-dir", cache_dir, "--num-workers", 0, "--device", "cpu")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    tok = save_tokenizer(tmp / "tok.pt")
    run_cli(*cache_args(tmp / "tok.pt", tmp / "cache"))
    return tmp, tok


def test_cache_holds_latents_of_images_and_flips_with_stats(cached):
    tmp, tok = cached
    cache = train_gen.LatentCache(str(tmp / "cache"))
    meta = cache.meta
    assert len(cache) == IMAGES and meta["num_classes"] == 10 and meta["stats_from"] == "cache"
    assert (meta["num_tokens"], meta["token_dim"], meta["tokenizer"]) == (TOKENS, DIM, str(tmp / "tok.pt"))
    z = np.concatenate(cache.latents)                                       # (N, 2, L, D)
    assert z.shape == (IMAGES, 2, TOKENS, DIM) and z.dtype == np.float32
    # image i (evaluation transform) and its horizontal flip, with its label
    ds = data.make_dataset("builtin", IMAGE_SIZE, train=False)
    x = torch.stack([ds[i][0] for i in range(IMAGES)])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(z[:, 0]), tok.encode(x), atol=1e-5)
        assert torch.allclose(torch.from_numpy(z[:, 1]), tok.encode(x.flip(-1)), atol=1e-5)
    assert not np.allclose(z[:, 0], z[:, 1])
    assert cache.labels.tolist() == [ds[i][1] for i in range(IMAGES)]
    # scalar mean / std over every cached value (both flips), Sec. 4
    assert meta["latent_mean"] == pytest.approx(z.astype(np.float64).mean(), rel=1e-9, abs=1e-12)
    assert meta["latent_std"] == pytest.approx(z.astype(np.float64).std(), rel=1e-9)


def test_normalisation_round_trip_and_multi_shard_reader(cached, tmp_path):
    tmp, _ = cached
    cache = train_gen.LatentCache(str(tmp / "cache"))
    m, s = cache.meta["latent_mean"], cache.meta["latent_std"]
    idx, flips = np.array([3, 0, 39, 17]), np.array([1, 0, 0, 1])
    z, y = cache.batch(idx, flips)
    x = (z - m) / s
    assert abs(x.mean().item()) < 1.0 and torch.allclose(x * s + m, z, atol=1e-6)
    # the same rows when the cache is split into two shards (as two ranks write it)
    full = np.load(tmp / "cache" / "r000-s0000-latents.npy")
    labels = np.load(tmp / "cache" / "r000-s0000-labels.npy")
    for k, part in enumerate((slice(0, 25), slice(25, None))):
        np.save(tmp_path / f"r{k:03d}-s0000-latents.npy", full[part])
        np.save(tmp_path / f"r{k:03d}-s0000-labels.npy", labels[part])
    (tmp_path / "meta.json").write_text((tmp / "cache" / "meta.json").read_text())
    z2, y2 = train_gen.LatentCache(str(tmp_path)).batch(idx, flips)
    assert torch.equal(z, z2) and torch.equal(y, y2)
    assert torch.equal(z[0], torch.from_numpy(full[3, 1]))


def test_tokenizer_statistics_are_used_as_is(tmp_path):
    save_tokenizer(tmp_path / "tok.pt", mean=0.25, std=2.0)
    run_cli(*cache_args(tmp_path / "tok.pt", tmp_path / "cache"))
    meta = train_gen.LatentCache(str(tmp_path / "cache")).meta
    assert (meta["latent_mean"], meta["latent_std"], meta["stats_from"]) == (0.25, 2.0, "tokenizer")
    assert meta["measured_std"] != 2.0


def test_interrupted_cache_resumes_keeping_finished_shards(tmp_path, capsys):
    """Killed (SIGKILL) in the middle of writing its 2nd shard of 16 images, the cache resumes with
    --resume: shard 0 is kept (not re-encoded), the rest is written, and every file equals the
    uninterrupted cache's; a finished cache is never replaced without --overwrite."""
    save_tokenizer(tmp_path / "tok.pt")
    args = (*cache_args(tmp_path / "tok.pt", tmp_path / "ref"), "--shard-images", 16)
    run_cli(*args)
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len([n for n in ref if n.endswith("-latents.npy")]) == 3            # 40 images: 16 + 16 + 8
    killed = [a if a != tmp_path / "ref" else tmp_path / "cut" for a in args]
    env = {**os.environ, training.KILL_ENV: "*-latents.npy:2:middle"}
    r = subprocess.run([sys.executable, "train_gen.py", *map(str, killed)], cwd=ROOT, env=env, timeout=300)
    assert r.returncode == -9
    cut = tmp_path / "cut"
    assert (cut / "r000-s0000-latents.npy").is_file() and not (cut / "r000-s0001-latents.npy").exists()
    assert not (cut / "meta.json").exists() and any(".tmp" in p.name for p in cut.iterdir())
    kept = (cut / "r000-s0000-latents.npy").stat().st_mtime_ns
    assert "--resume to continue it" in user_error("train_gen.py", *killed)       # not silently restarted
    run_cli(*killed, "--resume")
    assert "kept 1 finished shards" in capsys.readouterr().out
    assert (cut / "r000-s0000-latents.npy").stat().st_mtime_ns == kept
    assert sorted(p.name for p in cut.iterdir()) == ref                         # temp file removed
    for name in ref:
        assert (cut / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    run_cli(*killed, "--resume")                                                # complete: nothing to do
    assert "is complete: nothing to do" in capsys.readouterr().out
    assert "already holds a latent cache" in user_error("train_gen.py", *killed)
    message = user_error("train_gen.py", *killed, "--resume", "--builtin-size", 48)   # other settings
    assert "num_images" in message
    run_cli(*killed, "--overwrite", "--shard-images", 40)
    assert sorted(p.name for p in cut.glob("*-latents.npy")) == ["r000-s0000-latents.npy"]


def test_the_tokenizer_is_read_with_its_ema_weights(tmp_path):
    """Latents are encoded (cached or on the fly) by the tokenizer's EMA weights, not its live ones."""
    tok = save_tokenizer(tmp_path / "tok.pt")
    ckpt = training.load_checkpoint(str(tmp_path / "tok.pt"))
    live = {k: v + 0.05 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    training.save_checkpoint(str(tmp_path / "tok.pt"), dict(ckpt, model=live))
    loaded = train_gen.load_any_tokenizer(str(tmp_path / "tok.pt")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tok.state_dict().items())


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["step"] == b["step"]


@pytest.mark.parametrize("source", ["cache", "on-the-fly"])
def test_resume_is_bit_identical(cached, tmp_path, source, capsys):
    tmp, _ = cached
    data_flags = (("--cache-dir", tmp / "cache") if source == "cache" else
                  ("--on-the-fly", "--tokenizer", tmp / "tok.pt", "--data-path", "builtin", "--builtin-size", IMAGES))
    common = ("--preset", "tiny", *data_flags, "--steps", 6, "--batch-size", 8, "--log-every", 2,
              "--ckpt-every", 100, "--warmup-epochs", 1, "--grad-clip", 0.5, "--device", "cpu")
    run_cli(*common, "--out", tmp_path / "a")
    run_cli(*common, "--out", tmp_path / "b", "--stop-at", 4)      # 5 steps per epoch: crosses an epoch
    assert load_state(tmp_path / "b" / "ckpt.pt")["step"] == 4
    run_cli(*common, "--out", tmp_path / "b", "--resume")
    a, b = load_state(tmp_path / "a" / "ckpt.pt"), load_state(tmp_path / "b" / "ckpt.pt")
    assert_same_state(a, b)
    assert a["step"] == 6 and a["tokenizer"] == str(tmp / "tok.pt")
    assert np.isfinite(a["latent_mean"]) and a["latent_std"] > 0
    # training moved the weights away from the initial ones (train_gen seeds the init with --seed 0)
    torch.manual_seed(0)
    init = generators.make_generator("SiT-tiny", TOKENS, DIM, num_classes=10).state_dict()
    assert any(not torch.equal(v, a["model"][k]) for k, v in init.items())
    # a resume with another batch or seed is refused, naming the fields; the schedule may change
    message = user_error("train_gen.py", *common, "--out", tmp_path / "b", "--resume", "--batch-size", 4, "--seed", 1)
    assert "batch_size" in message and "seed" in message
    run_cli(*common, "--out", tmp_path / "b", "--resume", "--lr", 0.5, "--steps", 7)
    assert f"--resume with changed settings: lr {train_gen.TINY['lr']} -> 0.5, steps 6 -> 7" in capsys.readouterr().out
    assert load_state(tmp_path / "b" / "ckpt.pt")["step"] == 7


def test_compiled_training_matches_eager_and_resumes_exactly(cached, tmp_path, compile_backend):
    """--compile (the SiT network compiled in place; conftest.py: the backends): the logged losses
    equal the eager run's to 1e-5 relative, the checkpoint has the eager run's keys (no
    `_orig_mod.`), and a compiled run stopped at step 4 and resumed ends bit-identical to the
    straight compiled run."""
    from torch._dynamo.utils import counters
    tmp, _ = cached
    common = ("--preset", "tiny", "--cache-dir", tmp / "cache", "--steps", 6, "--batch-size", 8, "--log-every", 1,
              "--ckpt-every", 100, "--device", "cpu")
    run_cli(*common, "--out", tmp_path / "eager")
    graphs = counters["stats"]["unique_graphs"]
    run_cli(*common, "--out", tmp_path / "compiled", "--compile")
    assert counters["stats"]["unique_graphs"] > graphs and not counters["graph_break"]
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")] for name in ("eager", "compiled")]
    assert len(logs[1]) == 6 and logs[1] == pytest.approx(logs[0], rel=1e-5)
    run_cli(*common, "--out", tmp_path / "resumed", "--compile", "--stop-at", 4)
    run_cli(*common, "--out", tmp_path / "resumed", "--compile", "--resume")
    a, b = load_state(tmp_path / "compiled" / "ckpt.pt"), load_state(tmp_path / "resumed" / "ckpt.pt")
    assert_same_state(a, b)
    assert a["model"].keys() == load_state(tmp_path / "eager" / "ckpt.pt")["model"].keys()


def test_bf16_autocast_path_runs_on_cpu(cached, tmp_path, capsys):
    """--precision bf16 runs the accelerators' autocast path on the CPU: finite, trained weights."""
    tmp, _ = cached
    run_cli("--preset", "tiny", "--cache-dir", tmp / "cache", "--steps", 3, "--batch-size", 8, "--log-every", 1,
            "--device", "cpu", "--precision", "bf16", "--out", tmp_path / "bf16")
    assert "bf16 autocast" in capsys.readouterr().out
    state = load_state(tmp_path / "bf16" / "ckpt.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())
    torch.manual_seed(0)
    init = generators.make_generator("SiT-tiny", TOKENS, DIM, num_classes=10).state_dict()
    assert any(not torch.equal(v, state["model"][k]) for k, v in init.items())


def test_two_process_torchrun_cache_and_train(cached, tmp_path):
    """gloo DDP on the CPU: caching over 2 ranks gives the single-process cache's statistics;
    MAR-tiny trains 2 steps (warm-up, clipping) and checkpoints both ranks' RNG states."""
    tmp, _ = cached
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cache_cmd = torchrun + ["train_gen.py", *map(str, cache_args(tmp / "tok.pt", tmp_path / "cache"))]
    train_cmd = torchrun + ["train_gen.py", "--preset", "tiny", "--model", "MAR-tiny", "--cache-dir",
                            str(tmp_path / "cache"), "--out", str(tmp_path / "mar"), "--steps", "2",
                            "--batch-size", "8", "--warmup-epochs", "1", "--device", "cpu"]
    for cmd in (cache_cmd, train_cmd):     # conftest.py: one thread per process
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two, one = train_gen.LatentCache(str(tmp_path / "cache")), train_gen.LatentCache(str(tmp / "cache"))
    assert len(two.latents) == 2 and len(two) == IMAGES
    assert two.meta["latent_mean"] == pytest.approx(one.meta["latent_mean"], rel=1e-6, abs=1e-9)
    assert two.meta["latent_std"] == pytest.approx(one.meta["latent_std"], rel=1e-6)
    ckpt = load_state(tmp_path / "mar" / "ckpt.pt")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2 and ckpt["config"]["arch"] == "mar"
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.0, 0.02]  # MAR's rule


def test_mar_weight_decay_exempts_1d_biases_and_the_diffusion_head():
    """MAR's add_weight_decay: 1-D parameters, biases and everything of the diffusion head get no
    weight decay; every other parameter (also the 3-D mask token / position embeddings and the
    class embedding) gets it. DiT / SiT: one group of all parameters, as their official code."""
    torch.manual_seed(0)
    model = generators.make_generator("MAR-tiny", TOKENS, DIM, num_classes=10)
    no_decay, decay = train_gen.param_groups(model, 0.02)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert exempt | decayed == set(names.values()) and not exempt & decayed
    assert {n for n in names.values() if n.startswith("head.")} <= exempt      # MAR's diffloss
    assert "encoder_blocks.0.attn.qkv.bias" in exempt and "encoder_norm.weight" in exempt
    assert {"encoder_blocks.0.attn.qkv.weight", "mask_token", "encoder_pos_embed_learned",
            "class_emb.weight", "z_proj.weight"} <= decayed
    assert all(n.startswith("head.") or (p.ndim == 1 or n.endswith(".bias")) == (n in exempt)
               for n, p in model.named_parameters())
    sit = generators.make_generator("SiT-tiny", TOKENS, DIM, num_classes=10)
    (only,) = train_gen.param_groups(sit, 0.0)
    assert len(only["params"]) == len(list(sit.parameters()))


def test_recipes_clip_sit_at_one_and_not_dit():
    """Official train_sit.py clips the gradient norm at 1.0 (max_grad_norm), train_dit.py does not;
    MAR clips at 3.0."""
    import argparse
    clip = {m: train_gen.resolve(argparse.Namespace(preset=None, model=m, grad_clip=None)).grad_clip
            for m in ("SiT-XL", "DiT-XL", "MAR-H")}
    assert clip == {"SiT-XL": 1.0, "DiT-XL": 0.0, "MAR-H": 3.0}
    assert train_gen.resolve(argparse.Namespace(preset=None, model="SiT-XL", grad_clip=0.0)).grad_clip == 0.0




def test_a_nan_step_moves_neither_weights_nor_ema(cached, tmp_path):
    """A batch holding a NaN latent is skipped: after a good first step (EMA != weights), the
    weights, EMA and Adam moments after step 2 are those after step 1, and the skip is counted."""
    tmp, _ = cached
    shutil.copytree(tmp / "cache", tmp_path / "cache")
    batch = 8
    order, _ = train_gen.epoch_order(IMAGES, 0, 0)           # --seed 0, epoch 0
    shard = tmp_path / "cache" / "r000-s0000-latents.npy"
    z = np.load(shard)
    z[order[batch]] = np.nan                                 # one latent of the second batch
    np.save(shard, z)
    common = ("--preset", "tiny", "--cache-dir", tmp_path / "cache", "--steps", 2, "--batch-size", batch,
              "--ckpt-every", 100, "--device", "cpu")
    run_cli(*common, "--out", tmp_path / "one", "--stop-at", 1)
    run_cli(*common, "--out", tmp_path / "two")
    one, two = load_state(tmp_path / "one" / "ckpt.pt"), load_state(tmp_path / "two" / "ckpt.pt")
    assert (one["nan_guard"]["skipped"], two["nan_guard"]["skipped"], two["step"]) == (0, 1, 2)
    assert any(not torch.equal(one["ema"][k], v) for k, v in one["model"].items())
    assert_same_state(one, dict(two, step=1))


# The generators' losses draw t, noise and label drops per rank, so 2 ranks cannot reproduce one
# rank's draws; for this comparison the loss is a deterministic function of (network, batch).
FIXED_LOSS = """
import runpy, sys, torch, generators
def loss(self, x, y):   # the network's squared error at t = 0.5 on the token-reversed latents
    return ((self(x.flip(1), torch.full((len(x),), 0.5), y) - x) ** 2).mean()
generators.DiT.loss = loss
sys.argv = ["train_gen.py", *sys.argv[1:]]
runpy.run_path("train_gen.py", run_name="__main__")
"""


def test_two_ranks_give_the_same_update_as_one(cached, tmp_path):
    """2 gloo ranks x 4 latents = 1 rank x the same 8 (one global order, dealt rank by rank): the
    same logged losses, and weights, EMA and Adam moments after two steps (the first moves only
    the zero-initialised output layer) equal to fp32 rounding: the weights to 1e-5 where the update
    is ~lr = 0.01 (Adam's first steps go ~lr along sign(g): a wrong gradient moves them by ~lr)."""
    tmp, _ = cached
    args = ("--preset", "tiny", "--cache-dir", tmp / "cache", "--steps", 2, "--batch-size", 8, "--lr", 0.01,
            "--log-every", 1, "--ckpt-every", 100, "--device", "cpu")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    procs = [subprocess.Popen(launcher + [sys.executable, "-c", FIXED_LOSS, *map(str, args), "--out", str(tmp_path / name)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for launcher, name in (([], "one"), (torchrun, "two"))]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "on 1 x cpu" in outs[0] and "on 2 x cpu" in outs[1]
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")] for name in ("one", "two")]
    assert len(logs[0]) == 2 and logs[1] == pytest.approx(logs[0], rel=1e-6)
    one, two = load_state(tmp_path / "one" / "ckpt.pt"), load_state(tmp_path / "two" / "ckpt.pt")
    for key in ("model", "ema"):
        for k, v in one[key].items():
            torch.testing.assert_close(two[key][k], v, rtol=0, atol=1e-5, msg=f"{key}.{k}")   # update ~1e-2
    assert one["model"]["blocks.0.adaLN_modulation.1.weight"].abs().max() > 0   # zero at init (adaLN-Zero)
    for i, moments in one["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            scale = moments[name].abs().max().item()
            torch.testing.assert_close(two["optimizer"]["state"][i][name], moments[name], rtol=1e-4,
                                       atol=1e-5 * scale)
