"""Fault injection: kill the tiny training, caching and sampling runs many times; nothing may be lost.

Each stage of the tiny pipeline runs once uninterrupted (the reference), then again while it is
killed with SIGKILL (what `kill -9`, a pre-empted job or the out-of-memory killer do: no cleanup
runs) and restarted until it finishes: train_tok.py and train_gen.py with --resume, latent
caching with --cache-latents --resume, sample.py by running it again. When a trial finishes, its
final weights, optimizer states and log (training), shards and statistics (caching) or images
(sampling) must equal the reference's bit for bit, and no temp file may be left behind.
Kills are drawn from a seeded generator, of two kinds:
  * at a random moment of the run's work (after its first line of output, i.e. after imports and
    set-up; timing-dependent: where they land varies between machines);
  * deterministically inside a file write, through the SOFTVQ_KILL_IN_WRITE hook of
    training.atomic_write: the n-th write of a checkpoint / shard / PNG / .npz, at its start,
    middle or end, or (checkpoints) between moving the old one to ckpt-prev.pt and renaming the
    new one in. Tiny checkpoints are written in milliseconds: random kills would almost never
    land there.
After some kills the newest checkpoint is also damaged (a flipped byte inside its largest
record, as a bad copy would leave it): the next --resume must notice it and continue from
ckpt-prev.pt, saying so.

    python fault_injection.py                    # >= 24 kills, a few minutes of CPU on 2 cores
    python fault_injection.py --seed 1 --kills 40 --work /tmp/faults
Prints one line per trial and the number of kills survived; exit status 1 if any trial differs
from its reference (the differing item is named).
"""

import argparse
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile

import torch

import training

ROOT = os.path.dirname(os.path.abspath(__file__))
KILLS_PER_TRIAL = 3
TIMED_FRACTION = 0.3          # share of kills at a random moment (the rest inside a write)
TIMED_SPAN = (0.05, 0.7)      # ... drawn in this part of the work left (the reference's pace; a
                              # run that turns out faster would finish before a later kill)
DAMAGE_PROBABILITY = 0.3      # after a kill of a training run: damage its newest checkpoint
TEMP = re.compile(r".+\.tmp\d+")

