#!/bin/sh
# Waits for the embedded model's training to finish, then runs every part of bench_quant.py on a
# snapshot of the final weights and writes benchmarks/results/quant.md after each part.
cd "$(dirname "$0")/.." || exit 1
until grep -q "saved EMA weights" logs/train_mnist_ddpm.log; do sleep 30; done
rm -rf /tmp/mpq-quant-final && mkdir -p /tmp/mpq-quant-final && cp -r mpq_search/zoo/mnist-ddpm /tmp/mpq-quant-final/
B=".venv/bin/python benchmarks/bench_quant.py"
M="--model /tmp/mpq-quant-final/mnist-ddpm"
$B switch $M && $B report > /dev/null
$B speed $M --n 250 --steps 10 --repeats 2 && $B report > /dev/null
$B fid $M --n 1000 --steps 20 && $B report
