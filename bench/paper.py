"""The paper's Table 1, the one home of its figures in the suite, and how the suite's models compare.

Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019 (arXiv:1906.05909),
Table 1: ImageNet classification at 224 x 224 of ResNet-26/38/50 as Baseline (convolutions), Conv-stem +
Attention and Full Attention, with FLOPS (B), Params (M) and top-1 accuracy (%). The paper counts one
multiply-add as 2 FLOPs (its footnote to sec. 4.1), i.e. ``flops_paper`` of bench/model_costs.py.

Where the figures were confirmed: the English PDF was not readable with the suite's reference search, but a
full-text translation of the paper (Japanese) in its source index reproduces Table 1 with every figure
below, and a separate summary of the paper quotes the same ResNet-50 row (8.2/25.6/76.9, 7.0/18.0/77.4,
7.2/18.0/77.6). One figure differs from what the suite's maintainers remembered: ResNet-38 Full Attention
is 6.0 GFLOPs in that copy, not 6.1; 6.0 is kept here because it is what the source says (and the suite's
model gives 5.96).

Every one of the nine models is within :data:`PARAMS_TOLERANCE_M` and :data:`GFLOPS_TOLERANCE` of the
paper. Where the suite's figure, rounded like the paper's, still differs, :data:`NOTES` says why as far as
it is known (tests/test_models.py checks the numbers the notes quote).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table1Entry:
    """One model of Table 1: FLOPs (10^9, 2 x multiply-adds), parameters (10^6), ImageNet top-1 (%)."""

    gflops: float
    params_m: float
    top1: float


# the suite's variant names (sasa_impls.models.VARIANTS) -> Table 1's row names
VARIANT_NAMES = {"conv": "Baseline", "conv_stem_attention": "Conv-stem + Attention", "full_attention": "Full Attention"}

TABLE1: dict[tuple[int, str], Table1Entry] = {
    (26, "conv"): Table1Entry(4.7, 13.7, 74.5),
    (26, "conv_stem_attention"): Table1Entry(4.5, 10.3, 75.8),
    (26, "full_attention"): Table1Entry(4.7, 10.3, 74.8),
    (38, "conv"): Table1Entry(6.5, 19.6, 76.2),
    (38, "conv_stem_attention"): Table1Entry(5.7, 14.1, 77.1),
    (38, "full_attention"): Table1Entry(6.0, 14.1, 76.9),
    (50, "conv"): Table1Entry(8.2, 25.6, 76.9),
    (50, "conv_stem_attention"): Table1Entry(7.0, 18.0, 77.4),
    (50, "full_attention"): Table1Entry(7.2, 18.0, 77.6),
}

PARAMS_TOLERANCE_M = 0.1
GFLOPS_TOLERANCE = 0.15

_BATCH_NORM_NOTE = (
    "params: {suite} M rounds to 14.2, not 14.1; without its 41,600 batch-norm parameters it is {no_bn} M (14.1), "
    "but the paper's 25.6 M ResNet-50 baseline counts them (25.50 M without): no one convention gives all nine, "
    "and the paper does not say what it counts"
)
NOTES: dict[tuple[int, str], str] = {
    (38, "conv"): (
        "FLOPs: 6.43 rounds to 6.4, not 6.5; also counting batch norm (a multiply-add per element), ReLU and the "
        "residual adds (+0.03 G) gives 6.46 (6.5) and keeps the ResNet-26 and -50 baselines at 4.7 and 8.2: a likely "
        "cause, but the paper does not say what it counts"
    ),
    (38, "conv_stem_attention"): _BATCH_NORM_NOTE.format(suite="14.191", no_bn="14.149"),
    (38, "full_attention"): _BATCH_NORM_NOTE.format(suite="14.184", no_bn="14.142"),
}


@dataclass(frozen=True)
class Comparison:
    """The suite's model beside Table 1: differences are suite - paper."""

    paper: Table1Entry
    params_diff_m: float
    gflops_diff: float
    note: str

    @property
    def within_tolerance(self) -> bool:
        return abs(self.params_diff_m) <= PARAMS_TOLERANCE_M and abs(self.gflops_diff) <= GFLOPS_TOLERANCE

    def fields(self) -> dict:
        """Flat JSON-ready keys for a `sasa-bench models` row."""
        return {
            "paper_gflops": self.paper.gflops, "paper_params_m": self.paper.params_m, "paper_top1": self.paper.top1,
            "gflops_diff": round(self.gflops_diff, 4), "params_diff_m": round(self.params_diff_m, 4),
            "within_tolerance": self.within_tolerance, "note": self.note,
        }


def compare(depth: int, variant: str, params: int, flops_paper: int) -> Comparison:
    """The suite's parameter count and paper-convention FLOPs (bench/model_costs.py) beside Table 1."""
    paper = TABLE1[depth, variant]
    params_diff, gflops_diff = params / 1e6 - paper.params_m, flops_paper / 1e9 - paper.gflops
    note = NOTES.get((depth, variant), "")
    if abs(params_diff) > PARAMS_TOLERANCE_M or abs(gflops_diff) > GFLOPS_TOLERANCE:
        note = "; ".join(filter(None, ["beyond tolerance", note]))
    return Comparison(paper, params_diff, gflops_diff, note)
