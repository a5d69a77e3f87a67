"""The FP model's quality: FID against held-out data (lenet, inception) beside the data floor,
lenet's accuracy, DDIM time per step per image, feature-net time per image.
(docs/results.md#models-and-feature-nets)

    python benchmarks/fp_quality.py

Writes results/fp_quality.json and a sample grid of the FP model beside it (fp_quality_grid.png).
"""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime

import harness
import torch

from mpq_search.data import mnist_split
from mpq_search.evaluate import fid_against_heldout
from mpq_search.fid import dataset_stats, frechet_distance, get_feature_net
from mpq_search.images import save_grid
from mpq_search.models import load_model, sample


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "fp_quality.json")
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--n-lenet", type=int, default=1000)
    made.add_argument("--n-inception", type=int, default=500)
    args = harness.start(harness.parse(made, argv))
    if args.quick:
        args.steps, args.n_lenet, args.n_inception = 3, 16, 8

    model = load_model(args.model)
    results: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": model.identity.name,
        "weights_hash": model.identity.weights_hash,
        "params": sum(p.numel() for p in model.denoiser.parameters()),
        "steps": args.steps,
    }
    grid = sample(model, n=8 if args.quick else 64, steps=args.steps if args.quick else 50,
                  seed=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, args.out.with_name(f"{args.out.stem}_grid.png"), nrow=8)

    started = time.perf_counter()
    images = sample(model, n=args.n_lenet, steps=args.steps, seed=0)
    sampling_s = time.perf_counter() - started
    results["ms_per_ddim_step_per_image"] = 1000 * sampling_s / (args.n_lenet * args.steps)

    lenet = get_feature_net("lenet")
    held_images, held_labels = mnist_split("heldout")
    predictions = lenet.net(held_images).argmax(1)  # type: ignore[attr-defined]
    results["lenet_heldout_accuracy"] = float((predictions == held_labels).float().mean())
    started = time.perf_counter()
    lenet.features(images)
    results["lenet_ms_per_image"] = 1000 * (time.perf_counter() - started) / len(images)
    results["lenet_fid_model"] = fid_against_heldout(images, lenet)
    results["lenet_fid_floor"] = _floor(lenet, args.n_lenet)
    results["lenet_n"] = args.n_lenet

    inception = get_feature_net("inception")
    subset = images[: args.n_inception]
    started = time.perf_counter()
    timed = subset[:50]
    inception.features(timed)
    results["inception_ms_per_image"] = 1000 * (time.perf_counter() - started) / len(timed)
    from mpq_search.fid import stats_of_images

    results["inception_fid_model"] = frechet_distance(
        stats_of_images(subset, inception), dataset_stats("heldout", inception, args.n_inception)
    )
    results["inception_fid_floor"] = _floor(inception, args.n_inception)
    results["inception_n"] = args.n_inception

    harness.write_json(args.out, results)
    print(json.dumps(results, indent=2))


def _floor(net: object, n: int) -> float:
    """FID of the train split against the held-out split at the same N."""
    return frechet_distance(dataset_stats("train", net, n), dataset_stats("heldout", net, n))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
