"""ResNet-26/38/50 in three variants: structure, forward/backward, parameter formula, implementations
agreeing on the logits, the analytic cost accounting against independent counts, `sasa-bench models`."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sasa_impls
from bench import paper
from bench.cli import main
from bench.commands import models as models_command
from bench import pipeline
from bench.model_costs import count_macs, count_params, model_costs
from sasa_impls import AttentionStem, SASA2d
from sasa_impls.models import BLOCKS, VARIANTS, Bottleneck, resnet, set_impl

from helpers import FAST, one_space


def meta_resnet(depth: int, variant: str) -> nn.Module:
    with torch.device("meta"):
        return resnet(depth, variant)


def attention_layers(model: nn.Module) -> list[SASA2d]:
    return [m for m in model.modules() if type(m) is SASA2d]


def full_contract_impls(dtype: torch.dtype) -> list[str]:
    """Every registered implementation with masked borders and relative logits available on CPU."""
    return [
        name
        for name in sasa_impls.list_impls()
        if (impl := sasa_impls.get_impl(name)).borders == "masked" and impl.supports_rel and impl.available("cpu", dtype)[0]
    ]


@pytest.mark.parametrize("depth", sorted(BLOCKS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_with_its_layers(depth, variant):
    model = meta_resnet(depth, variant)
    blocks = sum(BLOCKS[depth])
    spatial_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    stems = [m for m in model.modules() if isinstance(m, AttentionStem)]
    assert len(attention_layers(model)) == (0 if variant == "conv" else blocks)
    assert len(spatial_convs) == (blocks if variant == "conv" else 0)
    assert len(stems) == (1 if variant == "full_attention" else 0)
    assert all(m.kernel_size == 7 and m.heads == 8 for m in attention_layers(model) + stems)
    assert all(stem.pool_size == 4 for stem in stems)  # its 4 x 4 blocks need the 7 offsets -3..3
    assert [m.stride for m in attention_layers(model) if m.stride == 2] == ([] if variant == "conv" else [2, 2, 2])
    assert model.fc.out_features == 1000


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_backward_on_a_small_input(variant):
    torch.manual_seed(0)
    model = resnet(26, variant, impl="unfold", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in attention_layers(model):
        assert layer.rel.rel_row.grad.abs().sum() > 0 and layer.query.weight.grad.abs().sum() > 0


def test_attention_layers_follow_the_parameter_formula():
    model = meta_resnet(50, "full_attention")
    layers = attention_layers(model)
    for layer in layers:
        d_in, d_out, k = layer.query.in_channels, layer.query.out_channels, layer.kernel_size
        assert sum(p.numel() for p in layer.parameters()) == 3 * d_in * d_out + k * d_out
    widths = [layer.query.out_channels for layer in layers]
    assert widths == [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
    # stem: q, k (3 -> 64), 4 value matrices, rel (the 2 x 4 - 1 offsets of a 4 x 4 block x 64), emb_row/col
    # (4 x 64 each), nu (4 x 64), BN (2 x 64)
    stem = next(m for m in model.modules() if isinstance(m, AttentionStem))
    assert sum(p.numel() for p in stem.parameters()) == 2 * 3 * 64 + 4 * 3 * 64 + 7 * 64 + 2 * 4 * 64 + 4 * 64 + 2 * 64


# the smallest inputs the downsampling allows (32: full attention's last stage attends at 2x2, then pools);
# 48 gives the conv-stem model odd 3x3 maps. Under TRITON_INTERPRET=1 (set by test_triton.py) triton joins in.
@pytest.mark.parametrize("variant, res", [("conv_stem_attention", 48), ("full_attention", 32)])
def test_every_implementation_gives_the_same_logits_in_float64(variant, res):
    torch.manual_seed(1)
    model = resnet(26, variant, impl="reference").double().eval()
    x = torch.randn(1, 3, res, res, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        impls = [name for name in full_contract_impls(torch.float64) if name != "reference"]
        assert "unfold" in impls
        for name in impls:
            torch.testing.assert_close(set_impl(model, name)(x), expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item(),
                                       msg=lambda message: f"impl {name}: {message}")
        # the attention layers matter: changing one layer's relative embeddings changes the logits
        rel_row = attention_layers(model)[-1].rel.rel_row
        rel_row.add_(torch.randn_like(rel_row))
        assert (set_impl(model, "reference")(x) - expected).abs().max() > 1e-6 * expected.abs().max()


@pytest.mark.parametrize("depth", sorted(BLOCKS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_accounting_matches_numel(depth, variant):
    model = meta_resnet(depth, variant)
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_resnet50_conv_matches_the_known_counts():
    costs = model_costs(meta_resnet(50, "conv"))
    assert costs["params"] == 25_557_032  # torchvision's resnet50
    assert costs["macs"] == costs["macs_rel_factorized"] == costs["macs_content_only"]
    assert 4.08e9 < costs["macs"] < 4.10e9 and costs["flops_paper"] == 2 * costs["macs"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv_and_linear_macs_match_fvcore(variant):
    fvcore = pytest.importorskip("fvcore.nn")
    torch.manual_seed(2)
    model = resnet(26, variant, impl="unfold").eval()
    counted = fvcore.FlopCountAnalysis(model, torch.randn(1, 3, 64, 64))
    counted.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = counted.by_operator()
    ours = count_macs(model, 64)
    assert by_op["conv"] == ours["conv"] + ours["projections"]
    assert by_op["linear"] + by_op.get("addmm", 0) == ours["linear"]


def test_attention_macs_match_a_hand_count():
    # ResNet-26 full attention at 224: (resolution the op runs at, channels) of every bottleneck attention layer
    layers = [(56, 64), (56, 128), (28, 128), (28, 256)] + [(14, 256)] * 3 + [(14, 512)]
    stem_pixels = 224 * 224  # each attends to the 16 keys of its 4 x 4 block: 4 row and 4 column offsets
    ours = count_macs(meta_resnet(26, "full_attention"), 224)
    assert ours["qk"] == ours["av"] == ours["rel_per_key"] == sum(49 * d * r * r for r, d in layers) + 16 * 64 * stem_pixels
    assert ours["rel_factorized"] == sum(7 * d * r * r for r, d in layers) + 4 * 64 * stem_pixels
    assert ours["value_mix"] == 2 * 4 * 64 * 224 * 224
    qkv = sum(3 * d * d * r * r for r, d in layers) + (2 + 4) * 3 * 64 * stem_pixels
    assert ours["projections"] == qkv


def test_count_params_rejects_unknown_layers():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(3))

    with pytest.raises(ValueError, match="Scaled"):
        count_params(nn.Sequential(nn.Linear(3, 3), Scaled()))


def test_resnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        resnet(34, "conv")
    with pytest.raises(ValueError, match="variant"):
        resnet(26, "attention")
    with pytest.raises(ValueError, match="impl"):
        resnet(26, "full_attention", impl="nope")
    with pytest.raises(ValueError, match="num_classes"):
        resnet(26, "conv", num_classes=0)


def test_cli_models_costs_json_and_markdown(capsys):
    assert main(["models", "--no-timing", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["depth"], r["variant"]) for r in rows] == [(d, v) for d in sorted(BLOCKS) for v in VARIANTS]
    by_model = {(r["depth"], r["variant"]): r for r in rows}
    assert by_model[50, "conv"]["params"] == 25_557_032
    assert all(r["flops_paper"] == 2 * r["macs"] for r in rows)
    assert main(["models", "--no-timing", "--depths", "26"]) == 0
    table = one_space(capsys.readouterr().out)
    assert table.count("| ResNet-26 |") == 3
    assert "| ResNet-26 | conv | 13.70 | 13.7 | +0.00 | 4.68 | 4.7 | -0.02 | 2.34 | 74.5 | |" in table


def test_costs_table_sits_beside_the_papers_table_1(capsys):
    assert main(["models", "--no-timing", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["depth"], r["variant"]) for r in rows} == set(paper.TABLE1)
    for row in rows:
        entry = paper.TABLE1[row["depth"], row["variant"]]
        assert (row["paper_params_m"], row["paper_gflops"], row["paper_top1"]) == (entry.params_m, entry.gflops, entry.top1)
        assert row["params_diff_m"] == pytest.approx(row["params"] / 1e6 - entry.params_m, abs=1e-4)
        assert row["gflops_diff"] == pytest.approx(row["flops_paper"] / 1e9 - entry.gflops, abs=1e-4)
        assert row["within_tolerance"] == (abs(row["params_diff_m"]) <= 0.1 and abs(row["gflops_diff"]) <= 0.15)
        assert row["within_tolerance"] or row["note"], row["model"] + " " + row["variant"]
        # a figure that, rounded like the paper's, still differs carries its reason
        differs = round(row["params"] / 1e6, 1) != entry.params_m or round(row["flops_paper"] / 1e9, 1) != entry.gflops
        assert bool(row["note"]) == differs, (row["model"], row["variant"], row["note"])
    assert all(r["within_tolerance"] for r in rows)  # today every model is within tolerance
    assert main(["models", "--no-timing", "--depths", "38", "--variants", "conv"]) == 0
    line = next(l for l in one_space(capsys.readouterr().out).splitlines() if l.startswith("| ResNet-38 | conv |"))
    assert "| 6.43 | 6.5 | -0.07 |" in line and line.endswith(paper.NOTES[38, "conv"] + " |")


def test_a_model_beyond_tolerance_says_so():
    entry = paper.TABLE1[50, "conv"]
    far = paper.compare(50, "conv", int((entry.params_m + 0.2) * 1e6), int(entry.gflops * 1e9))
    assert not far.within_tolerance and far.note.startswith("beyond tolerance")
    near = paper.compare(50, "conv", int((entry.params_m + 0.05) * 1e6), int((entry.gflops - 0.1) * 1e9))
    assert near.within_tolerance and near.note == ""


def elementwise_gflops(model: nn.Module) -> float:
    """FLOPs the analytic count leaves out: batch norm as a multiply-add per element, ReLU, residual adds."""
    counts = {"bn": 0, "relu": 0, "add": 0}

    def counter(key):
        def hook(module, inputs, output):
            counts[key] += output[0].numel()
        return hook

    kinds = {nn.BatchNorm2d: "bn", nn.ReLU: "relu", Bottleneck: "add"}
    handles = [m.register_forward_hook(counter(kinds[type(m)])) for m in model.modules() if type(m) in kinds]
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    for handle in handles:
        handle.remove()
    return (2 * counts["bn"] + counts["relu"] + counts["add"]) / 1e9


def test_the_notes_quote_the_models():
    """The numbers bench/paper.NOTES gives as reasons, recomputed."""
    def batch_norm_params(model):
        return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())

    for variant, suite, no_bn in (("conv_stem_attention", "14.191", "14.149"), ("full_attention", "14.184", "14.142")):
        model = meta_resnet(38, variant)
        params = count_params(model)
        assert batch_norm_params(model) == 41_600 and f"{params / 1e6:.3f}" == suite
        assert f"{(params - 41_600) / 1e6:.3f}" == no_bn and round((params - 41_600) / 1e6, 1) == 14.1
        assert suite in paper.NOTES[38, variant] and no_bn in paper.NOTES[38, variant]
    resnet50 = meta_resnet(50, "conv")
    assert f"{(count_params(resnet50) - batch_norm_params(resnet50)) / 1e6:.2f}" == "25.50"
    for depth, expected in ((26, 4.7), (38, 6.5), (50, 8.2)):
        model = meta_resnet(depth, "conv")
        with_elementwise = model_costs(model)["flops_paper"] / 1e9 + elementwise_gflops(set_impl(model, "unfold"))
        assert round(with_elementwise, 1) == expected, depth
    assert f"{model_costs(meta_resnet(38, 'conv'))['flops_paper'] / 1e9:.2f}" == "6.43"


def test_the_attention_stem_costs_what_the_paper_reports():
    """Full attention - conv stem + attention = the stem's cost over the conv stem's: Table 1 gives 0.2 to 0.3
    GFLOPs; a sliding 7 x 7 window at 224 x 224 (the stem before issue 13) cost 0.9."""
    for depth in sorted(BLOCKS):
        full, hybrid = (model_costs(meta_resnet(depth, variant))["flops_paper"] / 1e9
                        for variant in ("full_attention", "conv_stem_attention"))
        assert 0.2 < full - hybrid < 0.3, depth


def test_cli_models_rejects_bad_options(capsys):
    assert main(["models", "--depths", "34"]) == 2
    assert "--depths" in capsys.readouterr().err
    assert main(["models", "--no-timing", "--variants", "vit"]) == 2
    assert main(["models", "--batch", "0"]) == 2
    assert main(["models", "--device", "tpu"]) == 2
    assert main(["models", "--impls", "nope"]) == 2


def spy_stages(monkeypatch) -> list[tuple[str, str]]:
    """(impl, stage) of every worker `sasa-bench models` starts, in order (the workers still run)."""
    started = []
    real = models_command.run_isolated

    def recording(task, timeout_s):
        started.append((task["impl"], task["stage"]))
        return real(task, timeout_s)

    monkeypatch.setattr(models_command, "run_isolated", recording)
    return started


def test_models_are_timed_in_isolated_workers_with_noise_flags(monkeypatch):
    started = spy_stages(monkeypatch)
    settings = {"depths": [26], "variants": ["conv_stem_attention"], "impls": ["unfold"], "device": torch.device("cpu"),
                "dtype": torch.float32, "res": 32, "batch": 2, "repeat": 2, "timer": FAST}
    rows = models_command.collect(settings, timing=True)
    # a process per stage: the check, the memory, and each repeat's timing apart (no timing after a memory measurement)
    assert started == [("unfold", "check"), ("unfold", "memory"), ("unfold", "time"), ("unfold", "time")]
    assert [r["impl"] for r in rows] == ["unfold"]
    for row in rows:
        assert row["status"] == "ok" and row["res"] == 32 and row["batch"] == 2 and row["repeats"] == 2
        for mode in ("infer", "train"):
            latencies = row[f"{mode}_repeat_latencies_ms"]
            assert len(latencies) == 2 and row[f"{mode}_latency_ms"] == pytest.approx(sum(latencies) / 2)
            assert row[f"{mode}_images_per_s"] == pytest.approx(2 * 1000 / row[f"{mode}_latency_ms"])
            assert row[f"{mode}_repeat_spread"] == pytest.approx(abs(latencies[0] - latencies[1]) / row[f"{mode}_latency_ms"])
            assert row[f"{mode}_peak_mem_bytes"] > 0 and row[f"{mode}_latency_iqr_ms"] >= 0
            assert isinstance(row[f"{mode}_latency_confident"], bool) and isinstance(row[f"{mode}_noisy"], bool)
            assert isinstance(row[f"{mode}_contended"], bool) and (row[f"{mode}_noisy"] or not row[f"{mode}_contended"])
    table = one_space(models_command.markdown(rows, settings, True))
    assert "median of 2 timing(s), each in a fresh worker process" in table and "| infer spread (%) |" in table


def test_an_implementation_that_disagrees_with_the_reference_is_not_timed(monkeypatch):
    started = spy_stages(monkeypatch)
    monkeypatch.setitem(pipeline.TOLERANCE, "float32", -1.0)  # nothing passes
    row = models_command.time_model(26, "conv_stem_attention", "unfold", torch.device("cpu"), torch.float32, 32, 2, FAST)
    assert row["status"] == "incorrect" and "reference" in row["error"] and "infer_images_per_s" not in row
    assert started == [("unfold", "check")]
