"""The PVTv2 family: architecture facts from REFERENCE.md, any input size, training behaviour."""

import pytest
import torch

from pvt_lightning import create_model, measure_complexity
from pvt_lightning.models import MIN_INPUT_SIZE, VARIANTS

# REFERENCE.md: exact parameter counts (M, 1000-class head) and FlopCounterMode GMACs at 224x224.
REFERENCE = {
    "b0": (3.67, 0.53), "b1": (14.01, 2.03), "b2": (25.36, 3.88), "b2_li": (22.55, 3.75),
    "b3": (45.24, 6.68), "b4": (62.56, 9.79), "b5": (81.96, 11.35),
}
REFERENCE_GMACS_384x224 = {"b0": 0.90, "b2": 6.66, "b2_li": 6.27}


@pytest.mark.parametrize("variant", sorted(REFERENCE))
def test_params_and_gmacs_match_reference(variant):
    params_m, gmacs = REFERENCE[variant]
    c = measure_complexity(create_model(variant), (224, 224))
    assert round(c.params_m, 2) == params_m
    assert abs(c.gmacs - gmacs) / gmacs < 0.03


@pytest.mark.parametrize("variant", sorted(REFERENCE_GMACS_384x224))
def test_gmacs_non_square(variant):
    gmacs = measure_complexity(create_model(variant), (384, 224)).gmacs
    assert abs(gmacs - REFERENCE_GMACS_384x224[variant]) / REFERENCE_GMACS_384x224[variant] < 0.03


def test_b2_with_linear_sra_is_b2_li():
    b2_li = create_model("b2", linear_sra=True)
    assert sum(p.numel() for p in b2_li.parameters()) == sum(p.numel() for p in create_model("b2_li").parameters())
    assert b2_li.state_dict().keys() == create_model("b2_li").state_dict().keys()
    assert create_model("b2_li", linear_sra=False).state_dict().keys() == create_model("b2").state_dict().keys()


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


def test_reset_classifier_and_headless():
    model = create_model("b0")
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert create_model("b0", num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    resnet = create_model("resnet50", num_classes=4)
    assert resnet(torch.randn(1, 3, 64, 96)).shape == (1, 4)
    resnet.reset_classifier(2)
    assert resnet(torch.randn(1, 3, 64, 64)).shape == (1, 2)


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
    """b0 at 448x448: q.k^T and attn.v of every block cost N queries x M keys x C channels, twice."""
    import torch.nn.functional as F

    model = create_model("b0")
    counted = measure_complexity(model, (448, 448))
    stages = [(112 * 112, 14 * 14, 32), (56 * 56, 14 * 14, 64), (28 * 28, 14 * 14, 160), (14 * 14, 14 * 14, 256)]
    expected = sum(2 * 2 * n * m * c for n, m, c in stages) / 1e9  # 2 blocks per stage, 2 matmuls per block
    assert counted.attention_gmacs == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kwargs: q)  # attention costs nothing
    without_attention = measure_complexity(model, (448, 448))
    # With attention nulled the counter sees only convolutions and linear layers: exactly our ``gmacs``.
    assert counted.gmacs == pytest.approx(without_attention.total_gmacs, rel=1e-9)
    li = measure_complexity(create_model("b0", linear_sra=True), (448, 448))
    assert li.attention_gmacs == pytest.approx(sum(2 * 2 * n * 49 * c for n, _, c in stages) / 1e9, rel=1e-9)
