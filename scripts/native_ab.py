"""A/B of the native CPU kernel: two versions of its sources (csrc/) built as two extensions and timed side by
side in one process, calls interleaved in shuffled rounds (bench.interleave.time_rounds), so the machine's drift
cancels in each round's ratio. How every kernel change of issue 20 is judged: the VM's speed moves by more than
the effects measured between two runs, never within a round.

    python scripts/native_ab.py HEAD~1                   # HEAD~1's kernel (base) against this checkout's (new)
    python scripts/native_ab.py HEAD~1 HEAD --isa avx2   # two commits, both built for AVX2 (-march=haswell)
    python scripts/native_ab.py main --case bwd:19:28:1 --case fwd:3:32:8 --threads 1

A case of the op is direction:k:resolution:batch (8 heads of 16 channels, relative logits, q, k, v channel-major
slices of one product as SASA2d passes them); ``fwd`` times the forward kernel, ``bwd`` the backward kernel alone
(on the forward's output and log-sum-exp). A case of SASA2d(128, 128)'s projection product (csrc/cpu/gemm.h) is
mm:resolution:batch (the forward product) or mmbwd:resolution:batch (its two gradients). A case of SASA2d's kernels
in the order its step calls them, each on the previous one's outputs (where a kernel finds its operands: which
core's caches, after which writes), is chain:k:resolution:batch (the product, then the op's forward on its slices)
or chainbwd:k:resolution:batch (then the op's backward and the product's two gradients). Per case: both medians,
new / base (the median over rounds of the ratio in the round, with a 95% bootstrap interval) and whether the two
versions' results have the same bits.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.env import cpu_machine_id
from bench.interleave import InterleaveSettings, ratio_interval, time_rounds
from sasa_impls.impls import _native_build
from sasa_impls.heads import merge_heads, split_heads
from sasa_impls.projection import concatenated_channels

ROOT = Path(__file__).resolve().parent.parent
HEADS, HEAD_DIM = 8, 16
WORKTREE = "worktree"  # the version name of this checkout's sources, as they are on disk
DEFAULT_CASES = ("fwd:19:28:1", "bwd:19:28:1", "fwd:19:32:1", "bwd:19:32:1", "fwd:19:28:8", "bwd:19:28:8",
                 "fwd:7:32:1", "bwd:7:32:1", "fwd:3:32:1", "bwd:3:32:1")
DIRECTIONS = ("fwd", "bwd", "mm", "mmbwd", "chain", "chainbwd")


@dataclass(frozen=True)
class Case:
    direction: str  # "fwd" or "bwd" (the op), "mm" or "mmbwd" (the projection's product), "chain" or "chainbwd"
    kernel_size: int  # 0 for the product
    resolution: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.split(":")
        product = parts[0] in ("mm", "mmbwd")
        try:
            sizes = [int(p) for p in parts[1:]]
            if len(sizes) != (2 if product else 3):
                raise ValueError
        except ValueError:
            raise ValueError(f"--case: expected direction:k:resolution:batch (e.g. bwd:19:28:1) or mm[bwd]:resolution:batch, "
                             f"got {text!r}") from None
        k, res, batch = [0, *sizes] if product else sizes
        if parts[0] not in DIRECTIONS or (not product and (k < 1 or k % 2 == 0)) or res < 1 or batch < 1:
            raise ValueError(f"--case: expected one of {', '.join(DIRECTIONS)}, an odd k >= 1 and positive sizes, got {text!r}")
        return cls(parts[0], k, res, batch)

    def __str__(self) -> str:
        k = f" k={self.kernel_size}" if self.kernel_size else ""
        return f"{self.direction}{k} {self.resolution}x{self.resolution} B={self.batch}"


def sources(version: str, into: Path) -> Path:
    """The csrc folder of ``version``: this checkout's (WORKTREE) or a git revision's, extracted under ``into``."""
    if version == WORKTREE:
        return _native_build.CSRC
    folder = into / version.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", version, "sasa_impls/csrc"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"native_ab: version {version!r}: {archive.stderr.decode().strip() or 'git archive failed'}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder / "sasa_impls" / "csrc"


def inputs(case: Case) -> tuple:
    """q, k, v as SASA2d passes them (channel-major slices of one (B, 3C, H, W) product), the embeddings, and a
    gradient of the output for the backward (both versions get the same)."""
    channels = HEADS * HEAD_DIM
    product = torch.randn(case.batch, 3 * channels, case.resolution, case.resolution)
    qkv = [split_heads(t, HEADS) for t in product.split(channels, dim=1)]  # each (B, heads, H, W, D), channel-major
    rel = (torch.randn(HEADS, case.kernel_size, HEAD_DIM // 2), torch.randn(HEADS, case.kernel_size, HEAD_DIM - HEAD_DIM // 2))
    return (*qkv, *rel, torch.randn_like(qkv[0]))


def product_inputs(case: Case) -> tuple:
    """SASA2d(128, 128)'s stacked projection weight (384, 128), its input (B, 128, H W) and an output gradient."""
    channels, pixels = HEADS * HEAD_DIM, case.resolution * case.resolution
    return (torch.randn(3 * channels, channels), torch.randn(case.batch, channels, pixels),
            torch.randn(case.batch, 3 * channels, pixels))


