"""Phases on real data (digits): each margin loss trains, reports embedding metrics, and checkpoints its state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from raycls.config import TrialConfig
from raycls.errors import CheckpointError, ConfigError
from raycls.losses import LOSSES, MarginLoss
from raycls.train import run_local

MARGIN_LOSSES = [n for n in LOSSES.names() if issubclass(LOSSES.get(n), MarginLoss)]


def metric_config(loss: str, **phase) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2},
            "model": {"width": 16},
            "phase": {"name": "metric", "loss": loss, "margin_warmup_steps": 50, **phase},
            "train": {"epochs": 4, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1},
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("loss", MARGIN_LOSSES)
def test_every_margin_loss_learns_digits(loss: str, tmp_path: Path) -> None:
    summary = run_local(metric_config(loss), tmp_path, device=torch.device("cpu"))
    assert summary.best["val_acc"] > 0.9
    assert summary.best["val_knn_acc"] > 0.9 and summary.best["val_recall@1"] > 0.9
    state = torch.load(tmp_path / "checkpoints" / "last" / "model.pt", weights_only=True)
    assert state["margin.step"].item() == summary.final["train_images"] // 64 * 4  # warm-up state is saved
    assert any(k.startswith("margin.head.") for k in state)  # the class centres are trained weights


def test_metric_phase_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a margin loss; margin losses: adaface"):
        metric_config("supcon")
    with pytest.raises(ValidationError, match="unknown loss 'arcfaze'"):
        metric_config("arcfaze")
    with pytest.raises(ConfigError, match="does not take these options"):
        run_local(metric_config("cosface", sub_centers=2), tmp_path, fast_dev_run=True)


@pytest.mark.slow
def test_supcon_pretraining_clusters_digits(tmp_path: Path) -> None:
    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2},
            "model": {"width": 16},
            "phase": {"name": "supcon", "temperature": 0.1},
            "augment": {"random_crop": 1},
            "train": {"epochs": 4, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1},
        }
    )
    summary = run_local(config, tmp_path, metric="val_knn_acc", device=torch.device("cpu"))
    history = [h["train_loss"] for h in json.loads((tmp_path / "metrics.json").read_text())["history"]]
    assert history[-1] < history[0]
    assert summary.best["val_knn_acc"] > 0.9 and "val_acc" not in summary.final
    state = torch.load(tmp_path / "checkpoints" / "best" / "model.pt", weights_only=True)
    assert any(k.startswith("backbone.") for k in state) and any(k.startswith("projection.") for k in state)


DIGITS = {
    "data": {"name": "digits", "val_fraction": 0.2},
    "model": {"width": 8},
    "train": {"epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3},
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run_local(TrialConfig.model_validate({**DIGITS, "model": {"width": 16}}), out, device=torch.device("cpu"))
    return out / "checkpoints" / "best"


def distill(tmp_path: Path, **phase) -> tuple[dict, Path]:
    config = TrialConfig.model_validate({**DIGITS, "phase": {"name": "distill", **phase}})
    summary = run_local(config, tmp_path, device=torch.device("cpu"))
    return summary.best, tmp_path / "checkpoints" / "last" / "model.pt"


@pytest.mark.slow
@pytest.mark.parametrize("kd", ["soft_kd", "hard_kd"])
def test_distill_from_a_teacher_checkpoint_keeps_the_teacher_frozen(teacher: Path, tmp_path: Path, kd: str) -> None:
    best, weights = distill(
        tmp_path, teacher=str(teacher), teacher_model={"name": "small_cnn", "width": 16}, kd=kd, alpha_schedule="cosine"
    )
    assert best["val_acc"] > 0.8
    state = torch.load(weights, weights_only=True)
    original = torch.load(teacher / "model.pt", weights_only=True)
    assert all(torch.equal(state[f"teacher.{k}"], v) for k, v in original.items())  # exactly the checkpoint


def test_ema_teacher_follows_the_student(tmp_path: Path) -> None:
    best, weights = distill(tmp_path, ema_decay=0.9)
    state = torch.load(weights, weights_only=True)
    key = "features.0.0.weight"
    assert best["val_acc"] > 0.8
    assert not torch.equal(state[f"teacher.{key}"], state[f"student.{key}"])  # lags the student ...
    assert (state[f"teacher.{key}"] - state[f"student.{key}"]).abs().max() < 0.5  # ... but follows it


def test_distill_teacher_errors(teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        distill(tmp_path, teacher=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="do not fit a supervised model of the teacher"):
        distill(tmp_path, teacher=str(teacher))  # a width-16 teacher for a width-8 student, no teacher_model


def test_teacher_reference_resolves_to_the_best_trials_checkpoint(teacher: Path, tmp_path: Path) -> None:
    from raycls.config import load_experiment
    from raycls.references import resolve_references
    from raycls.results import TrialRecord, write_trial

    storage = str(tmp_path / "results")
    teacher_config = TrialConfig.model_validate({**DIGITS, "model": {"width": 16}})
    for trial_id, status, acc, checkpoint in [
        ("good", "completed", 0.95, str(teacher)),
        ("better-but-stopped", "early_stopped", 0.99, "/nowhere"),
        ("worse", "completed", 0.5, "/elsewhere"),
    ]:
        write_trial(
            storage,
            TrialRecord(
                experiment="teachers",
                trial_id=trial_id,
                status=status,
                metric="val_acc",
                mode="max",
                params={},
                param_types={},
                history=[{"epoch": 1, "val_acc": acc}],
                checkpoint=checkpoint,
                config_json=teacher_config.to_json(),
            ),
        )
    space = tmp_path / "distill.yaml"
    space.write_text(
        json.dumps({"base": {**DIGITS, "phase": {"name": "distill", "teacher": {"from": "teachers", "pick": "best"}}}})
    )
    experiment = resolve_references(load_experiment(space), storage)
    phase = experiment.base.phase
    assert phase.teacher == str(teacher) and phase.teacher_trial == "teachers/good"
    assert phase.teacher_model.width == 16  # the teacher trial's own architecture
    best, _ = distill(tmp_path / "run", **phase.model_dump(exclude={"name"}))
    assert best["val_acc"] > 0.8

    pinned = load_experiment(space, {"phase.teacher.pick": "worse"})
    assert resolve_references(pinned, storage).base.phase.teacher == "/elsewhere"
    with pytest.raises(CheckpointError, match=r"no such trial \(known: better-but-stopped, good, worse\)"):
        resolve_references(load_experiment(space, {"phase.teacher.pick": "nope"}), storage)
    with pytest.raises(CheckpointError, match="no leaderboard for that experiment"):
        resolve_references(load_experiment(space, {"phase.teacher.from": "missing"}), storage)


# ---------------------------------------------------------------------------------- MixUp / CutMix
def _phase_and_model(phase: dict):
    from raycls.config.schema import ModelConfig
    from raycls.models import InputSpec, create_model
    from raycls.phases import create_phase

    config = TrialConfig.model_validate({"data": {"name": "digits"}, "phase": phase})
    spec = InputSpec(num_classes=10, in_chans=1, image_size=8)
    created = create_phase(config.phase, spec)
    torch.manual_seed(0)
    return created, created.build(create_model(ModelConfig(width=8), spec))


def test_a_mixed_margin_loss_weighs_both_labels_by_the_mixing_ratio() -> None:
    """ArcFace with MixUp: each mixed image's loss is lam * loss(its label) + (1 - lam) * loss(its partner's),
    where timm mixes each image with the batch reversed."""
    import numpy as np

    phase, model = _phase_and_model({"name": "metric", "loss": "arcface", "mixup_alpha": 0.4})
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    np.random.seed(3)  # timm draws lam with numpy
    loss, _ = phase.loss(model, (x, y))
    np.random.seed(3)
    mixed = phase.mixer(x, y)
    assert 0 < mixed.lam < 1 and torch.equal(mixed.partners, y.flip(0))
    expected = mixed.lam * model(mixed.images, y).loss + (1 - mixed.lam) * model(mixed.images, y.flip(0)).loss
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "phase",
    [
        {"name": "metric", "loss": "cosface", "cutmix_alpha": 1.0},
        {"name": "distill", "mixup_alpha": 0.4, "cutmix_alpha": 1.0, "label_smoothing": 0.1},
        {"name": "supervised", "mixup_alpha": 0.4, "label_smoothing": 0.1},
    ],
    ids=["metric-cutmix", "distill-mixup-cutmix", "supervised-mixup"],
)
def test_every_labelled_phase_trains_on_mixed_batches(phase: dict) -> None:
    created, model = _phase_and_model(phase)
    assert created.mixer is not None
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        loss, _ = created.loss(model, (x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        created.after_step(model)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])
