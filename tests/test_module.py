"""ImageClassifier pieces: metrics, optimiser groups, learning-rate schedule, preprocessing in checkpoints."""

from dataclasses import dataclass

import lightning as L
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from pvt_lightning.models.registry import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from pvt_lightning.training.module import ImageClassifier, classification_metrics
from pvt_lightning.training.optim import WarmupCosine, scaled_lr


def test_macro_metrics_are_right_when_the_first_batch_is_perfect():
    """Regression: torchmetrics' inferred compute groups merged precision/recall/F1 with acc5's state."""
    metrics = classification_metrics(3, "val/")
    batches = [(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0])),
               (torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 1, 1]))]
    for preds, target in batches:
        metrics.update(torch.nn.functional.one_hot(preds, 3).float(), target)
    result = {k: v.item() for k, v in metrics.compute().items()}
    preds = torch.cat([p for p, _ in batches]).numpy()
    target = torch.cat([t for _, t in batches]).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(target, preds, labels=[0, 1, 2], average="macro",
                                                               zero_division=0)
    assert result["val/precision"] == pytest.approx(precision)
    assert result["val/recall"] == pytest.approx(recall)
    assert result["val/f1"] == pytest.approx(f1)
    assert result["val/acc"] == pytest.approx(6 / 8)


def test_warmup_then_cosine():
    schedule = WarmupCosine(warmup_steps=10, total_steps=110, warmup_factor=0.01, min_factor=0.02)
    assert schedule(0) == pytest.approx(0.01)
    assert schedule(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.02 + 0.98 * 0.5)
    assert schedule(110) == pytest.approx(0.02)
    values = [schedule(s) for s in range(10, 111)]
    assert values == sorted(values, reverse=True)


def test_lr_scales_with_total_batch():
    assert scaled_lr(512) == pytest.approx(5e-4)
    assert scaled_lr(1024) == pytest.approx(1e-3)


def test_no_weight_decay_on_norms_and_biases_and_step_schedule():
    module = ImageClassifier("b0", num_classes=3, img_size=(32, 32))
    data = torch.utils.data.TensorDataset(torch.randn(20, 3, 32, 32), torch.randint(0, 3, (20,)))

    class StopAfterFirstStep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = True

    trainer = L.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[StopAfterFirstStep()])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))  # 10 steps per epoch, 100 in all
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))
    # Warm-up of 5 epochs = 50 steps, then cosine over the rest, stepped per optimizer step.
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    assert config.scheduler.lr_lambdas[0].warmup_steps == 50 and config.scheduler.lr_lambdas[0].total_steps == 100


def test_mixup_cutmix_train_with_soft_targets():
    module = ImageClassifier("b0", num_classes=3, img_size=(32, 32), mixup=0.8, cutmix=1.0)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    mixed_images, soft = module.mix(images, targets)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(dim=1), torch.ones(4))
    assert not torch.equal(mixed_images, images)


def test_official_drop_path_defaults():
    assert ImageClassifier("b0", num_classes=2).hparams.drop_path == 0.1
    assert ImageClassifier("b3", num_classes=2).hparams.drop_path == 0.3


def fitted_checkpoint(module: ImageClassifier, path) -> None:
    """One real optimizer step, then the Trainer's own checkpoint file."""
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(path)


def test_checkpoint_keeps_the_preprocessing_and_old_checkpoints_get_the_defaults(tmp_path):
    module = ImageClassifier("b0", num_classes=3, img_size=(32, 32), crop_pct=0.95)
    fitted_checkpoint(module, tmp_path / "new.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "new.ckpt")
    assert loaded.preprocessing.crop_pct == 0.95
    assert loaded.preprocessing.img_size == (32, 32) and loaded.preprocessing.mean == IMAGENET_MEAN

    # A checkpoint written before the preprocessing was saved: the same file without those hyper-parameters.
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    for key in ("crop_pct", "mean", "std", "interpolation"):
        del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = ImageClassifier.load_from_checkpoint(tmp_path / "old.ckpt")
    assert old.preprocessing.crop_pct == EVAL_CROP_PCT == 0.875
    assert old.preprocessing.std == IMAGENET_STD and old.preprocessing.img_size == (32, 32)
    assert old.preprocessing.interpolation == "bilinear"
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), loaded.state_dict().values()))


@dataclass
class ModelGroup:
    variant: str = "b0"
    drop_path: float | None = None
    compile: bool = False  # not a constructor parameter: ignored


@dataclass
class InputGroup:
    img_size: list | None = None
    crop_pct: float | None = None


def test_from_options_reads_the_parameters_from_option_objects():
    module = ImageClassifier.from_options(ModelGroup(), InputGroup([32, 32], 0.9), num_classes=2, lr=1e-3)
    hp = module.hparams
    assert (hp.variant, hp.img_size, hp.crop_pct, hp.lr, hp.num_classes) == ("b0", [32, 32], 0.9, 1e-3, 2)
    assert hp.drop_path == 0.1  # None in the group: the variant's default, as if not given
    assert ImageClassifier.from_options(ModelGroup(drop_path=0.2), num_classes=2, drop_path=0.05).hparams.drop_path \
        == 0.05  # keywords win over the groups
    with pytest.raises(TypeError, match="no parameter epochs"):
        ImageClassifier.from_options(ModelGroup(), num_classes=2, epochs=3)
