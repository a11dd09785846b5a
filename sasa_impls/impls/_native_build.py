"""Just-in-time build of the native extensions (sources in ``sasa_impls/csrc``) and why they cannot run.

``cpu_extension()`` and ``cuda_extension()`` compile on first use with ``torch.utils.cpp_extension.load``
into torch's extension cache (~/.cache/torch_extensions), printing one line to stderr whenever a compile
is due (a rebuild too: ninja is asked first). The sources are first copied to a directory of that cache
named by a hash of their contents: checkouts and installed wheels with the same sources (asv builds one
per commit) share one build instead of recompiling. The extension's name carries a hash of those
sources and of the environment (:func:`environment_tag`: torch's version, build and headers, Python, the
compiler, the flags, the CPU's ISA flags, since the CPU kernel is built with ``-march=native``), so
environments sharing a cache never load or rebuild each other's binary.

A build is safe against a killed run: it holds an flock in its build folder (:func:`build_lock`; a waiting
build says so in one line, and torch's own lock file left by a killed build is removed), and ninja gets
SIGTERM when the building process dies, so no compiler outlives it. A failed build raises a RuntimeError
ending with the compiler's last error lines, and ``native_available`` reports its first error line from
then on. ``native_available`` itself never compiles anything.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Iterator, Optional

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
PR_SET_PDEATHSIG = 1  # linux/prctl.h
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def cpu_flags() -> str:
    """The CPU's ISA flags (the first ``flags`` line of /proc/cpuinfo), or the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _ninja_on_path() -> bool:
    """torch runs ``ninja`` from PATH; the pip package's binary counts too (added to PATH when used)."""
    if _which("ninja"):
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return _which("ninja") is not None


@functools.lru_cache(maxsize=64)
def _which_on(program: str, path: Optional[str]) -> Optional[str]:
    return shutil.which(program, path=path)


def _which(program: str) -> Optional[str]:
    """shutil.which(program), cached per PATH: every call of the op asks (native_available)."""
    return _which_on(program, os.environ.get("PATH"))


def toolchain_problem(device_type: str) -> str:
    """Why the extension for ``device_type`` cannot be built here ("" when it can)."""
    compiler = os.environ.get("CXX", "c++")
    if _which(compiler) is None:
        return f"no C++ compiler: {compiler!r} (CXX or c++) is not on PATH"
    if not _ninja_on_path():
        return "ninja is not installed (pip install ninja): torch.utils.cpp_extension needs it"
    if device_type == "cuda":
        if torch.version.cuda is None:
            return "torch is a CPU-only build (torch.version.cuda is None): it cannot run CUDA extensions"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or _which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
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
def source_tree(device_type: str, csrc: Path = CSRC) -> tuple[str, Path]:
    """(hash of the device's sources: the shared header and <csrc>/<device_type>, a copy of them in torch's
    extension cache at a path named by that hash). ``csrc``: this package's sources, or another version's
    (scripts/native_ab.py builds a commit's beside them)."""
    from torch.utils.cpp_extension import get_default_build_root

    files = sorted(path.relative_to(csrc) for path in csrc.rglob("*")
                   if path.is_file() and path.relative_to(csrc).parts[0] in (SHARED_HEADER, device_type))
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.as_posix().encode() + b"\0" + (csrc / path).read_bytes() + b"\0")
    tag = digest.hexdigest()[:10]
    root = Path(get_default_build_root()) / "sasa_sources" / f"{device_type}_{tag}"
    if not root.exists():  # copy next to it, then rename: concurrent first uses never see half a tree
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=root.parent))
        for path in files:
            (staging / "csrc" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(csrc / path, staging / "csrc" / path)
        try:
            os.rename(staging / "csrc", root)
        except OSError:  # another process got there first
            pass
        shutil.rmtree(staging, ignore_errors=True)
    return tag, root


def environment_tag(tag: str, options: dict) -> str:
    """Short hash of everything a build depends on beyond the sources' ``tag``: torch (version, build,
    CUDA, install folder: its headers), Python, the compiler, the flags and the CPU's ISA flags. Part of
    the extension's name, so two environments sharing a cache never rebuild each other's binary."""
    compiler = os.environ.get("CXX", "c++")
    parts = (tag, torch.__version__, torch.version.git_version, str(torch.version.cuda), str(Path(torch.__file__).parent),
             sys.version, shutil.which(compiler) or compiler, repr(sorted(options.items())), cpu_flags())
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:10]


