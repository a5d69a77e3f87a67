"""Weight rounding (round-to-nearest, GPTQ) and the grids, the tables every trial reuses, and
where the rounding is recorded (study identity, exported maps, apply warnings)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mpq_search.bitmap import BitMap, LayerBits, quantizer_meta, quantizer_record
from mpq_search.errors import CalibrationError, RoundingMismatchWarning, StudyError
from mpq_search.layers import LayerSpec, discover_layers, quantizable_modules
from mpq_search.models import LoadedModel, load_model
from mpq_search.quant import QuantConfig, QuantEngine, apply, weight_tables
from mpq_search.quant._quantizers import quantize_weight
from mpq_search.quant._rounding import gptq_round, grid_of, round_to_nearest
from mpq_search.search import StudyConfig, stored_config

FAST = QuantConfig(calib_n=4, calib_steps=4, calib_timesteps=2, batch_size=4,
                   act_samples_per_step=512, kernel="eager", w_bits=(3, 4, 8), a_bits=(8,),
                   rounding="gptq", weight_grid="minmax", calib_draws=1)
"""One calibration draw's tables (the choice among draws: test_calibration_draws)."""


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir: Path) -> tuple[LoadedModel, list[LayerSpec]]:
    model = load_model(tiny_pipeline_dir)
    return model, discover_layers(model.denoiser)


def correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features (as real activations have): where GPTQ has something to
    compensate, unlike isotropic noise."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen)
    return torch.randn(rows, features, generator=gen) @ mixing


