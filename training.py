"""Training utilities shared by train_tok.py, train_gen.py, sample.py and evaluate.py.

  UserError, MissingFileError     errors the user can fix; run_main prints them as one line
  run_main(fn)                    a stage's `__main__`: user errors -> `error: ...`, exit 1, no traceback
  check_flags(args, ranges)       refuse zero / negative / out-of-range numeric flags, naming them
  distributed()                   torchrun-aware process group + device (world size 1 without torchrun)
  print0(...)                     print on rank 0 only
  atomic_write(path)              `with` a temp file renamed over path on success (no truncated files)
  save_checkpoint / load_checkpoint   atomic write keeping the previous checkpoint (<name>-prev.pt);
                                  loading verifies the file (CRC-32 of every record) and its kind
  resume_checkpoint(path, kind)   the checkpoint --resume continues: path, or the previous one
  prepare_run_folder(...)         never replace a run silently: --resume / --overwrite; stale temps go
  open_log(path, step)            a run's log.jsonl without the lines written after its checkpoint
  rng_state() / set_rng_state()   python, numpy, torch CPU and accelerator RNG states, as tensors
  check_config(saved, now, what)  refuse a checkpoint of another configuration, naming the fields
  EMA                             exponential moving average of a model's trainable weights (+ buffers)
  NanGuard                        skip steps with non-finite loss/gradients, stop after many in a row
  to_uint8(x)                     images in [-1, 1] -> rounded uint8, as PNGs store them
  save_image_grid(x, path)        PNG grid of images in [-1, 1] or uint8 (PIL)
  use_bf16(precision, device)     --precision auto | bf16 | fp32 -> bf16 autocast or not
  set_precision_policy(train)     the precision policy (written out above use_bf16): TF32 when training
  compile_module / compile_generator   --compile: torch.compile in place (state_dict keys unchanged)
  force_eager()                   context: compiled modules run eagerly (benchmarks time both)
  cosine_lr(step, ...)            linear warm-up then cosine decay to a minimum
  load_tokenizer(path, ema=True)  rebuild a SoftVQ-VAE from a train_tok.py checkpoint
  load_models(args)               generator + its tokenizer + latent mean / std (sample.py, evaluate.py)
  synchronize / device_name / peak_flops / reset_peak_memory / peak_memory
                                  timing and memory helpers of the benchmarks (train_tok, evaluate)
  weights_checksum(*modules)      a number that changes with any weight (output folders record it)

Checkpoints hold only tensors, dicts, lists, tuples, strings and numbers, so they load with
`torch.load(weights_only=True)` (no pickled code runs when a checkpoint is opened). Each records
what wrote it: "kind" is "tokenizer" (train_tok.py) or "generator" (train_gen.py).

Fault injection (fault_injection.py): SOFTVQ_KILL_IN_WRITE=<file name pattern>:<n>:<point> makes a
process kill itself (SIGKILL, as `kill -9`) inside its n-th atomic write of a matching file, at a
chosen point (see atomic_write), so that kills inside a write, which takes milliseconds, are
tested deterministically.
"""

import collections
import contextlib
import dataclasses
import fnmatch
import glob
import json
import math
import os
import pickle
import random
import re
import runpy
import signal
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

MAX_NONFINITE_IN_A_ROW = 20     # NanGuard: this many skipped steps in a row stop the run
TEMP_SUFFIX = ".tmp"            # atomic_write's temp files: <path>.tmp<pid>
KILL_ENV = "SOFTVQ_KILL_IN_WRITE"
KILL_POINTS = ("start", "middle", "end", "rotate")
CHECKPOINT_WRITERS = {"tokenizer": "train_tok.py", "generator": "train_gen.py"}   # kind -> script


# ---- errors the user can fix, and the command line around them ----

class UserError(ValueError):
    """A problem the user can fix: a flag value, a path, a file's contents, a checkpoint of another
    kind or configuration, data that makes training diverge. run_main prints its message as one
    line instead of a traceback. A ValueError, so library callers can catch it as before."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that was named (by a flag, a checkpoint, a default path) does not exist."""


