"""Recipes, fine-tuning controls and class-imbalance handling: real image files, real Trainers, real checkpoints."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_folder, write_jpeg

from pvt_lightning.data import ImageFolderDataModule
from pvt_lightning.errors import DataError
from pvt_lightning.data.sampling import ClassBalancedSampler, balanced_class_weights, read_class_weights
from pvt_lightning.models import create_model
from pvt_lightning.training.losses import classification_loss
from pvt_lightning.training.module import ImageClassifier
from pvt_lightning.training.optim import param_groups
from pvt_lightning.training.recipes import RECIPE_FIELDS, SMALL_DATASET, choose_recipe

B0_DEPTHS = (2, 2, 2, 2)
PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]


def fit_quietly(module, datamodule, max_epochs: int, callbacks=(), ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                        **{"enable_checkpointing": False, **trainer_kwargs})
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def folder_with_counts(root: Path, counts: dict[str, int], size=(32, 32)) -> Path:
    """A train/ + val/ ImageFolder of real JPEGs: ``counts[c]`` training images of class c, 4 val images each."""
    rng = np.random.default_rng(0)
    for index, (name, count) in enumerate(counts.items()):
        colour = np.array(PALETTE[index], dtype=np.float32)
        for split, n in (("train", count), ("val", 4)):
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)
                write_jpeg(root / split / name / f"{i:03d}.jpg", pixels)
    return root


# --- recipes ---------------------------------------------------------------------------------------------

def test_auto_recipe_is_chosen_from_the_data():
    def auto(**kwargs):
        return choose_recipe("auto", **{"pretrained": False, "num_train_images": 1000, "demo": False,
                                        "variant": "b0", **kwargs})

    assert auto(pretrained=True).name == "finetune"
    assert auto(num_train_images=SMALL_DATASET - 1).name == "small"
    assert auto(num_train_images=SMALL_DATASET).name == "paper"
    small, demo = auto(num_train_images=1440), auto(num_train_images=1440, demo=True)
    assert small.values["epochs"] == 30 and demo.values["epochs"] == 6 and "demo" in demo.reason
    assert "1440 training images" in small.reason
    assert choose_recipe("paper", pretrained=True, num_train_images=10, demo=False, variant="b0").name == "paper"
    with pytest.raises(ValueError, match="choose one of: auto, paper, small, finetune"):
        choose_recipe("fast", pretrained=False, num_train_images=1, demo=False, variant="b0")


def test_recipe_values_yield_to_the_user_and_fill_every_field():
    recipe = choose_recipe("small", pretrained=False, num_train_images=1000, demo=False, variant="b5")
    resolved = recipe.resolve({"epochs": 7, "mixup": None, "grad_clip": None}, {"drop_path": 0.3, "grad_clip": 1.0})
    assert set(resolved) == set(RECIPE_FIELDS)
    assert resolved["epochs"] == 7  # the user's value
    assert resolved["mixup"] == 0.0 and resolved["base_lr"] == pytest.approx(8e-3)  # the recipe's
    assert resolved["grad_clip"] == 1.0  # the variant's (no recipe value)
    assert resolved["drop_path"] == 0.1  # small data: lighter than b5's 0.3
    paper = choose_recipe("paper", pretrained=False, num_train_images=10**6, demo=False, variant="b5")
    assert paper.resolve({}, {"drop_path": 0.3, "grad_clip": 1.0})["drop_path"] == 0.3


@pytest.mark.parametrize("variant", ["b0", "b2", "b5", "resnet50"])
def test_finetune_recipe_puts_the_stem_at_a_tenth_of_the_head(variant):
    recipe = choose_recipe("auto", pretrained=True, num_train_images=500, demo=False, variant=variant)
    with torch.device("meta"):  # structure only: no weights to initialise
        model = create_model(variant, num_classes=2)
    blocks = (sum(len(stage.blocks) for stage in model.stages) if hasattr(model, "stages")
              else sum(len(getattr(model, f"layer{i}")) for i in range(1, 5)))
    assert recipe.values["layer_decay"] ** (blocks + 1) == pytest.approx(0.1, rel=0.05)
    small = choose_recipe("small", pretrained=False, num_train_images=500, demo=False, variant=variant)
    assert recipe.values["base_lr"] < small.values["base_lr"] and recipe.values["mixup"] == 0.0
    large = choose_recipe("auto", pretrained=True, num_train_images=100_000, demo=False, variant=variant)
    paper = choose_recipe("paper", pretrained=False, num_train_images=100_000, demo=False, variant=variant)
    assert large.values["base_lr"] < paper.values["base_lr"] and large.values["epochs"] < paper.values["epochs"]
    assert large.values["mixup"] == 0.1  # BiT: a little MixUp from 20k images on


# --- --pretrained in every layout ------------------------------------------------------------------------

def timm_to_ours(state):
    """timm -> our keys, written here independently of models/weights.py."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^patch_embed\.", "stages.0.patch_embed.", key)
        key = re.sub(r"^stages\.(\d)\.downsample\.", r"stages.\1.patch_embed.", key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """A 3-class b0 (timm's random init, seeded) saved in every layout --pretrained reads, and its tensors."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    from test_checkpoints import official_to_hf, timm_to_official

    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(1)
    source = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=3).state_dict()
    official = timm_to_official(source)
    hf = official_to_hf(official, (32, 64, 160, 256))
    (root / "hf_folder").mkdir()
    (root / "hf_bin").mkdir()
    files = {
        "official.pth": lambda p: torch.save({"model": official}, p),
        "timm.pth": lambda p: torch.save(source, p),
        "timm.safetensors": lambda p: save_file(source, str(p)),
        "hf_folder/model.safetensors": lambda p: save_file(hf, str(p)),
        "hf_bin/pytorch_model.bin": lambda p: torch.save(hf, p),
    }
    for name, write in files.items():
        write(root / name)
    paths = {name: root / name for name in files} | {"hf_folder": root / "hf_folder", "hf_bin": root / "hf_bin"}

    # Our own .ckpt, written by a real Trainer after training a few steps from the timm weights.
    data = make_image_folder(root / "data", classes=("a", "b", "c"), per_class=4, size=(32, 32))
    module = ImageClassifier("b0", num_classes=3, img_size=(32, 32), lr=1e-3, pretrained=str(root / "timm.pth"))
    trainer = fit_quietly(module, ImageFolderDataModule(data, img_size=32, batch_size=4, num_workers=0), 1)
    trainer.save_checkpoint(root / "ours.ckpt")
    paths["ours.ckpt"] = root / "ours.ckpt"
    saved = torch.load(root / "ours.ckpt", weights_only=True)["state_dict"]
    expected = {name: timm_to_ours(source) for name in paths}
    expected["ours.ckpt"] = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert not torch.equal(expected["ours.ckpt"]["stages.0.patch_embed.proj.weight"],
                           expected["timm.pth"]["stages.0.patch_embed.proj.weight"])  # it did train
    return paths, expected


@pytest.mark.parametrize("layout", ["official.pth", "timm.pth", "timm.safetensors", "hf_folder/model.safetensors",
                                    "hf_folder", "hf_bin/pytorch_model.bin", "hf_bin", "ours.ckpt"])
def test_pretrained_loads_every_backbone_tensor_and_keeps_a_matching_head(layouts, layout):
    paths, expected = layouts
    want = expected[layout]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same class count: no head warning
        same = ImageClassifier("b0", num_classes=3, img_size=(32, 32), pretrained=str(paths[layout]))
    state = same.model.state_dict()
    assert set(state) == set(want)
    for key, tensor in state.items():
        assert torch.equal(tensor, want[key]), key  # every tensor, the head included

    with pytest.warns(UserWarning, match="re-initialised"):
        other = ImageClassifier("b0", num_classes=5, img_size=(32, 32), pretrained=str(paths[layout]))
    state = other.model.state_dict()
    for key, tensor in state.items():
        if not key.startswith("head."):
            assert torch.equal(tensor, want[key]), key
    assert state["head.weight"].shape == (5, 256) and torch.equal(state["head.bias"], torch.zeros(5))
    assert 0 < state["head.weight"].abs().max() < 1e-4  # a near-zero new head: every class equally likely


# --- freezing the backbone ------------------------------------------------------------------------------------

class Snapshots(L.Callback):
    """Backbone and head parameters at the end of every epoch (and at the start of the first one seen)."""

    def __init__(self):
        self.at: dict[str, dict[str, torch.Tensor]] = {}
        self.backbone_state_at_start: dict[int, int] = {}

    @staticmethod
    def take(module):
        return {name: p.detach().clone() for name, p in module.model.named_parameters()}

    def on_train_epoch_start(self, trainer, module):
        self.at.setdefault("start", self.take(module))
        optimizer = trainer.optimizers[0]
        backbone = [p for name, p in module.model.named_parameters() if not name.startswith("head.")]
        self.backbone_state_at_start[trainer.current_epoch] = sum(len(optimizer.state[p]) > 0 for p in backbone)

    def on_train_epoch_end(self, trainer, module):
        self.at[trainer.current_epoch] = self.take(module)


def changed(before, after, head: bool) -> list[str]:
    return [n for n in before if n.startswith("head.") == head and not torch.equal(before[n], after[n])]


@pytest.fixture
def two_class_data(tmp_path):
    folder = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=8, size=(32, 32))
    return ImageFolderDataModule(folder, img_size=32, batch_size=4, num_workers=0)  # 4 steps per epoch


def test_frozen_backbone_is_unchanged_in_epoch_0_and_trains_from_epoch_1(two_class_data):
    L.seed_everything(0)
    module = ImageClassifier("b0", num_classes=2, img_size=(32, 32), lr=1e-3, warmup_epochs=0.0,
                             freeze_backbone_epochs=1)
    snapshots = Snapshots()
    lrs = []
    recorder = L.Callback()
    recorder.on_train_batch_start = lambda trainer, *args: lrs.append(
        [(g["head"], g["lr"]) for g in trainer.optimizers[0].param_groups])
    fit_quietly(module, two_class_data, 2, [snapshots, recorder], limit_val_batches=0)
    start, epoch0, epoch1 = snapshots.at["start"], snapshots.at[0], snapshots.at[1]
    assert changed(start, epoch0, head=False) == []  # not one backbone tensor moved in epoch 0
    assert changed(start, epoch0, head=True)  # while the head learnt
    assert len(changed(epoch0, epoch1, head=False)) == len([n for n in start if not n.startswith("head.")])
    assert snapshots.backbone_state_at_start[1] == 0  # released with fresh AdamW moments
    # Backbone groups: lr 0 during the 4 frozen steps, then warming up again; the head's never 0.
    assert all(lr == 0.0 for step in lrs[:4] for head, lr in step if not head)
    assert all(lr > 0.0 for step in lrs for head, lr in step if head)
    assert all(lr > 0.0 for step in lrs[4:] for head, lr in step if not head)


@pytest.mark.slow
def test_freezing_survives_resume(two_class_data, tmp_path):
    """Interrupted after epoch 0 of a 2-epoch freeze: the resumed run keeps the backbone frozen in epoch 1."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class StopAfterEpoch0(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    def module():
        return ImageClassifier("b0", num_classes=2, img_size=(32, 32), lr=1e-3, warmup_epochs=1.0,
                               freeze_backbone_epochs=2)

    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=True)
    fit_quietly(module(), two_class_data, 3, [saver, StopAfterEpoch0()], enable_checkpointing=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    snapshots = Snapshots()
    resumed = module()
    trainer = fit_quietly(resumed, two_class_data, 3, [snapshots], ckpt_path=str(last))
    saved = {k.removeprefix("model."): v for k, v in torch.load(last, weights_only=True)["state_dict"].items()}
    assert resumed.frozen_steps == 8
    assert changed(saved, snapshots.at[1], head=False) == []  # epoch 1: still frozen after the resume
    assert changed(saved, snapshots.at[1], head=True)
    assert snapshots.backbone_state_at_start[2] == 0
    assert changed(snapshots.at[1], snapshots.at[2], head=False)  # epoch 2: released
    assert trainer.global_step == 12


# --- layer-wise learning-rate decay ----------------------------------------------------------------------------

def expected_b0_layer(name: str) -> int:
    """Depth index of a b0 parameter: 0 = the stem's patch embedding, 1..8 the blocks, 9 the head."""
    if name.startswith("head."):
        return sum(B0_DEPTHS) + 1
    stage = int(name.split(".")[1])
    before = sum(B0_DEPTHS[:stage])
    if ".patch_embed." in name:
        return 0 if stage == 0 else before + 1  # downsampling joins its stage's first block
    if ".norm." in name and ".blocks." not in name:
        return before + B0_DEPTHS[stage]  # the stage's final norm joins its last block
    return before + 1 + int(name.split(".")[3])


def test_layer_decay_sets_each_groups_rate_from_its_depth(two_class_data):
    module = ImageClassifier("b0", num_classes=2, img_size=(32, 32), lr=1e-3, weight_decay=0.05,
                             layer_decay=0.75, head_lr_scale=3.0)

    class StopAfterFirstStep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = True

    trainer = fit_quietly(module, two_class_data, 1, [StopAfterFirstStep()], limit_val_batches=0)
    groups = trainer.optimizers[0].param_groups
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, param in module.model.named_parameters():
        depth = expected_b0_layer(name)
        rate = 1e-3 * 0.75 ** (9 - depth) * (3.0 if name.startswith("head.") else 1.0)
        group = group_of[id(param)]
        assert group["initial_lr"] == pytest.approx(rate), name
        assert group["weight_decay"] == (0.0 if param.ndim <= 1 else 0.05), name
    assert len(group_of) == len(list(module.model.parameters()))
    assert len(groups) == 2 * 10  # (decay, no decay) x 10 depths


def test_layer_decay_covers_every_resnet_parameter():
    model = create_model("resnet50", num_classes=3)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(rate) == len(named)
    assert rate[id(named["fc.weight"])] == 1.0
    assert rate[id(named["layer4.2.conv3.weight"])] == 0.5  # the last block
    assert rate[id(named["layer1.0.downsample.0.weight"])] == 0.5 ** 16  # the first block
    assert rate[id(named["conv1.weight"])] == 0.5 ** 17  # the stem, lowest


def test_no_layer_decay_keeps_the_two_official_groups():
    groups = param_groups(create_model("b0", num_classes=3), lr=1e-3, weight_decay=0.05, layer_decay=1.0)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.05), (1e-3, 0.0)]


