#!/usr/bin/env bash
# Device check: a 4-trial study on each embedded model with --device (default cuda), then trial
# time against FP sampling time of the same N x steps on that device (device_trial_cost.py).
# Run it whenever a machine with a GPU is at hand; record the output in docs/results.md#gpu.
#
#   benchmarks/device_check.sh [DEVICE] [OUT_DIR]
#
# Uses `mpq-search` when it is on PATH, else `python3 -m mpq_search` (a PYTHONPATH install).
# MPQ_RUN_ARGS adds options to each run (e.g. "--n 16 --steps 4" for a quick CPU try).
# MPQ_REAL_SIZE=1 adds the real-size part of issue 28 (benchmarks/device_real_size.sh: DiT-XL/2-
# and SD-1.5-shaped pipelines with random weights, torchao layouts, the default study settings
# with per-phase time and peak CUDA memory), inside MPQ_REAL_SIZE_SECONDS (default 540).
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
  MPQ_DEVICE="$device" bash benchmarks/device_real_size.sh "$out/real-size" "${MPQ_REAL_SIZE_SECONDS:-540}" || status=1
fi
exit $status
