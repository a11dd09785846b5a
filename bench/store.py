"""Result rows on disk: JSON Lines under ``results/<machine>/``, appended one whole line per write.

Nothing measured is lost: a row is appended with one write() on an O_APPEND file and flushed to disk;
an append always starts on a fresh line, even after a line that a killed run left half-written; a row is
written whole or not at all (a full disk truncates the file back and raises :class:`DiskFull`); a line
that cannot be read as a row is reported with its file and line number, never silently dropped.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .schema import normalize

# Bytes written to a scratch file beside the results before measuring, to check there is room for a few rows.
SPACE_PROBE_BYTES = 64 * 1024
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """The disk (or quota) is full: the row was not written and the file is as it was before."""


def _write_whole(fd: int, data: bytes, path: Path) -> None:
    """Write ``data`` at the end of ``fd`` and flush it to disk, or leave the file at its old size and
    raise (DiskFull when there is no space)."""
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as error:
        os.ftruncate(fd, size)
        if error.errno in NO_SPACE:
            raise DiskFull(f"no space left to write {path}") from None
        raise


def prepare(path: str | os.PathLike) -> Path:
    """Make sure rows can be appended to ``path`` before anything is measured: its folder is created and
    the file opened for appending and a few rows' worth of bytes written beside it (then deleted);
    ValueError saying why not (a file where a folder must be, a folder where the results file must be,
    no permission, a full disk)."""
    path = Path(path)
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{parent} is a file, not a folder: cannot write {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a results file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
        with tempfile.TemporaryFile(dir=path.parent) as probe:  # a full disk fails here, before anything is measured
            _write_whole(probe.fileno(), b" " * SPACE_PROBE_BYTES, path)
    except DiskFull:
        raise ValueError(f"cannot write {path}: disk full") from None
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` as one line, with one write() on an O_APPEND file, flushed to disk; a newline goes
    first when the file does not end with one (a line a crash left unfinished stays on its own line).
    On a full disk the file is truncated back to its old size and DiskFull is raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        _write_whole(fd, data, path)
    finally:
        os.close(fd)


def result_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every ``*.jsonl`` file named in ``paths`` or below the folders named there (asv's own folder aside)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.jsonl") if "asv" not in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"results: no such file or folder: {p}")
    return files


def read_rows(paths: Iterable[str | os.PathLike], problems: list[str] | None = None) -> Iterator[dict]:
    """The rows of every result file under ``paths``, normalized (bench.schema.normalize), each with its
    ``source`` file. A line that is not a row is reported as "file:line: why": appended to ``problems``
    when a list is given (the caller shows them), else raised as a ValueError."""
    for f in result_files(paths):
        with open(f, errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = normalize(json.loads(line))
                except ValueError as error:  # JSONDecodeError is a ValueError too
                    problem = f"{f}:{number}: {error}"
                    if problems is None:
                        raise ValueError(f"unreadable result row {problem}") from None
                    problems.append(problem)
                    continue
                row.setdefault("source", str(f))
                yield row
