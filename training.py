"""Training utilities shared by train_tok.py, train_gen.py, sample.py and evaluate.py.

  distributed()                   torchrun-aware process group + device (world size 1 without torchrun)
  print0(...)                     print on rank 0 only
  atomic_write(path)              `with` a temp file renamed over path on success (no truncated files)
  save_checkpoint / load_checkpoint   atomic write (temp file + os.replace); torch.load(weights_only=True)
  rng_state() / set_rng_state()   python, numpy, torch CPU and accelerator RNG states, as tensors
  check_config(saved, now, what)  refuse a checkpoint of another configuration, naming the fields
  EMA                             exponential moving average of a model's trainable weights (+ buffers)
  NanGuard                        skip steps with non-finite loss/gradients, stop after many in a row
  to_uint8(x)                     images in [-1, 1] -> rounded uint8, as PNGs store them
  save_image_grid(x, path)        PNG grid of images in [-1, 1] or uint8 (PIL)
  use_bf16(precision, device)     --precision auto | bf16 | fp32 -> bf16 autocast or not
  cosine_lr(step, ...)            linear warm-up then cosine decay to a minimum
  load_tokenizer(path, ema=True)  rebuild a SoftVQ-VAE from a train_tok.py checkpoint

Checkpoints hold only tensors, dicts, lists, tuples, strings and numbers, so they load with
`torch.load(weights_only=True)` (no pickled code runs when a checkpoint is opened).
"""

import contextlib
import dataclasses
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

MAX_NONFINITE_IN_A_ROW = 20     # NanGuard: this many skipped steps in a row stop the run


# ---- distributed ----

@contextlib.contextmanager
def distributed(device_type="auto"):
    """`with distributed() as (rank, local_rank, world_size, device):` the body of a script.

    Read RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun), pick the device from LOCAL_RANK and
    start the process group: NCCL on GPUs (also ROCm, which torch calls "cuda"), gloo on CPU.
    Without torchrun: rank 0 of a world of 1, no process group. device_type "cpu" forces the CPU.
    The process group is torn down when the block ends, also on an error."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device(device_type, local_rank)   # one process per device on each node
        getattr(torch, device_type).set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if backend == "nccl" else None)
    try:
        yield rank, local_rank, world_size, device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only, flushed (logs of torchrun jobs are read while they run)."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


# ---- checkpoints ----

@contextlib.contextmanager
def atomic_write(path, mode="wb", fsync=False):
    """`with atomic_write(path) as f:` writes to a temp file in the same folder and renames it over
    `path` when the block succeeds, so a run killed mid-write leaves the old file (or none), never
    a truncated one. fsync=True also forces the data to disk before the rename (checkpoints)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):          # only if writing failed: never leave a half file behind
            os.remove(tmp)


def save_checkpoint(path, state):
    """Write `state` atomically and durably (atomic_write with fsync): a run killed while saving
    leaves the previous checkpoint intact."""
    with atomic_write(path, fsync=True) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """torch.load on the CPU with weights_only=True. A missing file is a FileNotFoundError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(device=torch.device("cpu")):
    """All RNG states this process uses, as tensors (python `random`, numpy, torch CPU, and the
    accelerator's when `device` is one)."""
    _, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_keys, dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos_gauss": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device.type != "cpu":
        state["accelerator"] = getattr(torch, device.type).get_rng_state(device)
    return state


def set_rng_state(state, device=torch.device("cpu")):
    """Inverse of rng_state()."""
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss if has_gauss else None))
    pos, np_has_gauss, np_gauss = state["numpy_pos_gauss"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss),
                         np_gauss))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu":
        if "accelerator" not in state:
            raise ValueError(f"checkpoint has no {device.type} RNG state (it was written on the CPU)")
        getattr(torch, device.type).set_rng_state(state["accelerator"], device)


