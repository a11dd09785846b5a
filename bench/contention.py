"""Load from other processes: a lock that tells two measuring runs on one machine about each other, and
how much of the machine other processes used while a case was timed.

Two sweeps at once on one machine time each other's load; so does any busy process. :func:`measuring`
holds the machine's measuring lock (an flock on a file in the temp folder, released by the kernel when
its holder dies, so it is never stale) and says so in one line when another process holds it.
:func:`cpu_sample` before and after a timed block gives :func:`other_load`: the share of the machine's
CPU time that went to anything but this process (its threads and the children it waited for), from
/proc/stat's busy jiffies (steal included: a VM's hypervisor taking the CPU is load too) minus this
process's own CPU time. A row is ``contended`` when the others used more than CONTENDED_SHARE of one
CPU per timed thread: counted on every CPU, not only those the case ran on, since caches, memory
bandwidth and turbo clocks are shared.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

LOCK_FILE = Path(tempfile.gettempdir()) / "sasa-bench-measuring.lock"
CONTENDED_SHARE = 0.25  # CPUs' worth of other processes' load per timed thread above which a row is contended
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)  # of /proc/stat's "cpu" line: user nice system [idle iowait] irq softirq steal


@contextlib.contextmanager
def measuring(note: Callable[[str], None], allow_concurrent: bool = False) -> Iterator[None]:
    """Within: this process holds the machine's measuring lock; when another process holds it, ``note``
    gets one warning line (unless ``allow_concurrent``: the user means to run both) and the run goes on."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # no writable temp folder: nothing to tell anyone
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BlockingIOError:
            if not allow_concurrent:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                note(f"warning: another sasa-bench process (pid {owner}) is measuring on this machine: each times the "
                     "other's load (rows record it: other_load, contended); pass --allow-concurrent if that is intended")
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CpuSample:
    """The machine's busy and total CPU time (jiffies, all CPUs) and this process's own CPU seconds."""

    busy: int
    total: int
    own_s: float


def cpu_sample() -> Optional[CpuSample]:
    """The counters now; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            columns = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSample(sum(columns[i] for i in _BUSY_COLUMNS), sum(columns), sum(u.ru_utime + u.ru_stime for u in own))


def other_load(before: Optional[CpuSample], after: Optional[CpuSample]) -> Optional[float]:
    """Fraction (0..1) of the machine's CPU time between the samples used by other processes."""
    if before is None or after is None or after.total <= before.total:
        return None
    own = (after.own_s - before.own_s) * os.sysconf("SC_CLK_TCK")
    return min(1.0, max(0.0, (after.busy - before.busy - own) / (after.total - before.total)))


def contended(load: Optional[float], threads: int, cpus: Optional[int] = None) -> Optional[bool]:
    """Whether other processes' ``load`` (:func:`other_load`) exceeds CONTENDED_SHARE of a CPU per timed thread."""
    if load is None:
        return None
    return load * (cpus or os.cpu_count() or 1) > CONTENDED_SHARE * threads
