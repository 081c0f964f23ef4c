#!/usr/bin/env bash
# The whole tiny pipeline on the built-in data set, on a CPU, no downloads (< 5 min on 2 cores):
#   tokenizer (train_tok.py) -> cached latents -> SiT-tiny generator (train_gen.py) -> 200 samples
#   (sample.py) -> metrics (evaluate.py recon / linear-probe, sample.py's nearest-neighbour check).
# Ends with runs/samples-tiny/grid.png and a table of the numbers (runs/eval-tiny/table.txt).
#
#   bash pipeline_tiny.sh
#
# Environment (defaults in brackets) to shrink or move it, e.g. for the test suite:
#   PYTHON [python3]  RUNS [runs]  TOK_ITERS [200]  GEN_IMAGES [2000]  GEN_STEPS [600]
#   NUM_IMAGES [200]  SAMPLE_STEPS [50]  EVAL_IMAGES [500]  PROBE_IMAGES [2000]  PROBE_EPOCHS [30]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs}
TOK=$RUNS/tiny-64/ckpt.pt      # train_tok.py --preset tiny writes <out-dir>/tiny-64/
EVAL=$RUNS/eval-tiny
mkdir -p "$EVAL"
: > "$EVAL/timings.txt"

stage() {   # stage NAME COMMAND...: run it, append "NAME MILLISECONDS" to timings.txt
    local name=$1 start=$(date +%s%N); shift
    echo "== $name: $*"
    "$@"
    echo "$name $(( ($(date +%s%N) - start) / 1000000 ))" >> "$EVAL/timings.txt"
}

# --overwrite: every run of this script retrains into the same folders (the stages refuse to
# replace a checkpoint or a latent cache without it)
stage tokenizer  $PY train_tok.py --preset tiny --out-dir "$RUNS" --iters "${TOK_ITERS:-200}" --overwrite
stage cache      $PY train_gen.py --preset tiny --cache-latents --tokenizer "$TOK" --cache-dir "$RUNS/latents-tiny" \
                     --builtin-size "${GEN_IMAGES:-2000}" --overwrite
stage generator  $PY train_gen.py --preset tiny --cache-dir "$RUNS/latents-tiny" --out "$RUNS/gen-tiny" \
                     --steps "${GEN_STEPS:-600}" --overwrite
rm -rf "$RUNS/samples-tiny"    # samples of an earlier generator would be kept (sample.py resumes)
stage sampling   $PY sample.py --preset tiny --ckpt "$RUNS/gen-tiny/ckpt.pt" --out "$RUNS/samples-tiny" \
                     --num-images "${NUM_IMAGES:-200}" --steps "${SAMPLE_STEPS:-50}"
stage recon      $PY evaluate.py recon --ckpt "$TOK" --data-path builtin --num-images "${EVAL_IMAGES:-500}" \
                     --num-workers 0 --out "$EVAL/recon.json"
stage probe      $PY evaluate.py linear-probe --ckpt "$TOK" --train-path builtin --val-path builtin \
                     --max-train-images "${PROBE_IMAGES:-2000}" --max-val-images "${EVAL_IMAGES:-500}" --epochs "${PROBE_EPOCHS:-30}" \
                     --probe-batch-size 256 --num-workers 0 --out "$EVAL/probe.json"

# ---- the table: numbers that need no weight files; the others say which file they need ----
$PY - "$RUNS" <<'EOF' | tee "$EVAL/table.txt"
import json, os, sys
import numpy as np
import data, evaluate
runs = sys.argv[1]
load = lambda name: json.load(open(os.path.join(runs, name)))
recon, probe, summary = load("eval-tiny/recon.json"), load("eval-tiny/probe.json"), load("samples-tiny/summary.json")
needs = lambda key, fname, res: f"{res[key]:.4g}" if key in res else f"needs {fname}"
rows = [("tokenizer PSNR (dB)", f"{recon['psnr']:.2f}"), ("tokenizer SSIM", f"{recon['ssim']:.4f}"),
        ("codebook usage", f"{recon['codebook_usage']:.4f}"),
        ("tokenizer rFID", needs("rfid", evaluate.INCEPTION_FILE, recon)),
        ("tokenizer LPIPS", needs("lpips", evaluate.VGG_FILE, recon)),
        ("linear probe top-1 (%)", f"{probe['top1']:.1f}")]
# gFID / IS of the samples, against as many held-out built-in images, when the Inception file is there
gen, samples = {}, os.path.join(runs, "samples-tiny", "samples.npz")
try:
    inception = evaluate.weight_file(evaluate.INCEPTION_FILE)
    images = evaluate.load_images_npz(samples)
    held = data.make_dataset("builtin", images.shape[1], train=False, seed=evaluate.BUILTIN_VAL_SEED)
    ref = os.path.join(runs, "eval-tiny", "ref.npz")
    evaluate.save_images_npz(ref, np.stack([evaluate.to_uint8(held[i][0][None])[0].permute(1, 2, 0).numpy()
                                            for i in range(len(images))]))
    gen = evaluate.generation_metrics(samples, ref, ("is", "fid"), inception)
except FileNotFoundError:
    pass
rows += [("samples gFID (vs held-out built-in)", needs("fid", evaluate.INCEPTION_FILE, gen)),
         ("samples IS", needs("inception_score", evaluate.INCEPTION_FILE, gen))]
for name, r in summary["nn_check"].items():
    rows.append((f"nearest-real RMSE / class match: {name}", f"{r['nn_rmse']:.4f} / {100 * r['nn_class_match']:.0f}%"))
timings = [(name, int(ms) / 1000) for name, ms in map(str.split, open(os.path.join(runs, "eval-tiny", "timings.txt")))]
rows += [(f"time: {name} (s)", f"{sec:.1f}") for name, sec in timings]
rows.append(("time: total (s)", f"{sum(sec for _, sec in timings):.1f}"))
width = max(len(k) for k, _ in rows)
print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
print(f"sample grid: {os.path.join(runs, 'samples-tiny', 'grid.png')}")
EOF
