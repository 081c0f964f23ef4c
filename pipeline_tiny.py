"""The whole tiny pipeline on the built-in data set, on a CPU, no downloads (the README's main command).

  python pipeline_tiny.py                 # about 2 min on an idle 2-core CPU (see the README)
  python pipeline_tiny.py --help          # the budgets below, to shrink it (the test suite does)

A driver, not a stage: it runs the stages' own command lines one after the other, each printed
before it runs so that any of them can be repeated by hand:
  judge       evaluate.py judge-train: a small classifier, the offline judge of generated images
  tokenizer   train_tok.py --preset tiny (L2 + the quantizer's entropy term; LPIPS, the DINO
              discriminator and the alignment need weight files and are off)
  cache       train_gen.py --cache-latents: the tokenizer's latents of the training images
  generator   train_gen.py: SiT-tiny on the cached latents
  samples     sample.py: class-conditional samples with CFG and without, and decoded random latents
  recon       evaluate.py recon: reconstructions of held-out images (PSNR, SSIM, a grid)
  judging     evaluate.py judge: every image set against the same held-out reference
and ends with one table (<runs>/eval-tiny/table.txt), the sample grid <runs>/samples-tiny/grid.png
(one row per class) and <runs>/eval-tiny/recon-grid.png. Every image-set row of the table holds
the same number of images, judged against the same held-out reference.

The stages run in this process (training.run_script, as `python <stage> ...` would run them): on
the 2-core CPU every new interpreter costs 3-6 s of importing torch and its compiler, a sixth of
the budget over nine stages. Every run retrains into the same folders (--overwrite: the stages
refuse to replace a checkpoint or a latent cache without it).
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import time

import torch

import data
import evaluate
import training

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default="runs", help="folder of every run of the pipeline")
    p.add_argument("--num-images", type=int, default=1000,
                   help="images of every row of the table (and of the held-out reference)")
    p.add_argument("--judge-images", type=int, default=3000, help="built-in images the judge trains on")
    p.add_argument("--judge-epochs", type=int, default=2)
    p.add_argument("--tok-iters", type=int, default=None, help="tokenizer steps (default: the tiny preset's)")
    p.add_argument("--gen-images", type=int, default=5000, help="built-in images whose latents are cached")
    p.add_argument("--gen-steps", type=int, default=None, help="generator steps (default: the tiny preset's)")
    p.add_argument("--sample-steps", type=int, default=25, help="SiT sampler steps")
    args = p.parse_args(argv)
    training.check_flags(args, {k: "> 0" for k in ("num_images", "judge_images", "judge_epochs", "tok_iters",
                                                   "gen_images", "gen_steps", "sample_steps")})
    return args


def optional(flag, value):
    """[flag, value] when the value is set, else nothing."""
    return [] if value is None else [flag, value]


def mean_image_psnr(held_out_npz):
    """PSNR of the mean training image on the held-out images: what a tokenizer that has learnt
    nothing but the average scores (the floor that issue 10's tokenizer had stalled at)."""
    train = data.make_dataset("builtin", 32, train=False, seed=0, builtin_size=2000)
    mean = training.to_uint8(torch.stack([train[i][0] for i in range(len(train))]).mean(0, keepdim=True))
    held = torch.from_numpy(data.load_images_npz(held_out_npz)).permute(0, 3, 1, 2)
    return evaluate.psnr(held, mean.expand_as(held)).mean().item()


def write_reference(path, n):
    """n held-out built-in images that no other row holds: the reference every row is judged against."""
    ref = data.make_dataset("builtin", 32, train=False, seed=data.BUILTIN_REF_SEED, builtin_size=n)
    images = torch.stack([ref[i][0] for i in range(n)])
    data.save_images_npz(path, training.to_uint8(images).permute(0, 2, 3, 1).numpy())


def table(runs, timings):
    """The pipeline's table: one row per image set, then the tokenizer's numbers and the times."""
    load = lambda name: json.load(open(os.path.join(runs, "eval-tiny", name)))
    recon, judge, trained = load("recon.json"), load("judge.json"), load("judge-train.json")
    mean_psnr = load("mean-image.json")["mean_image_psnr"]
    lines = [f"{'image set':<40} {'images':>6} {judge['metric']:>25} {'class accuracy (%)':>19}"]
    for name, row in judge["sets"].items():
        acc = f"{row['class_accuracy']:.1f}" if "class_accuracy" in row else "-"
        lines.append(f"{name:<40} {row['num_images']:>6} {row['fd']:>25.2f} {acc:>19}")
    rows = [("tokenizer PSNR (dB) / SSIM", f"{recon['psnr']:.2f} / {recon['ssim']:.4f}"),
            ("mean training image PSNR (dB)", f"{mean_psnr:.2f} (tokenizer: {recon['psnr'] - mean_psnr:+.1f} dB)"),
            ("tokenizer codebook usage", f"{recon['codebook_usage']:.3f}" if "codebook_usage" in recon else "-"),
            ("judge accuracy on real held-out images (%)", f"{trained['held_out_accuracy']:.1f}")]
    rows += [(f"time: {name} (s)", f"{sec:.1f}") for name, sec in timings]
    rows.append(("time: total (s)", f"{sum(sec for _, sec in timings):.1f}"))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"grids: {os.path.join(runs, 'samples-tiny', 'grid.png')} (a row per class), "
                 f"{os.path.join(runs, 'eval-tiny', 'recon-grid.png')} (inputs over reconstructions)")
    return "\n".join(lines)


