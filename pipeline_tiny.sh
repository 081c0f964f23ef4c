#!/usr/bin/env bash
# The whole tiny pipeline on the built-in data set, on a CPU, no downloads (< 5 min on 2 cores):
#   judge (evaluate.py judge-train: a small classifier, the offline judge of generated images)
#   -> tokenizer (train_tok.py) -> cached latents -> SiT-tiny generator (train_gen.py)
#   -> samples with and without CFG, and decoded random latents (sample.py)
#   -> reconstructions of held-out images (evaluate.py recon) -> one table (evaluate.py judge).
# Ends with runs/samples-tiny/grid.png (one row per class), runs/eval-tiny/recon-grid.png and
# the table runs/eval-tiny/table.txt. Every image-set row of the table holds the same number of
# images, judged against the same held-out reference.
#
#   bash pipeline_tiny.sh
#
# Environment (defaults in brackets) to shrink or move it, e.g. for the test suite:
#   PYTHON [python3]  RUNS [runs]  JUDGE_IMAGES [3000]  JUDGE_EPOCHS [2]  TOK_ITERS [the preset's]
#   GEN_IMAGES [5000]  GEN_STEPS [the preset's]  NUM_IMAGES [1000]  SAMPLE_STEPS [25]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs}
N=${NUM_IMAGES:-1000}
TOK=$RUNS/tiny-16/ckpt.pt      # train_tok.py --preset tiny writes <out-dir>/tiny-<tokens>/
EVAL=$RUNS/eval-tiny
mkdir -p "$EVAL"
: > "$EVAL/timings.txt"

stage() {   # stage NAME COMMAND...: run it, append "NAME MILLISECONDS" to timings.txt
    local name=$1 start=$(date +%s%N); shift
    echo "== $name: $*"
    "$@"
    echo "$name $(( ($(date +%s%N) - start) / 1000000 ))" >> "$EVAL/timings.txt"
}
optional() {   # the flag and value only when the value is set: optional FLAG VALUE
    [ -n "$2" ] && echo "$1 $2" || true
}

# --overwrite: every run of this script retrains into the same folders (the stages refuse to
# replace a checkpoint or a latent cache without it)
stage judge      $PY evaluate.py judge-train --data-path builtin --builtin-size "${JUDGE_IMAGES:-3000}" \
                     --epochs "${JUDGE_EPOCHS:-2}" --val-images "$N" --out "$RUNS/judge-tiny.pt" --json "$EVAL/judge-train.json"
stage tokenizer  $PY train_tok.py --preset tiny --tokens 16 --token-dim 48 --out-dir "$RUNS" --overwrite $(optional --iters "${TOK_ITERS:-}")
stage cache      $PY train_gen.py --preset tiny --cache-latents --tokenizer "$TOK" --cache-dir "$RUNS/latents-tiny" \
                     --builtin-size "${GEN_IMAGES:-5000}" --overwrite
stage generator  $PY train_gen.py --preset tiny --cache-dir "$RUNS/latents-tiny" --out "$RUNS/gen-tiny" --overwrite \
                     $(optional --steps "${GEN_STEPS:-}")
# sample.py resumes into an existing folder: start clean so no samples of an earlier generator are kept
rm -rf "$RUNS/samples-tiny" "$RUNS/samples-tiny-nocfg" "$RUNS/random-latents-tiny"
SAMPLE="$PY sample.py --preset tiny --ckpt $RUNS/gen-tiny/ckpt.pt --num-images $N --steps ${SAMPLE_STEPS:-25}"
stage samples-cfg    $SAMPLE --out "$RUNS/samples-tiny"
stage samples-nocfg  $SAMPLE --out "$RUNS/samples-tiny-nocfg" --cfg-scale 1.0
stage random-latents $SAMPLE --out "$RUNS/random-latents-tiny" --random-latents
stage recon      $PY evaluate.py recon --ckpt "$TOK" --data-path builtin --num-images "$N" --num-workers 0 \
                     --out "$EVAL/recon.json" --save-npz "$EVAL/held-out" --grid "$EVAL/recon-grid.png" --grid-images 10

