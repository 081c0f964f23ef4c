"""What a user who makes a mistake sees, for every stage's command line (CPU, seconds): numeric
flags out of range are refused naming the flag (and every numeric flag has a range), checkpoints
of the wrong kind or damaged ones are named with what is wrong, evaluate.py names image files it
cannot use, and a user error ends with one line and exit status 1, not a traceback."""

import ast
import dataclasses
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, user_error

import generators
import tokenizer
import training

STAGES = ("train_tok.py", "train_gen.py", "sample.py", "evaluate.py")


def numeric_flags(script):
    """The dest of every add_argument(..., type=int/float) without choices in a script."""
    dests = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, script)).read())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            kw = {k.arg: k.value for k in node.keywords}
            kind = kw.get("type")
            if isinstance(kind, ast.Name) and kind.id in ("int", "float") and "choices" not in kw:
                first = next(a.value for a in node.args if a.value.startswith("--"))
                dests.add(kw["dest"].value if "dest" in kw else first[2:].replace("-", "_"))
    return dests


@pytest.mark.parametrize("script", STAGES)
def test_every_numeric_flag_has_a_range(script):
    flags = numeric_flags(script)
    ranges = importlib.import_module(script[:-3]).FLAG_RANGES
    assert len(flags) > 5 and not flags - set(ranges), f"no range for {sorted(flags - set(ranges))}"


@pytest.mark.parametrize("argv, rule", [
    (("sample.py", "--batch-size", 0), "--batch-size must be > 0 (got 0)"),
    (("sample.py", "--steps", 0), "--steps must be > 0"),
    (("sample.py", "--num-images", -1), "--num-images must be > 0"),
    (("sample.py", "--cfg-scale", -1), "--cfg-scale must be >= 0"),
    (("sample.py", "--guidance-interval", 0, 1.5), "--guidance-interval must be in [0, 1]"),
    (("sample.py", "--guidance-interval", 0.8, 0.2), "LO must not exceed HI"),
    (("sample.py", "--temperature", -0.5), "--temperature must be >= 0"),
    (("train_gen.py", "--batch-size", 0), "--batch-size must be > 0"),
    (("train_gen.py", "--steps", 0), "--steps must be > 0"),
    (("train_gen.py", "--lr", 0), "--lr must be > 0"),
    (("train_gen.py", "--ema", 1.5), "--ema must be in [0, 1)"),
    (("train_gen.py", "--betas", 0.9, 1.0), "--betas must be in [0, 1)"),
    (("train_gen.py", "--ckpt-every", 0), "--ckpt-every must be > 0"),
    (("train_gen.py", "--log-every", 0), "--log-every must be > 0"),
    (("train_gen.py", "--shard-images", 0), "--shard-images must be > 0"),
    (("train_gen.py", "--model", "SiT-Q"), "unknown --model 'SiT-Q'"),
    (("evaluate.py", "recon", "--batch-size", 0), "--batch-size must be > 0"),
    (("evaluate.py", "recon", "--num-images", -1), "--num-images must be >= 0"),
    (("evaluate.py", "linear-probe", "--epochs", 0), "--epochs must be > 0"),
    (("evaluate.py", "linear-probe", "--t", 2), "--t must be in [0, 1]"),
    (("evaluate.py", "is", "x.npz", "--batch-size", 0), "--batch-size must be > 0"),
    (("evaluate.py", "throughput", "--batch", 0), "--batch must be > 0")])
def test_numeric_flags_of_every_stage_are_refused_out_of_range(argv, rule):
    assert rule in user_error(*argv)


def save_pair(tmp_path):
    """A tiny tokenizer (train_tok.py-style checkpoint) and generator (train_gen.py-style) that name
    each other, as the scripts write them."""
    torch.manual_seed(0)
    tok = tokenizer.make_tokenizer("tiny", tokens=16, token_dim=8, image_size=16, enc_width=32, enc_depth=1,
                                   enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, codebook_size=64)
    tok_path, gen_path = str(tmp_path / "tok.pt"), str(tmp_path / "gen.pt")
    training.save_checkpoint(tok_path, {"kind": "tokenizer", "config": dataclasses.asdict(tok.config),
                                        "model": tok.state_dict(), "ema": tok.state_dict(), "step": 0})
    gen = generators.make_generator("SiT-tiny", 16, 8, num_classes=10)
    for _ in range(2):                                    # two saves: ckpt-prev.pt exists
        training.save_checkpoint(gen_path, {"kind": "generator", "config": dataclasses.asdict(gen.config),
                                            "model": gen.state_dict(), "ema": gen.state_dict(),
                                            "latent_mean": 0.0, "latent_std": 1.0, "tokenizer": tok_path,
                                            "step": 0})
    return tok_path, gen_path


