"""A small version of fault_injection.py (the README's fault-injection command): the tiny SiT
training is killed twice inside checkpoint writes (once between moving ckpt.pt to ckpt-prev.pt
and renaming the new one in, once with a complete temp file not yet renamed), its newest
checkpoint is then damaged, and the restarts (--resume) must end with weights, optimizer state
and log equal to an uninterrupted run's, the damaged checkpoint replaced by the previous one."""

import dataclasses
import os
import random

import torch

from conftest import run_script

import fault_injection
import tokenizer
import training


def test_killed_and_damaged_training_ends_equal_to_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    # the references the generator stage reads: a random tiny tokenizer and its latent cache
    torch.manual_seed(0)
    tok = tokenizer.make_tokenizer("tiny", tokens=16, token_dim=8, image_size=16, enc_width=32, enc_depth=1,
                                   enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, codebook_size=64)
    training.save_checkpoint(str(ref / "tokenizer" / "ckpt.pt"), {
        "kind": "tokenizer", "config": dataclasses.asdict(tok.config), "model": tok.state_dict(),
        "ema": tok.state_dict(), "step": 0})
    run_script("train_gen.py", *fault_injection.STAGES["cache"]["argv"](str(ref), str(ref / "cache")),
               "--num-workers", 0)
    run_script("train_gen.py", *fault_injection.STAGES["generator"]["argv"](str(ref), str(ref / "generator")))
    plan = [{"write": ("ckpt.pt", 2, "rotate"), "damage": False},     # step 4: ckpt.pt gone, prev = 2
            {"write": ("ckpt.pt", 2, "end"), "damage": True}]         # step 6 not renamed; ckpt.pt (4) damaged
    killed, in_write, recovered, diff = fault_injection.run_trial("generator", str(tmp_path), "g",
                                                                  random.Random(0), seconds=None, plan=plan)
    assert diff is None and (killed, in_write, recovered) == (2, 2, 1)
    final = training.read_checkpoint(str(tmp_path / "trials" / "g" / "ckpt.pt"))
    assert final["step"] == fault_injection.GENERATOR_STEPS
