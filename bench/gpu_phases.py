"""The phases of the GPU plan (bench/gpu_plan.py runs them), in the order of their value: the environment and
the device's ceilings, the native CUDA extension's build, validation of the fused kernels against the float64
reference, the bf16 claim and resnet50-layers cases, compute-sanitizer and one ncu profile, the fp32 cases.
The functions under "work done inside the workers" run in the plan's worker processes (``call`` tasks)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

import sasa_impls

from . import measure, pipeline
from .cases import expand, preset
from .env import REPO
from .gpu_plan import Phase, Plan, Step, env_fields, phase_dtype
from .gpu_targets import FUSED
from .schema import CONV, Case, Status

NOT_HERE = ("fvcore", "natten", "asv", "ray")  # optional packages the GPU machine lacks (it has no package index)
# Validation (B, heads, H, W, D, k), fwd+bwd (the forward's output is checked too): the benchmark's head dims
# (C / 8 heads: 8 .. 64) at its k (7; 19 for the claim), partial tiles of every default tile, k > image, an
# exact 7x7 image at k = 7, several heads and batches. Few distinct (D, k): each is a Triton compile.
VALIDATION = [(2, 3, 13, 11, 8, 7), (1, 2, 9, 10, 16, 19), (1, 8, 28, 28, 16, 7), (1, 2, 14, 9, 32, 7),
              (2, 8, 7, 7, 64, 7), (1, 2, 19, 21, 64, 7)]
SMOKE_VALIDATION = [(1, 2, 5, 7, 8, 3), (1, 1, 4, 6, 16, 5)]
VALIDATION_DTYPES = ("bfloat16", "float32", "float16")  # bf16 first: the targets are bf16
# compute-sanitizer's case (native, a 9 x 9 image, D = 16, k = 5) and ncu's (each fused kernel at the
# 28 x 28 x 128 resnet50 layer, bf16, batch 8), both fwd+bwd at level op.
SANITIZER_CASE = Case("native", 5, 32, 2, 9, 1, "float32", "cuda", "fwd+bwd", "op")
PROFILE_CASE = Case("triton", 7, 128, 8, 28, 8, "bfloat16", "cuda", "fwd+bwd", "op")


# --- work done inside the workers (``call`` tasks: picklable arguments, a dict back) --------------------------


def ceilings(device: str, copy_bytes: int, matmul_size: int, dtype: str) -> dict:
    """The device's two ceilings: a device-to-device copy of ``copy_bytes`` (GB/s counting bytes read and
    written) and a ``matmul_size``^3 matrix product in ``dtype`` on random inputs (TFLOP/s), each the
    median of bench.measure's timer (do_bench on CUDA)."""
    settings = measure.TimerSettings(warmup=3, reps=10, min_time_s=0.5 if device.startswith("cuda") else 0.05)
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy = measure.time_call(lambda: target.copy_(source), device, settings)
    matmul_gflops = measure.matmul_gflops(matmul_size, getattr(torch, dtype), device, settings)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    return {"status": Status.OK, "copy_gb_s": 2 * copy_bytes / (copy.median_ms * 1e-3) / 1e9, "copy_bytes": copy_bytes,
            "matmul_tflop_s": matmul_gflops / 1e3, "matmul_size": matmul_size, "matmul_dtype": dtype,
            "device_name": name, "timer": copy.timer}


def build_native(device: str) -> dict:
    """Build (or load from torch's cache) the native extension for ``device``; how long it took."""
    from sasa_impls.impls import _native_build

    start = time.perf_counter()
    if device.startswith("cuda"):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ".".join(map(str, torch.cuda.get_device_capability(device))))
        _native_build.cuda_extension()
    else:
        _native_build.cpu_extension()
    return {"status": Status.OK, "build_s": time.perf_counter() - start}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def repeated_backward(impl: str, device: str, dtype: str, shape: list[int], kernel_size: int) -> dict:
    """Whether two fwd+bwd evaluations of ``impl`` on the same random inputs give the same bits (output and
    every gradient): deterministic kernels (no atomics) must."""
    subject = pipeline.op_subject(impl, shape, kernel_size, dtype, device, "fwd+bwd")
    first, second = pipeline.evaluate(subject), pipeline.evaluate(subject)
    differ = [name for name in first if not _same_bits(first[name], second[name])]
    return {"status": Status.INCORRECT if differ else Status.OK,
            "error": f"repeated fwd+bwd differs in {', '.join(differ)}" if differ else None}

