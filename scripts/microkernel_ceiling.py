"""How much of one core's FMA peak a load-fed microkernel can reach on this CPU: the FMA-only loop that
`sasa-bench peak` times, the same FMAs fed by aligned and by cache-line-splitting loads, and the native
kernel's contraction (sasa_impls/csrc/cpu/contract.h) at its forward and backward shapes on L1-resident
buffers, all on one thread, fp32, built with the native kernel's flags (-march=native). Prints one line per
loop: GFLOP/s and the fraction of the FMA-only rate.

    python scripts/microkernel_ceiling.py                  # about 5 s after the first build (a minute)
    python scripts/microkernel_ceiling.py --iterations 1e6
    python scripts/microkernel_ceiling.py --isa avx2       # the AVX2 code path, on a CPU that has more

Why: the bare op's "% of peak" (scripts/native_targets.py) is of the FMA-only rate, which no loop that loads
its operands reaches. On the Xeon family 6 model 167 (AVX-512) 16 FMAs with 8 aligned loads ran at 76-83% of it,
with 8 split loads at 58-62%, and the kernel's contraction at 45-64%. On an AMD EPYC Zen 4 (family 25 model 17,
AVX-512 on 256-bit units) the loaded loops ran at 96-103%, and the contraction at 37-58% until its left vectors
were kept in registers (GCC had folded their loads into every FMA), then at 70-95%. On an AMD EPYC Zen 5
(family 26 model 2, full-width AVX-512) the loaded loops ran at 89-112% (split loads cost nothing there) and the
contraction at 67-70% with 4 rows, 50-63% with 2: what it loses is the per-block set-up and drain against
reductions of 16 or 19 terms (a reduction of 38 terms: 65-78%), which is why the backward takes 4 x 4 rows there.
Each contraction is timed at the kernel's own group of rows (forward kGroupRows, backward kBackwardGroupRows: 4
with AVX-512, 3 with AVX2); on the Zen 5 at 1274ed3: q.k 70%, a.v 72%, dP 70%, dK 74%. On the Zen 4 at 86180b1:
77-82% (AVX-512 build) and 76-87% (AVX2 build, 3 rows); the same contractions over longer reductions reach 89% (38
terms), 97% (76) and 101% (304) there. With AVX2's 16 registers the loaded loops run 8 chains (16 would spill).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
from pathlib import Path

from bench.env import cpu_machine_id
from sasa_impls.impls import _native_build

SOURCE = Path(__file__).with_name("microkernel_ceiling.cpp")


@functools.cache
def extension(variant: str = ""):
    """The compiled ceiling loops, named for the kernel's headers, this file's source, the flags and the ISA;
    ``variant``: a build of _native_build.CPU_VARIANTS ("avx2": the AVX2 code path)."""
    problem = _native_build.toolchain_problem("cpu")
    if problem:
        raise SystemExit(f"microkernel_ceiling: cannot build: {problem}")
    tag, root = _native_build.source_tree("cpu")
    options = _native_build.cpu_build_options(variant)
    tag += hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
    name = f"sasa_ceiling_{_native_build.environment_tag(tag, options)}"
    return _native_build.load_extension(name, [str(SOURCE)], "microkernel_ceiling: compiling (about a minute)...",
                                        extra_include_paths=[str(root)], **options)


def ceiling_rows(iterations: int, variant: str = "") -> list[tuple[str, float]]:
    """(loop, GFLOP/s) for each loop, the FMA-only loop first."""
    return [(name, flops / seconds / 1e9) for name, flops, seconds in extension(variant).ceiling(iterations)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=float, default=2e7, help="rounds of each FMA loop (default 2e7)")
    parser.add_argument("--isa", choices=sorted(_native_build.ISA_VARIANTS), default="native",
                        help="the build: this CPU's widest ISA (default), or the AVX2 code path")
    args = parser.parse_args()
    if not args.iterations >= 1:
        raise SystemExit(f"--iterations: expected a positive number, got {args.iterations:g}")
    rows = ceiling_rows(int(args.iterations), _native_build.ISA_VARIANTS[args.isa])
    peak = rows[0][1]
    print(f"{cpu_machine_id()}, {args.isa} build, one thread, fp32")
    for name, rate in rows:
        print(f"{name:<40} {rate:8.1f} GFLOP/s  {100 * rate / peak:5.1f}% of the FMA-only rate")


if __name__ == "__main__":
    main()
