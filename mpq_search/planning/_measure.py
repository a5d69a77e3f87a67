"""What `plan` measures before it predicts: this machine's speeds, and the model's cost per
denoiser call (time and memory, with and without autograd), per decoded image and per feature.

Every measurement is a few calls on a slice of the proxy batch (one sample, then `k` samples,
with `k` as large as a few seconds allow), so that planning a run costs seconds, not a run.
A cost per call is fitted as fixed + per-sample x samples from the two slices.

Peak memory of a block (`PeakMemory`): on CUDA the allocator's peak; on the CPU the resident
set, polled every millisecond from a thread and checked against the kernel's high-water mark
(VmHWM), without resetting that mark (a reset would change what `/usr/bin/time` and `getrusage`
report for the whole process).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpq_search.allocation import allocate
from mpq_search.config import StudyConfig
from mpq_search.cost import parse_budget
from mpq_search.errors import MPQSearchError
from mpq_search.fid import FeatureStats, frechet_distance, get_feature_net
from mpq_search.importance import cka_matrix, is_batch_constant
from mpq_search.layers import LayerSpec, quantizable_modules
from mpq_search.models import LoadedModel
from mpq_search.phases import rss_bytes
from mpq_search.planning._records import FID_BENCH_DIM, Machine, Primitives, Probe
from mpq_search.quant._quantizers import act_range_mse, act_range_percentile  # requests.md
from mpq_search.quant._rounding import gptq_round  # requests.md
from mpq_search.sampling import initial_noise
from mpq_search.trajectory import trajectory_for

_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SLICE_SECONDS = 5.0
"""The largest slice call takes at most about this long (and is at most the proxy batch)."""
GRAD_SAMPLES = 4
"""Samples of the second autograd probe (at most the sensitivity profile's)."""
GRAD_PER_ACTIVATION = 20.0
"""Autograd's memory per sample as a multiple of a no-grad call's, where the probe is not run
(when even one sample's graph might not fit): an estimate, said so in the plan."""


def resident_bytes() -> int:
    """The process's resident memory now (from /proc/self/statm: cheap enough to poll)."""
    try:
        with open("/proc/self/statm", "rb") as status:
            return int(status.read().split()[1]) * _PAGE
    except OSError:
        return rss_bytes()


class PeakMemory:
    """The highest memory in use while the block ran (`peak`, absolute bytes): on CUDA the
    allocator's peak on `device`, on the CPU the resident set (module doc)."""

    def __init__(self, device: torch.device, interval: float = 0.001) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self._hwm = rss_bytes("VmHWM")
        self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        hwm = rss_bytes("VmHWM")
        if hwm > self._hwm:  # the kernel saw a new high inside the block: exact
            self.peak = max(self.peak, hwm)


def available_bytes(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(bytes this process may still use in all, counting what it holds now; where the figure
    comes from). CPU: MemAvailable (/proc/meminfo), within a cgroup's memory.max when one is
    set, plus this process's resident set. CUDA: the device's free memory plus what this
    process's allocator holds there."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device)), f"free memory of {device}"
    available = _meminfo("MemAvailable")
    source = "MemAvailable"
    limit = _cgroup_left()
    if limit is not None and (available is None or limit < available):
        available, source = limit, "the cgroup's memory.max"
    if available is None:
        raise MPQSearchError("cannot tell how much memory this machine has (no "
                             "/proc/meminfo); pass --no-memory-check")
    return available + resident_bytes(), source


def _meminfo(field: str) -> int | None:
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_left() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), None when unlimited."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def memory_now(device: torch.device) -> int:
    """Memory in use now where the model lives: CUDA allocated bytes, or the resident set."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return resident_bytes()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(device: torch.device, work: Callable[[], object], repeat: int = 1) -> float:
    """Wall seconds of `work` (per repetition), synchronised on CUDA."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    _sync(device)
    return (time.perf_counter() - started) / repeat


BENCH_SECONDS = 0.25
"""A micro-benchmark repeats its work for at least this long: on a shared machine a few
milliseconds often run uninterrupted, while a stage gets the machine's average share."""


def _mean_seconds(device: torch.device, work: Callable[[], object],
                  least: float = BENCH_SECONDS) -> float:
    """Mean wall seconds of `work`, repeated for at least `least` seconds (after one call)."""
    work()
    _sync(device)
    started = time.perf_counter()
    count = 0
    while True:
        work()
        count += 1
        if count % 4 == 0 or count < 4:
            _sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= least:
                return elapsed / count


@torch.no_grad()
def measure_machine(device: torch.device) -> Machine:
    """Time a matmul, an elementwise op and one Frechet distance here, each for
    `BENCH_SECONDS` at least, and small ops (the median of 11 batches: the dispatch cost
    itself, which the constants that count Python-bound work in small ops are fitted to)."""
    size = 4096 if device.type == "cuda" else 512  # a GPU needs a large product to be busy
    a = torch.randn(size, size, device=device)
    matmul = _mean_seconds(device, lambda: a @ a)
    x = torch.randn(1 << 22, device=device)
    y = torch.empty_like(x)
    elementwise = _mean_seconds(device, lambda: torch.mul(x, 1.0001, out=y))
    small = torch.zeros(16, device=device)
    ops = sorted(_seconds(device, lambda: small.add_(1.0), repeat=50) for _ in range(11))[5]
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2 * FID_BENCH_DIM, FID_BENCH_DIM))
    stats = FeatureStats(feats.mean(0), np.cov(feats, rowvar=False), len(feats))
    fid = _mean_seconds(torch.device("cpu"), lambda: frechet_distance(stats, stats))
    return Machine(str(device), 2 * size**3 / max(matmul, 1e-9),
                   elementwise / x.numel(), ops, fid)


