"""Bit maps in the formats other tools read: torchao, ModelOpt-style `quantized_layers`, YAML.

Each writer has a reader that gives the map back (tests read every format back). Every format
records the weight rounding and grid the map was made for ("quantizer", when the map records
one: `bitmap.quantizer_record`); the torchao file carries it in its copy of the map's meta.
Every file carries a schema string; a reader refuses another one. Only single-group maps can be
written: none of these consumers switches plans between sampling steps.

torchao (`*.torchao.json`, schema `mpq-search/torchao/v1`)::

    {"schema": ..., "torchao_version": "0.18.0", "model": {"name", "weights_hash"},
     "fqn_to_config": <torchao.core.config.config_to_dict(FqnToConfig)>,
     "layers": [{"name", "kind", "map": "W4A8", "runs": "W4A8", "config", "note"}, ...],
     "realised": {"bytes_share": 1.0, "bops_share": 0.91}}

  `read_torchao(path)` gives the `FqnToConfig` back; `quantize_(denoiser, config,
  filter_fn=None)` applies it with torchao's own weight grid (`mpq_search.deploy` applies it with
  the simulation's grid instead).

modelopt (`*.modelopt.json`, producer `mpq-search`), shaped as ModelOpt's mixed-precision
`hf_quant_config.json`::

    {"producer": {"name": "mpq-search", "version": ..., "schema": "mpq-search/modelopt/v1"},
     "model": {"name", "weights_hash"},
     "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": null,
                      "quantized_layers": {"conv_in": {"quant_algo": "W4A8", "weight_bits": 4,
                                           "activation_bits": 8, "granularity": "per_channel",
                                           "activations": "per_tensor_static"}},
                      "exclude_modules": ["..."],
                      "quantizer": {"rounding": "gptq", "weight_grid": "minmax"}}}

  `quant_algo` is `W<w>A<a>` (A16/A32: float activations), not one of ModelOpt's named recipes
  (W4A16_AWQ, FP8, ...): a consumer that knows only those must map it.

yaml (`*.yaml`, schema `mpq-search/bits-yaml/v1`), layer -> bits as in MixDQ's configs::

    schema: mpq-search/bits-yaml/v1
    model: {name: mnist-ddpm, weights_hash: ...}
    quantizer: {rounding: gptq, weight_grid: minmax}
    weight_bits: {conv_in: 8, ...}
    act_bits: {conv_in: 8, ...}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from mpq_search._version import __version__
from mpq_search.bitmap import (
    FLOAT,
    QUANTIZER_META,
    BitMap,
    LayerBits,
    ModelIdentity,
    is_float,
    quantizer_record,
)
from mpq_search.deployment import (
    LayerDeployment,
    check_single_group,
    plan_layers,
    plan_table,
    probe,
    realised,
    require_torchao,
    torchao_config,
    torchao_version,
)
from mpq_search.errors import BitMapError
from mpq_search.files import write_text

Format = Literal["json", "torchao", "modelopt", "yaml"]
FORMATS: tuple[str, ...] = get_args(Format)
SUFFIXES: dict[str, str] = {"json": ".json", "torchao": ".torchao.json",
                            "modelopt": ".modelopt.json", "yaml": ".yaml"}
TORCHAO_SCHEMA = "mpq-search/torchao/v1"
MODELOPT_SCHEMA = "mpq-search/modelopt/v1"
YAML_SCHEMA = "mpq-search/bits-yaml/v1"


@dataclass(frozen=True)
class Exported:
    """A written file, and for torchao the plan of what torchao runs."""

    path: Path
    plan: tuple[LayerDeployment, ...] = ()
    table: str = ""


def _write(path: str | Path, text: str) -> Path:
    target = Path(path)
    try:
        write_text(target, text)  # whole or not at all; a full disk raises DiskFullError
    except OSError as e:
        raise BitMapError(f"cannot write or read {target}: {e.strerror}") from e
    return target


def _read(path: str | Path) -> str:
    source = Path(path)
    try:
        return source.read_text()
    except OSError as e:
        raise BitMapError(f"cannot write or read {source}: {e.strerror}") from e


def _identity(data: Any, where: str) -> ModelIdentity:
    if not isinstance(data, dict) or not {"name", "weights_hash"} <= set(data):
        raise BitMapError(f"{where}: 'model' must be an object with 'name' and 'weights_hash'")
    return ModelIdentity(str(data["name"]), str(data["weights_hash"]))


def _model(identity: ModelIdentity) -> dict[str, str]:
    return {"name": identity.name, "weights_hash": identity.weights_hash}


def _quantizer(bitmap: BitMap) -> dict[str, Any]:
    """The quantizer the map was made for (rounding, grid, GPTQ's calibration), as a format
    records it ({} when the map records none): codes from another rounding are other weights."""
    recorded = quantizer_record(bitmap.meta)
    return {} if recorded is None else {QUANTIZER_META: recorded}


def _quantizer_back(data: dict[str, Any]) -> dict[str, Any]:
    """The map meta of what `_quantizer` wrote."""
    recorded = data.get(QUANTIZER_META)
    return {QUANTIZER_META: dict(recorded)} if isinstance(recorded, dict) else {}


# --- torchao ----------------------------------------------------------------------------------
def write_torchao(bitmap: BitMap, specs: Sequence[Any], modules: dict[str, Any],
                  path: str | Path) -> Exported:
    """Write the FqnToConfig torchao runs for `bitmap` (layers torchao fails on kept float)."""
    require_torchao()
    from torchao.core.config import config_to_dict

    check_single_group(bitmap, "a torchao config")
    plan = probe(plan_layers(specs, bitmap), specs, modules)
    share = realised(specs, bitmap, plan)
    data = {
        "schema": TORCHAO_SCHEMA, "torchao_version": torchao_version(),
        "model": _model(bitmap.model),
        "fqn_to_config": config_to_dict(torchao_config(plan)),
        "layers": [{"name": p.name, "kind": p.kind, "map": str(p.mapped), "runs": str(p.runs),
                    "config": p.config, "note": p.note} for p in plan],
        "realised": {"bytes_share": share.bytes_share, "bops_share": share.bops_share},
        "meta": dict(bitmap.meta),
    }
    target = _write(path, json.dumps(data, indent=1, default=str) + "\n")
    return Exported(target, plan, plan_table(plan, share))


def read_torchao(path: str | Path) -> Any:
    """The torchao `FqnToConfig` of a file `write_torchao` wrote."""
    require_torchao()
    from torchao.core.config import config_from_dict

    data = _load_json(path)
    if data.get("schema") != TORCHAO_SCHEMA:
        raise BitMapError(f"unsupported torchao config schema {data.get('schema')!r}; "
                          f"expected {TORCHAO_SCHEMA!r}")
    try:
        return config_from_dict(data["fqn_to_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BitMapError(f"{path}: cannot read its torchao config: {e}") from e


def _load_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise BitMapError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BitMapError(f"{path}: the file must hold a JSON object")
    return data


# --- modelopt ---------------------------------------------------------------------------------
def write_modelopt(bitmap: BitMap, path: str | Path) -> Exported:
    """Write a ModelOpt-style `quantized_layers` JSON (schema in the module docstring)."""
    layers = check_single_group(bitmap, "a modelopt config")
    quantized = {name: {"quant_algo": str(bits), "weight_bits": bits.w,
                        "activation_bits": bits.a, "granularity": "per_channel",
                        "activations": "float" if is_float(bits.a) else "per_tensor_static"}
                 for name, bits in layers.items() if bits != FLOAT}
    data = {
        "producer": {"name": "mpq-search", "version": __version__, "schema": MODELOPT_SCHEMA},
        "model": _model(bitmap.model),
        "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                         "quantized_layers": quantized,
                         "exclude_modules": sorted(n for n, b in layers.items() if b == FLOAT),
                         **_quantizer(bitmap)},
    }
    return Exported(_write(path, json.dumps(data, indent=1) + "\n"))


def read_modelopt(path: str | Path) -> BitMap:
    """The bit map of a file `write_modelopt` wrote (excluded layers stay float)."""
    data = _load_json(path)
    schema = data.get("producer", {}).get("schema") if isinstance(data.get("producer"),
                                                                  dict) else None
    if schema != MODELOPT_SCHEMA:
        raise BitMapError(f"unsupported modelopt config schema {schema!r}; "
                          f"expected {MODELOPT_SCHEMA!r}")
    quantization = data.get("quantization")
    if not isinstance(quantization, dict) or not isinstance(
            quantization.get("quantized_layers"), dict):
        raise BitMapError(f"{path}: 'quantization.quantized_layers' must be an object")
    layers = {}
    for name, entry in quantization["quantized_layers"].items():
        if not isinstance(entry, dict):
            raise BitMapError(f"{path}: layer {name!r} must be an object")
        layers[name] = LayerBits(entry.get("weight_bits", 0), entry.get("activation_bits", 0))
    return BitMap.from_layers(_identity(data.get("model"), str(path)), layers,
                              meta=_quantizer_back(quantization))


# --- yaml -------------------------------------------------------------------------------------
def write_yaml(bitmap: BitMap, path: str | Path) -> Exported:
    """Write layer -> weight bits and layer -> activation bits as YAML."""
    import yaml

    layers = check_single_group(bitmap, "a YAML bit map")
    data = {"schema": YAML_SCHEMA, "model": _model(bitmap.model), **_quantizer(bitmap),
            "weight_bits": {n: b.w for n, b in layers.items()},
            "act_bits": {n: b.a for n, b in layers.items()}}
    return Exported(_write(path, yaml.safe_dump(data, sort_keys=False)))


def read_yaml(path: str | Path) -> BitMap:
    """The bit map of a file `write_yaml` wrote (a layer needs both its bits)."""
    import yaml

    try:
        data = yaml.safe_load(_read(path))
    except yaml.YAMLError as e:
        raise BitMapError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict) or data.get("schema") != YAML_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise BitMapError(f"unsupported YAML bit map schema {found!r}; expected {YAML_SCHEMA!r}")
    w, a = data.get("weight_bits"), data.get("act_bits")
    if not isinstance(w, dict) or not isinstance(a, dict) or set(w) != set(a):
        raise BitMapError(f"{path}: 'weight_bits' and 'act_bits' must map the same layers")
    layers = {name: LayerBits(w[name], a[name]) for name in w}
    return BitMap.from_layers(_identity(data.get("model"), str(path)), layers,
                              meta=_quantizer_back(data))


def read_format(path: str | Path, fmt: Format) -> BitMap:
    """The bit map of a file in `fmt` (torchao files hold configs: read them with read_torchao)."""
    if fmt == "json":
        return BitMap.load(path)
    if fmt == "modelopt":
        return read_modelopt(path)
    if fmt == "yaml":
        return read_yaml(path)
    raise BitMapError(f"cannot read a bit map back from format {fmt!r}; use read_torchao")


def write_format(bitmap: BitMap, path: str | Path, fmt: str, *,
                 specs: Sequence[Any] = (), modules: dict[str, Any] | None = None) -> Exported:
    """Write `bitmap` in `fmt`; torchao needs the model's layer specs and modules."""
    if fmt not in FORMATS:
        raise BitMapError(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}")
    if fmt == "json":
        return Exported(bitmap.save(path))
    if fmt == "modelopt":
        return write_modelopt(bitmap, path)
    if fmt == "yaml":
        return write_yaml(bitmap, path)
    if not specs or modules is None:
        raise BitMapError("the torchao format needs the model's layers (specs and modules)")
    return write_torchao(bitmap, specs, modules, path)
