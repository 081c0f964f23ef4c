"""Train a class-conditional generator (DiT, SiT or MAR) on SoftVQ-VAE latent tokens.

Paper Sec. 4 and App. C.2. Two steps:

1. `--cache-latents`: encode the data set once with a trained tokenizer (each image and its
   horizontal flip, as DiT's latent caching does), under DDP, into sharded .npy files, and compute
   the latent mean / std over the whole set (scalars, gathered over all ranks). A tokenizer that
   already carries them (the released ones: vq_mean / vq_std) is used as is. An interrupted cache
   is finished with `--resume` (finished shards are kept); a complete or started cache is only
   replaced with `--overwrite`.

       torchrun --nproc_per_node=8 train_gen.py --cache-latents --tokenizer runs/L-64/ckpt.pt \\
           --data-path /data/imagenet/train --cache-dir runs/latents-L-64

2. Training reads the cache (or, with --on-the-fly, encodes every batch of images), normalises
   the latents, (z - mean) / std (Sec. 4), and trains the generator with its own `.loss(x, y)`:

       torchrun --nproc_per_node=8 train_gen.py --cache-dir runs/latents-L-64 --model SiT-XL \\
           --out runs/sit-xl-L-64

Defaults are the paper's recipes (App. C.2), chosen by the model family:
  DiT / SiT: AdamW (weight decay 0), constant lr 1e-4, global batch 256, EMA 0.9999, 3M steps;
             SiT clips the gradient norm at 1.0 (official train_sit.py), DiT does not (train_dit.py).
  MAR:       AdamW (0.9, 0.95) weight decay 0.02 (none on 1-D parameters, biases and the diffusion
             head, as MAR's code), lr 2e-4 (the paper lowered MAR's 8e-4 because of NaNs), global
             batch 2048, 100-epoch linear warm-up then constant, 500 epochs, grad clip 3.0, EMA 0.9999.
bf16 autocast on accelerators (training.py: the precision policy); class dropout 0.1 lives inside
the generator. Batch sizes are global. `--compile` compiles the network (training.compile_generator). Exact resume: `--resume` continues from <out>/ckpt.pt (model, EMA, optimizer, step, every
rank's RNG state; ckpt-prev.pt, the checkpoint before, if ckpt.pt is damaged); the data order is a
pure function of (seed, step). On --resume the schedule may change (RESUMABLE_FLAGS: a line says
what changed); the model, seed, batch and data may not. A folder holding a checkpoint is only
started again with --overwrite.

`--preset tiny` (CPU, < 2 min each): the tiny tokenizer's latents of the built-in data set and
a SiT-tiny generator:
    python train_gen.py --preset tiny --cache-latents
    python train_gen.py --preset tiny

The checkpoint <out>/ckpt.pt holds "kind" ("generator"), "config" (GeneratorConfig as a dict), "model", "ema",
"latent_mean", "latent_std", "tokenizer" (path), "optimizer", "step", "rng" and the training
settings; sample.py needs nothing else.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset

import data
import generators
import tokenizer as tokenizer_lib
import training

# ---- paper recipes (App. C.2), by model family ----
RECIPES = {
    # DiT / SiT: "the original setup": AdamW, no weight decay, constant lr 1e-4, batch 256, 3M steps;
    # the official train_sit.py clips at max_grad_norm 1.0, train_dit.py does not clip
    "dit": dict(lr=1e-4, batch_size=256, weight_decay=0.0, betas=(0.9, 0.999), warmup_epochs=0,
                grad_clip=0.0, steps=3_000_000, epochs=None, ema=0.9999),
    "sit": dict(lr=1e-4, batch_size=256, weight_decay=0.0, betas=(0.9, 0.999), warmup_epochs=0,
                grad_clip=1.0, steps=3_000_000, epochs=None, ema=0.9999),
    # MAR-H: AdamW (0.9, 0.95), wd 0.02, batch 2048, max lr 2e-4, 100-epoch warm-up, 500 epochs;
    # grad clip 3.0 and EMA 0.9999 as the MAR code
    "mar": dict(lr=2e-4, batch_size=2048, weight_decay=0.02, betas=(0.9, 0.95), warmup_epochs=100,
                grad_clip=3.0, steps=None, epochs=500, ema=0.9999),
}

# ---- --preset tiny: a CPU run on the tiny tokenizer's latents of the built-in data ----
TINY = dict(tokenizer="runs/tiny-16/ckpt.pt", data_path=data.BUILTIN, cache_dir="runs/latents-tiny",
            out="runs/gen-tiny", model="SiT-tiny", batch_size=64, lr=4e-3, steps=1500, ema=0.99,
            log_every=100, ckpt_every=200, builtin_size=2000, num_workers=0, shard_images=500)

# ---- everything else ----
SHARD_IMAGES = 50_000         # images per shard file and rank (820 MB at L = 64, D = 32, with flips)
DEFAULTS = dict(tokenizer=None, data_path=None, cache_dir=None, out="runs/gen", model="SiT-XL",
                log_every=100, ckpt_every=10_000, builtin_size=10_000, num_workers=8, shard_images=SHARD_IMAGES)
# flags that do not change what is computed (--compile: only its rounding): not compared when resuming
RUN_ONLY_FLAGS = {"preset", "cache_latents", "resume", "overwrite", "stop_at", "log_every", "ckpt_every",
                  "num_workers", "out", "device", "shard_images", "compile"}
# may differ on --resume (e.g. a lower lr after a NaN stop): the schedule and clipping
RESUMABLE_FLAGS = {"lr", "warmup_epochs", "steps", "epochs", "grad_clip"}
# allowed range of every numeric flag (training.check_flags), checked before anything is built
FLAG_RANGES = {"builtin_size": "> 0", "shard_images": "> 0", "steps": "> 0", "epochs": "> 0",
               "batch_size": "> 0", "lr": "> 0", "weight_decay": ">= 0", "betas": "in [0, 1)",
               "warmup_epochs": ">= 0", "grad_clip": ">= 0", "ema": "in [0, 1)", "log_every": "> 0",
               "ckpt_every": "> 0", "num_workers": ">= 0", "seed": ">= 0", "stop_at": "> 0"}
CACHE_SETTINGS = "cache.json" # what a cache was started with: --resume must match it
ENCODE_BATCH = 64             # per-process batch when encoding the data set
STATS_IMAGES = 10_000         # on-the-fly training: images used to estimate the latent mean / std


def resolve(args):
    """Fill every unset flag: explicit flags > --preset tiny > the model family's paper recipe."""
    cfg = {**DEFAULTS, **(TINY if args.preset == "tiny" else {})}
    model = args.model or cfg["model"]
    if model not in generators.GEN_PRESETS:
        raise training.UserError(f"unknown --model {model!r}; allowed: {list(generators.GEN_PRESETS)}")
    cfg = {**RECIPES[generators.GEN_PRESETS[model].arch], **cfg}
    cfg.update({k: v for k, v in vars(args).items() if v is not None or k not in cfg})
    cfg["betas"] = [float(b) for b in cfg["betas"]]
    return argparse.Namespace(**cfg)