def run_main(fn):
    """The body of every stage's `if __name__ == "__main__":`, as `run_main(lambda: main(args))`.
    A UserError, a FileNotFoundError (the model files, which import only torch, raise those for
    missing released weights) or an OSError about a named file (no permission, a full disk) ends
    the program with one line `error: <message>` on stderr and exit status 1: the user can act on
    the message, and a traceback would bury it. Any other exception is a bug and keeps its traceback."""
    try:
        fn()
    except Exception as err:
        if not isinstance(err, (UserError, FileNotFoundError)) and not (isinstance(err, OSError) and err.filename):
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        sys.exit(f"{rank}error: {err}")


def run_script(path, argv):
    """Run `python <path> argv...` in this process: the script's `__main__` block, as its command
    line would, without a new interpreter (the drivers pipeline_tiny.py and study_cifar.py run the
    stages this way, saving the 3-6 s of importing torch and its compiler per stage on a CPU).
    A stage that ends with an error raises UserError with its message."""
    argv = [str(a) for a in argv]
    old = sys.argv
    sys.argv = [os.path.basename(path), *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise UserError(f"{os.path.basename(path)} stopped: {stop.code}") from None
    finally:
        sys.argv = old


_RANGE = re.compile(r"(>=?) (\S+)|in ([\[(])(\S+), (\S+)([\])])")


def check_flags(args, ranges):
    """Refuse numeric flags outside their range before anything is built. `ranges` maps an
    attribute of args to its range written as the error message shows it: "> 0", ">= 0",
    "in [0, 1)" (a square bracket includes its bound). Unset (None) and absent attributes pass;
    list values (e.g. --betas) are checked element by element; NaN and inf never pass."""
    for name, rule in ranges.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        m = _RANGE.fullmatch(rule)
        if m is None:
            raise ValueError(f"range rule {rule!r} of {name} is not '> x', '>= x' or 'in [a, b)'")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if m[1]:
                ok = v > float(m[2]) if m[1] == ">" else v >= float(m[2])
            else:
                lo, hi = float(m[4]), float(m[5])
                ok = (lo <= v if m[3] == "[" else lo < v) and (v <= hi if m[6] == "]" else v < hi)
            if not (ok and math.isfinite(v)):
                raise UserError(f"--{name.replace('_', '-')} must be {rule} (got {value})")


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


# ---- checkpoints and run folders ----

_writes_seen = collections.Counter()


def _kill_point(path):
    """Fault injection: the point of this atomic write of `path` at which SOFTVQ_KILL_IN_WRITE
    (<file name pattern>:<n>:<point>) asks this process to kill itself, or None. Writes are
    counted per pattern in this process; the n-th (1-based) matching one is hit."""
    plan = os.environ.get(KILL_ENV)
    if not plan:
        return None
    pattern, n, point = plan.rsplit(":", 2)
    if point not in KILL_POINTS:
        raise ValueError(f"{KILL_ENV}={plan!r}: the point must be one of {KILL_POINTS}")
    if not fnmatch.fnmatch(os.path.basename(path), pattern):
        return None
    _writes_seen[pattern] += 1
    return point if _writes_seen[pattern] == int(n) else None


def _die():
    os.kill(os.getpid(), signal.SIGKILL)      # as `kill -9`: no cleanup, no finally blocks


@contextlib.contextmanager
def atomic_write(path, mode="wb", fsync=False, previous=None):
    """`with atomic_write(path) as f:` writes to a temp file in the same folder (<path>.tmp<pid>)
    and renames it over `path` when the block succeeds, so a run killed mid-write leaves the old
    file (or none), never a truncated one. fsync=True also forces the data to disk before the
    rename (checkpoints). previous: a path that the file being replaced is first renamed to.
    A killed process leaves its temp file (remove_stale_temps deletes it at the next start).
    Kill points of SOFTVQ_KILL_IN_WRITE, by what they leave: start (an empty temp file), middle
    (a temp file with half the data), end (a complete temp file, not renamed), rotate (with
    `previous`: the old file already renamed to it, the new one not yet in place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}{TEMP_SUFFIX}{os.getpid()}"
    kill = _kill_point(path)
    try:
        with open(tmp, mode) as f:
            if kill == "start":
                _die()
            yield f
            f.flush()
            if kill == "middle":
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                _die()
            if fsync:
                os.fsync(f.fileno())
        if kill == "end":
            _die()
        if previous is not None and os.path.exists(path):
            os.replace(path, previous)
            if kill == "rotate":
                _die()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):          # only if writing failed: never leave a half file behind
            os.remove(tmp)


def remove_stale_temps(folder):
    """Delete the temp files that killed processes left in `folder` (atomic_write's
    <name>.tmp<pid>: up to a whole checkpoint each). Call it where no other process is writing."""
    if not os.path.isdir(folder):
        return
    stale = re.compile(rf".+{re.escape(TEMP_SUFFIX)}\d+")
    for name in os.listdir(folder):
        if stale.fullmatch(name):
            os.remove(os.path.join(folder, name))


def previous_checkpoint(path):
    """runs/x/ckpt.pt -> runs/x/ckpt-prev.pt: where save_checkpoint keeps the checkpoint before."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-prev{ext}"


def checkpoint_problem(path):
    """What is wrong with the file `path` as a checkpoint, or None. torch.save writes a zip archive
    with a CRC-32 of every record, which torch.load does not check (a flipped bit loads
    silently), so this does: it finds a missing file, a truncated one (its zip directory, at the
    end, is gone) and any damaged record, without unpickling anything (~2 GB/s)."""
    if not os.path.isfile(path):
        return "it does not exist"
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError) as err:
        return f"it is truncated or not a checkpoint ({err})"
    return None if bad is None else f"it is corrupt (record {bad} fails its CRC-32 check)"


