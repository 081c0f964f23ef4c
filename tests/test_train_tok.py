"""Tests of train_tok.py (CPU, tiny preset, random stand-ins for VGG/DINO/DINOv2 so that every loss
term runs without downloads): exact resume, config refusal, a 2-process gloo torchrun run, the README
command, refusal of the full preset without pretrained files, run folders never replaced silently
(--resume / --overwrite, renamed folders, schedule changes, the log), the previous checkpoint as
the fallback of a damaged one, the NaN stop and its advice, flag ranges, the loss pieces against
their literal definitions, and the objective step by step (Eq. 7 term by term, warm-up and start
schedules, which step updates which network, hinge / LeCAM / consistency by hand, NaN steps,
gradient accumulation and 2 ranks against 1), and --compile against eager."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, script_args

import data
import tokenizer
import train_tok
import training
from conftest import run_script, user_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every term on from step 1: discriminator from step 1, LPIPS warm-up 2 steps, batch 2
FAST = ["--preset", "tiny", "--batch", "2", "--iters", "4", "--warmup", "2", "--lpips-warmup", "2",
        "--disc-start", "1", "--log-every", "1", "--fake-pretrained"]


def start(args, tmp_path, launcher=(sys.executable,)):
    # no pretrained files in this TORCH_HOME; one thread per process: these tiny runs are bound by
    # per-op overhead, which two threads fighting over a shared CPU multiply (torchrun does the same)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, os.path.join(REPO, "train_tok.py"), *args, "--out-dir", str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, check=True):
    out, err = proc.communicate(timeout=300)
    if check:
        assert proc.returncode == 0, out + err
    return proc.returncode, out, err


def run(args, tmp_path, launcher=(sys.executable,), check=True):
    return finish(start(args, tmp_path, launcher), check)


def read_log(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in f]


def test_resume_is_bit_identical(tmp_path):
    straight = start(FAST + ["--name", "straight"], tmp_path)                 # both at once: 2 cores
    finish(start(FAST + ["--name", "killed", "--stop-at", "2"], tmp_path))    # "killed" after step 2
    finish(straight)
    assert len(read_log(tmp_path / "killed" / "log.jsonl")) == 2
    run(FAST + ["--name", "killed", "--resume"], tmp_path)
    straight, resumed = read_log(tmp_path / "straight" / "log.jsonl"), read_log(tmp_path / "killed" / "log.jsonl")
    assert straight == resumed and len(straight) == 4
    assert {"recon", "lpips", "align", "adv", "entropy", "d_cr", "d_lecam", "d_hinge"} <= set(straight[-1])
    assert "adv_lambda" not in straight[-1]                   # adaptive weight off by default
    a, b = (training.load_checkpoint(str(tmp_path / n / "ckpt.pt")) for n in ("straight", "killed"))
    for key in ("model", "ema", "projector", "disc_heads"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(s, t) for s, t in zip(a["opt"]["state"][0].values(), b["opt"]["state"][0].values()))
    assert a["step"] == b["step"] == 4 and torch.equal(a["lecam_ema"], b["lecam_ema"])

    # resuming with another model configuration is refused, naming the field, in one line
    code, _, err = run(FAST + ["--name", "killed", "--resume", "--proj-dim", "32"], tmp_path, check=False)
    assert code == 1 and err.strip().splitlines() == [err.strip()] and "proj_dim" in err
    assert "Traceback" not in err


def test_torchrun_two_ranks_identical_weights(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    _, out, _ = run(FAST + ["--iters", "2", "--name", "ddp", "--device", "cpu"], tmp_path, launcher=launcher)
    assert "all 2 ranks hold identical weights" in out and "world size 2" in out
    assert os.path.isfile(tmp_path / "ddp" / "ckpt.pt")


def test_readme_command_tiny(tmp_path):
    _, out, _ = run(["--preset", "tiny", "--iters", "3", "--log-every", "1"], tmp_path)
    assert ", fp32, " in out                                             # auto precision on a CPU
    for term in ("LPIPS", "adversarial", "alignment"):                    # no files -> off, and said
        assert f"-> {term} term off" in out
    assert os.path.isfile(tmp_path / "tiny-64" / "ckpt.pt")
    assert os.path.isfile(tmp_path / "tiny-64" / "recon_0000003.png")
    model = training.load_tokenizer(str(tmp_path / "tiny-64" / "ckpt.pt"))
    assert model.config.image_size == 32

    # a checkpoint written before a config field existed resumes when this run keeps the field's
    # default (what the code did before), and is refused when it does not
    ckpt_path = str(tmp_path / "tiny-64" / "ckpt.pt")
    ckpt = training.load_checkpoint(ckpt_path)
    assert ckpt["config"]["kl_weight"] == tokenizer.TokenizerConfig.kl_weight and ckpt["config"]["routing_init"]
    for field in ("kl_weight", "routing_init"):
        del ckpt["config"][field]
        training.save_checkpoint(ckpt_path, ckpt)
        code, out, err = run(["--preset", "tiny", "--iters", "4", "--resume"], tmp_path, check=False)
        if field == "kl_weight":
            assert code == 0 and "resumed" in out, err
            ckpt = training.load_checkpoint(ckpt_path)
            assert ckpt["step"] == 4 and "kl_weight" in ckpt["config"]
        else:                                  # absent meant False, the tiny preset has True
            assert code == 1 and "routing_init (" in err and "<absent>" in err


LOSSES = ("loss", "recon", "lpips", "align", "adv", "entropy", "d_loss", "d_hinge", "d_lecam", "d_cr")


def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path, compile_backend):
    """--compile on the full objective (tokenizer + projector, LPIPS, teacher, discriminator
    backbone and heads, each compiled in place; conftest.py: the backends). An eager run of 4 steps
    and a copy of it resumed from its step-2 checkpoint (ckpt-prev.pt) with --compile: every network
    is captured without a graph break (7 graphs); the compiled steps 3-4 log the eager losses, to
    1e-4 relative under AOTAutograd / inductor (they round differently: 2.5e-5 measured for the
    adversarial term at step 4; the random draws are the same), and under graph capture
    bit-identical ones and end with the eager weights, EMA, optimiser states and LeCam averages;
    the compiled run's checkpoint has the eager keys (no `_orig_mod.`). One compilation keeps the
    test short; compile_module's own test covers a compiled run resumed through inductor."""
    from torch._dynamo.utils import counters
    flags = FAST + ["--ckpt-every", "2", "--num-workers", "0", "--out-dir", tmp_path]
    run_script("train_tok.py", *flags, "--name", "eager")
    shutil.copytree(tmp_path / "eager", tmp_path / "compiled")
    os.replace(tmp_path / "compiled" / "ckpt-prev.pt", tmp_path / "compiled" / "ckpt.pt")    # step 2
    graphs = counters["stats"]["unique_graphs"]
    run_script("train_tok.py", *flags, "--name", "compiled", "--resume", "--compile")
    # gen, LPIPS, teacher; the discriminator's taps and heads with and without gradients
    assert counters["stats"]["unique_graphs"] - graphs >= 7 and not counters["graph_break"]
    exact = compile_backend == "eager"
    eager, compiled = (read_log(tmp_path / n / "log.jsonl") for n in ("eager", "compiled"))
    assert len(compiled) == 4 and compiled[:2] == eager[:2] and set(LOSSES) <= set(compiled[-1])
    for e, c in zip(eager[2:], compiled[2:]):
        assert e.keys() == c.keys()
        for key in set(LOSSES) & set(c):
            assert c[key] == (e[key] if exact else pytest.approx(e[key], rel=1e-4, abs=1e-7)), (c["step"], key)
    e, c = (training.load_checkpoint(str(tmp_path / n / "ckpt.pt")) for n in ("eager", "compiled"))
    assert e["step"] == c["step"] == 4
    for key in ("model", "ema", "projector", "disc_heads"):
        assert e[key].keys() == c[key].keys(), key
        assert not exact or all(torch.equal(e[key][k], c[key][k]) for k in e[key]), key
    if exact:
        assert torch.equal(e["lecam_ema"], c["lecam_ema"])
        for opt in ("opt", "opt_disc"):
            assert all(torch.equal(s[k], t[k]) for s, t in zip(e[opt]["state"].values(), c[opt]["state"].values())
                       for k in s)


