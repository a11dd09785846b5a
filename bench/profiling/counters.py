"""Hardware counters (cycles, instructions, FP operations, cache misses) of the profiled calls, with ``perf stat``.

Only where the machine has a CPU PMU: ``/sys/bus/event_source/devices/`` lists ``cpu`` (or ``cpu_core`` /
``cpu_atom`` on hybrid CPUs, ``armv8_pmuv3*`` on Arm). Virtual machines often expose only software events
(``software``, ``tracepoint``, ``breakpoint``, ...): then :func:`unavailable` says so in one line and the
profile runs without counters. ``perf`` (Debian/Ubuntu: linux-perf / linux-tools) attaches to this process.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

EVENT_SOURCES = Path("/sys/bus/event_source/devices")
PMU_PREFIXES = ("cpu", "armv8_pmuv3", "armv7_cortex")
EVENTS = ("cycles", "instructions", "cache-references", "cache-misses",
          "fp_arith_inst_retired.scalar_single", "fp_arith_inst_retired.128b_packed_single",
          "fp_arith_inst_retired.256b_packed_single", "fp_arith_inst_retired.512b_packed_single")


def unavailable(sources: Path = EVENT_SOURCES) -> str:
    """Why hardware counters cannot be read here ("" when they can)."""
    try:
        found = sorted(p.name for p in sources.iterdir())
    except OSError:
        return f"hardware counters: {sources} is not readable (not Linux?); profiling without them"
    if not any(name.startswith(PMU_PREFIXES) for name in found):
        return (f"hardware counters: this machine has no CPU PMU (only {', '.join(found) or 'no'} events in {sources}); "
                "profiling without them")
    if shutil.which("perf") is None:
        return "hardware counters: perf is not installed (Debian: apt install linux-perf); profiling without them"
    return ""


@contextlib.contextmanager
def perf_stat(calls: int) -> Iterator[dict]:
    """Within: ``perf stat`` counts this process's events; on exit the dict holds each event per call
    (events the CPU lacks are left out, with the reason under "not_counted")."""
    counts: dict = {}
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as out:
        perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out.name, "-e", ",".join(EVENTS), "-p", str(os.getpid())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield counts
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(10)
            counts.update(parse(Path(out.name).read_text(), calls))


def parse(text: str, calls: int) -> dict:
    """``perf stat -x ,`` output as {event: count per call}, plus "not_counted" {event: why}."""
    counts: dict = {}
    missing = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#"):
            continue
        value, event = fields[0], fields[2]
        if value.replace(".", "", 1).isdigit():
            counts[event] = float(value) / calls
        elif event:
            missing[event] = value.strip("<>") or "not counted"
    return {**counts, **({"not_counted": missing} if missing else {})}
