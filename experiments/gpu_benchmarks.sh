#!/usr/bin/env bash
# The GPU measurements behind README's "Performance" section, in one script (about 11 minutes on an H200).
#
#   bash experiments/gpu_benchmarks.sh [OUT_DIR]      # default: benchmark_results/gpu
#   BUDGET_S=500 bash experiments/gpu_benchmarks.sh   # stop starting steps after 500 s, cut the running one there
#
# Run it from the repository root with this project's requirements and timm importable (where the package is
# not pip-installed: PYTHONPATH=. ; an offline GPU box needs albumentations 2.0.8 and its dependencies as wheels).
# Every table is ours vs timm's pvt_v2 (same weights, same process, interleaved), written as
# OUT_DIR/<tag>.md and .csv; the log of the whole run goes to stdout. Each step has its own time
# limit, capped by what is left of BUDGET_S, so one slow step cannot take the rest with it.
set -u
OUT=${1:-benchmark_results/gpu}
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${BUDGET_S:-900}))
mkdir -p "$OUT"
BENCH="$PY experiments/benchmark.py --device cuda --out $OUT"
step() {
  local limit=$1 left=$((DEADLINE - SECONDS)); shift
  ((left < limit)) && limit=$left
  ((limit < 10)) && { echo "### skipped (time budget spent): $*"; return; }
  echo; echo "### $* [limit ${limit}s, at ${SECONDS}s]"
  timeout -k 5 "$limit" "$@" || echo "!!! step failed or timed out (status $?)"
}

$PY -c "import torch, lightning, timm; print('torch', torch.__version__, '| lightning', lightning.__version__, '| timm', timm.__version__, '|', torch.cuda.get_device_name())"

# 1. bf16-mixed training and inference, the target pair (b2, b5), plus b0 at batch 128 (the data-loader check).
step 150 $BENCH --variants b2 b5 --sizes 224x224 --batch-size 64 --precision bf16-mixed --warmup 3 --steps 10 --repeats 3 --tag gpu_bf16
step 60 $BENCH --variants b0 --sizes 224x224 --batch-size 128 --precision bf16-mixed --warmup 3 --steps 10 --repeats 3 --no-memory --tag gpu_bf16_b0_bs128
# 2. fp32 (TF32 off, torch's default) ours vs timm, square and 384x224.
step 120 $BENCH --variants b0 b2 b2_li --sizes 224x224 384x224 --batch-size 64 --warmup 3 --steps 10 --repeats 2 --no-memory --tag gpu_fp32
step 40 $BENCH --variants b2 --sizes 224x224 --batch-size 64 --precision 16-mixed --warmup 3 --steps 10 --no-memory --tag gpu_fp16
# 3. The seed's b5 at 384x224, batch 64: peak training memory with and without grad checkpointing.
step 90 $BENCH --variants b5 --sizes 384x224 --batch-size 64 --precision bf16-mixed --modes train --warmup 2 --steps 5 --tag gpu_b5_384x224
step 90 $BENCH --variants b5 --sizes 384x224 --batch-size 64 --precision bf16-mixed --modes train --warmup 2 --steps 5 --grad-checkpointing --tag gpu_b5_384x224_gc
# 4. Our b2_li against our b2 (fewer FLOPs must mean no slower), batch 1 and 16, up to 1024.
step 90 $BENCH --variants b2_li --reference-variant b2 --sizes 224x224 512x512 1024x1024 --batch-size 1 --precision bf16-mixed --no-memory --tag gpu_sweep_bs1
step 90 $BENCH --variants b2_li --reference-variant b2 --sizes 224x224 512x512 1024x1024 --batch-size 16 --precision bf16-mixed --no-memory --tag gpu_sweep_bs16
# 5. Is b0 training data-starved with 8 workers? The loader alone, then a real fit on 500x375 JPEGs.
step 90 $PY experiments/benchmark.py --data-loader --images 2048 --workers 8 --batch-size 128 --sizes 224x224 --out "$OUT" --tag gpu_loader
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
$PY -c "import sys; from pvt_lightning.bench.synthetic import write_photo_folder; write_photo_folder(sys.argv[1], classes=4, train_images=4096, val_per_class=64)" "$DATA"
step 150 $PY experiments/run.py --variant b0 --data "$DATA" --img-size 224 224 --batch-size 128 --num-workers 8 --precision bf16-mixed --epochs 3 --warmup-epochs 1 --logdir "$DATA/runs" --name b0_loader
cp "$DATA"/runs/b0_loader/version_0/summary.json "$OUT/b0_loader_summary.json" 2>/dev/null
# 6. torch.compile, inference and training (compiling both models takes about 90 s).
step 200 $BENCH --variants b0 --sizes 224x224 --batch-size 128 --precision bf16-mixed --compile --warmup 3 --steps 10 --no-memory --tag gpu_compile
echo "### done at ${SECONDS}s"