def test_full_preset_refuses_without_files(tmp_path):
    code, _, err = run(["--preset", "S", "--data-path", "builtin"], tmp_path, check=False)
    assert code != 0
    for name in ("vgg16-397923af.pth", "dino_deitsmall16_pretrain.pth", "dinov2_vitl14_pretrain.pth",
                 "dinov2_vits14_pretrain.pth"):
        assert name in err



def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    """The GPU recipe trains under bf16 autocast; forcing it on the CPU runs the same code path
    (every loss term, both optimisers, and the optional adaptive adversarial weight) and must give
    finite losses and weights."""
    _, out, _ = run(FAST + ["--iters", "2", "--name", "bf16", "--precision", "bf16",
                            "--disc-adaptive-weight"], tmp_path)
    assert "bf16 autocast" in out
    logs = read_log(tmp_path / "bf16" / "log.jsonl")
    assert len(logs) == 2 and logs[-1]["nan_skipped"] == 0
    assert all(torch.isfinite(torch.tensor(float(logs[-1][k])))
               for k in ("recon", "lpips", "adv", "align", "d_loss", "adv_lambda"))
    assert logs[-1]["adv_lambda"] > 0 and "adv_lambda" not in logs[0]    # from --disc-start on
    ckpt = training.load_checkpoint(str(tmp_path / "bf16" / "ckpt.pt"))
    assert ckpt["train_config"]["precision"] == "bf16"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_benchmark_json(tmp_path):
    """--benchmark prints one JSON line whose fields agree with each other: FLOPs of both steps
    (every term active: the discriminator step has work), utilisation = achieved / matmul peak.
    (--benchmark --compile is not run here: capturing the graphs would add half a minute.)"""
    _, out, _ = run(["--preset", "tiny", "--batch", "2", "--benchmark", "1"], tmp_path)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["gflops_gen_step"] > 0 and r["gflops_disc_step"] > 0
    assert r["gflops_per_image"] == pytest.approx(r["gflops_gen_step"] + r["gflops_disc_step"], abs=0.11)
    assert r["ms_per_step"] == pytest.approx(1000 * r["batch"] / r["img_per_s"], rel=0.01)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["matmul_peak_tflops"], rel=0.05, abs=2e-3)
    assert 0 < r["mfu"] < 1 and r["img_per_s_at_peak"] > r["img_per_s"]
    assert r["precision"] == "fp32" and r["device"].startswith("cpu")

# ---- the loss pieces against their literal definitions ----

def test_align_loss_is_eq6_with_repeated_latents():
    torch.manual_seed(0)
    z, y = torch.randn(2, 4, 8), torch.randn(2, 16, 8)
    literal = -F.cosine_similarity(z.repeat_interleave(4, dim=1), y, dim=-1).mean()   # Eq. 5 then Eq. 6
    assert torch.allclose(train_tok.align_loss(z, y), literal, atol=1e-6)
    with pytest.raises(ValueError, match="N/L"):
        train_tok.align_loss(z, torch.randn(2, 6, 8))


