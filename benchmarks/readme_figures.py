"""The README's pictures: a study's Pareto plot and FP-vs-quantized sample grids, as PNGs.

    python benchmarks/readme_figures.py --config studies/default.toml --out docs

Runs the study the config describes (or resumes it: a finished study only loads), then writes
`pareto.png`, `samples.png` and `bitmaps.png` from the same `mpq_search.report` figures as the
report's HTML and the notebook. Plotly figures are exported with kaleido, which drives a
Chromium it finds on the machine (Debian: `apt-get install -y chromium`); without one the
figures are drawn with matplotlib instead (same data, plainer look).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import harness

from mpq_search import report
from mpq_search.api import run
from mpq_search.models import sample
from mpq_search.search import find_study, load, load_config


def export(figure: Any, path: Path, *, width: int, height: int) -> str:
    """Write a plotly figure as PNG with kaleido; fall back to matplotlib. Returns the engine."""
    try:
        figure.write_image(str(path), width=width, height=height, scale=1)
        return "kaleido"
    except Exception as e:  # kaleido missing, or no Chromium for it to drive
        print(f"kaleido export failed ({type(e).__name__}: {e}); drawing with matplotlib")
    _matplotlib(figure, path, width=width, height=height)
    return "matplotlib"


def _matplotlib(figure: Any, path: Path, *, width: int, height: int) -> None:
    """A plain rendering of the scatter, heatmap and image traces of a plotly figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [t for t in figure.data if t.type == "image"]
    heatmaps = [t for t in figure.data if t.type == "heatmap"]
    panels = images or heatmaps
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width / 100, height / 100),
                             squeeze=False)
    if images or heatmaps:
        titles = [a.text for a in figure.layout.annotations] or [""] * len(panels)
        for ax, trace, title in zip(axes[0], panels, titles, strict=False):
            if trace.type == "image":
                ax.imshow(trace.z)
                ax.axis("off")
            else:
                ax.imshow(trace.z, aspect="auto", vmin=2, vmax=8, cmap="viridis")
                ax.set_yticks(range(len(trace.y)), trace.y, fontsize=5)
                ax.set_xticks(range(len(trace.x)), trace.x, rotation=60, fontsize=6)
            ax.set_title(title, fontsize=8)
    else:
        ax = axes[0][0]
        for trace in figure.data:
            ax.plot(trace.x, trace.y, "-o" if "lines" in (trace.mode or "") else "o",
                    label=trace.name, markersize=5)
        ax.set_yscale("log")
        ax.set_xlabel(figure.layout.xaxis.title.text or "")
        ax.set_ylabel(figure.layout.yaxis.title.text or "")
        ax.legend(fontsize=7)
    fig.suptitle(figure.layout.title.text or "", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out="docs", model=None, threads=0)
    made.add_argument("--config", default="studies/default.toml")
    made.add_argument("--root", default=None, help="study folder root (default: the config's)")
    args = harness.parse(made, argv)
    overrides = {"threads": args.threads or None, **({"root": args.root} if args.root else {})}
    if args.quick:
        overrides |= {**harness.QUICK_STUDY, "root": str(harness.QUICK_RESULTS / "studies")}
    config = load_config(args.config, **overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    study = find_study(config.study_name, config.storage_url)
    done = 0 if study is None else sum(t.values is not None for t in study.trials)
    if study is None or done < config.trials:
        study = run(config, stage=lambda s: print(f"[{time.perf_counter() - started:6.0f}s] {s}"))
    rows = report.rows(study)
    front = report.pareto_rows(study)
    engines = [export(report.pareto_figure(study, rows), out / "pareto.png",
                      width=900, height=520)]

    model, _specs = load(config)
    fp = sample(model, n=config.n, steps=config.trial_steps, seed=config.sample_seed,
                   batch_size=config.batch_size)[: config.grid_n]  # the trials' grids' noise
    artifacts = config.study_dir / "artifacts"
    best = min(front, key=lambda r: r.fid_excess)
    cheapest = min(front, key=lambda r: r.bops)
    panels = {"full precision<br>W32A32": report.image_grid(fp)}
    budget = study.user_attrs.get("budget")
    panels[f"best at {budget} (trial {best.trial})<br>W{best.avg_w_bits:.2f}, "
           f"FID-excess {best.fid_excess:.1f}"] = report.trial_grid(study, best.trial, artifacts)
    if cheapest.trial != best.trial:
        panels[f"cheapest Pareto point (trial {cheapest.trial})<br>W{cheapest.avg_w_bits:.2f}, "
               f"FID-excess {cheapest.fid_excess:.0f}"] = report.trial_grid(
            study, cheapest.trial, artifacts)
    w4a8 = next((r for r in rows if r.tag == "uniform:W4A8"), None)
    if w4a8 is not None:
        panels[f"uniform W4A8<br>FID-excess {w4a8.fid_excess:.0f}"] = report.trial_grid(
            study, w4a8.trial, artifacts)
    figure = report.grids_figure(panels, title="samples from the same noise")
    engines.append(export(figure, out / "samples.png", width=280 * len(panels), height=360))
    chosen = [r.trial for r in front][:6]
    figure = report.bitmap_figure(study, chosen)
    engines.append(export(figure, out / "bitmaps.png", width=900,
                          height=int(figure.layout.height)))
    for name in ("pareto.png", "samples.png", "bitmaps.png"):
        print(f"{out / name}: {(out / name).stat().st_size / 1e3:.0f} KB")
    print(f"study {study.study_name}: {len(rows)} trials, Pareto front {[r.trial for r in front]}"
          f"; best trial {best.trial} FID-excess {best.fid_excess:.3f}; exported with "
          f"{', '.join(sorted(set(engines)))} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
