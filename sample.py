"""Sample class-conditional images from a trained generator on SoftVQ-VAE latents (DDP).

Paper Sec. 4 and App. C.2; the output is what evaluate.py needs for gFID / IS.

Generates N images (50K by default: 50 per ImageNet class), decodes them with the tokenizer and
writes into --out:
    samples/000000.png ...   one PNG per image, named by its global index
    samples.npz              all of them as one ADM-style batch (uint8 N x H x W x 3, key arr_0;
                             their class labels in arr_1, as guided-diffusion's sampler writes them)
    grid.png                 a row per class (the first GRID_ROWS classes, GRID_COLUMNS images
                             each) when there are enough images, else the first 64
    meta.json                the sampling settings (a resumed run must use the same)
Image i has class i % num_classes. The images are cut into chunks of --batch-size consecutive
indices; chunk c is drawn by rank c % world_size with the random seed (seed, c). An image therefore
depends on the seed and the batch size only, not on the number of processes; a rerun keeps the PNGs
that exist and draws only the missing chunks (an interrupted run resumes where it stopped).

    # ours (train_gen.py checkpoint; it names its tokenizer and holds the latent mean / std)
    torchrun --nproc_per_node=8 sample.py --preset sit-xl-64 --ckpt runs/sit-xl-l-64/ckpt.pt \\
        --out runs/sit-xl-l-64/samples
    # released SiT / DiT folder (config.json + model.safetensors) with a released tokenizer folder
    torchrun --nproc_per_node=8 sample.py --preset sit-xl-64 --ckpt hub/sit-xl_softvq-l-64 \\
        --tokenizer hub/softvq-l-64 --out runs/released-sit-xl-l-64
    # CPU pipeline: 200 images of the tiny generator, with the nearest-neighbour check below
    python sample.py --preset tiny

Presets (App. C.2; explicit flags override them):
    sit-xl-64  SDE (Euler-Maruyama) 250 steps, CFG 1.75, guidance interval [0, 0.7]
    sit-xl-32  SDE 250 steps, CFG 2.25, interval [0, 0.7]
    dit-xl-64  DDPM 250 steps, CFG 1.35
    dit-xl-32  DDPM 250 steps, CFG 1.45
    mar-h      CFG 3.0 (linear CFG schedule), L iterations, temperature 1.0
    tiny       the tiny pipeline's generator, 1000 images
Without a preset: the checkpoint's own sampler and steps, CFG 1.0 (the "w/o CFG" columns).
Sampling runs in fp32 with TF32 off (training.py: the precision policy); `--compile` compiles the
generator network (training.compile_generator: one graph for CFG's doubled batch, one for the
plain batch outside the guidance interval, one more per size of a shorter last chunk).

`--random-latents` skips the generator and decodes latents drawn from N(0, I) in the normalised
latent space (what an untrained generator produces): the "ceiling" row of a generation table.

`--nn-check builtin` (on in the tiny preset) measures whether the samples look like the built-in
data set: the mean per-pixel RMSE from each image to its nearest real training image, for the
samples and for four references (held-out real images and their tokenizer reconstructions,
decoded random latents, uniform noise), and how often that nearest real image has the requested
class. Written to summary.json.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
import generators
import training

# ---- presets: App. C.2 sampling settings (CFG scales from generators.PAPER_CFG) ----
PRESETS = {
    "sit-xl-64": dict(sampler="sde", steps=250, **generators.PAPER_CFG["sit"][64]),
    "sit-xl-32": dict(sampler="sde", steps=250, **generators.PAPER_CFG["sit"][32]),
    "dit-xl-64": dict(sampler="ddpm", steps=250, **generators.PAPER_CFG["dit"][64]),
    "dit-xl-32": dict(sampler="ddpm", steps=250, **generators.PAPER_CFG["dit"][32]),
    "mar-h": dict(sampler="ddpm", temperature=1.0, **generators.PAPER_CFG["mar"][64]),
    # CPU pipeline: train_gen.py --preset tiny's checkpoint; SDE 25 steps, CFG 3 (the short-trained
    # SiT-tiny gains from strong guidance: 81% of samples judged their class at CFG 1.5, 86% at 2,
    # 91% at 3, the classifier FD unchanged; README "Why the tiny tokenizer stalled")
    "tiny": dict(ckpt="runs/gen-tiny/ckpt.pt", out="runs/samples-tiny", num_images=1000, batch_size=100,
                 steps=25, cfg_scale=3.0, guidance_interval=(0.0, 0.7)),
}
DEFAULTS = dict(ckpt=None, tokenizer=None, out="runs/samples", num_images=50_000, batch_size=50,
                sampler=None, steps=None, cfg_scale=1.0, guidance_interval=(0.0, 1.0), temperature=1.0,
                nn_check=None)
GRID_ROWS, GRID_COLUMNS = 10, 8   # grid.png: a row of 8 samples for each of the first 10 classes
NN_REF_IMAGES = 1000           # --nn-check: real training images the samples are compared with
# allowed range of every numeric flag (training.check_flags), checked before anything is loaded
FLAG_RANGES = {"num_images": "> 0", "batch_size": "> 0", "steps": "> 0", "cfg_scale": ">= 0",
               "guidance_interval": "in [0, 1]", "temperature": ">= 0", "seed": ">= 0"}


def resolve(args):
    """Explicit flags > --preset > DEFAULTS."""
    cfg = {**DEFAULTS, **PRESETS.get(args.preset, {})}
    cfg.update({k: v for k, v in vars(args).items() if v is not None or k not in cfg})
    cfg["guidance_interval"] = tuple(float(v) for v in cfg["guidance_interval"])
    return argparse.Namespace(**cfg)


@torch.no_grad()
def decode(tok, z, mean, std):
    """Normalised latents -> uint8 images (B, H, W, 3): un-normalise (Sec. 4), decode, round."""
    return to_hwc_uint8(tok.decode(z * std + mean))


def png_path(args, index):
    return os.path.join(args.out, "samples", f"{index:06d}.png")


def write_png(path, image):
    """Atomic (temp + rename): a run killed mid-write never leaves a truncated PNG to be 'kept'."""
    with training.atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def read_png(path):
    return np.asarray(data.open_rgb(path))


def to_hwc_uint8(x):
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), as a PNG stores them."""
    return training.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def nn_check(samples, labels, args, tok, mean, std, device):
    """How close the samples are to the training data, against references. For every image: the
    per-pixel RMSE (pixels in [0, 1]) to its nearest neighbour among NN_REF_IMAGES real training
    images, and whether that neighbour has the image's class. Rows: the samples; held-out real
    images (the best a generator could do) and their tokenizer reconstructions (the best this
    tokenizer allows); decoded random latents (N(0, I) in the normalised space: what the generator
    produces before training); uniform noise. Same count and labels as the samples."""
    size, n = samples.shape[1], len(samples)
    train = data.make_dataset(args.nn_check, size, train=False)
    held = data.make_dataset(args.nn_check, size, train=False, seed=data.BUILTIN_VAL_SEED)
    ref = torch.stack([train[i][0] for i in range(min(NN_REF_IMAGES, len(train)))])
    ref_labels = torch.tensor([train[i][1] for i in range(len(ref))])
    real = torch.stack([held[i][0] for i in range(n)])
    real_labels = torch.tensor([held[i][1] for i in range(n)])
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((n, tok.config.num_tokens, tok.config.token_dim), generator=g)
    sets = {
        "samples": (samples, labels),
        "real held-out": (to_hwc_uint8(real), real_labels),
        "reconstructed held-out": (np.concatenate([to_hwc_uint8(tok(x.to(device))[0])
                                                   for x in real.split(args.batch_size)]), real_labels),
        "decoded random latents": (np.concatenate([decode(tok, z.to(device), mean, std)
                                                   for z in noise.split(args.batch_size)]), labels),
        "uniform noise": (torch.randint(0, 256, samples.shape, generator=g, dtype=torch.uint8).numpy(), labels),
    }
    ref01 = ((ref.double() + 1) / 2).flatten(1)
    out = {}
    for name, (images, want) in sets.items():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(255).flatten(1)
        best = torch.cdist(x, ref01).min(dim=1)
        out[name] = dict(nn_rmse=(best.values / math.sqrt(x.shape[1])).mean().item(),
                         nn_class_match=(ref_labels[best.indices] == want).double().mean().item())
    return out


