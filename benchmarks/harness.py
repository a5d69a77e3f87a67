"""The shared harness of the benchmarks: arguments, resumable results, held-out scoring, tables.

Every benchmark in this folder is a short scenario on it (`benchmarks/README.md` lists them):

* `parser` gives the argument basics (`--model`, `--seeds`, `--out`, `--threads`, `--quick`)
  and `start` applies them (`runtime.configure_process`: the settings a user's run has);
* `Results` is a JSON-lines file with one row per finished case, keyed by the case, so a rerun
  skips what is there and an interrupted run resumes (a torn last line is dropped);
* `HeldOut` scores bit maps on noise no trial uses, with many samples (N >= 1000 except in
  `--quick` runs), through the search package's `heldout_settings` and `Scorer`;
* `table` prints markdown rows for `docs/results.md`.

Scenarios import it as `harness` (run them as `python benchmarks/<name>.py`, which puts this
folder on `sys.path`). Heavy imports (torch, the package's stages) happen inside functions, so
`--help` answers at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpq_search.bitmap import BitMap
    from mpq_search.evaluate import Reference, SampleSettings
    from mpq_search.search import Scorer, SearchPlan, StudyConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "mpq-bench-quick"
"""Where `--quick` runs write: their numbers are not results."""
MIN_HELDOUT_N = 1000
"""Held-out scores rank near-best maps only with many samples; fewer only in `--quick` runs."""


# --- arguments ----------------------------------------------------------------------------------
def parser(doc: str | None, *, out: str | Path | None = None, model: str | None = "mnist-ddpm",
           seeds: str | None = None, threads: int = 2) -> argparse.ArgumentParser:
    """An argument parser with the basics every scenario shares. `doc` is the module docstring
    (its first paragraph is the description, the rest the epilog); `out`, `model` and `seeds`
    are the defaults of `--out`, `--model` and `--seeds` (None: the scenario has no such
    option)."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    made = argparse.ArgumentParser(description=head, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    if model is not None:
        made.add_argument("--model", default=model, help="model name or folder (%(default)s)")
    if seeds is not None:
        made.add_argument("--seeds", default=seeds, type=int_list,
                          help="comma-separated seeds (%(default)s)")
    if out is not None:
        made.add_argument("--out", type=Path, default=Path(out),
                          help="result file (%(default)s)")
    made.add_argument("--threads", type=int, default=threads, help="torch threads (%(default)s)")
    made.add_argument("--quick", action="store_true",
                      help="the smallest run that exercises every step (a smoke test: its "
                           "numbers are not results)")
    return made