def save_checkpoint(path, state):
    """Write `state` atomically and durably (atomic_write with fsync). The checkpoint it replaces
    becomes <name>-prev.pt if it passes checkpoint_problem (a corrupt one is overwritten, never
    kept as the fallback), so a checkpoint spoiled later (a copy cut short, a bad disk) still
    leaves the one before it, and a run killed while saving leaves both intact."""
    keep = os.path.exists(path) and checkpoint_problem(path) is None
    with atomic_write(path, fsync=True, previous=previous_checkpoint(path) if keep else None) as f:
        torch.save(state, f)


def checkpoint_kind(ckpt):
    """"tokenizer" or "generator": what wrote a checkpoint. Checkpoints written before they
    recorded it are told apart by their config (generators have an "arch", tokenizers an
    "image_size"); None when neither."""
    if "kind" in ckpt:
        return ckpt["kind"]
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return "generator" if "arch" in config else "tokenizer" if "image_size" in config else None


def read_checkpoint(path, kind=None, flag="--ckpt"):
    """Verify (checkpoint_problem), then torch.load on the CPU with weights_only=True. Any problem
    is a UserError naming the file and what is wrong, a missing file a MissingFileError; with
    `kind`, a checkpoint of the other kind is named as such ("this is a tokenizer checkpoint;
    --ckpt needs a generator checkpoint (from train_gen.py)", `flag` the option that gave it)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        error = MissingFileError if not os.path.isfile(path) else UserError
        raise error(f"checkpoint '{path}': {problem}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"checkpoint '{path}' cannot be loaded: {str(err).splitlines()[0]}") from err
    if not isinstance(ckpt, dict):
        raise UserError(f"'{path}' is not a checkpoint of this project (it holds a {type(ckpt).__name__}, not a dict)")
    found = checkpoint_kind(ckpt)
    if kind is not None and found != kind:
        this = f"this is a {found} checkpoint" if found else "this is neither a tokenizer nor a generator checkpoint"
        raise UserError(f"'{path}': {this}; {flag} needs a {kind} checkpoint (from {CHECKPOINT_WRITERS[kind]})")
    return ckpt


def load_checkpoint(path, kind=None, flag="--ckpt"):
    """read_checkpoint; when `path` is missing, truncated or corrupt and the run's previous
    checkpoint (<name>-prev.pt) is sound, the message says to use that one instead."""
    try:
        return read_checkpoint(path, kind, flag)
    except UserError as err:
        prev = previous_checkpoint(path)
        if checkpoint_problem(path) is None or checkpoint_problem(prev) is not None:
            raise
        raise type(err)(f"{err}; the run's previous checkpoint is sound: {flag} {prev}") from None


def resume_checkpoint(path, kind):
    """The checkpoint --resume continues: `path`, or when that is missing, truncated or corrupt
    (a kill between the two renames of a save, a copy cut short, a bad disk) the previous one,
    saying so. Returns (checkpoint, the path it came from)."""
    problem, prev = checkpoint_problem(path), previous_checkpoint(path)
    if problem is None or not os.path.isfile(prev):
        if not os.path.isfile(path):
            raise MissingFileError(f"--resume: nothing to resume, '{path}' does not exist "
                                   f"(start without --resume)")
        return read_checkpoint(path, kind, "--resume"), path
    try:
        ckpt = read_checkpoint(prev, kind, "--resume")
    except UserError as err:
        raise UserError(f"checkpoint '{path}': {problem}; and the previous one: {err}") from None
    print0(f"warning: checkpoint '{path}': {problem}; resuming from the previous checkpoint "
           f"'{prev}' (step {ckpt['step']}) instead")
    return ckpt, prev


def prepare_run_folder(folder, resume, overwrite, holds, outputs, what, flag):
    """Every rank, before anything is built: a finished or interrupted run is never replaced
    silently. A folder holding files matching `holds` (glob patterns: its checkpoints) may only be
    continued (--resume) or, with --overwrite, started again, which first deletes the files
    matching `outputs` (what this stage writes; anything else in the folder stays). Stale temp
    files of killed writes are removed in any case. Rank 0 changes the folder, then all wait."""
    if resume and overwrite:
        raise UserError(f"--resume continues the {what} in '{folder}', --overwrite starts it again: pass one")
    found = [f for pattern in holds for f in sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))]
    if found and not (resume or overwrite):
        raise UserError(f"'{folder}' already holds a {what} ({os.path.basename(found[0])}): pass --resume "
                        f"to continue it, --overwrite to start it again (its files are deleted), or "
                        f"another {flag}")
    if is_rank0():
        if overwrite:
            for pattern in outputs:
                for f in glob.glob(os.path.join(glob.escape(folder), pattern)):
                    os.remove(f)
        remove_stale_temps(folder)
    if dist.is_initialized():
        dist.barrier()


def open_log(path, step):
    """Open a run's log.jsonl for appending (rank 0), first dropping the lines of steps after
    `step`, the step the run starts from: a resumed run writes them again, and a fresh run
    (step 0) replaces a log whose run never reached a checkpoint. A line cut short by a kill is
    dropped too."""
    if os.path.isfile(path):
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        with atomic_write(path, "w") as f:
            f.writelines(keep)
    return open(path, "a")


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
            raise UserError(f"checkpoint has no {device.type} RNG state (it was written on the CPU; "
                            f"resume it with --device cpu)")
        getattr(torch, device.type).set_rng_state(state["accelerator"], device)


def check_config(saved, current, what="checkpoint", may_change=(), defaults=None):
    """Raise a UserError if two flat config dicts differ outside `may_change`, naming every
    differing field with both values (one line). Used to refuse resuming (or loading) a checkpoint
    written by another configuration. Returns the allowed changes, {field: (saved, current)}.
    `defaults` (e.g. dataclass_defaults(TokenizerConfig)): a field added to the code after the
    checkpoint was written is absent from `saved`; it is accepted when this run keeps its default,
    which is what the code did before the field existed (new fields keep the old behaviour)."""
    missing = "<absent>"
    defaults = defaults or {}
    saved = {**{k: v for k, v in defaults.items() if k not in saved and current.get(k, missing) == v}, **saved}
    diff = {k: (saved.get(k, missing), current.get(k, missing)) for k in sorted(set(saved) | set(current))
            if saved.get(k, missing) != current.get(k, missing)}
    refused = [f"{k} ({what} has {a!r}, this run has {b!r})" for k, (a, b) in diff.items() if k not in may_change]
    if refused:
        raise UserError(f"{what} was written with a different configuration; differing fields: "
                        + "; ".join(refused))
    return diff


def dataclass_defaults(cls):
    """{field: default} of a config dataclass (check_config's `defaults`)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def describe_changes(changes):
    """{field: (old, new)} -> "lr 0.016 -> 0.001, iters 200 -> 400" (the line --resume prints)."""
    return ", ".join(f"{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changes.items())


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


def unreadable_images(dataset, device):
    """How many distinct unreadable files the data set has met on every rank together (its own
    `skipped` counts this rank's: each rank reads its own shard). A collective: every rank calls it."""
    bad = getattr(dataset, "_bad", None)                  # ImageFolder's shared per-file flags
    if bad is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dataset.skipped
    flags = bad.to(device=device, dtype=torch.uint8)      # a file met by two ranks counts once
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags.sum())


# ---- NaN / inf guard ----

class NanGuard:
    """Decides whether an optimiser step may be taken: `ok(loss, grad_norm)` is False when any value
    is NaN or inf (on any rank: the decision is all-reduced so every rank skips together). Skipped
    steps are counted (`skipped`); `max_in_a_row` consecutive skips raise a UserError. The training
    scripts write no checkpoint while `in_a_row` > 0, so the last checkpoint is from before the
    trouble and --resume (with the lower --lr the message advises) starts from there."""

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
            raise UserError(f"{self.in_a_row} steps in a row had a NaN/inf loss or gradient norm "
                            f"({self.skipped} skipped in total); stopping. The last checkpoint was "
                            f"written before these steps: lower the learning rate or check the data, "
                            f"then --resume (--lr and the schedule may change on --resume).")
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
    with atomic_write(path) as f:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")


def cosine_lr(step, base_lr, warmup_steps, total_steps, min_lr):
    """Learning rate for 0-based `step`: linear warm-up to base_lr over warmup_steps, then a cosine
    decay from base_lr to min_lr at total_steps (App. C.1: cosine annealing with linear warm-up).
    A pure function of the step, so resuming needs no scheduler state beyond the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---- precision policy and torch.compile (every stage applies them from here) ----
#
# Precision policy (what use_bf16 and set_precision_policy implement):
#   Training (train_tok.py, train_gen.py): the networks run under bf16 autocast on accelerators
#     (App. C.1 / C.2: bf16), in fp32 on CPUs unless --precision bf16. Always fp32: weights,
#     gradients, AdamW's moments, the EMA; SoftVQ's soft assignments (quantizers.py) and the
#     discriminator heads (spectral norm's power iteration) with autocast off; the losses, formed
#     from fp32 copies of the outputs (reconstruction, alignment, logits, velocity / epsilon
#     targets); only LPIPS's own VGG and linear heads run in bf16, as any network. TF32 is allowed
#     on CUDA for the matmuls and convolutions left in fp32, as the official training scripts do.
#   Sampling and every metric (sample.py, evaluate.py, including its throughput timing): fp32
#     with TF32 off. PyTorch's default lets cuDNN convolutions use TF32, which would shift the
#     Inception (FID / IS) and VGG (LPIPS) features; samples are what gFID is computed on.

def use_bf16(precision, device):
    """--precision auto | bf16 | fp32 -> whether to train under bf16 autocast. auto: bf16 on
    accelerators (the paper's setting), fp32 on CPUs, where bf16 is emulated (slow) but still runs,
    so forcing it lets a CPU test exercise the accelerators' code path."""
    return precision == "bf16" or (precision == "auto" and device.type != "cpu")


def set_precision_policy(train):
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA: allowed when training (train=True),
    off for sampling and metrics (the policy above). No effect on CPUs."""
    torch.backends.cuda.matmul.allow_tf32 = train
    torch.backends.cudnn.allow_tf32 = train


def compile_module(module, dynamic=False):
    """--compile: torch.compile `module` in place with inductor's default mode, and return it.
    nn.Module.compile (or the module's own .compile, e.g. train_tok's discriminator, which compiles
    its backbone's taps and its heads) keeps state_dict keys as they are: the EMA, checkpoints and
    released exports have no `_orig_mod.` prefix, and a checkpoint of a compiled run loads into an
    eager model and back. The first calls are slow (compiling); later ones run the fused code.
    dynamic=False: one graph per input shape, each compiled once (CFG's doubled batch and the
    plain batch outside the guidance interval: two graphs, then no recompilation); dynamic=True for
    networks whose input shapes change at every step (MAR's known-token counts).
    fallback_random: random ops inside a graph (LPIPS's dropout, KL sampling) draw from torch's own
    generator, as in eager mode, so a compiled run draws the same random numbers as an eager one
    and its checkpointed RNG state is all that an exact resume needs.
    Not "reduce-overhead" (CUDA graphs): a graph's outputs live in static buffers that its next
    call overwrites, and the Heun sampler reads one call's output after the next; nor
    "max-autotune", whose matmul search lengthens the compile; neither could be measured on this
    project's machines (no GPU)."""
    module.compile(dynamic=dynamic, options={"fallback_random": True})
    return module


def compile_generator(model):
    """--compile for a DiT / SiT / MAR network (train_gen.py, sample.py, evaluate.py throughput).
    DiT / SiT: static shapes (the sampler calls the network at two batch sizes, see
    compile_module). MAR: the encoder sees a different number of known tokens and the head a
    different number of tokens at every generation step and every training step (random mask
    ratios): dynamic shapes for the network and its head, one graph for every count of two or more
    (dynamo specialises counts 0 and 1: a graph each), per grad mode."""
    if model.config.arch == "mar":
        compile_module(model.head, dynamic=True)
        return compile_module(model, dynamic=True)
    return compile_module(model)


def force_eager():
    """Context in which compiled modules run their eager code: the benchmarks of train_tok.py and
    evaluate.py time eager and compiled code in one run. Needs torch >= 2.6 (set_stance)."""
    if not hasattr(torch.compiler, "set_stance"):
        raise UserError(f"timing eager beside compiled code needs torch >= 2.6 (torch.compiler.set_stance); "
                        f"this is torch {torch.__version__}")
    return torch.compiler.set_stance("force_eager")


# ---- tokenizer checkpoints ----

def load_tokenizer(path, ema=True, flag="--tokenizer"):
    """Rebuild the tokenizer stored in a train_tok.py checkpoint: ckpt["config"] (the
    TokenizerConfig as a dict) -> model, then its EMA weights (ema=True, the default: the weights
    the paper evaluates) or raw weights. Latent mean/std buffers come with the weights.
    A missing, corrupt or generator checkpoint is a UserError naming `flag`.
    Returns the model in eval mode on the CPU."""
    import tokenizer   # deferred: training.py is also used by stages that never build a tokenizer

    ckpt = load_checkpoint(path, "tokenizer", flag)
    known = {f.name for f in dataclasses.fields(tokenizer.TokenizerConfig)}
    unknown = sorted(set(ckpt["config"]) - known)
    if unknown:
        raise UserError(f"'{path}': config fields unknown to tokenizer.TokenizerConfig: {unknown}")
    model = tokenizer.SoftVQVAE(tokenizer.TokenizerConfig(**ckpt["config"]))
    key = "ema" if ema else "model"
    if key not in ckpt:
        raise UserError(f"'{path}' holds no '{key}' weights (keys: {sorted(ckpt)})")
    model.load_state_dict(ckpt[key])
    return model.eval()


def weights_checksum(*modules):
    """A number that changes when any weight changes: the float64 sum of every tensor, on the CPU
    (so any device agrees). Output folders (samples, a latent cache) record it so that a model
    retrained at the same path is never mixed with its old outputs."""
    return sum(v.detach().cpu().double().sum().item() for m in modules for v in m.state_dict().values())


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


# ---- devices and timing (benchmarks of train_tok.py and evaluate.py) ----
PEAK_MATMUL = {"cpu": 1024}  # matmul size for the peak measurement (8192 on accelerators)
PEAK_MIN_SECONDS = 1.0      # repeat the peak matmul at least this long


def device_name(device):
    """What benchmarks print as the device: the accelerator's name, or the CPU's thread count."""
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)")


def synchronize(device):
    """Wait for queued kernels (timing); a no-op on the CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def reset_peak_memory(device):
    """Start a new peak-memory measurement on an accelerator (a CPU's peak RSS cannot be reset)."""
    if device.type != "cpu":
        getattr(torch, device.type).reset_peak_memory_stats(device)


def peak_memory(device):
    """Peak memory in bytes: allocated on an accelerator since reset_peak_memory, else the
    process's peak RSS (on a CPU it cannot separate two measurements of one process)."""
    if device.type != "cpu":
        return getattr(torch, device.type).max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_flops(device, dtype):
    """FLOP/s of a large square matmul in `dtype` on `device`: the bound used for the fraction."""
    n = PEAK_MATMUL.get(device.type, 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b                                                   # warm-up
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < PEAK_MIN_SECONDS:
        a @ b
        synchronize(device)
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def load_models(args, flag="--ckpt"):
    """(generator, tokenizer, latent mean, latent std, tokenizer path) from --ckpt / --tokenizer.

    A file is a train_gen.py checkpoint (its EMA weights, the paper samples with EMA; its
    tokenizer path and latent statistics); a folder is a released SiT / DiT, which needs
    --tokenizer (a released tokenizer folder carries the latent mean / std as vq_mean / vq_std;
    our exports, generators.save_released, also carry them in the generator's config, which wins).
    A missing, damaged or tokenizer checkpoint is a UserError naming `flag` (the option of args.ckpt)."""
    import generators            # deferred, as in load_tokenizer
    import tokenizer as tokenizer_lib

    if args.ckpt is None:
        raise UserError(f"no generator given: pass {flag} <train_gen.py ckpt.pt or released SiT/DiT folder>")
    if os.path.isdir(args.ckpt):
        model = generators.load_released(args.ckpt)
        if args.tokenizer is None:
            raise UserError(f"'{args.ckpt}' is a released generator: pass --tokenizer <released "
                                     "tokenizer folder>")
        # our exports carry the statistics the generator was trained with; official ones do not
        tok_path, (mean, std) = args.tokenizer, model.latent_stats or (None, None)
    else:
        ckpt = load_checkpoint(args.ckpt, "generator", flag)
        model = generators.build_generator(generators.GeneratorConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["ema"])
        tok_path = args.tokenizer or ckpt["tokenizer"]
        mean, std = float(ckpt["latent_mean"]), float(ckpt["latent_std"])
    tok_flag = "--tokenizer" if args.tokenizer else f"the tokenizer path stored in '{args.ckpt}'"
    tok = (tokenizer_lib.load_released(tok_path) if os.path.isdir(tok_path)
           else load_tokenizer(tok_path, flag=tok_flag))
    carried = float(tok.latent_mean), float(tok.latent_std)         # float32 buffers
    if mean is not None and carried != (0.0, 1.0) and not all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(carried, (mean, std))):
        print0(f"warning: tokenizer '{tok_path}' carries latent mean / std {carried}, the generator "
                        f"({mean}, {std}); sampling uses the generator's")
    if mean is None:
        mean, std = carried
        if (mean, std) == (0.0, 1.0):
            print0(f"warning: tokenizer '{tok_path}' carries no latent statistics (mean 0, std 1); "
                            "a released generator expects its released tokenizer's vq_mean / vq_std")
    c, t = model.config, tok.config
    if (c.num_tokens, c.token_dim) != (t.num_tokens, t.token_dim):
        raise UserError(f"generator models {c.num_tokens}x{c.token_dim} latents, tokenizer '{tok_path}' "
                                 f"makes {t.num_tokens}x{t.token_dim}")
    return model.eval(), tok.eval(), mean, std, tok_path
