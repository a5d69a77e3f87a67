#!/usr/bin/env bash
# Run the README's commands as written, as a new user would, from a fresh clone; print a summary.
# Also the examples of docs/commands.md and docs/deployment.md that need no server or network.
#
#   bash benchmarks/readme_commands.sh [REPO] [--venv DIR] [--full] [--dev]
#
# REPO: a path or URL that `git clone` accepts (default: this checkout; only committed work is
# in a clone). The clone goes to a new temp folder; the summary table ends the output and the
# log of each command is kept in the clone's `readme-logs/`.
#   --venv DIR  reuse a virtual environment that has the package's dependencies: the install
#               step is skipped and the clone's code runs from PYTHONPATH (the venv itself is
#               not changed); default: the README's install command, from scratch (minutes).
#   --full      the searches at the README's own sizes (about 8 min each on 2 cores); default:
#               the reductions the README names (`--trials`, `--n`, `--steps` trade time for
#               proxy precision; `confirm --n`).
#   --dev       also the second set-up command (ruff, mypy and the whole test suite: long).
#   --only RE   only the steps whose name matches the extended regex RE (and the install step).
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="" full=0 dev=0 only=""
while (($#)); do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --full) full=1; shift ;;
    --dev) dev=1; shift ;;
    --only) only="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) repo="$1"; shift ;;
  esac
done

work="$(mktemp -d /tmp/mpq-readme-XXXXXX)"
git clone -q "$repo" "$work/mpq-search" || { echo "cannot clone $repo"; exit 2; }
cd "$work/mpq-search" || exit 2
mkdir -p readme-logs
# Reductions the README allows (a smoke run); --full runs the sizes as written.
if ((full)); then small="" ; heldout="" ; else
  small="--trials 4 --n 32 --steps 5 --threads 1"; heldout="--n 32 --threads 1"; fi

