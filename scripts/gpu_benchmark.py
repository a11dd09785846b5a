"""GPU benchmark: validate every fused kernel on the device, then measure the presets through the runner.

One call on a GPU machine does issue 15's measuring, with the suite's own pipeline (nothing here times
anything itself):
1. Validation: ``bench.pipeline.gate`` of each fused implementation available on the device (triton,
   native) at VALIDATION shapes (the benchmark's head dims and k, partial tiles, k > image, D up to 128),
   fp16/bf16/fp32, forward and all five gradients, every output buffer poisoned with NaN first.
2. Measurement: ``bench.runner.run_cases`` (what `sasa-bench run` does: one subprocess per case, the gate,
   rows under <out>/<machine>/gpu_benchmark.jsonl) over the ``resnet50-layers`` and ``claim`` presets,
   bf16 and fp32, fwd and fwd+bwd: level "op" for every implementation (the fused kernels also
   content-only, to compare with NATTEN on equal terms), level "layer" for SASA2d on the fused kernels
   and the cuDNN conv (the paper's comparison).
3. Summary: the issue's targets from those rows (speed-ups over flex and natten, SASA2d k = 19 vs conv
   k = 3, peak memory flat in k, fraction of the GPU's peak).

    python scripts/gpu_benchmark.py --out results          # GPU machine
    python scripts/gpu_benchmark.py --smoke --out /tmp/gb  # CPU: interpreter, tiny shapes (does it run?)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: triton.jit reads it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import sasa_impls  # noqa: E402
from bench import pipeline  # noqa: E402
from bench.cases import expand, preset  # noqa: E402
from bench.report.load import rows_frame  # noqa: E402
from bench.report.metrics import METRICS  # noqa: E402
from bench.runner import Settings, run_cases  # noqa: E402
from bench.schema import CONV, DIRECTIONS  # noqa: E402

FUSED = ("triton", "native")
PEERS = ("flex", "natten", "unfold", "memory_blocks")
# Validation (B, heads, H, W, D, k): the benchmark's head dims (8..64) and k, partial tiles of every default
# tile shape, k > image, D up to 128, k up to 31.
VALIDATION = [(2, 4, 13, 11, 8, 7), (1, 8, 28, 28, 16, 19), (2, 8, 14, 14, 32, 7), (1, 2, 19, 21, 64, 19),
              (1, 2, 14, 9, 64, 5), (1, 2, 10, 12, 128, 31), (1, 2, 7, 7, 8, 3)]
SMOKE_VALIDATION = [(1, 2, 5, 7, 8, 3), (1, 1, 4, 6, 16, 5)]


def validate(device: str, dtypes: list[str], shapes: list) -> list[str]:
    """Each fused implementation available here through the gate at ``shapes``, poisoned; the failures."""
    failures = []
    for impl in (name for name in FUSED if name in sasa_impls.list_impls()):
        for dtype in dtypes:
            if not sasa_impls.get_impl(impl).available(device, getattr(torch, dtype))[0]:
                continue
            for direction in DIRECTIONS:
                for relative in (True, False):
                    verdict = pipeline.gate(impl, device, dtype, direction, relative, shapes=shapes, poison=True)
                    status = "ok" if verdict["status"] == "ok" else verdict["error"]
                    print(f"validate {impl} {device} {dtype} {direction} rel={relative}: {status}", flush=True)
                    if verdict["status"] != "ok":
                        failures.append(f"{impl} {dtype} {direction} rel={relative}: {verdict['error']}")
    return failures


def cases(device: str, dtypes: list[str], smoke: bool) -> list:
    """The measured cases: every implementation at level op (fused kernels also content-only), SASA2d on the
    fused kernels and the conv at level layer, over the resnet50-layers and claim presets."""
    impls = [name for name in FUSED + PEERS if name in sasa_impls.list_impls()]
    fused = [name for name in impls if name in FUSED]
    if smoke:
        shapes = dict(ks=[3], pairs=[(6, 16)], heads=[2], batches=[1], dtypes=dtypes, devices=[device], directions=DIRECTIONS)
        return (expand(impls, levels=["op"], **shapes) + expand(fused, levels=["op"], relative=["no"], **shapes)
                + expand([*fused, CONV], levels=["layer"], **shapes))
    measured = []
    for name in ("resnet50-layers", "claim"):
        measured += preset(name, device, dtypes, impls, levels=["op"])
        measured += preset(name, device, dtypes, fused, levels=["op"], relative=["no"])
        measured += preset(name, device, dtypes, [*fused, CONV], levels=["layer"])
    return measured


def summarize(rows: list[dict]) -> None:
    """The issue's targets, bf16: fused speed-ups over flex and natten, SASA2d k=19 vs conv k=3, memory in k."""
    frame = rows_frame(rows)
    ok = frame[frame.status == "ok"]

    def latency(series: str, **where) -> float | None:
        found = ok[(ok.series == series) & (ok.dtype == "bfloat16")]
        for column, value in where.items():
            found = found[found[column] == value]
        return float(found.latency_ms.min()) if len(found) else None

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b and a == a and b == b else "n/a"  # NaN: nothing measured

    for fused in sorted(set(frame.impl) & set(FUSED)):
        for direction, goal in (("fwd", 2.0), ("fwd+bwd", 1.5)):
            for res, channels in ((56, 64), (28, 128), (14, 256), (7, 512)):
                where = dict(k=7, res=res, channels=channels, direction=direction, level="op")
                versus_flex = ratio(latency("flex", **where), latency(fused, **where))
                versus_natten = ratio(latency("natten (content-only)", **where), latency(f"{fused} (content-only)", **where))
                print(f"target {fused} {direction} >= {goal}x at {res}x{res}x{channels}: vs flex {versus_flex}, vs natten {versus_natten}")
        for direction in DIRECTIONS:
            layer = dict(res=28, channels=128, direction=direction, level="layer")
            print(f"target {fused} {direction} SASA2d k=19 / conv k=3 <= 2: "
                  f"{ratio(latency(fused, k=19, **layer), latency(CONV, k=3, **layer))}")
            memory = ok[(ok.series == fused) & (ok.dtype == "bfloat16") & (ok.level == "op") & (ok.direction == direction) & (ok.res == 28)]
            peaks = {k: memory[memory.k == k].peak_mem_bytes.max() for k in (3, 19)}
            print(f"target {fused} {direction} op peak memory k=19 / k=3 <= 1.3: {ratio(peaks[19], peaks[3])}")
    fractions = [METRICS["peak_fraction"].of(row) for row in ok.to_dict("records") if row["impl"] in FUSED]
    fractions = [f for f in fractions if f is not None]
    if fractions:
        print(f"fused kernels: {min(fractions):.1f} .. {max(fractions):.1f} % of the GPU's peak FLOP/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (rows go to <out>/<machine>/gpu_benchmark.jsonl)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks the script runs")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: only --smoke runs on a CPU")
    device, dtypes = ("cpu", ["float32"]) if args.smoke else ("cuda", ["bfloat16", "float32"])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 everywhere
    failures = validate(device, ["float32", "float16"] if args.smoke else ["float16", "bfloat16", "float32"],
                        SMOKE_VALIDATION if args.smoke else VALIDATION)
    settings = Settings(warmup=0, reps=1, min_time_s=0.0, max_time_s=0.1) if args.smoke else Settings(warmup=5, reps=20)
    rows = run_cases(cases(device, dtypes, args.smoke), args.out, name="gpu_benchmark", settings=settings)
    summarize(rows)
    for failure in failures:
        print(f"VALIDATION FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
