"""Figures as data, drawn separately (the Triton benchmark idea): a spec says x, lines and units; one
renderer draws every "metric vs x, one line per implementation" figure, another the GPU roofline.

Read correctly at a glance:
- Points without a value (oom, timeout, error, incorrect, unsupported) are drawn as an 'x' in their line's
  colour, labelled with the status, in a shaded band above every curve (the y range is extended to make
  room, on log axes too): failures are shown, never mistaken for measurements, never dropped.
- Every line has its own marker (hollow, so coinciding points stay visible; ten shapes) and the next of
  four line styles, so curves that coincide stay distinguishable.
- Log-axis ticks read as plain numbers (40, 0.5, 1,000), never 4x10^1 or 2^5.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import matplotlib
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot is imported)
from matplotlib.figure import Figure  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One x with its value, or None and the status that explains why there is none."""

    x: float
    y: float | None
    status: str = "ok"
    mark: str = ""  # drawn beside the point (figures: "†" for a point from another run than the figure's)


@dataclass
class Line:
    """One line of a figure (an implementation, an accounting, ...)."""

    label: str
    points: list[Point]


@dataclass
class LinePlot:
    """A "metric vs x" figure: labels carry units; ``references`` are labelled horizontal lines."""

    name: str
    title: str
    x_label: str
    y_label: str
    lines: list[Line]
    log_x: bool = False
    log_y: bool = True
    references: list[tuple[str, float]] = field(default_factory=list)
    marks: list[tuple[str, float]] = field(default_factory=list)  # labelled vertical lines


@dataclass
class Roofline:
    """Achieved FLOP/s vs arithmetic intensity per implementation, under the device's roofs."""

    name: str
    title: str
    peak_flops: float
    bandwidth: float
    points: dict[str, list[tuple[float, float]]]  # impl -> [(FLOP/byte, FLOP/s)]


MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
FAILURE_BAND = 0.22  # top fraction of the axes that holds the markers of cases that did not run
MARGIN = 0.05  # space around the data, as a fraction of its span (matplotlib's default)


def line_style(index: int) -> dict:
    """Marker and line style of the ``index``-th line: its own marker (hollow, so a point under another
    stays visible) and line style, so that curves that coincide stay distinguishable."""
    return {"marker": MARKERS[index % len(MARKERS)], "linestyle": LINESTYLES[index % len(LINESTYLES)],
            "markerfacecolor": "none", "markeredgewidth": 1.5}


def plain_number(value: float, _position=None) -> str:
    """A tick label as a plain number: 40, 0.5, 1,000."""
    if value >= 1000 and value == round(value):
        return f"{value:,.0f}"
    return f"{value:g}"


def _scaled(log: bool):
    """(forward, inverse) of the axis scale, so ranges can be computed where the axis is linear."""
    return (math.log10, lambda t: 10.0**t) if log else ((lambda v: v), (lambda t: t))


def reserve_failure_band(ax, values: list[float], log: bool) -> float:
    """Set the y range so that ``values`` fill the axes below the top FAILURE_BAND; returns the data top."""
    forward, inverse = _scaled(log)
    low, high = forward(min(values)), forward(max(values))
    span = high - low or 1.0
    bottom, top = low - MARGIN * span, high + MARGIN * span
    ax.set_ylim(inverse(bottom), inverse(bottom + (top - bottom) / (1 - FAILURE_BAND)))
    return inverse(top)


def _failure_marks(ax, failing: list[tuple[str, list[Point]]]) -> None:
    """The band above the curves: one row per failing line, an 'x' and its status at each failed x."""
    band = Rectangle((0, 1 - FAILURE_BAND), 1, FAILURE_BAND, transform=ax.transAxes, color="grey", alpha=0.1, lw=0)
    ax.add_patch(band)
    ax.annotate("did not run", (0.005, 0.995), xycoords="axes fraction", va="top", fontsize=7, color="grey")
    transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for row, (color, points) in enumerate(failing):
        height = 1 - FAILURE_BAND + FAILURE_BAND * (row + 0.5) / len(failing)
        for point in points:
            ax.plot(point.x, height, "x", color=color, markersize=8, mew=2, transform=transform)
            ax.annotate(point.status, (point.x, height), xycoords=transform, xytext=(0, -6), textcoords="offset points",
                        ha="center", va="top", fontsize=7, color=color)


