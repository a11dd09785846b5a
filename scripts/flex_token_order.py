"""Which token order suits FlexAttention's 128-token blocks for 2D windows?

Prints, per image size and k, for every order of ``sasa_impls.impls.flex.TOKEN_ORDERS``:
- blocks: (query block, key block) pairs computed, partial (mask applied) + full;
- work: keys scored per query relative to the k^2 it needs (device independent; lower is better);
then, with --time, the CPU latency of the compiled forward at a few SASA shapes, orders side by side.

    python -m scripts.flex_token_order [--time]      (from the repository root)
"""
from __future__ import annotations

import argparse

import torch

from bench import measure, pipeline
from sasa_impls.impls.flex import BLOCK, TOKEN_ORDERS, block_pairs, resolve_order, sequence_length

SIZES = (14, 28, 56, 112, 224)
KERNELS = (3, 7, 11, 19)
# (batch, heads, res, head_dim, k): SASA2d(128, 128, k, heads=8) on 56 x 56 maps; 2 heads at 112 x 112
TIMED = ((1, 8, 56, 16, 7), (1, 8, 56, 16, 19), (1, 2, 112, 16, 19))


def block_work(size: int, kernel_size: int, order: str) -> tuple[int, int, float]:
    """(partial pairs, full pairs, keys scored per query / k^2) for a size x size image."""
    partial, full = block_pairs(size, size, kernel_size, order, "cpu")
    pairs = int(partial.sum() + full.sum())
    keys_per_query = pairs * BLOCK * BLOCK / (size * size)
    return int(partial.sum()), int(full.sum()), keys_per_query / min(kernel_size, size) ** 2


def print_block_work() -> None:
    print("res   k  " + "  ".join(f"{order:>28}" for order in TOKEN_ORDERS) + "  auto picks")
    print("         " + "  ".join(f"{'tokens partial+full work':>28}" for _ in TOKEN_ORDERS))
    for size in SIZES:
        for kernel_size in KERNELS:
            cells = []
            for order in TOKEN_ORDERS:
                partial, full, work = block_work(size, kernel_size, order)
                cells.append(f"{sequence_length(size, size, order):>6} {partial:>6}+{full:<6} {work:>6.2f}x")
            auto = resolve_order(size, size, kernel_size, "auto")
            print(f"{size:>3} {kernel_size:>3}  " + "  ".join(f"{c:>28}" for c in cells) + f"  {auto}")


def print_timings() -> None:
    print("\nCPU compiled forward, median ms (IQR), threads =", torch.get_num_threads())
    for batch, heads, size, head_dim, kernel_size in TIMED:
        cells = []
        for order in TOKEN_ORDERS:  # the suite's pipeline: the op on random inputs, the order as flex's option
            subject = pipeline.op_subject("flex", (batch, heads, size, size, head_dim), kernel_size, "float32", "cpu",
                                          "fwd", options=f"order={order}")
            timing = measure.time_call(pipeline.step(subject), "cpu", measure.TimerSettings(reps=10))
            cells.append(f"{order} {timing.median_ms:8.2f} ({timing.iqr_ms:.2f})")
        print(f"B{batch} heads{heads} {size}x{size} D{head_dim} k{kernel_size}: " + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also time the compiled CPU forward (compiles each shape)")
    args = parser.parse_args()
    print_block_work()
    if args.time:
        print_timings()


if __name__ == "__main__":
    main()
