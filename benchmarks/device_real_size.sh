#!/usr/bin/env bash
# The GPU part of issue 28 in one short device call, inside a deadline: build the DiT-XL/2 shape
# (random weights), torchao's weight-only layouts on its transformer (bytes and call latency
# against FP: benchmarks/device_real_size.py), then the default study settings at
# MPQ_REAL_SIZE_TRIALS trials (default 10) with per-phase time, peak RSS and peak CUDA memory
# (benchmarks/real_size_stages.py --preset default; the phase log streams to real-size-*.log, so
# a run cut by the deadline still says how far it got), then the SD-1.5 shape if time is left.
#
#   benchmarks/device_real_size.sh OUT_DIR [SECONDS]
#
# Packages the device image lacks travel as wheels in .whl/ (docs/development.md, "GPU checks");
# the feature net is MPQ_FEATURES (default lenet: Inception's 91 MB weights exceed what one
# device call may carry). MPQ_DEVICE=cpu MPQ_SCALE=tiny MPQ_STAGE_ARGS="--preset tiny" tries the
# whole script on a CPU.
set -uo pipefail
out="${1:?OUT_DIR}"
deadline=$(( $(date +%s) + ${2:-540} ))
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
mkdir -p "$out"
left() { echo $(( deadline - $(date +%s) )); }
device="${MPQ_DEVICE:-cuda}"
scale="${MPQ_SCALE:-real}"
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, optuna, mpq_search; print('torch', torch.__version__,
    '| diffusers', diffusers.__version__, '| optuna', optuna.__version__, '| cuda',
    torch.cuda.is_available())" || exit 1
python3 -c "import torchao; print('torchao', torchao.__version__)" || echo "torchao: not usable"
models=/tmp/mpq-real-size
features="${MPQ_FEATURES:-lenet}"
trials="${MPQ_REAL_SIZE_TRIALS:-10}"
for shape in dit-xl-2 sd15; do
  [ "$(left)" -gt 120 ] || { echo "== $shape: skipped, $(left) s left"; continue; }
  echo "== $shape: build ($(left) s left)"
  timeout "$(left)" python3 benchmarks/real_size_models.py --root "$models" --shapes "$shape" \
    --scale "$scale" \
    > "$out/build-$shape.log" 2>&1 || { tail -n 5 "$out/build-$shape.log"; continue; }
  tail -n 3 "$out/build-$shape.log"
  echo "== $shape: torchao layouts ($(left) s left)"
  timeout "$(( $(left) < 150 ? $(left) : 150 ))" python3 benchmarks/device_real_size.py \
    --model "$models/$shape" --device "$device" --out "$out/device_real_size.jsonl" 2>&1 | tail -n 8
  echo "== $shape: default settings, $trials trials, feature net $features ($(left) s left)"
  timeout "$(left)" python3 benchmarks/real_size_stages.py --model "$models/$shape" \
    --label "$shape-$device" --device "$device" --preset default --set "trials=$trials" \
    --set "feature_net=\"$features\"" --root /tmp/mpq-real-size-studies \
    --out "$out/real_size_stages.jsonl" ${MPQ_STAGE_ARGS:-} > "$out/real-size-$shape.log" 2>&1
  echo "exit $? ($(left) s left)"
  grep -E "\] |failed|Error" "$out/real-size-$shape.log" | tail -n 30
done
