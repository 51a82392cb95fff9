"""The speed work in models/ (pvt_v2.py, attention.py, tokens.py) keeps the numerics: same logits as timm and
as the autograd path, same gradients with grad checkpointing, and the pooling fast path equals adaptive average
pooling."""

import pytest
import torch
import torch.nn.functional as F

from pvt_lightning import create_model
from tools.bench.reference import reference_with_same_weights
from pvt_lightning.models.attention import pool_tokens, pool_tokens_by_matmul
from pvt_lightning.models.tokens import tokens_to_map

timm = pytest.importorskip("timm")

SIZES = [(64, 64), (96, 64), (112, 56)]  # square; non-square, sides not multiples of 7; multiples of 7 (fast pool)


@pytest.fixture(scope="module", params=["b0", "b2_li"])
def pair(request):
    torch.manual_seed(0)
    ours = create_model(request.param).eval()
    return ours, reference_with_same_weights(ours, request.param).eval()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_match_timm(pair, size):
    ours, ref = pair
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # our in-place inference path
        fast = ours(x)
        expected = ref(x)
    plain = ours(x)  # autograd on: no in-place ops
    assert (fast - expected).abs().max() < 1e-4
    assert (plain - expected).abs().max() < 1e-4
    assert (fast - plain).abs().max() < 1e-4


def test_intermediates_are_contiguous_nchw_maps_matching_timm(pair):
    ours, ref = pair
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        maps, ref_maps = ours.forward_intermediates(x, intermediates_only=True), ref.forward_intermediates(
            x, intermediates_only=True)
    for i, (m, r) in enumerate(zip(maps, ref_maps)):
        assert m.shape == r.shape == (1, ours.config.embed_dims[i], 96 // 2 ** (i + 2), 64 // 2 ** (i + 2))
        assert m.is_contiguous()
        assert (m - r).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["b0", pytest.param("b2_li", marks=pytest.mark.slow)])
def test_gradients_match_timm(variant):
    torch.manual_seed(0)
    ours = create_model(variant, num_classes=10).train()
    ref = reference_with_same_weights(ours, variant).train()
    x = torch.randn(2, 3, 64, 96)  # non-square
    for model in (ours, ref):
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        key = name.replace("stages.0.patch_embed.", "patch_embed.")
        key = key.replace(".patch_embed.", ".downsample.") if key.startswith("stages.") else key
        torch.testing.assert_close(p.grad, ref_grads[key].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=10).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        x.grad = None
        loss = F.cross_entropy(model(x), torch.tensor([3, 7]))
        loss.backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    assert len(grads[0]) == len(grads[1]) > 100
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hw", [(56, 56), (28, 14), (14, 7), (7, 7), (8, 8), (10, 13), (15, 9), (3, 5)])
def test_pooling_fast_path_equals_adaptive_pool(hw):
    x = torch.randn(2, hw[0] * hw[1], 16)
    expected = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 16, *hw), 7).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_tokens(x, hw, 7), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hw", [(9, 9), (16, 23), (64, 73)])
def test_matmul_pooling_equals_adaptive_pool(hw):
    """The CUDA path for sides that are not multiples of 7 (checked here on CPU) is adaptive pooling exactly."""
    x = torch.randn(3, hw[0] * hw[1], 8, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(3, 8, *hw), 7).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_tokens_by_matmul(x, hw, 7), expected, atol=1e-12, rtol=1e-12)


def test_tokens_to_map_is_a_channels_last_view():
    x = torch.randn(2, 12, 5)
    m = tokens_to_map(x, (3, 4))
    assert m.shape == (2, 5, 3, 4) and m.data_ptr() == x.data_ptr()
    assert m.is_contiguous(memory_format=torch.channels_last)
