"""Weights in every supported layout load into our model and give timm's logits."""

import os
import pickle
import re

import pytest
import torch

from pvt_lightning import create_model
from pvt_lightning.errors import CheckpointError

timm = pytest.importorskip("timm")


def timm_to_official(state):
    """timm's official -> timm key mapping (docs/checkpoints.md), reversed, written independently of our loader."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^patch_embed\.", "patch_embed1.", key)
        key = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}.", key)
        key = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", key)
        key = key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        out[key] = value
    return out


def official_to_hf(state, embed_dims):
    """HF transformers' PvtV2 conversion (its convert script's renames, kv split into key/value)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(patch_embed|block|norm)(\d)\.(.*)$", key)
        if key.startswith("head."):
            out["classifier." + key[5:]] = value
            continue
        kind, i, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
        base = f"pvt_v2.encoder.layers.{i}."
        if kind == "patch_embed":
            out[base + "patch_embedding." + rest.replace("norm.", "layer_norm.")] = value
        elif kind == "norm":
            out[base + "layer_norm." + rest] = value
        else:
            j, rest = rest.split(".", 1)
            for old, new in [("attn.q.", "attention.query."), ("attn.sr.", "attention.spatial_reduction."),
                             ("attn.norm.", "attention.layer_norm."), ("attn.proj.", "attention.proj."),
                             ("norm1.", "layer_norm_1."), ("norm2.", "layer_norm_2."), ("mlp.fc1.", "mlp.dense1."),
                             ("mlp.fc2.", "mlp.dense2.")]:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
            prefix = f"{base}blocks.{j}."
            if rest.startswith("attn.kv."):
                leaf, dim = rest.split(".")[-1], embed_dims[i]
                out[prefix + "attention.key." + leaf], out[prefix + "attention.value." + leaf] = value[:dim], value[dim:]
            else:
                out[prefix + rest] = value
    return out


def reference_and_layouts(variant):
    torch.manual_seed(0)
    reference = timm.create_model(f"pvt_v2_{variant}", pretrained=False).eval()
    timm_state = reference.state_dict()
    official = timm_to_official(timm_state)
    embed_dims = create_model(variant, num_classes=0).config.embed_dims
    return reference, {
        "timm": timm_state,
        "official": official,
        "official-training": {"model": official, "epoch": 299, "args": {"lr": 5e-4}},
        "hf": official_to_hf(official, embed_dims),
    }


@pytest.mark.parametrize("variant", ["b0", pytest.param("b2_li", marks=pytest.mark.slow)])
def test_logits_match_timm_through_every_layout(variant, tmp_path):
    reference, layouts = reference_and_layouts(variant)
    inputs = {size: torch.randn(2, 3, *size) for size in [(224, 224), (384, 224)]}
    with torch.no_grad():
        expected = {size: reference(x) for size, x in inputs.items()}
    for layout, state in layouts.items():
        path = tmp_path / f"{layout}.pth"
        torch.save(state, path)
        model = create_model(variant, pretrained=path).eval()
        for size, x in inputs.items():
            with torch.no_grad():
                diff = (model(x) - expected[size]).abs().max().item()
            assert diff < 1e-4, f"{variant} {layout} {size}: max |diff| {diff}"
        # Our own layout round-trips too.
        ours = tmp_path / "ours.pth"
        torch.save(model.state_dict(), ours)
        again = create_model(variant, pretrained=ours).eval()
        with torch.no_grad():
            assert torch.equal(again(inputs[(224, 224)]), model(inputs[(224, 224)]))


def test_head_of_other_class_count_is_reinitialised_with_one_warning(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_model("b0").state_dict(), path)
    with pytest.warns(UserWarning, match=r"head\.weight.*head\.bias|re-initialised") as record:
        model = create_model("b0", num_classes=5, pretrained=path)
    assert len([w for w in record if "head" in str(w.message)]) == 1
    assert model.head.out_features == 5
    torch.testing.assert_close(model.stages[0].patch_embed.proj.weight, torch.load(path)["stages.0.patch_embed.proj.weight"])


def test_other_mismatches_are_errors_listing_keys(tmp_path):
    path = tmp_path / "b0.pth"
    torch.save(create_model("b0").state_dict(), path)
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        create_model("b1", pretrained=path)
    assert "stages.0.patch_embed.proj.weight" in str(err.value)
    with pytest.raises(CheckpointError, match="missing.*\n.*unexpected|unexpected|missing"):
        create_model("b0", linear_sra=True, pretrained=path)


def test_lightning_style_checkpoint_is_ours(tmp_path):
    model = create_model("b0", num_classes=3)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    loaded = create_model("b0", num_classes=3, pretrained=path)
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_booby_trapped_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        create_model("b0", pretrained=path)
    assert not marker.exists()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        create_model("b0", pretrained=tmp_path / "nope.pth")
    bad = tmp_path / "truncated.pth"
    torch.save(create_model("b0").state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        create_model("b0", pretrained=bad)