def output_error(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> float:
    """Mean squared change of the layer's output when its weight is replaced."""
    with torch.no_grad():
        reference = layer(x)
        original = layer.weight.data
        layer.weight.data = weight
        try:
            return float((layer(x) - reference).square().mean())
        finally:
            layer.weight.data = original


def conv_patches_by_hand(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col written out with slicing (stride 1, symmetric zero padding): one row per output
    position, columns ordered as weight.reshape(out, -1), i.e. (channel, ky, kx)."""
    pad = conv.padding[0]
    kh, kw = conv.kernel_size
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    height = padded.shape[2] - kh + 1
    width = padded.shape[3] - kw + 1
    rows = []
    for n in range(x.shape[0]):
        for i in range(height):
            for j in range(width):
                rows.append(padded[n, :, i:i + kh, j:j + kw].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("grid", ["minmax", "mse"])
def test_gptq_beats_round_to_nearest_on_a_linear(grid: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 24)
    x = correlated_inputs(400, 48, seed=1)
    hessian = x.T @ x  # independently of the package's accumulator
    by_bits = gptq_round(layer.weight, hessian, [3, 4], grid)  # type: ignore[arg-type]
    for bits in (3, 4):
        rtn = round_to_nearest(layer.weight, bits, grid)  # type: ignore[arg-type]
        assert torch.equal(by_bits[bits].scale, rtn.scale)  # the same grid...
        assert torch.equal(by_bits[bits].zero, rtn.zero)
        assert int(by_bits[bits].codes.max()) <= 2**bits - 1
        gptq_err = output_error(layer, x, by_bits[bits].dequantize())
        rtn_err = output_error(layer, x, rtn.dequantize())
        assert gptq_err < 0.8 * rtn_err, (bits, gptq_err, rtn_err)  # ...better codes


def test_gptq_beats_round_to_nearest_on_a_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    gen = torch.Generator().manual_seed(2)
    # channel-correlated inputs, smooth in space (as feature maps are)
    base = torch.randn(8, 6, 6, 6, generator=gen)
    x = torch.einsum("nchw,cd->ndhw", nn.functional.avg_pool2d(
        nn.functional.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1),
        torch.randn(6, 6, generator=gen))
    patches = conv_patches_by_hand(conv, x)
    hessian = patches.T @ patches
    by_bits = gptq_round(conv.weight, hessian, [3, 4], "minmax")
    for bits in (3, 4):
        rtn = round_to_nearest(conv.weight, bits, "minmax")
        gptq_err = output_error(conv, x, by_bits[bits].dequantize())
        rtn_err = output_error(conv, x, rtn.dequantize())
        assert gptq_err < 0.8 * rtn_err, (bits, gptq_err, rtn_err)


def test_gptq_zeroes_dead_inputs_and_survives_a_singular_hessian() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = correlated_inputs(3, 8, seed=3)  # 3 rows: H has rank 3 of 8
    x[:, 5] = 0.0  # an input that never fires
    by_bits = gptq_round(layer.weight, x.T @ x, [4], "minmax")
    deq = by_bits[4].dequantize()
    assert torch.isfinite(deq).all()
    zero_code = by_bits[4].zero
    assert torch.equal(by_bits[4].codes[:, 5].float(), zero_code)  # exactly 0.0 after dequant
    assert torch.all(deq[:, 5] == 0)


def test_gptq_takes_over_an_accumulator_with_the_same_codes() -> None:
    """Handing GPTQ the accumulator (its Hessian reused in place: one H-sized copy fewer on a
    2 GiB real-size Hessian) rounds exactly as handing it the mean, and empties it."""
    from mpq_search.quant._rounding import HessianAccumulator

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    accumulator = HessianAccumulator(conv)
    accumulator.add(torch.randn(4, 6, 8, 8))
    mean = accumulator.mean()
    given = gptq_round(conv.weight, mean, [2, 4, 8], "minmax")
    taken = gptq_round(conv.weight, accumulator, [2, 4, 8], "minmax")
    assert all(torch.equal(given[b].codes, taken[b].codes) for b in (2, 4, 8))
    assert accumulator.hessian.numel() == 0


def test_round_to_nearest_on_the_mse_grid_is_the_old_quantizer_bit_for_bit() -> None:
    torch.manual_seed(0)
    weight = torch.randn(7, 5, 3, 3)
    for bits in (2, 4, 8):
        old = quantize_weight(weight, bits)
        new = round_to_nearest(weight, bits, "mse")
        assert torch.equal(old.codes, new.codes)
        assert torch.equal(old.scale, new.scale)
        scale, zero = grid_of(weight, bits, "minmax")
        flat = weight.reshape(7, -1)
        assert torch.allclose(scale, (flat.amax(1).clamp(min=0) - flat.amin(1).clamp(max=0))
                              / (2**bits - 1))
        assert torch.all((zero >= 0) & (zero <= 2**bits - 1))


def test_rtn_tables_match_the_engine_of_before(tiny: tuple[LoadedModel, list[LayerSpec]]
                                               ) -> None:
    model, specs = tiny
    tables = weight_tables(model, specs, replace(FAST, rounding="rtn", weight_grid="mse"))
    modules = quantizable_modules(model.denoiser)
    for spec in specs:
        expected = quantize_weight(modules[spec.name].weight, 4)
        assert torch.equal(tables.quant(spec.name, 4).codes, expected.codes)


def _fingerprint(tables_entries: dict[str, dict[int, object]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tables_entries):
        for bits in sorted(tables_entries[name]):
            entry = tables_entries[name][bits]
            for part in ("codes", "scale", "zero"):
                digest.update(getattr(entry, part).contiguous().numpy().tobytes())
    return digest.hexdigest()


SECOND_PROCESS = """
import hashlib, sys, torch
torch.set_num_threads(1)
from dataclasses import replace
from mpq_search.layers import discover_layers
from mpq_search.models import load_model
from mpq_search.quant import QuantConfig, weight_tables
config = QuantConfig(**{json_config})
model = load_model(sys.argv[1])
tables = weight_tables(model, discover_layers(model.denoiser), config)
digest = hashlib.sha256()
for name in sorted(tables.entries):
    for bits in sorted(tables.entries[name]):
        entry = tables.entries[name][bits]
        for part in ("codes", "scale", "zero"):
            digest.update(getattr(entry, part).contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


def test_a_second_process_computes_the_same_gptq_tables_bit_for_bit(
    tiny: tuple[LoadedModel, list[LayerSpec]], tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    model, specs = tiny
    tables = weight_tables(model, specs, FAST)
    assert tables.rounding == "gptq" and not tables.fallback
    rtn = weight_tables(model, specs, replace(FAST, rounding="rtn"))
    changed = sum(not torch.equal(tables.quant(s.name, 3).codes, rtn.quant(s.name, 3).codes)
                  for s in specs)
    assert changed > len(specs) // 2  # GPTQ moved codes in most layers
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in FAST.__dict__.items()}
    script = SECOND_PROCESS.replace("{json_config}", repr(settings))
    env = {**os.environ, "MPQ_SEARCH_CACHE": str(tmp_path / "fresh-cache")}  # no cache hit
    out = subprocess.run([sys.executable, "-c", script, str(tiny_pipeline_dir)], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == _fingerprint(
        {n: dict(b) for n, b in tables.entries.items()})
    assert list((tmp_path / "fresh-cache" / "weights").glob("*.npz"))  # and cached it


def test_engine_applies_the_gptq_tables_and_restores_fp(
    tiny: tuple[LoadedModel, list[LayerSpec]]
) -> None:
    model, specs = tiny
    modules = quantizable_modules(model.denoiser)
    fp = {n: m.weight.detach().clone() for n, m in modules.items()}
    engine = QuantEngine(model, specs, FAST).calibrate()
    bitmap = BitMap.uniform(model.identity, [s.name for s in specs], 3, 8)
    engine.apply(bitmap)
    for spec in specs:
        assert torch.equal(modules[spec.name].weight,
                           engine.weights.quant(spec.name, 3).dequantize())
    engine.remove()
    assert all(torch.equal(modules[n].weight, fp[n]) for n in fp)
    with pytest.raises(CalibrationError, match="weight tables are rtn/mse"):
        QuantEngine(model, specs, FAST,
                    weights=weight_tables(model, specs, replace(FAST, rounding="rtn",
                                                                weight_grid="mse")))


def test_rounding_is_part_of_a_study_and_old_studies_resume_as_rtn(tmp_path: Path) -> None:
    from mpq_search.search._study import _check_same

    default = StudyConfig()
    assert (default.quant.rounding, default.quant.weight_grid) == ("gptq", "minmax")
    assert default.replace(rounding="rtn").identity() != default.identity()
    assert default.replace(weight_grid="mse").identity() != default.identity()
    with pytest.raises(StudyError, match="unknown rounding"):
        default.replace(rounding="adaround")
    model = {"weights_hash": "h"}
    as_rtn = default.replace(rounding="rtn", weight_grid="mse")
    flat = {k: v for k, v in as_rtn.identity().items() if "." not in k}  # version 1's names
    legacy = {k: v for k, v in flat.items()
              if k not in ("rounding", "weight_grid")}  # stored before the fields existed
    _check_same({"model": model, "identity": legacy}, {"model": model,
                                                       "identity": as_rtn.identity()})
    # workers and `confirm` rebuild such a study's config as it ran, not with today's defaults
    stored = {k: v for k, v in _flat_v1(default).items() if k not in ("rounding", "weight_grid")}
    again = stored_config(stored)
    assert (again.quant.rounding, again.quant.weight_grid) == ("rtn", "mse")
    assert again.quant.weight_settings() == {"rounding": "rtn", "weight_grid": "mse"}
    with pytest.raises(StudyError, match=r"rounding.*--rounding rtn"):
        _check_same({"model": model, "identity": legacy},
                    {"model": model, "identity": default.replace(
                        rounding="gptq", weight_grid="mse").identity()})


def _flat_v1(config: StudyConfig) -> dict[str, Any]:
    """`config` as a version-1 study stored it: one flat dict of the fields it had."""
    data = config.to_dict()
    del data["version"]
    quant, guided, liveness = data.pop("quant"), data.pop("guided"), data.pop("liveness")
    flat = {**data, **guided, **liveness}
    v1_quant = ("w_bits", "a_bits", "act_calibration", "calib_n", "calib_steps",
                "calib_timesteps", "rounding", "weight_grid")
    return {**flat, **{k: quant[k] for k in v1_quant}}


def test_maps_record_their_rounding_and_applying_another_warns(
    tiny: tuple[LoadedModel, list[LayerSpec]], tmp_path: Path
) -> None:
    from mpq_search.export_formats import read_format, write_format

    model, specs = tiny
    names = [s.name for s in specs]
    plain = BitMap.uniform(model.identity, names, 4, 8)
    made = plain.with_meta(quantizer=quantizer_meta("gptq", "minmax"))
    back = BitMap.load(made.save(tmp_path / "map.json"))
    assert quantizer_record(back.meta) == {"rounding": "gptq", "weight_grid": "minmax"}
    assert json.loads((tmp_path / "map.json").read_text())["meta"]["quantizer"] == {
        "rounding": "gptq", "weight_grid": "minmax"}
    for fmt in ("modelopt", "yaml"):
        path = write_format(made, tmp_path / f"map.{fmt}", fmt).path
        assert quantizer_record(read_format(path, fmt).meta) == {
            "rounding": "gptq", "weight_grid": "minmax"}, fmt
    # a study's export made before the rounding was selectable: round to nearest, MSE grid;
    # other maps with settings (an ILP prior's) record no quantizer
    assert quantizer_record({"study": "s", "settings": {"budget": "4bits"}}) == {
        "rounding": "rtn", "weight_grid": "mse"}
    assert quantizer_record({"settings": {"budget": "4bits"}}) is None
    assert quantizer_record({}) is None
    # the map's own rounding is the default; another one warns once, in one line
    assert QuantConfig.for_bitmap(made).rounding == "gptq"
    config = replace(FAST, w_bits=(4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply(model, made, config).remove()  # same quantizer: silent
    with pytest.warns(RoundingMismatchWarning, match="made for gptq rounding on the minmax"):
        apply(model, made, replace(config, rounding="rtn")).remove()
    # a GPTQ map records its calibration too: for_bitmap adopts it, another one warns
    scored = plain.with_meta(quantizer=config.weight_settings())
    assert QuantConfig.for_bitmap(scored).weight_settings() == config.weight_settings()
    with pytest.warns(RoundingMismatchWarning, match=r"calib_n 4.*calib_n 6"):
        apply(model, scored, replace(config, calib_n=6)).remove()
    with pytest.warns(RoundingMismatchWarning, match="does not know"):
        QuantConfig.for_bitmap(plain.with_meta(quantizer={"rounding": "awq",
                                                          "weight_grid": "minmax"}))
        apply(model, plain.with_meta(quantizer={"rounding": "awq", "weight_grid": "minmax"}),
              config).remove()


def test_apply_command_prints_the_mismatch_as_one_line(
    tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from mpq_search.cli import app

    model = load_model(tiny_pipeline_dir)
    names = [s.name for s in discover_layers(model.denoiser)]
    path = BitMap.from_layers(model.identity, dict.fromkeys(names, LayerBits(8, 8)),
                              meta={"quantizer": quantizer_meta("gptq", "minmax")}).save(
        tmp_path / "map.json")
    result = CliRunner().invoke(app, [
        "apply", str(path), "--model", str(tiny_pipeline_dir), "--n", "2", "--steps", "2",
        "--calib-n", "2", "--rounding", "rtn", "--weight-grid", "minmax",
        "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "warning" in line]
    assert len(lines) == 1 and "made for gptq rounding" in lines[0]
    assert "rtn weights on the minmax grid" in result.output


def test_hessians_in_bounded_chunks_give_the_same_codes(
    tiny: tuple[LoadedModel, list[LayerSpec]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """max_hessian_bytes = 0: one layer's Hessian at a time (a calibration pass each), the
    same codes as all at once; the setting is not part of the cache key, so it reads them."""
    from mpq_search.quant import _tables

    model, specs = tiny
    passes = []
    real = _tables._collect_hessians

    def counting(*args: object, **kwargs: object) -> object:
        passes.append(len(args[1]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_tables, "_collect_hessians", counting)
    monkeypatch.setenv("MPQ_SEARCH_CACHE", str(tmp_path / "a"))
    together = weight_tables(model, specs, FAST)
    monkeypatch.setenv("MPQ_SEARCH_CACHE", str(tmp_path / "b"))
    one_by_one = weight_tables(model, specs, replace(FAST, max_hessian_bytes=0))
    assert passes == [len(specs)] + [1] * len(specs)
    assert _fingerprint({n: dict(b) for n, b in together.entries.items()}) == _fingerprint(
        {n: dict(b) for n, b in one_by_one.entries.items()})


def test_gptq_codes_stay_on_disk_and_are_written_one_layer_at_a_time(
    tiny: tuple[LoadedModel, list[LayerSpec]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The tables hold no codes in memory (a real-size model's are 7 bytes per weight): each
    layer's codes are written to the cache file before the next layer is rounded, and read
    back when asked for, equal to what was rounded, also in a forked process (which opens the
    file itself) and after pickling."""
    import pickle

    from mpq_search.quant import _tables

    model, specs = tiny
    events: list[str] = []
    real_round = _tables.gptq_round

    def rounding(weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        events.append("round")
        rounded = real_round(weight, *args, **kwargs)
        if not seen:  # the first layer's codes, as rounded
            seen.update(rounded)
        return rounded

    seen: dict[int, Any] = {}
    real_writer = _tables.cached_array_file

    def file_of(folder: str, key: Any, names: Any, compute: Any) -> Path:
        def logged(write: Any) -> None:
            def writing(name: str, array: Any) -> None:
                if not events or events[-1] != "write":
                    events.append("write")
                write(name, array)

            compute(writing)

        return real_writer(folder, key, names, logged)

    monkeypatch.setattr(_tables, "gptq_round", rounding)
    monkeypatch.setattr(_tables, "cached_array_file", file_of)
    monkeypatch.setenv("MPQ_SEARCH_CACHE", str(tmp_path))
    tables = weight_tables(model, specs, FAST)
    assert events == ["round", "write"] * len(specs)
    assert tables.nbytes() == 0 and isinstance(tables.entries, _tables.StoredCodes)
    first = specs[0].name
    for bits, entry in seen.items():
        stored = tables.quant(first, bits)
        assert all(torch.equal(getattr(stored, p), getattr(entry, p))
                   for p in ("codes", "scale", "zero"))
    expected = _fingerprint({n: dict(b) for n, b in tables.entries.items()})
    again = pickle.loads(pickle.dumps(tables))
    assert _fingerprint({n: dict(b) for n, b in again.entries.items()}) == expected
    read, written = os.pipe()
    child = os.fork()
    if child == 0:  # the child reads the same tables through its own file
        os.close(read)
        os.write(written, _fingerprint({n: dict(b) for n, b in tables.entries.items()}).encode())
        os._exit(0)
    os.close(written)
    with os.fdopen(read) as pipe:
        assert pipe.read() == expected
    os.waitpid(child, 0)
    assert _fingerprint({n: dict(b) for n, b in tables.entries.items()}) == expected


def test_rtn_tables_over_the_cache_budget_go_to_disk_with_the_same_codes(
    tiny: tuple[LoadedModel, list[LayerSpec]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Round-to-nearest tables that fit `max_cache_bytes` stay in memory; larger ones (a
    real-size model's: one byte per weight per bit-width) are written to the cache file one
    layer at a time and read back equal, so memory does not grow with the number of layers."""
    from mpq_search.quant import _tables

    model, specs = tiny
    monkeypatch.setenv("MPQ_SEARCH_CACHE", str(tmp_path))
    config = replace(FAST, rounding="rtn", weight_grid="mse")
    in_memory = weight_tables(model, specs, config)
    assert in_memory.nbytes() > 0 and isinstance(in_memory.entries, dict)
    written: list[str] = []  # the layer of each array, in the order written
    real_writer = _tables.cached_array_file

    def file_of(folder: str, key: Any, names: Any, compute: Any) -> Path:
        def logged(write: Any) -> None:
            def writing(name: str, array: Any) -> None:
                written.append(name.split("|")[0])
                write(name, array)

            compute(writing)

        return real_writer(folder, key, names, logged)

    monkeypatch.setattr(_tables, "cached_array_file", file_of)
    stored = weight_tables(model, specs, replace(config, max_cache_bytes=0))
    assert stored.rounding == "rtn" and stored.nbytes() == 0
    assert isinstance(stored.entries, _tables.StoredCodes)
    runs = [name for i, name in enumerate(written) if i == 0 or written[i - 1] != name]
    assert runs == [s.name for s in specs]  # each layer written whole before the next
    assert _fingerprint({n: dict(b) for n, b in stored.entries.items()}) == _fingerprint(
        {n: dict(b) for n, b in in_memory.entries.items()})
    assert list((tmp_path / "weights").glob("*.npz"))