@dataclass(frozen=True)
class _Slices:
    """The timed slice calls: (samples, seconds, peak above the start) for 1 and k samples."""

    rows: int
    one: tuple[int, float, int]
    many: tuple[int, float, int]
    grad: tuple[tuple[int, float, float, int], ...]
    """(samples, forward seconds, backward seconds, peak) of the autograd probes: one sample
    (the first, paying one-off costs), then a few."""


@torch.inference_mode()
def _call(model: LoadedModel, config: StudyConfig, samples: int) -> tuple[int, float, int]:
    """(rows, seconds, absolute peak) of the first denoiser call of a trial's trajectory on
    `samples` samples (the proxy's noise and conditions)."""
    trajectory = trajectory_for(model, config.trial_steps)
    run = trajectory.run(initial_noise(model, samples, config.sample_seed),
                         trajectory.conditions(samples, config.sample_seed))
    call = next(iter(run))
    device = model.device
    with PeakMemory(device) as memory:
        seconds = _seconds(device, call.output)
    return int(call.sample.shape[0]), seconds, memory.peak


def _grad_call(model: LoadedModel, config: StudyConfig,
               samples: int) -> tuple[float, float, int]:
    """(forward seconds, backward seconds, absolute peak) of one denoiser call with autograd,
    as the sensitivity profile runs it: every quantizable weight and the input require grad,
    each weight's gradient is dropped as soon as backward has it."""
    trajectory = trajectory_for(model, config.trial_steps)
    with torch.no_grad():
        run = trajectory.run(initial_noise(model, samples, config.sample_seed),
                             trajectory.conditions(samples, config.sample_seed))
        call = next(iter(run))
    weights = [m.weight for m in quantizable_modules(model.denoiser).values()]

    def drop(param: torch.Tensor) -> None:
        param.grad = None

    for weight in weights:
        weight.requires_grad_(True)
    handles = [w.register_post_accumulate_grad_hook(drop)  # type: ignore[no-untyped-call]
               for w in weights]
    device = model.device
    try:
        with PeakMemory(device) as memory, torch.enable_grad():
            _sync(device)
            started = time.perf_counter()
            x = call.sample.detach().requires_grad_(True)
            loss = call.prediction(call.forward(x)).sum()
            _sync(device)
            forward = time.perf_counter() - started
            torch.autograd.backward(loss, inputs=[x, *weights])
            _sync(device)
            backward = time.perf_counter() - started - forward
    finally:
        for handle in handles:
            handle.remove()
        for weight in weights:
            weight.requires_grad_(False)
            weight.grad = None
    return forward, backward, memory.peak


