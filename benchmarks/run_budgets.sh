#!/bin/bash
# The held-out budget benchmark (RESULTS section 9.3) as it was run: two processes of one thread
# each on a 2-core machine, the seeds split between them, appending to one JSON-lines file.
# Resumable: run it again and it skips the studies and held-out scores already there.
#
#   bash benchmarks/run_budgets.sh [MODEL] [VARIANTS]   # default: mnist-dit sensitivity-surrogate
#
# VARIANTS (comma-separated, bench_budgets.VARIANTS): sensitivity-surrogate (the default study),
# guided (the surrogate from orthogonality), no-orthogonality, random. A cell's held-out
# baselines (the priors, uniform) come with the first of sensitivity-surrogate and guided.
set -u
cd "$(dirname "$0")/.." && . .venv/bin/activate
MODEL=${1:-mnist-dit}
VARIANTS=${2:-sensitivity-surrogate}
OUT=benchmarks/results/budgets_${MODEL}.jsonl
ROOT=${MPQ_BENCH_ROOT:-/tmp/mpq-bench-budgets}
ALL="3bits,4bits,4.5bits,bops<=W4A8"
bench() { python benchmarks/bench_budgets.py --model "$MODEL" --variants "$VARIANTS" \
            --threads 1 --root "$ROOT" --out "$OUT" "$@"; }
(bench --seeds 0 --budgets "$ALL"; bench --seeds 2 --budgets "3bits,4bits") > "$ROOT.a.log" 2>&1 &
(bench --seeds 1 --budgets "$ALL"; bench --seeds 2 --budgets "4.5bits,bops<=W4A8") \
    > "$ROOT.b.log" 2>&1 &
wait
python benchmarks/bench_budgets.py --model "$MODEL" --table-only --out "$OUT"
