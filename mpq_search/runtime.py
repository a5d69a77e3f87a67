"""Process-wide settings, opt-in: the CLI applies them at start-up, library calls never do.

A library that a user imports must not change their process behind their back (a thread count, the
C allocator's thresholds). These settings make mpq-search faster on a CPU, so the CLI and the
benchmarks turn them on explicitly with `configure_process`; a Python user may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from mpq_search.errors import MPQSearchError

_MALLOC_TUNED = False
_LIBC: ctypes.CDLL | None = None
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""glibc's largest allowed mmap threshold on 64-bit."""
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc keep freed activation buffers instead of returning them to the OS.

    By default glibc serves large blocks (from 128 KiB) with their own mmap and unmaps them on
    free, so every denoiser call on CPU page-faults its activations in again and spends system
    time on it. Raising the mmap and trim thresholds keeps the blocks for the next call; it
    moves memory, not numbers. Idempotent; returns whether the thresholds are set (False
    without glibc).
    """
    global _MALLOC_TUNED, _LIBC
    if _MALLOC_TUNED:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "malloc_trim"):  # not glibc (musl, macOS)
        return False
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    _MALLOC_TUNED, _LIBC = True, libc
    return True


def release_freed_memory() -> bool:
    """Hand the free pages glibc keeps (`keep_freed_memory`) back to the OS; returns whether
    it did (False when the thresholds were never raised).

    Called between a run's phases (`phases.phase`): within a phase the kept buffers serve the
    next denoiser call, but what one phase freed (the sensitivity profile's autograd graph, the
    calibration's recorded inputs) would otherwise stay resident through every later phase and
    add to their peaks on a real-size model.
    """
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def limit_blas_threads() -> None:
    """Run numpy/scipy BLAS single-threaded: OpenBLAS threads compete with torch's for the same
    cores and make the FID's small matrix square root far slower; torch keeps its own."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def configure_process(threads: int | None = None) -> None:
    """The settings the CLI runs under: torch threads (when given), single-threaded BLAS,
    glibc keeping freed buffers, and reproducible float32 on CUDA (`exact_cuda`). Call once at
    start-up. The benchmarks call it too, so that their numbers are made under the settings a
    user's run has."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    limit_blas_threads()
    keep_freed_memory()
    exact_cuda()
    quiet_optional_imports()


def quiet_optional_imports() -> None:
    """With torchao installed (`mpq_search.deploy`), every diffusers import prints torch's
    deprecation of torchao's Enum registrations and diffusers' note that torchao's tensor types
    do not import: noise on every command, which would break the one-line errors. Only those
    two loggers are quietened, and only to errors."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)


def exact_cuda() -> None:
    """On CUDA, the same seed must give the same numbers and FP must mean float32: cuDNN picks
    deterministic algorithms without autotuning, and convolutions do not round inputs to TF32
    (cuDNN's default; matmuls already default to full float32)."""
    import torch

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` torch threads (None: leave torch's choice), then restore."""
    import torch

    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(spec: str | None) -> str:
    """The torch device a `--device` value means: "auto" (the default) is "cuda" when a GPU is
    visible, else "cpu"; "cuda" without a GPU is an error rather than a silent CPU run."""
    import torch

    text = (spec or "auto").strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise MPQSearchError(f"device {spec!r} asked for, but torch sees no CUDA GPU here "
                                 "(use --device cpu or auto)")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise MPQSearchError(f"device {spec!r}: torch sees {torch.cuda.device_count()} "
                                 "CUDA GPU(s)")
        return text
    raise MPQSearchError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def stop_child(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL if it has not ended within `timeout` s; no
    command leaves one running."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
