"""The native CUDA kernels build without a GPU: nvcc compiles them for sm_80 and sm_90 with ptxas' resource
report (no register spills, registers of a block within an SM), the shared-memory plan of the benchmark shapes
fits without opting in, and the torch binding compiles against this torch's headers (a CPU build of torch is
enough: the binding includes torch/extension.h only). Runs where nvcc / a C++ compiler exist, else skips.
The nvcc and g++ runs go in parallel. nvcc compiles the kernel instances of the benchmark's head dims only
(the 128 and 256 instances are the same code with wider thread groups: 90 - 113 registers, no spills when
last compiled in full for sm_80 and sm_90)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parent.parent / "sasa_impls" / "csrc"
ARCHS = ("sm_80", "sm_90")
KERNELS = ("forward_kernel", "backward_query_kernel", "backward_key_kernel")
ELEMENTS = ("float32", "fp16/bf16")  # the kernels' element types: float, Bits16 (one instance for both 16-bit formats)
BENCHMARK_HEAD_DIMS = (8, 16, 32, 64)  # C = 64 .. 512 with 8 heads
THREADS = 128  # kThreads of cuda/plan.h
REGISTERS_PER_SM = 64 * 1024
ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
MANGLED = re.compile(r"\d+((?:forward|backward_query|backward_key|rel_partial|rel_sum)_kernel)I(f|N\w*?6Bits16E)"
                     r"(?:Li(\d+)E)?E")


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        found = os.path.join(CUDA_HOME, "bin", "nvcc")
    return found


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


PLAN_PROGRAM = r"""
#include <cstdio>
#include "cuda/plan.h"
using namespace sasa::cuda;
template <int DPAD> void show(int size, int k) {
  const Kernel kernels[] = {Kernel::kForward, Kernel::kBackwardQuery, Kernel::kBackwardKey};
  for (int i = 0; i < 3; ++i) std::printf("%d %d %d %d %zu\n", DPAD, size, k, i, plan<DPAD>(kernels[i], size, size, k).shared_bytes);
}
int main() {
  const int cases[][2] = {{7, 3}, {7, 7}, {14, 7}, {28, 7}, {56, 7}, {28, 19}, {32, 19}, {64, 19}, {64, 31}};
  for (const auto& c : cases) { show<8>(c[0], c[1]); show<16>(c[0], c[1]); show<32>(c[0], c[1]); show<64>(c[0], c[1]);
                                show<128>(c[0], c[1]); show<256>(c[0], c[1]); }
}
"""


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Run nvcc (ptxas report), the binding's syntax check and the plan program at once; their outputs."""
    tmp = tmp_path_factory.mktemp("native_cuda")
    jobs = {}
    nvcc, cxx = _nvcc(), _cxx()
    if nvcc is not None:
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
        jobs["nvcc"] = subprocess.Popen(
            [nvcc, "-c", str(CSRC / "cuda" / "sasa_cuda.cu"), "-o", str(tmp / "sasa_cuda.o"), "-std=c++17", "-O3",
             f"-DSASA_CUDA_MAX_PADDED_DIM={max(BENCHMARK_HEAD_DIMS)}", "--threads", "2", "-Xptxas", "-v", *gencode],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if cxx is not None:
        include = Path(torch.__file__).parent / "include"
        jobs["binding"] = subprocess.Popen(
            [cxx, "-fsyntax-only", "-std=c++17", "-DTORCH_EXTENSION_NAME=sasa_native_cuda",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-isystem", str(include), "-isystem",
             str(include / "torch" / "csrc" / "api" / "include"), "-isystem", sysconfig.get_paths()["include"],
             str(CSRC / "cuda" / "sasa_cuda_binding.cpp")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (tmp / "plan.cpp").write_text(PLAN_PROGRAM)
        built = subprocess.run([cxx, "-std=c++17", "-I", str(CSRC), str(tmp / "plan.cpp"), "-o", str(tmp / "plan")],
                               capture_output=True, text=True)
        plan = subprocess.run([str(tmp / "plan")], capture_output=True, text=True) if built.returncode == 0 else built
        jobs["plan"] = plan
    results = {}
    for name, job in jobs.items():
        if isinstance(job, subprocess.Popen):
            output, _ = job.communicate(timeout=600)
            results[name] = (job.returncode, output)
        else:
            results[name] = (job.returncode, job.stdout + job.stderr)
    return results


def _result(builds, name: str, missing: str) -> str:
    if name not in builds:
        pytest.skip(missing)
    returncode, output = builds[name]
    assert returncode == 0, output[-4000:]
    return output


def ptxas_entries(output: str) -> list[dict]:
    """One dict per compiled kernel: arch, kernel, dtype, head dim (None for the relative-gradient
    kernels), registers, spill stores and loads (bytes)."""
    entries = []
    for chunk in output.split("ptxas info    : Compiling entry function")[1:]:
        match = ENTRY.search("Compiling entry function" + chunk)
        kernel = MANGLED.search(match.group(1))
        registers = re.search(r"Used (\d+) registers", chunk)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", chunk)
        entries.append({
            "arch": match.group(2), "kernel": kernel.group(1), "dtype": ELEMENTS[kernel.group(2) != "f"],
            "head_dim": int(kernel.group(3)) if kernel.group(3) else None,
            "registers": int(registers.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
        })
    return entries


def test_kernels_compile_for_sm80_and_sm90_without_spills(builds):
    entries = ptxas_entries(_result(builds, "nvcc", "nvcc not found (no CUDA toolkit): the CUDA kernels are not compiled"))
    found = {(e["arch"], e["kernel"], e["dtype"], e["head_dim"]) for e in entries}
    for arch in ARCHS:
        for kernel in KERNELS:
            for dtype in ELEMENTS:
                for head_dim in BENCHMARK_HEAD_DIMS:
                    assert (arch, kernel, dtype, head_dim) in found, (arch, kernel, dtype, head_dim)
    spilled = [e for e in entries if e["spill_stores"] or e["spill_loads"]]
    assert not spilled, spilled
    crowded = [e for e in entries if e["registers"] > 255 or e["registers"] * THREADS > REGISTERS_PER_SM]
    assert not crowded, crowded


def test_shared_memory_plan_fits(builds):
    """Benchmark shapes (head dims 8 .. 64, k <= 19) stay within the default 48 KiB; every planned launch within
    the 163 KiB an sm_80 block may opt in to."""
    output = _result(builds, "plan", "no C++ compiler (CXX or c++) to evaluate the shared-memory plan")
    for line in output.split("\n"):
        if not line:
            continue
        head_dim, size, kernel_size, kernel, shared = map(int, line.split())
        assert shared <= 163 * 1024, line
        if head_dim in BENCHMARK_HEAD_DIMS and kernel_size <= 19:
            assert shared <= 48 * 1024, line


def test_binding_compiles_against_this_torch(builds):
    _result(builds, "binding", "no C++ compiler (CXX or c++) for the binding's syntax check")


def test_parser_reads_ptxas_lines():
    """The report format the assertions above rely on."""
    sample = ("ptxas info    : Compiling entry function '_ZN4sasa4cuda12_GLOBAL__N_114forward_kernelINS1_6Bits16ELi16EEEvPKT_'"
              " for 'sm_90'\nptxas info    : Function properties for x\n    0 bytes stack frame, 4 bytes spill stores,"
              " 8 bytes spill loads\nptxas info    : Used 77 registers, used 1 barriers\n")
    assert ptxas_entries(sample) == [{"arch": "sm_90", "kernel": "forward_kernel", "dtype": "fp16/bf16", "head_dim": 16,
                                      "registers": 77, "spill_stores": 4, "spill_loads": 8}]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
