#!/bin/bash
# The held-out budget benchmark (RESULTS section 9): two processes of one thread each on a 2-core
# machine, appending to one JSON-lines file. The (seed, budget) cells form a queue in seed-major
# order (so a partial run covers every budget before the next seed); each process claims the next
# free cell and runs it as its own bench_budgets.py call, which rereads the file first, so a map
# one process scored held-out is not scored again by the other.
# Resumable: run it again and it skips the studies and held-out scores already there.
#
#   bash benchmarks/run_budgets.sh [MODEL] [VARIANTS]   # default: mnist-ddpm best-prior
#
# VARIANTS (comma-separated, bench_budgets.VARIANTS): best-prior (the default study since
# 2026-12-02: the surrogate from the prior that scores best on the proxy), sensitivity-surrogate
# (the default before), explore (best-prior with 30% random repaired maps), guided (the
# surrogate from orthogonality), no-orthogonality, random. A cell's held-out baselines (the
# priors, uniform) come with the first variant that has the default priors.
# MPQ_BENCH_PROCS (default 2) sets the number of processes, MPQ_BENCH_OUT the JSON-lines file,
# MPQ_BENCH_SEEDS (default "0 1 2") the search seeds, MPQ_BENCH_BUDGETS (default
# "3bits 4bits 4.5bits bops<=W4A8") the budgets, MPQ_BENCH_ROOT the studies' folder (use one
# per concurrent invocation), MPQ_BENCH_ROUNDING / MPQ_BENCH_GRID the weight rounding and grid
# (default: the study's; give each rounding its own MPQ_BENCH_OUT).
set -u
cd "$(dirname "$0")/.." && . .venv/bin/activate
MODEL=${1:-mnist-ddpm}
VARIANTS=${2:-best-prior}
OUT=${MPQ_BENCH_OUT:-benchmarks/results/budgets_${MODEL}.jsonl}
ROOT=${MPQ_BENCH_ROOT:-/tmp/mpq-bench-budgets}
CLAIMS="$ROOT/claims/$MODEL-${VARIANTS//,/+}-$$"
mkdir -p "$CLAIMS"
CELLS=()
for seed in ${MPQ_BENCH_SEEDS:-0 1 2}; do
  for budget in ${MPQ_BENCH_BUDGETS:-3bits 4bits 4.5bits bops<=W4A8}; do CELLS+=("$seed|$budget"); done
done
worker() {
  for cell in "${CELLS[@]}"; do
    # mkdir is atomic: the first process to create the claim runs the cell
    mkdir "$CLAIMS/${cell//[<=|]/_}" 2>/dev/null || continue
    python benchmarks/bench_budgets.py --model "$MODEL" --variants "$VARIANTS" --threads 1 \
      --root "$ROOT" --out "$OUT" --seeds "${cell%%|*}" --budgets "${cell#*|}" --no-table \
      ${MPQ_BENCH_ROUNDING:+--rounding "$MPQ_BENCH_ROUNDING"} \
      ${MPQ_BENCH_GRID:+--weight-grid "$MPQ_BENCH_GRID"}
  done
}
for k in $(seq 1 "${MPQ_BENCH_PROCS:-2}"); do worker > "$ROOT.$MODEL.${VARIANTS//,/+}.$k.log" 2>&1 & done
wait
python benchmarks/bench_budgets.py --model "$MODEL" --table-only --out "$OUT"