def _built(name: str) -> bool:
    """Whether torch's cache holds ``name``'s library and ninja has nothing to redo for it (a build
    that a change of headers or flags would redo counts as not built, so its message is shown)."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(name, verbose=False))
    if not (folder / f"{name}.so").exists():
        return False
    if not (folder / "build.ninja").exists() or not _ninja_on_path():
        return True
    dry_run = subprocess.run(["ninja", "-n", "-C", str(folder)], capture_output=True, text=True)
    return dry_run.returncode == 0 and "no work to do" in dry_run.stdout


def _die_with_parent() -> None:  # runs in the forked child, before exec
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def _build_tool_dies_with_us() -> Iterator[None]:
    """Within: the processes torch's build starts (ninja) get SIGTERM when this process dies (Linux
    PR_SET_PDEATHSIG); ninja then stops its compilers, which run in process groups of their own, so a
    killed run leaves no compiler behind. Elsewhere nothing changes."""
    from torch.utils import cpp_extension

    if _PRCTL is None:
        yield
        return
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.run = functools.partial(subprocess.run, preexec_fn=_die_with_parent)
    cpp_extension.subprocess = shim
    try:
        yield
    finally:
        cpp_extension.subprocess = subprocess


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[None]:
    """Within: this process alone builds or loads ``name`` (an flock on ``sasa.lock`` in its build
    folder, with the holder's pid; the kernel drops it when its holder dies). A build waiting on a live
    holder says so in one line. torch's own ``lock`` file found while holding it was left by a killed
    build (torch waits on it forever): it is removed, in one line too."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(name, verbose=False))
    fd = os.open(folder / "sasa.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            print(f"sasa_impls: waiting for process {owner}, which is building or loading {name} in {folder}...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        stale = folder / "lock"
        if stale.exists():
            stale.unlink(missing_ok=True)
            print(f"sasa_impls: removed {stale}, a build lock left by a killed build", file=sys.stderr, flush=True)
        yield
    finally:
        os.close(fd)


def load_extension(name: str, sources: list[str], announce: str, **options):
    """``torch.utils.cpp_extension.load`` under :func:`build_lock`, with the build tool dying with this
    process; ``announce`` is printed (one line, stderr) when a compile is due."""
    from torch.utils import cpp_extension

    with build_lock(name), _build_tool_dies_with_us():
        if not _built(name):
            print(announce, file=sys.stderr, flush=True)
        return cpp_extension.load(name=name, sources=sources, verbose=False, **options)


def _build(device_type: str, name: str, sources: tuple[str, ...], csrc: Path = CSRC, **options):
    problem = toolchain_problem(device_type)
    if problem:
        raise RuntimeError(f"sasa_impls: cannot build the native {device_type} kernel: {problem}")
    tag, root = source_tree(device_type, csrc)
    name = f"{name}_{environment_tag(tag, options)}"
    try:
        return load_extension(name, [str(root / s) for s in sources],
                              f"sasa_impls: compiling the native {device_type.upper()} kernel (once per machine, source "
                              "version, torch and flags; about a minute)...", extra_include_paths=[str(root)], **options)
    except Exception as error:  # compiler errors arrive as RuntimeError with the build's output
        errors = _error_lines(str(error))
        _FAILURES[device_type] = errors[0]
        details = "\n".join(errors[-8:])
        raise RuntimeError(f"sasa_impls: building the native {device_type} kernel failed:\n{details}") from error


# Builds of the CPU kernel: name -> ISA and defines. "" is the one the op runs; the others get names of their
# own, so they never replace it: "no_exp" for sasa-bench profile's ablation of the exp (results wrong by
# design), "avx2" the AVX2 code path on a machine that has more (tests/test_native.py checks it where the CPU
# has AVX-512, so the path an AVX2-only CPU would build is never untested).
CPU_VARIANTS = {"": ("-march=native",), "no_exp": ("-march=native", "-DSASA_PROFILE_NO_EXP"), "avx2": ("-march=haswell",)}
# The scripts' --isa choices (native_ab, microkernel_ceiling) and the CPU_VARIANTS build each names.
ISA_VARIANTS = {"native": "", "avx2": "avx2"}


def cpu_build_options(variant: str = "") -> dict:
    """The compiler options of the CPU kernel's build ``variant`` (CPU_VARIANTS): part of its name."""
    if variant not in CPU_VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(CPU_VARIANTS)}, got {variant!r}")
    flags = ["-O3", "-fopenmp", *CPU_VARIANTS[variant]]
    if "-march=native" in flags and "avx512f" in cpu_flags().split():
        flags.append("-mprefer-vector-width=512")
    return {"extra_cflags": flags, "extra_ldflags": ["-fopenmp"]}


@functools.cache
def cpu_extension(variant: str = "", csrc: Path = CSRC):
    """The compiled CPU extension (``forward``, ``backward``), built on first use; ``variant`` names a
    build of CPU_VARIANTS ("no_exp": results wrong by design, for profiling only); ``csrc`` the sources (another
    version's: scripts/native_ab.py)."""
    options = cpu_build_options(variant)
    return _build("cpu", "sasa_native_cpu" + (f"_{variant}" if variant else ""), CPU_SOURCES, csrc, **options)


# The CPU_VARIANTS build the op and SASA2d's projection product run (cpu_variant): "" the normal one.
_ACTIVE_CPU_VARIANT = ""


def active_cpu_variant() -> str:
    """The CPU_VARIANTS build that the native op and the projection's product run now."""
    return _ACTIVE_CPU_VARIANT


def active_cpu_extension():
    """The CPU extension of :func:`active_cpu_variant` (built on first use)."""
    return cpu_extension(_ACTIVE_CPU_VARIANT)


@contextlib.contextmanager
def cpu_variant(variant: str) -> Iterator[None]:
    """Within: the native CPU op and SASA2d's native projection product run the build ``variant`` of CPU_VARIANTS
    ("no_exp": wrong results by design, for timing ablations only; "avx2": the AVX2 code path, as an AVX2-only CPU
    would run it); the normal build is untouched and used again after."""
    global _ACTIVE_CPU_VARIANT
    cpu_extension(variant)  # build (or fail) before switching
    previous, _ACTIVE_CPU_VARIANT = _ACTIVE_CPU_VARIANT, variant
    try:
        yield
    finally:
        _ACTIVE_CPU_VARIANT = previous


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