def measure_slices(model: LoadedModel, config: StudyConfig, *, grad: bool, timed: bool = True,
                   slice_seconds: float = SLICE_SECONDS,
                   memory_left: float | None = None) -> tuple[_Slices, int]:
    """The slice calls (module doc) and the memory in use before them. A warm-up call on one
    sample (its peak is the one-sample peak: the first call allocates), a timed one, then
    calls on 2, 4, ... samples up to the proxy batch while the next one would take less than
    `slice_seconds` and half of `memory_left` (default: what the machine has left); the last
    is repeated for its steady time (without `timed`, for memory alone, neither the timed
    one-sample call nor the repeat run). With `grad`, the autograd probes on one sample, then
    on up to GRAD_SAMPLES (as many as the sensitivity profile's batch) when that fits the same
    limits."""
    device = model.device
    start = memory_now(device)
    if memory_left is None:
        memory_left = max(0.0, available_bytes(device)[0] - start)
    rows, seconds, peak = _call(model, config, 1)
    if timed:
        _, seconds, _ = _call(model, config, 1)
    points = [(1, seconds, max(peak - start, 0))]
    batch = min(config.batch_size, config.n)
    while points[-1][0] < batch:
        k, seconds, grown = points[-1]
        bigger = min(batch, 2 * k)
        if seconds * bigger / k > slice_seconds or grown * bigger / k > memory_left / 2:
            break
        _, seconds, peak = _call(model, config, bigger)
        points.append((bigger, seconds, max(peak - start, 0)))
    if timed and len(points) > 1:  # the first call at a size pays first-touch page faults
        k, _, grown = points[-1]
        points[-1] = (k, _call(model, config, k)[1], grown)
    probes: list[tuple[int, float, float, int]] = []
    if grad and GRAD_PER_ACTIVATION * points[0][2] > memory_left / 2:
        grad = False  # even one sample's graph could exhaust the memory: estimated instead
    while grad:
        done = probes[-1] if probes else None
        samples = 1 if done is None else min(max(config.sensitivity_n, 1), GRAD_SAMPLES)
        if done is not None and (samples <= 1 or samples * (done[1] + done[2]) > slice_seconds
                                 or samples * done[3] > memory_left / 2):
            break
        forward, backward, peak = _grad_call(model, config, samples)
        probes.append((samples, forward, backward, max(peak - start, 0)))
        if samples > 1:
            break
    below = points[-2] if len(points) > 1 else points[-1]
    return _Slices(rows, below, points[-1], tuple(probes)), start


def _fit(n1: int, v1: float, n2: int, v2: float) -> tuple[float, float]:
    """(fixed, per sample) of the line through (n1, v1) and (n2, v2), neither below zero."""
    if n2 <= n1:
        return 0.0, max(v1, 0.0) / max(n1, 1)
    slope = (v2 - v1) / (n2 - n1)
    if slope <= 0.0:  # noise: the larger slice was no dearer; charge it all per sample
        return 0.0, max(v2, 0.0) / n2
    return max(v1 - slope * n1, 0.0), slope


DECODE_SAMPLES = 4
"""Samples of the second timed decode (the first decodes one)."""