def check_config(saved, current, what="checkpoint"):
    """Raise ValueError if two flat config dicts differ, naming every differing field with both
    values. Used to refuse resuming (or loading) a checkpoint written by another configuration."""
    missing = "<absent>"
    diff = [f"{k}: {what} has {saved.get(k, missing)!r}, this run has {current.get(k, missing)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, missing) != current.get(k, missing)]
    if diff:
        raise ValueError(f"{what} was written with a different configuration; differing fields:\n  "
                         + "\n  ".join(diff))


# ---- EMA ----

class EMA:
    """Exponential moving average of a model: every trainable parameter p is tracked as
    ema = decay * ema + (1 - decay) * p; buffers (e.g. latent statistics) are copied. Frozen
    parameters are stored once and never averaged (they do not change). `state_dict()` has the
    model's own keys, so `model.load_state_dict(ema.state_dict())` gives the averaged model.
    Give it the bare model (not the DDP wrapper): keys without a `module.` prefix."""

    def __init__(self, model):
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.buffers = [n for n, _ in model.named_buffers() if n in self.shadow]

    @torch.no_grad()
    def update(self, model, decay):
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        # one fused pass over all tensors: ema += (1 - decay) * (p - ema)
        torch._foreach_lerp_([self.shadow[n] for n in self.trainable],
                             [params[n].detach() for n in self.trainable], 1.0 - decay)
        for n in self.buffers:
            self.shadow[n].copy_(buffers[n])

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        if set(state) != set(self.shadow):
            missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA state keys differ from the model's: missing {missing}, unexpected {unexpected}")
        for k, v in state.items():
            self.shadow[k].copy_(v)


# ---- NaN / inf guard ----

class NanGuard:
    """Decides whether an optimiser step may be taken: `ok(loss, grad_norm)` is False when any value
    is NaN or inf (on any rank: the decision is all-reduced so every rank skips together). Skipped
    steps are counted (`skipped`); `max_in_a_row` consecutive skips raise RuntimeError, so the run
    stops with its last checkpoint (written before the trouble) intact."""

    def __init__(self, max_in_a_row=MAX_NONFINITE_IN_A_ROW):
        self.max_in_a_row, self.skipped, self.in_a_row = max_in_a_row, 0, 0

    def ok(self, *values):
        finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 1.0:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(f"{self.in_a_row} steps in a row had a NaN/inf loss or gradient norm "
                               f"({self.skipped} skipped in total); stopping. The last checkpoint was "
                               f"written before these steps: lower the learning rate or check the data, "
                               f"then --resume.")
        return False

    def state_dict(self):
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state):
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])


# ---- images, schedules ----

def to_uint8(x):
    """Images in [-1, 1], (B, 3, H, W) float -> uint8 in [0, 255], rounded (as PNGs store them)."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def save_image_grid(images, path, nrow=8, padding=2):
    """Save images (B, 3, H, W), in [-1, 1] or already uint8, as one PNG grid, `nrow` images per
    row, white padding."""
    images = (images if images.dtype == torch.uint8 else to_uint8(images)).cpu()
    b, _, h, w = images.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    grid = torch.full((3, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 255,
                      dtype=torch.uint8)
    for i in range(b):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def use_bf16(precision, device):
    """--precision auto | bf16 | fp32 -> whether to train under bf16 autocast. auto: bf16 on
    accelerators (the paper's setting), fp32 on CPUs, where bf16 is emulated (slow) but still runs,
    so forcing it lets a CPU test exercise the accelerators' code path."""
    return precision == "bf16" or (precision == "auto" and device.type != "cpu")


def cosine_lr(step, base_lr, warmup_steps, total_steps, min_lr):
    """Learning rate for 0-based `step`: linear warm-up to base_lr over warmup_steps, then a cosine
    decay from base_lr to min_lr at total_steps (App. C.1: cosine annealing with linear warm-up).
    A pure function of the step, so resuming needs no scheduler state beyond the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---- tokenizer checkpoints ----

def load_tokenizer(path, ema=True):
    """Rebuild the tokenizer stored in a train_tok.py checkpoint: ckpt["config"] (the
    TokenizerConfig as a dict) -> model, then its EMA weights (ema=True, the default: the weights
    the paper evaluates) or raw weights. Latent mean/std buffers come with the weights.
    Returns the model in eval mode on the CPU."""
    import tokenizer   # deferred: training.py is also used by stages that never build a tokenizer

    ckpt = load_checkpoint(path)
    known = {f.name for f in dataclasses.fields(tokenizer.TokenizerConfig)}
    unknown = sorted(set(ckpt["config"]) - known)
    if unknown:
        raise ValueError(f"'{path}': config fields unknown to tokenizer.TokenizerConfig: {unknown}")
    model = tokenizer.SoftVQVAE(tokenizer.TokenizerConfig(**ckpt["config"]))
    key = "ema" if ema else "model"
    if key not in ckpt:
        raise ValueError(f"'{path}' holds no '{key}' weights (keys: {sorted(ckpt)})")
    model.load_state_dict(ckpt[key])
    return model.eval()


def average_gradients(params):
    """All-reduce and average the gradients of `params` over ranks in one flat buffer (for modules
    trained outside DDP, e.g. the discriminator heads)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
