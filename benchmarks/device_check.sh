#!/usr/bin/env bash
# Device check: a 4-trial study on each embedded model with --device (default cuda), then trial
# time against FP sampling time of the same N x steps on that device (device_trial_cost.py).
# Run it whenever a machine with a GPU is at hand; record the output in docs/results.md#gpu.
#
#   benchmarks/device_check.sh [DEVICE] [OUT_DIR]
#
# Uses `mpq-search` when it is on PATH, else `python3 -m mpq_search` (a PYTHONPATH install).
# MPQ_RUN_ARGS adds options to each run (e.g. "--n 16 --steps 4" for a quick CPU try).
# MPQ_REAL_SIZE=1 adds the real-size part (issue 28): it builds DiT-XL/2- and SD-1.5-shaped
# pipelines with random weights (benchmarks/real_size_models.py, in $out/models), runs the
# default study settings at MPQ_REAL_SIZE_TRIALS trials (default 10) on each with per-phase time
# and peak CUDA memory (benchmarks/real_size_stages.py --preset default), then torchao's int8
# and int4 weight-only layouts on the denoiser: bytes and latency against FP
# (benchmarks/device_real_size.py).
set -uo pipefail
device="${1:-cuda}"
out="${2:-/tmp/mpq-device-check}"
root="$out/studies"
cd "$(dirname "$0")/.."
if command -v mpq-search >/dev/null 2>&1; then cli=(mpq-search); else cli=(python3 -m mpq_search); fi
mkdir -p "$root"
python3 -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
studies=() ; seconds=() ; status=0
for model in mnist-ddpm mnist-dit; do
  study="devcheck-$model"
  rm -rf "${root:?}/$study"
  start=$(date +%s%N)
  echo "== $model: mpq-search run --budget 4.5bits --trials 4 --device $device"
  if "${cli[@]}" run --model "$model" --budget 4.5bits --trials 4 --device "$device" \
      --study "$study" --root "$root" ${MPQ_RUN_ARGS:-} > "$out/$model.log" 2>&1; then
    end=$(date +%s%N)
    studies+=(--study "$model=$study")
    seconds+=(--run-seconds "$study=$(( (end - start) / 1000000 ))e-3")
    tail -n 12 "$out/$model.log"
  else
    status=1
    echo "FAILED: $model (last lines of $out/$model.log):"
    tail -n 30 "$out/$model.log"
  fi
done
if [ ${#studies[@]} -gt 0 ]; then
  python3 benchmarks/device_trial_cost.py --root "$root" --device "$device" "${studies[@]}" \
    "${seconds[@]}" --out "$out/device_check.json" || status=1
fi
if [ "${MPQ_REAL_SIZE:-0}" = 1 ]; then
  models="$out/models"
  python3 benchmarks/real_size_models.py --root "$models" --shapes dit-xl-2,sd15 \
    > "$out/real_size_models.log" 2>&1 || { status=1; tail -n 20 "$out/real_size_models.log"; }
  for shape in dit-xl-2 sd15; do
    [ -d "$models/$shape" ] || continue
    echo "== real size: $shape, default settings, ${MPQ_REAL_SIZE_TRIALS:-10} trials on $device"
    python3 benchmarks/real_size_stages.py --model "$models/$shape" --label "$shape-$device" \
      --device "$device" --preset default --set "trials=${MPQ_REAL_SIZE_TRIALS:-10}" \
      --root "$out/real-size-studies" --out "$out/real_size_stages.jsonl" \
      > "$out/real-size-$shape.log" 2>&1 || status=1
    tail -n 25 "$out/real-size-$shape.log"
    python3 benchmarks/device_real_size.py --model "$models/$shape" --device "$device" \
      --out "$out/device_real_size.jsonl" || status=1
  done
fi
exit $status