def parse(made: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a `--quick` run writes under `QUICK_RESULTS`, never into
    `benchmarks/results/`."""
    args = made.parse_args(argv)
    quick_out(args)
    return args


def quick_out(args: argparse.Namespace) -> None:
    """Send a `--quick` run's `--out` to `QUICK_RESULTS` (same file name)."""
    if getattr(args, "quick", False) and getattr(args, "out", None) is not None:
        args.out = QUICK_RESULTS / Path(args.out).name


def int_list(text: str) -> list[int]:
    """'0,1,2' (or '0 1 2') -> [0, 1, 2]."""
    return [int(part) for part in text.replace(" ", ",").split(",") if part]


def str_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (blanks dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def start(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the process settings a user's run has (threads, BLAS, allocator) and return args."""
    from mpq_search.runtime import configure_process

    configure_process(args.threads)
    return args


QUICK_STUDY: dict[str, Any] = {
    "trials": 3, "n": 8, "steps": 3, "proxy_steps": None, "batch_size": 8, "calib_n": 4,
    "calib_steps": 3, "calib_timesteps": 2, "importance_n": 8, "importance_timesteps": 2,
    "sensitivity_n": 4, "sensitivity_probes": 2, "grid_n": 4, "heldout_n": 16,
    "promote_passes": 1, "guard_n": 0}
"""Study settings of a `--quick` run: seconds per study on the embedded models."""


def study_config(*, quick: bool = False, **flat: Any) -> StudyConfig:
    """A study config from flat option names (`calib_n=8`, `rounding="rtn"`, ...); None values
    keep the default, so an unset command-line option means "the study default". `quick`
    starts from `QUICK_STUDY` (given options still win)."""
    from mpq_search.search import load_config

    given = {k: v for k, v in flat.items() if v is not None}
    return load_config(None, **({**QUICK_STUDY, **given} if quick else given))


def heldout_arguments(made: argparse.ArgumentParser) -> None:
    """`--heldout-n` and `--heldout-seed`, the held-out setting of the scenarios that score
    bit maps (`HeldOut`)."""
    made.add_argument("--heldout-n", type=int, default=MIN_HELDOUT_N,
                      help="held-out samples (%(default)s)")
    made.add_argument("--heldout-seed", type=int, default=1,
                      help="held-out noise seed, one no trial uses (%(default)s)")


def budget_slug(budget: str) -> str:
    """A budget as part of a study or file name: 'bops<=W4A8' -> 'bops-le-W4A8'."""
    return budget.replace("<=", "-le-").replace("<", "-lt-")


# --- results ------------------------------------------------------------------------------------
class Results:
    """One JSON-lines file of result rows, one row per finished case, keyed by `key(row)`.

    `done(key)` says whether a case is already there, so a rerun skips it; `add(row)` appends
    the row at once (flushed), so an interrupted run loses at most the case in flight. A last
    line without its newline (the process died mid-write) is dropped on reading and cut off
    before the next append; rows without a key (`key` returns None) are kept but mark nothing
    done.
    """

    def __init__(self, path: str | Path,
                 key: Callable[[dict[str, Any]], Any] | Sequence[str] = ()) -> None:
        self.path = Path(path)
        self._key = key if callable(key) else _fields_key(tuple(key))
        self.rows: list[dict[str, Any]] = []
        self._done: set[Any] = set()
        self._torn = 0  # bytes of a torn last line, cut off before the next append
        self._newline = False  # the last row lacks its newline
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # tail: "" when the file ends with a newline
        if tail:
            try:  # a whole row that only lacks its newline is kept
                json.loads(tail)
                complete.append(tail)
                self._newline = True
            except json.JSONDecodeError:
                self._torn = len(tail.encode())
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{number}: not a JSON row ({e})") from e
            self._remember(row)

    def _remember(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        key = self._key(row)
        if key is not None:
            self._done.add(key)

    def done(self, key: Any) -> bool:
        """Whether the case `key` has a row."""
        return key in self._done

    def add(self, row: dict[str, Any], *, stamp_row: bool = True) -> dict[str, Any]:
        """Append `row` (with `stamp()` fields unless told not to) and mark its case done."""
        if stamp_row:
            row = {**row, **stamp()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._torn:
            with self.path.open("r+b") as f:
                f.truncate(f.seek(0, 2) - self._torn)
            self._torn = 0
        with self.path.open("a") as f:
            f.write("\n" * self._newline + json.dumps(row, default=str) + "\n")
        self._newline = False
        self._remember(row)
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def _fields_key(fields: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    def key(row: dict[str, Any]) -> Any:
        if not fields or any(f not in row for f in fields):
            return None
        return tuple(row[f] for f in fields)

    return key


def stamp() -> dict[str, Any]:
    """When and where a row was measured: UTC date, machine, torch threads and version."""
    out: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                           "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
        out["threads"] = torch.get_num_threads()
    return out


def write_json(path: str | Path, data: Any) -> None:
    """Write a whole-run result (one JSON document), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON document, or `default` when the file is not there."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


# --- held-out scoring ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOut:
    """Scores bit maps by FID-excess on held-out noise: `settings.n` samples at the sampler's
    steps, on a noise seed no trial uses, against the FP model's samples of the same noise."""

    scorer: Scorer
    settings: SampleSettings
    reference: Reference

    @classmethod
    def of(cls, scorer: Scorer, config: StudyConfig, *, n: int | None = None,
           seed: int | None = None, quick: bool = False) -> HeldOut:
        """The held-out setting of `config` (`heldout_n`, `heldout_seed`; `n`/`seed` override
        them); N below `MIN_HELDOUT_N` only when `quick`."""
        from mpq_search.search import heldout_settings

        changes: dict[str, Any] = {"heldout_n": n, "heldout_seed": seed}
        settings = heldout_settings(config.replace(
            **{k: v for k, v in changes.items() if v is not None}))
        if settings.n < MIN_HELDOUT_N and not quick:
            raise ValueError(f"held-out N = {settings.n} < {MIN_HELDOUT_N}: too few samples "
                             "to rank near-best maps (use --quick for a smoke test)")
        return cls(scorer, settings, scorer.reference_for(settings))

    def score(self, bitmap: BitMap) -> float:
        """The map's held-out FID-excess; inf when its samples are not finite."""
        from mpq_search.errors import NonFiniteSamplesError

        try:
            return self.scorer.score(bitmap, self.settings, self.reference).fid_excess
        except NonFiniteSamplesError:
            return math.inf

    def key(self) -> str:
        """The setting as stored with held-out scores (N, steps, seed)."""
        return str(self.settings.key())


def heldout_scores(rows: Iterable[dict[str, Any]], model: str, n: int,
                   seed: int) -> dict[str, float]:
    """Map key -> held-out score, from result rows of `model` scored at N = `n` on noise seed
    `seed` (rows with a `map` and a `heldout`), so that a map is scored only once."""
    return {row["map"]: row["heldout"] for row in rows
            if "map" in row and row.get("heldout") is not None and row.get("model") == model
            and (row.get("heldout_n"), row.get("heldout_seed")) == (n, seed)}


def study_plan(config: StudyConfig, study: Any) -> SearchPlan:
    """The search plan of a stored study, with the importance scores it stored (none: they
    are profiled again)."""
    from mpq_search.search import ImportanceScores, load, prepare

    model, specs = load(config)
    stored = study.user_attrs.get("importance")
    return prepare(config, model, specs,
                   importance=None if stored is None else ImportanceScores.from_dict(stored))


def map_key(bitmap: BitMap) -> str:
    """The bits of a map (not its notes), so the same map is scored held-out only once."""
    data = bitmap.to_dict()
    data.pop("meta", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- timing and processes -----------------------------------------------------------------------
def best_of(repeats: int, work: Callable[[], Any], *, warm_up: bool = True) -> float:
    """Seconds of the fastest of `repeats` runs of `work` (after one untimed run)."""
    if warm_up:
        work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def run_json(command: Sequence[str], **kwargs: Any) -> Any:
    """Run a command (a scenario measuring in a fresh process) and parse its last stdout line as
    JSON."""
    out = subprocess.run(list(command), check=True, capture_output=True, text=True, cwd=ROOT,
                         **kwargs).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- tables -------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: `header`, then one line per row (cells through `cell`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(value: Any, digits: int = 2) -> str:
    """A table cell: floats to `digits` places, None as '-', the rest as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def spread(values: Iterable[float]) -> str:
    """'median [min-max]' of the values, or '-' when there are none."""
    import statistics

    got = sorted(values)
    if not got:
        return "-"
    return f"{statistics.median(got):.2f} [{got[0]:.2f}-{got[-1]:.2f}]"
