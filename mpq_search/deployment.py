"""Stage (deploy): run a bit map for real with torchao, and say how much of the map it runs.

(The module is `deployment`, not `deploy`, so that `mpq_search.deploy` stays the function: a
submodule of that name would rebind the package attribute once imported.)

Everything else in mpq-search simulates quantization in float. `deploy(model, bitmap)` instead
hands each layer to torchao's `quantize_` through one `FqnToConfig` keyed by the layers' dotted
names (`None` keeps a layer in float), so that the stored weights are integer tensors and the
forward pass runs torchao's kernels.

Closest torchao 0.18 config for each (w, a) entry of a map (`plan_layers`):

* Linear, w in 2..8, a in 2..8: `Int8DynamicActivationIntxWeightConfig(int<w>, per channel)`;
  activations are quantized per token, dynamically, at 8 bits whatever the map says (torchao has
  no other integer activation width), where the simulation uses a calibrated per-tensor range;
* Conv2d, w in 2..8, a in 2..8: `IntxWeightOnlyConfig(int<w>)`, activations stay float
  (torchao's dynamic-activation handler takes 2-d weights only);
* any layer, w in 2..8, a float: `IntxWeightOnlyConfig(int<w>)`, exactly as mapped;
* w float: float (torchao has no activation-only config).

`qparams="calibrated"` (the default) then replaces torchao's min-max weight grid and codes by the
simulation's (per output channel, on the study's grid, with its rounding: round-to-nearest or
GPTQ; `quant.weight_tables`), so that deployed weights are bit-identical to simulated ones and
any difference comes from activations alone;
`qparams="torchao"` keeps torchao's own grid (for a conv: one scale per output channel and kernel
position, not per output channel).

Storage: on an x86 CPU torchao 0.18 offers one layout for int2..int8 weights,
`IntxUnpackedToInt8Tensor` (one int8 per weight); its packed layouts need ARM KleidiAI or
torchao's C++ kernels, which the PyPI wheel does not ship. `DeployReport` gives both the
bytes torchao stores and the bytes of the same codes packed at their bit-width (what the cost
model counts).
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import nn

from mpq_search.bitmap import FLOAT, BitMap, LayerBits, is_float
from mpq_search.cost import Cost, cost_of
from mpq_search.errors import BitMapError, MPQSearchError
from mpq_search.layers import LayerKind, LayerSpec, discover_layers, quantizable_modules
from mpq_search.models import LoadedModel
from mpq_search.quant import QuantConfig, WeightQuant, WeightTables, weight_tables
from mpq_search.quant._rounding import warn_if_other_quantizer

Backend = Literal["torchao"]
BACKENDS: tuple[str, ...] = get_args(Backend)
QParams = Literal["calibrated", "torchao"]
QPARAMS: tuple[str, ...] = get_args(QParams)

DYNAMIC_CONFIG = "Int8DynamicActivationIntxWeightConfig"
WEIGHT_ONLY_CONFIG = "IntxWeightOnlyConfig"
DYNAMIC_ACT_BITS = 8
"""Width of torchao's dynamic activation quantization (per token, asymmetric)."""
LAYOUT = "unpacked_to_int8"
_DEPLOYER_ATTR = "_mpq_search_deployer"
_ENGINE_ATTR = "_mpq_search_engine"  # set by quant.QuantEngine while a simulated map is applied


class DeployError(MPQSearchError):
    """A map cannot be deployed: torchao missing, a grouped map, a model already quantized."""


# --- the plan: which torchao config runs each layer (no torchao needed) -----------------------
@dataclass(frozen=True)
class LayerDeployment:
    """How torchao runs one layer of a map: `runs` is what executes (32 = float)."""

    name: str
    kind: LayerKind
    mapped: LayerBits
    runs: LayerBits
    config: str | None
    """torchao config class, or None for a layer kept in float."""
    note: str = ""
    """Why `runs` differs from `mapped` (empty when torchao runs the entry as mapped)."""

    @property
    def exact(self) -> bool:
        """True when torchao runs the map's entry as it is (float entries included)."""
        return not self.note


