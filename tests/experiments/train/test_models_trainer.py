"""Embedding networks, the learning-rate schedule, device choice and checkpoints."""

import math
from fractions import Fraction

import pytest
import torch

from experiments.config import load_config
from experiments.models.image import SmallCNN, SmallResNet, build_model
from experiments.train.loop import (
    make_scheduler,
    pick_device,
    read_checkpoint,
    save_checkpoint,
    warmup_schedule,
)


@pytest.mark.parametrize(
    "size, channels, kind",
    [((8, 8), 1, SmallCNN), ((28, 28), 1, SmallCNN), ((112, 92), 1, SmallResNet), ((64, 64), 3, SmallResNet)],
)
def test_auto_model_shapes_and_normalisation(size, channels, kind):
    model = build_model("auto", channels, size, 24, normalize=True, seed=0)
    assert isinstance(model, kind)
    out = model.eval()(torch.rand(3, channels, *size))
    assert out.shape == (3, 24)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    raw = build_model("auto", channels, size, 24, normalize=False, seed=0).eval()(
        torch.rand(3, channels, *size)
    )
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3), atol=1e-3)


def test_seed_fixes_the_initial_weights():
    a, b, c = (build_model("cnn", 1, (28, 28), 16, seed=s) for s in (5, 5, 6))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of auto, cnn, resnet"):
        build_model("vgg", 1, (8, 8), 8)


@pytest.mark.parametrize("epochs", [3, 30])
def test_warmup_is_a_share_of_all_steps_whatever_the_epochs(epochs):
    """A 3-epoch run warms up over its first fifth, not a whole epoch of three."""
    steps_per_epoch = 50
    total = epochs * steps_per_epoch
    cfg = load_config(None, [f"epochs={epochs}"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(cfg, optimizer, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = rates.index(max(rates))
    assert peak == round(0.2 * total) - 1 and rates[peak] == pytest.approx(1.0)
    assert rates[0] == pytest.approx(1 / round(0.2 * total)) and rates[-1] < 0.01


def test_warmup_then_cosine_and_constant():
    param = torch.nn.Parameter(torch.zeros(1))
    for cosine in (True, False):
        optimizer = torch.optim.SGD([param], lr=0.1)
        scheduler = warmup_schedule(optimizer, warmup_steps=4, total_steps=20, cosine=cosine)
        rates = []
        for _ in range(20):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        expected = [0.1 * (s + 1) / 4 for s in range(4)]
        expected += [
            0.1 * (0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) if cosine else 1.0) for s in range(4, 20)
        ]
        assert rates == pytest.approx(expected)


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda:1 but 0 CUDA device"):
            pick_device("cuda:1")


def test_checkpoint_round_trip_loads_tensors_only(tmp_path):
    model = build_model("cnn", 1, (8, 8), 8, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, epoch=3)
    restored = build_model("cnn", 1, (8, 8), 8, seed=2)
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    state = read_checkpoint(tmp_path / "ckpt.pt")
    restored.load_state_dict(state["model"])
    restored_opt.load_state_dict(state["optimizer"])
    assert state["epoch"] == 3
    for pa, pb in zip(model.parameters(), restored.parameters()):
        assert torch.equal(pa, pb)
    assert restored_opt.state_dict()["state"][0]["step"] == 1

    torch.save({"model": {}, "epoch": Fraction(1, 3)}, tmp_path / "evil.pt")  # an arbitrary Python object
    with pytest.raises(ValueError, match="not a readable checkpoint.*weights_only"):
        read_checkpoint(tmp_path / "evil.pt")
