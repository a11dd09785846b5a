"""Figures as data, drawn separately (the Triton benchmark idea): a spec says x, lines and units; one
renderer draws every "metric vs x, one line per implementation" figure, another the GPU roofline.

Points without a value (oom, timeout, error, incorrect, unsupported) are drawn as an 'x' near the top of
the axes at their x, labelled with the status, in their line's colour: failures are shown, not dropped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import matplotlib
from matplotlib.ticker import NullLocator

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot is imported)
from matplotlib.figure import Figure  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One x with its value, or None and the status that explains why there is none."""

    x: float
    y: float | None
    status: str = "ok"


@dataclass
class Line:
    """One line of a figure (an implementation, an accounting, ...)."""

    label: str
    points: list[Point]
    dashed: bool = False


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


def render_lines(spec: LinePlot) -> Figure:
    """Draw a LinePlot: one line per Line, failures as labelled markers at the top."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, line in enumerate(spec.lines):
        color = colors[index % len(colors)]
        ok = sorted((p.x, p.y) for p in line.points if p.y is not None)
        ax.plot([x for x, _ in ok], [y for _, y in ok], "--" if line.dashed else "-", marker="o", color=color, label=line.label)
        for point in (p for p in line.points if p.y is None):
            height = 0.97 - 0.06 * (index % 8)
            ax.plot(point.x, height, "x", color=color, markersize=9, mew=2, transform=ax.get_xaxis_transform())
            ax.annotate(point.status, (point.x, height), xycoords=ax.get_xaxis_transform(), xytext=(5, -3),
                        textcoords="offset points", fontsize=8, color=color)
    for index, (label, value) in enumerate(spec.references):
        ax.axhline(value, color="black", linestyle=":", linewidth=1.2)
        ax.annotate(label, (0.01, value), xycoords=ax.get_yaxis_transform(), xytext=(0, 3), textcoords="offset points", fontsize=8)
    for label, value in spec.marks:
        ax.axvline(value, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (value, 0.02), xycoords=ax.get_xaxis_transform(), xytext=(3, 0), textcoords="offset points", fontsize=8, color="grey")
    if spec.log_x:
        ax.set_xscale("log", base=2)
    if spec.log_y:
        ax.set_yscale("log")
    xs = sorted({p.x for line in spec.lines for p in line.points})
    if xs and len(xs) <= 12:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set(title=spec.title, xlabel=spec.x_label, ylabel=spec.y_label)
    ax.grid(True, which="both", alpha=0.3)
    if spec.lines:
        ax.legend(fontsize=8)
    return fig


def render_roofline(spec: Roofline) -> Figure:
    """Draw a Roofline: min(peak, bandwidth x intensity) and each implementation's points (log-log)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    xs = [x for points in spec.points.values() for x, _ in points] or [1.0]
    low, high = min(xs) / 4, max(max(xs) * 4, 4 * spec.peak_flops / spec.bandwidth)
    ridge = spec.peak_flops / spec.bandwidth
    ax.plot([low, ridge, high], [low * spec.bandwidth, spec.peak_flops, spec.peak_flops], color="black",
            label=f"roof: {spec.peak_flops / 1e12:g} TFLOP/s, {spec.bandwidth / 1e12:g} TB/s")
    for impl, points in spec.points.items():
        ax.plot([x for x, _ in points], [y for _, y in points], "o", label=impl, alpha=0.8)
    ax.set(xscale="log", yscale="log", title=spec.title, xlabel="arithmetic intensity (FLOP/byte, compulsory traffic)",
           ylabel="achieved throughput (FLOP/s)")
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
