"""Each stage's wall time and peak memory, from the measured `Probe`, the layer table and the
settings: arithmetic only (no torch), so that it is checked against the stages' own code paths
in tests and against measured runs in docs/results.md.

Time. A stage is counted in denoiser calls (a sampling pass of n samples and S steps in batches
of B is S calls per batch, each `Probe.call_seconds(b)`), decoded images, feature-net images
and the work the stage does besides: Grams and CKA (orthogonality), Hessians and GPTQ's column
loop (weight tables: `cols^3` for the inverse Hessian, `rows x cols^2` per bit-width for the
lazy-batch updates, one small-op sequence per column), the activation-range searches
(calibration), probes (sensitivity), timed on this machine by `Machine`'s benchmarks.

Memory. A stage's peak is what the process holds while it runs: the baseline and the loaded
model, the stores alive then (round-to-nearest weight tables that fit `max_cache_bytes`: one
uint8 code per weight per candidate bit-width and a per-channel grid; larger ones and GPTQ's are
read from their cache file; the engine's dequantized cache, at most `max_cache_bytes`, and
while a map is applied the dequantized copy of every weight the cache lacks; the sensitivity
profile's kept weight errors, at most `SENSITIVITY_DELTA_BYTES`; one chunk of GPTQ Hessians,
(cols)^2 float32 each, bounded by `max_hessian_bytes` or the largest layer alone; recorded
activation samples) and the largest transient (one call's activations, the autograd graph of
the sensitivity batch, a decoded batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mpq_search.choices import MODEL_DTYPE_BYTES
from mpq_search.config import StudyConfig
from mpq_search.layers import LayerSpec
from mpq_search.planning._records import FID_BENCH_DIM, Probe, RunPlan, StagePlan

STAGES: tuple[str, ...] = (
    "load", "fp-pass", "orthogonality", "weight-tables", "sensitivity", "priors",
    "calibration", "fp-reference", "trial", "trials", "report")
"""The stages a plan predicts, in run order: the run's phases (`mpq_search.phases`), plus
"trials", every trial of the study together ("trial" is one)."""

SENSITIVITY_DELTA_BYTES = 1 << 30
"""Weight errors the sensitivity profile keeps stacked (`profile_sensitivity`'s default
`max_delta_bytes`); beyond it they are recomputed at each probe."""
GPTQ_BLOCK = 128
"""GPTQ's lazy-batch block (columns): each column updates the rest of its block."""
UNFOLD_ELEMENTS = 1 << 24
"""im2col elements a Hessian accumulation builds at once."""


@dataclass(frozen=True)
class Constants:
    """Counts and ratios the formulas need that the benchmarks do not give; each was fitted
    once on the embedded models (docs/results.md, "plan") and is the same for every model."""

    quant_slowdown: float = 1.2
    """A quantized denoiser call's time over the FP call's (fake-quantized activations in
    front of every layer)."""
    shrink_factors: int = 80
    """Clipping factors the MSE weight grid tries (`quant._quantizers.SHRINK_FACTORS`)."""
    record_ops: float = 10.0
    """Small ops per layer per recorded call of the calibration (min, max, subset)."""
    probe_layer_ops: float = 12.0
    """Small ops per layer per sensitivity probe (gradient hooks)."""
    compile_ops: float = 2.5e6
    """One-off compilation of the fused activation quantizer (kernel = compiled), in small-op
    equivalents: it is Python-bound work, so it runs at the machine's small-op speed."""
    compile_bytes: float = 100e6
    """What compiling adds to the process (torch.compile's modules and code)."""
    trial_ops: float = 3e4
    trial_param_ops: float = 3e2
    """Per trial besides sampling and scoring, in small-op equivalents: the proposal,
    storage, artifacts and the dashboard note, a fixed part and a part per search parameter
    (two per layer unit and timestep group)."""
    study_bytes: float = 100e6
    """What the study adds to the process once trials run (Optuna's storage, artifacts,
    notes)."""
    report_ops: float = 1e5
    report_trial_ops: float = 1e4
    report_bytes: float = 150e6
    """Writing the report (figures and tables: plotly, pandas), in small-op equivalents, and
    what it adds to the process."""


def _weight_numel(spec: LayerSpec) -> int:
    return math.prod(spec.weight_shape)


def _columns(spec: LayerSpec) -> int:
    return math.prod(spec.weight_shape[1:])


def _gptq_ok(spec: LayerSpec) -> bool:
    """Whether GPTQ takes the layer (a Linear, or a Conv2d without groups), from its shapes."""
    return spec.kind == "linear" or spec.input_shape[0] == spec.weight_shape[1]