def label_log_axis(axis, limit: float | None = None, minor_labels: bool = True) -> None:
    """Plain-number labels on a log axis: every major tick and, on a base-10 axis (``minor_labels``), the
    minor ticks the span leaves room for (all within one decade, 2 and 5 within three, none beyond);
    nothing above ``limit``."""
    low, high = sorted(axis.get_view_interval())
    decades = math.log10(high / low) if low > 0 and minor_labels else math.inf
    minors = {2, 3, 4, 5, 6, 7, 8, 9} if decades <= 1 else {2, 5} if decades <= 3 else set()

    def below_limit(value: float) -> bool:
        return value > 0 and (limit is None or value <= limit * (1 + 1e-9))

    def major(value: float, _position=None) -> str:
        return plain_number(value) if below_limit(value) else ""

    def minor(value: float, _position=None) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9)) if value > 0 else 0
        return major(value) if mantissa in minors else ""

    axis.set_major_formatter(FuncFormatter(major))
    axis.set_minor_formatter(FuncFormatter(minor) if minors else NullFormatter())


def render_lines(spec: LinePlot) -> Figure:
    """Draw a LinePlot: one styled line per Line, failures as labelled markers in a band above the curves."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    failing = []
    for index, line in enumerate(spec.lines):
        color = colors[index % len(colors)]
        ok = sorted((p.x, p.y) for p in line.points if p.y is not None)
        ax.plot([x for x, _ in ok], [y for _, y in ok], color=color, label=line.label, **line_style(index))
        for point in line.points:
            if point.mark and point.y is not None:
                ax.annotate(point.mark, (point.x, point.y), xytext=(4, 4), textcoords="offset points", color=color, fontsize=9)
        failed = [p for p in line.points if p.y is None]
        if failed:
            failing.append((color, failed))
    for label, value in spec.references:
        ax.axhline(value, color="black", linestyle=":", linewidth=1.2)
        ax.annotate(label, (0.01, value), xycoords=ax.get_yaxis_transform(), xytext=(0, 3), textcoords="offset points", fontsize=8)
    for label, value in spec.marks:
        ax.axvline(value, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (value, 0.02), xycoords=ax.get_xaxis_transform(), xytext=(3, 0), textcoords="offset points", fontsize=8, color="grey")
    if spec.log_x:
        ax.set_xscale("log", base=2)
    if spec.log_y:
        ax.set_yscale("log")
    values = [p.y for line in spec.lines for p in line.points if p.y is not None] + [v for _, v in spec.references]
    values = [v for v in values if v > 0 or not spec.log_y]
    data_top = reserve_failure_band(ax, values, spec.log_y) if failing and values else None
    if failing:
        _failure_marks(ax, failing)
    xs = sorted({p.x for line in spec.lines for p in line.points})
    if xs and len(xs) <= 12:
        ax.set_xticks(xs, [plain_number(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
    elif spec.log_x:
        label_log_axis(ax.xaxis, minor_labels=False)  # base 2
    if spec.log_y:
        label_log_axis(ax.yaxis, data_top)
    ax.set(title=spec.title, xlabel=spec.x_label, ylabel=spec.y_label)
    ax.grid(True, which="both", alpha=0.3)
    if spec.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


def render_roofline(spec: Roofline) -> Figure:
    """Draw a Roofline: min(peak, bandwidth x intensity) and each implementation's points (log-log, GFLOP/s)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    xs = [x for points in spec.points.values() for x, _ in points] or [1.0]
    low, high = min(xs) / 4, max(max(xs) * 4, 4 * spec.peak_flops / spec.bandwidth)
    ridge = spec.peak_flops / spec.bandwidth
    ax.plot([low, ridge, high], [low * spec.bandwidth / 1e9, spec.peak_flops / 1e9, spec.peak_flops / 1e9], color="black",
            label=f"roof: {spec.peak_flops / 1e12:g} TFLOP/s, {spec.bandwidth / 1e12:g} TB/s")
    for index, (impl, points) in enumerate(spec.points.items()):
        style = line_style(index)
        ax.plot([x for x, _ in points], [y / 1e9 for _, y in points], linestyle="none", marker=style["marker"],
                markerfacecolor="none", markeredgewidth=1.5, label=impl)
    ax.set(xscale="log", yscale="log", title=spec.title, xlabel="arithmetic intensity (FLOP/byte, compulsory traffic)",
           ylabel="achieved throughput (GFLOP/s)")
    label_log_axis(ax.xaxis)
    label_log_axis(ax.yaxis)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


RENDERERS = {LinePlot: render_lines, Roofline: render_roofline}


def render(spec: LinePlot | Roofline) -> Figure:
    """The matplotlib Figure of any spec."""
    return RENDERERS[type(spec)](spec)


def save(spec: LinePlot | Roofline, folder: str | os.PathLike) -> str:
    """Render ``spec`` to ``folder/<name>.png``; returns the file name."""
    os.makedirs(folder, exist_ok=True)
    fig = render(spec)
    name = f"{spec.name}.png"
    fig.savefig(os.path.join(folder, name), dpi=110)
    plt.close(fig)
    return name
