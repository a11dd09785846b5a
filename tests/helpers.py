"""Input factories shared by the tests: fresh random tensors every call, never zeros."""
from __future__ import annotations

import contextlib
import importlib.util
import re
import shlex
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from bench.runner import Settings
from sasa_impls import projection, registry

REPO = Path(__file__).resolve().parent.parent
# Settings for tests that check what the runner records, not how fast anything is: a short, loose timer.
FAST = Settings(warmup=1, reps=2, min_time_s=0.0, max_time_s=0.2, confidence=0.5, threads=1, timeout_s=120)

from sasa_impls.functional import rel_shapes


def random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel=True, dtype=torch.float64, device="cpu", requires_grad=False):
    """q, k, v of shape (B, heads, H, W, D) and rel_row/rel_col (or None), drawn from N(0, 1)."""
    def draw(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)

    q, k, v = (draw(batch, heads, height, width, head_dim) for _ in range(3))
    if not with_rel:
        return q, k, v, None, None
    row_shape, col_shape = rel_shapes(heads, kernel_size, head_dim)
    return q, k, v, draw(*row_shape), draw(*col_shape)


def like_a_terminal_job() -> None:
    """Popen's preexec_fn for a command a test stops with Ctrl-C: SIGINT back to its default, as for a terminal's
    foreground job. A test run started in the background (``cmd &`` in a script) inherits SIGINT ignored, which
    Python keeps (no KeyboardInterrupt handler): the command would rightly never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def grads(output: torch.Tensor, inputs, cotangent: torch.Tensor) -> list:
    """Gradients of <output, cotangent> w.r.t. every tensor of ``inputs`` that is not None."""
    leaves = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(output, leaves, cotangent))


def one_space(text: str) -> str:
    """``text`` with runs of spaces folded to one: Markdown tables (pandas) pad their cells to align them."""
    return re.sub(r" {2,}", " ", text)


def on_thread_counts(counts, fn) -> list:
    """fn()'s result on each of torch's thread ``counts`` in turn; the caller's thread count restored after."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def planted(folder: Path, name: str, source: str) -> Iterator[str]:
    """A plugin file of test-only implementations (for SASA_BENCH_PLUGINS): yields its path; whatever it
    registered in this process leaves the registry again afterwards."""
    path = folder / f"{name}.py"
    path.write_text(source)
    registered = dict(registry._REGISTRY)
    try:
        yield str(path)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(registered)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def bad_flags(table: str) -> list[tuple[list[str], str]]:
    """(argv, flag the error must name) per line of ``table``: shell words, the first being that flag unless
    the line starts with "FLAG:" (e.g. ``--res: --suite quick --res 64``)."""
    cases = []
    for line in filter(None, map(str.strip, table.splitlines())):
        flag, _, words = line.partition(": ") if line.split()[0].endswith(":") else ("", "", line)
        argv = shlex.split(words)
        cases.append((argv, flag or argv[0]))
    return cases


def preset_projection_backend(monkeypatch, x: torch.Tensor, out_channels: int, backend: str,
                              modes: tuple[bool, ...] = (True,)) -> None:
    """SASA2d's projection backend for ``x`` and ``out_channels`` stacked rows set to ``backend`` in the given modes
    (training True / False), where timing would choose at first use (projection.backend_key: the active build too)."""
    for training in modes:
        monkeypatch.setitem(projection._CHOSEN_BACKEND, projection.backend_key(x, out_channels, training), backend)


def load_script(path: Path) -> ModuleType:
    """A script of scripts/ as a module named for its file (registered in sys.modules: a dataclass it defines looks its
    module up there)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
