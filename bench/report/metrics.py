"""What a table cell or a plot point shows: one registry of metrics over result rows, with units."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench.schema import DIRECTION_PASSES

from .load import as_number, is_ok
from .peaks import element_size


@dataclass(frozen=True)
class Metric:
    """A number per row. ``needs_ok``: only measured rows have it (others show their status instead)."""

    key: str
    title: str
    unit: str
    value: Callable[[dict], float | None]
    needs_ok: bool = True
    log: bool = True

    @property
    def label(self) -> str:
        """Axis label with its unit."""
        return f"{self.title} ({self.unit})"

    def of(self, row: dict) -> float | None:
        """The value for ``row``; None when the row has no measurement and this metric needs one."""
        if self.needs_ok and not is_ok(row):
            return None
        return self.value(row)


def _scaled(column: str, scale: float) -> Callable[[dict], float | None]:
    def value(row: dict) -> float | None:
        number = as_number(row.get(column))
        return None if number is None else number * scale
    return value


def peak_fraction(row: dict) -> float | None:
    """Achieved / peak FLOP/s in percent, where the row's peak is known (``peak_flops``: see peaks.py)."""
    peak = as_number(row.get("peak_flops"))
    gflops = as_number(row.get("gflops"))
    return None if peak is None or gflops is None else 100.0 * gflops * 1e9 / peak


def compulsory_bytes(row: dict) -> float | None:
    """Bytes a perfect kernel must move: input, output and weights once per pass (lower bound on traffic)."""
    batch, channels, res = (as_number(row.get(c)) for c in ("batch", "channels", "res"))
    params = as_number(row.get("params")) or as_number(row.get("params_analytic"))
    passes = DIRECTION_PASSES.get(row.get("direction"))
    if None in (batch, channels, res, passes):
        return None
    return element_size(row.get("dtype")) * passes * (2 * batch * channels * res * res + (params or 0))


def intensity(row: dict) -> float | None:
    """Arithmetic intensity in FLOP per compulsory byte (x axis of the roofline)."""
    macs, traffic = as_number(row.get("macs_analytic")), compulsory_bytes(row)
    passes = DIRECTION_PASSES.get(row.get("direction"))
    if macs is None or not traffic or passes is None:
        return None
    return 2.0 * macs * passes / traffic


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("latency", "latency", "ms", _scaled("latency_ms", 1.0)),
    Metric("memory", "peak memory", "MiB", _scaled("peak_mem_bytes", 2.0**-20)),
    Metric("gflops", "achieved", "GFLOP/s", _scaled("gflops", 1.0)),
    Metric("peak_fraction", "fraction of peak", "%", peak_fraction),
    Metric("macs", "forward MACs", "GMAC", _scaled("macs_analytic", 1e-9), needs_ok=False),
    Metric("fvcore", "forward MACs counted by fvcore", "GMAC", _scaled("flops_fvcore", 1e-9), needs_ok=False),
    Metric("intensity", "arithmetic intensity", "FLOP/byte", intensity, needs_ok=False),
)}