def param_groups(model, weight_decay):
    """AdamW parameter groups. MAR (MAR's add_weight_decay): no weight decay on 1-D parameters
    (norms), biases and the whole diffusion head (MAR's `diffloss`, our `head`), `weight_decay` on
    the rest. DiT / SiT (their official code): one group, every parameter (weight decay 0 there)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if model.config.arch != "mar":
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    exempt = {n for n, p in params if p.ndim == 1 or n.endswith(".bias") or n.startswith("head.")}
    return [{"params": [p for n, p in params if n in exempt], "weight_decay": 0.0},
            {"params": [p for n, p in params if n not in exempt], "weight_decay": weight_decay}]


def load_any_tokenizer(path):
    """A train_tok.py checkpoint (file) or a released model-hub folder (config.json + safetensors)."""
    if path is None:
        raise training.UserError("no tokenizer given: pass --tokenizer <train_tok.py ckpt.pt or released folder>")
    if os.path.isdir(path):
        return tokenizer_lib.load_released(path)
    return training.load_tokenizer(path, ema=True)


def tokenizer_stats(tok):
    """(mean, std) a tokenizer carries (released checkpoints: vq_mean / vq_std), or None when it
    has the defaults 0 / 1 (then the statistics are measured on the data)."""
    mean, std = float(tok.latent_mean), float(tok.latent_std)
    return None if (mean, std) == (0.0, 1.0) else (mean, std)


@torch.no_grad()
def encode_images(tok, loader, device, on_batch):
    """Encode every batch of `loader` and its horizontal flip; on_batch(z (B, 2, L, D), y)."""
    for x, y in loader:
        x = x.to(device)
        z = torch.stack([tok.encode(x), tok.encode(x.flip(-1))], dim=1)     # image, flipped image
        on_batch(z.float(), y)


def all_reduce_moments(total, total_sq, count, device):
    """Sum (float64) the first two moments over ranks; returns (mean, std) of all latent values."""
    t = torch.tensor([total, total_sq, count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    total, total_sq, count = t.tolist()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def shard_moments(z):
    """(sum, sum of squares, count) of a shard's latents in float64, over fixed blocks of rows, so
    that a shard read back from disk gives exactly the values of the one just encoded (a resumed
    cache has the statistics of an uninterrupted one, to the last bit)."""
    total = total_sq = 0.0
    for start in range(0, len(z), ENCODE_BATCH):
        block = np.asarray(z[start:start + ENCODE_BATCH], dtype=np.float64)
        total += float(block.sum())
        total_sq += float(np.square(block).sum())
    return total, total_sq, int(np.prod(z.shape))


# =============================================================================================
# Step 1: cache the latents of the data set
# =============================================================================================
def cache_latents(args, rank, world_size, device):
    tok = load_any_tokenizer(args.tokenizer).to(device)
    cfg = tok.config
    # evaluation transform (centre crop, no random flip): the flip is stored explicitly
    ds = data.make_dataset(args.data_path, cfg.image_size, train=False, seed=args.seed,
                           builtin_size=args.builtin_size)
    # what the cached values and their shards depend on: --resume must find the same (the tokenizer by
    # a checksum of its weights, not its path: a retrained one must not be mixed with its old latents,
    # a moved one may resume)
    settings = dict(weights_checksum=training.weights_checksum(tok), data_path=args.data_path,
                    num_images=len(ds), seed=args.seed, world_size=world_size, shard_images=args.shard_images)
    training.prepare_run_folder(args.cache_dir, args.resume, args.overwrite, holds=("meta.json", "*-latents.npy"),
                                outputs=("*.npy", "meta.json", CACHE_SETTINGS), what="latent cache",
                                flag="--cache-dir")
    settings_path, meta_path = (os.path.join(args.cache_dir, f) for f in (CACHE_SETTINGS, "meta.json"))
    if args.resume:
        if not os.path.isfile(settings_path):
            raise training.MissingFileError(f"--resume: '{args.cache_dir}' holds no cache started by this "
                                            f"version ({CACHE_SETTINGS} missing): use --overwrite")
        with open(settings_path) as f:
            training.check_config(json.load(f), settings, f"latent cache '{args.cache_dir}'")
        if os.path.isfile(meta_path):
            training.print0(f"latent cache '{args.cache_dir}' is complete: nothing to do")
            return
    elif rank == 0:
        with training.atomic_write(settings_path, "w") as f:
            json.dump(settings, f, indent=1)
    if dist.is_initialized():
        dist.barrier()

    # Every rank encodes images rank, rank + world, ... (no padding: each image exactly once), in
    # shards of --shard-images. A shard's latents file is written last (atomically): where it
    # exists the shard is finished, and a resumed run keeps it.
    mine = list(range(rank, len(ds), world_size))
    total = total_sq = count = 0
    kept, t0 = 0, time.time()
    for shard, start in enumerate(range(0, len(mine), args.shard_images)):
        stem = os.path.join(args.cache_dir, f"r{rank:03d}-s{shard:04d}")
        finished = os.path.isfile(stem + "-latents.npy")
        if finished:
            z = np.load(stem + "-latents.npy", mmap_mode="r")
            kept += 1
        else:
            # one loader per shard: the same batches whether or not the run was resumed
            loader = DataLoader(Subset(ds, mine[start:start + args.shard_images]), batch_size=ENCODE_BATCH,
                                num_workers=args.num_workers)
            zs, ys = [], []
            encode_images(tok, loader, device, lambda z, y: (zs.append(z.cpu()), ys.append(y.long())))
            z = torch.cat(zs).numpy()                                       # (n, 2, L, D) float32
            with training.atomic_write(stem + "-labels.npy") as f:
                np.save(f, torch.cat(ys).numpy())                           # (n,) int64
            with training.atomic_write(stem + "-latents.npy") as f:
                np.save(f, z)
        moments = shard_moments(z)
        total, total_sq, count = total + moments[0], total_sq + moments[1], count + moments[2]
        training.print0(f"{stem}: {len(z)} images {'kept (finished before)' if finished else 'encoded'}")
    measured = all_reduce_moments(total, total_sq, count, device)
    # Sec. 4: normalise by scalars of the training set; a released tokenizer's own values win
    carried = tokenizer_stats(tok)
    mean, std = carried or measured
    if dist.is_initialized():
        dist.barrier()   # every shard is on disk before meta.json marks the cache complete
    if rank == 0:
        num_classes = len(ds.classes)
        meta = dict(tokenizer=os.path.abspath(args.tokenizer), data_path=args.data_path,
                    num_images=len(ds), num_classes=num_classes, num_tokens=cfg.num_tokens,
                    token_dim=cfg.token_dim, image_size=cfg.image_size,
                    latent_mean=mean, latent_std=std, stats_from="tokenizer" if carried else "cache",
                    measured_mean=measured[0], measured_std=measured[1])
        with training.atomic_write(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
        training.print0(f"cached {len(ds)} images x 2 (flip) of {cfg.num_tokens}x{cfg.token_dim} latents "
                        f"in {time.time() - t0:.1f}s -> {args.cache_dir} (rank 0 kept {kept} finished shards); "
                        f"latent mean {mean:.6f} std {std:.6f} "
                        f"({'from the tokenizer' if carried else 'measured'}; "
                        f"measured {measured[0]:.6f} / {measured[1]:.6f})")


class LatentCache:
    """The cached latents: memory-mapped shards (n, 2, L, D) with labels. `batch(indices, flips)`
    gathers rows; the file order does not matter because training draws indices at random."""

    def __init__(self, cache_dir):
        meta_path = os.path.join(cache_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise training.MissingFileError(f"no complete latent cache in '{cache_dir}' (meta.json missing): "
                                            f"run train_gen.py --cache-latents --cache-dir {cache_dir} first "
                                            f"(an interrupted one: add --resume)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        files = sorted(glob.glob(os.path.join(cache_dir, "*-latents.npy")))
        self.latents = [np.load(p, mmap_mode="r") for p in files]
        self.labels = np.concatenate([np.load(p.replace("-latents.npy", "-labels.npy")) for p in files])
        self.offsets = np.cumsum([0] + [len(z) for z in self.latents])
        if self.offsets[-1] != self.meta["num_images"]:
            raise training.UserError(f"'{cache_dir}' holds {self.offsets[-1]} cached images, meta.json says "
                                     f"{self.meta['num_images']}: re-run --cache-latents --overwrite")

    def __len__(self):
        return int(self.offsets[-1])

    def batch(self, indices, flips):
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        z = np.stack([self.latents[s][i - self.offsets[s], f] for s, i, f in zip(shard, indices, flips)])
        return torch.from_numpy(z), torch.from_numpy(self.labels[indices])


def epoch_order(num_items, seed, epoch):
    """The shuffled order and flip choices of one epoch: a pure function of (seed, epoch), so a
    resumed run draws the same batches as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=g).numpy(), torch.randint(2, (num_items,), generator=g).numpy()