def _tokens(spec: LayerSpec) -> float:
    """Rows of the layer's weight matmul per sample (positions of a conv, tokens of a Linear)."""
    return spec.macs / max(_weight_numel(spec), 1)


def hessian_chunks(specs: Sequence[LayerSpec], max_bytes: int) -> list[list[LayerSpec]]:
    """The layers grouped as GPTQ collects their Hessians (`quant._tables._chunks`): in network
    order, each group within `max_bytes` (a larger layer alone)."""
    chunks: list[list[LayerSpec]] = []
    chunk: list[LayerSpec] = []
    used = 0
    for spec in specs:
        size = _columns(spec) ** 2 * 4 if _gptq_ok(spec) else 0
        if chunk and used + size > max_bytes:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(spec)
        used += size
    if chunk:
        chunks.append(chunk)
    return chunks


def _greedy(sizes: Sequence[float], budget: float) -> float:
    """Bytes a cache keeps when it takes, in order, each entry that still fits `budget`."""
    kept = 0.0
    for size in sizes:
        if size <= budget:
            kept += size
            budget -= size
    return kept


class _Model:
    """The formulas, with the probe, constants, settings and layer table at hand."""

    def __init__(self, config: StudyConfig, specs: Sequence[LayerSpec], probe: Probe,
                 constants: Constants) -> None:
        self.config, self.specs, self.p, self.c = config, list(specs), probe, constants
        self.m = probe.machine
        self.quant = config.quant
        self.nw = len(self.quant.w_bits)
        self.resident = probe.baseline_bytes + probe.model_bytes
        self.image_bytes = 4.0 * math.prod(probe.image_shape)
        weight_bytes = [4.0 * _weight_numel(s) for s in self.specs]
        self.table_bytes = sum(w / 4.0 * self.nw + 8.0 * s.weight_shape[0] * self.nw
                               for w, s in zip(weight_bytes, self.specs, strict=True))
        # held in memory only when round-to-nearest codes fit the cache budget; otherwise
        # (and always for GPTQ) they are read from their cache file when used (StoredCodes)
        codes = sum(w / 4.0 * self.nw for w in weight_bytes)
        in_memory = self.quant.rounding == "rtn" and codes <= self.quant.max_cache_bytes
        self.tables = self.table_bytes if in_memory else 0.0
        # the engine's cache, the applied copies and the kept weight errors are in the
        # model's dtype (computed in float32, then cast)
        model_bytes = [w * MODEL_DTYPE_BYTES[config.dtype] / 4.0 for w in weight_bytes]
        self.dequant = _greedy([w for w in model_bytes for _ in range(self.nw)],
                               self.quant.max_cache_bytes)
        self.deltas = _greedy([w * self.nw for w in model_bytes], SENSITIVITY_DELTA_BYTES)
        # a map applied: every layer whose floats the cache lacks gets a dequantized copy of
        # its weight at its bits (the cache holds whole layers at every bit-width first)
        self.applied = max(0.0, sum(model_bytes) - self.dequant / max(1, self.nw))
        self.largest_weight = max(weight_bytes, default=0.0)
        self.largest_input = max((4.0 * math.prod(s.input_shape) for s in self.specs),
                                 default=0.0)

    # --- building blocks ----------------------------------------------------------------
    def sampling(self, n: int, steps: int, batch: int, slowdown: float = 1.0) -> float:
        """Seconds of sampling n samples in batches of `batch`, decoded."""
        full, rest = divmod(n, batch)
        calls = full * self.p.call_seconds(batch) + self.p.call_seconds(rest)
        decodes = full * self.p.decode_seconds(batch) + self.p.decode_seconds(rest)
        return steps * calls * slowdown + decodes

    def sampling_bytes(self, n: int, batch: int, extra_per_sample: float = 0.0) -> float:
        """Peak above the resident of a sampling pass: one batch's call (or its decode), and
        the images of all n kept (then joined: twice)."""
        b = min(n, batch)
        transient = max(self.p.activation_bytes(b) + extra_per_sample * b,
                        self.p.decode_bytes(b))
        return transient + 2.0 * n * self.image_bytes

    def ops(self, count: float) -> float:
        return count * self.m.op_seconds

    def elements(self, count: float) -> float:
        return count * self.m.element_seconds

    def flops(self, count: float) -> float:
        return count / max(self.m.flops, 1.0)

    def fid(self) -> float:
        """One Frechet distance at the feature net's dimension (sqrtm: dim^3)."""
        return self.m.fid_seconds_at * (self.p.feature_dim / FID_BENCH_DIM) ** 3

    def score(self, n: int) -> float:
        """Features of n images, the Frechet distance and the paired proxies."""
        d = self.p.feature_dim
        return n * self.p.feature_image_seconds + self.fid() + self.flops(6.0 * n * n * d)

    # --- stages -------------------------------------------------------------------------
    def fp_pass(self) -> StagePlan:
        cfg = self.config
        seconds = self.sampling(min(cfg.n, 8), min(cfg.trial_steps, 2), cfg.batch_size) + \
            self.sampling(cfg.n, cfg.trial_steps, cfg.batch_size)
        return StagePlan("fp-pass", seconds, self.resident + self.sampling_bytes(
            cfg.n, cfg.batch_size), f"{cfg.n} samples x {cfg.trial_steps} steps")

    def orthogonality(self) -> StagePlan:
        cfg = self.config
        n, steps = cfg.importance_n, cfg.steps
        k = min(cfg.importance_timesteps, steps)
        rows = n * self.p.rows_per_sample
        features = sum(math.prod(s.input_shape) + math.prod(s.output_shape) for s in self.specs)
        per_step = (self.flops(2.0 * rows * rows * features * 2)  # float64 Grams
                    + self.elements(2.0 * rows * features)
                    + self.p.primitives.cka_step_seconds)
        seconds = steps * self.p.call_seconds(n) + k * per_step
        grams = 2.0 * len(self.specs) * rows * rows * 8
        largest = 8.0 * rows * max((max(math.prod(s.input_shape), math.prod(s.output_shape))
                                    for s in self.specs), default=0)
        peak = self.resident + self.p.activation_bytes(n) + grams + largest
        return StagePlan("orthogonality", seconds, peak,
                         f"{n} samples x {steps} steps, {k} profiled")

    def weight_tables(self) -> StagePlan:
        q = self.quant
        if q.rounding == "rtn":
            return StagePlan("weight-tables", self.rounding_seconds(), self.resident +
                             self.tables + 2.0 * self.largest_weight,
                             f"round to nearest, {self.nw} bit-widths")
        chunks = hessian_chunks(self.specs, q.max_hessian_bytes)
        recorded = len(q.recorded_steps())
        rows = q.calib_n * recorded * self.p.rows_per_sample
        hessian = sum(self.flops(2.0 * _tokens(s) * rows * _columns(s) ** 2)
                      + self.elements(3.0 * _tokens(s) * rows * _columns(s))
                      for s in self.specs if _gptq_ok(s))
        rounding = sum(self.gptq_seconds(s) for s in self.specs if _gptq_ok(s))
        seconds = len(chunks) * self.sampling(q.calib_n, q.calib_steps, q.batch_size) + \
            hessian + rounding + self.rounding_seconds(grid_only=True) + \
            self.elements(self.table_bytes)
        largest_chunk = max(sum(4.0 * _columns(s) ** 2 for s in chunk if _gptq_ok(s))
                            for chunk in chunks)
        largest = max(self.specs, key=lambda s: _columns(s) if _gptq_ok(s) else 0)
        cols = _columns(largest)
        working = 4.0 * (3 * largest.weight_shape[0] * self.nw * cols + 5 * cols**2)
        collecting = self.sampling_bytes(q.calib_n, q.batch_size) + 3 * 4.0 * min(
            UNFOLD_ELEMENTS, _tokens(largest) * cols * q.batch_size)
        peak = self.resident + self.tables + largest_chunk + max(collecting, working)
        return StagePlan("weight-tables", seconds, peak,
                         f"GPTQ, {len(chunks)} Hessian chunk(s) x {q.calib_n} samples x "
                         f"{q.calib_steps} steps, {self.nw} bit-widths")

    def gptq_seconds(self, spec: LayerSpec) -> float:
        """GPTQ of one layer at every bit-width at once (`quant._rounding.gptq_round`): the
        inverse Hessian and the lazy-batch matmuls, and the column loop as timed, its
        elementwise work grown to this layer's rows."""
        cols, rows = _columns(spec), spec.weight_shape[0] * self.nw
        prim = self.p.primitives
        grown = max(0, rows - prim.gptq_rows) * (GPTQ_BLOCK + 10)
        return (self.flops(3.0 * cols**3 + 2.0 * rows * cols**2)
                + cols * (prim.gptq_column_seconds + self.elements(grown)))

    def rounding_seconds(self, grid_only: bool = False) -> float:
        """Round-to-nearest tables (or only the grids GPTQ starts from)."""
        numel = sum(_weight_numel(s) for s in self.specs) * self.nw
        passes = self.c.shrink_factors * 5.0 if self.quant.weight_grid == "mse" else 4.0
        return self.elements(numel * (passes + (0.0 if grid_only else 4.0))) + \
            self.ops(10.0 * len(self.specs) * self.nw)

    def sensitivity(self) -> StagePlan:
        cfg = self.config
        n, steps, probes = cfg.sensitivity_n, cfg.steps, cfg.sensitivity_probes
        k = min(cfg.importance_timesteps, steps)
        batch = min(n, cfg.batch_size)  # samples per trajectory, and per autograd graph
        batches = math.ceil(n / batch)
        call = self.p.call_seconds(batch)
        weights = sum(_weight_numel(s) for s in self.specs)
        recomputed = max(0.0, weights * 4.0 * self.nw - self.deltas) / 4.0
        per_probe = (self.p.backward_ratio * call
                     + self.ops(self.c.probe_layer_ops * len(self.specs))
                     + self.elements(3.0 * weights * self.nw + 4.0 * recomputed))
        seconds = batches * (steps * call + k * (self.p.grad_forward_ratio * call
                                                 + probes * per_probe)) \
            + self.elements(4.0 * self.deltas / 4.0)
        graph = self.p.autograd_bytes(batch)
        peak = self.resident + self.tables + self.deltas + \
            max(graph + self.largest_weight * (2 + self.nw), self.p.activation_bytes(batch))
        return StagePlan("sensitivity", seconds, peak,
                         f"{n} samples, {k} steps x {probes} backward probes")

    def priors(self) -> StagePlan:
        cfg = self.config
        fronts = len(cfg.prior_budgets) if cfg.prior_budgets is not None else 3
        count = len(cfg.prior_modes) + (fronts if cfg.prior_modes else 0)
        return StagePlan("priors", count * self.p.ilp_seconds, self.resident + 50e6,
                         f"{count} ILPs")

    def calibration(self) -> StagePlan:
        q = self.quant
        recorded = len(q.recorded_steps())
        buckets = recorded if q.act_ranges == "per-timestep" and recorded > 1 else 1
        searches = len(self.specs) * len(q.a_bits) * buckets
        per_search = self.p.primitives.range_search_seconds + self.ops(8.0)
        batches = math.ceil(q.calib_n / q.batch_size)
        tables = (self.rounding_seconds() if q.rounding == "rtn"
                  else self.elements(self.table_bytes))
        seconds = (tables + self.elements(2.0 * self.dequant / 4.0)
                   + 1.5 * self.p.call_seconds(1)  # the skip-split call, every module hooked
                   + self.sampling(q.calib_n, q.calib_steps, q.batch_size)
                   + self.ops(self.c.record_ops * len(self.specs) * recorded * batches)
                   + searches * per_search)
        if q.kernel == "compiled":
            seconds += self.ops(self.c.compile_ops) + \
                self.p.call_seconds(2) * self.c.quant_slowdown
        records = 4.0 * len(self.specs) * recorded * q.act_samples_per_step
        compiled = self.c.compile_bytes if q.kernel == "compiled" else 0.0
        # the compiled kernel's warm-up applies a map (its dequantized weights)
        warm_up = self.applied if q.kernel == "compiled" else 0.0
        peak = self.resident + self.tables + self.dequant + records + compiled + \
            max(self.sampling_bytes(q.calib_n, q.batch_size),
                warm_up + self.sampling_bytes(2, 2))
        return StagePlan("calibration", seconds, peak,
                         f"{q.calib_n} samples x {q.calib_steps} steps, {searches} ranges")

    def engine_bytes(self) -> float:
        """What the calibrated engine (its compiled kernel) and the feature net hold while
        trials run."""
        compiled = self.c.compile_bytes if self.quant.kernel == "compiled" else 0.0
        return self.resident + self.tables + self.dequant + self.p.feature_net_bytes + compiled

    def fp_reference(self) -> StagePlan:
        cfg = self.config
        seconds = self.p.feature_load_seconds + self.sampling(
            cfg.n, cfg.trial_steps, cfg.batch_size) + cfg.n * self.p.feature_image_seconds
        peak = self.engine_bytes() + self.sampling_bytes(cfg.n, cfg.batch_size)
        return StagePlan("fp-reference", seconds, peak,
                         f"{cfg.n} samples x {cfg.trial_steps} steps, {self.p.feature_net}")

    def trial(self) -> StagePlan:
        cfg = self.config
        params = 2 * len(self.specs) * cfg.timestep_groups
        seconds = self.sampling(cfg.n, cfg.trial_steps, cfg.batch_size,
                                self.c.quant_slowdown) + self.score(cfg.n) + \
            self.ops(self.c.trial_ops + self.c.trial_param_ops * params)
        quantizing = 4.0 * self.p.rows_per_sample * self.largest_input
        peak = self.engine_bytes() + self.c.study_bytes + self.largest_weight + self.applied + max(
            self.sampling_bytes(cfg.n, cfg.batch_size, quantizing),
            self.sampling_bytes(cfg.guard_n, cfg.batch_size, quantizing) if cfg.guard_n else 0)
        return StagePlan("trial", seconds, peak, f"{cfg.n} samples x {cfg.trial_steps} steps, "
                         f"{self.c.quant_slowdown:g}x an FP call")

    def trials(self, one: StagePlan) -> tuple[StagePlan, dict[str, Any]]:
        """Every trial: the study's trials and baselines, plus the expected extra passes of
        the maps that lead (promotion, the full-steps guard) and the FP references those
        passes compare against (sampled once)."""
        cfg = self.config
        baselines = len(cfg.baselines)
        count = cfg.trials + baselines
        leads = _harmonic(cfg.trials)  # a new best is a record: about H(n) of n trials
        extra = 0.0
        if cfg.promote_passes > 1:
            passes = cfg.promote_passes - 1
            extra += leads * passes * (one.seconds - self.ops(self.c.trial_ops))
            extra += passes * (self.sampling(cfg.n, cfg.trial_steps, cfg.batch_size)
                               + cfg.n * self.p.feature_image_seconds)
        if cfg.guard_n:
            guard = self.sampling(cfg.guard_n, cfg.steps, cfg.batch_size, self.c.quant_slowdown)
            extra += leads * (guard + self.score(cfg.guard_n))
            extra += self.sampling(cfg.guard_n, cfg.steps, cfg.batch_size) + \
                cfg.guard_n * self.p.feature_image_seconds
        seconds = count * one.seconds + extra
        return (StagePlan("trials", seconds, one.peak_bytes,
                          f"{count} trials, about {leads:.1f} leading ones re-scored"),
                {"trials": count, "leading_trials": leads})

    def report(self) -> StagePlan:
        cfg = self.config
        count = cfg.trials + len(cfg.baselines)
        seconds = self.ops(self.c.report_ops + self.c.report_trial_ops * count)
        return StagePlan("report", seconds, self.trial().peak_bytes + self.c.report_bytes,
                         f"{count} trials")