def closest_config(kind: LayerKind, bits: LayerBits) -> tuple[str | None, LayerBits, str]:
    """(torchao config, what it runs, note) for one map entry; see the module docstring."""
    if is_float(bits.w):
        if is_float(bits.a):
            return None, FLOAT, ""
        return None, FLOAT, "kept float: torchao has no activation-only config"
    if is_float(bits.a):
        return WEIGHT_ONLY_CONFIG, LayerBits(bits.w, 32), ""
    if kind == "linear":
        note = "" if bits.a == DYNAMIC_ACT_BITS else (
            f"activations int8 (map: {bits.a} bits): torchao's only integer activation width")
        return DYNAMIC_CONFIG, LayerBits(bits.w, DYNAMIC_ACT_BITS), note
    return (WEIGHT_ONLY_CONFIG, LayerBits(bits.w, 32),
            "weights only: torchao's int8-activation config takes Linear layers only")


def plan_layers(specs: Sequence[LayerSpec], bitmap: BitMap) -> tuple[LayerDeployment, ...]:
    """The torchao config of every layer of a single-group map, in network order."""
    bitmap.validate(s.name for s in specs)
    if bitmap.is_grouped:
        raise DeployError(f"torchao runs one plan for every step; this map has "
                          f"{len(bitmap.groups)} timestep groups")
    plan = []
    for spec in specs:
        mapped = bitmap.layers.get(spec.name, FLOAT)
        config, runs, note = closest_config(spec.kind, mapped)
        plan.append(LayerDeployment(spec.name, spec.kind, mapped, runs, config, note))
    return tuple(plan)


def runs_bitmap(bitmap: BitMap, plan: Sequence[LayerDeployment]) -> BitMap:
    """The map of what torchao runs (for the cost model and for simulating the deployed model)."""
    layers = {p.name: p.runs for p in plan if p.runs != FLOAT}
    return BitMap.from_layers(bitmap.model, layers, {"deployed_from": dict(bitmap.meta)})


@dataclass(frozen=True)
class Realised:
    """How much of a map's promised saving torchao realises, by the cost model's measures."""

    map_cost: Cost
    runs_cost: Cost
    fp_cost: Cost

    @staticmethod
    def _share(fp: float, runs: float, mapped: float) -> float:
        return 1.0 if fp == mapped else (fp - runs) / (fp - mapped)

    @property
    def bytes_share(self) -> float:
        """Share of the map's weight-byte saving over FP that the deployed plan keeps."""
        return self._share(self.fp_cost.weight_bytes, self.runs_cost.weight_bytes,
                           self.map_cost.weight_bytes)

    @property
    def bops_share(self) -> float:
        """Share of the map's BOPs saving over FP that the deployed plan keeps."""
        return self._share(self.fp_cost.bops, self.runs_cost.bops, self.map_cost.bops)


def realised(specs: Sequence[LayerSpec], bitmap: BitMap,
             plan: Sequence[LayerDeployment]) -> Realised:
    """Cost of the map, of what torchao runs, and of FP."""
    fp = BitMap.from_layers(bitmap.model, {})
    return Realised(cost_of(specs, bitmap), cost_of(specs, runs_bitmap(bitmap, plan)),
                    cost_of(specs, fp))


