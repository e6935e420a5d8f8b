"""The optimizer toolkit: SAM / ASAM, Lookahead, gradient centralisation, per-group learning rates, fp16
with a gradient scaler; each on real torch modules (their registries' contract is in test_registries)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from raycls.config import TrainConfig
from raycls.config.schema import ModelConfig
from raycls.models import InputSpec, create_model
from raycls.optim import create_lr_schedule, create_optimizer
from raycls.train import run_local
from raycls.train.steps import StepPolicy, centralize_gradients, train_step

from .test_train import digits


def toy_problem(seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    return model, (x, (x[:, :1] * 2 - x[:, 1:2]).sin())


def train_toy(config: TrainConfig, steps: int = 60) -> tuple[list[float], int]:
    model, batch = toy_problem()
    calls = 0

    def loss_fn(m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        nonlocal calls
        calls += 1
        return torch.nn.functional.mse_loss(m(b[0]), b[1]), {}

    optimizer = create_optimizer(config, model)
    schedule = create_lr_schedule(config, optimizer, steps_per_epoch=steps)
    policy = StepPolicy.resolve(config, torch.device("cpu"))
    losses = [float(train_step(model, loss_fn, batch, optimizer, schedule, policy)) for _ in range(steps)]
    return losses, calls


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_takes_two_passes_per_step_and_lowers_a_toy_loss(adaptive: bool) -> None:
    config = TrainConfig(optimizer="sgd", lr=0.05, epochs=1, weight_decay=0.0, sam={"rho": 0.05, "adaptive": adaptive})
    losses, calls = train_toy(config)
    plain, plain_calls = train_toy(config.model_copy(update={"sam": None}))
    assert calls == 2 * plain_calls == 120
    assert losses[-1] < 0.5 * losses[0]
    assert losses != plain  # the step is taken with the gradient at the climbed point


def test_sam_undoes_its_climb_before_the_step() -> None:
    """With lr 0 the optimizer moves nothing: SAM's perturbation must be undone exactly."""
    model, batch = toy_problem()
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(optimizer="sgd", lr=1e-12, momentum=0.0, weight_decay=0.0, epochs=1, sam={"rho": 0.5})
    optimizer = create_optimizer(config, model)
    train_step(
        model,
        lambda m, b: (torch.nn.functional.mse_loss(m(b[0]), b[1]), {}),
        batch,
        optimizer,
        create_lr_schedule(config, optimizer, 1),
        StepPolicy.resolve(config, torch.device("cpu")),
    )
    for old, new in zip(before, model.parameters()):
        torch.testing.assert_close(new.detach(), old, atol=1e-6, rtol=0)


def test_sam_with_fp16_is_refused_naming_the_keys() -> None:
    with pytest.raises(ValidationError, match="sam with amp: fp16 is not supported"):
        TrainConfig(sam={"rho": 0.05}, amp="fp16")


@pytest.mark.parametrize("name", ["adam", "lamb", "lars"])
def test_lookahead_wraps_any_optimizer_and_keeps_its_state(name: str) -> None:
    from timm.optim import Lookahead

    config = TrainConfig(optimizer=name, lr=0.01, epochs=1, lookahead={"k": 3, "alpha": 0.5})
    losses, _ = train_toy(config, steps=30)
    assert losses[-1] < losses[0]
    model, _ = toy_problem()
    optimizer = create_optimizer(config, model)
    assert isinstance(optimizer, Lookahead)
    again = create_optimizer(config, model)
    again.load_state_dict(optimizer.state_dict())  # checkpoints round-trip


def test_gradient_centralization_zeroes_each_outputs_mean_gradient() -> None:
    model, batch = toy_problem()
    torch.nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    centralize_gradients(model.parameters())
    weight = model[0].weight.grad
    torch.testing.assert_close(weight.mean(dim=1), torch.zeros(16), atol=1e-7, rtol=0)
    assert model[0].bias.grad.abs().sum() > 0  # biases (ndim 1) are left alone
    losses, _ = train_toy(TrainConfig(optimizer="sgd", lr=0.05, epochs=1, grad_centralization=True))
    assert losses[-1] < losses[0]


def test_backbone_lr_multiplier_leaves_the_head_at_the_base_lr() -> None:
    model = create_model(ModelConfig(name="small_cnn", width=8), InputSpec(num_classes=10, in_chans=1, image_size=8))
    config = TrainConfig(optimizer="adamw", lr=0.01, lr_mult={"backbone": 0.1})
    optimizer = create_optimizer(config, model, backbone=model)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    head = {id(p) for p in model.get_classifier().parameters()}
    assert {lrs[i] for i in head} == {0.01}
    assert {round(lr, 9) for i, lr in lrs.items() if i not in head} == {0.001}
    assert len(lrs) == len(list(model.parameters()))  # every parameter in exactly one group
    schedule = create_lr_schedule(config, optimizer, steps_per_epoch=1)
    assert sorted({round(lr, 6) for lr in schedule.get_last_lr()}) == [0.001, 0.01]  # schedules scale each group


@pytest.mark.slow
def test_fp16_with_a_gradient_scaler_trains_digits_like_fp32(tmp_path: Path) -> None:
    fp16 = run_local(digits(epochs=2, amp="fp16"), tmp_path / "fp16", device=torch.device("cpu"))
    fp32 = run_local(digits(epochs=2, amp="off"), tmp_path / "fp32", device=torch.device("cpu"))
    assert fp16.best["val_acc"] > 0.7 and abs(fp16.best["val_acc"] - fp32.best["val_acc"]) < 0.05
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["train"]["amp"] == "fp16"
