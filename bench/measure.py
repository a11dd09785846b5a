"""Latency and peak memory of a callable, following the design's measurement rules (docs/design.md).

Latency, CPU: ``torch.utils.benchmark.Timer.adaptive_autorange`` with a fixed thread count, after warm-up
calls: it measures blocks of calls until the spread (IQR / median) falls below ``confidence`` or the time
budget runs out, so noisy cases get more repetitions; median, IQR and whether it met its confidence.
Latency, CUDA: ``triton.testing.do_bench`` (L2 flushed before every call, CUDA events, quantiles) where
triton is installed, else the same loop with CUDA events and an L2 flush of our own.

Heap, CPU: timed calls run with glibc's heap kept (:func:`keep_freed_memory`), so memory a call frees serves
the next call, as a caching allocator would, instead of being given back to the system and faulted in again.

Peak memory: on CUDA the caching allocator's peak of allocated bytes above what existed before the
call (inputs, weights); on CPUs the growth of the process's peak resident set (RSS) during the call,
which includes everything the call touches (not only torch tensors), so measure in a process of its
own (the runner's workers do).
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
import resource
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.utils.benchmark as torch_benchmark

from . import contention

# glibc's mallopt parameters, and the defaults of the two that keep_freed_memory changes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@dataclass(frozen=True)
class TimerSettings:
    """How long and how hard to time a call (the CLI's --warmup, --reps, --min-time, --max-time, --confidence)."""

    warmup: int = 2  # untimed calls first (compilation, caches, allocator)
    reps: int = 5  # at least this many calls' worth of timed time
    min_time_s: float = 0.5  # at least this much timed time
    max_time_s: float = 5.0  # stop here even when not confident
    confidence: float = 0.05  # stop once IQR / median is below this
    threads: int | None = None  # torch's CPU thread count while timing


@dataclass(frozen=True)
class Timing:
    """Median and IQR of the per-call times in milliseconds, over ``reps`` timed calls, and whether the
    spread met the requested confidence; ``timer`` names what measured it."""

    median_ms: float
    iqr_ms: float
    reps: int | None  # None where the timer does not say (do_bench)
    confident: bool
    timer: str
    other_load: Optional[float] = None  # CPU: share of the machine other processes used while timed (bench.contention)
    contended: Optional[bool] = None  # CPU: other_load above bench.contention.CONTENDED_SHARE per timed thread


def _median_iqr(times_ms: list[float]) -> tuple[float, float]:
    if len(times_ms) < 2:
        return times_ms[0], 0.0
    q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return statistics.median(times_ms), q3 - q1


def _mallopt(settings: dict[int, int]) -> bool:
    """Set glibc's malloc parameters (mallopt); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in settings.items())
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """glibc: serve every block from the heap (no mmap) and never give the heap's top back to the system, so the
    memory one call frees is what the next call gets, already mapped (True where set).

    Why timing needs it: glibc gives freed memory back (mmap'd blocks at once, the heap's top once it exceeds a
    threshold that moves with the sizes freed so far) and the next call faults every page in again, about 2 us
    per 4 KiB page (AMD Zen 4 f25m17 VM). How often depends on what the process ran before: the same SASA2d
    k = 19 fwd+bwd step (28 x 28, batch 1) took 48 to 131 page faults per call in different processes and 1-3
    with the heap kept, and ran 4-8% faster kept (processes run alternately); the conv beside it took 0 to 38.
    A caching allocator (CUDA's; jemalloc or tcmalloc, which PyTorch's CPU performance guide recommends) keeps
    the memory the same way."""
    return _mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1})


def time_cpu(fn: Callable[[], object], settings: TimerSettings) -> Timing:
    """Warm-up calls (timed, to size the budget), then ``adaptive_autorange`` until confident, the heap kept
    (:func:`keep_freed_memory`); the load other processes put on the machine meanwhile is read around the timed
    calls (bench.contention)."""
    keep_freed_memory()
    start = time.perf_counter()
    for _ in range(settings.warmup):
        fn()
    per_call = (time.perf_counter() - start) / settings.warmup if settings.warmup else 0.0
    threads = settings.threads or torch.get_num_threads()
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    min_time = max(settings.min_time_s, settings.reps * per_call)
    before = contention.cpu_sample()
    measured = timer.adaptive_autorange(threshold=settings.confidence, min_run_time=min_time,
                                        max_run_time=max(settings.max_time_s, min_time))
    load = contention.other_load(before, contention.cpu_sample())
    return Timing(median_ms=measured.median * 1e3, iqr_ms=measured.iqr * 1e3,
                  reps=len(measured.raw_times) * measured.number_per_run,
                  confident=measured.meets_confidence(settings.confidence),
                  timer="torch.utils.benchmark adaptive_autorange", other_load=load,
                  contended=contention.contended(load, threads))


class _CudaTimer:
    """Times one call with CUDA events after flushing L2 (the flush itself is outside the events)."""

    def __init__(self, device: torch.device):
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20) or 64 * 2**20
        self.flush_buffer = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        self.flush_buffer.fill_(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def time_cuda(fn: Callable[[], object], device: torch.device, settings: TimerSettings) -> Timing:
    """``triton.testing.do_bench`` (quartiles of calls over ``min_time_s``, L2 flushed), else CUDA events."""
    for _ in range(settings.warmup):
        fn()
    torch.cuda.synchronize(device)
    if importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        q1, median, q3 = do_bench(fn, warmup=0, rep=max(1.0, settings.min_time_s * 1e3), quantiles=[0.25, 0.5, 0.75])
        return Timing(median_ms=median, iqr_ms=q3 - q1, reps=None,
                      confident=(q3 - q1) <= settings.confidence * median, timer="triton do_bench")
    call_ms, times = _CudaTimer(device), []
    while len(times) < settings.reps or (sum(times) < settings.min_time_s * 1e3 and sum(times) < settings.max_time_s * 1e3):
        times.append(call_ms(fn))
    median, iqr = _median_iqr(times)
    return Timing(median_ms=median, iqr_ms=iqr, reps=len(times), confident=iqr <= settings.confidence * median,
                  timer="cuda events")


def time_call(fn: Callable[[], object], device: str | torch.device = "cpu", settings: TimerSettings = TimerSettings()) -> Timing:
    """Time ``fn()`` on ``device`` (see the module docstring)."""
    if settings.warmup < 0 or settings.reps < 1:
        raise ValueError(f"reps, warmup: expected reps >= 1 and warmup >= 0, got {settings.reps}, {settings.warmup}")
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda(fn, device, settings)
    return time_cpu(fn, settings)


def matmul_gflops(size: int = 4096, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  settings: TimerSettings = TimerSettings()) -> float:
    """Achieved GFLOP/s of a large ``size`` x ``size`` matrix product (2 size^3 FLOP) on random inputs: what
    this machine's BLAS reaches, the practical peak that measured implementations are compared with."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    timing = time_call(lambda: torch.mm(a, b), device, settings)
    return 2.0 * size**3 / (timing.median_ms * 1e-3) / 1e9


def proc_status_kib(field: str) -> int | None:
    """A ``Vm*`` field of /proc/self/status in KiB (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux /proc/self/clear_refs, value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _return_freed_memory() -> None:
    """glibc: give freed heap memory back to the system and serve large blocks (>= 128 KiB) by mmap
    from now on, so memory a call frees leaves the resident set and the next call's peak is its own
    (glibc otherwise raises its mmap threshold after a free and keeps such blocks resident; undoes
    :func:`keep_freed_memory`)."""
    if _mallopt({M_MMAP_MAX: DEFAULT_MMAP_MAX, M_MMAP_THRESHOLD: 128 * 1024, M_TRIM_THRESHOLD: DEFAULT_TRIM_THRESHOLD}):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _in_fresh_thread(fn: Callable[[], object]) -> None:
    """Call ``fn()`` in a new thread (errors re-raised here): glibc gives a new thread a new, empty
    malloc arena, so the call cannot reuse free chunks that earlier work left in this thread's heap
    (reusing them made the measured peak depend on the process's history, by up to 2x). Where no
    thread can be started (an address-space cap), ``fn()`` runs here."""
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as error:  # handed to the calling thread
            outcome.append(error)

    thread = threading.Thread(target=target, name="peak-memory")
    try:
        thread.start()
    except RuntimeError:
        fn()
        return
    thread.join()
    if outcome:
        raise outcome[0]


def cpu_peak_rss_growth(fn: Callable[[], object]) -> int:
    """Bytes by which this process's peak resident set grew above its current size while ``fn()`` ran.

    Freed memory is first returned to the system (:func:`_return_freed_memory`), the peak mark (VmHWM)
    reset, and the call made in a fresh thread (:func:`_in_fresh_thread`), so earlier allocations
    (warm-up, module set-up) neither hide nor inflate the call's own peak. Where the mark cannot be reset
    (no /proc), ru_maxrss is used: then the growth is only seen above the process's earlier peak, so
    call this before anything else allocates much.
    """
    _return_freed_memory()
    reset = _reset_peak_rss()
    before = proc_status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _in_fresh_thread(fn)
    after = proc_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, (after - before) * 1024)


def cuda_peak_allocated_growth(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes the CUDA caching allocator held during ``fn()`` above what was allocated before
    (the inputs and weights), the peak statistics reset first."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak memory ``fn()`` needs beyond what exists before it runs: CUDA allocator peak on GPUs,
    growth of the process's peak RSS on CPUs (run it in a process of its own: the runner's workers)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_allocated_growth(fn, device)
    return cpu_peak_rss_growth(fn)
