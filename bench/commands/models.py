"""`sasa-bench models`: ResNet-26/38/50 in the three variants: params, MACs, FLOPs, throughput, memory.

Costs are analytic at 224x224 (bench/model_costs.py), printed beside the paper's Table 1 (bench/paper.py)
with the difference and, where a figure differs from the paper's, the reason. Timing measures each model and
implementation the way the runner measures a case, each stage in a fresh worker subprocess
(bench.runner.run_isolated, task kind "model"; the model is rebuilt there with the same seed): first its
logits are checked against a float64 copy on the reference implementation on a small input, then the peak
memory of inference and of a training step is measured, then (in another process: no timing after a
memory measurement in the same process) inference (eval mode, no grad) and a training step (forward and
the gradients of every parameter, train mode) are timed by the runner's timer (bench.measure: median,
IQR, whether it met its confidence); ``--repeat N`` times N times, each in a fresh process, and reports
the spread between them. A latency whose IQR is above 10% of its median, that missed its confidence,
whose repeats differ by more than that, or that was timed while other processes loaded the machine
(bench.contention: contended), is marked (noisy). CPU timing defaults to a small input (64x64,
batch 2), since all nine models at 224 take very long on a few CPU cores; the output states what was timed.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import sasa_impls
from sasa_impls.registry import auto_candidates
from bench import measure, pipeline
from bench.cli import UsageError, comma_choices, parse_device
from bench.model_costs import model_costs
from bench.report.tables import NOISY_MARK, NOISY_SPREAD, markdown as table_markdown
from bench.runner import Settings, run_isolated, worker_task
from bench.schema import CONV, Status
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
    parser.add_argument("--repeat", type=int, default=1, help="time each model N times, each in a fresh process (default 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of Markdown")
    parser.set_defaults(run=run)


def _positive(value, option: str, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise UsageError(f"{option}: expected a positive int, got {value}")
    return value


MODES = (("infer", "fwd"), ("train", "fwd+bwd"))


def _model(task: dict) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
    """The task's model, built with seed 0 (so every stage's process builds the same weights), on ``impl``."""
    device, dtype = torch.device(task["device"]), DTYPES[task["dtype"]]
    torch.manual_seed(0)
    model = resnet(task["depth"], task["variant"]).to(device, dtype)
    return (model if task["impl"] == CONV else set_impl(model, task["impl"])), device, dtype


def model_task(task: dict) -> dict:
    """Worker side of one stage of one model (task kind "model"): ``check`` its logits' normalized error
    against a float64 copy on the reference; ``memory``: the peak memory of one inference and one training
    call; ``time``: their latencies (bench.measure.time_call with the task's timer settings)."""
    model, device, dtype = _model(task)
    if task["stage"] == "check":
        check = pipeline.module_subject(model.eval(), torch.randn(1, 3, CHECK_RES, CHECK_RES, device=device, dtype=dtype), "fwd")
        return {"status": Status.OK, "check_error": pipeline.errors_against_reference(check)["output"]}
    x = torch.randn(task["batch"], 3, task["res"], task["res"], device=device, dtype=dtype)
    fields: dict = {"status": Status.OK}
    for mode, direction in MODES:
        model.train(direction == "fwd+bwd")
        fn = pipeline.step(pipeline.module_subject(model, x, direction))
        fn()  # one call first: lazy initialisation and compilation stay out of the measurements
        if task["stage"] == "memory":
            fields[f"{mode}_peak_mem_bytes"] = measure.peak_memory_bytes(fn, device)
            continue
        timing = measure.time_call(fn, device, measure.TimerSettings(**task["timer"]))
        fields |= {f"{mode}_latency_ms": timing.median_ms, f"{mode}_latency_iqr_ms": timing.iqr_ms,
                   f"{mode}_latency_confident": timing.confident, f"{mode}_contended": timing.contended is True}
    return fields


def time_model(depth: int, variant: str, impl: str, device: torch.device, dtype: torch.dtype, res: int, batch: int,
               settings: Settings = Settings(), repeat: int = 1) -> dict:
    """Inference and training-step throughput and peak memory of ResNet-``depth`` ``variant`` backed by ``impl``,
    each stage in a fresh worker (module docstring): logits checked first (bench.pipeline's tolerance for the
    dtype; an incorrect model is not measured), memory, then ``repeat`` timings; latencies are the median
    over repeats, ``*_repeat_spread`` (max - min) / median of the repeats' latencies."""
    dtype_name = str(dtype).replace("torch.", "")
    row = {"impl": impl, "device": str(device), "dtype": dtype_name, "res": res, "batch": batch, "status": "ok", "error": "",
           "repeats": repeat}
    task = {"depth": depth, "variant": variant, "impl": impl, "device": str(device), "dtype": dtype_name, "res": res,
            "batch": batch, "timer": settings.timer().__dict__}

    def stage(name: str) -> dict:
        return run_isolated(worker_task("model", settings, [], **task, stage=name), settings.timeout_s)

    if impl != CONV:
        checked = stage("check")
        if checked["status"] != Status.OK:
            return row | {"status": str(checked["status"]), "error": checked.get("error")}
        if not checked["check_error"] <= pipeline.TOLERANCE[dtype_name]:
            return row | {"status": "incorrect", "error": f"logits differ from the reference: normalized error {checked['check_error']:.3g}"}
    memory = stage("memory")
    if memory["status"] != Status.OK:
        return row | {"status": str(memory["status"]), "error": memory.get("error")}
    row |= {key: value for key, value in memory.items() if key.endswith("_peak_mem_bytes")}
    timings = []
    for _ in range(repeat):
        timed = stage("time")
        if timed["status"] != Status.OK:
            return row | {"status": str(timed["status"]), "error": timed.get("error")}
        timings.append(timed)
    for mode, _ in MODES:
        latencies = [t[f"{mode}_latency_ms"] for t in timings]
        median, iqr = statistics.median(latencies), statistics.median(t[f"{mode}_latency_iqr_ms"] for t in timings)
        confident, spread = all(t[f"{mode}_latency_confident"] for t in timings), (max(latencies) - min(latencies)) / median
        contended = any(t[f"{mode}_contended"] for t in timings)
        row |= {f"{mode}_latency_ms": median, f"{mode}_images_per_s": batch * 1000.0 / median, f"{mode}_latency_iqr_ms": iqr,
                f"{mode}_latency_confident": confident, f"{mode}_repeat_latencies_ms": latencies,
                f"{mode}_repeat_spread": spread, f"{mode}_contended": contended,
                f"{mode}_noisy": not confident or contended or iqr > NOISY_SPREAD * median or spread > NOISY_SPREAD}
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
        "repeat": _positive(args.repeat, "--repeat", 1),
        "timer": Settings(),
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
            for impl in [CONV] if variant == "conv" else settings["impls"]:
                rows.append({**costs, **time_model(depth, variant, impl, settings["device"], settings["dtype"], settings["res"],
                                                   settings["batch"], settings["timer"], settings["repeat"])})
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
        headers[5:5] = ["infer spread (%)"]
        headers += ["train spread (%)"]
        cells = [[row["model"], row["variant"], row["impl"], row["status"], _throughput(row, "infer"), _spread(row, "infer"),
                  _num(row.get("infer_peak_mem_bytes"), 2**20, 0), _throughput(row, "train"),
                  _num(row.get("train_peak_mem_bytes"), 2**20, 0), _spread(row, "train")] for row in rows]
        lines += [
            "",
            f"Timing on {settings['device']}, {dtype}, batch {settings['batch']}, {settings['res']}x{settings['res']} input "
            f"(median of {settings['repeat']} timing(s), each in a fresh worker process; spread = (max - min) / median "
            "latency of the repeats, or IQR / median of one; train = forward and the gradients of every parameter, in "
            "train mode; peak memory, measured in a process of its own = what one call needs above the weights and inputs: "
            f"CUDA allocator peak, or peak RSS growth on CPU). {NOISY_MARK}: IQR or repeat spread above "
            f"{NOISY_SPREAD:.0%} of the median, the timer missed its confidence, or other processes loaded the machine "
            "while it was timed (contended): measure again before relying on it.",
            "",
            table_markdown(headers, cells),
        ]
        errors = [f"- {row['model']} {row['variant']} {row['impl']}: {row['status']}: {row['error']}" for row in rows if row["error"]]
        lines += [""] + errors if errors else []
    return "\n".join(lines)


def _throughput(row: dict, mode: str) -> str:
    text = _num(row.get(f"{mode}_images_per_s"), 1, 1)
    return f"{text} {NOISY_MARK}" if text and row.get(f"{mode}_noisy") else text


def _spread(row: dict, mode: str) -> str:
    """The repeats' spread (several repeats) or the one timing's IQR, in % of the median latency."""
    latency = row.get(f"{mode}_latency_ms")
    if latency is None:
        return ""
    spread = row[f"{mode}_repeat_spread"] if row.get("repeats", 1) > 1 else row[f"{mode}_latency_iqr_ms"] / latency
    return f"{100 * spread:.0f}"


def run(args) -> int:
    settings = _settings(args)
    timing = not args.no_timing
    rows = collect(settings, timing)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, settings, timing))
    failed = [row for row in rows if row.get("status") in ("incorrect", "error")]
    return 1 if failed else 0
