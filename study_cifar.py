"""The CIFAR-10 study: the paper's tokenizer comparisons (Tables 3, 4, 5 and Fig. 3a) at 32 px on a CPU.

A driver, not a stage. Every number comes from the stages' own command lines (train_tok.py,
evaluate.py, train_gen.py, sample.py), run one after the other in this process (runpy, as
`python <script> ...` would run them, without a new interpreter per call); each is printed before
it runs, so any step can be repeated by hand. The stages stay independent of each other.

Once per study (in <work>/):
  judge/      the offline judge: `evaluate.py judge-train` on CIFAR-10 train (held-out accuracy on test)
  reference.npz  the judge's reference set: test images outside the reconstruction subset
  teacher/    the alignment teacher of Table 4: a small ViT trained here on CIFAR-10 train without
              labels (SimCLR's InfoNCE between two augmentations of each image), saved with
              tokenizer.teacher_checkpoint, and its linear probe against a randomly initialised
              ViT of the same shape. Never the judge, never a supervised network: those would put
              the labels into the latents that the probe then measures.
  teacher-5x/ the same teacher trained five times longer (Table 4's follow-up row)
Per cell (<work>/<cell>/; a cell is one tokenizer configuration):
  tokenizer   train_tok.py on CIFAR-10 train: TOKENIZER_RECIPE + the cell's quantizer, L x D,
              ablation flags, seed, and alignment to the teacher (every cell but the Table 4 "off" one)
  recon       evaluate.py recon on a fixed subset of CIFAR-10 test: PSNR, SSIM, codebook usage
  probe       evaluate.py linear-probe: trained on train-split latents, top-1 on the test split (Fig. 3a)
  generation cells only:
  cache       train_gen.py --cache-latents (train split and flips; deleted once the generator is done)
  generator   train_gen.py: a small SiT (GEN_RECIPE)
  samples     sample.py: class-conditional, no CFG (Table 3 reports SiT-L without CFG)
  judge       evaluate.py judge: "FD (built-in classifier)" of the reconstructions (our rFID) and of
              the samples (our gFID), and the samples' class accuracy
Neither number is Inception FID (no Inception file here); they rank image sets the same way on
this data but are not comparable with the paper's values, which the tables print beside ours.

Cells (CELLS below): Table 3: softvq / vq / ae / kl at L x D = 256 (L = 32, 16, 8; 12x compression
of 32x32x3; D >= 8 since the cosine forms normalise each D-vector), one row at L x D = 64 (8 x 8,
48x), the smallest L again with seed 1, and a follow-up: SoftVQ and AE at 16 x 16 with twice the
tokenizer steps (LONGER_QUANTIZERS). Table 4: SoftVQ 16 x 16 without alignment (the
aligned one is Table 3's cell). Table 5 (reconstruction only; its default cell is Table 3's
SoftVQ 16 x 16, which has G = 4, tau = 0.07 and the preset's K, 1024 for tiny): G = 1, 2; RQ; R-PQ;
GMMVQ; tau = 0.001, 1.0, learnable; K / 4 and 2 K; and, not in the paper, the entropy term off.
Table 4's follow-up: SoftVQ 16 x 16 aligned to teacher-5x.
Every cell has the same budget, seed 0 (but the seed-1 repeats) and data
order.

Kept with the tables (committed, so that they outlive the work folder and its machine): every
finished cell's results as <out>/cells/<cell>.json, and the judge and the teacher with their
configurations in <out>/study/. A new work folder starts from them: the judge and the teacher are
restored, not retrained, and a cell whose results are published counts as done. Each cell records
the SHA-256 of the judge that scored it; one scored by another judge counts as not done.

Resuming: a cell is done when its results.json exists and is then skipped; within a cell every
finished stage is recorded in stages.json and skipped, and a stage killed half-way continues
(train_tok / train_gen --resume, sample.py keeps its finished chunks, the teacher from its own
checkpoint). A folder started with another configuration (recipe, budget) is refused, naming
what differs: delete it to run it again. Tables and plots are rewritten from every finished
cell at the end of each call, so the study can run in pieces.

Run (CIFAR-10 as an ImageFolder: <data>/train/<class>/*.jpg, <data>/test/<class>/*.jpg):
  mkdir -p /tmp/cifar && tar -xzf cifar10-jpg.tar.gz -C /tmp/cifar
  python study_cifar.py --data /tmp/cifar                    # every cell (hours); resumes where it stopped
  python study_cifar.py --data /tmp/cifar --cells 't3-*-16x16' t5-g1   # a subset: names or globs
  python study_cifar.py --list                               # the cells and which are done
  python study_cifar.py --tables-only                        # tables and plots from the finished cells
  python study_cifar.py --data DIR --work W --out O --quick  # every budget cut to seconds (the test)
Outputs: <out>/table{3,4,5}.{md,json}, psnr_vs_L.png, fd_vs_L.png, probe.png, recon_<q>.png and
samples_<q>.png (the cells at L = 8, D = 32). Default <work> runs/study_cifar, <out> docs/study_cifar.
"""

import argparse
import fnmatch
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import tokenizer
import training

ROOT = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE = 32

# =============================================================================================
# THE TOKENIZER RECIPE OF EVERY CELL. Issue 10 (small random tokenizers stall near the mean
# image) changes how they are initialised and trained: adjust it HERE, nowhere else.
# train_tok.py flags; each cell adds --tokens / --token-dim / --quantizer / its ablation flags /
# --seed / the alignment flags. The architecture and init are --preset tiny's
# (tokenizer.PRESETS["tiny"]: patch 8, encoder and decoder width 96, depth 4, 3 heads, K = 1024,
# G = 4, LayerScale 1.0, the routing init); train_tok.py has no flags for patch, width or depth.
# =============================================================================================
TOKENIZER_RECIPE = {
    "--preset": "tiny",
    "--image-size": IMAGE_SIZE,
    "--batch": 16,              # batch, lr and warm-up: --preset tiny's (issue 10's routing-init recipe)
    "--lr": 0.048,              # x batch / 256 in train_tok.py: peak lr 3e-3
    "--warmup": 100,
    "--iters": 2400,            # the budget, sized from one measured cell (README "The CIFAR-10 study")
    "--lpips-weight": 0,        # no VGG16 / DINO files on the CPU machines: LPIPS and the GAN term
    "--disc-weight": 0,         # are off in every cell, so a machine with the files gets the same run
}
QUICK_TOKENIZER = {"--batch": 4, "--iters": 2, "--warmup": 1}    # --quick

