"""`sasa-bench models`: ResNet-26/38/50 in the three variants: params, MACs, FLOPs, throughput, memory.

Costs are analytic at 224x224 (bench/model_costs.py). Timing builds each model on the device and, per
implementation, checks its logits against the reference implementation on a small input, then times
inference (eval mode, no grad) and a training step (forward, cross-entropy, backward, SGD step) with
bench.measure. CPU timing defaults to a small input (64x64, batch 2), since all nine models at 224
take very long on a few CPU cores; the output states what was timed.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import sasa_impls
from sasa_impls.registry import auto_candidates
from bench.cli import UsageError, comma_choices, parse_device
from bench.measure import peak_memory_bytes, time_fn
from bench.model_costs import model_costs
from sasa_impls.models import BLOCKS, VARIANTS, resnet, set_impl

COST_RES = 224
CHECK_RES = 32
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# largest |impl - reference| / max|reference| of the logits accepted before timing
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
# (resolution, batch) timed by default, per device type
TIMING_DEFAULTS = {"cuda": (224, 32), "cpu": (64, 2)}
CONV_IMPL = "conv"  # the conv variant has no attention layer: one timing row, named like the conv baseline


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="ResNet-26/38/50 (conv, conv stem + attention, full attention): params, FLOPs, throughput, memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--depths", default=",".join(map(str, BLOCKS)), help="comma list of 26, 38, 50 (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--impls", default=None, help="comma list of implementations to time (default: every masked-border "
                        "implementation with relative logits that the registry ranks for the device)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--res", type=int, default=None, help="timing resolution (default: 224 on cuda, 64 on cpu)")
    parser.add_argument("--batch", type=int, default=None, help="timing batch (default: 32 on cuda, 2 on cpu)")
    parser.add_argument("--no-timing", action="store_true", help="costs only (params, MACs, FLOPs)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of Markdown")
    parser.set_defaults(run=run)


def _positive(value, option: str, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise UsageError(f"{option}: expected a positive int, got {value}")
    return value


def check_logits(model: torch.nn.Module, impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """'' when ``impl`` gives the reference implementation's logits on a small input, else why not."""
    x = torch.randn(1, 3, CHECK_RES, CHECK_RES, device=device, dtype=dtype)
    model.eval()
    with torch.no_grad():
        expected = set_impl(model, "reference")(x).double()
        got = set_impl(model, impl)(x).double()
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    if not error <= CHECK_TOLERANCE[dtype]:
        return f"logits differ from the reference: max relative error {error:.3g}"
    return ""