names=() codes=() expect=() secs=()
step() {  # step NAME EXPECTED_EXIT COMMAND...: run one README command, log it, record the result
  local name="$1" want="$2"; shift 2
  if [[ -n "$only" && ${#names[@]} -gt 0 ]] && ! [[ "$name" =~ $only ]]; then return; fi
  local log="readme-logs/$(printf '%02d' "${#names[@]}")-${name// /_}.log" t0=$SECONDS
  echo "== $name: $*"
  bash -c "$*" >"$log" 2>&1
  local rc=$?
  names+=("$name"); codes+=("$rc"); expect+=("$want"); secs+=($((SECONDS - t0)))
  tail -n 4 "$log" | sed 's/^/   | /'
}

# --- 1. install and run ------------------------------------------------------------------------
if [[ -n "$venv" ]]; then
  A=". '$venv/bin/activate' && export PYTHONPATH='$PWD' &&"
  step "import from the clone" 0 "$A python -c 'import mpq_search; print(mpq_search.__file__)' \
    | grep -q '^$PWD/'"
else
  step "install" 0 "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e ."
  A=". .venv/bin/activate &&"
fi
step "run (main job)" 0 "$A mpq-search run --budget 4.5bits $small"
step "run --config quick" 0 "$A mpq-search run --config studies/quick.toml $small"
for config in default tight-3bit timestep-groups bops; do
  step "config $config loads" 0 "$A python -c \"from mpq_search.config import load_config; \
    print(load_config('studies/$config.toml').study_name)\""
done
# --- 2. the Pareto table and plot --------------------------------------------------------------
step "report" 0 "$A mpq-search report --study mnist-ddpm-4.5bits"
step "report --json" 0 "$A mpq-search report --study mnist-ddpm-4.5bits --json | \
  python -c 'import json,sys; d=json.load(sys.stdin); print(len(d[\"pareto\"]), \"Pareto points\")'"
step "report files" 0 "ls studies/mnist-ddpm-4.5bits/report/pareto.csv \
  studies/mnist-ddpm-4.5bits/report/pareto.html studies/mnist-ddpm-4.5bits/report/bitmaps"
# --- 3. the dashboard (served in the background, asked over HTTP, stopped with SIGTERM) --------
step "dashboard" 0 "$A { mpq-search dashboard --study mnist-ddpm-4.5bits --port 18080 & pid=\$!; \
  for i in \$(seq 60); do curl -sf http://127.0.0.1:18080/api/studies >/dev/null && break; \
  sleep 1; done; curl -sf http://127.0.0.1:18080/api/studies | head -c 200; echo; \
  kill -TERM \$pid; wait \$pid; test \$? -eq 143; }"
# --- 4. confirm on held-out noise --------------------------------------------------------------
step "confirm" 0 "$A mpq-search confirm --study mnist-ddpm-4.5bits $heldout"
# --- 5. export a bit map and apply it ----------------------------------------------------------
step "export --best" 0 "$A mpq-search export --study mnist-ddpm-4.5bits --best -o best.json"
step "apply" 0 "$A mpq-search apply best.json --model mnist-ddpm --n 16 --steps 5 --out grid.png \
  && test -s grid.png"
if [[ -z "$venv" ]]; then  # the torchao format and deploy need the optional extra
  step "install deploy extra" 0 "$A pip install -q -e '.[deploy]'"
fi
for format in torchao modelopt yaml; do
  step "export --format $format" 0 "$A mpq-search export --study mnist-ddpm-4.5bits --best \
    --format $format -o best.$format"
done
# --- 6. your own diffusers model: a local pipeline folder; a hub id (offline: a clear error) ----
step "own model (local folder)" 0 "$A cp -r mpq_search/zoo/mnist-ddpm my-pipeline && \
  mpq-search run --model ./my-pipeline --budget 4.5bits $small"
step "hub id offline" 2 "$A HF_HUB_OFFLINE=1 mpq-search run --model google/ddpm-cifar10-32 \
  --budget 4.5bits $small"
# --- 7. many workers, one study (the README's PostgreSQL worker: here on the study's SQLite) -----
step "run --workers 2" 0 "$A mpq-search run --budget 4.5bits --study pair --workers 2 $small"
step "worker joins a study" 0 "$A mpq-search worker --study pair \
  --storage sqlite:///studies/pair/study.db --trials 1 --threads 1"
# --- from Python (the README's snippet as written) ------------------------------------------------
step "python API" 0 "$A python - <<'EOF'
import mpq_search as mq

model = mq.load_model('mnist-ddpm')
specs = mq.discover_layers(model.denoiser)
prior = mq.allocate(specs, mq.parse_budget('4.5bits', specs), mode='size',
                    model=model.identity)
engine = mq.apply(model, prior)
images = mq.sample(model, n=16, steps=20, seed=0)
engine.remove()
print(images.shape, prior.save('prior.json'))
EOF"
# --- docs/deployment.md: torchao ------------------------------------------------------------------
step "deploy (torchao)" 0 "$A python - <<'EOF'
import mpq_search as mq

model = mq.load_model('mnist-ddpm')
report = mq.deploy(model, mq.BitMap.load('best.json'), backend='torchao')  # in place
print(report.table())
images = mq.sample(model, n=64, steps=20, seed=0)
mq.undeploy(model)
print(images.shape)
EOF"
# --- docs/commands.md: the commands table -------------------------------------------------------
step "models" 0 "$A mpq-search models"
step "sample" 0 "$A mpq-search sample --model mnist-ddpm --n 16 --steps 5 --seed 0 --out fp.png"
step "budget --check" 0 "$A mpq-search budget --check 4.5bits --json | python -m json.tool \
  | head -20"
step "allocate" 0 "$A mpq-search allocate --model mnist-ddpm --budget 4.5bits --mode size \
  -o prior.json"
step "quantize" 0 "$A mpq-search quantize --model mnist-ddpm --uniform W4A8 --features lenet \
  --n 32 --steps 5"
step "bad budget" 2 "$A mpq-search run --budget 4.5bitz"
if ((dev)); then
  step "dev: lint, types, tests" 0 "python3 -m venv .venv && . .venv/bin/activate && \
    pip install -q -e '.[dev]' && ruff check . && mypy && pytest"
fi

echo
printf '%-28s %6s %6s %6s  %s\n' command exit want secs result
failed=0
for i in "${!names[@]}"; do
  result=ok; [[ "${codes[$i]}" == "${expect[$i]}" ]] || { result=FAIL; failed=$((failed + 1)); }
  printf '%-28s %6s %6s %6s  %s\n' "${names[$i]}" "${codes[$i]}" "${expect[$i]}" "${secs[$i]}" \
    "$result"
done
echo "${#names[@]} commands, $failed failed; clone and logs in $work/mpq-search"
exit $((failed > 0))
