"""Just-in-time build of the native extensions (sources in ``sasa_impls/csrc``) and why they cannot run.

``cpu_extension()`` and ``cuda_extension()`` compile on first use with ``torch.utils.cpp_extension.load``
into torch's extension cache (~/.cache/torch_extensions), printing one line to stderr while a compile is
due. The sources are first copied to a directory of that cache named by a hash of their contents, and
the extension's name carries the same hash: checkouts and installed wheels with the same sources (asv
builds one per commit) share one build instead of recompiling. The CPU kernel is compiled with
``-march=native``, so its name also carries a short hash of the CPU's ISA flags: a cache shared by
machines with other ISAs (one home directory) never loads a binary built for another CPU. A failed
build raises a RuntimeError ending with the compiler's last error lines, and ``native_available``
reports its first error line from then on. ``native_available`` itself never compiles anything.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SHARED_HEADER = "sasa_index.h"  # the index math both kernels use
CPU_SOURCES = ("cpu/sasa_cpu.cpp",)
CUDA_SOURCES = ("cuda/sasa_cuda_binding.cpp", "cuda/sasa_cuda.cu")
DTYPES = {
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}
# "cpu" / "cuda" -> the first error line of this process's failed build
_FAILURES: dict[str, str] = {}


def cpu_flags() -> str:
    """The CPU's ISA flags (the first ``flags`` line of /proc/cpuinfo), or the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def isa_tag() -> str:
    """Short hash of the ISA flags: part of the CPU extension's name."""
    return hashlib.sha1(cpu_flags().encode()).hexdigest()[:8]


def _ninja_on_path() -> bool:
    """torch runs ``ninja`` from PATH; the pip package's binary counts too (added to PATH when used)."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def toolchain_problem(device_type: str) -> str:
    """Why the extension for ``device_type`` cannot be built here ("" when it can)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} (CXX or c++) is not on PATH"
    if not _ninja_on_path():
        return "ninja is not installed (pip install ninja): torch.utils.cpp_extension needs it"
    if device_type == "cuda":
        if torch.version.cuda is None:
            return "torch is a CPU-only build (torch.version.cuda is None): it cannot run CUDA extensions"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
            return "no CUDA toolkit: nvcc not found (set CUDA_HOME)"
    if device_type in _FAILURES:
        return f"the native {device_type} build failed in this process: {_FAILURES[device_type]}"
    return ""


def _error_lines(message: str) -> list[str]:
    """The compiler's error lines of a failed build's output ("file:line: error: ..."), else its last lines."""
    lines = [line.strip() for line in message.splitlines()]
    errors = [line for line in lines if "error:" in line or "error :" in line]
    return errors or [line for line in lines if line][-8:]


@functools.cache
def source_tree(device_type: str) -> tuple[str, Path]:
    """(hash of the device's sources: the shared header and csrc/<device_type>, a copy of them in torch's
    extension cache at a path named by that hash)."""
    from torch.utils.cpp_extension import get_default_build_root

    files = sorted(path.relative_to(CSRC) for path in CSRC.rglob("*")
                   if path.is_file() and path.relative_to(CSRC).parts[0] in (SHARED_HEADER, device_type))
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.as_posix().encode() + b"\0" + (CSRC / path).read_bytes() + b"\0")
    tag = digest.hexdigest()[:10]
    root = Path(get_default_build_root()) / "sasa_sources" / f"{device_type}_{tag}"
    if not root.exists():  # copy next to it, then rename: concurrent first uses never see half a tree
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=root.parent))
        for path in files:
            (staging / "csrc" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(CSRC / path, staging / "csrc" / path)
        try:
            os.rename(staging / "csrc", root)
        except OSError:  # another process got there first
            pass
        shutil.rmtree(staging, ignore_errors=True)
    return tag, root


def _built(name: str) -> bool:
    """Whether torch's cache already holds ``name``'s library (its name fixes sources and flags)."""
    from torch.utils.cpp_extension import _get_build_directory

    return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()


def _build(device_type: str, name: str, sources: tuple[str, ...], **options):
    from torch.utils import cpp_extension

    problem = toolchain_problem(device_type)
    if problem:
        raise RuntimeError(f"sasa_impls: cannot build the native {device_type} kernel: {problem}")
    tag, root = source_tree(device_type)
    name = f"{name}_{tag}"
    if not _built(name):
        print(f"sasa_impls: compiling the native {device_type.upper()} kernel "
              "(once per machine and source version, about a minute)...", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name=name, sources=[str(root / s) for s in sources], extra_include_paths=[str(root)],
                                  verbose=False, **options)
    except Exception as error:  # compiler errors arrive as RuntimeError with the build's output
        errors = _error_lines(str(error))
        _FAILURES[device_type] = errors[0]
        details = "\n".join(errors[-8:])
        raise RuntimeError(f"sasa_impls: building the native {device_type} kernel failed:\n{details}") from error


# Builds of the CPU kernel for profiling only (sasa-bench profile's ablations): name -> extra defines. They get
# names of their own, so they never replace the normal build ("").
CPU_VARIANTS = {"": (), "no_exp": ("-DSASA_PROFILE_NO_EXP",)}


@functools.cache
def cpu_extension(variant: str = ""):
    """The compiled CPU extension (``forward``, ``backward``), built on first use; ``variant`` names a
    profiling build of CPU_VARIANTS (results wrong by design: never for measuring correctness)."""
    if variant not in CPU_VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(CPU_VARIANTS)}, got {variant!r}")
    flags = ["-O3", "-march=native", "-fopenmp", *CPU_VARIANTS[variant]]
    if "avx512f" in cpu_flags().split():
        flags.append("-mprefer-vector-width=512")
    suffix = f"_{variant}" if variant else ""
    return _build("cpu", f"sasa_native_cpu_{isa_tag()}{suffix}", CPU_SOURCES, extra_cflags=flags, extra_ldflags=["-fopenmp"])


@functools.cache
def cuda_extension():
    """The compiled CUDA extension (``forward``, ``backward``), built on first use for this machine's GPUs."""
    return _build("cuda", "sasa_native_cuda", CUDA_SOURCES, extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                  with_cuda=True)


def native_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(True, "") when the native kernel can run on ``device`` in ``dtype``, else (False, why). Compiles nothing."""
    device = torch.device(device)
    if device.type not in DTYPES:
        return False, f"no native kernel for device type {device.type!r}"
    problem = toolchain_problem(device.type)
    if problem:
        return False, problem
    if dtype not in DTYPES[device.type]:
        return False, f"dtype {dtype} not supported on {device.type}; supported: {[str(d) for d in DTYPES[device.type]]}"
    return True, ""
