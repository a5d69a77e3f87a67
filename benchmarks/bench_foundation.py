"""Foundation figures: FP FID vs held-out (lenet, inception) beside the data floor, lenet accuracy,
DDIM time per step per image, and feature-net time per image.

    python benchmarks/bench_foundation.py --out benchmarks/results/foundation.json

Writes a sample grid of the FP model next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from mpq_search.data import mnist_split
from mpq_search.evaluate import fid_against_heldout
from mpq_search.fid import dataset_stats, frechet_distance, get_feature_net
from mpq_search.images import save_grid
from mpq_search.models import load_model, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="mnist-ddpm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-lenet", type=int, default=1000)
    parser.add_argument("--n-inception", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/foundation.json"))
    args = parser.parse_args()

    model = load_model(args.model)
    results: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": model.identity.name,
        "weights_hash": model.identity.weights_hash,
        "params": sum(p.numel() for p in model.denoiser.parameters()),
        "steps": args.steps,
    }
    grid = sample(model, n=64, steps=50, seed=0)
    save_grid(grid, args.out.with_name("fp_grid.png"), nrow=8)

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
    inception.features(subset[:50])
    results["inception_ms_per_image"] = 1000 * (time.perf_counter() - started) / 50
    from mpq_search.fid import stats_of_images

    results["inception_fid_model"] = frechet_distance(
        stats_of_images(subset, inception), dataset_stats("heldout", inception, args.n_inception)
    )
    results["inception_fid_floor"] = _floor(inception, args.n_inception)
    results["inception_n"] = args.n_inception

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _floor(net: object, n: int) -> float:
    """FID of the train split against the held-out split at the same N."""
    return frechet_distance(dataset_stats("train", net, n), dataset_stats("heldout", net, n))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
