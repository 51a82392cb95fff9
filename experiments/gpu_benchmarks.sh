#!/usr/bin/env bash
# The GPU figures: data pipeline vs synthetic batches, b5 with regional compile vs timm, b2_li vs b2; then
# experiments/gpu_report.py checks them against the targets (targets.md). Planned for under 12 minutes on one
# H100 or H200; each step has a time limit, capped by what is left of BUDGET_S.
#
#   bash experiments/gpu_benchmarks.sh [OUT_DIR]      # default: experiments/results/gpu_<device>, e.g. gpu_h100
#   BUDGET_S=600 bash experiments/gpu_benchmarks.sh   # stop starting steps after 600 s, cut the running one there
#   bash experiments/gpu_benchmarks.sh --smoke [OUT]  # the same steps on the CPU at tiny sizes: checks the plumbing,
#                                                     # measures nothing (default OUT: a temporary folder)
#
# Run it from the repository root with this project's requirements and timm importable (where the package is
# not pip-installed: PYTHONPATH=. ; an offline GPU box needs albumentations 2.0.8 and its dependencies as wheels).
# Tables are OUT_DIR/<tag>.md and .csv (experiments/benchmark.py: ours vs timm, or b2_li vs b2, same process,
# interleaved); the log of the whole run goes to stdout. WORKERS sets the fits' loader processes (default 14).
set -u
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
if ((SMOKE)); then
  OUT=${1:-$(mktemp -d)}
  DEV=cpu; B0=64x64; B0_HW="64 64"; B0_BATCH=8; TRAIN_IMAGES=64; EPOCHS=2; WORKERS=${WORKERS:-2}
  B5=b0; B5_HW=64x64; B5_BATCH=2; SWEEP="64x64 96x96"; STEPS="--warmup 1 --steps 2"; FIT_EXTRA="--accelerator cpu"
  SLOWER=4  # step limits x4: compiling on a CPU takes minutes
else
  DEVICE_NAME=$($PY -c "import re, torch; n = torch.cuda.get_device_name().lower(); m = re.search(r'\b([a-z]\d{2,3}[a-z]?)\b', n); print(m.group(1) if m else re.sub(r'\W+', '_', n).strip('_'))") || exit 1
  OUT=${1:-experiments/results/gpu_$DEVICE_NAME}
  DEV=cuda; B0=224x224; B0_HW="224 224"; B0_BATCH=128; TRAIN_IMAGES=12288; EPOCHS=3; WORKERS=${WORKERS:-14}
  B5=b5; B5_HW=384x224; B5_BATCH=64; SWEEP="224x224 512x512 1024x1024"; STEPS="--warmup 3 --steps 10"; FIT_EXTRA=""
  SLOWER=1
fi
DEADLINE=$((SECONDS + ${BUDGET_S:-$((690 * SLOWER))}))
mkdir -p "$OUT"
BENCH="$PY experiments/benchmark.py --device $DEV --precision bf16-mixed --out $OUT"
step() {
  local limit=$(($1 * SLOWER)) left=$((DEADLINE - SECONDS)); shift
  ((left < limit)) && limit=$left
  ((limit < 10)) && { echo "### skipped (time budget spent): $*"; return; }
  echo; echo "### $* [limit ${limit}s, at ${SECONDS}s]"
  timeout -k 5 "$limit" "$@" || echo "!!! step failed or timed out (status $?)"
}

HEADER=$($PY -c "import os, torch, lightning, timm; dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'; print(f'{dev}; torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__}; load average at the start {os.getloadavg()[0]:.1f}')")
echo "$HEADER | smoke=$SMOKE | out=$OUT"
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
make_images() {  # DATA/images: 4 classes of generated 500x375 JPEGs, written by one process per class
  local k split
  for k in 0 1 2 3; do
    $PY -c "import sys; from tools.bench.synthetic import write_photo_folder; write_photo_folder(sys.argv[1], classes=1, train_images=int(sys.argv[2]), val_per_class=32, seed=int(sys.argv[3]))" "$DATA/part$k" $((TRAIN_IMAGES / 4)) $((10 * k)) &
  done
  wait
  for k in 0 1 2 3; do
    for split in train val; do mkdir -p "$DATA/images/$split" && mv "$DATA/part$k/$split/class_0" "$DATA/images/$split/class_$k"; done
  done
  echo "### $(find "$DATA/images/train" -name '*.jpg' | wc -l) training images at ${SECONDS}s"
}

# 1. Does b0 wait for data? Synthetic-batch training speed, then real run.py fits on generated 500x375 JPEGs:
#    augmentation on the GPU (the default on CUDA) and, for comparison, in the CPU workers; epochs of 96 steps,
#    so the loader's refill at each epoch start weighs little. [~3 min]
step 60 $BENCH --variants b0 --sizes $B0 --batch-size $B0_BATCH --modes train $STEPS --repeats 2 --no-reference --no-memory --tag b0_synthetic
make_images
for where in gpu cpu; do
  step 75 $PY experiments/run.py --variant b0 --data "$DATA/images" --img-size $B0_HW --batch-size $B0_BATCH --num-workers $WORKERS --precision bf16-mixed --epochs $EPOCHS --warmup-epochs 1 --augment-device $where --logdir "$DATA/runs" --name b0_aug_$where $FIT_EXTRA
done
# 2. b5 at 384x224, batch 64: ours compiled per block vs timm eager, with peak memory (each model compiled or
#    not in its own subprocess) and MFU; then ours eager vs timm eager, the baseline. [~4.5 min]
step 210 $BENCH --variants $B5 --sizes $B5_HW --batch-size $B5_BATCH --modes train --compile-regions $STEPS --repeats 2 --tag b5_regions
step 60 $BENCH --variants $B5 --sizes $B5_HW --batch-size $B5_BATCH --modes train $STEPS --no-memory --tag b5_eager
# 3. b2_li against b2 (fewer FLOPs must mean no slower): inference and training, batch 1 and 16. [~3 min]
step 90 $BENCH --variants b2_li --reference-variant b2 --sizes $SWEEP --batch-size 1 $STEPS --no-memory --tag b2li_vs_b2_bs1
step 90 $BENCH --variants b2_li --reference-variant b2 --sizes $SWEEP --batch-size 16 $STEPS --no-memory --tag b2li_vs_b2_bs16
# 4. If time is left: both compiled per block at the smallest size, where b2_li launches more small kernels
#    than b2 for about the same FLOPs (compiling fuses them). [~2 min]
step 120 $BENCH --variants b2_li --reference-variant b2 --sizes ${SWEEP%% *} --batch-size 16 --compile-regions $STEPS --no-memory --tag b2li_vs_b2_bs16_regions

$PY experiments/gpu_report.py "$OUT" --runs "$DATA/runs" --header "$HEADER; smoke=$SMOKE"
echo "### done at ${SECONDS}s"