def plan_table(plan: Sequence[LayerDeployment], share: Realised) -> str:
    """Plain-text table of the entries torchao does not run as mapped, and the realised shares."""
    rows = [p for p in plan if not p.exact]
    width = max([len(p.name) for p in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<6}  {'map':<7}  {'runs':<7}  why"]
    lines += [f"{p.name:<{width}}  {p.kind:<6}  {p.mapped!s:<7}  {p.runs!s:<7}  {p.note}"
              for p in rows]
    if not rows:
        lines = ["every entry runs as mapped"]
    lines.append(f"{len(rows)} of {len(plan)} entries differ from the map; realised share of "
                 f"the map's saving: weight bytes {share.bytes_share:.1%}, "
                 f"BOPs {share.bops_share:.1%}")
    return "\n".join(lines)


# --- torchao ----------------------------------------------------------------------------------
def _torchao() -> Any:
    """The torchao.quantization module, or a DeployError that says what to install."""
    try:
        import torchao.quantization as quantization
    except ImportError as e:
        raise DeployError("the torchao backend needs torchao, an optional dependency: "
                          "pip install 'mpq-search[deploy]' (torchao 0.18.0)") from e
    return quantization


def require_torchao() -> None:
    """Raise a DeployError that says what to install when torchao is missing."""
    _torchao()


def torchao_version() -> str:
    """Installed torchao version ('' when it is not installed)."""
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return ""


def torchao_config(plan: Sequence[LayerDeployment]) -> Any:
    """The `FqnToConfig` that `quantize_(denoiser, config, filter_fn=None)` applies."""
    ao = _torchao()
    configs: dict[str, Any] = {}
    for p in plan:
        if p.config is None:
            configs[p.name] = None
            continue
        dtype = getattr(torch, f"int{p.runs.w}")
        if p.config == DYNAMIC_CONFIG:
            configs[p.name] = ao.Int8DynamicActivationIntxWeightConfig(
                weight_dtype=dtype, weight_granularity=ao.PerAxis(0),
                weight_mapping_type=ao.MappingType.ASYMMETRIC)
        else:
            configs[p.name] = ao.IntxWeightOnlyConfig(
                weight_dtype=dtype, granularity=ao.PerAxis(0),
                mapping_type=ao.MappingType.ASYMMETRIC)
    return ao.FqnToConfig(configs)


def calibrated_weight(weight: torch.Tensor, stored: WeightQuant, template: Any) -> Any:
    """An `IntxUnpackedToInt8Tensor` holding the simulation's codes and grid (`stored`, from the
    quantizer's weight tables) for `weight`.

    Our grid has codes 0..2^b-1 and zero point z; torchao's has codes -2^(b-1)..2^(b-1)-1, so
    both shift by 2^(b-1) and (q - z) * s is unchanged: the dequantized weight is bit-identical
    to the simulated one. Kept in this one adapter because it builds torchao's tensor from its
    constructor (arguments as in torchao 0.18; tests/test_deploy.py fails loudly if they change).
    """
    ao = _torchao()
    bits = stored.bits
    offset = 1 << (bits - 1)
    blocks = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return ao.IntxUnpackedToInt8Tensor(
        qdata=(stored.codes.to(torch.int16) - offset).to(torch.int8),
        scale=stored.scale.to(weight.dtype).reshape(blocks),
        zero_point=(stored.zero - offset).to(torch.int8).reshape(blocks),
        target_dtype=getattr(torch, f"int{bits}"),
        block_size=(1, *weight.shape[1:]),
        dtype=weight.dtype,
        activation_quantization=template.activation_quantization,
    )


TORCHAO_ERRORS = (AssertionError, NotImplementedError, RuntimeError, ValueError)
"""What torchao raises for a layer it cannot take (it validates with assert)."""


def probe(plan: Sequence[LayerDeployment], specs: Sequence[LayerSpec],
          modules: Mapping[str, nn.Module]) -> tuple[LayerDeployment, ...]:
    """The plan with every layer torchao fails to quantize or run kept in float.

    Each planned layer is quantized on a copy and run once on zeros of its input shape, so that
    a layer torchao refuses (e.g. a Conv2d with one input channel in torchao 0.18) is found
    before the model is touched, and the reason goes into the printed table.
    """
    shapes = {s.name: s.input_shape for s in specs}
    ao = _torchao()
    checked = []
    for p in plan:
        if p.config is None:
            checked.append(p)
            continue
        layer = copy.deepcopy(modules[p.name])
        weight = _weight_of(layer)
        try:
            ao.quantize_(layer, torchao_config([replace(p, name="")]), filter_fn=None)
            with torch.inference_mode():
                layer(torch.zeros((1, *shapes[p.name]), dtype=weight.dtype,
                                  device=weight.device))
        except TORCHAO_ERRORS as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            p = replace(p, runs=FLOAT, config=None,
                        note=f"kept float: torchao fails on it ({reason[:60]})")
        checked.append(p)
    return tuple(checked)


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise DeployError(f"{type(module).__name__} has no weight tensor")
    return weight


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def stored_bytes(module: nn.Module) -> tuple[int, float]:
    """(bytes the layer stores, bytes with its weight codes packed at their bit-width)."""
    weight: Any = module.weight
    bias = _nbytes(module.bias) if isinstance(module.bias, torch.Tensor) else 0
    if not hasattr(weight, "qdata"):
        size = _nbytes(weight) + bias
        return size, float(size)
    bits = int(str(weight.target_dtype).removeprefix("torch.int"))
    grid = _nbytes(weight.scale) + _nbytes(weight.zero_point) + bias
    return _nbytes(weight.qdata) + grid, weight.qdata.numel() * bits / 8 + grid


# --- applying ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeployReport:
    """What a deployment ran and stored (bytes cover the Conv2d/Linear layers, as the cost model
    does)."""

    backend: str
    version: str
    qparams: str
    layout: str
    layers: tuple[LayerDeployment, ...]
    realised: Realised
    stored_bytes: int
    """Bytes torchao holds for the layers' weights, grids and biases (int8 per weight code)."""
    packed_bytes: float
    """The same tensors with every weight code packed at its bit-width."""

    @property
    def kept_float(self) -> list[str]:
        """Layers the map quantizes that run in float."""
        return [p.name for p in self.layers if p.config is None and p.mapped != FLOAT]

    def table(self) -> str:
        """The entries that differ from the map and the realised shares, as text."""
        return plan_table(self.layers, self.realised)


class TorchaoDeployer:
    """Quantize a loaded model's denoiser in place with torchao, reversibly.

    Call order, as for `QuantEngine`: `apply(bitmap)` (replaces any map applied before), then
    `remove()`, which puts the original weight Parameters back: the FP model is bit-exact again.
    There is nothing to calibrate: torchao's activations are dynamic and the weight grid is
    computed at apply time.
    """

    def __init__(self, model: LoadedModel, specs: Sequence[LayerSpec] | None = None) -> None:
        self.model = model
        self.specs = tuple(specs) if specs is not None else tuple(
            discover_layers(model.denoiser))
        self._modules = quantizable_modules(model.denoiser)
        self._originals: dict[str, tuple[Any, Any]] = {}

    @property
    def is_applied(self) -> bool:
        """Whether a map is deployed now."""
        return bool(self._originals)

    def apply(self, bitmap: BitMap, *, qparams: QParams = "calibrated",
              weights: WeightTables | None = None) -> DeployReport:
        """Deploy `bitmap` (layers it does not list stay float) and report what runs.

        With `qparams="calibrated"` the integer codes are the simulation's: `weights` (a
        `QuantEngine`'s `weights`, so that deployed and simulated weights are bit-identical), by
        default the tables of the rounding the map records (`QuantConfig.for_bitmap`, whose GPTQ
        calibration is the quantizer's default).
        """
        if qparams not in QPARAMS:
            raise DeployError(f"unknown qparams {qparams!r}; supported: {', '.join(QPARAMS)}")
        denoiser = self.model.denoiser
        if getattr(denoiser, _ENGINE_ATTR, None) is not None:
            raise DeployError("the model has a simulated map applied; remove() it first")
        owner = getattr(denoiser, _DEPLOYER_ATTR, None)
        if owner is not None and owner is not self:
            raise DeployError("another deployment holds this model; remove it first")
        bitmap.validate([s.name for s in self.specs], self.model.identity)
        self.remove()
        plan = probe(plan_layers(self.specs, bitmap), self.specs, self._modules)
        config = torchao_config(plan)
        if qparams == "calibrated":  # the codes come from the float weights: before quantize_
            if weights is None:
                weights = weight_tables(self.model, self.specs, QuantConfig.for_bitmap(bitmap))
            else:
                warn_if_other_quantizer(bitmap.meta, weights.settings or
                                        {"rounding": weights.rounding,
                                         "weight_grid": weights.grid})
            for p in plan:  # every code exists before torchao touches the model
                if p.config is not None:
                    weights.quant(p.name, p.runs.w)
        for p in plan:
            if p.config is not None:
                module = self._modules[p.name]
                self._originals[p.name] = (module.weight, module.bias)
        setattr(denoiser, _DEPLOYER_ATTR, self)
        _torchao().quantize_(denoiser, config, filter_fn=None)
        if qparams == "calibrated" and weights is not None:
            self._use_calibrated(plan, weights)
        sizes = [stored_bytes(self._modules[s.name]) for s in self.specs]
        return DeployReport(backend="torchao", version=torchao_version(), qparams=qparams,
                            layout=LAYOUT, layers=plan,
                            realised=realised(self.specs, bitmap, plan),
                            stored_bytes=sum(s for s, _ in sizes),
                            packed_bytes=sum(p for _, p in sizes))

    def _use_calibrated(self, plan: Sequence[LayerDeployment], weights: WeightTables) -> None:
        for p in plan:
            if p.config is None:
                continue
            module = self._modules[p.name]
            original = self._originals[p.name][0]
            stored = weights.quant(p.name, p.runs.w)
            new = calibrated_weight(original.detach(), stored, module.weight)
            module.weight = nn.Parameter(new, requires_grad=False)
            fp_bias = self._originals[p.name][1]
            if stored.bias is not None and isinstance(fp_bias, torch.Tensor):
                # bias correction: the simulation's bias, in the layer's dtype (bit-identical)
                module.bias = nn.Parameter(stored.bias.to(fp_bias.device, fp_bias.dtype),
                                           requires_grad=False)

    def remove(self) -> None:
        """Put every original weight and bias back (a no-op when nothing is deployed)."""
        for name, (weight, bias) in self._originals.items():
            module = self._modules[name]
            module.weight = weight
            module.bias = bias
            module.__dict__.pop("extra_repr", None)  # torchao set an instance-level one
        self._originals = {}
        if getattr(self.model.denoiser, _DEPLOYER_ATTR, None) is self:
            delattr(self.model.denoiser, _DEPLOYER_ATTR)


def deploy(model: LoadedModel, bitmap: BitMap, backend: Backend = "torchao", *,
           qparams: QParams = "calibrated", weights: WeightTables | None = None) -> DeployReport:
    """Quantize `model`'s denoiser in place as `bitmap` says, with real integer weights.

    `undeploy(model)` restores the FP model. See the module docstring for how each entry maps
    to a torchao config and which entries stay in float.
    """
    if backend not in BACKENDS:
        raise DeployError(f"unknown backend {backend!r}; supported: {', '.join(BACKENDS)}")
    return TorchaoDeployer(model).apply(bitmap, qparams=qparams, weights=weights)


def undeploy(model: LoadedModel) -> None:
    """Restore the FP denoiser after `deploy` (a no-op when nothing is deployed)."""
    owner = getattr(model.denoiser, _DEPLOYER_ATTR, None)
    if isinstance(owner, TorchaoDeployer):
        owner.remove()


def check_single_group(bitmap: BitMap, what: str) -> Mapping[str, LayerBits]:
    """The plan of a single-group map, or a BitMapError naming the format that needs one."""
    if bitmap.is_grouped:
        raise BitMapError(f"{what} holds one plan; this map has {len(bitmap.groups)} "
                          f"timestep groups")
    return bitmap.layers