def test_wrong_kind_and_damaged_checkpoints_are_named(tmp_path):
    tok, gen = save_pair(tmp_path)
    needs_gen = f"'{tok}': this is a tokenizer checkpoint; --ckpt needs a generator checkpoint (from train_gen.py)"
    assert user_error("sample.py", "--ckpt", tok, "--out", tmp_path / "s", "--device", "cpu") == f"error: {needs_gen}"
    assert ("this is a generator checkpoint; --tokenizer needs a tokenizer checkpoint (from train_tok.py)"
            in user_error("train_gen.py", "--cache-latents", "--tokenizer", gen, "--cache-dir", tmp_path / "c",
                          "--data-path", "builtin", "--device", "cpu"))
    assert ("this is a generator checkpoint; --ckpt needs a tokenizer checkpoint"
            in user_error("evaluate.py", "recon", "--ckpt", gen, "--data-path", "builtin", "--device", "cpu"))
    assert ("this is a tokenizer checkpoint; --sit needs a generator checkpoint"
            in user_error("evaluate.py", "linear-probe", "--sit", tok, "--train-path", "builtin",
                          "--val-path", "builtin", "--device", "cpu"))
    assert ("this is a generator checkpoint; --tokenizer needs a tokenizer checkpoint" in
            user_error("sample.py", "--ckpt", gen, "--tokenizer", gen, "--out", tmp_path / "s", "--device", "cpu"))
    # a checkpoint cut short: the file, what is wrong, and the run's previous checkpoint to use
    with open(gen, "rb") as f:
        head = f.read(2000)
    with open(gen, "wb") as f:
        f.write(head)
    message = user_error("sample.py", "--ckpt", gen, "--out", tmp_path / "s", "--device", "cpu")
    assert gen in message and "truncated" in message and f"--ckpt {tmp_path / 'gen-prev.pt'}" in message
    assert "not exist" in user_error("sample.py", "--ckpt", tmp_path / "none.pt", "--device", "cpu")


def test_sample_refuses_a_temperature_for_an_ode_sampler(tmp_path):
    _, gen = save_pair(tmp_path)
    message = user_error("sample.py", "--ckpt", gen, "--out", tmp_path / "s", "--device", "cpu",
                         "--sampler", "ode-euler", "--temperature", "0.5")
    assert "temperature 0.5 with the ode-euler sampler" in message and "SDE" in message
    assert not (tmp_path / "s").exists()                  # refused before anything is written
    # a sampler of another family: a one-line error naming the samplers it has (was a traceback)
    message = user_error("sample.py", "--ckpt", gen, "--out", tmp_path / "s", "--device", "cpu", "--sampler", "ddpm")
    assert "the ddpm sampler does not sample SIT" in message and "sde, ode-euler, ode-heun" in message
    assert not (tmp_path / "s").exists()


def test_evaluate_names_image_files_it_cannot_use(tmp_path):
    cases = {"empty.npz": (dict(arr_0=np.zeros((0, 8, 8, 3), np.uint8)), "holds no images"),
             "nothing.npz": ({}, "no 'arr_0' images"),
             "float.npz": (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), "floats: store the images as uint8"),
             "nchw.npz": (dict(arr_0=np.zeros((4, 3, 8, 8), np.uint8)), "channels first"),
             "text.npz": (None, "not an .npz file (not a zip archive)")}
    for name, (arrays, what) in cases.items():
        path = str(tmp_path / name)
        if arrays is None:
            with open(path, "w") as f:
                f.write("not an archive")
        else:
            np.savez(path, **arrays)
        for argv in (("is", path), ("fid", path, path), ("stats", path, str(tmp_path / "out.npz"))):
            message = user_error("evaluate.py", *argv, "--device", "cpu")
            assert path in message and what in message, message
    assert "no such image folder" in user_error("evaluate.py", "is", str(tmp_path / "none.npz"))


def test_a_user_error_is_one_line_and_exit_status_1():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_gen.py"), "--preset", "tiny", "--batch-size", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr == "error: --batch-size must be > 0 (got 0)\n" and r.stdout == ""


def test_resume_help_names_the_real_folder(capsys):
    with pytest.raises(SystemExit):
        run_script("train_tok.py", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "<out-dir>/<name>/ckpt.pt" in text and "runs/<name>" not in text and "--overwrite" in text
