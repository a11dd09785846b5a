"""The machine fingerprint every result row carries (docs/design.md "Measurement rules").

Code version (git commit and whether the tree differs from it), library versions, the CPU and the
thread count, and on NVIDIA GPUs the nvidia-ml-py readings (name, driver, clocks, power, temperature,
memory). :func:`gpu_readings` is also taken after each case, so a throttled run shows in its rows.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Changes to these are measurements and prose, not code: they do not make the tree "dirty" (git pathspecs).
NOT_CODE = ("results", "reports", "*.md")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml_index() -> int:
    """NVML index of the GPU that torch calls cuda:0 (the first of CUDA_VISIBLE_DEVICES when set)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def gpu_readings() -> dict:
    """nvidia-ml-py readings of the GPU now (empty values without an NVIDIA GPU or the library)."""
    empty = {"gpu": None, "gpu_driver": None, "gpu_clocks": None, "gpu_power_w": None, "gpu_temp_c": None, "gpu_memory": None}
    try:
        import pynvml
    except ImportError:
        return empty
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return empty
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "gpu": name.decode() if isinstance(name, bytes) else name,
            "gpu_driver": driver.decode() if isinstance(driver, bytes) else driver,
            "gpu_clocks": {
                "sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "mem_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                "sm_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            },
            "gpu_power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "gpu_temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "gpu_memory": {"used_bytes": memory.used, "total_bytes": memory.total},
        }
    except pynvml.NVMLError:
        return empty
    finally:
        pynvml.nvmlShutdown()


def environment() -> dict:
    """Commit, dirty flag, versions, CPU, threads and the GPU readings of this machine, now."""
    dirty = _git("status", "--porcelain", "--", ".", *(f":!{p}" for p in NOT_CODE))
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if dirty is None else bool(dirty),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "natten": _version("natten"),
        "fvcore": _version("fvcore"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **gpu_readings(),
    }


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|R|TM)\)|processor|cpu|@.*$", " ", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_id() -> str:
    """Folder name under results/ for this machine: the GPU's name on GPU machines, else the CPU
    model and core count (``SASA_BENCH_MACHINE`` overrides, e.g. to tell two identical hosts apart)."""
    if os.environ.get("SASA_BENCH_MACHINE"):
        return _slug(os.environ["SASA_BENCH_MACHINE"])
    gpu = gpu_readings()["gpu"]
    if gpu:
        return _slug(gpu)
    return f"{_slug(cpu_model())}-{os.cpu_count()}c"