class LossModule(nn.Module):
    """DDP synchronises gradients through forward(); the generators' training entry is .loss()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


# =============================================================================================
# Step 2: train the generator
# =============================================================================================
def train(args, rank, world_size, device):
    training.prepare_run_folder(args.out, args.resume, args.overwrite, holds=("ckpt.pt", "ckpt-prev.pt"),
                                outputs=("ckpt.pt", "ckpt-prev.pt", "log.jsonl"), what="generator run",
                                flag="--out")
    # ---- data: the latent cache, or images encoded on the fly ----
    if args.batch_size % world_size:
        raise training.UserError(f"--batch-size {args.batch_size} (global) is not divisible by {world_size} "
                                 f"processes")
    local_batch = args.batch_size // world_size
    tok = None
    if not args.on_the_fly:
        if not args.cache_dir:
            raise training.UserError("training reads latents from --cache-dir (written by --cache-latents); "
                                     "or pass --on-the-fly to encode images with --tokenizer every step")
        cache = LatentCache(args.cache_dir)
        meta = cache.meta
        num_items, num_classes = len(cache), meta["num_classes"]
        num_tokens, token_dim = meta["num_tokens"], meta["token_dim"]
        mean, std, tok_path = meta["latent_mean"], meta["latent_std"], meta["tokenizer"]
    else:
        tok = load_any_tokenizer(args.tokenizer).to(device).requires_grad_(False)
        tcfg = tok.config
        ds = data.make_dataset(args.data_path, tcfg.image_size, train=True, seed=args.seed,
                               builtin_size=args.builtin_size)
        num_items, num_classes = len(ds), len(ds.classes)
        num_tokens, token_dim, tok_path = tcfg.num_tokens, tcfg.token_dim, os.path.abspath(args.tokenizer)
        stats = tokenizer_stats(tok)
        if stats is None:   # estimate over the first STATS_IMAGES evaluation-cropped images
            eval_ds = data.make_dataset(args.data_path, tcfg.image_size, train=False, seed=args.seed,
                                        builtin_size=args.builtin_size)
            subset = Subset(eval_ds, range(rank, min(STATS_IMAGES, len(eval_ds)), world_size))
            moments = [0.0, 0.0, 0]

            def on_batch(z, y):
                moments[0] += z.double().sum().item()
                moments[1] += z.double().square().sum().item()
                moments[2] += z.numel()
            encode_images(tok, DataLoader(subset, batch_size=ENCODE_BATCH, num_workers=args.num_workers),
                          device, on_batch)
            stats = all_reduce_moments(*moments, device)
        mean, std = stats
        sampler = data.ResumableSampler(ds, rank, world_size, seed=args.seed)
    steps_per_epoch = num_items // args.batch_size
    if steps_per_epoch == 0:
        raise training.UserError(f"the data set ({num_items} items) is smaller than one global batch "
                                 f"({args.batch_size})")
    total_steps = args.steps if args.steps else args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch

    # ---- model, EMA, optimizer ----
    torch.manual_seed(args.seed)    # same initial weights on every rank
    model = generators.make_generator(args.model, num_tokens, token_dim, num_classes=num_classes).to(device)
    ema = training.EMA(model)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas))
    settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS}
    guard = training.NanGuard()
    step = 0
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    if args.resume:
        ckpt, used = training.resume_checkpoint(ckpt_path, "generator")
        training.check_config(ckpt["config"], dataclasses.asdict(model.config), f"{used} (generator)",
                              defaults=training.dataclass_defaults(generators.GeneratorConfig))
        saved = {k: v for k, v in ckpt["settings"].items() if k not in RUN_ONLY_FLAGS}
        changed = training.check_config(saved, settings, f"{used} (training)", may_change=RESUMABLE_FLAGS)
        if len(ckpt["rng"]) != world_size:
            raise training.UserError(f"'{used}' was written by {len(ckpt['rng'])} processes; resume needs "
                                     f"the same number (this run has {world_size})")
        if ckpt["step"] > total_steps:
            raise training.UserError(f"the schedule ends at step {total_steps}, before the step of {used} "
                                     f"({ckpt['step']}): raise --steps / --epochs")
        if changed:
            training.print0(f"--resume with changed settings: {training.describe_changes(changed)}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        guard.load_state_dict(ckpt["nan_guard"])
        step = int(ckpt["step"])
        training.set_rng_state(ckpt["rng"][rank], device)
        training.print0(f"resumed from {used} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)   # different noise / timesteps / class dropout per rank
    if args.compile:
        # in place: EMA, checkpoints and DDP see the same parameters; called inside DDP's forward,
        # the compiled graph is split at DDP's gradient buckets (dynamo's DDPOptimizer), so the
        # all-reduces still overlap the backward
        training.compile_generator(model)
        training.print0("--compile: the network is compiled in its first steps, then runs fused")
    ddp_model = DDP(LossModule(model)) if dist.is_initialized() else LossModule(model)
    use_bf16 = training.use_bf16(args.precision, device)
    training.print0(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                    f"{num_items} training items, {num_tokens}x{token_dim} latents "
                    f"(mean {mean:.6f}, std {std:.6f}); "
                    f"{total_steps} steps of global batch {args.batch_size} on {world_size} x {device.type}, "
                    f"{'bf16 autocast' if use_bf16 else 'fp32'}")

    def save():
        states = [None] * world_size
        if dist.is_initialized():
            dist.all_gather_object(states, training.rng_state(device))
        else:
            states = [training.rng_state(device)]
        states = [{k: v.cpu() for k, v in s.items()} for s in states]
        if rank == 0:
            training.save_checkpoint(ckpt_path, {
                "kind": "generator", "config": dataclasses.asdict(model.config), "model": model.state_dict(),
                "ema": ema.state_dict(), "latent_mean": mean, "latent_std": std, "tokenizer": tok_path,
                "optimizer": opt.state_dict(), "step": step, "rng": states, "nan_guard": guard.state_dict(),
                "settings": settings})

    # ---- loop ----
    model.train()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    order_epoch, loader_epoch = None, None
    loss_sum, loss_count, t0 = 0.0, 0, time.time()
    stop = min(total_steps, args.stop_at or total_steps)
    log_file = training.open_log(os.path.join(args.out, "log.jsonl"), step) if rank == 0 else None
    ckpt_due = False
    while step < stop:
        epoch, pos = divmod(step, steps_per_epoch)
        if not args.on_the_fly:
            if epoch != order_epoch:
                (order, flips), order_epoch = epoch_order(num_items, args.seed, epoch), epoch
            # this rank's share of global batch `pos` of the epoch
            idx = order[pos * args.batch_size + rank: (pos + 1) * args.batch_size: world_size]
            z, y = cache.batch(idx, flips[idx])
        else:
            if epoch != loader_epoch:   # (re)start the loader at this step's place in the epoch
                sampler.set_position(epoch, pos * local_batch)
                batches = iter(DataLoader(ds, batch_size=local_batch, sampler=sampler, drop_last=True,
                                          num_workers=args.num_workers,   # own generator: global RNG untouched
                                          generator=torch.Generator().manual_seed(args.seed)))
                loader_epoch = epoch
            x, y = next(batches)
            with torch.no_grad():
                z = tok.encode(x.to(device))
        x = ((z.to(device) - mean) / std).float()             # Sec. 4: normalised latents
        y = y.to(device)

        lr = args.lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else args.lr   # MAR: linear warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast:
            loss = ddp_model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # MAR clips at 3.0, SiT at 1.0; DiT does not clip (the norm is still computed for the NaN guard)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        if guard.ok(loss, grad_norm):
            opt.step()
            ema.update(model, args.ema)
            loss_sum += loss.item()
            loss_count += 1
        step += 1

        if step % args.log_every == 0 or step == stop:
            avg = torch.tensor([loss_sum / max(loss_count, 1)], device=device)
            if dist.is_initialized():
                dist.all_reduce(avg)
                avg /= world_size
            elapsed = time.time() - t0
            rec = dict(step=step, loss=avg.item(), lr=lr, img_per_s=loss_count * args.batch_size / elapsed,
                       nan_skipped=guard.skipped)
            training.print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in rec.items()))
            if log_file:
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            loss_sum, loss_count, t0 = 0.0, 0, time.time()
        # a checkpoint due during a streak of skipped NaN/inf steps waits for the next good step
        # (the NanGuard stop promises that the last checkpoint was written before the streak)
        ckpt_due = ckpt_due or step % args.ckpt_every == 0
        if step == stop or (ckpt_due and guard.in_a_row == 0):
            save()
            ckpt_due = False
    if log_file:
        log_file.close()
    training.print0(f"done: {ckpt_path} (step {step} of {total_steps})")


def main(args):
    training.check_flags(args, FLAG_RANGES)
    training.set_precision_policy(train=True)
    with training.distributed(args.device) as (rank, _, world_size, device):
        if args.cache_latents:
            if not args.cache_dir:
                raise training.UserError("--cache-latents needs --cache-dir (where the shards go)")
            cache_latents(args, rank, world_size, device)
        else:
            train(args, rank, world_size, device)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny"], help="tiny: CPU run on the built-in data (< 2 min)")
    p.add_argument("--cache-latents", action="store_true", help="encode the data set into --cache-dir and stop")
    p.add_argument("--tokenizer", help="train_tok.py checkpoint, or a released tokenizer folder")
    p.add_argument("--data-path", help=f"ImageFolder root or '{data.BUILTIN}'")
    p.add_argument("--cache-dir", help="latent cache (written by --cache-latents, read by training)")
    p.add_argument("--on-the-fly", action="store_true",
                   help="train without a cache: encode --data-path images with --tokenizer every step")
    p.add_argument("--builtin-size", type=int, help="images in the built-in data set")
    p.add_argument("--shard-images", type=int,
                   help=f"--cache-latents: images per shard file and rank (default {SHARD_IMAGES}; tiny "
                        f"{TINY['shard_images']}): the unit a resumed cache keeps")
    p.add_argument("--out", help="output folder (ckpt.pt)")
    p.add_argument("--model", help="generator preset (generators.GEN_PRESETS), default SiT-XL")
    p.add_argument("--steps", type=int, help="training steps (DiT/SiT default 3M; MAR uses --epochs)")
    p.add_argument("--epochs", type=int, help="training epochs when --steps is not given (MAR: 500)")
    p.add_argument("--batch-size", type=int, help="global batch size (DiT/SiT 256, MAR 2048)")
    p.add_argument("--lr", type=float, help="learning rate (DiT/SiT 1e-4, MAR 2e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (DiT/SiT 0, MAR 0.02)")
    p.add_argument("--betas", type=float, nargs=2, help="AdamW betas (DiT/SiT 0.9 0.999, MAR 0.9 0.95)")
    p.add_argument("--warmup-epochs", type=int, help="linear lr warm-up (MAR 100, DiT/SiT 0)")
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 = off (SiT 1.0, MAR 3.0, DiT off)")
    p.add_argument("--ema", type=float, help="EMA decay (0.9999)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--num-workers", type=int, help="data loader workers per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/ckpt.pt (or ckpt-prev.pt if it is damaged; --lr, --warmup-epochs, "
                        "--steps, --epochs, --grad-clip may change); with --cache-latents: finish an "
                        "interrupted cache, keeping its finished shards")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out folder holding a checkpoint, or a --cache-dir holding latents "
                        "(deletes them)")
    p.add_argument("--stop-at", type=int,
                   help="stop (with a checkpoint) after this step; the schedule still ends at --steps")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda ...")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype; auto: bf16 on GPUs, fp32 on CPUs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator network (the first steps compile); a run may resume "
                        "with or without it")
    training.run_main(lambda: main(resolve(p.parse_args())))