def chain_inputs(case: Case) -> tuple:
    """The projection's weight and input (product_inputs), the embeddings and the op's output gradient (inputs)."""
    weight, x, _ = product_inputs(case)
    *_, rel_row, rel_col, grad = inputs(case)
    return weight, x, rel_row, rel_col, grad


def stacked_product(extension) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The projection's product as _NativeProduct calls it in ``extension``'s version: versions before c68c1a7 were
    told the weight stacks Q, K and V (groups=3, which split the threads' work by heads at batch 1), later ones
    take no such argument (decided once from the docstring: a failed call's TypeError formats its tensors, a
    millisecond)."""
    if "groups" in (extension.matmul.__doc__ or ""):
        return lambda weight, x: extension.matmul(weight, x, False, groups=3)
    return lambda weight, x: extension.matmul(weight, x, False)


def chain_call(extension, case: Case, args: tuple) -> Callable[[], tuple]:
    """SASA2d's kernels in its step's order, each on the previous one's outputs, as the layer passes them
    (sasa_impls/layers.py, projection.py): q, k, v channel-major slices of the product; the gradients of the
    three slices one (B, 3C, H W) tensor where the op's backward wrote them so."""
    weight, x, rel_row, rel_col, grad = args
    k, channels, image = case.kernel_size, HEADS * HEAD_DIM, (case.resolution, case.resolution)
    project = stacked_product(extension)

    def call() -> tuple:
        product = project(weight[None], x)  # (B, 3C, H W)
        q, key, v = (split_heads(t.unflatten(2, image), HEADS) for t in product.split(channels, dim=1))
        out, lse = extension.forward(q, key, v, rel_row, rel_col, k, 1.0, False, 0)
        if case.direction == "chain":
            return out, lse
        dq, dk, dv, *rel_grads = extension.backward(grad, q, key, v, rel_row, rel_col, out, lse, k, 1.0, False, 0)
        merged = [merge_heads(t).flatten(2) for t in (dq, dk, dv)]  # each (B, C, H W)
        grad_product = concatenated_channels(merged, product.shape, product.stride(), (channels,) * 3)
        return (out, *rel_grads, extension.matmul(weight.t()[None], grad_product, False),
                extension.matmul(grad_product, x.transpose(1, 2), True))
    return call


def kernel_call(extension, case: Case, args: tuple) -> Callable[[], tuple]:
    """One call of ``extension``'s kernel for ``case`` (default bands), returning its results."""
    k = case.kernel_size
    if case.direction.startswith("chain"):
        return chain_call(extension, case, args)
    if case.direction == "mm":
        weight, x, _ = args
        project = stacked_product(extension)
        return lambda: (project(weight[None], x),)
    if case.direction == "mmbwd":  # projection.py's _NativeProduct.backward
        weight, x, grad = args
        return lambda: (extension.matmul(weight.t()[None], grad, False), extension.matmul(grad, x.transpose(1, 2), True))
    *operands, grad = args
    if case.direction == "fwd":
        return lambda: tuple(extension.forward(*operands, k, 1.0, False, 0))
    out, lse = extension.forward(*operands, k, 1.0, False, 0)  # this version's own, as its backward would get them
    return lambda: tuple(extension.backward(grad, *operands, out, lse, k, 1.0, False, 0))


def compare_bits(base: tuple, new: tuple) -> str:
    if all(torch.equal(a, b) for a, b in zip(base, new)):
        return "same bits"
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(base, new))
    return f"bits differ (max rel {worst:.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the base version: a git revision, or 'worktree'")
    parser.add_argument("new", nargs="?", default=WORKTREE, help="the new version (default: this checkout's sources)")
    parser.add_argument("--case", action="append", help=f"direction:k:resolution:batch, repeatable (default: {', '.join(DEFAULT_CASES)})")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per case (default 3)")
    parser.add_argument("--isa", choices=sorted(_native_build.ISA_VARIANTS), default="native",
                        help="build both versions for this machine (native) or for AVX2")
    args = parser.parse_args()
    try:
        cases = [Case.parse(text) for text in args.case or DEFAULT_CASES]
    except ValueError as error:
        parser.error(str(error))
    if args.threads < 1:
        parser.error(f"--threads: expected a positive int, got {args.threads}")
    if not args.seconds > 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds:g}")
    variant = _native_build.ISA_VARIANTS[args.isa]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="native_ab.") as scratch:
        extensions = [_native_build.cpu_extension(variant, sources(v, Path(scratch))) for v in (args.base, args.new)]
    print(f"{cpu_machine_id()}, {args.isa} build, fp32, {args.threads} threads; base {args.base}, new {args.new}")
    settings = InterleaveSettings(rounds=max(6, round(args.seconds / (2 * 0.05))), block_s=0.05, workers=1)
    for case in cases:
        data = (product_inputs if case.direction.startswith("mm") else
                chain_inputs if case.direction.startswith("chain") else inputs)(case)
        base, new = (kernel_call(ext, case, data) for ext in extensions)
        bits = compare_bits(base(), new())
        base_s, new_s = time_rounds([base, new], settings)
        ratio, low, high = ratio_interval(new_s, base_s)
        print(f"{str(case):<22} base {1e3 * statistics.median(base_s):8.3f} ms  new {1e3 * statistics.median(new_s):8.3f} ms  "
              f"new/base {ratio:.3f} [{low:.3f}, {high:.3f}]  {bits}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
