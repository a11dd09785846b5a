"""Progress of a sweep on stderr: one rich progress bar, one line per finished case, one warnings summary.

The ETA averages only the cases that are not the first of their (implementation, device, dtype,
direction): a first case pays for the correctness gate and for compiling (flex, triton, the native
extension), which the cases after it do not. What the measured libraries printed comes back in the
rows' ``warnings`` and is summarised once at the end, so it never breaks the bar.
"""
from __future__ import annotations

import collections
import statistics
import sys
import time

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

from .schema import Case, Status

STATUS_STYLE = {Status.OK: "green", Status.INCORRECT: "bold red", Status.ERROR: "red", Status.OOM: "magenta",
                Status.TIMEOUT: "yellow", Status.UNSUPPORTED: "dim"}


class Progress:
    """Context manager: ``begin(case)`` before a case, ``end(row)`` after it, ``note(text)`` for a message."""

    def __init__(self, total: int, enabled: bool = True, console: Console | None = None):
        self.total, self.enabled = total, enabled
        self.console = console or Console(file=sys.stderr, highlight=False)
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("ETA {task.fields[eta]}"), console=self.console, transient=True)
        self.task = self.bar.add_task("", total=total, eta="?")
        self.seen: set[tuple] = set()
        self.steady: list[float] = []  # seconds of the cases that were not first of their group
        self.warnings: collections.Counter = collections.Counter()
        self.started: float | None = None  # when the current case began (None: the executor does not say)
        self.first, self.opened = False, time.monotonic()

    def __enter__(self) -> "Progress":
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
            self.summarise_warnings()

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def begin(self, case: Case, repeat: int = 0) -> None:
        group = (case.impl, case.device, case.dtype, case.direction)
        self.first, self.started = group not in self.seen, time.monotonic()
        self.seen.add(group)
        again = f" (repeat {repeat})" if repeat else ""
        self.bar.update(self.task, description=f"{case.label()}{again}")

    def end(self, row: dict) -> None:
        if self.started is not None and not self.first:
            self.steady.append(time.monotonic() - self.started)
        self.warnings.update(row.get("warnings") or [])
        done = self.bar.tasks[0].completed + 1
        # per case: the steady cases' mean, or (cases measured in parallel, starts unknown) the throughput so far
        per_case = statistics.mean(self.steady) if self.steady else None
        if self.started is None and not self.steady:
            per_case = (time.monotonic() - self.opened) / done
        self.started = None
        eta = _duration(per_case * (self.total - done)) if per_case is not None else "?"
        self.bar.update(self.task, advance=1, eta=eta)
        if not self.enabled:
            return
        latency = f" {row['latency_ms']:.3g} ms" if row.get("latency_ms") is not None else ""
        detail = f" ({row['error']})" if row.get("error") else ""
        label = Case(**{k: row[k] for k in Case.__dataclass_fields__}).label()
        self.console.print(Text.assemble(f"[{done}/{self.total}, ETA {eta}] {label}: ",
                                         (str(row["status"]), STATUS_STYLE.get(row["status"], "")), latency + detail),
                           soft_wrap=True)

    def summarise_warnings(self) -> None:
        """Once, at the end: the distinct lines the measured libraries printed, most frequent first."""
        if not self.warnings:
            return
        self.console.print(f"warnings printed by the measured code ({len(self.warnings)} distinct; "
                           "each row keeps its own in `warnings`):", markup=False, soft_wrap=True)
        for line, count in self.warnings.most_common(5):
            self.console.print(f"  {count} x {line}", markup=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"