def main(args):
    training.check_flags(args, FLAG_RANGES)
    lo, hi = args.guidance_interval
    if lo > hi:
        raise training.UserError(f"--guidance-interval {lo} {hi}: LO must not exceed HI")
    training.set_precision_policy(train=False)       # fp32, TF32 off: the samples feed gFID
    with training.distributed(args.device) as (rank, _, world_size, device):
        run(args, rank, world_size, device)


def run(args, rank, world_size, device):
    model, tok, mean, std, tok_path = training.load_models(args)
    # a checksum of the weights (on the CPU, so any device agrees): a retrained checkpoint at the
    # same path must not reuse the old samples
    checksum = training.weights_checksum(model, tok)
    model, tok = model.to(device), tok.to(device)
    if args.compile:
        training.compile_generator(model)
    c = model.config
    sampler = args.sampler or c.sampler
    try:                                             # before anything is written
        generators.check_sampling(c.arch, sampler, args.temperature, args.guidance_interval)
    except ValueError as e:
        raise training.UserError(f"{args.ckpt}: {e} (--sampler / --temperature / --guidance-interval)") from None
    settings = dict(ckpt=os.path.abspath(args.ckpt), tokenizer=os.path.abspath(tok_path),
                    weights_checksum=checksum,
                    num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
                    sampler=sampler, steps=args.steps,
                    cfg_scale=args.cfg_scale, guidance_interval=list(args.guidance_interval),
                    temperature=args.temperature, latent_mean=mean, latent_std=std,
                    random_latents=args.random_latents)

    # ---- output folder; a rerun must use the same settings (else its images would differ) ----
    # Every rank checks (not only rank 0), so a mismatch stops all ranks instead of leaving the
    # others waiting at the barrier; the barrier keeps rank 0's write after everybody's read.
    meta_path = os.path.join(args.out, "meta.json")
    meta_existed = os.path.isfile(meta_path)
    if meta_existed:
        with open(meta_path) as f:
            training.check_config(json.load(f), settings, f"existing samples in '{args.out}'")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        for folder in (args.out, os.path.join(args.out, "samples")):   # temp files of killed writes
            training.remove_stale_temps(folder)
        if not meta_existed:
            with training.atomic_write(meta_path, "w") as f:
                json.dump(settings, f, indent=1)
    if dist.is_initialized():
        dist.barrier()

    # ---- sample this rank's chunks (c = rank, rank + world, ...), skipping those whose PNGs exist ----
    def chunk(ch):
        return torch.arange(ch * args.batch_size, min((ch + 1) * args.batch_size, args.num_images))

    mine = range(rank, math.ceil(args.num_images / args.batch_size), world_size)
    todo = [ch for ch in mine if not all(os.path.isfile(png_path(args, i)) for i in chunk(ch).tolist())]
    training.print0(f"{c.arch.upper()} {c.num_tokens}x{c.token_dim} latents, sampler {settings['sampler']}, "
                    f"steps {args.steps or 'default'}, CFG {args.cfg_scale} "
                    f"on t in {list(args.guidance_interval)}, "
                    f"{args.num_images} images on {world_size} x {device.type}; rank 0 keeps "
                    f"{len(mine) - len(todo)} finished chunks of {len(mine)}")
    bar = tqdm(total=sum(len(chunk(ch)) for ch in todo), unit="img", disable=rank != 0, desc="sampling (rank 0)")
    t0 = time.time()
    for ch in todo:
        index = chunk(ch)
        y = (index % c.num_classes).to(device)                            # 50 per class at 50K / 1000
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + ch)
        if args.random_latents:
            z = torch.randn((len(y), c.num_tokens, c.token_dim), generator=gen, device=device)
        else:
            z = model.sample(y, steps=args.steps, cfg_scale=args.cfg_scale,
                             guidance_interval=args.guidance_interval, sampler=args.sampler,
                             temperature=args.temperature, generator=gen)
        for i, image in zip(index.tolist(), decode(tok, z, mean, std)):
            write_png(png_path(args, i), image)
        bar.update(len(index))
    bar.close()
    elapsed = time.time() - t0
    if dist.is_initialized():
        dist.barrier()          # every rank's PNGs are written

    # ---- rank 0: one ADM .npz, the grid, the summary ----
    if rank != 0:
        return
    npz = os.path.join(args.out, "samples.npz")
    data.save_images_npz(npz, (read_png(png_path(args, i)) for i in range(args.num_images)),
                             count=args.num_images, labels=np.arange(args.num_images) % c.num_classes)
    # image i has class i % C: images c, c + C, c + 2C, ... of class c make its row
    per_class = min(GRID_COLUMNS, args.num_images // c.num_classes)
    if per_class >= 2:
        picks = [k + j * c.num_classes for k in range(min(GRID_ROWS, c.num_classes)) for j in range(per_class)]
    else:
        picks, per_class = range(min(GRID_ROWS * GRID_COLUMNS, args.num_images)), GRID_COLUMNS
    grid = torch.from_numpy(np.stack([read_png(png_path(args, i)) for i in picks]))
    training.save_image_grid(grid.permute(0, 3, 1, 2), os.path.join(args.out, "grid.png"), nrow=per_class)
    summary = dict(num_images=args.num_images, seconds=elapsed,
                   images_per_second=bar.n * world_size / elapsed if bar.n else None)
    print(f"wrote {args.num_images} images -> {npz}, {args.out}/grid.png "
          f"({bar.n} new on rank 0 in {elapsed:.1f}s)", flush=True)
    if args.nn_check:
        labels = torch.arange(args.num_images) % c.num_classes
        summary["nn_check"] = nn_check(data.load_images_npz(npz), labels, args, tok, mean, std, device)
        print("nearest real training image (per-pixel RMSE in [0, 1], lower = closer; class match):")
        for name, r in summary["nn_check"].items():
            print(f"  {name:24s} {r['nn_rmse']:.4f}   {100 * r['nn_class_match']:.1f}%")
    with training.atomic_write(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), help="paper sampling settings by name, or tiny")
    p.add_argument("--ckpt", help="train_gen.py checkpoint, or a released SiT/DiT folder")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer (file or released folder)")
    p.add_argument("--out", help="output folder (default runs/samples)")
    p.add_argument("--num-images", type=int, help="N (default 50000: 50 per class)")
    p.add_argument("--batch-size", type=int, help="images per process per chunk (default 50)")
    p.add_argument("--sampler", choices=sorted({s for v in generators.SAMPLERS.values() for s in v}),
                   help="default: the checkpoint's (SiT sde, DiT/MAR ddpm)")
    p.add_argument("--steps", type=int, help="sampling steps (MAR: iterations); default: the checkpoint's")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="apply CFG only for t in [LO, HI] (t = 1 noise, 0 data); SiT presets 0 0.7")
    p.add_argument("--temperature", type=float, help="noise temperature of SDE / DDPM / MAR sampling")
    p.add_argument("--nn-check", choices=[data.BUILTIN], help="nearest-real-image check against the built-in data")
    p.add_argument("--random-latents", action="store_true",
                   help="decode N(0, I) latents instead of sampling the generator (the ceiling row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda ...")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator network (the first chunk compiles it; images equal "
                        "the eager ones up to rounding)")
    training.run_main(lambda: main(resolve(p.parse_args())))
