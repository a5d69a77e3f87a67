"""The proxy study: which cheap score ranks bit maps, the near-best ones above all, as a large
held-out FID-excess does? (docs/results.md#the-trial-proxy)

1. **Maps.** Run (or resume) a few short studies of one model (`--sources`, each
   `budget:seed:trials`) and take >= `--maps` distinct finished maps from them: the best half by
   the studies' own proxy, the rest spread evenly over the remaining range (so the set is
   weighted toward the near-best, where the search steers).
2. **Reference.** Each map's FID-excess at N = `--ref-n` (>= 2000) on noise seed `--ref-seed`,
   which no candidate uses.
3. **Candidates.** Each map scored at every candidate setting (`--candidates`, each `N:steps`) on
   two noise seeds (`--seeds`). One sampling pass yields every proxy (`evaluate.PROXIES`: FID-
   excess, KID, paired feature distance, paired pixel MSE, their combination), so a setting's
   cost is one pass; the mean of the two seeds stands for a two-stage (multi-fidelity) score.
4. **Table.** Per proxy and setting: seconds per map and ratio to today's trial (N = 128, 20
   steps), Spearman with the reference over all maps and over the maps within 1.5x of the best
   reference, and the seed-to-seed spread (median |a - b| / mean, and Spearman between the seeds).

Every measurement is one JSON line in `--out` (default `results/proxy_quality_<model>.jsonl`),
keyed by (map, setting); a rerun skips those already there, so the script resumes after an
interruption (`--table-only` prints the table from what is there).

    python benchmarks/proxy_quality.py --model mnist-dit
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import harness
from scipy.stats import spearmanr

from mpq_search.api import run
from mpq_search.bitmap import BitMap
from mpq_search.evaluate import PROXIES, SampleSettings
from mpq_search.search import ImportanceScores, StudyConfig, calibrate, find_study, load, prepare


def source_maps(args: argparse.Namespace) -> tuple[list[dict[str, Any]], StudyConfig]:
    """Run the source studies (resumed when present) and pick the maps: near-best weighted."""
    picked: list[dict[str, Any]] = []
    seen: set[str] = set()
    first: StudyConfig | None = None
    for index, source in enumerate(args.sources.split(",")):
        budget, seed, trials = source.split(":")
        config = harness.study_config(
            quick=args.quick, model=args.model, budget=budget, seed=int(seed),
            trials=int(trials), root=str(args.root), threads=args.threads, proxy="fid",
            study=f"proxy-{Path(args.model).name}-{budget}-s{seed}")
        first = first or config
        study = find_study(config.study_name, config.storage_url)
        if study is None or _finished(study) < int(trials):
            print(f"source study {config.study_name}: running {trials} trials", flush=True)
            study = run(config)
        done = [t for t in study.trials if t.values is not None]
        done.sort(key=lambda t: t.values[0])
        share = args.maps // len(args.sources.split(",")) + (1 if index == 0 else 0)
        half = share // 2
        rest = done[half:]
        step = max(1, len(rest) // max(1, share - half))
        for trial in done[:half] + rest[::step]:
            bitmap = trial.user_attrs["bitmap"]
            key = json.dumps(bitmap["groups"], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            picked.append({"id": f"{config.study_name}#{trial.number}", "bitmap": bitmap,
                           "tag": trial.user_attrs.get("tag", ""), "budget": budget,
                           "study_proxy": trial.values[0]})
    assert first is not None
    return picked, first


def _finished(study: Any) -> int:
    return sum(1 for t in study.trials if t.values is not None)


def measure(args: argparse.Namespace) -> None:
    """Score every map at the reference and every candidate setting (resumes from --out)."""
    results = harness.Results(args.out, key=("map", "setting"))
    maps, config = source_maps(args)
    print(f"{len(maps)} maps", flush=True)
    model, specs = load(config)
    stored = find_study(config.study_name, config.storage_url)
    assert stored is not None
    plan = prepare(config, model, specs,
                   importance=ImportanceScores.from_dict(stored.user_attrs["importance"]))
    scorer = calibrate(plan)
    settings = {f"ref:{args.ref_n}:{config.steps}:s{args.ref_seed}":
                SampleSettings(args.ref_n, config.steps, args.ref_seed, config.batch_size)}
    for candidate in args.candidates.split(","):
        n, steps = (int(x) for x in candidate.split(":"))
        for seed in (int(s) for s in args.seeds.split(",")):
            settings[f"{n}:{steps}:s{seed}"] = SampleSettings(n, steps, seed, config.batch_size)
    references = {}
    for name, setting in settings.items():
        started = time.perf_counter()
        references[name] = scorer.reference_for(setting)
        print(f"reference {name}: {time.perf_counter() - started:.1f} s", flush=True)
    for index, item in enumerate(maps):  # map by map, so a partial run covers whole maps
        bitmap = BitMap.from_dict(item["bitmap"])
        for name, setting in settings.items():
            if results.done((item["id"], name)):
                continue
            started = time.perf_counter()
            try:
                scores = scorer.score(bitmap, setting, references[name]).scores
            except Exception as e:  # a NaN map is recorded, not fatal
                scores = {"error": str(e)}
            row = results.add({"map": item["id"], "tag": item["tag"], "budget": item["budget"],
                               "study_proxy": item["study_proxy"], "setting": name,
                               "seconds": time.perf_counter() - started, "scores": scores})
            print(f"map {index + 1}/{len(maps)} {item['id']} {name}: "
                  f"fid {scores.get('fid', float('nan')):.3f} ({row['seconds']:.1f} s)",
                  flush=True)


def table(path: Path, near: float = 1.5) -> str:
    """The proxy table (markdown) from the measurements in `path`."""
    rows = harness.Results(path).rows
    by: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    references_only = {row["map"] for row in rows if row["tag"].startswith("uniform:")}
    for row in rows:
        if "error" in row["scores"]:
            continue
        by.setdefault(row["setting"], {})[row["map"]] = row["scores"]
        seconds.setdefault(row["setting"], []).append(row["seconds"])
    ref_name = next(name for name in by if name.startswith("ref:"))
    reference = {m: s["fid"] for m, s in by[ref_name].items()}
    # near-best among the candidates: the uniform baselines (W8A8 is outside every budget) are
    # references, never candidates
    best = min(v for m, v in reference.items() if m not in references_only)
    near_best = {m for m, v in reference.items()
                 if v <= near * best and m not in references_only}
    today = statistics.median(seconds.get("128:20:s0", seconds[ref_name]))
    groups: dict[str, list[str]] = {}
    for name in by:
        if name != ref_name:
            groups.setdefault(name.rsplit(":s", 1)[0], []).append(name)
    lines = [f"Reference: FID-excess at {ref_name} over {len(reference)} maps; best candidate "
             f"{best:.3f}; {len(near_best)} maps within {near}x of it (uniform baselines "
             "excluded).", "",
             "| proxy | N:steps | s per map | x today | Spearman all | Spearman near-best | "
             "two seeds: Spearman near-best | seed spread (median rel.) | Spearman seed-seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group, names in sorted(groups.items()):
        cost = statistics.median(x for n in names for x in seconds[n])
        for proxy in PROXIES:
            per_seed = []
            for name in names:
                values = {m: s[proxy] for m, s in by[name].items() if m in reference}
                per_seed.append(values)
            common = set(reference).intersection(*[set(v) for v in per_seed])
            near_common = sorted(common & near_best)
            every = sorted(common)
            if len(every) < 3:
                continue

            def rho(values: dict[str, float], keys: list[str]) -> float:
                return float(spearmanr([values[k] for k in keys],
                                       [reference[k] for k in keys]).statistic)

            all_rho = statistics.mean(rho(v, every) for v in per_seed)
            near_rho = statistics.mean(rho(v, near_common) for v in per_seed) \
                if len(near_common) >= 3 else float("nan")
            if len(per_seed) >= 2:
                mean = {k: statistics.mean(v[k] for v in per_seed) for k in every}
                two = rho(mean, near_common) if len(near_common) >= 3 else float("nan")
                a, b = per_seed[0], per_seed[1]
                spread = statistics.median(abs(a[k] - b[k]) / max(1e-12, abs(a[k] + b[k]) / 2)
                                           for k in every)
                seed_rho = float(spearmanr([a[k] for k in every],
                                           [b[k] for k in every]).statistic)
            else:
                two = spread = seed_rho = float("nan")
            lines.append(f"| {proxy} | {group} | {cost:.1f} | {cost / today:.2f} | "
                         f"{all_rho:.2f} | {near_rho:.2f} | {two:.2f} | {spread:.2f} | "
                         f"{seed_rho:.2f} |")
    lines += ["", "Multi-fidelity (`promote_passes = 2`, margin 0.1), replayed in each source "
              "study's trial order: a map whose first pass is within 10% of the best value so "
              "far gets the other seed's pass too, and its value is the mean. Mean over the two "
              "seed orders.", "",
              "| proxy | N:steps | promoted share | cost x today | Spearman near-best | "
              "Spearman all |", "|---|---|---|---|---|---|"]
    for group, names in sorted(groups.items()):
        if len(names) < 2:
            continue
        cost = statistics.median(x for n in names for x in seconds[n]) / today
        for proxy in PROXIES:
            replays = [_replay(by[a], by[b], proxy, reference, near_best, references_only)
                       for a, b in ((names[0], names[1]), (names[1], names[0]))]
            share = statistics.mean(r[0] for r in replays)
            lines.append(f"| {proxy} | {group} | {share:.2f} | {cost * (1 + share):.2f} | "
                         f"{statistics.mean(r[1] for r in replays):.2f} | "
                         f"{statistics.mean(r[2] for r in replays):.2f} |")
    return "\n".join(lines)


def _replay(first: dict[str, dict[str, float]], second: dict[str, dict[str, float]], proxy: str,
            reference: dict[str, float], near_best: set[str], references_only: set[str],
            margin: float = 0.1) -> tuple[float, float, float]:
    """(promoted share, Spearman near-best, Spearman all) of the promotion rule replayed."""
    def order(name: str) -> tuple[str, int]:
        study, number = name.split("#")
        return study, int(number)

    maps = sorted((m for m in first if m in reference and m in second), key=order)
    values: dict[str, float] = {}
    promoted = 0
    best: dict[str, float] = {}
    for name in maps:
        study = order(name)[0]
        value = first[name][proxy]
        candidate = name not in references_only
        if candidate and (study not in best or value <= (1 + margin) * best[study]):
            value = (value + second[name][proxy]) / 2
            promoted += 1
        values[name] = value
        if candidate:
            best[study] = min(best.get(study, value), value)
    near = sorted(near_best & set(values))
    every = sorted(values)
    return (promoted / len(maps),
            float(spearmanr([values[k] for k in near], [reference[k] for k in near]).statistic),
            float(spearmanr([values[k] for k in every],
                            [reference[k] for k in every]).statistic))


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=None)
    made.add_argument("--out", type=Path, default=None,
                      help="result rows (default: results/proxy_quality_<model>.jsonl)")
    made.add_argument("--sources", default="4.5bits:0:44,4.5bits:1:24,3bits:0:20",
                      help="source studies, each budget:seed:trials")
    made.add_argument("--maps", type=int, default=44)
    made.add_argument("--ref-n", type=int, default=2000)
    made.add_argument("--ref-seed", type=int, default=7)
    made.add_argument("--candidates", default="128:20,256:10,64:20",
                      help="candidate sample settings, each N:steps")
    made.add_argument("--seeds", default="0,3", help="two noise seeds of the candidates")
    made.add_argument("--root", type=Path, default=Path("/tmp/mpq-bench-proxy"))
    made.add_argument("--table-only", action="store_true")
    args = made.parse_args(argv)
    if args.out is None:
        args.out = harness.RESULTS / f"proxy_quality_{Path(args.model).name}.jsonl"
    harness.quick_out(args)
    if args.quick:  # two tiny source studies, a small reference, one candidate
        args.sources, args.maps = "5bits:0:4,4.5bits:0:4", 6
        args.ref_n, args.candidates = 16, "8:3"
    harness.start(args)
    if not args.table_only:
        measure(args)
    print(table(Path(args.out)))


if __name__ == "__main__":
    main()
