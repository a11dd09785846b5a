"""GPU benchmark of the fused Triton kernel (issue 6): validate it on the device, then time it against its peers.

1. Validation: triton against the float64 reference on the device, every dtype, forward and all five
   gradients, random inputs, every output buffer filled with NaN before each launch (an element the
   kernel forgets to write shows up). Peers pass bench.worker.gate (the runner's gate) before timing.
2. Measurement, in one run, at the ``resnet50-layers`` and ``claim`` presets (bench.cases), bf16 and fp32,
   fwd and fwd+bwd. Level "op" (q, k, v given): triton, flex, unfold, memory_blocks with relative
   logits; natten and triton content-only at the same k. Level "layer": SASA2d(impl="triton") and the
   cuDNN conv k=3 (the paper's comparison). Rows (bench.store) go to <out>/<machine>/gpu_benchmark.jsonl
   with peak memory and the fraction of the H100 SXM roofline achieved; a summary checks the targets.

    python scripts/gpu_benchmark.py --out results          # GPU machine
    python scripts/gpu_benchmark.py --smoke --out /tmp/gb  # CPU: interpreter, tiny shapes (does it run?)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: triton.jit reads it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import sasa_impls  # noqa: E402
from bench import flops, measure, store, worker  # noqa: E402
from bench.cases import CONV, PRESETS, Case, analytic_costs, rel_accounting  # noqa: E402
from bench.env import environment, machine_id  # noqa: E402
from sasa_impls.impls.reference import reference_attention  # noqa: E402

# H100 SXM: dense bf16/fp16 tensor cores, fp32 without tensor cores (TF32 is switched off below), HBM3.
PEAK_FLOP_S = {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}
PEAK_BYTES_S = 3.35e12
# Least traffic, in (B, C, H, W) tensors: op fwd reads q, k, v and writes out; its backward reads q, k, v,
# out, dout and writes three gradients. A layer at best reads x and writes y (fwd), then reads x, dy, writes dx.
MIN_TENSORS = {("op", "fwd"): 4, ("op", "fwd+bwd"): 12, ("layer", "fwd"): 2, ("layer", "fwd+bwd"): 5}
# (impl, level, relative logits) measured at every shape; conv runs at k = 3 only.
ENTRIES = [("triton", "op", True), ("flex", "op", True), ("unfold", "op", True), ("memory_blocks", "op", True),
           ("triton", "op", False), ("natten", "op", False), ("triton", "layer", True), (CONV, "layer", False)]
# Validation (B, heads, H, W, D, k, rel): the benchmark's head dims (8..64) and k, partial tiles of both
# default tile shapes, k > image, D up to 128, k up to 31.
VALIDATION = [(2, 4, 13, 11, 8, 7, True), (1, 8, 28, 28, 16, 19, True), (2, 8, 14, 14, 32, 7, True),
              (1, 2, 19, 21, 64, 19, True), (1, 2, 14, 9, 64, 5, False), (1, 2, 10, 12, 128, 31, True),
              (1, 2, 7, 7, 8, 3, True)]
SMOKE_VALIDATION = [(1, 2, 5, 7, 8, 3, True), (1, 1, 4, 6, 16, 5, False)]


def random_qkv(batch, heads, res_h, res_w, head_dim, k, with_rel, dtype, device, grad=False) -> list:
    shapes = [(batch, heads, res_h, res_w, head_dim)] * 3
    shapes += [(heads, k, head_dim // 2), (heads, k, head_dim - head_dim // 2)] if with_rel else []
    tensors = [torch.randn(s, dtype=dtype, device=device).requires_grad_(grad) for s in shapes]
    return tensors if with_rel else tensors + [None, None]


def validate_triton(device: str, dtypes: list[str], shapes: list) -> dict[str, str | None]:
    """Per dtype: None when every output and gradient matched the reference, else what differed."""
    from sasa_impls.impls import _triton_kernels

    failures: dict[str, str | None] = {}
    _triton_kernels.POISON_OUTPUTS = True
    try:
        for dtype in dtypes:
            failures[dtype] = None
            for batch, heads, h, w, d, k, rel in shapes:
                inputs = random_qkv(batch, heads, h, w, d, k, rel, getattr(torch, dtype), device, grad=True)
                exact = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
                out = sasa_impls.local_attention(*inputs, k, impl="triton")
                ref = reference_attention(*exact, k)
                cot = torch.randn_like(ref)
                leaves = [i for i, t in enumerate(inputs) if t is not None]
                got = torch.autograd.grad(out, [inputs[i] for i in leaves], cot.to(out.dtype))
                want = torch.autograd.grad(ref, [exact[i] for i in leaves], cot)
                errors = [worker.normalized_error(out, ref)] + [worker.normalized_error(g, x) for g, x in zip(got, want)]
                if not max(errors) <= worker.GATE_TOLERANCE[dtype]:  # NaN fails too
                    failures[dtype] = f"B{batch} h{heads} {h}x{w} D{d} k{k} rel={rel}: errors {errors}"
                    break
            print(f"validate triton {device} {dtype}: {failures[dtype] or 'ok'}", flush=True)
    finally:
        _triton_kernels.POISON_OUTPUTS = False
    return failures


def op_step(impl: str, rel: bool, case: Case):
    """One call of the bare op (fwd, or fwd and the gradients of all its inputs) on random inputs."""
    inputs = random_qkv(case.batch, case.heads, case.res, case.res, case.channels // case.heads, case.k, rel,
                        getattr(torch, case.dtype), case.device, grad=case.direction == "fwd+bwd")
    if case.direction == "fwd":
        def forward():
            with torch.no_grad():
                return sasa_impls.local_attention(*inputs, case.k, impl=impl)
        return forward
    leaves = [t for t in inputs if t is not None]
    cotangent = torch.randn_like(inputs[0])
    return lambda: torch.autograd.grad(sasa_impls.local_attention(*inputs, case.k, impl=impl), leaves, cotangent)


def costs(level: str, rel: bool, case: Case) -> dict:
    """Analytic MACs (bench.cases conventions) and, on CUDA, the roofline time of the case on an H100 SXM."""
    if level == "layer":
        fields = analytic_costs(case)
    else:  # the op alone: no projections
        per_pixel = flops.attention_macs_per_pixel(case.channels, case.channels, case.k)
        accounting = rel_accounting(case.impl) if rel else "content_only"
        op = flops.attention_total_macs(per_pixel, accounting) - per_pixel["projections"]
        pixels = case.batch * case.res * case.res
        fields = {"macs_analytic": op * pixels, "rel_accounting": accounting,
                  "macs_components": {n: per_pixel[n] * pixels for n in ("qk", "av", "rel_per_key", "rel_factorized")}}
    if case.device != "cuda":
        return {**fields, "roofline_ms": None, "roofline_bound": None, "roofline_peaks": None}
    flop = 2 * fields["macs_analytic"] * (1 if case.direction == "fwd" else 3)
    nbytes = MIN_TENSORS[level, case.direction] * case.batch * case.channels * case.res**2 * getattr(torch, case.dtype).itemsize
    compute_s, memory_s = flop / PEAK_FLOP_S.get(case.dtype, float("nan")), nbytes / PEAK_BYTES_S
    return {**fields, "roofline_ms": 1e3 * max(compute_s, memory_s),
            "roofline_bound": "compute" if compute_s >= memory_s else "memory", "roofline_peaks": "H100 SXM"}


def measure_entry(impl, level, rel, case, gates, failures, settings) -> dict:
    """Status, latency and peak memory of one (impl, level, rel) at one case: gated first."""
    if impl != CONV:
        if impl not in sasa_impls.list_impls():
            return {"status": "unsupported", "error": f"{impl} is not registered here"}
        ok, reason = sasa_impls.get_impl(impl).available(case.device, getattr(torch, case.dtype))
        if not ok:
            return {"status": "unsupported", "error": reason}
        if impl == "triton" and failures.get(case.dtype):
            return {"status": "incorrect", "error": failures[case.dtype]}
    try:
        key = (impl, case.dtype, case.direction)
        if impl != CONV and key not in gates:
            gates[key] = worker.gate(impl, case.device, case.dtype, case.direction)
        if impl != CONV and gates[key]["status"] != "ok":
            return {"status": gates[key]["status"], "error": gates[key]["error"]}
        if level == "layer":
            module, x = worker.build(case)
            fn = worker.step(case, module, x)
        else:
            fn = op_step(impl, rel, case)
        timing = measure.time_fn(fn, case.device, **settings)
        peak = measure.peak_memory_bytes(fn, case.device)
    except Exception as error:  # OOM, a missing backward, a compile failure: the row says so, the run goes on
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"status": worker.failure_status(error), "error": f"{type(error).__name__}: {error}"[:500]}
    return {"status": "ok", "error": None, "latency_ms": timing.median_ms, "latency_iqr_ms": timing.iqr_ms,
            "reps": timing.reps, "peak_mem_bytes": peak}


def result_row(impl, level, rel, case, preset, gates, failures, settings, env, run_id) -> dict:
    """One JSONL row: the case, the environment, analytic costs, the measurement, the roofline fraction."""
    borders = sasa_impls.get_impl(impl).borders if impl in sasa_impls.list_impls() else None
    row = {**env, **asdict(case), "level": level, "rel": rel, "suite": preset, "run_id": run_id, "machine": machine_id(),
           "borders": borders, "params": None, "flops_fvcore": None, "fvcore_uncounted": None, "latency_ms": None,
           "latency_iqr_ms": None, "reps": None, "peak_mem_bytes": None, **costs(level, rel, case),
           **measure_entry(impl, level, rel, case, gates, failures, settings),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    row["roofline_fraction"] = row["roofline_ms"] / row["latency_ms"] if row["roofline_ms"] and row["latency_ms"] else None
    return row


def shapes_of(preset: str, smoke: bool) -> list[tuple[int, int, int, int]]:
    """(k, res, channels, heads) of a preset (bench.cases.PRESETS), or a tiny stand-in in smoke mode."""
    if smoke:
        return [(3, 6, 16, 2)]
    shapes = PRESETS[preset]
    pairs = shapes.pairs or [(r, c) for c in shapes.channels for r in shapes.res]
    return [(k, r, c, shapes.heads) for k in shapes.ks for r, c in pairs]


def summarize(rows: list[dict]) -> None:
    """Print the issue's targets, bf16: speed-ups over flex and natten, SASA2d k=19 vs conv k=3, memory in k."""
    def find(field, impl, level, rel, **where):
        found = [r[field] for r in rows if (r["impl"], r["level"], r["rel"]) == (impl, level, rel)
                 and r["status"] == "ok" and all(r[k] == v for k, v in where.items())]
        return found[0] if found else None

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    for direction, goal in (("fwd", 2.0), ("fwd+bwd", 1.5)):
        for k, res, channels, _ in shapes_of("resnet50-layers", smoke=False):
            where = dict(k=k, res=res, channels=channels, dtype="bfloat16", direction=direction)
            flex = ratio(find("latency_ms", "flex", "op", True, **where), find("latency_ms", "triton", "op", True, **where))
            natten = ratio(find("latency_ms", "natten", "op", False, **where), find("latency_ms", "triton", "op", False, **where))
            print(f"target {direction} speed-up >= {goal}x at {res}x{res}x{channels}: vs flex {flex}, vs natten {natten}")
    for direction in ("fwd", "fwd+bwd"):
        where = dict(res=28, channels=128, dtype="bfloat16", direction=direction)
        sasa = find("latency_ms", "triton", "layer", True, k=19, **where)
        conv = find("latency_ms", CONV, "layer", False, k=3, **where)
        print(f"target {direction} SASA2d k=19 / conv k=3 <= 2: {ratio(sasa, conv)}")
        mem = [find("peak_mem_bytes", "triton", "op", True, k=k, **where) for k in (19, 3)]
        print(f"target {direction} op peak memory k=19 / k=3 <= 1.3: {ratio(*mem)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (rows go to <out>/<machine>/gpu_benchmark.jsonl)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks the script runs")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: only --smoke runs on a CPU")
    device, dtypes = ("cpu", ["float32"]) if args.smoke else ("cuda", ["bfloat16", "float32"])
    batch = 1 if args.smoke else 8
    settings = dict(warmup=0, reps=1, min_time_s=0.0) if args.smoke else dict(warmup=5, reps=20, min_time_s=0.5)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 everywhere
    torch.manual_seed(0)

    failures = validate_triton(device, ["float32", "float16"] if args.smoke else ["float16", "bfloat16", "float32"],
                               SMOKE_VALIDATION if args.smoke else VALIDATION)
    env, path = environment(), Path(args.out) / machine_id() / "gpu_benchmark.jsonl"
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    rows, gates = [], {}
    for preset in ("resnet50-layers", "claim"):
        for dtype, direction, (k, res, channels, heads), (impl, level, rel) in itertools.product(
                dtypes, ("fwd", "fwd+bwd"), shapes_of(preset, args.smoke), ENTRIES):
            if impl == CONV and k != 3:
                continue
            case = Case(impl, k, channels, heads, res, batch, dtype, device, direction)
            row = result_row(impl, level, rel, case, preset, gates, failures, settings, env, run_id)
            store.append_row(path, row)
            rows.append(row)
            print(f"{preset} {impl}/{level}{'/rel' if rel else ''} k={k} {res}x{res}x{channels} {dtype} {direction}: "
                  f"{row['status']} {row['latency_ms'] or ''} {row['error'] or ''}", flush=True)
    summarize(rows)
    print(f"{len(rows)} rows -> {path}")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