# --- the phases ---------------------------------------------------------------------------------------------------


def _tools() -> dict:
    """Paths of the GPU tools the plan uses (None where missing)."""
    found = {}
    for tool in ("nvcc", "ncu", "compute-sanitizer"):
        path = shutil.which(tool)
        for folder in ("/usr/local/cuda/bin", *sorted(map(str, Path("/opt/nvidia").glob("nsight-compute/*")))):
            if path is None and os.access(os.path.join(folder, tool), os.X_OK):
                path = os.path.join(folder, tool)
        found[tool] = path
    return found


def environment_steps(plan: Plan) -> list[Step]:
    def environment_record() -> dict:
        missing = [name for name in NOT_HERE if importlib.util.find_spec(name) is None]
        for name in missing:
            print(f"  {name} is not installed: {MISSING_MEANS[name]}", flush=True)
        return {"check": "environment", "status": Status.OK, "environment": env_fields(), "tools": _tools(),
                "missing": missing, "impls": plan.impls}

    def ceiling_record() -> dict:
        copy_bytes, size = (8 * 2**20, 256) if plan.smoke else (2 * 2**30, 8192)
        dtype = "float32" if plan.smoke else "bfloat16"
        result = plan.call("plan", "bench.gpu_phases:ceilings", 300, device=plan.device, copy_bytes=copy_bytes,
                           matmul_size=size, dtype=dtype)
        if result["status"] == Status.OK:
            print(f"  ceilings: copy {result['copy_gb_s']:.0f} GB/s, {dtype} matmul {result['matmul_tflop_s']:.3g} TFLOP/s",
                  flush=True)
        return {"check": "ceilings", **result}

    return [Step("environment, tools, missing packages", 1.0, environment_record),
            Step("device-to-device copy and bf16 matmul", plan.worker_cost("plan") + plan.costs.ceilings, ceiling_record)]


MISSING_MEANS = {
    "fvcore": "rows get no flops_fvcore (their fvcore_error then says 'could not trace'; macs_analytic is unaffected)",
    "natten": "the natten peer is skipped (carry it: scripts/carry_natten.sh)",
    "asv": "not used by the plan",
    "ray": "not used by the plan (cases run in local workers)",
}


def build_steps(plan: Plan) -> list[Step]:
    from sasa_impls.impls import _native_build

    if "native" not in plan.impls:
        print(f"  native: {_native_build.native_available(torch.device(plan.device), torch.float32)[1]}", flush=True)
        return []

    def build() -> dict:
        result = plan.call("native", "bench.gpu_phases:build_native", 900, device=plan.device)
        if result["status"] != Status.OK:
            plan.impls.remove("native")
            print(f"  native build: {result['status']}: {result.get('error')}; native is left out", flush=True)
        else:
            print(f"  native build: {result['build_s']:.1f} s", flush=True)
        return {"check": "build", **result}

    def left_out() -> None:
        plan.impls.remove("native")
        print("  native: not built within the budget; left out", flush=True)

    return [Step("native CPU extension" if plan.smoke else "native extension (nvcc sm_90 + binding)",
                 plan.worker_cost("native") + plan.costs.build, build, left_out)]


def validation_steps(plan: Plan) -> list[Step]:
    shapes = SMOKE_VALIDATION if plan.smoke else VALIDATION
    dtypes = ("float16", "float32") if plan.smoke else VALIDATION_DTYPES
    steps = []
    for dtype in dtypes:
        for impl in (name for name in FUSED if name in plan.impls):
            if not (plan.dry_run or sasa_impls.get_impl(impl).available(plan.device, getattr(torch, dtype))[0]):
                continue
            for relative in (True, False) if dtype == dtypes[0] else (True,):  # content-only: bf16 (measured so)
                compile_s = sum(plan.compile_cost(impl, dtype, s[4], s[5], relative, "fwd+bwd") for s in shapes)
                estimate = plan.worker_cost(impl) + plan.costs.validation_shape * len(shapes) + compile_s
                steps.append(Step(f"{impl} {dtype} fwd+bwd relative={relative}", estimate,
                                  _gate_step(plan, impl, dtype, relative, shapes)))
            shape = list(shapes[0][:5])
            steps.append(Step(f"{impl} {dtype} repeated backward", plan.costs.validation_shape,
                              _determinism_step(plan, impl, dtype, shape, shapes[0][5])))
    return steps


