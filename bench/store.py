"""Result rows on disk: JSON Lines under ``results/<machine>/``, appended one whole line per write."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` as one line, with one write() on an O_APPEND file, flushed to disk.

    A crash can at worst leave a truncated last line, which :func:`read_rows` skips; rows already
    written are never rewritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def result_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every ``*.jsonl`` file named in ``paths`` or below the folders named there."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.jsonl") if "asv" not in f.parts))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"results: no such file or folder: {p}")
    return files


def read_rows(paths: Iterable[str | os.PathLike]) -> Iterator[dict]:
    """Rows of every result file under ``paths``; a truncated (crashed) last line is skipped."""
    for f in result_files(paths):
        with open(f) as lines:
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                row.setdefault("source", str(f))
                yield row
