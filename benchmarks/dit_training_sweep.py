"""Sweep `mnist-dit` training settings: train DiTs on the shipped VAE's latents (one process per
setting, all at once) and score checkpoints by lenet FID vs the held-out split and the LeNet class
accuracy of conditional samples, at several guidance scales (N = 1000, 20 DDIM steps, seed 0).
(docs/results.md#training-mnist-dit)

Made to run on a GPU machine (training on `--device cuda`, sampling on its CPUs); it picks the
training recipe that `mpq_search.training.train_mnist_dit` ships with on the CPU.

    python benchmarks/dit_training_sweep.py --device cuda --out /tmp/dit_sweep \
        --setting base:steps=10000 --setting lr2:steps=10000,lr=2e-3

Each setting's checkpoints and log go to `--out/<name>`; the EVAL lines are printed at the end
(results/dit_training_sweep_h200.jsonl holds the recorded sweep).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import harness

EVAL_EVERY = 2000
GUIDANCES = (1.0, 1.5, 2.0, 3.0)


def _parse(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = float(value) if any(c in value for c in ".e") else int(value)
    return name, options


def _score(folder: Path, threads: int) -> list[dict[str, float | None]]:
    """What `mpq-search fid --guidance-scale G` reports, at each of GUIDANCES."""
    import torch

    from mpq_search.evaluate import fp_fid_report

    torch.set_num_threads(threads)
    rows: list[dict[str, float | None]] = []
    for guidance in GUIDANCES:
        report = fp_fid_report(str(folder), n=1000, steps=20, seed=0, guidance_scale=guidance)
        rows.append({"guidance": guidance, "fid": report.model_fid,
                     "class_accuracy": report.class_accuracy})
    return rows


def _worker(name: str, options: dict[str, Any], device: str, out: Path, threads: int) -> None:
    import torch

    from mpq_search.models import load_model
    from mpq_search.training import train_mnist_dit

    torch.set_num_threads(threads)
    vae = load_model("mnist-dit").decoder
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    log_file = (out / f"{name}.log").open("w")
    started = time.perf_counter()

    def log(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()

    def checkpoint(step: int) -> None:
        if step % EVAL_EVERY == 0:
            for row in _score(folder, threads):
                log("EVAL " + json.dumps({"setting": name, "step": step, **row,
                                          "seconds": time.perf_counter() - started}))

    dit_config = {k: options.pop(k) for k in ("hidden", "layers") if k in options}
    config = {}
    if "hidden" in dit_config:
        config["attention_head_dim"] = int(dit_config["hidden"]) // 4
    if "layers" in dit_config:
        config["num_layers"] = int(dit_config["layers"])
    steps = int(options.pop("steps", 10000))
    train_mnist_dit(folder, vae=vae, dit_steps=steps, dit_config=config, device=device,
                    on_checkpoint=checkpoint, log=log, **options)
    for row in _score(folder, threads):
        log("EVAL " + json.dumps({"setting": name, "step": steps, **row,
                                  "seconds": time.perf_counter() - started}))


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out="/tmp/mpq-dit-sweep", model=None, threads=4)
    made.add_argument("--device", default="cpu")
    made.add_argument("--setting", action="append", required=True,
                      help="name:key=value,... (steps, lr, batch_size, ema_decay, "
                           "label_dropout, hidden, layers)")
    args = harness.parse(made, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    workers = [context.Process(target=_worker, args=(*_parse(s), args.device, args.out,
                                                     args.threads)) for s in args.setting]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for path in sorted(args.out.glob("*.log")):
        for line in path.read_text().splitlines():
            if line.startswith("EVAL "):
                print(line[5:])


if __name__ == "__main__":
    main()
