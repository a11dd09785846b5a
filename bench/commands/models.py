"""`sasa-bench models`: ResNet-26/38/50 in the three variants: params, MACs, FLOPs, throughput, memory.

Costs are analytic at 224x224 (bench/model_costs.py), printed beside the paper's Table 1 (bench/paper.py)
with the difference and, where a figure differs from the paper's, the reason. Timing builds each model on
the device and, per implementation, checks its logits against a float64 copy on the reference implementation
on a small input, then times inference (eval mode, no grad) and a training step (forward and the gradients of
every parameter, train mode) through the measuring pipeline (bench.pipeline, bench.measure). CPU timing defaults to a small input (64x64, batch 2), since all nine
models at 224 take very long on a few CPU cores; the output states what was timed.
"""
from __future__ import annotations

import argparse
import json

import torch

import sasa_impls
from sasa_impls.registry import auto_candidates
from bench import measure, pipeline
from bench.cli import UsageError, comma_choices, parse_device
from bench.model_costs import model_costs
from bench.report.tables import markdown as table_markdown
from bench.schema import CONV
from bench.worker import failure_status, message
from bench.paper import GFLOPS_TOLERANCE, PARAMS_TOLERANCE_M, compare
from sasa_impls.models import BLOCKS, VARIANTS, resnet, set_impl

COST_RES = 224
CHECK_RES = 32
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (resolution, batch) timed by default, per device type
TIMING_DEFAULTS = {"cuda": (224, 32), "cpu": (64, 2)}


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


def time_model(model: torch.nn.Module, impl: str, device: torch.device, dtype: torch.dtype, res: int, batch: int) -> dict:
    """Inference and training-step throughput and peak memory of ``model`` backed by ``impl``, measured by
    the suite's pipeline: its logits are checked first against a float64 copy of the model on the reference
    implementation (bench.pipeline's tolerance for the dtype); "infer" is the forward without autograd in
    eval mode, "train" the forward and the gradients of every parameter (and the input) in train mode."""
    dtype_name = str(dtype).replace("torch.", "")
    row = {"impl": impl, "device": str(device), "dtype": dtype_name, "res": res, "batch": batch, "status": "ok", "error": ""}
    try:
        if impl != CONV:
            set_impl(model, impl).eval()
            check = pipeline.module_subject(model, torch.randn(1, 3, CHECK_RES, CHECK_RES, device=device, dtype=dtype), "fwd")
            error = pipeline.errors_against_reference(check)["output"]
            if not error <= pipeline.TOLERANCE[dtype_name]:
                row.update(status="incorrect", error=f"logits differ from the reference: normalized error {error:.3g}")
                return row
        x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
        for mode, direction in (("infer", "fwd"), ("train", "fwd+bwd")):
            model.train(direction == "fwd+bwd")
            fn = pipeline.step(pipeline.module_subject(model, x, direction))
            fn()  # one call first: lazy initialisation and compilation stay out of the measurements
            row[f"{mode}_peak_mem_bytes"] = measure.peak_memory_bytes(fn, device)
            timing = measure.time_call(fn, device, measure.TimerSettings())
            row[f"{mode}_images_per_s"] = batch * 1000.0 / timing.median_ms
            row[f"{mode}_latency_ms"] = timing.median_ms
    except Exception as error:  # the row says what happened (oom, error) and the other models are still timed
        row.update(status=str(failure_status(error)), error=message(error))
    finally:
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
            costs = model_row(depth, variant)
            if not timing:
                rows.append(costs)
                continue
            model = resnet(depth, variant).to(settings["device"], settings["dtype"])
            impls = [CONV] if variant == "conv" else settings["impls"]
            for impl in impls:
                rows.append({**costs, **time_model(model, impl, settings["device"], settings["dtype"], settings["res"], settings["batch"])})
            del model
    return rows


def model_row(depth: int, variant: str) -> dict:
    """The analytic costs of one model at COST_RES (built on the meta device) beside the paper's Table 1."""
    with torch.device("meta"):
        costs = model_costs(resnet(depth, variant), COST_RES)
    paper = compare(depth, variant, costs["params"], costs["flops_paper"])
    return {"model": f"ResNet-{depth}", "depth": depth, "variant": variant, **costs, **paper.fields()}


def _num(value, scale: float, digits: int) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def _signed(value: float) -> str:
    """+0.04, -0.07; a difference that rounds to zero reads +0.00, never -0.00."""
    return f"{round(value, 2) + 0.0:+.2f}"


def costs_markdown(rows: list[dict]) -> list[str]:
    """The costs table, one line per model, the paper's Table 1 figures beside the suite's."""
    headers = ["model", "variant", "params (M)", "paper (M)", "Δ params (M)", "FLOPs (G)", "paper (G)", "Δ FLOPs (G)",
               "MACs (G, rel. factorized)", "paper top-1 (%)", "note"]
    cells, seen = [], set()
    for row in rows:
        if (row["depth"], row["variant"]) in seen:
            continue
        seen.add((row["depth"], row["variant"]))
        cells.append([row["model"], row["variant"], _num(row["params"], 1e6, 2), f"{row['paper_params_m']:.1f}",
                      _signed(row["params_diff_m"]), _num(row["flops_paper"], 1e9, 2), f"{row['paper_gflops']:.1f}",
                      _signed(row["gflops_diff"]), _num(row["macs_rel_factorized"], 1e9, 2), f"{row['paper_top1']:.1f}",
                      row["note"]])
    return [
        f"Costs of one {COST_RES}x{COST_RES} image beside the paper's Table 1 (bench/paper.py). FLOPs = 2 x MACs with "
        "the relative logits added to every key (the paper's convention); MACs (factorized) count them once per "
        f"offset (k d per pixel). Δ = suite - paper; tolerance {PARAMS_TOLERANCE_M} M parameters and "
        f"{GFLOPS_TOLERANCE} GFLOPs. A note says why a figure, rounded like the paper's, differs from it.",
        "",
        table_markdown(headers, cells),
    ]


def markdown(rows: list[dict], settings: dict, timing: bool) -> str:
    """A costs table (one line per model) and, when timed, a throughput/memory table."""
    lines = costs_markdown(rows)
    if timing:
        dtype = str(settings["dtype"]).replace("torch.", "")
        headers = ["model", "variant", "impl", "status", "infer img/s", "infer peak MiB", "train img/s", "train peak MiB"]
        cells = [[row["model"], row["variant"], row["impl"], row["status"], _num(row.get("infer_images_per_s"), 1, 1),
                  _num(row.get("infer_peak_mem_bytes"), 2**20, 0), _num(row.get("train_images_per_s"), 1, 1),
                  _num(row.get("train_peak_mem_bytes"), 2**20, 0)] for row in rows]
        lines += [
            "",
            f"Timing on {settings['device']}, {dtype}, batch {settings['batch']}, {settings['res']}x{settings['res']} input "
            "(median; train = forward and the gradients of every parameter, in train mode; peak memory = what one call needs "
            "above the weights and inputs: CUDA allocator peak, or peak RSS growth on CPU).",
            "",
            table_markdown(headers, cells),
        ]
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