# ---- generator and evaluation budget (the same for every cell) ----
# Sized from one measured cell on a slower, shared machine (t3-softvq-16x16, 1 thread): 0.11 s per
# generator step, ~180 s for the rest of a generation cell, ~0.17 s per aligned tokenizer step at
# batch 16; 2400 + 1200 steps: ~720 s a generation cell. Measured over the whole study since (2-core
# AMD EPYC, one thread per process, two or three processes side by side): ~350 CPU-s a generation
# cell (tokenizer ~220, latent cache ~80, generator ~30, the rest ~20), ~240 a reconstruction cell.
# The generator's batch, lr and EMA are train_gen.py --preset tiny's (an EMA of 0.999 would still
# hold 30% of the initial weights after 1200 steps); its steps are the tiny preset's earlier 1200.
GEN_RECIPE = {"--model": "SiT-tiny", "--batch-size": 64, "--lr": 4e-3, "--ema": 0.99, "--steps": 1200}
QUICK_GEN = {"--batch-size": 4, "--steps": 2}
BUDGET = dict(
    eval_images=1000,           # test images reconstructed (PSNR, SSIM, codebook usage, rFD)
    ref_images=2000,            # other test images: the judge's reference set
    probe_train_images=10000,   # linear probe (App. C.3 protocol: BatchNorm + linear, LAMB, cosine
    probe_val_images=2000,      # lr 0.003) on L x D flattened latents (the same 256 features for
    probe_epochs=30,            # every L at L x D = 256; mean pooling would give D of them)
    probe_batch=256,
    samples=1000,               # 100 per class
    sample_steps=25,            # SiT SDE steps
    judge_epochs=4,
    judge_batch=64,
)
QUICK_BUDGET = dict(eval_images=6, ref_images=8, probe_train_images=0, probe_val_images=0, probe_epochs=2,
                    probe_batch=8, samples=6, sample_steps=2, judge_epochs=1, judge_batch=8)

# ---- the self-supervised alignment teacher (Table 4): a small ViT, SimCLR on CIFAR-10 train ----
TEACHER = dict(
    patch=4,                    # N = 64 patch tokens at 32 px: N / L is whole for L = 32, 16, 8
    width=64, depth=4, heads=4,
    proj_hidden=512, proj_dim=128,   # SimCLR projection head (dropped after training)
    temperature=0.2,            # InfoNCE temperature
    crop_scale=(0.2, 1.0),      # random-resized-crop area range, aspect ratio in [3/4, 4/3]
    jitter=0.4, jitter_prob=0.8, grey_prob=0.2,   # colour jitter (brightness, contrast, saturation)
    steps=600, batch=128, lr=1e-3, warmup=60, weight_decay=0.05, ckpt_every=100,
)
# Table 4's follow-up: the same teacher trained five times longer (is 600 steps too weak a teacher
# for alignment to help? README "The CIFAR-10 study")
TEACHER_5X = {**TEACHER, "steps": 5 * TEACHER["steps"], "warmup": 5 * TEACHER["warmup"], "ckpt_every": 500}
TEACHERS = {"teacher": TEACHER, "teacher-5x": TEACHER_5X}     # study folder -> recipe
QUICK_TEACHER = dict(steps=2, batch=4, warmup=1, ckpt_every=1)
ALIGN_FLAGS = ["--teacher", "vit-file", "--teacher-patch", TEACHER["patch"]]   # + --teacher-path
RESIDUAL_DEPTH = 2              # RQ / R-PQ levels (the paper does not say how many)
K_DEFAULT = tokenizer.PRESETS[TOKENIZER_RECIPE["--preset"]].codebook_size   # Table 5's K row: / 4, x 2


# ---- the cells ----
def make_cells():
    """{name: cell}; a cell: table, quantizer, tokens, token_dim, generation, align, seed, flags."""
    cells = {}

    def add(name, table, quantizer, tokens, token_dim, generation, align=True, seed=0, extra=(), iters_scale=1,
            teacher="teacher"):
        cells[name] = dict(name=name, table=table, quantizer=quantizer, tokens=tokens, token_dim=token_dim,
                           generation=generation, align=align, seed=seed, flags=list(extra),
                           iters_scale=iters_scale, teacher=teacher)

    for L, D in ((32, 8), (16, 16), (8, 32), (8, 8)):        # Table 3: L x D = 256, and one row at 64
        for q in T3_QUANTIZERS:
            add(f"t3-{q}-{L}x{D}", 3, q, L, D, generation=True)
    for q in T3_QUANTIZERS:                                  # the smallest L, second seed
        add(f"t3-{q}-8x32-seed1", 3, q, 8, 32, generation=True, seed=1)
    for q in LONGER_QUANTIZERS:                              # Table 3's follow-up: twice the tokenizer steps
        add(f"t3-{q}-16x16-2x", 3, q, 16, 16, generation=True, iters_scale=2)
    add("t4-softvq-16x16-noalign", 4, "softvq", 16, 16, generation=True, align=False)
    add("t4-softvq-16x16-teacher5x", 4, "softvq", 16, 16, generation=True, teacher="teacher-5x")
    for name, quantizer, extra in T5_VARIANTS:
        add(name, 5, quantizer, 16, 16, generation=False, extra=extra)
    return cells


