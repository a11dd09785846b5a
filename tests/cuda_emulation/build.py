"""Build the CUDA kernels (sasa_impls/csrc/cuda/sasa_cuda.cu) for the CPU emulation and load them (ctypes).

The source is used as it is, except its launch syntax, which no C++ compiler parses:
``f<<<grid, block, shared, stream>>>(args)`` becomes ``::emu::launch(f, {grid, block, shared, stream})(args)``.
g++ compiles that with the emulation headers (include/) in place of CUDA's and harness.cpp (a C ABI) into
a shared library, cached under the temp folder by a hash of everything that goes into it, so only a
changed kernel or emulation recompiles.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CUDA_SRC = HERE.parent.parent / "sasa_impls" / "csrc" / "cuda"
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>", re.DOTALL)
# Alignment: the kernels' float4 reads of shared memory must be 16-byte aligned on a GPU; UBSan reports
# a misaligned one on stderr (the test checks stderr). Head dims up to 128 (the 256 instances are the same
# code with wider groups), to keep the compile short.
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-fsanitize=alignment",
         "-DSASA_CUDA_MAX_PADDED_DIM=128", "-Wno-unknown-pragmas")


def translate(source: str) -> str:
    """The source with every ``<<<...>>>`` launch spelled as an emulation call; ValueError if one is left."""
    translated, count = LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {{{m.group(2)}}})", source)
    if "<<<" in translated or ">>>" in translated or count == 0:
        raise ValueError("kernel source: a launch the translation does not recognise")
    return translated


def compiler() -> str | None:
    """g++ (the emulation uses GCC's _Float16 and ucontext)."""
    return shutil.which(os.environ.get("SASA_EMU_CXX", "g++"))


def build(source_path: Path = CUDA_SRC / "sasa_cuda.cu") -> Path:
    """The emulated kernels' shared library for ``source_path`` (a copy with a planted bug, say), built
    once per content hash."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no g++ to build the CUDA emulation")
    translated = f'#line 1 "{source_path}"\n' + translate(source_path.read_text())
    inputs = [translated, (HERE / "harness.cpp").read_text(), " ".join(FLAGS), cxx]
    inputs += [path.read_text() for path in sorted((HERE / "include").glob("*.h"))]
    inputs += [path.read_text() for path in sorted(CUDA_SRC.glob("*.h")) + [CUDA_SRC.parent / "sasa_index.h"]]
    digest = hashlib.sha1("\0".join(inputs).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "sasa_cuda_emulation" / digest
    library = folder / "sasa_cuda_emulated.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sasa_cuda.emulated.cu").write_text(translated)
    staging = folder / f"build-{os.getpid()}.so"
    done = subprocess.run([cxx, *FLAGS, "-I", str(folder), "-I", str(HERE / "include"), "-I", str(CUDA_SRC),
                           str(HERE / "harness.cpp"), "-o", str(staging)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{done.stderr[-4000:]}")
    os.replace(staging, library)  # atomic: a concurrent build never loads half a library
    return library


def load(library: Path) -> ctypes.CDLL:
    """The library with its C ABI's signatures (harness.cpp)."""
    lib = ctypes.CDLL(str(library))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.emu_forward.argtypes = [i, p, f, p, p, p, p, p, p, p]
    lib.emu_forward.restype = ctypes.c_char_p
    lib.emu_backward.argtypes = [i, p, f, p, p, p, p, p, p, p, p, p, p, p, p, p, p]
    lib.emu_backward.restype = ctypes.c_char_p
    lib.emu_workspace_floats.argtypes = [p]
    lib.emu_workspace_floats.restype = ctypes.c_size_t
    lib.emu_set_schedule.argtypes = [i]
    lib.emu_counter.argtypes = [i]
    lib.emu_counter.restype = ctypes.c_long
    return lib