def test_lpips_matches_package_and_loads_vgg(tmp_path):
    import lpips
    torch.manual_seed(0)
    ours = train_tok.LPIPS(None)
    assert isinstance(ours.lp, lpips.LPIPS)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert not ours.training
    assert torch.allclose(ours(a, b), ours.lp(a, b).mean(), atol=1e-6)       # the package's forward
    # official: the loss module's .train() turns on the heads' dropout (p = 0.5), which keeps the
    # expectation; eval mode (above) is the deterministic package value
    exact = ours(a, b)
    ours.train()
    assert all(isinstance(lin.model[0], torch.nn.Dropout) and lin.model[0].p == 0.5 and lin.training
               for lin in ours.lp.lins)
    noisy = torch.stack([ours(a, b) for _ in range(12)])
    assert noisy.std() > 1e-3 * exact
    assert abs(noisy.mean() - exact) < 4 * noisy.std() / 12 ** 0.5
    ours.eval()
    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"), map_location="cpu")
    assert all(torch.equal(ours.lp.state_dict()[k], v) for k, v in heads.items())   # shipped heads
    # a torchvision-layout VGG16 file fills the trunk
    convs = {f"features.{i}": m for s in ours.lp.net.children() for i, m in s.named_children()
             if isinstance(m, torch.nn.Conv2d)}
    state = {f"{k}.{p}": torch.randn_like(getattr(m, p)) for k, m in convs.items() for p in ("weight", "bias")}
    torch.save(state, tmp_path / "vgg.pth")
    loaded = train_tok.LPIPS(str(tmp_path / "vgg.pth"))
    assert torch.equal(getattr(loaded.lp.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(loaded.lp.net.slice5, "28").bias, state["features.28.bias"])


def test_diff_augment():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(train_tok.diff_augment(x, 0.5, 0.0), x)             # prob 0: identity
    xg = x.clone().requires_grad_()
    y = train_tok.diff_augment(xg, 0.5, 1.0)
    assert y.shape == x.shape and not torch.equal(y, x)
    y.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_discriminator_shapes_and_frozen_backbone():
    dino = tokenizer.VisionTransformer(224, 16, 32, 12, 2, layerscale=False)
    disc = train_tok.DinoDiscriminator(dino).train()
    assert not dino.training and not any(p.requires_grad for p in dino.parameters())
    x = (torch.rand(3, 3, 32, 32) * 2 - 1).requires_grad_()
    logits = disc(x)
    assert logits.shape == (3, 5 * 196)                   # 5 taps x 14x14 tokens at 224 px
    logits.mean().backward()
    assert x.grad is not None and all(p.grad is None for p in dino.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())


def test_batched_views_match_separate_calls():
    """The discriminator step runs 4 views in one backbone + heads pass; BatchNorm statistics stay
    per view, so (with spectral norm not iterating, eval mode) it equals 4 separate calls."""
    torch.manual_seed(0)
    disc = train_tok.DinoDiscriminator(tokenizer.VisionTransformer(224, 16, 32, 12, 2, layerscale=False))
    disc.heads.eval()
    views = [torch.rand(3, 3, 32, 32) * 2 - 1 for _ in range(4)]
    with torch.no_grad():
        together = disc.heads_logits(disc.features(views), 4)
        separate = torch.cat([disc(v) for v in views])
    assert torch.allclose(together, separate, atol=1e-5)


def test_diff_augment_one_coin_per_policy_entry():
    """Official DiffAugment: one coin per entry of 'color,translation,cutout', `color` being one
    entry (brightness, saturation and contrast together). At p = 0.5 colour is applied half the
    time and nothing at all 1/8 of the time (one coin per op would give 7/8 and 1/32)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    moved_or_zero = torch.cat([x.flatten(), torch.zeros(1)])   # translation / cutout only move or zero
    n, colour, untouched = 2000, 0, 0
    for _ in range(n):
        y = train_tok.diff_augment(x, 0.5, 0.5)
        colour += not torch.isin(y, moved_or_zero).all()
        untouched += torch.equal(y, x)
    assert abs(colour / n - 0.5) < 0.04                          # binomial std 0.011
    assert abs(untouched / n - 0.125) < 0.03                     # binomial std 0.0074


def test_heads_batchnorm_is_whole_batch_batchnorm_per_view():
    """One process: the statistics of each view are those of F.batch_norm over that view's images."""
    torch.manual_seed(0)
    bn = train_tok.BatchNormSync(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    x = torch.randn(3 * 4, 5, 7) * 3 + 1                         # 3 views of 4 images
    ref = torch.cat([F.batch_norm(v, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
                     for v in x.chunk(3)])
    assert torch.allclose(bn(x, 3), ref, atol=1e-5)


BN_WORKER = r'''
import sys, torch, torch.distributed as dist
repo, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, repo)
import tokenizer, train_tok
dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
world = dist.get_world_size()
torch.manual_seed(0)                                   # same heads and the same global batch everywhere
disc = train_tok.DinoDiscriminator(tokenizer.VisionTransformer(224, 16, 8, 1, 2, layerscale=False))
disc.heads.eval()                                      # spectral norm: no power iteration, fixed sigma
V, B, C, N = 2, 3, 8, 10
full = [torch.randn(V, world * B, C, N) * 2 + 0.5 for _ in range(5)]
w = torch.randn(V, world * B, 5 * N)
mine = slice(rank * B, (rank + 1) * B)
feats = [f[:, mine].reshape(V * B, C, N).requires_grad_() for f in full]
logits = disc.heads_logits(feats, V)
(logits * w[:, mine].reshape(V * B, -1)).sum().backward()
torch.save({"logits": logits.detach(), "feat_grads": [f.grad for f in feats],
            "param_grads": [p.grad for p in disc.heads.parameters()]}, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
'''


def test_heads_batchnorm_statistics_over_the_global_batch_two_processes(tmp_path):
    """Official norm_type='sbn': BatchNorm statistics over every rank's images of a view. Two gloo
    processes with 3 images per view each give the logits and gradients of one process holding
    all 6 (each rank's input receives the gradient of both ranks' losses through the statistics)."""
    script = tmp_path / "worker.py"
    script.write_text(BN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), REPO, str(tmp_path), str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    disc = train_tok.DinoDiscriminator(tokenizer.VisionTransformer(224, 16, 8, 1, 2, layerscale=False))
    disc.heads.eval()
    V, B, C, N = 2, 3, 8, 10
    full = [(torch.randn(V, 2 * B, C, N) * 2 + 0.5).requires_grad_() for _ in range(5)]
    w = torch.randn(V, 2 * B, 5 * N)
    logits = disc.heads_logits([f.reshape(V * 2 * B, C, N) for f in full], V).view(V, 2 * B, -1)
    (logits * w).sum().backward()
    for r, out in enumerate(ranks):
        mine = slice(r * B, (r + 1) * B)
        assert torch.allclose(out["logits"].view(V, B, -1), logits[:, mine].detach(), atol=1e-5)
        for got, f in zip(out["feat_grads"], full):
            assert torch.allclose(got.view(V, B, C, N), f.grad[:, mine], atol=1e-5)
    for p, g0, g1 in zip(disc.heads.parameters(), ranks[0]["param_grads"], ranks[1]["param_grads"]):
        assert torch.allclose(g0 + g1, p.grad, atol=1e-4)          # DDP then averages over ranks


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    """VQGAN / official calculate_adaptive_weight on a toy decoder: ||dL_rec/dw|| / (||dL_adv/dw||
    + 1e-4) at the last layer w only, clamped to [0, 1e4], detached."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
    h = torch.tanh(first(torch.randn(5, 4)))
    x = last(h)
    rec, adv = (x - 1).pow(2).mean(), -0.01 * x.sum()
    lam = train_tok.adaptive_weight(rec, adv, last.weight)
    # by hand: x = h w^T + b, so dL/dw = (dL/dx)^T h
    g_rec = (2 * (x - 1) / x.numel()).T @ h
    g_adv = -0.01 * torch.ones_like(x).T @ h
    assert not lam.requires_grad and lam.dim() == 0
    assert torch.allclose(lam, g_rec.norm() / (g_adv.norm() + 1e-4))
    assert abs(lam.item() - 1.0) > 0.1
    assert train_tok.adaptive_weight(rec * 0, adv, last.weight) == 0
    assert train_tok.adaptive_weight(last.weight.sum() * 1e9, last.weight.sum() * 0, last.weight) == 1e4
    (rec + lam * adv).backward()                        # the graph survives (retain_graph)
    assert first.weight.grad is not None


# ---- run folders, resume changes, damaged checkpoints, the NaN stop, flags (in this process) ----
# the tiny preset without pretrained files (recon + quantizer terms: fast), batch 2
BARE = ["--preset", "tiny", "--batch", "2", "--log-every", "1", "--num-workers", "0"]


def tok_cli(out_dir, *argv):
    run_script("train_tok.py", *BARE, "--out-dir", out_dir, *argv)


def steps_logged(folder):
    return [r["step"] for r in read_log(folder / "log.jsonl")]


@pytest.fixture
def bare_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))        # no pretrained files here
    return tmp_path


def test_run_folder_is_never_replaced_silently(bare_home, capsys):
    tmp_path = bare_home
    tok_cli(tmp_path, "--name", "a", "--iters", 4, "--ckpt-every", 2)
    first = (tmp_path / "a" / "ckpt.pt").read_bytes()
    assert training.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["kind"] == "tokenizer"
    assert training.load_checkpoint(str(tmp_path / "a" / "ckpt-prev.pt"))["step"] == 2   # kept
    # the same command again: refused in one line, the finished run untouched
    message = user_error("train_tok.py", *BARE, "--out-dir", tmp_path, "--name", "a", "--iters", 4)
    assert "already holds a tokenizer run (ckpt.pt)" in message and "--resume" in message and "--overwrite" in message
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == first and steps_logged(tmp_path / "a") == [1, 2, 3, 4]
    # a renamed run folder resumes, with a longer schedule and a lower lr (said in one line); the
    # log drops the lines written after the checkpoint (one cut short by a kill too), and the temp
    # file of a killed checkpoint write is removed
    b = tmp_path / "b"
    os.rename(tmp_path / "a", b)
    with open(b / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "recon": 1.0}) + "\n" + '{"step": 6, "rec')
    (b / "ckpt.pt.tmp4242").write_bytes(first[:1000])
    capsys.readouterr()
    tok_cli(tmp_path, "--name", "b", "--iters", 6, "--resume", "--lr", 0.008)
    assert f"--resume with changed settings: iters 4 -> 6, lr {train_tok.TINY_DEFAULTS['lr']} -> 0.008" in capsys.readouterr().out
    assert steps_logged(b) == [1, 2, 3, 4, 5, 6] and not (b / "ckpt.pt.tmp4242").exists()
    ckpt = training.load_checkpoint(str(b / "ckpt.pt"))
    assert ckpt["step"] == 6 and ckpt["train_config"]["lr"] == 0.008 and "name" not in ckpt["train_config"]
    # what defines the model, the seed and the batch may not change
    message = user_error("train_tok.py", *BARE, "--out-dir", tmp_path, "--name", "b", "--iters", 6, "--resume",
                         "--lr", 0.008, "--seed", 1, "--ema", 0.9)
    assert "seed" in message and "ema" in message and "lr" not in message.split("fields:")[1]
    # --overwrite starts again: the run's own files are replaced, nothing else is touched
    (b / "notes.txt").write_text("mine")
    tok_cli(tmp_path, "--name", "b", "--iters", 2, "--overwrite")
    assert steps_logged(b) == [1, 2] and not (b / "ckpt-prev.pt").exists()
    assert sorted(p.name for p in b.glob("recon_*.png")) == ["recon_0000002.png"]
    assert (b / "notes.txt").read_text() == "mine"


def test_damaged_checkpoint_falls_back_to_the_previous_one(bare_home, capsys):
    tmp_path = bare_home
    tok_cli(tmp_path, "--name", "straight", "--iters", 4, "--ckpt-every", 2)
    tok_cli(tmp_path, "--name", "damaged", "--iters", 4, "--ckpt-every", 2)
    path = tmp_path / "damaged" / "ckpt.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                           # one flipped bit in the weights
    path.write_bytes(bytes(raw))
    with pytest.raises(training.UserError, match="corrupt") as err:       # loading names the fallback
        training.load_tokenizer(str(path), flag="--ckpt")
    assert str(path) in str(err.value) and f"--ckpt {tmp_path / 'damaged' / 'ckpt-prev.pt'}" in str(err.value)
    capsys.readouterr()
    tok_cli(tmp_path, "--name", "damaged", "--iters", 4, "--ckpt-every", 2, "--resume")
    out = capsys.readouterr().out
    assert "is corrupt" in out and "resuming from the previous checkpoint" in out and "(step 2)" in out
    a, b = (training.load_checkpoint(str(tmp_path / n / "ckpt.pt")) for n in ("straight", "damaged"))
    assert b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert steps_logged(tmp_path / "damaged") == [1, 2, 3, 4]


def test_nan_stop_keeps_the_checkpoint_before_and_resume_may_lower_the_lr(bare_home, capsys):
    """lr 1e30 blows the weights up after step 4; steps 5-24 are NaN and skipped, and the 20th in a
    row stops the run. Checkpoints due at steps 5, 10, 15, 20 wait for a good step, so the last one
    is still step 3's, and --resume --lr (as the message advises) continues from there."""
    tmp_path = bare_home
    common = ["--name", "n", "--iters", 30, "--warmup", 0]
    tok_cli(tmp_path, *common, "--stop-at", 3)
    message = user_error("train_tok.py", *BARE, "--out-dir", tmp_path, *common, "--resume", "--lr", 1e30,
                         "--ckpt-every", 5)
    assert "20 steps in a row had a NaN/inf loss" in message and "then --resume" in message
    ckpt = training.load_checkpoint(str(tmp_path / "n" / "ckpt.pt"))
    assert ckpt["step"] == 3 and ckpt["nan_guard"]["skipped"] == 0
    capsys.readouterr()
    tok_cli(tmp_path, *common, "--resume", "--lr", 0.001)
    assert f"--resume with changed settings: lr {train_tok.TINY_DEFAULTS['lr']} -> 0.001" in capsys.readouterr().out
    logs = read_log(tmp_path / "n" / "log.jsonl")
    assert [r["step"] for r in logs] == list(range(1, 31))              # the NaN steps' lines dropped
    assert all(r["nan_skipped"] == 0 and r["loss"] == r["loss"] for r in logs)


@pytest.mark.parametrize("flag, value, rule", [
    ("--batch", 0, "--global-batch must be > 0"), ("--ckpt-every", 0, "--ckpt-every must be > 0"),
    ("--log-every", 0, "--log-every must be > 0"), ("--lr", 0, "--lr must be > 0"),
    ("--ema", 1.5, "--ema must be in [0, 1)"), ("--iters", 0, "--iters must be > 0"),
    ("--iters", -5, "--iters must be > 0"), ("--micro-batch", 0, "--micro-batch must be > 0"),
    ("--warmup", -1, "--warmup must be >= 0"), ("--beta2", 1.0, "--beta2 must be in [0, 1)"),
    ("--disc-weight", -0.1, "--disc-weight must be >= 0"), ("--stop-at", 0, "--stop-at must be > 0")])
def test_numeric_flags_are_refused_out_of_range(tmp_path, flag, value, rule):
    assert rule in user_error("train_tok.py", "--preset", "tiny", "--out-dir", tmp_path, flag, value)
    assert not os.listdir(tmp_path)                                     # nothing started


def test_bad_flag_values_of_the_model_are_one_line(tmp_path):
    assert "--image-size 30" in user_error("train_tok.py", "--preset", "tiny", "--image-size", 30,
                                           "--out-dir", tmp_path, "--iters", 1)
    assert "nothing to resume" in user_error("train_tok.py", "--preset", "tiny", "--out-dir", tmp_path, "--resume")


# ---- the objective, step by step: train_tok.setup with the tiny stand-ins, world size 1 ----
# Distinct weights (lambda_1 = 0.7, lambda_2 = 0.3, lambda_3 = 0.11) so that a mix-up shows; no
# gradient clipping, so the gradients left on the parameters are those of the loss.
STEP = ["--preset", "tiny", "--batch", "4", "--fake-pretrained", "--grad-clip", "0", "--lpips-weight", "0.7",
        "--disc-weight", "0.3", "--align-weight", "0.11", "--lpips-warmup", "4", "--disc-start", "0"]


def trainer(*flags):
    """train_tok.setup for `python train_tok.py STEP flags` (later flags win); same seed, same weights."""
    args = train_tok.resolve(script_args("train_tok.py", *STEP, *flags))
    return train_tok.setup(args, 1, torch.device("cpu"))


def images(n=4):
    ds = data.make_dataset("builtin", 32, train=False)
    return torch.stack([ds[i][0] for i in range(n)])


def snapshot(named):
    return {k: v.detach().clone() for k, v in named}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_gradients_are(module, grads):
    """The .grad left on module's parameters equals `grads` (None: no gradient), to rounding
    relative to the largest gradient (a bias before a BatchNorm has a true gradient of 0)."""
    scale = max(g.abs().max().item() for g in grads if g is not None)
    assert scale > 0
    for (name, p), g in zip(module.named_parameters(), grads):
        if g is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_generator_loss_is_eq7_term_by_term():
    """Eq. 7, L = L_recon + l1 LPIPS + l2 L_adv + l3 L_align + L_kl, recomputed by hand on an identical
    trainer: each term, its weight (l1 warmed up as l1 (step + 1) / warm-up), the hinge generator
    term's sign (-mean D(DiffAug(x_rec))), and the gradient that reached the trained parameters."""
    t, ref = trainer(), trainer()
    x, step = images(), 1
    torch.manual_seed(7)
    logs, _ = t.generator_step(x, step)
    torch.manual_seed(7)                                     # the same DiffAugment draws below
    x_rec, z_q, q_losses, _ = ref.tok(x)
    recon = ((x_rec - x) ** 2).mean()
    lpips = ref.lpips(x_rec, x)
    target = ref.teacher(x)                                  # (B, N, C) patch tokens
    repeated = ref.projector(z_q).repeat_interleave(target.shape[1] // z_q.shape[1], dim=1)
    align = -F.cosine_similarity(repeated, target, dim=-1).mean()              # Eq. 5-6
    adv = -ref.disc(train_tok.diff_augment(x_rec, *train_tok.ADV_AUG)).mean()
    lpips_w = 0.7 * (step + 1) / 4
    assert set(q_losses) == {"entropy"}                      # SoftVQ's own, already weighted term
    total = recon + lpips_w * lpips + 0.3 * adv + 0.11 * align + q_losses["entropy"]
    for name, hand in (("recon", recon), ("lpips", lpips), ("align", align), ("adv", adv),
                       ("entropy", q_losses["entropy"]), ("loss", total)):
        torch.testing.assert_close(logs[name], hand.detach(), rtol=1e-5, atol=1e-7, msg=name)
    assert logs["lpips_w"].item() == pytest.approx(lpips_w)
    assert all(abs(v.item()) > 1e-3 for v in (recon, lpips, align, adv, q_losses["entropy"]))
    # the backpropagated loss is this total: its gradient is what the step left on the parameters
    assert all(p.requires_grad for p in ref.gen.parameters())
    assert_gradients_are(t.gen, torch.autograd.grad(total, list(ref.gen.parameters()), allow_unused=True))


def test_lpips_warmup_and_discriminator_start():
    """LPIPS weight l1 (step + 1) / warm-up until full (App. C.1: linear warm-up); the adversarial
    term, the discriminator update and its LeCAM EMA only from --disc-start on."""
    t = trainer("--lpips-warmup", "4", "--disc-start", "3")
    x = images()
    for step, fraction in ((0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (7, 1.0)):
        heads = snapshot(t.disc.heads.named_parameters())
        logs, recs = t.generator_step(x, step)
        assert logs["lpips_w"].item() == pytest.approx(0.7 * fraction)
        assert ("adv" in logs) == (step >= 3)
        d_logs = t.discriminator_step(x, recs, step)
        assert ("d_loss" in d_logs) == (step >= 3)
        assert same(heads, snapshot(t.disc.heads.named_parameters())) == (step < 3)
        assert (t.lecam_ema.abs().sum() > 0) == (step >= 3)


def test_each_step_updates_only_its_own_networks():
    """The generator step moves the tokenizer, projector and EMA, not the discriminator heads; the
    discriminator step moves the heads only; the frozen DINO, DINOv2 and VGG never move."""
    t = trainer()
    x = images()
    frozen = snapshot([*t.disc.dino.named_parameters(), *t.teacher.named_parameters(),
                       *t.lpips.named_parameters()])
    gen0, heads0, ema0 = snapshot(t.gen.named_parameters()), snapshot(t.disc.heads.named_parameters()), \
        snapshot(t.ema.state_dict().items())
    _, recs = t.generator_step(x, 0)
    gen1, heads1, ema1 = snapshot(t.gen.named_parameters()), snapshot(t.disc.heads.named_parameters()), \
        snapshot(t.ema.state_dict().items())
    assert not same(gen0, gen1) and not same(ema0, ema1) and same(heads0, heads1)
    t.discriminator_step(x, recs, 0)
    assert same(gen1, snapshot(t.gen.named_parameters())) and same(ema1, snapshot(t.ema.state_dict().items()))
    assert not same(heads1, snapshot(t.disc.heads.named_parameters()))
    assert same(frozen, snapshot([*t.disc.dino.named_parameters(), *t.teacher.named_parameters(),
                                  *t.lpips.named_parameters()]))


def test_discriminator_loss_by_hand():
    """Discriminator step (official vq_loss.py): l2 (hinge + w_lecam LeCAM) + w_cr CR with
    hinge = (mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2, LeCAM = mean relu(D(real) -
    ema_fake)^2 + mean relu(ema_real - D(fake))^2 with the EMAs (decay 0.999, from 0) updated by
    this batch first, CR = MSE between the logits of the weakly and strongly augmented views;
    recomputed on an identical discriminator, with the gradient that reached the heads."""
    flags = ("--lecam-weight", "0.05", "--cr-weight", "3.0")
    t, ref = trainer(*flags), trainer(*flags)
    x = images()
    _, recs = t.generator_step(x, 0)
    ref.disc.heads.load_state_dict(t.disc.heads.state_dict())  # with spectral norm's power-iteration state
    torch.manual_seed(3)
    logs = t.discriminator_step(x, recs, 0)
    torch.manual_seed(3)
    aug = train_tok.diff_augment
    views = [aug(x, *train_tok.ADV_AUG), aug(recs[0], *train_tok.ADV_AUG), aug(x, *train_tok.CR_AUG),
             aug(recs[0], *train_tok.CR_AUG)]
    real, fake, real_cr, fake_cr = ref.disc.heads_logits(ref.disc.features(views), 4).chunk(4)
    hinge = 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    ema_real, ema_fake = 0.001 * real.mean(), 0.001 * fake.mean()
    lecam = (real - ema_fake).clamp(min=0).pow(2).mean() + (ema_real - fake).clamp(min=0).pow(2).mean()
    cr = ((torch.cat([real, fake]) - torch.cat([real_cr, fake_cr])) ** 2).mean()
    d_loss = 0.3 * (hinge + 0.05 * lecam) + 3.0 * cr
    for name, hand in (("d_hinge", hinge), ("d_lecam", lecam), ("d_cr", cr), ("d_loss", d_loss)):
        torch.testing.assert_close(logs[name], hand.detach(), rtol=1e-5, atol=1e-7, msg=name)
    assert all(v.item() > 1e-4 for v in (hinge, lecam, cr))
    torch.testing.assert_close(t.lecam_ema, torch.stack([ema_real, ema_fake]).detach())
    assert_gradients_are(t.disc.heads, torch.autograd.grad(d_loss, list(ref.disc.heads.parameters())))


def test_a_nan_step_moves_neither_weights_nor_ema():
    """After a good step (EMA != weights), a batch with a NaN is skipped by both steps: weights,
    EMA, optimiser moments, heads and LeCAM EMA stay as they were; the skips are counted."""
    t = trainer()
    x = images()
    _, recs = t.generator_step(x, 0)
    t.discriminator_step(x, recs, 0)
    assert not same(snapshot(t.tok.state_dict().items()), snapshot(t.ema.state_dict().items()))

    def state():
        return [snapshot(t.gen.named_parameters()), snapshot(t.ema.state_dict().items()),
                snapshot(t.disc.heads.named_parameters()), t.lecam_ema.clone(),
                [v.clone() for s in t.opt.state.values() for v in s.values()],
                [v.clone() for s in t.opt_d.state.values() for v in s.values()]]

    before = state()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    logs, recs = t.generator_step(bad, 1)
    d_logs = t.discriminator_step(bad, recs, 1)
    assert not torch.isfinite(logs["loss"]) and not torch.isfinite(d_logs["d_loss"])
    assert (t.guard.skipped, t.guard_d.skipped) == (1, 1)
    after = state()
    assert all(same(a, b) for a, b in zip(before[:3], after[:3]))
    assert torch.equal(before[3], after[3])
    assert all(torch.equal(a, b) for a, b in zip(before[4] + before[5], after[4] + after[5]))


# Equivalence runs: the adversarial term off and VQ instead of SoftVQ. Those carry batch statistics
# by design (README): the entropy term's batch average and the discriminator heads' BatchNorm are
# taken over each micro-batch (each rank's batch), and DiffAugment draws per call; so does the
# dropout of LPIPS's heads in training mode (official), hence LPIPS off too. Everything else is a
# mean over images, so accumulation and data parallelism must give the same update.
EQUIVALENT = ("--disc-weight", "0", "--lpips-weight", "0", "--quantizer", "vq", "--grad-clip", "1.0",
              "--lr", "1.0", "--warmup", "1")
LOSS_TERMS = ("loss", "recon", "align", "codebook", "commit", "grad_norm")


def test_micro_batches_give_the_same_update():
    """--micro-batch 1 at batch 4 (4 accumulated gradients) = the whole batch at once: the same
    losses and gradient norm (Adam's update would hide a wrong gradient scale, the norm does not)
    gradients to fp32 rounding, and weights after one step within 1e-5 (but for a rare few whose
    gradient is at rounding level), where Adam's first update is ~lr = 0.016 along sign(g), so a
    wrong gradient moves weights by ~0.016."""
    whole, micro = trainer(*EQUIVALENT), trainer(*EQUIVALENT, "--micro-batch", "1")
    assert (whole.micro, micro.micro) == (4, 1)
    x = images()
    init = snapshot(whole.gen.named_parameters())
    a, _ = whole.generator_step(x, 0)
    b, _ = micro.generator_step(x, 0)
    for k in LOSS_TERMS:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    moved = max((p.detach() - init[n]).abs().max().item() for n, p in whole.gen.named_parameters())
    assert moved > 0.01
    for (n, p), q in zip(whole.gen.named_parameters(), micro.gen.parameters()):
        # the gradients themselves (still in .grad after the step), to fp32 rounding
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6 * scale, msg=n)
        assert_same_first_step(p, q, n)


def assert_same_first_step(p, q, name):
    """Weights after Adam's first step, lr * g / (|g| + eps): equal to 1e-5 except where a gradient
    is at rounding level, whose sign (and so a step of ~lr) rounding may flip; those are rare. The
    key bias (the middle third of qkv.bias) is left out: softmax ignores a shift shared by all of a
    query's logits, so its gradient is zero but for rounding (and the routing init of the tiny
    preset starts it, like the rest of the attention, from exact zeros and identities)."""
    differ = (p.detach() - q.detach()).abs() > 1e-5
    if name.endswith("attn.qkv.bias"):
        width = differ.shape[0] // 3
        differ = torch.cat([differ[:width], differ[2 * width:]])
    off = differ.double().mean().item()
    assert off < 1e-3, f"{name}: {off:.2%} of the weights differ by more than 1e-5"


def test_two_ranks_give_the_same_update_as_one(tmp_path):
    """2 gloo ranks x 2 images (each as 2 micro-batches: DDP's no_sync path) = 1 rank x 4 images,
    the same 4 (the sampler deals one global order): same logged losses and gradient norm, Adam
    moments (the gradients) equal to fp32 rounding, and weights and EMA after one step within 1e-5
    (but for a rare few whose gradient is at rounding level; the update is ~0.016)."""
    flags = ["--preset", "tiny", "--batch", "4", "--iters", "1", "--fake-pretrained", "--log-every", "1",
             "--device", "cpu", *EQUIVALENT]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    two = start(flags + ["--name", "two", "--micro-batch", "1"], tmp_path, launcher=launcher)
    run_script("train_tok.py", *flags, "--name", "one", "--out-dir", tmp_path)
    _, out, _ = finish(two)
    assert "all 2 ranks hold identical weights" in out
    one_log, two_log = (read_log(tmp_path / n / "log.jsonl")[0] for n in ("one", "two"))
    for k in LOSS_TERMS:
        assert two_log[k] == pytest.approx(one_log[k], rel=1e-5, abs=1e-7), k
    one, two = (training.load_checkpoint(str(tmp_path / n / "ckpt.pt")) for n in ("one", "two"))
    for key in ("model", "ema", "projector"):
        for k, v in one[key].items():
            if v.is_floating_point():
                assert_same_first_step(two[key][k], v, f"{key}.{k}")
            else:
                assert torch.equal(two[key][k], v), f"{key}.{k}"
    for i, moments in one["opt"]["state"].items():          # 0.1 g and 0.05 g^2: the gradients
        for name in ("exp_avg", "exp_avg_sq"):
            scale = moments[name].abs().max().item()
            torch.testing.assert_close(two["opt"]["state"][i][name], moments[name], rtol=1e-4, atol=1e-5 * scale)


def test_tiny_tokenizer_learns_more_than_the_mean_image(tmp_path):
    """The tiny preset (patch 8, L = 16, routing init, LayerScale 1.0, lr 3e-3 at batch 16) trained
    for 400 steps (6,400 images, about 40 s on 2 CPU cores) reconstructs held-out built-in images
    at least 6 dB better than their mean training image does. With the official random init
    (`routing_init=False`) the same run stays within about 2 dB of the mean image (README: why the
    tiny tokenizer stalled), so this fails if the routing init is lost or broken."""
    import evaluate
    run_script("train_tok.py", "--preset", "tiny", "--tokens", 16, "--token-dim", 32, "--iters", 400,
               "--out-dir", tmp_path, "--log-every", 100)
    model = training.load_tokenizer(str(tmp_path / "tiny-16" / "ckpt.pt")).eval()
    train = data.SyntheticShapes(2000, 32, seed=0, train=False)
    held = data.SyntheticShapes(500, 32, seed=evaluate.BUILTIN_VAL_SEED, train=False)
    x = torch.stack([held[i][0] for i in range(len(held))])
    mean = torch.stack([train[i][0] for i in range(len(train))]).mean(0, keepdim=True)
    with torch.no_grad():
        rec = torch.cat([model(b)[0] for b in x.split(100)])
    to8 = training.to_uint8
    psnr_rec = evaluate.psnr(to8(x), to8(rec)).mean().item()
    psnr_mean = evaluate.psnr(to8(x), to8(mean.expand_as(x))).mean().item()
    assert psnr_rec >= psnr_mean + 6.0, (psnr_rec, psnr_mean)


def test_quantizer_flags_reach_the_model_and_bad_values_are_refused(tmp_path):
    """--codebook-size / --num-codebooks / --residual-depth / --tau (the Table 5 ablations) end up
    in the checkpoint's config and in the trained quantizer; a flag left out keeps the preset's
    value; a bad value is one line naming the flag."""
    common = ["--preset", "tiny", "--tokens", 8, "--token-dim", 8, "--batch", 2, "--iters", 1,
              "--out-dir", tmp_path, "--log-every", 1]
    run_script("train_tok.py", *common, "--name", "rpq", "--codebook-size", 32, "--num-codebooks", 2,
               "--residual-depth", 3, "--tau", "learnable")
    cfg = training.load_checkpoint(str(tmp_path / "rpq" / "ckpt.pt"))["config"]
    assert (cfg["codebook_size"], cfg["num_codebooks"], cfg["residual_depth"], cfg["tau"]) == (32, 2, 3, "learnable")
    q = training.load_tokenizer(str(tmp_path / "rpq" / "ckpt.pt")).quantize
    assert q.residual_depth == 3 and isinstance(q.log_tau, torch.nn.Parameter)
    assert q.embedding.shape == (2, 32, 8)
    run_script("train_tok.py", *common, "--name", "fixed", "--tau", "0.001")
    cfg = training.load_checkpoint(str(tmp_path / "fixed" / "ckpt.pt"))["config"]
    assert cfg["tau"] == 0.001 and (cfg["codebook_size"], cfg["num_codebooks"], cfg["residual_depth"]) == (
        tokenizer.PRESETS["tiny"].codebook_size, tokenizer.PRESETS["tiny"].num_codebooks, 1)
    assert "--tau must be a number > 0" in user_error("train_tok.py", *common, "--tau", "hot")
    assert "--tau must be a number > 0" in user_error("train_tok.py", *common, "--tau", 0)
    assert "--codebook-size must be > 0" in user_error("train_tok.py", *common, "--codebook-size", 0)
    assert "--num-codebooks 3" in user_error("train_tok.py", *common, "--num-codebooks", 3)   # 3 does not divide L = 8
    # --entropy-weight (lambda_4): 0 turns the entropy term off, in the config and in the log
    assert cfg["entropy_weight"] == tokenizer.TokenizerConfig.entropy_weight
    assert "entropy" in json.loads(open(tmp_path / "fixed" / "log.jsonl").readline())
    run_script("train_tok.py", *common, "--name", "noent", "--entropy-weight", 0)
    assert training.load_checkpoint(str(tmp_path / "noent" / "ckpt.pt"))["config"]["entropy_weight"] == 0
    assert "entropy" not in json.loads(open(tmp_path / "noent" / "log.jsonl").readline())
    assert "--entropy-weight must be >= 0" in user_error("train_tok.py", *common, "--entropy-weight", -1)
