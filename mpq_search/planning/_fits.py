"""Plan a run, and refuse one up front that would not fit in memory.

`plan(config)` loads the model, measures (`_measure`) and predicts (`_predict`): what
`mpq-search plan` prints. `memory_check(config, model, specs)` is the run's own check, right
after loading and before any profiling: the slice calls and the autograd probe only (a few
denoiser calls on one to a few samples, far less than the FP sampling pass a run times next),
then `check_fits` against what the machine has.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from mpq_search.config import StudyConfig
from mpq_search.errors import MPQSearchError
from mpq_search.layers import LayerSpec
from mpq_search.models import LoadedModel
from mpq_search.planning._measure import available_bytes, measure, memory_now
from mpq_search.planning._predict import Constants, predict
from mpq_search.planning._records import RunPlan
from mpq_search.runtime import release_freed_memory, resolve_device, torch_threads
from mpq_search.search import default_feature_net, load


class InsufficientMemoryError(MPQSearchError):
    """A run's predicted peak memory exceeds what the machine has available (the message says
    both, and which stage needs it)."""


def gib(count: float) -> str:
    """Bytes as GiB with two decimals (MiB below one GiB)."""
    if count < 2**30:
        return f"{count / 2**20:.0f} MiB"
    return f"{count / 2**30:.2f} GiB"


def check_fits(run: RunPlan, available: int, source: str = "available memory") -> None:
    """Raise InsufficientMemoryError, one line naming the predicted peak, its stage, the
    largest store and the available bytes, when the peak exceeds `available`."""
    if run.peak_bytes <= available:
        return
    store, size = run.largest_store
    raise InsufficientMemoryError(
        f"this run would need about {gib(run.peak_bytes)} ({int(run.peak_bytes)} bytes) at its "
        f"peak, in {run.peak_stage} (largest store: {store}, {gib(size)}), but this machine "
        f"has {gib(available)} ({available} bytes, {source}); lower n, batch_size, "
        "sensitivity_n or the candidate bits, or pass --no-memory-check to run anyway")


def plan(config: StudyConfig, *, constants: Constants | None = None) -> RunPlan:
    """Load the model, measure it here and predict every stage of a run of `config`."""
    device = torch.device(resolve_device(config.device))
    release_freed_memory()  # the baseline is what stays: loading starts a phase, which trims
    baseline = memory_now(device)
    with torch_threads(config.threads):
        started = time.perf_counter()
        model, specs = load(config)
        seconds = time.perf_counter() - started
        probe = measure(model, specs, config,
                        feature_net=config.feature_net or default_feature_net(model),
                        baseline_bytes=baseline, load_seconds=seconds)
    return predict(config, specs, probe, constants=constants)


def memory_check(config: StudyConfig, model: LoadedModel, specs: Sequence[LayerSpec], *,
                 constants: Constants | None = None) -> RunPlan:
    """The run's up-front check (module doc): the memory part of a plan of the loaded model,
    refused by `check_fits` when it does not fit; the plan when it does."""
    params = sum(p.numel() * p.element_size() for p in model.denoiser.parameters())
    now = memory_now(model.device)
    net = config.feature_net or default_feature_net(model)
    probe = measure(model, specs, config, feature_net=net,
                    baseline_bytes=max(0, now - params), load_seconds=0.0, timings=False)
    run = predict(config, specs, probe, constants=constants)
    check_fits(run, *available_bytes(model.device))
    return run
