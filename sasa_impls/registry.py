"""Registry of interchangeable local-attention implementations.

Each implementation lives in its own module under ``sasa_impls/impls/`` and calls :func:`register`
at import time; :func:`load_all` imports every module of that folder, so adding a backend means
adding one file and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# forward(q, k, v, rel_row, rel_col, kernel_size, scale) -> y, all tensors (B, heads, H, W, D)
ForwardFn = Callable[..., torch.Tensor]
AvailableFn = Callable[[torch.device, torch.dtype], tuple[bool, str]]

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_anywhere(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Capability check of pure-PyTorch implementations: every device and floating dtype."""
    if dtype not in ALL_DTYPES:
        return False, f"dtype {dtype} is not a floating dtype this implementation computes in"
    return True, ""


@dataclass(frozen=True)
class Impl:
    """One implementation of the SASA op.

    ``borders`` is "masked" when the implementation meets DESIGN.md's contract (out-of-image window
    positions excluded from the softmax) and "clamped" for peers whose windows shift inward at the
    borders (NATTEN). ``supports_rel`` says whether it computes the relative logits, and ``rel_accounting``
    how (bench.flops.ACCOUNTINGS: added to every key, or factorized once per offset), for its analytic MACs.
    ``auto_priority`` ranks it for ``impl="auto"`` per device type (lower is preferred, absent = never).
    """

    name: str
    forward: ForwardFn
    description: str
    check: AvailableFn = available_anywhere
    borders: str = "masked"
    supports_rel: bool = True
    rel_accounting: str = "rel_factorized"
    auto_priority: dict[str, int] = field(default_factory=dict)

    def available(self, device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
        """(True, "") when this implementation can run on ``device`` in ``dtype``, else (False, why)."""
        return self.check(torch.device(device), dtype)

    def __call__(self, q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0) -> torch.Tensor:
        return self.forward(q, k, v, rel_row, rel_col, kernel_size, scale)


_REGISTRY: dict[str, Impl] = {}


def register(impl: Impl) -> Impl:
    """Add ``impl`` to the registry (names are unique)."""
    if impl.name in _REGISTRY:
        raise ValueError(f"implementation {impl.name!r} is registered twice")
    _REGISTRY[impl.name] = impl
    return impl


def load_all() -> None:
    """Import every public module of ``sasa_impls.impls`` so each registers itself (``_name`` modules
    are helpers an implementation imports itself, e.g. kernels that need an optional dependency)."""
    from . import impls

    for module in sorted(pkgutil.iter_modules(impls.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        importlib.import_module(f"{impls.__name__}.{module.name}")


def list_impls() -> list[str]:
    """Names of every registered implementation (available here or not)."""
    return list(_REGISTRY)


def get_impl(name: str) -> Impl:
    """The implementation called ``name``; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"impl: unknown implementation {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def auto_candidates(device: torch.device | str, dtype: torch.dtype, with_rel: bool = True) -> list[Impl]:
    """Implementations ranked for ``device``'s type that meet the full contract and run here, preferred first."""
    device = torch.device(device)
    candidates = [
        impl
        for impl in _REGISTRY.values()
        if device.type in impl.auto_priority
        and impl.borders == "masked"
        and (impl.supports_rel or not with_rel)
        and impl.available(device, dtype)[0]
    ]
    return sorted(candidates, key=lambda impl: impl.auto_priority[device.type])


def resolve_auto(device: torch.device | str, dtype: torch.dtype, with_rel: bool = True) -> Impl:
    """The preferred available implementation meeting the full contract on ``device``/``dtype``."""
    candidates = auto_candidates(device, dtype, with_rel)
    if not candidates:
        raise ValueError(f"impl='auto': no implementation is available on {torch.device(device)} for {dtype}")
    return candidates[0]