def _harmonic(n: int) -> float:
    return sum(1.0 / i for i in range(1, n + 1))


def uses_sensitivity(config: StudyConfig) -> bool:
    """Whether a run profiles output sensitivity (a prior or the surrogate uses it)."""
    return "sensitivity" in config.prior_modes or \
        config.guided.surrogate_prior == "sensitivity"


def predict(config: StudyConfig, specs: Sequence[LayerSpec], probe: Probe, *,
            model: str = "", constants: Constants | None = None) -> RunPlan:
    """Every stage's time and peak memory (`STAGES`) for `config` on the probed machine."""
    c = constants or Constants()
    m = _Model(config, specs, probe, c)
    stages = [StagePlan("load", probe.load_seconds, m.resident + probe.activation_bytes(1),
                        f"{len(specs)} layers"),
              m.fp_pass(), m.orthogonality()]
    if uses_sensitivity(config) or config.quant.rounding == "gptq":
        stages.append(m.weight_tables())
    if uses_sensitivity(config):
        stages.append(m.sensitivity())
    stages += [m.priors(), m.calibration(), m.fp_reference()]
    trial = m.trial()
    trials, counts = m.trials(trial)
    stages += [trial, trials, m.report()]
    stores = {
        "weight tables (uint8 codes and grids)": m.tables,
        "dequantized weight cache": m.dequant,
        "GPTQ Hessians (one chunk)": max(sum(4.0 * _columns(s) ** 2 for s in chunk
                                             if _gptq_ok(s))
                                         for chunk in hessian_chunks(
                                             specs, config.quant.max_hessian_bytes)),
        "sensitivity autograd graph": probe.autograd_bytes(
            min(config.sensitivity_n, config.batch_size))
        if uses_sensitivity(config) else 0.0,
        "sensitivity weight errors": m.deltas if uses_sensitivity(config) else 0.0,
        "proxy batch activations": probe.activation_bytes(min(config.n, config.batch_size)),
    }
    largest = max(stores.items(), key=lambda item: item[1])
    params = sum(s.params for s in specs)
    assumptions = {"quant_slowdown": c.quant_slowdown, **counts,
                   "autograd_measured": probe.grad_measured,
                   "fp_reference_cached": False, "gptq_tables_cached": False}
    return RunPlan(model or config.model, probe.device, len(specs), params, tuple(stages),
                   largest, probe, assumptions)