T3_QUANTIZERS = ("softvq", "vq", "ae", "kl")
# The follow-up of Table 3 (README "The CIFAR-10 study"): AE reconstructs and generates better than
# SoftVQ at this budget; do SoftVQ's latents catch up with twice the tokenizer steps? Both get the
# same longer budget (no method is tuned more than the other).
LONGER_QUANTIZERS = ("softvq", "ae")
BASE = "t3-softvq-16x16"        # Table 4's aligned cell and Table 5's default (G = 4, K_DEFAULT, tau 0.07)
T5_VARIANTS = [                 # (cell, quantizer, train_tok flags); all at L = 16, D = 16
    ("t5-g1", "softvq", ["--num-codebooks", 1]),
    ("t5-g2", "softvq", ["--num-codebooks", 2]),
    ("t5-rq", "softvq", ["--num-codebooks", 1, "--residual-depth", RESIDUAL_DEPTH]),
    ("t5-rpq", "softvq", ["--residual-depth", RESIDUAL_DEPTH]),
    ("t5-gmmvq", "gmmvq", []),
    ("t5-tau0.001", "softvq", ["--tau", 0.001]),
    ("t5-tau1.0", "softvq", ["--tau", 1.0]),
    ("t5-taulearn", "softvq", ["--tau", "learnable"]),
    (f"t5-k{K_DEFAULT // 4}", "softvq", ["--codebook-size", K_DEFAULT // 4]),
    (f"t5-k{K_DEFAULT * 2}", "softvq", ["--codebook-size", K_DEFAULT * 2]),
    # not in the paper's Table 5: the entropy term off (lambda_4 = 0), a follow-up of Table 3
    # (does the term's push towards confident, VQ-like assignments cost SoftVQ reconstruction?)
    ("t5-noentropy", "softvq", ["--entropy-weight", 0]),
]
CELLS = make_cells()

# ---- the paper's numbers (ImageNet 256 px; arXiv 2412.10958) ----
# Table 3 (S tokenizers, SiT-L without CFG): (quantizer, tokens) -> (rFID, gFID, IS). No KL-S row.
PAPER_T3 = {("vq", 256): (1.45, 19.02, 58.6), ("vq", 128): (2.61, 18.51, 62.4), ("vq", 64): (4.04, 20.07, 54.5),
            ("vq", 32): (10.97, 21.57, 47.6), ("ae", 256): (1.15, 22.11, 58.3), ("ae", 128): (1.33, 22.31, 58.5),
            ("ae", 64): (1.64, 25.53, 54.3), ("ae", 32): (2.01, 28.18, 45.5),
            ("softvq", 256): (0.80, 9.21, 93.6), ("softvq", 128): (0.92, 10.12, 85.8),
            ("softvq", 64): (1.03, 11.24, 89.4), ("softvq", 32): (1.24, 12.89, 79.5)}
# our L -> the paper's token count at the same ratio to its smallest (8 : 16 : 32 = 32 : 64 : 128)
PAPER_TOKENS = {8: 32, 16: 64, 32: 128}
# Table 4 (SoftVQ-B-64, no encoder init): alignment -> (rFID, linear probe, gFID, IS)
PAPER_T4 = {False: (0.98, 5.42, 20.33, 89.4), True: (0.93, 41.08, 10.96, 101.9)}
# Table 5 rows: (group, variant, cell, paper rFID); our K beside the paper's at the same ratio to the
# default (K_DEFAULT here, 8192 there: 2048 and 16384)
T5_ROWS = [("variant", "SoftVQ (G = 1)", "t5-g1", 1.33), ("variant", "+ PQ (G = 2)", "t5-g2", 1.19),
           ("variant", "+ PQ (G = 4), default", BASE, 1.03), ("variant", f"+ RQ ({RESIDUAL_DEPTH} levels)", "t5-rq", 1.55),
           ("variant", "+ R-PQ (G = 4)", "t5-rpq", 1.17), ("variant", "GMMVQ (G = 4)", "t5-gmmvq", 1.12),
           ("K", f"{K_DEFAULT // 4} (paper 2048)", f"t5-k{K_DEFAULT // 4}", 1.35),
           ("K", f"{K_DEFAULT}, default (paper 8192)", BASE, 1.03),
           ("K", f"{K_DEFAULT * 2} (paper 16384)", f"t5-k{K_DEFAULT * 2}", 1.23),
           ("tau", "0.001", "t5-tau0.001", 2.03), ("tau", "0.07, default", BASE, 1.03),
           ("tau", "1.0", "t5-tau1.0", 1.52), ("tau", "learnable", "t5-taulearn", 1.10),
           ("entropy", "lambda_4 = 0.01, default", BASE, 1.03), ("entropy", "lambda_4 = 0 (not in the paper)", "t5-noentropy", "-")]


# ---- small helpers ----
def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    with training.atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def flags(d):
    """{"--flag": value} -> ["--flag", "value", ...]."""
    return [str(x) for k, v in d.items() for x in (k, v)]


def stage(script, *argv):
    """Run `python <script> argv...` in this process (training.run_script), printed first."""
    print(f"\n$ python {shlex.join([script, *map(str, argv)])}", flush=True)
    training.run_script(os.path.join(ROOT, script), argv)


class Folder:
    """A study folder: config.json (what it was started with: a restart must match it) and
    stages.json (finished stages -> the wall and CPU seconds they took; on a shared machine the
    CPU time is the steadier measure of what a stage costs)."""

    def __init__(self, path, config, what):
        self.path, self.what = path, what
        config = json.loads(json.dumps(config))          # as JSON stores it (tuples -> lists)
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            training.check_config(read_json(cfg_path), config,
                                  f"{what} '{path}' (delete that folder to run it with this configuration)")
        else:
            os.makedirs(path, exist_ok=True)
            write_json(cfg_path, config)
        stages = os.path.join(path, "stages.json")
        self.done = read_json(stages) if os.path.isfile(stages) else {}

    def file(self, *names):
        return os.path.join(self.path, *names)

    def run(self, name, fn):
        """fn() unless stage `name` is recorded as finished; then record it with its wall time."""
        if name in self.done:
            return
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.done[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        write_json(self.file("stages.json"), self.done)
        print(f"[{self.what}] {name}: {self.done[name]['wall_s']:.1f} s wall, {self.done[name]['cpu_s']:.1f} s CPU",
              flush=True)


def load_split(root, indices=None):
    """uint8 images (N, 3, S, S) and labels of an ImageFolder split (centre crops), all or `indices`."""
    ds = data.make_dataset(root, IMAGE_SIZE, train=False)
    sub = torch.utils.data.Subset(ds, indices if indices is not None else range(len(ds)))
    xs, ys = [], []
    for x, y in torch.utils.data.DataLoader(sub, batch_size=500):
        xs.append(training.to_uint8(x))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


# =============================================================================================
# The study-level steps: judge, reference set, teacher
# =============================================================================================
def eval_and_ref_indices(test_root, budget):
    """The reconstruction subset (what `evaluate.py recon --num-images` takes) and the reference
    set: the next images of the same fixed random order, so the two never share an image."""
    n = len(data.make_dataset(test_root, IMAGE_SIZE, train=False))
    evaluated = evaluate.subset_indices(n, budget["eval_images"])
    both = evaluate.subset_indices(n, budget["eval_images"] + budget["ref_images"])
    ref = sorted(set(both) - set(evaluated))
    if len(evaluated) < budget["eval_images"] or not ref:
        raise training.UserError(f"{test_root} holds {n} images: fewer than the {budget['eval_images']} "
                                 f"reconstructed plus a reference set")
    return evaluated, ref


def write_reference(test_root, path, budget):
    images, labels = load_split(test_root, eval_and_ref_indices(test_root, budget)[1])
    data.save_images_npz(path, images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    print(f"reference set: {len(images)} test images -> {path}")


def augment(x, g, t):
    """SimCLR's augmentations on a batch in [0, 1] (B, 3, S, S), one draw per image from generator
    g: random resized crop (area t["crop_scale"], aspect 3/4-4/3) with a horizontal flip, as one
    bilinear resampling; brightness, contrast and saturation jitter (probability jitter_prob);
    greyscale (grey_prob)."""
    B = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)
    side = (t["crop_scale"][0] + (t["crop_scale"][1] - t["crop_scale"][0]) * u(B)).sqrt()
    aspect = ((u(B) * 2 - 1) * math.log(4 / 3)).exp().sqrt()
    sx, sy = (side * aspect).clamp(max=1), (side / aspect).clamp(max=1)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = sx * torch.where(u(B) < 0.5, -1.0, 1.0)
    theta[:, 1, 1] = sy
    theta[:, 0, 2], theta[:, 1, 2] = (u(B) * 2 - 1) * (1 - sx), (u(B) * 2 - 1) * (1 - sy)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    on = (u(B, 1, 1, 1) < t["jitter_prob"]).float()
    strength = lambda: 1 + (u(B, 1, 1, 1) * 2 - 1) * t["jitter"] * on
    x = x * strength()                                                   # brightness
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * strength() + mean                                   # contrast
    grey = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - grey) * strength() + grey                                   # saturation
    to_grey = (u(B, 1, 1, 1) < t["grey_prob"]).float()
    return (x * (1 - to_grey) + grey * to_grey).clamp(0, 1)


def teacher_features(vit, images, mean, std, batch=500):
    """Mean-pooled final patch tokens (what alignment targets, Sec. 3.3) of uint8 images."""
    out = []
    with torch.no_grad():
        for x in images.split(batch):
            x = (x.float() / 255 - mean) / std
            out.append(vit.forward_features(x)[:, 1:].mean(1))
    return torch.cat(out)


def train_teacher(train_root, test_root, folder, t, budget):
    """SimCLR (Chen et al. 2020): InfoNCE between two augmentations of each image, on the mean of
    the ViT's patch tokens through a projection MLP; CIFAR-10 train images only, no labels.
    Resumable from folder/train-ckpt.pt. Writes teacher.pt (tokenizer.teacher_checkpoint) and
    probe.json (linear probe of this teacher and of a randomly initialised ViT of the same shape)."""
    images, _ = load_split(train_root)                          # labels unused
    mean = images.float().mean((0, 2, 3)).view(1, 3, 1, 1) / 255
    std = images.float().std((0, 2, 3)).view(1, 3, 1, 1) / 255
    torch.manual_seed(0)
    make_vit = lambda: tokenizer.VisionTransformer(IMAGE_SIZE, t["patch"], t["width"], t["depth"], t["heads"],
                                                   layerscale=False)
    random_vit, vit = make_vit(), make_vit()
    head = nn.Sequential(nn.Linear(t["width"], t["proj_hidden"]), nn.ReLU(), nn.Linear(t["proj_hidden"], t["proj_dim"]))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    g = torch.Generator().manual_seed(0)
    step, ckpt = 0, folder.file("train-ckpt.pt")
    if os.path.isfile(ckpt) or os.path.isfile(training.previous_checkpoint(ckpt)):
        state, used = training.resume_checkpoint(ckpt, "teacher")
        vit.load_state_dict(state["vit"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        step = state["step"]
        print(f"teacher: resumed {used} at step {step}")
    targets = torch.arange(2 * t["batch"]).roll(t["batch"])     # view i's positive: the other view of its image
    t0 = time.perf_counter()
    while step < t["steps"]:
        for group in opt.param_groups:
            group["lr"] = training.cosine_lr(step, t["lr"], t["warmup"], t["steps"], 0.0)
        x = images[torch.randint(len(images), (t["batch"],), generator=g)].float() / 255
        views = (torch.cat([augment(x, g, t), augment(x, g, t)]) - mean) / std
        z = F.normalize(head(vit.forward_features(views)[:, 1:].mean(1)), dim=-1)
        logits = (z @ z.T / t["temperature"]).fill_diagonal_(-math.inf)   # an image is not its own negative
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % t["ckpt_every"] == 0 or step == t["steps"]:
            training.save_checkpoint(ckpt, {"kind": "teacher", "vit": vit.state_dict(), "head": head.state_dict(),
                                            "opt": opt.state_dict(), "generator": g.get_state(), "step": step})
            print(f"teacher step {step}/{t['steps']}: InfoNCE {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    training.save_checkpoint(folder.file("teacher.pt"),
                             tokenizer.teacher_checkpoint(vit, mean.flatten().tolist(), std.flatten().tolist()))
    # is it a better feature extractor than its random initialisation? (the same probe as the cells)
    n_train, n_val = budget["probe_train_images"], budget["probe_val_images"]
    train_x, train_y = load_split(train_root, evaluate.subset_indices(len(images), n_train))
    val_x, val_y = load_split(test_root, evaluate.subset_indices(len(data.make_dataset(test_root, IMAGE_SIZE,
                                                                                       train=False)), n_val))
    probe = {}
    for name, net in (("teacher", vit.eval()), ("random_init", random_vit.eval())):
        probe[f"{name}_top1"] = evaluate.train_linear_probe(
            teacher_features(net, train_x, mean, std), train_y, teacher_features(net, val_x, mean, std), val_y,
            int(train_y.max()) + 1, budget["probe_epochs"], budget["probe_batch"])
    probe.update(train_images=len(train_x), val_images=len(val_x))
    write_json(folder.file("probe.json"), probe)
    print(f"teacher linear probe: {probe['teacher_top1']:.1f}% (random init: {probe['random_init_top1']:.1f}%)")


# =============================================================================================
# One cell
# =============================================================================================
def cell_config(cell, recipes):
    """What defines a cell's results (its config.json): the train_tok / train_gen flags without
    paths, the evaluation budget and, when it aligns, the teacher's recipe."""
    tok = [*flags(recipes["tokenizer"]), "--tokens", cell["tokens"], "--token-dim", cell["token_dim"],
           "--quantizer", cell["quantizer"], *cell["flags"], "--seed", cell["seed"]]
    tok += [*ALIGN_FLAGS] if cell["align"] else ["--align-weight", 0]
    if cell["iters_scale"] != 1:                       # the last --iters wins (argparse)
        tok += ["--iters", recipes["tokenizer"]["--iters"] * cell["iters_scale"]]
    config = {"train_tok": [str(a) for a in tok], "budget": recipes["budget"]}
    if cell["generation"]:
        config["train_gen"] = [*flags(recipes["generator"]), "--seed", str(cell["seed"])]
    if cell["align"]:
        config["teacher"] = recipes[cell["teacher"]]
    return json.loads(json.dumps(config))              # as JSON stores it (tuples -> lists)


def run_cell(cell, args, paths, recipes):
    config = cell_config(cell, recipes)
    budget = recipes["budget"]
    f = Folder(os.path.join(args.work, cell["name"]), config, f"cell {cell['name']}")
    train, test = paths["train"], paths["test"]
    tok_dir, ckpt = f.file("tok"), f.file("tok", "ckpt.pt")

    def tokenizer_stage():
        resume = os.path.isfile(ckpt) or os.path.isfile(training.previous_checkpoint(ckpt))
        align = ["--teacher-path", paths[cell["teacher"]]] if cell["align"] else []
        stage("train_tok.py", *config["train_tok"], *align, "--data-path", train, "--out-dir", f.path,
              "--name", "tok", "--num-workers", 0, *(["--resume"] if resume else []))
    f.run("tokenizer", tokenizer_stage)
    f.run("recon", lambda: stage(
        "evaluate.py", "recon", "--ckpt", ckpt, "--data-path", test, "--num-images", budget["eval_images"],
        "--num-workers", 0, "--batch-size", 100, "--out", f.file("recon.json"), "--save-npz", f.file("eval"),
        "--grid", f.file("recon-grid.png"), "--grid-images", 10))
    f.run("probe", lambda: stage(
        "evaluate.py", "linear-probe", "--ckpt", ckpt, "--train-path", train, "--val-path", test,
        "--max-train-images", budget["probe_train_images"], "--max-val-images", budget["probe_val_images"],
        "--pool", "flatten", "--epochs", budget["probe_epochs"], "--probe-batch-size", budget["probe_batch"],
        "--num-workers", 0, "--batch-size", 100, "--out", f.file("probe.json")))
    sets = [f"real={f.file('eval-inputs.npz')}", f"recon={f.file('eval-recons.npz')}"]
    if cell["generation"]:
        cache, gen_ckpt = f.file("latents"), f.file("gen", "ckpt.pt")

        def cache_stage():
            resume = os.path.isfile(os.path.join(cache, "cache.json"))
            stage("train_gen.py", "--cache-latents", "--tokenizer", ckpt, "--data-path", train, "--cache-dir", cache,
                  "--num-workers", 0, "--seed", cell["seed"], "--resume" if resume else "--overwrite")

        def generator_stage():
            resume = os.path.isfile(gen_ckpt) or os.path.isfile(training.previous_checkpoint(gen_ckpt))
            stage("train_gen.py", *config["train_gen"], "--cache-dir", cache, "--out", f.file("gen"),
                  "--num-workers", 0, "--log-every", 100, "--ckpt-every", 500, *(["--resume"] if resume else []))
        f.run("cache", cache_stage)
        f.run("generator", generator_stage)
        if os.path.isdir(cache):                   # 100 MB a cell; not needed once the generator is done
            shutil.rmtree(cache)
        f.run("samples", lambda: stage(
            "sample.py", "--ckpt", gen_ckpt, "--out", f.file("samples"), "--num-images", budget["samples"],
            "--batch-size", 100, "--steps", budget["sample_steps"], "--cfg-scale", 1.0, "--seed", cell["seed"]))
        sets.append(f"samples={f.file('samples', 'samples.npz')}")
    f.run("judge", lambda: stage("evaluate.py", "judge", "--judge", paths["judge"], "--ref", paths["reference"],
                                 "--out", f.file("judge.json"), *sets))

    # ---- results.json: what the tables read; written last, so it marks the cell done ----
    log = [json.loads(line) for line in open(f.file("tok", "log.jsonl"))]
    judged = read_json(f.file("judge.json"))["sets"]
    res = {"cell": cell, "config": config, "stage_times": f.done,
           "tokenizer_final_log": log[-1] if log else None,
           "recon": read_json(f.file("recon.json")), "probe": read_json(f.file("probe.json")),
           "fd_real": judged["real"]["fd"], "rfd": judged["recon"]["fd"],
           "recon_class_accuracy": judged["recon"].get("class_accuracy"), "judge_sha256": sha256(paths["judge"])}
    if cell["generation"]:
        res.update(gfd=judged["samples"]["fd"], sample_class_accuracy=judged["samples"]["class_accuracy"])
    write_json(f.file("results.json"), res)
    os.makedirs(os.path.join(args.out, "cells"), exist_ok=True)
    write_json(published(args.out, "cells", cell["name"]), res)      # the copy committed with the tables
    wall = sum(t["wall_s"] for t in f.done.values())
    print(f"[cell {cell['name']}] done in {wall:.0f} s: PSNR {res['recon']['psnr']:.2f} dB, "
          f"rFD {res['rfd']:.2f}" + (f", gFD {res['gfd']:.2f}" if cell["generation"] else ""), flush=True)


# =============================================================================================
# What outlives the work folder: published into <out> and committed with the tables
# =============================================================================================
# <work> holds checkpoints and caches (gigabytes, never committed); a session's machine and its
# <work> may be gone by the next one. So <out> keeps what the tables need and what a later run on
# another machine must share with the earlier cells: every finished cell's results.json as
# <out>/cells/<cell>.json, and the judge and the teacher (a few MB) with their configurations in
# <out>/study/. A new <work> starts from those (the judge and the teacher are restored, not
# retrained), and every cell records the SHA-256 of the judge that scored it: FDs of two judges
# live in different feature spaces, so a cell scored by another judge counts as not done.
def published(out, *names):
    """<out>/cells/<cell>.json for ("cells", cell), else <out>/study/<names...>."""
    if names[0] == "cells":
        return os.path.join(out, "cells", names[1] + ".json")
    return os.path.join(out, "study", *names)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def study_file(work, out, what, name):
    """A file of the judge or a teacher: the work folder's, else the published one (None if neither)."""
    return next((p for p in (os.path.join(work, what, name), published(out, what, name)) if os.path.isfile(p)),
                None)


def current_judge(work, out):
    """The SHA-256 of the judge new cells are scored with: the work folder's, else the published one."""
    path = study_file(work, out, "judge", "judge.pt")
    return sha256(path) if path else None


STUDY_FILES = {"judge": ("judge.pt", "judge-train.json"), **{t: ("teacher.pt", "probe.json") for t in TEACHERS}}


def publish(work, out, recipes):
    """Copy into <out> the results of every cell finished in <work> with the current configuration
    (with the judge's SHA-256, which results written before it was recorded lack), and the
    judge and teacher with the configuration they were made with. A published judge or teacher
    is never replaced by another one: the cells it scored would drop out of the tables."""
    judge = os.path.join(work, "judge", "judge.pt")
    if not os.path.isfile(judge):
        return
    judge_sha = sha256(judge)
    config = {"judge": os.path.join(work, "config.json"), **{t: os.path.join(work, t, "config.json") for t in TEACHERS}}
    for what, names in STUDY_FILES.items():
        src = [os.path.join(work, what, n) for n in names]
        if not (os.path.isfile(config[what]) and all(os.path.isfile(f) for f in src)):
            continue
        if os.path.isfile(published(out, what, names[0])):
            if sha256(published(out, what, names[0])) != sha256(src[0]):
                print(f"not published: {published(out, what)} holds another {what} than {work} (delete it to "
                      f"publish this one; what the published one made stays)")
                if what == "judge":
                    return                             # these cells were scored by another judge
            continue
        os.makedirs(published(out, what), exist_ok=True)
        for f in src + [config[what]]:
            dst = published(out, what, os.path.basename(f))
            shutil.copyfile(f, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
    for name, cell in CELLS.items():
        path = os.path.join(work, name, "results.json")
        if os.path.isfile(path):
            r = read_json(path)
            if r["config"] == cell_config(cell, recipes) and r.setdefault("judge_sha256", judge_sha) == judge_sha:
                os.makedirs(os.path.join(out, "cells"), exist_ok=True)
                write_json(published(out, "cells", name), r)


def restore(out, what, folder, config):
    """Copy the published judge or teacher into `folder` when it was made with `config`; True if so."""
    src = [published(out, what, n) for n in STUDY_FILES[what]]
    cfg = published(out, what, "config.json")
    if not (os.path.isfile(cfg) and all(os.path.isfile(f) for f in src)):
        return False
    if read_json(cfg) != json.loads(json.dumps(config)):
        print(f"{cfg}: made with another configuration, not restored")
        return False
    os.makedirs(folder, exist_ok=True)
    for f in src:
        shutil.copyfile(f, os.path.join(folder, os.path.basename(f)))
    print(f"{what}: restored from {os.path.dirname(cfg)} (SHA-256 {sha256(src[0])[:12]})")
    return True


# =============================================================================================
# Tables and plots from the finished cells
# =============================================================================================
def fmt(v, digits=2):
    return "not yet measured" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def finished(work, out, recipes):
    """{cell: results} of the cells finished with the current configuration and judge, and the
    names of those finished with another one (left out of the tables: their folders must be
    deleted and the cells run again). A cell's results are <work>/<cell>/results.json or, when
    the work folder is gone (another machine, a fresh clone), their published copy
    <out>/cells/<cell>.json."""
    judge = current_judge(work, out)
    found, stale = {}, []
    for name, cell in CELLS.items():
        records = [read_json(p) for p in (os.path.join(work, name, "results.json"), published(out, "cells", name))
                   if os.path.isfile(p)]
        if not records:
            continue
        match = [r for r in records if r["config"] == cell_config(cell, recipes)
                 and judge in (None, r.get("judge_sha256", judge))]
        if match:
            found[name] = match[0]
        else:
            stale.append(name)
    return found, stale


def ours(r):
    """The numbers of one cell (None where not measured)."""
    get = lambda *keys: None if r is None else _dig(r, keys)
    o = {"psnr": get("recon", "psnr"), "ssim": get("recon", "ssim"), "codebook_usage": get("recon", "codebook_usage"),
         "rfd": get("rfd"), "probe_top1": get("probe", "top1"), "gfd": get("gfd"),
         "sample_class_accuracy": get("sample_class_accuracy")}
    # what generating the latents costs beyond what decoding them costs: samples can be no better
    # than the decoder's reconstructions, so gFD - rFD is the part the generator adds
    o["gen_cost"] = None if o["gfd"] is None else o["gfd"] - o["rfd"]
    return o


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]) + "\n"


FD_NOTE = ("rFD / gFD: Frechet distance of the offline judge's features (evaluate.py judge; a small "
           "classifier trained on CIFAR-10 train) of reconstructions / samples against held-out test "
           "images, not Inception FID: compare rows with each other, not with the paper's numbers. "
           "gFD - rFD: what generating the latents adds beyond decoding them (samples can be no better "
           "than the decoder's reconstructions).")


def write_tables(work, out, recipes):
    os.makedirs(out, exist_ok=True)
    publish(work, out, recipes)
    measured, stale = finished(work, out, recipes)
    results = measured.get
    judge = study_file(work, out, "judge", "judge-train.json")
    judge_acc = read_json(judge)["held_out_accuracy"] if judge else None
    floor = next((r["fd_real"] for r in measured.values()), None)
    recipe = (f"Tokenizer: `train_tok.py {' '.join(flags(recipes['tokenizer']))}` + the cell's flags; generator: "
              f"`train_gen.py {' '.join(flags(recipes['generator']))}`; evaluation budget: "
              f"`{json.dumps(recipes['budget'])}`.")
    if stale:
        recipe += (f" Left out, finished with another configuration (delete their folders in {work} to "
                   f"run them with this one): {', '.join(stale)}.")
    common = (f"{FD_NOTE} Judge accuracy on held-out test images (%): {fmt(judge_acc, 1)}; FD of real test "
              f"images (the floor): {fmt(floor)}.\n\n{recipe}\n")

    def timing(names):
        """Which of a table's cells are measured, and what they took."""
        names = list(dict.fromkeys(names))                 # each cell once (Table 5 lists its default thrice)
        done = [measured[n] for n in names if n in measured]
        total = lambda key: sum(t[key] for r in done for t in r["stage_times"].values()) / 3600
        return (f"\nCells measured: {len(done)} of {len(names)}; their time: "
                f"{total('wall_s'):.2f} h wall, {total('cpu_s'):.2f} h CPU.\n")

    # ---- Table 3 ----
    rows, table = [], []

    def t3_row(q, label, o, paper=("-", "-", "-", "-")):
        usage = o["codebook_usage"] if q in ("softvq", "vq") else "-"      # AE / KL have no codebook
        return [q, label, o["psnr"], o["ssim"], usage, o["rfd"], o["probe_top1"], o["gfd"], o["gen_cost"],
                o["sample_class_accuracy"], *paper]

    for q in T3_QUANTIZERS:
        for L, D, seed in ((32, 8, 0), (16, 16, 0), (8, 32, 0), (8, 32, 1), (8, 8, 0)):
            name = f"t3-{q}-{L}x{D}" + ("-seed1" if seed else "")
            o = ours(results(name))
            paper = PAPER_T3.get((q, PAPER_TOKENS[L])) if L * D == 256 else None
            entry = {"cell": name, "quantizer": q, "L": L, "D": D, "seed": seed, **o,
                     "paper_tokens": PAPER_TOKENS[L] if paper else None,
                     "paper_rfid": paper and paper[0], "paper_gfid": paper and paper[1], "paper_is": paper and paper[2]}
            table.append(entry)
            rows.append(t3_row(q, f"{L} x {D}" + (" (seed 1)" if seed else ""), o,
                               [entry[k] or "-" for k in ("paper_tokens", "paper_rfid", "paper_gfid", "paper_is")]))
    for q in LONGER_QUANTIZERS:                        # the follow-up rows: twice the tokenizer steps
        name = f"t3-{q}-16x16-2x"
        o = ours(results(name))
        table.append({"cell": name, "quantizer": q, "L": 16, "D": 16, "seed": 0, "iters_scale": 2, **o})
        rows.append(t3_row(q, "16 x 16, 2x steps", o))
    md = ("# Table 3 at CIFAR-10 scale: quantizers across latent sizes\n\n"
          "Ours: 32 px, L x D = 256 (one row at 64), SiT-tiny without CFG. Paper: ImageNet 256 px, "
          "S tokenizers, SiT-L without CFG, at the token count with the same ratio to its smallest "
          "(our L = 8 / 16 / 32 beside its 32 / 64 / 128); the paper has no KL-S row.\n\n"
          + markdown(["quantizer", "L x D", "PSNR (dB)", "SSIM", "codebook usage", "rFD", "linear probe (%)",
                      "gFD", "gFD - rFD", "sample class acc. (%)", "paper tokens", "paper rFID", "paper gFID",
                      "paper IS"], rows)
          + timing(r["cell"] for r in table) + "\n" + common)
    _write(out, "table3", md, table)

    # ---- Table 4 ----
    probes = {}
    for t in TEACHERS:
        tp = study_file(work, out, t, "probe.json")
        probes[t] = read_json(tp) if tp else {}
    teacher = probes["teacher"]
    rows, table = [], []
    for align, name, target in ((False, "t4-softvq-16x16-noalign", "-"), (True, BASE, "own SimCLR ViT"),
                                (True, "t4-softvq-16x16-teacher5x", "own SimCLR ViT, 5x steps")):
        o = ours(results(name))
        p = PAPER_T4[align]
        table.append({"cell": name, "alignment": align, "target": target, **o, "paper_rfid": p[0],
                      "paper_probe": p[1], "paper_gfid": p[2], "paper_is": p[3]})
        rows.append([target, o["psnr"], o["rfd"], o["probe_top1"], o["gfd"],
                     o["sample_class_accuracy"], "DINOv2-B" if align else "-", *p])
    md = ("# Table 4 at CIFAR-10 scale: representation alignment (SoftVQ, L = 16, D = 16)\n\n"
          "Teacher: a ViT trained here on CIFAR-10 train without labels (SimCLR), linear probe of its "
          f"mean-pooled patch tokens {fmt(teacher.get('teacher_top1'), 1)}% against "
          f"{fmt(teacher.get('random_init_top1'), 1)}% for the same ViT at its random initialisation; "
          f"the same teacher trained 5x longer (the follow-up row): "
          f"{fmt(probes['teacher-5x'].get('teacher_top1'), 1)}%. "
          "No encoder initialisation in any row (paper: the rows without one).\n\n"
          + markdown(["alignment", "PSNR (dB)", "rFD", "linear probe (%)", "gFD", "sample class acc. (%)",
                      "paper target", "paper rFID", "paper L.P. (%)", "paper gFID", "paper IS"], rows)
          + timing(r["cell"] for r in table) + "\n" + common)
    _write(out, "table4", md, {"rows": table, "teacher_probe": teacher, "teacher_5x_probe": probes["teacher-5x"]})

    # ---- Table 5 ----
    rows, table = [], []
    for group, variant, name, paper in T5_ROWS:
        o = ours(results(name))
        table.append({"group": group, "variant": variant, "cell": name, **o, "paper_rfid": paper})
        rows.append([group, variant, o["psnr"], o["ssim"], o["codebook_usage"], o["rfd"], paper])
    md = ("# Table 5 at CIFAR-10 scale: SoftVQ ablations (L = 16, D = 16, reconstruction only)\n\n"
          f"Default: G = 4 token segments, K = {K_DEFAULT}, tau = 0.07 (Table 3's SoftVQ 16 x 16 cell). K rows "
          "beside the paper's K at the same ratio to its default 8192.\n\n"
          + markdown(["group", "variant", "PSNR (dB)", "SSIM", "codebook usage", "rFD", "paper rFID"], rows)
          + timing(r["cell"] for r in table) + "\n" + common)
    _write(out, "table5", md, table)
    write_plots(work, out, measured)


def _write(out, stem, md, obj):
    with training.atomic_write(os.path.join(out, stem + ".md"), "w") as f:
        f.write(md)
    write_json(os.path.join(out, stem + ".json"), obj)


def write_plots(work, out, measured):
    """PSNR / gFD / linear probe against L per quantizer (L x D = 256, seed 0; hollow marker: the
    8 x 8 cell), the Table 4 cell without alignment as a cross; grids of the L = 8, D = 32 cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for key, label, stem in (("psnr", "PSNR (dB), CIFAR-10 test", "psnr_vs_L"),
                             ("gfd", "gFD (judge features; lower is better)", "fd_vs_L"),
                             ("probe_top1", "linear probe top-1 (%) on latents", "probe")):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        drawn = False
        for q in T3_QUANTIZERS:
            pts = [(L, ours(measured.get(f"t3-{q}-{L}x{D}"))[key]) for L, D in ((32, 8), (16, 16), (8, 32))]
            pts = [(L, v) for L, v in pts if v is not None]
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=q)
                small = ours(measured.get(f"t3-{q}-8x8"))[key]
                if small is not None:
                    ax.plot([8], [small], marker="o", mfc="none", color=line.get_color(), ls="none")
                drawn = True
        off = ours(measured.get("t4-softvq-16x16-noalign"))[key]
        if off is not None:
            ax.plot([16], [off], marker="x", ls="none", color="k", label="softvq, no alignment")
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_xticks([8, 16, 32], ["8", "16", "32"])
        ax.set_xlabel("latent tokens L (L x D = 256; hollow: 8 x 8)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, stem + ".png"), dpi=120)
        plt.close(fig)
    for q in T3_QUANTIZERS:
        cell = os.path.join(work, f"t3-{q}-8x32")
        for src, dst in (("recon-grid.png", f"recon_{q}.png"), (os.path.join("samples", "grid.png"), f"samples_{q}.png")):
            if f"t3-{q}-8x32" in measured and os.path.isfile(os.path.join(cell, src)):
                shutil.copyfile(os.path.join(cell, src), os.path.join(out, dst))


# =============================================================================================
# main
# =============================================================================================
def select(patterns):
    if not patterns:
        return list(CELLS.values())
    chosen = [c for name, c in CELLS.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in CELLS)]
    if unmatched:
        raise training.UserError(f"--cells {' '.join(unmatched)} matches no cell; cells: {', '.join(CELLS)}")
    return chosen


def main(args):
    quick = lambda full, small: {**full, **(small if args.quick else {})}
    recipes = {"tokenizer": quick(TOKENIZER_RECIPE, QUICK_TOKENIZER), "generator": quick(GEN_RECIPE, QUICK_GEN),
               "budget": quick(BUDGET, QUICK_BUDGET), **{t: quick(r, QUICK_TEACHER) for t, r in TEACHERS.items()}}
    budget = recipes["budget"]
    cells = select(args.cells)
    measured, stale = finished(args.work, args.out, recipes)
    if args.list:
        for c in cells:
            state = "done" if c["name"] in measured else "done with another configuration" if c["name"] in stale \
                else "to do"
            print(f"{c['name']:<26} table {c['table']}  {'generation' if c['generation'] else 'reconstruction'}  "
                  f"{state}")
        return
    todo = [c for c in cells if c["name"] not in measured]     # a stale cell is refused by its Folder
    if not args.tables_only:
        for c in cells:
            if c["name"] in measured:
                print(f"[cell {c['name']}] done: skipped")
    if todo and not args.tables_only:
        if args.data is None:
            raise training.UserError("--data is needed to run cells (the CIFAR-10 ImageFolder root holding "
                                     "train/ and test/)")
        paths = {split: os.path.join(args.data, split) for split in ("train", "test")}
        for split, path in paths.items():
            if not os.path.isdir(path):
                raise training.UserError(f"--data {args.data}: no {split}/ folder (extract cifar10-jpg.tar.gz there)")
        study_config = {"judge_epochs": budget["judge_epochs"], "judge_batch": budget["judge_batch"],
                        "eval_images": budget["eval_images"], "ref_images": budget["ref_images"]}
        study = Folder(args.work, study_config, "study")
        paths.update(judge=study.file("judge", "judge.pt"), reference=study.file("reference.npz"),
                     **{t: study.file(t, "teacher.pt") for t in TEACHERS})
        study.run("judge", lambda: restore(args.out, "judge", study.file("judge"), study_config) or stage(
            "evaluate.py", "judge-train", "--data-path", paths["train"], "--val-path", paths["test"],
            "--epochs", budget["judge_epochs"], "--batch-size", budget["judge_batch"],
            "--out", paths["judge"], "--json", study.file("judge", "judge-train.json")))
        study.run("reference", lambda: write_reference(paths["test"], paths["reference"], budget))
        for t in sorted({c["teacher"] for c in todo if c["align"]}):
            teacher = Folder(study.file(t), recipes[t], t)
            teacher.run("teacher", lambda: restore(args.out, t, teacher.path, recipes[t]) or
                        train_teacher(paths["train"], paths["test"], teacher, recipes[t], budget))
        for c in todo:
            run_cell(c, args, paths, recipes)
    write_tables(args.work, args.out, recipes)
    print(f"tables and plots: {args.out}/")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 ImageFolder root with train/ and test/ (e.g. /tmp/cifar)")
    p.add_argument("--work", default="runs/study_cifar", help="one folder per cell, the judge and the teacher")
    p.add_argument("--out", default="docs/study_cifar", help="tables (markdown + JSON) and plots")
    p.add_argument("--cells", nargs="+", default=None, help="names or globs (default: every cell; see --list)")
    p.add_argument("--quick", action="store_true", help="every budget cut to seconds (tests)")
    p.add_argument("--list", action="store_true", help="print the cells and which are done, run nothing")
    p.add_argument("--tables-only", action="store_true", help="rewrite tables and plots from the finished cells")
    training.run_main(lambda: main(p.parse_args()))