# ---- the table: every set of N images against N other held-out images (the reference) ----
# and the PSNR of the mean training image on the held-out images: what a tokenizer that has learnt
# nothing but the average scores
$PY - "$EVAL" "$N" <<'EOF'
import json, os, sys
import torch
import data, evaluate, training
folder, n = sys.argv[1], int(sys.argv[2])
ref = data.make_dataset("builtin", 32, train=False, seed=data.BUILTIN_REF_SEED, builtin_size=n)
images = torch.stack([ref[i][0] for i in range(n)])
data.save_images_npz(os.path.join(folder, "reference.npz"), training.to_uint8(images).permute(0, 2, 3, 1).numpy())
train = data.make_dataset("builtin", 32, train=False, seed=0, builtin_size=2000)
mean = training.to_uint8(torch.stack([train[i][0] for i in range(len(train))]).mean(0, keepdim=True))
held = torch.from_numpy(data.load_images_npz(os.path.join(folder, "held-out-inputs.npz"))).permute(0, 3, 1, 2)
psnr = evaluate.psnr(held, mean.expand_as(held)).mean().item()
json.dump({"mean_image_psnr": psnr}, open(os.path.join(folder, "mean-image.json"), "w"))
EOF
CFG=$($PY -c "import sample; print(sample.PRESETS['tiny']['cfg_scale'])")
stage judging    $PY evaluate.py judge --judge "$RUNS/judge-tiny.pt" --ref "$EVAL/reference.npz" --out "$EVAL/judge.json" \
                     "real held-out images (floor)=$EVAL/held-out-inputs.npz" \
                     "tokenizer reconstructions=$EVAL/held-out-recons.npz" \
                     "samples, CFG $CFG=$RUNS/samples-tiny/samples.npz" \
                     "samples, no CFG=$RUNS/samples-tiny-nocfg/samples.npz" \
                     "decoded random latents (ceiling)=$RUNS/random-latents-tiny/samples.npz"
$PY - "$RUNS" <<'EOF' | tee "$EVAL/table.txt"
import json, os, sys
runs = sys.argv[1]
load = lambda name: json.load(open(os.path.join(runs, "eval-tiny", name)))
recon, judge, trained = load("recon.json"), load("judge.json"), load("judge-train.json")
mean_psnr = load("mean-image.json")["mean_image_psnr"]
print(f"{'image set':<40} {'images':>6} {judge['metric']:>25} {'class accuracy (%)':>19}")
for name, row in judge["sets"].items():
    acc = f"{row['class_accuracy']:.1f}" if "class_accuracy" in row else "-"
    print(f"{name:<40} {row['num_images']:>6} {row['fd']:>25.2f} {acc:>19}")
rows = [("tokenizer PSNR (dB) / SSIM", f"{recon['psnr']:.2f} / {recon['ssim']:.4f}"),
        ("mean training image PSNR (dB)", f"{mean_psnr:.2f} (tokenizer: +{recon['psnr'] - mean_psnr:.1f} dB)"),
        ("tokenizer codebook usage", f"{recon['codebook_usage']:.3f}" if "codebook_usage" in recon else "-"),
        ("judge accuracy on real held-out images (%)", f"{trained['held_out_accuracy']:.1f}")]
timings = [(name, int(ms) / 1000) for name, ms in map(str.split, open(os.path.join(runs, "eval-tiny", "timings.txt")))]
rows += [(f"time: {name} (s)", f"{sec:.1f}") for name, sec in timings]
rows.append(("time: total (s)", f"{sum(sec for _, sec in timings):.1f}"))
width = max(len(k) for k, _ in rows)
print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
print(f"grids: {os.path.join(runs, 'samples-tiny', 'grid.png')} (a row per class), "
      f"{os.path.join(runs, 'eval-tiny', 'recon-grid.png')} (inputs over reconstructions)")
EOF