def _decode(model: LoadedModel, config: StudyConfig,
            timed: bool) -> tuple[tuple[float, float], tuple[float, float], tuple[int, ...]]:
    """((fixed, per-sample seconds), (fixed, per-sample peak bytes), image shape) of decoding:
    one sample, then with `timed` (after that first, warm-up decode) one and DECODE_SAMPLES
    samples, fitted; without it, everything per sample from the one."""
    trajectory = trajectory_for(model, config.trial_steps)
    device = model.device
    points = []
    shape: tuple[int, ...] = ()
    sizes = (1, 1, min(DECODE_SAMPLES, config.batch_size, config.n)) if timed else (1,)
    start = memory_now(device)  # one start for all: freed buffers may be kept and reused
    with torch.inference_mode():
        for samples in sizes:
            latent = initial_noise(model, samples, config.sample_seed).to(device)
            with PeakMemory(device) as memory:
                _sync(device)
                started = time.perf_counter()
                images = trajectory.decode(latent)
                _sync(device)
                seconds = time.perf_counter() - started
            shape = tuple(images.shape[1:])
            del images
            points.append((samples, seconds, float(max(memory.peak - start, 0))))
    (n1, t1, _), (nk, tk, mk) = points[-2] if timed else points[0], points[-1]
    m1 = points[0][2]  # the first decode's peak: it allocated everything it uses
    return _fit(n1, t1, nk, tk), _fit(1, m1, nk, max(mk, m1)), shape


def _features(name: str, model: LoadedModel, shape: Sequence[int],
              timings: bool) -> tuple[float, int, float, int]:
    """(load seconds, bytes, seconds per image, feature dim) of the feature net `name` (it
    stays loaded: the run's scorer gets the same one); without `timings` no images are fed."""
    device = model.device
    before = memory_now(device)
    started = time.perf_counter()
    net = get_feature_net(name, device=str(device))
    loaded = time.perf_counter() - started
    grown = max(0, memory_now(device) - before)
    if not timings:
        return loaded, grown, 0.0, 0
    images = torch.rand((8, *shape), generator=torch.Generator().manual_seed(0))
    net.features(images[:2])
    holder: list[np.ndarray] = []
    seconds = _seconds(device, lambda: holder.append(net.features(images)))
    return loaded, grown, seconds / len(images), int(holder[0].shape[1])


GPTQ_BENCH = (32, 256)
"""(rows, columns) of the synthetic layer GPTQ's column loop is timed on."""


@torch.no_grad()
def measure_primitives(config: StudyConfig, specs: Sequence[LayerSpec], rows: int,
                       machine: Machine, device: torch.device) -> Primitives:
    """Time the real per-item work of the stages whose cost is mostly Python and small ops:
    one activation-range search, GPTQ's column loop on a small synthetic layer (its matmul
    part, which `machine.flops` covers, subtracted), and one profiled step's CKA arithmetic
    for this model's layer count and batch (`rows`)."""
    q = config.quant
    generator = torch.Generator().manual_seed(0)
    recorded = len(q.recorded_steps())
    per_timestep = q.act_ranges == "per-timestep" and recorded > 1
    kept = q.act_samples_per_step * (1 if per_timestep else recorded)
    samples = torch.randn(kept, generator=generator)
    bits = max(q.a_bits)
    search: Callable[[], object] = lambda: None  # noqa: E731  (minmax: nothing to search)
    if q.act_calibration == "mse":
        search = lambda: act_range_mse(samples, -3.0, 3.0, bits)  # noqa: E731
    elif q.act_calibration == "percentile":
        search = lambda: act_range_percentile(samples, q.percentile, bits)  # noqa: E731
    range_seconds = _mean_seconds(torch.device("cpu"), search)
    out, cols = GPTQ_BENCH
    weight = torch.randn(out, cols, generator=generator, device=device)
    x = torch.randn(4 * cols, cols, generator=generator, device=device)
    hessian = x.T @ x
    gptq = _mean_seconds(device, lambda: gptq_round(weight, hessian, q.w_bits, q.weight_grid,
                                                       damp=q.gptq_damp,
                                                       act_order=q.gptq_act_order))
    matmuls = (3.0 * cols**3 + 2.0 * out * len(q.w_bits) * cols**2) / max(machine.flops, 1.0)
    column = max(gptq - matmuls, gptq / 4) / cols
    layers = len(specs)
    grams = [torch.randn(rows, rows, dtype=torch.float64, generator=generator)
             for _ in range(2 * layers)]
    grams = [g @ g.T for g in grams]

    def step() -> None:
        for g in grams[:layers]:
            is_batch_constant(g)
        cka_matrix(grams[:layers])
        cka_matrix(grams[layers:])

    cka = _mean_seconds(torch.device("cpu"), step) if rows >= 4 else 0.0
    return Primitives(range_seconds, column, out * len(q.w_bits), cka)