def _gate_step(plan: Plan, impl: str, dtype: str, relative: bool, shapes: list) -> Callable[[], dict]:
    def run() -> dict:
        gate = dict(impl=impl, device=plan.device, dtype=dtype, direction="fwd+bwd", relative=relative,
                    shapes=[list(s) for s in shapes], poison=True)
        result = plan.task("gate", plan.settings.timeout_s, gate=gate)
        _report(plan, f"validate {impl} {dtype} fwd+bwd relative={relative}", result)
        return {"check": "validation", "impl": impl, "dtype": dtype, "direction": "fwd+bwd", "relative": relative,
                "shapes": gate["shapes"], **result}
    return run


def _determinism_step(plan: Plan, impl: str, dtype: str, shape: list, kernel_size: int) -> Callable[[], dict]:
    def run() -> dict:
        result = plan.call(impl, "bench.gpu_phases:repeated_backward", plan.settings.timeout_s, impl=impl,
                           device=plan.device, dtype=dtype, shape=shape, kernel_size=kernel_size)
        _report(plan, f"repeated backward {impl} {dtype} bitwise identical", result)
        return {"check": "determinism", "impl": impl, "dtype": dtype, "shape": shape, "k": kernel_size, **result}
    return run


def _report(plan: Plan, what: str, result: dict) -> None:
    ok = result["status"] == Status.OK
    error = f" (max error {result['gate_max_error']:.2g})" if ok and result.get("gate_max_error") is not None else ""
    print(f"  {what}: {'ok' + error if ok else str(result['status']) + ': ' + str(result.get('error'))}", flush=True)
    if not ok:
        plan.failures.append(f"{what}: {result['status']}: {result.get('error')}")


def _smoke_shapes(plan: Plan, directions: tuple[str, ...]) -> dict:
    """--smoke: one tiny shape, one direction per phase (the claim fwd+bwd, resnet50 fwd: both paths run)."""
    return dict(ks=[3], pairs=[(6, 16)], heads=[2], batches=[1], devices=[plan.device], directions=directions)


def claim_cases(dtype: str) -> Callable[[Plan], list[Case]]:
    """SASA2d on the fused kernels and the conv at k = 3..19, C = 128, 28 x 28 (the paper's comparison)."""
    def cases(plan: Plan) -> list[Case]:
        layers = [*[name for name in FUSED if name in plan.impls], CONV]
        if plan.smoke:
            return expand(layers, dtypes=[phase_dtype(plan, dtype)], levels=["layer"], **_smoke_shapes(plan, ("fwd+bwd",)))
        return preset("claim", plan.device, [dtype], layers, levels=["layer"])
    return cases


def resnet_cases(dtype: str) -> Callable[[Plan], list[Case]]:
    """The bare op of every implementation at the resnet50-layers shapes, and the fused kernels content-only
    (NATTEN has no relative logits: the equal-terms comparison)."""
    def cases(plan: Plan) -> list[Case]:
        fused = [name for name in FUSED if name in plan.impls]
        if plan.smoke:
            shapes = _smoke_shapes(plan, ("fwd",))
            return (expand(plan.impls + [CONV], dtypes=[phase_dtype(plan, dtype)], levels=["op"], **shapes)
                    + expand(fused, dtypes=[phase_dtype(plan, dtype)], levels=["op"], relative=["no"], **shapes))
        return (preset("resnet50-layers", plan.device, [dtype], plan.impls + [CONV], levels=["op"])
                + preset("resnet50-layers", plan.device, [dtype], fused, levels=["op"], relative=["no"]))
    return cases


