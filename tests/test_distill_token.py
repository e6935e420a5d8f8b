"""DeiT's distillation token: a distilled ViT student learns the labels through its class token and the teacher
through its distillation token; everywhere else it is an ordinary classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls.config import ModelConfig, TrialConfig
from raycls.config.schema import DistillConfig
from raycls.errors import ConfigError
from raycls.losses import LOSSES
from raycls.models import InputSpec, create_model
from raycls.phases import create_phase
from raycls.train import run_local

SPEC = InputSpec(num_classes=10, in_chans=1, image_size=8)  # digits
# A DeiT small enough for CPU tests: 2x2 patches of 4 px (raycls's small-input patch), one block.
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}
DEIT = ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=TINY)


def build(kd: str = "soft_kd", model: ModelConfig = DEIT, **phase):
    torch.manual_seed(0)
    distill = create_phase(DistillConfig(distill_token=True, kd=kd, **phase), SPEC)
    return distill, distill.build(create_model(model, SPEC))


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % 10


def test_the_distilled_deit_gets_the_small_input_patch() -> None:
    _, model = build()
    assert model.student.patch_embed.proj.kernel_size == (4, 4)


@pytest.mark.parametrize("kd", ["soft_kd", "hard_kd"])
def test_loss_is_deits_and_trains_both_heads(kd: str) -> None:
    phase, model = build(kd, alpha=0.3, ema_decay=0.9)
    model.train()
    x, y = batch()
    loss, _ = phase.loss(model, (x, y))
    loss.backward()
    student = model.student
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())

    # (1 - alpha) CE(class head, labels) + alpha KD(distillation head, teacher), with the teacher's one tensor.
    with torch.no_grad():
        student.set_distilled_training(True)
        cls_logits, dist_logits = student(x)
        student.set_distilled_training(False)
        teacher = model.teacher_logits(x)
    assert teacher.shape == (16, 10)  # an EMA copy of a DeiT: its heads averaged, not a pair
    kd_loss = LOSSES.get(kd)(**({"temperature": 4.0} if kd == "soft_kd" else {}))
    expected = 0.7 * F.cross_entropy(cls_logits, y) + 0.3 * kd_loss(dist_logits, teacher)
    torch.testing.assert_close(loss.detach(), expected)

    # Outside the loss the student is a plain classifier again: one tensor, in training mode too.
    assert isinstance(model(x), torch.Tensor)
    model.eval()
    sums, embeddings = phase.eval_batch(model, (x, y))
    assert sums["count"] == 16 and embeddings.shape == (16, 32)


def test_distill_token_learns_digits(tmp_path: Path) -> None:
    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2},
            "model": DEIT.model_dump(),
            "phase": {"name": "distill", "distill_token": True, "ema_decay": 0.9, "alpha": 0.5},
            "train": {"epochs": 3, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        }
    )
    summary = run_local(config, tmp_path, device=torch.device("cpu"))
    history = [h["train_loss"] for h in json.loads((tmp_path / "metrics.json").read_text())["history"]]
    assert history[-1] < history[0]
    assert summary.best["val_acc"] > 0.5  # chance: 0.1
    state = torch.load(tmp_path / "checkpoints" / "last" / "model.pt", weights_only=True)
    assert "student.dist_token" in state and "teacher.head_dist.weight" in state


@pytest.mark.parametrize(
    "model, named",
    [
        (ModelConfig(name="small_cnn", width=8), "model.name (a SmallCNN)"),
        (ModelConfig(name="deit_tiny_patch16_224", kwargs=TINY), "model.name='deit_tiny_patch16_224'"),
    ],
)
def test_a_student_without_a_distillation_token_is_refused(model: ModelConfig, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(model=model)
    message = str(info.value)
    assert "phase.distill_token" in message and named in message
    assert "deit_tiny_distilled_patch16_224" in message  # how to get one


class SwitchWithoutSecondHead(nn.Linear):
    """Like timm's pit_ti_224: it has the distilled-training switch but only one head."""

    def set_distilled_training(self, enable: bool = True) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


def test_a_switch_without_a_second_head_is_refused_at_the_first_step() -> None:
    phase = create_phase(DistillConfig(distill_token=True), SPEC)
    model = phase.build(SwitchWithoutSecondHead(64, 10))
    with pytest.raises(ConfigError, match="phase.distill_token=true needs a student with a distillation token"):
        phase.loss(model, batch())
