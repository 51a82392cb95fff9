"""The model family: each variant's record against measured counts and the docs' tables, any input size,
training behaviour."""

import functools
from pathlib import Path

import pytest
import torch

from pvt_lightning import create_model, measure_complexity
from pvt_lightning.models import MIN_INPUT_SIZE, VARIANT_SPECS, VARIANTS, Complexity, variant_spec

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def measured(variant: str, size: tuple[int, int]) -> Complexity:
    """Params and GMACs counted on a meta-device model: shapes only, no compute."""
    with torch.device("meta"):
        model = create_model(variant)
    return measure_complexity(model, size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_record_matches_measured_params_and_gmacs(variant):
    """Published params are exact; GMACs (timm's FlopCounterMode counts) agree to rounding."""
    spec = variant_spec(variant)
    at_224, at_384x224 = measured(variant, (224, 224)), measured(variant, (384, 224))
    assert round(at_224.params_m, 2) == spec.params_m
    assert abs(at_224.gmacs - spec.gmacs) < 0.006
    assert abs(at_384x224.gmacs - spec.gmacs_384x224) < 0.006
    if spec.paper_gflops is not None:  # the paper also counts some element-wise work: a few percent above
        assert 1.0 <= spec.paper_gflops / spec.gmacs < 1.15


def markdown_rows(path: Path, heading: str) -> list[list[str]]:
    """The cells of the first table under ``heading`` in a markdown file, header row excluded."""
    text = path.read_text()
    section = text[text.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows[1:]


def joined(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def test_readme_models_table_is_the_records():
    """README's "Models" table: one row per record, in order; measured columns match a fresh count."""
    rows = markdown_rows(ROOT / "README.md", "## Models")
    assert [row[0] for row in rows] == list(VARIANTS)
    for name, params, gmacs, total, gmacs_384, total_384, linear, top1 in rows:
        spec = VARIANT_SPECS[name]
        assert (params, gmacs, gmacs_384, top1) == (f"{spec.params_m:.2f}", f"{spec.gmacs:.2f}",
                                                   f"{spec.gmacs_384x224:.2f}", f"{spec.top1:.1f}"), name
        assert linear == ("-" if spec.family != "pvt_v2" else "yes" if spec.linear_sra else "no")
        assert float(total) == pytest.approx(measured(name, (224, 224)).total_gmacs, abs=0.006), name
        assert float(total_384) == pytest.approx(measured(name, (384, 224)).total_gmacs, abs=0.006), name


def test_variants_doc_table_is_the_records():
    rows = markdown_rows(ROOT / "docs" / "variants.md", "## The variants")
    assert [row[0] for row in rows] == list(VARIANTS)
    for name, dims, depths, mlp, linear, params, gmacs, gmacs_384, paper, top1 in rows:
        spec = VARIANT_SPECS[name]
        with torch.device("meta"):
            channels = [info["num_chs"] for info in create_model(name).feature_info]
        assert dims == joined(channels), name
        if spec.family == "pvt_v2":
            assert (depths, mlp) == (joined(spec.arch.depths), joined(spec.arch.mlp_ratios)), name
            assert linear == ("yes" if spec.linear_sra else "no")
        else:
            assert (depths, mlp, linear) == (joined(spec.arch), "-", "-"), name
        assert (params, gmacs, gmacs_384, top1) == (f"{spec.params_m:.2f}", f"{spec.gmacs:.2f}",
                                                   f"{spec.gmacs_384x224:.2f}", f"{spec.top1:.1f}"), name
        assert paper == ("-" if spec.paper_gflops is None else f"{spec.paper_gflops:.1f}"), name


def test_recipe_defaults_come_from_the_records():
    from pvt_lightning.models.registry import DEFAULT_DROP_PATH, DEFAULT_GRAD_CLIP, PVT_V2_CONFIGS

    assert DEFAULT_DROP_PATH == {n: s.drop_path for n, s in VARIANT_SPECS.items()}
    assert DEFAULT_GRAD_CLIP == {"b3": 1.0, "b4": 1.0, "b5": 1.0}  # the official recipe (docs/recipe.md)
    assert {n: c.linear_sra for n, c in PVT_V2_CONFIGS.items()} == {
        "b0": False, "b1": False, "b2": False, "b2_li": True, "b3": False, "b4": False, "b5": False}


def test_b2_with_linear_sra_is_b2_li():
    with torch.device("meta"):  # shapes and names only
        b2_li, b2_with, b2, b2_li_without = (create_model("b2_li"), create_model("b2", linear_sra=True),
                                             create_model("b2"), create_model("b2_li", linear_sra=False))
    assert {k: v.shape for k, v in b2_with.state_dict().items()} == {k: v.shape for k, v in b2_li.state_dict().items()}
    assert {k: v.shape for k, v in b2_li_without.state_dict().items()} == {k: v.shape for k, v in b2.state_dict().items()}


def test_names_prefix_and_unknown():
    assert create_model("pvt_v2_b0", num_classes=3).head.out_features == 3
    with pytest.raises(ValueError) as err:
        create_model("b9")
    for name in VARIANTS:
        assert name in str(err.value)


@pytest.mark.parametrize("size", [(224, 224), (384, 224), (32, 32), (97, 45)])
def test_any_input_size_and_feature_strides(size):
    model = create_model("b0", num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
    assert logits.shape == (2, 5)
    assert [f.shape[1] for f in features] == [32, 64, 160, 256]
    assert all(f.is_contiguous() for f in features)
    # Each patch embedding (kernel k, stride s, padding k // 2, k odd) maps a side n to (n - 1) // s + 1.
    h, w = size
    expected = []
    for s in (4, 2, 2, 2):
        h, w = (h - 1) // s + 1, (w - 1) // s + 1
        expected.append((h, w))
    assert [tuple(f.shape[2:]) for f in features] == expected


def test_too_small_input_names_minimum():
    with pytest.raises(ValueError, match=str(MIN_INPUT_SIZE)):
        create_model("b0")(torch.randn(1, 3, 31, 64))


def test_overrides_and_drop_path_rule():
    model = create_model("b0", drop_path_rate=0.1, depths=(1, 1, 2, 1))
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks]
    assert len(rates) == 5
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == sorted(rates)


def test_linear_sra_attention_pools_keys_to_7x7():
    model = create_model("b0", linear_sra=True)
    attn = model.stages[0].blocks[0].attn
    tokens = torch.randn(1, 56 * 56, 32)
    assert attn.reduce(tokens, (56, 56)).shape == (1, 49, 32)
    # Official linear mode: ReLU after fc1 in the MLP.
    assert model.stages[0].blocks[0].mlp.extra_relu


def test_b0_trains_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=4)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 4, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient reaches {missing}"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


@pytest.mark.parametrize("linear_sra", [False, True])
def test_grad_checkpointing_gives_same_gradients(linear_sra):
    torch.manual_seed(0)
    model = create_model("b0", num_classes=3, linear_sra=linear_sra)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])

    def grads():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_attention_macs_are_counted_and_reported_apart(monkeypatch):
    """b0 at 448x448: q.k^T and attn.v of every block cost N queries x M keys x C channels, twice.
    (Counted on the meta device: the counter sees the same ops, without computing them.)"""
    import torch.nn.functional as F

    with torch.device("meta"):
        model, li_model = create_model("b0"), create_model("b0", linear_sra=True)
    counted = measure_complexity(model, (448, 448))
    stages = [(112 * 112, 14 * 14, 32), (56 * 56, 14 * 14, 64), (28 * 28, 14 * 14, 160), (14 * 14, 14 * 14, 256)]
    expected = sum(2 * 2 * n * m * c for n, m, c in stages) / 1e9  # 2 blocks per stage, 2 matmuls per block
    assert counted.attention_gmacs == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kwargs: q)  # attention costs nothing
    without_attention = measure_complexity(model, (448, 448))
    # With attention nulled the counter sees only convolutions and linear layers: exactly our ``gmacs``.
    assert counted.gmacs == pytest.approx(without_attention.total_gmacs, rel=1e-9)
    li = measure_complexity(li_model, (448, 448))
    assert li.attention_gmacs == pytest.approx(sum(2 * 2 * n * 49 * c for n, _, c in stages) / 1e9, rel=1e-9)