def _ilp_seconds(config: StudyConfig, specs: Sequence[LayerSpec]) -> float:
    """Seconds of one prior's ILP: the random-importance mode, whose uneven scores make a
    program as hard as the profiled modes' (the size-aware one's equal scores solve faster)."""
    budget = parse_budget(config.budget, list(specs))
    started = time.perf_counter()
    allocate(list(specs), budget, None, w_bits=config.quant.w_bits, a_bits=config.quant.a_bits,
             ties=config.tie_layers, mode="random", seed=config.seed)
    return time.perf_counter() - started


def _weights_bytes(model: LoadedModel) -> int:
    """The denoiser's parameters: the least the loaded model adds, whatever the allocator
    handed back meanwhile (a phase start releases freed memory, `runtime`)."""
    return sum(p.numel() * p.element_size() for p in model.denoiser.parameters())


def measure(model: LoadedModel, specs: Sequence[LayerSpec], config: StudyConfig, *,
            feature_net: str, baseline_bytes: int, load_seconds: float,
            timings: bool = True) -> Probe:
    """Every measurement a plan needs. Without `timings` only what memory needs runs (the slice
    calls, the autograd probe, one decode, the feature net's load: the check at the start of a
    run), and the time-only figures (machine, ILP, features per image) are left at zero."""
    device = model.device
    slices, start = measure_slices(model, config, grad=True, timed=timings)
    (n1, t1, m1), (nk, tk, mk) = slices.one, slices.many
    call_fixed, call_sample = _fit(n1, t1, nk, tk)
    act_fixed, act_sample = _fit(n1, float(m1), nk, float(mk))
    forward_ratio, backward_ratio, grad_fixed = 1.0, 2.0, act_fixed
    grad_sample = GRAD_PER_ACTIVATION * act_sample
    if slices.grad:
        (g1, _, _, p1), (gk, forward, backward, pk) = slices.grad[0], slices.grad[-1]
        base = max(call_fixed + call_sample * gk, 1e-9)
        forward_ratio, backward_ratio = forward / base, backward / base
        grad_fixed, grad_sample = _fit(g1, float(p1), gk, float(pk))
    (decode_fixed, decode_sample), (decode_fixed_bytes, decode_bytes), shape = _decode(
        model, config, timings)
    features = _features(feature_net, model, shape, timings)
    machine = measure_machine(device) if timings else Machine(str(device), 0.0, 0.0, 0.0, 0.0)
    rows = config.importance_n * max(1, slices.rows)
    primitives = measure_primitives(config, specs, rows, machine, device) if timings else \
        Primitives(0.0, 0.0, 0, 0.0)
    ilp = _ilp_seconds(config, specs) if timings else 0.0
    channels, height, width = (*shape, 1, 1, 1)[:3]
    return Probe(
        device=str(device), rows_per_sample=max(1, slices.rows), slice_samples=slices.many[0],
        baseline_bytes=baseline_bytes,
        model_bytes=max(start - baseline_bytes, _weights_bytes(model)),
        load_seconds=load_seconds, call_fixed_seconds=call_fixed,
        call_sample_seconds=call_sample, act_fixed_bytes=act_fixed,
        act_sample_bytes=act_sample, grad_forward_ratio=forward_ratio,
        backward_ratio=backward_ratio, grad_fixed_bytes=grad_fixed,
        grad_sample_bytes=grad_sample, grad_measured=bool(slices.grad),
        decode_fixed_seconds=decode_fixed, decode_sample_seconds=decode_sample,
        decode_fixed_bytes=decode_fixed_bytes, decode_sample_bytes=decode_bytes,
        image_shape=(int(channels), int(height), int(width)), feature_net=feature_net,
        feature_dim=features[3], feature_load_seconds=features[0],
        feature_net_bytes=features[1], feature_image_seconds=features[2], ilp_seconds=ilp,
        machine=machine, primitives=primitives)