def tool_steps(tool: str) -> Callable[[Plan], list[Step]]:
    """compute-sanitizer (memcheck, racecheck) on one small native case, or ncu on each fused kernel."""
    def steps(plan: Plan) -> list[Step]:
        path = "<" + tool + ">" if plan.dry_run else _tools()["ncu" if tool == "ncu" else "compute-sanitizer"]
        if plan.smoke or not plan.device.startswith("cuda"):
            print(f"  {tool}: needs a CUDA device; skipped", flush=True)
            return []
        if path is None:
            print(f"  {tool}: not found on PATH, /usr/local/cuda/bin or /opt/nvidia/nsight-compute; skipped", flush=True)
            return []
        if tool == "ncu":
            return [Step(f"ncu --clock-control none of {impl} fwd+bwd, bf16 28x28x128 k=7", plan.costs.ncu,
                         lambda impl=impl: _ncu(plan, path, impl)) for impl in FUSED if impl in plan.impls]
        if "native" not in plan.impls:
            return []
        return [Step(f"compute-sanitizer --tool {check} on native fwd+bwd, fp32 9x9 D=16 k=5", plan.costs.sanitizer,
                     lambda check=check: _sanitizer(plan, path, check)) for check in ("memcheck", "racecheck")]
    return steps


def _sanitizer(plan: Plan, path: str, check: str) -> dict:
    """compute-sanitizer's ``check`` over bench.profiling.cuda's program (one fwd+bwd step, after a warm-up)."""
    log = plan.folder / f"sanitizer_{check}.log"
    only_ours = ["--kernel-name", "kns=sasa"] if check == "racecheck" else []  # racecheck of torch's kernels: slow
    program = [sys.executable, "-m", "bench.profiling.cuda", json.dumps(asdict(SANITIZER_CASE))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([path, "--tool", check, *only_ours, "--error-exitcode", "3", *program], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=max(1.0, plan.clock.left()))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as stopped:
        output, code = stopped.stdout or b"", None  # bytes, even with text=True
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
    log.write_text(output)
    last = (output.strip().splitlines() or [""])[-1]
    status = Status.OK if code == 0 else Status.TIMEOUT if code is None else Status.INCORRECT if code == 3 else Status.ERROR
    result = {"status": status, "error": None if code == 0 else "stopped at the budget" if code is None else last,
              "log": log.name}
    _report(plan, f"compute-sanitizer {check}", result)
    return {"check": f"sanitizer-{check}", **result}


def _ncu(plan: Plan, path: str, impl: str) -> dict:
    """Nsight Compute's counters of ``impl``'s fwd+bwd at PROFILE_CASE (`sasa-bench profile --ncu`'s
    bench.profiling.cuda.ncu_metrics), ncu's folder put on PATH where it is not there already."""
    from .profiling.cuda import ncu_metrics

    os.environ["PATH"] = os.pathsep.join([os.path.dirname(path), os.environ.get("PATH", "")])
    case = replace(PROFILE_CASE, impl=impl)
    try:
        counters = ncu_metrics(case, max(1.0, plan.clock.left()))
        result = {"status": Status.ERROR if "note" in counters else Status.OK, "error": counters.get("note"),
                  "counters": counters}
    except subprocess.TimeoutExpired:
        result = {"status": Status.TIMEOUT, "error": "stopped at the budget", "counters": None}
    _report(plan, f"ncu {impl}", result)
    return {"check": "ncu", "impl": impl, "case": asdict(case), **result}


PHASES = [
    Phase("environment", "environment, tools, and the device's ceilings: 2 GiB device-to-device copy, 8192^3 bf16 matmul",
          steps=environment_steps),
    Phase("build", "the native CUDA extension: nvcc for sm_90 and the torch binding", steps=build_steps),
    Phase("validation", "triton and native vs the float64 reference: bf16/fp32/fp16, fwd+bwd (output and five "
                        "gradients), with and without relative logits, outputs poisoned; repeated backward bitwise",
          steps=validation_steps),
    Phase("claim-bf16", "SASA2d (triton, native) at k = 3..19 vs conv, C = 128, 28x28, batch 8, bf16, fwd and fwd+bwd",
          cases=claim_cases("bfloat16")),
    Phase("resnet50-bf16", "the bare op of every implementation at the resnet50-layers shapes, bf16 (fused also "
                           "content-only)", cases=resnet_cases("bfloat16")),
    Phase("sanitizer", "compute-sanitizer memcheck and racecheck on one small native case", steps=tool_steps("sanitizer")),
    Phase("ncu", "Nsight Compute counters of each fused kernel's fwd+bwd (ncu --clock-control none, NVTX range)",
          steps=tool_steps("ncu")),
    Phase("claim-fp32", "the claim cases in fp32", cases=claim_cases("float32")),
    Phase("resnet50-fp32", "the resnet50-layers cases in fp32", cases=resnet_cases("float32")),
]
PHASE_NAMES = [phase.name for phase in PHASES]