# The stages at a size where a run takes seconds. Each: the script, its arguments for an output
# folder (given the references' folder), the files it writes atomically (name pattern: how many
# in a full run; the kill points that apply), and how to restart it after a kill.
TOKENIZER_STEPS, TOKENIZER_EVERY = 8, 2
GENERATOR_STEPS, GENERATOR_EVERY = 12, 2
CACHE_IMAGES, CACHE_SHARD = 96, 16
SAMPLES, SAMPLE_BATCH = 24, 4
CHECKPOINT_POINTS = ("start", "middle", "end", "rotate")
FILE_POINTS = ("start", "middle", "end")
STAGES = {
    "tokenizer": dict(
        script="train_tok.py",
        argv=lambda ref, out: ["--preset", "tiny", "--batch", "2", "--iters", TOKENIZER_STEPS, "--warmup", 2,
                               "--ckpt-every", TOKENIZER_EVERY, "--log-every", 1, "--num-workers", 0,
                               "--out-dir", os.path.dirname(out), "--name", os.path.basename(out),
                               "--device", "cpu"],
        writes={"ckpt.pt": (TOKENIZER_STEPS // TOKENIZER_EVERY, CHECKPOINT_POINTS)}),
    "cache": dict(
        script="train_gen.py",
        argv=lambda ref, out: ["--preset", "tiny", "--cache-latents", "--tokenizer",
                               os.path.join(ref, "tokenizer", "ckpt.pt"), "--builtin-size", CACHE_IMAGES,
                               "--shard-images", CACHE_SHARD, "--cache-dir", out, "--device", "cpu"],
        writes={"*-latents.npy": (CACHE_IMAGES // CACHE_SHARD, FILE_POINTS)}),
    "generator": dict(
        script="train_gen.py",
        argv=lambda ref, out: ["--preset", "tiny", "--cache-dir", os.path.join(ref, "cache"), "--out", out,
                               "--steps", GENERATOR_STEPS, "--batch-size", 8, "--ckpt-every", GENERATOR_EVERY,
                               "--log-every", 1, "--device", "cpu"],
        writes={"ckpt.pt": (GENERATOR_STEPS // GENERATOR_EVERY, CHECKPOINT_POINTS)}),
    "sampling": dict(
        script="sample.py",
        argv=lambda ref, out: ["--ckpt", os.path.join(ref, "generator", "ckpt.pt"), "--out", out,
                               "--num-images", SAMPLES, "--batch-size", SAMPLE_BATCH, "--steps", 4,
                               "--cfg-scale", 1.5, "--seed", 0, "--device", "cpu"],
        writes={"0*.png": (SAMPLES, FILE_POINTS), "samples.npz": (1, FILE_POINTS)}),
}


def launch(stage, ref, out, resume=False, kill_in_write=None, kill_after=None):
    """Run a stage to its end or its kill (kill_after: seconds after its first line of output).
    Returns (return code: -9 if killed, stdout, stderr, seconds until the first line, in all)."""
    spec = STAGES[stage]
    argv = [sys.executable, os.path.join(ROOT, spec["script"]), *map(str, spec["argv"](ref, out))]
    if resume:
        argv.append("--resume")
    # one thread (the tiny runs are bound by per-op overhead) and no pretrained files: the same
    # work on every machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": os.path.join(ref, "no-pretrained-files")}
    env.pop(training.KILL_ENV, None)
    if kill_in_write:
        env[training.KILL_ENV] = ":".join(map(str, kill_in_write))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines, err_lines, first = [], [], threading.Event()
    first_at = []

    def read(stream, lines, event=None):
        for line in stream:
            if event is not None and not event.is_set():
                first_at.append(time.perf_counter() - start)
                event.set()
            lines.append(line)
        if event is not None:
            event.set()                                     # no output at all: do not wait forever
    readers = [threading.Thread(target=read, args=(proc.stdout, out_lines, first)),
               threading.Thread(target=read, args=(proc.stderr, err_lines))]
    for r in readers:
        r.start()
    if kill_after is not None:
        first.wait()
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    proc.wait()
    for r in readers:
        r.join()
    total = time.perf_counter() - start
    return proc.returncode, "".join(out_lines), "".join(err_lines), (first_at or [total])[0], total


def has_checkpoint(stage, out):
    """Whether a restart of `stage` in `out` continues (--resume) instead of starting afresh."""
    if stage == "cache":
        return os.path.isfile(os.path.join(out, "cache.json"))
    return stage != "sampling" and any(os.path.isfile(os.path.join(out, f)) for f in ("ckpt.pt", "ckpt-prev.pt"))


def writes_left(stage, out, pattern):
    """How many atomic writes of files matching `pattern` the stage still has to do in `out`."""
    total = STAGES[stage]["writes"][pattern][0]
    if stage in ("tokenizer", "generator"):
        every = TOKENIZER_EVERY if stage == "tokenizer" else GENERATOR_EVERY
        done = 0
        for name in ("ckpt.pt", "ckpt-prev.pt"):
            if training.checkpoint_problem(os.path.join(out, name)) is None:
                done = max(done, training.read_checkpoint(os.path.join(out, name))["step"] // every)
        return total - done
    if stage == "cache":
        return total - len(glob.glob(os.path.join(out, pattern)))
    if pattern == "samples.npz":
        return 1
    return total - len(glob.glob(os.path.join(out, "samples", pattern)))


def damage(path):
    """Flip one byte in the middle of the largest record of a checkpoint (its zip archive):
    what a bad copy leaves, and what torch.load alone would not notice."""
    with zipfile.ZipFile(path) as zf:
        record = max(zf.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)                     # local header: name / extra lengths
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        where = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0xFF]))


def same(a, b, where=""):
    """None if two loaded checkpoints / JSON values are equal (tensors bit for bit), else the
    first differing item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return None if ok else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where} (keys {sorted(set(a) ^ set(b))})"
        return next((d for k in a if (d := same(a[k], b[k], f"{where}.{k}")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (length {len(a)} vs {len(b)})"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := same(x, y, f"{where}[{i}]")) is not None), None)
    return None if a == b or (a != a and b != b) else f"{where} ({a!r} vs {b!r})"


def log_lines(path):
    """A log.jsonl without its timings."""
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in f]


def compare(stage, ref_out, out):
    """None if a finished trial equals its reference, else what differs."""
    temps = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if TEMP.fullmatch(f)]
    if temps:
        return f"temp files left: {temps}"
    if stage in ("tokenizer", "generator"):
        ckpts = [training.read_checkpoint(os.path.join(d, "ckpt.pt")) for d in (ref_out, out)]
        for ckpt in ckpts:          # python's and numpy's global generators: never drawn from by the
            for state in ckpt["rng"]:   # stages and seeded by the OS at start, so every process differs
                for key in ("python", "python_gauss", "numpy", "numpy_pos_gauss"):
                    del state[key]
        diff = same(*ckpts, "ckpt.pt")
        if diff is None:
            diff = same(*(log_lines(os.path.join(d, "log.jsonl")) for d in (ref_out, out)), "log.jsonl")
        return diff
    names = (sorted(os.listdir(ref_out)) if stage == "cache" else ["samples.npz", "grid.png", "meta.json"])
    for name in names:
        paths = [os.path.join(d, name) for d in (ref_out, out)]
        if not os.path.isfile(paths[1]):
            return f"{name} missing"
        with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
            if f0.read() != f1.read():
                return f"{name} differs"
    return None


def draw_kill(stage, out, rng, seconds):
    """The next attempt's kill: {"write": (pattern, n, point)} (SOFTVQ_KILL_IN_WRITE) or
    {"after": a random part of the work still to do, from `seconds`, the reference's time
    between its first line and its end}, and "damage": whether to damage the newest checkpoint
    after it. None when the run has no work left to interrupt (its last write is done)."""
    kill = {"damage": rng.random() < DAMAGE_PROBABILITY}
    pattern = rng.choice(sorted(STAGES[stage]["writes"]))
    left = writes_left(stage, out, pattern)
    if left < 1:
        return None
    if rng.random() < TIMED_FRACTION:
        share = left / STAGES[stage]["writes"][pattern][0]
        return {**kill, "after": round(seconds * share * rng.uniform(*TIMED_SPAN), 2)}
    n = rng.randint(1, left)
    points = STAGES[stage]["writes"][pattern][1]
    if n == 1 and not os.path.isfile(os.path.join(out, pattern)):   # no checkpoint to rotate yet
        points = FILE_POINTS
    return {**kill, "write": (pattern, n, rng.choice(points))}


def run_trial(stage, work, name, rng, seconds, kills=KILLS_PER_TRIAL, plan=None):
    """Kill `stage` `kills` times (drawn with `rng`, or the kills of `plan`, a list of draw_kill
    results), restarting it after each, then let it finish and compare it with the reference.
    Returns (kills survived, of them inside a write, damaged checkpoints recovered, None or what
    differs)."""
    ref, out = os.path.join(work, "ref"), os.path.join(work, "trials", name)
    ckpt, prev = os.path.join(out, "ckpt.pt"), os.path.join(out, "ckpt-prev.pt")
    killed = in_write = recovered = 0
    damaged, noticed = None, False          # mtime of the checkpoint we damaged (until replaced)
    kills = kills if plan is None else len(plan)
    for attempt in range(kills + 1):
        final = attempt == kills
        kill = {} if final else plan[attempt] if plan is not None else draw_kill(stage, out, rng, seconds)
        if kill is None:                                           # nothing left to interrupt
            final, kill = True, {}
        code, out_text, err_text, _, _ = launch(stage, ref, out, resume=has_checkpoint(stage, out),
                                                kill_in_write=kill.get("write"), kill_after=kill.get("after"))
        if damaged is not None and "resumed" in out_text:          # the restart got past loading
            if "resuming from the previous checkpoint" not in out_text:
                return killed, in_write, recovered, "a damaged ckpt.pt was resumed from"
            recovered += not noticed
            noticed = True
        if code == 0:
            break                                                  # finished before the kill came
        if code != -9 or final:
            return killed, in_write, recovered, f"exit status {code}: {err_text.strip()[-2000:]}"
        killed += 1
        in_write += "write" in kill
        if os.path.isfile(ckpt) and damaged == os.stat(ckpt).st_mtime_ns:
            continue                                               # still the one we damaged
        damaged = None
        if os.path.isfile(ckpt) and training.checkpoint_problem(ckpt) is not None:
            return killed, in_write, recovered, f"a kill left a damaged {ckpt}"
        if kill["damage"] and os.path.isfile(ckpt) and os.path.isfile(prev):
            damage(ckpt)
            damaged, noticed = os.stat(ckpt).st_mtime_ns, False
    if damaged is not None and os.path.isfile(ckpt) and damaged == os.stat(ckpt).st_mtime_ns:
        return killed, in_write, recovered, "a damaged ckpt.pt was never replaced"
    return killed, in_write, recovered, compare(stage, os.path.join(ref, stage), out)


def run_reference(stage, work):
    """The uninterrupted run of `stage` into <work>/ref/<stage>; returns the seconds of its work
    (from its first line of output to its end)."""
    ref = os.path.join(work, "ref")
    code, _, err_text, first, total = launch(stage, ref, os.path.join(ref, stage))
    if code != 0:
        raise RuntimeError(f"reference run of {stage} failed ({code}): {err_text.strip()[-2000:]}")
    return total - first


def main(args):
    if os.path.exists(args.work) and os.listdir(args.work):
        raise training.UserError(f"--work '{args.work}' is not empty: give a new folder")
    rng = random.Random(args.seed)
    start = time.perf_counter()
    seconds = {stage: run_reference(stage, args.work) for stage in STAGES}
    print("references (seconds of work after set-up): " + ", ".join(f"{s} {t:.1f}" for s, t in seconds.items()),
          flush=True)
    totals, failures, trial = [0, 0, 0], [], 0
    while totals[0] < args.kills:
        for stage in STAGES:
            name = f"{stage}-{trial}"
            killed, in_write, recovered, diff = run_trial(stage, args.work, name, rng, seconds[stage])
            totals = [totals[0] + killed, totals[1] + in_write, totals[2] + recovered]
            print(f"{name}: {killed} kills ({in_write} inside a write), {recovered} damaged checkpoints "
                  f"replaced by the previous one: {'equal to the reference' if diff is None else 'DIFFERS: ' + diff}",
                  flush=True)
            if diff is not None:
                failures.append(name)
        trial += 1
    print(f"{totals[0]} kills ({totals[1]} inside a write, {totals[0] - totals[1]} at random moments), "
          f"{totals[2]} damaged checkpoints recovered, in {time.perf_counter() - start:.0f}s (seed {args.seed}): "
          + ("every trial equal to its reference" if not failures else f"{len(failures)} trials differ: {failures}"))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="draws of the kills")
    p.add_argument("--kills", type=int, default=24, help="at least this many kills (rounds over all stages)")
    p.add_argument("--work", default="runs/fault-injection", help="a new folder for the runs")
    training.run_main(lambda: main(p.parse_args()))