# --- class imbalance: sampler, weights, loss ----------------------------------------------------------------------

def test_balanced_sampler_draws_classes_equally_on_a_10_to_1_folder(tmp_path):
    data = folder_with_counts(tmp_path / "data", {"common": 100, "rare": 10})
    datamodule = ImageFolderDataModule(data, img_size=32, batch_size=10, num_workers=0, sampler="balanced")
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler)
    drawn, epochs = Counter(), []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        labels = [int(label) for _, targets in loader for label in targets]  # real decoded batches
        assert len(labels) == 110  # the epoch keeps its length
        drawn.update(labels)
        epochs.append(labels)
    assert epochs[0] != epochs[1]  # a new draw each epoch
    # 330 draws, p = 1/2 each: 4 standard deviations is 36.
    assert abs(drawn[1] - 165) < 4 * math.sqrt(330 * 0.25), drawn
    sqrt = ClassBalancedSampler([0] * 100 + [1] * 10, "sqrt")
    rare = sum(index >= 100 for epoch in range(20) for index in (sqrt.set_epoch(epoch) or list(sqrt)))
    assert abs(rare / 2200 - math.sqrt(10) / (math.sqrt(10) + 10)) < 0.03  # sqrt: in proportion to sqrt(n_c)


def test_sampler_splits_its_draws_across_ranks():
    labels = [0] * 100 + [1] * 10
    ranks = [ClassBalancedSampler(labels, "balanced", num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [55, 55] and [len(s) for s in ranks] == [55, 55]
    one = ClassBalancedSampler(labels, "balanced", num_replicas=1, rank=0, seed=3)
    together = [index for pair in zip(*shares) for index in pair]
    assert together == list(one)  # the ranks interleave to exactly the single-process draw


def test_sampler_stays_in_place_in_a_lightning_fit(tmp_path):
    data = folder_with_counts(tmp_path / "data", {"common": 40, "rare": 4})
    seen = Counter()

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.update(batch[1].tolist())

    module = ImageClassifier("b0", num_classes=2, img_size=(32, 32), lr=1e-3)
    datamodule = ImageFolderDataModule(data, img_size=32, batch_size=11, num_workers=0, sampler="balanced")
    trainer = fit_quietly(module, datamodule, 1, [Count()], limit_val_batches=0)
    assert isinstance(trainer.train_dataloader.sampler, ClassBalancedSampler)
    assert sum(seen.values()) == 44 and seen[1] > 10  # 4 rare images drawn ~22 times (sd 3.3) in one epoch


@pytest.mark.slow
def test_balanced_sampler_under_two_process_ddp(tmp_path):
    """gloo DDP on CPU: each rank draws its own half, every epoch as long as usual, classes balanced overall."""
    data = folder_with_counts(tmp_path / "data", {"common": 100, "rare": 10})
    script = tmp_path / "ddp_sampler.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import lightning as L
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pvt_lightning.data import ImageFolderDataModule
        from pvt_lightning.training.module import ImageClassifier

        class Record(L.Callback):
            def __init__(self):
                self.labels = {{}}
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.labels.setdefault(trainer.current_epoch, []).extend(batch[1].tolist())
            def on_train_end(self, trainer, module):
                sampler = trainer.train_dataloader.sampler
                out = {{"labels": self.labels, "sampler": type(sampler).__name__, "rank": trainer.global_rank}}
                with open(f"{tmp_path}/rank{{trainer.global_rank}}.json", "w") as f:
                    json.dump(out, f)

        if __name__ == "__main__":
            L.seed_everything(0)
            module = ImageClassifier("b0", num_classes=2, img_size=(32, 32), lr=1e-3)
            data = ImageFolderDataModule({str(data)!r}, img_size=32, batch_size=11, num_workers=0,
                                         sampler="balanced")
            trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                                limit_val_batches=0, callbacks=[Record()])
            trainer.fit(module, datamodule=data)
        """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sampler"] for r in ranks] == ["ClassBalancedSampler"] * 2  # not replaced by Lightning's wrapper
    drawn = Counter()
    for epoch in ("0", "1", "2"):
        shares = [r["labels"][epoch] for r in ranks]
        assert [len(s) for s in shares] == [55, 55]  # each rank its half: the epoch keeps its 110 draws
        drawn.update(shares[0] + shares[1])
    assert ranks[0]["labels"]["0"] != ranks[1]["labels"]["0"]
    assert abs(drawn[1] - 165) < 4 * math.sqrt(330 * 0.25), drawn


def test_class_weights_balanced_and_from_json(tmp_path):
    assert balanced_class_weights([100, 10]) == pytest.approx([110 / 200, 110 / 20])  # N / (C n_c)
    table = tmp_path / "weights.json"
    table.write_text(json.dumps({"rare": 4, "common": 0.5}))
    assert read_class_weights(table, ["common", "rare"]) == [0.5, 4.0]
    table.write_text(json.dumps({"rare": 4}))
    with pytest.raises(DataError, match=r"weights.json.*missing: common"):
        read_class_weights(table, ["common", "rare"])
    table.write_text(json.dumps({"rare": 4, "common": -1}))
    with pytest.raises(DataError, match="'common' must be a finite number >= 0"):
        read_class_weights(table, ["common", "rare"])


def test_weighted_and_focal_losses_follow_their_formulas():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    hard = torch.tensor([0, 1, 2, 2, 1, 0])
    p = logits.softmax(dim=-1)
    p_true = p[torch.arange(6), hard]
    weights = torch.tensor([0.5, 1.0, 4.0])
    assert classification_loss(logits, hard) == pytest.approx(F.cross_entropy(logits, hard).item(), rel=1e-6)
    weighted = (weights[hard] * -p_true.log()).mean()  # divided by the batch, not the summed weights
    assert classification_loss(logits, hard, class_weight=weights) == pytest.approx(weighted.item(), rel=1e-6)
    focal = (-(1 - p_true) ** 2 * p_true.log()).mean()
    assert classification_loss(logits, hard, gamma=2.0) == pytest.approx(focal.item(), rel=1e-5)
    # Soft targets (MixUp) with label smoothing and weights: sum_c w_c q_c (1 - p_c)^gamma (-log p_c).
    soft = torch.tensor([[0.7, 0.3, 0.0]] * 6)
    q = soft * 0.9 + 0.1 / 3
    expected = (weights * q * (1 - p) ** 2 * -p.log()).sum(dim=1).mean()
    got = classification_loss(logits, soft, label_smoothing=0.1, class_weight=weights, gamma=2.0)
    assert got == pytest.approx(expected.item(), rel=1e-5)
    ce_soft = (q * -p.log()).sum(dim=1).mean()
    assert classification_loss(logits, soft, label_smoothing=0.1) == pytest.approx(ce_soft.item(), rel=1e-5)


def test_class_weights_and_focal_loss_train_and_reload(tmp_path):
    data = folder_with_counts(tmp_path / "data", {"common": 12, "rare": 4})
    module = ImageClassifier("b0", num_classes=2, class_names=["common", "rare"], img_size=(32, 32), lr=1e-3,
                             class_weights=balanced_class_weights([12, 4]), loss="focal", focal_gamma=1.5, mixup=0.5)
    trainer = fit_quietly(module, ImageFolderDataModule(data, img_size=32, batch_size=4, num_workers=0), 1)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "run.ckpt")
    assert restored.hparams.class_weights == pytest.approx([16 / 24, 16 / 8])
    assert restored.hparams.loss == "focal" and restored.hparams.focal_gamma == 1.5
    assert torch.equal(restored.class_weight, torch.tensor([16 / 24, 16 / 8]))
    # The hyper-parameters are plain data: the checkpoint loads without unpickling anything else.
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["hyper_parameters"]["layer_decay"] is None
