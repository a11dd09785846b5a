"""The machine fingerprint every result row carries (docs/design.md "Measurement rules").

Code version (git commit and whether the tree differs from it), library versions, the CPU (model name,
vendor, family/model numbers and its widest vector ISA, so a Zen 3 and a Zen 5 sold as "AMD EPYC" differ)
and the thread count, and on NVIDIA GPUs the nvidia-ml-py readings (name, driver, clocks, power, temperature,
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


# Vector ISAs from the widest down, each with the /proc/cpuinfo flag (x86) or feature (ARM) that shows it.
ISA_FLAGS = (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"), ("sve", "sve"), ("neon", "asimd"), ("sse4", "sse4_2"))
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "0x41": "arm"}


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return cpuinfo.read()
    except OSError:
        return ""


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def _number(text: str | None) -> int | None:
    """A decimal ("167") or hexadecimal ("0xd0c", ARM) number of /proc/cpuinfo."""
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text)
    except (AttributeError, ValueError):
        return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    return _field(_cpuinfo() if cpuinfo is None else cpuinfo, "model name") or platform.processor() or platform.machine()


def cpu_identity(cpuinfo: str | None = None) -> dict:
    """``cpu_vendor`` (intel, amd, arm), ``cpu_family``, ``cpu_model_id`` (numbers: microarchitecture) and
    ``cpu_isa``, the widest vector ISA the CPU offers (ISA_FLAGS: what -march=native and torch's dispatch
    use), from /proc/cpuinfo (or the given text); None where it does not say."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    vendor = _field(text, "vendor_id") or _field(text, "CPU implementer")
    family, model = _field(text, "cpu family") or _field(text, "CPU architecture"), _field(text, "model") or _field(text, "CPU part")
    flags = set((_field(text, "flags") or _field(text, "Features") or "").split())
    return {"cpu_vendor": VENDORS.get(vendor, vendor.lower()) if vendor else None,
            "cpu_family": _number(family), "cpu_model_id": _number(model),
            "cpu_isa": next((isa for isa, flag in ISA_FLAGS if flag in flags), None)}


def native_isa(impl: str, device: str) -> str | None:
    """The ISA the native CPU kernel runs with: it is built with -march=native (sasa_impls/impls/_native_build.py),
    so this CPU's widest (:func:`cpu_identity`); None for other implementations and devices."""
    return cpu_identity()["cpu_isa"] if impl == "native" and str(device).startswith("cpu") else None


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
        **cpu_identity(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **gpu_readings(),
    }


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|R|TM)\)|processor|cpu|@.*$", " ", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_machine_id(cpuinfo: str | None = None, cores: int | None = None) -> str:
    """The CPU part of a machine id: model name, family/model numbers, vector ISA and logical CPUs, e.g.
    ``intel-xeon-f6m167-avx512-2c`` (a Zen 3 and a Zen 5 "AMD EPYC" get different ids)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    ident = cpu_identity(text)
    micro = "" if ident["cpu_family"] is None else f"f{ident['cpu_family']}m{ident['cpu_model_id']}"
    parts = [_slug(cpu_model(text)), micro, ident["cpu_isa"] or "", f"{cores or os.cpu_count()}c"]
    return "-".join(p for p in parts if p)


def machine_id() -> str:
    """Folder name under results/ for this machine: the GPU's name on GPU machines, else
    :func:`cpu_machine_id` (``SASA_BENCH_MACHINE`` overrides, e.g. to tell two identical hosts apart).
    Folders named before the CPU's family/model and ISA were part of the id (``amd-epyc-2c``) keep their rows."""
    if os.environ.get("SASA_BENCH_MACHINE"):
        return _slug(os.environ["SASA_BENCH_MACHINE"])
    gpu = gpu_readings()["gpu"]
    if gpu:
        return _slug(gpu)
    return cpu_machine_id()