def main(args):
    runs, n = args.runs, args.num_images
    tok = os.path.join(runs, "tiny-16", "ckpt.pt")        # train_tok.py --preset tiny writes <out-dir>/tiny-<tokens>/
    gen = os.path.join(runs, "gen-tiny", "ckpt.pt")
    ev = os.path.join(runs, "eval-tiny")
    os.makedirs(ev, exist_ok=True)
    timings = []                                          # (stage, seconds): the table's time rows

    def stage(name, script, *argv):
        argv = [str(a) for a in argv]
        print(f"== {name}: python {shlex.join([script, *argv])}", flush=True)
        start = time.perf_counter()
        training.run_script(os.path.join(ROOT, script), argv)
        timings.append((name, time.perf_counter() - start))

    start = time.perf_counter()
    stage("judge", "evaluate.py", "judge-train", "--data-path", "builtin", "--builtin-size", args.judge_images,
          "--epochs", args.judge_epochs, "--val-images", n, "--out", os.path.join(runs, "judge-tiny.pt"),
          "--json", os.path.join(ev, "judge-train.json"))
    stage("tokenizer", "train_tok.py", "--preset", "tiny", "--tokens", 16, "--token-dim", 48, "--out-dir", runs,
          "--overwrite", *optional("--iters", args.tok_iters))
    stage("cache", "train_gen.py", "--preset", "tiny", "--cache-latents", "--tokenizer", tok,
          "--cache-dir", os.path.join(runs, "latents-tiny"), "--builtin-size", args.gen_images, "--overwrite")
    stage("generator", "train_gen.py", "--preset", "tiny", "--cache-dir", os.path.join(runs, "latents-tiny"),
          "--out", os.path.join(runs, "gen-tiny"), "--overwrite", *optional("--steps", args.gen_steps))
    # sample.py resumes into an existing folder: start clean so no samples of an earlier generator are kept
    folders = {name: os.path.join(runs, name) for name in ("samples-tiny", "samples-tiny-nocfg", "random-latents-tiny")}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    sampling = ["--preset", "tiny", "--ckpt", gen, "--num-images", n, "--steps", args.sample_steps]
    stage("samples-cfg", "sample.py", *sampling, "--out", folders["samples-tiny"])
    stage("samples-nocfg", "sample.py", *sampling, "--out", folders["samples-tiny-nocfg"], "--cfg-scale", 1.0)
    stage("random-latents", "sample.py", *sampling, "--out", folders["random-latents-tiny"], "--random-latents")
    stage("recon", "evaluate.py", "recon", "--ckpt", tok, "--data-path", "builtin", "--num-images", n,
          "--num-workers", 0, "--out", os.path.join(ev, "recon.json"), "--save-npz", os.path.join(ev, "held-out"),
          "--grid", os.path.join(ev, "recon-grid.png"), "--grid-images", 10)

    # ---- the table: every set of n images against n other held-out images (the reference) ----
    write_reference(os.path.join(ev, "reference.npz"), n)
    with open(os.path.join(ev, "mean-image.json"), "w") as f:
        json.dump({"mean_image_psnr": mean_image_psnr(os.path.join(ev, "held-out-inputs.npz"))}, f)
    with open(os.path.join(folders["samples-tiny"], "meta.json")) as f:
        cfg = json.load(f)["cfg_scale"]                   # the scale the sampler used (its preset's)
    stage("judging", "evaluate.py", "judge", "--judge", os.path.join(runs, "judge-tiny.pt"),
          "--ref", os.path.join(ev, "reference.npz"), "--out", os.path.join(ev, "judge.json"),
          f"real held-out images (floor)={ev}/held-out-inputs.npz",
          f"tokenizer reconstructions={ev}/held-out-recons.npz",
          f"samples, CFG {cfg}={folders['samples-tiny']}/samples.npz",
          f"samples, no CFG={folders['samples-tiny-nocfg']}/samples.npz",
          f"decoded random latents (ceiling)={folders['random-latents-tiny']}/samples.npz")
    text = table(runs, timings)
    with open(os.path.join(ev, "table.txt"), "w") as f:
        f.write(text + "\n")
    print(f"\n{text}\npipeline wall time {time.perf_counter() - start:.1f} s (the stages' sum is above)")


if __name__ == "__main__":
    training.run_main(lambda: main(parse_args()))
