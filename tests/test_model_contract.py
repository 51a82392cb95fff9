"""timm's model contract on every variant and on resnet50, with timm's own ``pvt_v2_*`` as the reference.

Each model is built once (module-scoped) and run on one 32x64 image, so b5 stays fast.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pvt_lightning import create_model
from tools.bench.reference import reference_with_same_weights
from pvt_lightning.models import VARIANTS, FeatureBackbone, ResNetClassifier, variant_spec

pytest.importorskip("timm")

SIZE = (32, 64)  # (H, W): non-square, the smallest PVTv2 input, every stage's side a whole number
STRIDES = [4, 8, 16, 32]


def shapes(tensors):
    return [tuple(t.shape) for t in tensors]


BIG = ("b3", "b4", "b5")
"""Building and running these dominates the fast tier; they run in the slow tier (CI runs both)."""


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name in BIG else name
                                        for name in VARIANTS])
def built(request):
    """(name, our model in eval mode, a 1x3x32x64 input, the outputs of its forward_* calls on it)."""
    name = request.param
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.forward_features(x)
        outputs = dict(features=features, logits=model(x), head=model.forward_head(features),
                       pooled=model.forward_head(features, pre_logits=True), intermediates=model.forward_intermediates(x))
    return name, model, x, outputs


def test_forward_is_forward_head_of_forward_features(built):
    name, model, _, out = built
    assert out["features"].shape == (1, model.num_features, SIZE[0] // 32, SIZE[1] // 32)
    assert out["logits"].shape == (1, 1000) and model.num_classes == 1000
    assert torch.equal(out["head"], out["logits"])
    assert out["pooled"].shape == (1, model.num_features)
    head = model.get_classifier()
    with torch.no_grad():
        assert torch.equal(head(out["pooled"]), out["logits"])
    assert head is model.get_submodule(variant_spec(name).classifier)
    assert isinstance(head, nn.Linear) and head.in_features == model.num_features


def test_forward_intermediates_gives_four_maps_at_strides_4_to_32(built):
    _, model, x, out = built
    H, W = SIZE
    final, maps = out["intermediates"]
    channels = [info["num_chs"] for info in model.feature_info]
    assert [info["reduction"] for info in model.feature_info] == STRIDES
    assert shapes(maps) == [(1, c, H // s, W // s) for c, s in zip(channels, STRIDES)]
    assert channels[-1] == model.num_features
    assert all(m.is_contiguous() for m in maps)
    assert torch.equal(final, out["features"]) and torch.equal(maps[-1], out["features"])
    with torch.no_grad():  # stop_early: stages after the last one taken do not run
        final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert shapes(early) == shapes([maps[1]]) and final.shape == maps[1].shape
    assert torch.equal(early[0], maps[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_timm_gives_the_same_maps_shapes_and_preprocessing(built):
    """timm's own model, carrying our weights, answers the same calls with the same shapes and values."""
    name, model, x, out = built
    if not variant_spec(name).reference.startswith("timm:"):
        pytest.skip(f"{name}'s reference is not a timm model (resnet50: its stem is not an intermediate here)")
    ref = reference_with_same_weights(model, name).eval()
    with torch.no_grad():
        ref_final, ref_maps = ref.forward_intermediates(x)
        final, maps = out["intermediates"]
        assert shapes([final, *maps]) == shapes([ref_final, *ref_maps])
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(maps, ref_maps))
        assert ref.forward_features(x).shape == out["features"].shape
        assert ref.forward_head(ref_final, pre_logits=True).shape == out["pooled"].shape
        # timm's index rule: an int takes the last n stages, a sequence those stages (negative from the end)
        for kwargs in (dict(indices=2), dict(indices=[0, -1], stop_early=True)):
            assert shapes(model.forward_intermediates(x, intermediates_only=True, **kwargs)) == shapes(
                ref.forward_intermediates(x, intermediates_only=True, **kwargs)), kwargs
    assert model.num_features == ref.num_features
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [
        (i["num_chs"], i["reduction"]) for i in ref.feature_info]
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes", "classifier"):
        assert model.pretrained_cfg[key] == ref.pretrained_cfg[key], key
    assert model.default_cfg is model.pretrained_cfg


def test_features_only_backbone_reports_its_outputs(built):
    _, model, x, out = built
    backbone = FeatureBackbone(copy.deepcopy(model), out_indices=(0, 2))
    with torch.no_grad():
        maps = backbone(x)
    assert [m.shape[1] for m in maps] == backbone.feature_info.channels()
    assert [SIZE[0] // m.shape[2] for m in maps] == backbone.feature_info.reduction() == [4, 16]
    assert [SIZE[1] // m.shape[3] for m in maps] == [4, 16]
    full = out["intermediates"][1]
    assert torch.equal(maps[0], full[0]) and torch.equal(maps[1], full[2])
    # the last stage and the head are gone, not just unused
    assert count(backbone) < count(model) and isinstance(backbone.model.get_classifier(), nn.Identity)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["b0", "resnet50"])
def test_create_model_features_only_loads_weights_before_the_cut(tmp_path, name):
    torch.manual_seed(0)
    full = create_model(name).eval()
    torch.save(full.state_dict(), tmp_path / "weights.pth")
    backbone = create_model(name, features_only=True, out_indices=(1, 2), pretrained=tmp_path / "weights.pth").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
        maps = backbone(x)
    assert shapes(maps) == shapes(expected)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    assert backbone.feature_info.reduction() == [8, 16]
    with pytest.raises(ValueError, match="features_only"):
        create_model(name, out_indices=(1, 2))


@pytest.mark.parametrize("name", ["b0", "resnet50"])
def test_reset_classifier_and_pooling(name):
    model = create_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5) and model.num_classes == 5
    model.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (1, model.num_features, 1, 1)  # unpooled last map
    assert create_model(name, num_classes=0).eval()(x).shape == (1, model.num_features)  # headless: pooled features
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_resnet_grad_checkpointing_keeps_gradients_and_batchnorm_statistics():
    torch.manual_seed(0)
    plain = ResNetClassifier(layers=(1, 1, 1, 1), num_classes=3).train()  # resnet50's class, one block per stage
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for model in (plain, checkpointed):
        F.cross_entropy(model(x), y).backward()
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    buffers = dict(checkpointed.named_buffers())
    for name, b in plain.named_buffers():  # the block recomputed in backward must not update them again
        torch.testing.assert_close(buffers[name], b, msg=name)