def time_model(model: torch.nn.Module, impl: str, device: torch.device, dtype: torch.dtype, res: int, batch: int) -> dict:
    """Inference and training-step throughput and peak memory of ``model`` backed by ``impl``."""
    row = {"impl": impl, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "res": res, "batch": batch, "status": "ok", "error": ""}
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    labels = torch.randint(model.fc.out_features, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def infer() -> None:
        with torch.no_grad():
            model(x)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    try:
        if impl != CONV_IMPL:
            row["error"] = check_logits(model, impl, device, dtype)
            if row["error"]:
                row["status"] = "incorrect"
                return row
        for mode, fn, train in (("infer", infer, False), ("train", train_step, True)):
            model.train(train)
            row[f"{mode}_peak_mem_bytes"] = peak_memory_bytes(fn, device)  # first: nothing cached yet
            timing = time_fn(fn, device)
            row[f"{mode}_images_per_s"] = batch * 1000.0 / timing.median_ms
            row[f"{mode}_latency_ms"] = timing.median_ms
    except torch.OutOfMemoryError as error:
        row.update(status="oom", error=str(error).splitlines()[0])
    except (RuntimeError, ValueError) as error:  # e.g. batch norm given one value per channel in training
        row.update(status="error", error=str(error).splitlines()[0])
    finally:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _settings(args) -> dict:
    device = torch.device(parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtype = DTYPES[args.dtype]
    default_res, default_batch = TIMING_DEFAULTS[device.type]
    impls = ([impl.name for impl in auto_candidates(device, dtype)] if args.impls is None
             else comma_choices("impls", args.impls, sasa_impls.list_impls()))
    for name in impls:
        ok, reason = sasa_impls.get_impl(name).available(device, dtype)
        if not ok:
            raise UsageError(f"--impls: {name!r} is not available on {device} for {args.dtype}: {reason}")
    return {
        "depths": comma_choices("depths", args.depths, tuple(BLOCKS)),
        "variants": comma_choices("variants", args.variants, tuple(VARIANTS)),
        "impls": impls,
        "device": device,
        "dtype": dtype,
        "res": _positive(args.res, "--res", default_res),
        "batch": _positive(args.batch, "--batch", default_batch),
    }


def collect(settings: dict, timing: bool) -> list[dict]:
    """One row per model (costs only) or per model and implementation (costs and timing)."""
    rows = []
    for depth in settings["depths"]:
        for variant in settings["variants"]:
            with torch.device("meta"):
                costs = {"model": f"ResNet-{depth}", "depth": depth, "variant": variant, **model_costs(resnet(depth, variant), COST_RES)}
            if not timing:
                rows.append(costs)
                continue
            model = resnet(depth, variant).to(settings["device"], settings["dtype"])
            impls = [CONV_IMPL] if variant == "conv" else settings["impls"]
            for impl in impls:
                rows.append({**costs, **time_model(model, impl, settings["device"], settings["dtype"], settings["res"], settings["batch"])})
            del model
    return rows


def _num(value, scale: float, digits: int) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def markdown(rows: list[dict], settings: dict, timing: bool) -> str:
    """A costs table (one line per model) and, when timed, a throughput/memory table."""
    lines = [
        f"Costs of one {COST_RES}x{COST_RES} image. MACs count the relative logits per key (the paper's tables) "
        "or factorized (k d per pixel); FLOPs (paper) = 2 x MACs per key.",
        "",
        "| model | variant | params (M) | MACs (G, rel. per key) | FLOPs paper (G) | MACs (G, rel. factorized) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    seen = set()
    for row in rows:
        if (row["depth"], row["variant"]) in seen:
            continue
        seen.add((row["depth"], row["variant"]))
        lines.append(
            f"| {row['model']} | {row['variant']} | {_num(row['params'], 1e6, 1)} | {_num(row['macs'], 1e9, 2)} "
            f"| {_num(row['flops_paper'], 1e9, 1)} | {_num(row['macs_rel_factorized'], 1e9, 2)} |"
        )
    if timing:
        dtype = str(settings["dtype"]).replace("torch.", "")
        lines += [
            "",
            f"Timing on {settings['device']}, {dtype}, batch {settings['batch']}, {settings['res']}x{settings['res']} input "
            "(median; train = forward + cross-entropy + backward + SGD step; peak memory = what one call needs "
            "above the weights and inputs: CUDA allocator peak, or peak RSS growth on CPU).",
            "",
            "| model | variant | impl | status | infer img/s | infer peak MiB | train img/s | train peak MiB |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['model']} | {row['variant']} | {row['impl']} | {row['status']} "
                f"| {_num(row.get('infer_images_per_s'), 1, 1)} | {_num(row.get('infer_peak_mem_bytes'), 2**20, 0)} "
                f"| {_num(row.get('train_images_per_s'), 1, 1)} | {_num(row.get('train_peak_mem_bytes'), 2**20, 0)} |"
            )
        errors = [f"- {row['model']} {row['variant']} {row['impl']}: {row['status']}: {row['error']}" for row in rows if row["error"]]
        lines += [""] + errors if errors else []
    return "\n".join(lines)


def run(args) -> int:
    settings = _settings(args)
    timing = not args.no_timing
    rows = collect(settings, timing)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, settings, timing))
    failed = [row for row in rows if row.get("status") in ("incorrect", "error")]
    return 1 if failed else 0
