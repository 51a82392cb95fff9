"""Regional torch.compile (pvt_lightning/compile.py) on the CPU, at b0's smallest sizes."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from pvt_lightning.training.compile import RECOMPILE_LIMIT, TensorDropPath, compile_regions, is_compiled
from pvt_lightning.models import create_model
from pvt_lightning.models.pvt_v2 import Block, DropPath


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


def twin_models(variant: str = "b0", **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_model(variant, num_classes=10, **kwargs)
    twin = create_model(variant, num_classes=10, **kwargs)
    twin.load_state_dict(model.state_dict())
    return model, twin


def train_step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_each_stage_compiles_one_graph_per_mode_and_size():
    """Blocks with different drop-path rates share a graph: 4 stages -> 4 graphs for training, 4 more for a new
    input size, 4 for evaluation; outputs and gradients equal the eager model's."""
    model, eager = twin_models(drop_path_rate=0.1)
    keys = list(model.state_dict())
    blocks = compile_regions(model, backend="eager")  # dynamo's capture and guards, without code generation
    assert len(blocks) == 8 and all(isinstance(b, Block) and is_compiled(b) for b in blocks)
    assert not any(type(m) is DropPath for m in model.modules())
    rates = [b.drop_path.drop_prob for b in blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1) and len(set(rates)) == 8  # each block its own rate
    assert list(model.state_dict()) == keys  # checkpoints load either way
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT

    x = torch.randn(2, 3, 32, 32)
    train_step(model, x)
    assert graphs() == 4
    train_step(model, x)
    assert graphs() == 4  # nothing recompiles on the second step
    x = torch.randn(2, 3, 64, 48)
    train_step(model, x)
    assert graphs() == 8  # a new size: each stage's block once more

    outputs = []
    for m in (model, eager):  # evaluation mode (no stochastic depth), with gradients
        m.eval()
        m.zero_grad()
        outputs.append(m(x))
        outputs[-1].square().mean().backward()
    assert graphs() == 12
    torch.testing.assert_close(outputs[0], outputs[1])
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_tensor_drop_path_drops_and_rescales_like_drop_path():
    torch.manual_seed(0)
    x = torch.ones(20000, 3)
    drop = TensorDropPath(0.25).train()
    out = drop(x)
    kept = out[:, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.015
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert (out == out[:, :1]).all()  # per sample, not per element
    assert torch.equal(drop.eval()(x), x) and torch.equal(TensorDropPath(0.0).train()(x), x)


@pytest.mark.slow
def test_resnet_bottlenecks_are_the_regions():
    model, eager = twin_models("resnet50")
    blocks = compile_regions(model, backend="eager")
    assert len(blocks) == 16 and all(is_compiled(b) for b in blocks)
    model.eval(), eager.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no PVTv2 Block or ResNet Bottleneck"):
        compile_regions(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_inductor_blocks_match_eager_at_two_sizes():
    """The real compiler (minutes on a loaded 2-core CPU): training and evaluation outputs match eager at two sizes."""
    model, eager = twin_models()
    compile_regions(model)
    for size in ((32, 32), (64, 48)):
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(train_step(model, x), train_step(eager, x), atol=1e-4, rtol=1e-4)
        for p, q in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3)
        model.eval(), eager.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), eager(x), atol=1e-4, rtol=1e-4)
    assert graphs() == 16  # 4 stages x {train, eval} x 2 sizes
