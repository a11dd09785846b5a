"""Registry of interchangeable local-attention implementations.

Each implementation lives in its own module under ``sasa_impls/impls/`` and calls :func:`register`
at import time; :func:`load_all` imports every module of that folder, so adding a backend means
adding one file and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import torch

# forward(q, k, v, rel_row, rel_col, kernel_size, scale, **options) -> y, all tensors (B, heads, H, W, D)
ForwardFn = Callable[..., torch.Tensor]
AvailableFn = Callable[[torch.device, torch.dtype], tuple[bool, str]]

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_anywhere(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Capability check of pure-PyTorch implementations: every device and floating dtype."""
    if dtype not in ALL_DTYPES:
        return False, f"dtype {dtype} is not a floating dtype this implementation computes in"
    return True, ""


@dataclass(frozen=True)
class AttentionSpec:
    """What an implementation is asked to compute, judged by :meth:`Impl.supports` before anything runs.

    Built from the actual inputs (:meth:`of`) or from a benchmark case, so the runner can record a case
    as unsupported without starting it, and ``impl="auto"`` can pick an implementation that can train.
    """

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    height: int
    width: int
    head_dim: int
    kernel_size: int
    relative: bool
    requires_grad: bool

    @classmethod
    def of(cls, q: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]], kernel_size: int, relative: bool) -> "AttentionSpec":
        """The spec of a call on ``q`` (B, heads, H, W, D); gradients are needed when autograd is on and
        any of ``tensors`` requires them."""
        batch, heads, height, width, head_dim = q.shape
        requires_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return cls(q.device, q.dtype, batch, heads, height, width, head_dim, kernel_size, relative, requires_grad)


@dataclass(frozen=True)
class Option:
    """A per-implementation option (a block edge, a tile, a token order). ``parse`` turns a value, or its
    text as typed on the command line, into what the implementation's forward takes; ValueError if bad."""

    parse: Callable[[Any], Any]
    doc: str


def positive_int(value: Any) -> int:
    """Option parser: an int >= 1 (or its text)."""
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"expected an int >= 1, got {value!r}")
    return number


def int_pair(value: Any) -> tuple[int, int]:
    """Option parser: two ints >= 1, as a pair or as text "4x8"."""
    parts = value.lower().split("x") if isinstance(value, str) else value
    if not isinstance(parts, (tuple, list)) or len(parts) != 2:
        raise ValueError(f"expected ROWSxCOLS such as 4x8, got {value!r}")
    return positive_int(parts[0]), positive_int(parts[1])


def choice(*names: str) -> Callable[[Any], str]:
    """Option parser: one of ``names``."""
    def parse(value: Any) -> str:
        if value not in names:
            raise ValueError(f"expected one of {', '.join(names)}, got {value!r}")
        return value
    return parse


def split_options(text: str) -> dict[str, str]:
    """"block=8,order=tiles" -> {"block": "8", "order": "tiles"}; ValueError for a malformed item."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"options: expected KEY=VALUE, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def options_text(options: Mapping[str, Any]) -> str:
    """The canonical text of options as result rows and case keys carry it: sorted "key=value" pairs."""
    return ",".join(f"{key}={value}" for key, value in sorted(options.items()))


@dataclass(frozen=True)
class Impl:
    """One implementation of the SASA op.

    ``borders`` is "masked" when the implementation meets docs/design.md's contract (out-of-image window
    positions excluded from the softmax) and "clamped" for peers whose windows shift inward at the
    borders (NATTEN). ``supports_rel`` says whether it computes the relative logits, and ``rel_accounting``
    how (bench.flops.ACCOUNTINGS: added to every key, or factorized once per offset), for its analytic MACs.
    ``auto_priority`` ranks it for ``impl="auto"`` per device type (lower is preferred, absent = never).
    ``check`` judges a device and dtype, ``limits`` everything else about an input (shape, k, head dim,
    gradients); :meth:`supports` applies both. ``options`` are the keyword options its forward takes.
    ``poisoned``, where given, is a context in which the implementation fills every output buffer with
    NaN before its kernels write it, so validation catches an element a kernel forgets.
    """

    name: str
    forward: ForwardFn
    description: str
    check: AvailableFn = available_anywhere
    limits: Optional[Callable[[AttentionSpec], tuple[bool, str]]] = None
    borders: str = "masked"
    supports_rel: bool = True
    rel_accounting: str = "rel_factorized"
    auto_priority: dict[str, int] = field(default_factory=dict)
    options: dict[str, Option] = field(default_factory=dict)
    poisoned: Optional[Callable[[], ContextManager]] = None

    def available(self, device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
        """(True, "") when this implementation can run on ``device`` in ``dtype``, else (False, why)."""
        return self.check(torch.device(device), dtype)

    def supports(self, spec: AttentionSpec) -> tuple[bool, str]:
        """(True, "") when this implementation can compute ``spec``, else (False, why) as a phrase that
        follows the implementation's name ("is not available on cpu for ...", "has no ...")."""
        ok, why = self.available(spec.device, spec.dtype)
        if not ok:
            return False, f"is not available on {spec.device} for {spec.dtype}: {why}"
        if spec.relative and not self.supports_rel:
            return False, "has no relative-position term; pass rel_row=rel_col=None"
        return self.limits(spec) if self.limits is not None else (True, "")

    def parse_options(self, options: Mapping[str, Any] | str | None) -> dict[str, Any]:
        """The options as the forward takes them (text such as "block=8" is accepted); ValueError naming
        ``options`` for an option this implementation does not take or a bad value."""
        given = split_options(options) if isinstance(options, str) else dict(options or {})
        parsed = {}
        for key, value in given.items():
            if key not in self.options:
                takes = ", ".join(f"{name} ({option.doc})" for name, option in self.options.items()) or "no options"
                raise ValueError(f"options: {self.name!r} takes {takes}; got {key!r}")
            try:
                parsed[key] = self.options[key].parse(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"options: {key}={value!r} for {self.name!r}: {error}") from None
        return parsed

    def __call__(self, q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0, **options) -> torch.Tensor:
        return self.forward(q, k, v, rel_row, rel_col, kernel_size, scale, **options)


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


def resolve_auto(spec: AttentionSpec) -> Impl:
    """The preferred implementation meeting the full contract that supports ``spec`` (e.g. one with a
    backward when gradients are needed)."""
    for impl in auto_candidates(spec.device, spec.dtype, spec.relative):
        if impl.supports(spec)[0]:
            return impl
    need = " with gradients" if spec.requires_grad else ""
    raise ValueError(f"impl='auto': no implementation can run this input on {spec.device} for {spec.dtype}{need}")
