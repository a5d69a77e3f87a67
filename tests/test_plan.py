"""`mpq-search plan` and the run's up-front memory refusal (`mpq_search.planning`)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _search_fixtures import tiny_config, write_config_toml
from typer.testing import CliRunner

from mpq_search.cli import app
from mpq_search.cli._plan import parse_memory
from mpq_search.layers import LayerSpec, discover_layers
from mpq_search.phases import PHASES
from mpq_search.planning import (
    STAGES,
    InsufficientMemoryError,
    Machine,
    PeakMemory,
    Primitives,
    Probe,
    RunPlan,
    check_fits,
    hessian_chunks,
    memory_check,
    predict,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

runner = CliRunner()
EVERY_STAGE = {"prior_modes": ("orthogonality", "sensitivity", "size"),
               "surrogate_prior": "best-prior", "sensitivity_n": 4, "sensitivity_probes": 1}
"""Settings of the tiny config under which a run goes through every stage."""


def _probe(**changes: Any) -> Probe:
    """Measured figures of a made-up model: predictions from them are arithmetic only."""
    machine = Machine("cpu", flops=1e10, element_seconds=1e-9, op_seconds=1e-5,
                      fid_seconds_at=0.05)
    values: dict[str, Any] = dict(
        device="cpu", rows_per_sample=1, slice_samples=8, baseline_bytes=500_000_000,
        model_bytes=100_000_000, load_seconds=2.0, call_fixed_seconds=0.01,
        call_sample_seconds=0.002, act_fixed_bytes=1e6, act_sample_bytes=2e6,
        grad_forward_ratio=1.5, backward_ratio=2.0, grad_fixed_bytes=5e6,
        grad_sample_bytes=6e6, grad_measured=True, decode_fixed_seconds=0.0,
        decode_sample_seconds=0.0, decode_fixed_bytes=0.0, decode_sample_bytes=0.0,
        image_shape=(1, 16, 16), feature_net="lenet", feature_dim=128,
        feature_load_seconds=0.01, feature_net_bytes=1_000_000, feature_image_seconds=1e-4,
        ilp_seconds=0.1, machine=machine,
        primitives=Primitives(range_search_seconds=0.002, gptq_column_seconds=1e-4,
                              gptq_rows=32, cka_step_seconds=0.01))
    values.update(changes)
    return Probe(**values)


def _specs() -> list[LayerSpec]:
    """A made-up layer table: two convs and a Linear."""
    return [
        LayerSpec("conv_in", "conv2d", (1, 16, 16), (8, 16, 16), (8, 1, 3, 3), 80, 8 * 9 * 256),
        LayerSpec("mid.conv", "conv2d", (8, 8, 8), (16, 8, 8), (16, 8, 3, 3), 1168,
                  16 * 72 * 64),
        LayerSpec("out", "linear", (64, 16), (64, 32), (32, 16), 544, 64 * 32 * 16),
    ]


def _plan(probe: Probe | None = None, **settings: Any) -> RunPlan:
    from mpq_search.config import StudyConfig

    config = StudyConfig().replace(**{"n": 16, "steps": 4, "trials": 4, **settings})
    return predict(config, _specs(), probe or _probe())


def test_stage_names_are_the_run_phases() -> None:
    """`plan` predicts what the run records: every stage but the sum of trials is a phase."""
    assert set(STAGES) - {"trials"} <= set(PHASES)


@pytest.fixture(scope="module")
def planned(tiny_pipeline_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Any, str]:
    """(`plan --json` of the tiny model with settings that go through every stage, the
    command's record, the config file): one real plan; the other CLI tests reuse its record."""
    import mpq_search.api_commands as commands

    root = tmp_path_factory.mktemp("plan")
    config = tiny_config(tiny_pipeline_dir, root, **EVERY_STAGE)
    path = write_config_toml(config, root / "study.toml")
    records: list[Any] = []
    real = commands.plan_study

    def spy(cfg: Any) -> Any:
        records.append(real(cfg))
        return records[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(commands, "plan_study", spy)
        result = runner.invoke(app, ["plan", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0]), records[0], str(path)


@pytest.fixture
def plan_json(planned: tuple[dict[str, Any], Any, str]) -> dict[str, Any]:
    return planned[0]


@pytest.fixture
def replayed(planned: tuple[dict[str, Any], Any, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The config file, with `plan` answering from the recorded plan (no new measurement)."""
    import mpq_search.api_commands as commands

    monkeypatch.setattr(commands, "plan_study", lambda cfg: planned[1])
    return planned[2]


def test_plan_json_every_stage(plan_json: dict[str, Any]) -> None:
    stages = {s["name"]: s for s in plan_json["stages"]}
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["seconds"] > 0, name
        assert stage["peak_bytes"] > 0, name
    assert plan_json["total_seconds"] == pytest.approx(
        sum(s["seconds"] for n, s in stages.items() if n != "trial"))
    assert plan_json["peak_bytes"] == max(s["peak_bytes"] for s in stages.values())
    assert stages["trials"]["seconds"] >= 4 * stages["trial"]["seconds"]
    assert plan_json["fits"] is True and plan_json["available_bytes"] > 0
    probe = plan_json["probe"]
    assert probe["call_sample_seconds"] > 0 and probe["slice_samples"] > 1
    assert probe["model_bytes"] > 0 and probe["grad_sample_bytes"] >= 0


def test_plan_table_fits_80_columns(replayed: str) -> None:
    result = runner.invoke(app, ["plan", "--config", replayed], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    for name in STAGES:
        assert name in result.stdout


def test_cli_refuses_what_does_not_fit(replayed: str) -> None:
    """`--memory` smaller than the predicted peak: one line, exit code 2, no traceback; and
    `--no-memory-check` prints the plan anyway."""
    result = runner.invoke(app, ["plan", "--config", replayed, "--memory", "1MiB"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: this run would need")
    assert f"{1 << 20} bytes" in errors[0]
    again = runner.invoke(app, ["plan", "--config", replayed, "--memory", "1MiB",
                                "--no-memory-check"])
    assert again.exit_code == 0, again.output


def test_more_trials_take_longer() -> None:
    few, many = _plan(trials=4), _plan(trials=12)
    one = few.stage("trial").seconds
    assert many.stage("trials").seconds >= few.stage("trials").seconds + 8 * one
    assert many.stage("trial").seconds == pytest.approx(few.stage("trial").seconds)
    assert many.total_seconds > few.total_seconds


def test_more_bit_widths_make_bigger_tables() -> None:
    """Round-to-nearest tables are held in memory through the trials; GPTQ's are read from
    their cache file, so only the rounding itself grows with the bit-widths."""
    two, seven = ((4, 8), (2, 3, 4, 5, 6, 7, 8))
    common = {"a_bits": (8,), "baselines": ("W4A8",)}
    rtn = {w: _plan(w_bits=w, rounding="rtn", **common) for w in (two, seven)}
    gptq = {w: _plan(w_bits=w, **common) for w in (two, seven)}
    for stage in ("weight-tables", "calibration", "trial"):
        assert rtn[seven].stage(stage).peak_bytes > rtn[two].stage(stage).peak_bytes, stage
    assert gptq[seven].stage("weight-tables").peak_bytes >= \
        gptq[two].stage("weight-tables").peak_bytes
    assert gptq[seven].stage("weight-tables").seconds > gptq[two].stage("weight-tables").seconds
    assert gptq[seven].stage("trial").peak_bytes < rtn[seven].stage("trial").peak_bytes


def test_larger_batches_need_more_memory_and_time() -> None:
    small, large = _plan(n=16, batch_size=16), _plan(n=256, batch_size=256)
    assert large.stage("fp-pass").peak_bytes > small.stage("fp-pass").peak_bytes
    assert large.stage("trial").seconds > small.stage("trial").seconds
    slow = _plan(_probe(call_sample_seconds=0.02))
    assert slow.stage("trial").seconds > _plan().stage("trial").seconds


def test_sensitivity_graph_grows_with_its_batch() -> None:
    small, large = _plan(sensitivity_n=4), _plan(sensitivity_n=64)
    assert large.stage("sensitivity").peak_bytes - small.stage("sensitivity").peak_bytes == \
        pytest.approx(60 * 6e6)
    batched = _plan(sensitivity_n=64, batch_size=4)  # 16 graphs of 4 samples, one at a time
    assert batched.stage("sensitivity").peak_bytes == pytest.approx(
        _plan(sensitivity_n=4, batch_size=4).stage("sensitivity").peak_bytes)
    assert batched.stage("sensitivity").seconds > small.stage("sensitivity").seconds
    unused = _plan(prior_modes=("size",), surrogate_prior="orthogonality")
    assert "sensitivity" not in [s.name for s in unused.stages]


def test_hessian_chunks_match_the_quantizer(tiny_pipeline_dir: Path) -> None:
    """The plan groups layers for GPTQ as `quant._tables` does (the same chunks)."""
    from mpq_search.layers import quantizable_modules
    from mpq_search.models import load_model
    from mpq_search.quant._tables import _chunks

    model = load_model(tiny_pipeline_dir)
    specs = discover_layers(model.denoiser)
    modules = quantizable_modules(model.denoiser)
    names = [s.name for s in specs]
    for limit in (0, 20_000, 200_000, 1 << 30):
        planned = [[s.name for s in chunk] for chunk in hessian_chunks(specs, limit)]
        assert planned == list(_chunks(modules, names, limit)), limit


def test_check_fits_refuses_with_both_numbers() -> None:
    run = _plan()
    check_fits(run, int(run.peak_bytes) + 1)
    with pytest.raises(InsufficientMemoryError) as caught:
        check_fits(run, 1000, "MemAvailable")
    message = str(caught.value)
    assert "\n" not in message
    assert f"{int(run.peak_bytes)} bytes" in message and "1000 bytes" in message
    assert run.peak_stage in message and "--no-memory-check" in message


def test_memory_check_refuses_before_profiling(
    tiny_pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run's check measures the loaded model and refuses when the machine is too small
    (here: made small), and passes on this machine."""
    from mpq_search.planning import _fits
    from mpq_search.search import load

    config = tiny_config(tiny_pipeline_dir, tmp_path, **EVERY_STAGE)
    model, specs = load(config)
    run = memory_check(config, model, specs)
    assert run.peak_bytes > run.probe.baseline_bytes + run.probe.model_bytes
    monkeypatch.setattr(_fits, "available_bytes", lambda device: (1 << 20, "test"))
    with pytest.raises(InsufficientMemoryError, match="1048576 bytes, test"):
        memory_check(config, model, specs)
    assert all(not p.requires_grad for p in model.denoiser.parameters())


def test_peak_memory_sees_a_short_allocation() -> None:
    """A 64 MiB block held briefly: the poller sees it even when the process's high-water mark
    is already higher (late in a test session, VmHWM says nothing new). The block is mapped
    from the kernel directly, since late in a session the allocator may hand out freed memory
    that is still resident (RSS would not move); on a loaded machine the poller's thread may
    wait a while for a core, so the block is held until it is seen (at most 2 s)."""
    import mmap

    with PeakMemory(torch.device("cpu")) as memory:
        start = memory.peak
        block = mmap.mmap(-1, 64 << 20)
        block.write(b"\x01" * (64 << 20))  # touched: resident
        deadline = time.monotonic() + 2.0
        while memory.peak - start < 48 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
    assert memory.peak - start >= 48 << 20


@pytest.mark.parametrize(("text", "count"), [("24GiB", 24 << 30), ("512 MiB", 512 << 20),
                                              ("1.5GB", 1_500_000_000), ("1000", 1000)])
def test_parse_memory(text: str, count: int) -> None:
    assert parse_memory(text) == count


def test_stage_record_round_trips_to_json() -> None:
    run = _plan()
    stages = [dataclasses.asdict(s) for s in run.stages]
    assert json.loads(json.dumps(stages, allow_nan=False)) == stages


def test_an_applied_map_counts_the_weights_the_float_cache_lacks() -> None:
    """A trial holds a dequantized float copy of every weight the engine's cache does not
    hold. These layers fit the default cache at every bit-width (a trial adds no copy); with
    no cache, a trial holds one copy of the whole denoiser's weights."""
    from mpq_search.config import StudyConfig

    weights = 4.0 * sum(math.prod(s.weight_shape) for s in _specs())
    widths = len(StudyConfig().quant.w_bits)
    cached, uncached = _plan(), _plan(max_cache_bytes=0)
    assert cached.stage("trial").peak_bytes - uncached.stage("trial").peak_bytes == \
        pytest.approx(widths * weights - weights)
    assert uncached.stage("calibration").peak_bytes >= \
        uncached.stage("load").peak_bytes + weights
    half = _plan(max_cache_bytes=0, dtype="bfloat16")  # the copies are in the model's dtype
    from mpq_search.choices import MODEL_DTYPE_BYTES
    from mpq_search.models import resolve_dtype

    assert {d: resolve_dtype(d).itemsize for d in MODEL_DTYPE_BYTES} == MODEL_DTYPE_BYTES
    assert uncached.stage("trial").peak_bytes - half.stage("trial").peak_bytes == \
        pytest.approx(weights / 2)


FREED_BEFORE_A_PLAN = """
import sys, numpy as np
from mpq_search.planning import plan
from mpq_search.runtime import keep_freed_memory
from mpq_search.search import load_config
keep_freed_memory()  # as the CLI runs; then memory freed before the plan, which loading hands back
blocks = [np.ones(1 << 20) for _ in range(64)]
del blocks
probe = plan(load_config(None, model=sys.argv[1], n=4, batch_size=4)).probe
print(probe.model_bytes)
"""


def test_the_loaded_model_is_counted_after_freed_memory_is_handed_back(
        tiny_pipeline_dir: Path) -> None:
    """Loading starts a phase, which returns the memory glibc kept; the model's bytes are not
    what RSS grew by then (which can be negative) but at least its parameters."""
    import subprocess
    import sys

    from mpq_search.models import load_model

    params = sum(p.numel() * p.element_size()
                 for p in load_model(tiny_pipeline_dir).denoiser.parameters())
    out = subprocess.run([sys.executable, "-c", FREED_BEFORE_A_PLAN, str(tiny_pipeline_dir)],
                         capture_output=True, text=True, check=True, timeout=300)
    assert int(out.stdout.strip().splitlines()[-1]) >= params
