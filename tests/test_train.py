"""The training loop on real data: fast-dev-runs, accuracy, determinism, checkpoints, resume, divergence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raycls.config import TrainConfig, TrialConfig
from raycls.errors import NonFiniteLossError
from raycls.optim import create_lr_schedule, lr_multiplier
from raycls.train import RunContext, fit, run_local
from raycls.train.steps import StepPolicy, autocast, clip_gradients

from .conftest import REPO


def digits(**train) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2},
            "model": {"name": "small_cnn", "width": 16},
            "train": {"epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, **train},
        }
    )


@pytest.mark.slow
def test_short_digits_run_clears_090(tmp_path: Path) -> None:
    summary = run_local(digits(epochs=6, warmup_epochs=1), tmp_path, device=torch.device("cpu"))
    assert summary.best["val_acc"] >= 0.9
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best"]["val_acc"] == summary.best["val_acc"] and len(saved["history"]) == 6
    assert TrialConfig.model_validate(json.loads((tmp_path / "config.json").read_text())) == digits(
        epochs=6, warmup_epochs=1
    )
    best = torch.load(tmp_path / "checkpoints" / "best" / "model.pt", weights_only=True)
    assert json.loads((tmp_path / "checkpoints" / "best" / "metrics.json").read_text())["epoch"] == summary.best_epoch
    assert all(torch.isfinite(v.float()).all() for v in best.values())


@pytest.mark.slow
def test_same_seed_same_losses_on_cpu() -> None:
    runs = []
    for _ in range(2):
        history: list[dict] = []
        fit(digits(), lambda m, c: history.append(m), RunContext())
        runs.append([(h["train_loss"], h["val_loss"]) for h in history])
    assert runs[0] == runs[1]
    other: list[dict] = []
    fit(digits().model_copy(update={"seed": 1}), lambda m, c: other.append(m), RunContext())
    assert [(h["train_loss"], h["val_loss"]) for h in other] != runs[0]


@pytest.mark.slow
@pytest.mark.parametrize("train", [{}, {"ema": {"decay": 0.9, "select": True}}], ids=["plain", "ema-selected"])
def test_resume_continues_from_checkpoint(tmp_path: Path, train: dict) -> None:
    """A resumed run reports what the whole run reported (with EMA: both weight sets come back)."""
    kept: list[Path] = []

    def keep(metrics: dict, checkpoint: Path | None) -> None:
        if metrics["epoch"] == 1:
            kept.append(Path(str(tmp_path / "epoch1")))
            import shutil

            shutil.copytree(checkpoint, kept[0])

    full: list[dict] = []
    fit(digits(epochs=3, **train), lambda m, c: (keep(m, c), full.append(m)), RunContext())
    resumed: list[dict] = []
    fit(digits(epochs=3, **train), lambda m, c: resumed.append(m), RunContext(resume_from=kept[0]))
    assert [m["epoch"] for m in resumed] == [2, 3]
    assert resumed[-1]["val_loss"] == pytest.approx(full[-1]["val_loss"], rel=1e-4)
    if train:
        assert resumed[-1]["val_loss_raw"] == pytest.approx(full[-1]["val_loss_raw"], rel=1e-4)


def test_diverging_run_raises_non_finite() -> None:
    with pytest.raises(NonFiniteLossError, match="training diverged"):
        fit(digits(optimizer="sgd", lr=1e30, momentum=0.0), lambda m, c: None, RunContext())


@pytest.mark.slow
def test_fast_dev_run_cifar10_subset_resnet18(tmp_path: Path, shared_data: Path) -> None:
    config = TrialConfig.model_validate(
        {
            "data": {"name": "cifar10", "root": str(shared_data), "train_subset": 2000},
            "model": {"name": "resnet18"},
            "train": {"epochs": 1, "batch_size": 32},
            "augment": {"hflip": True, "random_crop": 4, "cutout": 8},
            "phase": {"name": "supervised", "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "label_smoothing": 0.1},
        }
    )
    summary = run_local(config, tmp_path, fast_dev_run=True, device=torch.device("cpu"))
    assert summary.final["epoch"] == 1 and summary.final["val_top5"] > 0
    assert (tmp_path / "checkpoints" / "last" / "model.pt").is_file()


@pytest.mark.slow
def test_cli_train_fast_dev_run_digits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "raycls.cli",
            "train",
            str(REPO / "search_spaces" / "quickstart.yaml"),
            "--no-ray",
            "--fast-dev-run",
            "--out",
            str(out),
            "--set",
            "train.epochs=2",
            "--set",
            "model.width=8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "val_acc" in result.stdout
    config = json.loads((out / "config.json").read_text())
    # A fast dev run is one epoch whatever the config says (--set included), of small batches.
    assert config["train"]["epochs"] == 1 and config["model"]["width"] == 8 and config["train"]["batch_size"] <= 32
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) >= {"train_loss", "val_loss", "val_acc", "epoch", "lr", "images_per_s"}
    assert len(metrics["history"]) == 1 and metrics["final"]["train_images"] == 2 * config["train"]["batch_size"]


@pytest.mark.parametrize("space", ["pipeline-digits.yaml", "pipeline.yaml"])
def test_fast_dev_run_is_one_epoch_per_stage(tmp_path: Path, space: str) -> None:
    """`--fast-dev-run` is a smoke test: the 80-epoch CIFAR pipeline ran every epoch (over 10 minutes on 2
    cores); now each stage runs one epoch of two small batches."""
    from raycls.config import load_experiment, resolve_trial

    experiment = load_experiment(REPO / "search_spaces" / space)
    assert experiment.base.total_epochs > 3
    fast = resolve_trial(experiment.as_fast_dev_run())
    assert fast.total_epochs == len(fast.stages) == len(experiment.base.stages)
    assert all(
        s.train.batch_size <= 32 and s.train.eval_batch_size <= 32 and s.train.warmup_epochs == 0 for s in fast.stages
    )
    # Everything else is the trial's own (phases, models, augmentations).
    assert [s.phase for s in fast.stages] == [s.phase for s in experiment.base.stages]
    assert experiment.as_fast_dev_run().name == f"{experiment.name}-fast-dev-run"


def test_fast_dev_run_of_the_digits_pipeline(tmp_path: Path) -> None:
    from raycls.config import load_experiment, resolve_trial

    config = resolve_trial(load_experiment(REPO / "search_spaces" / "pipeline-digits.yaml").as_fast_dev_run())
    summary = run_local(config, tmp_path, fast_dev_run=True, device=torch.device("cpu"))
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, len(config.stages) + 1))
    assert [h["stage"] for h in history] == [s.label for s in config.stages]
    assert summary.final["train_images"] <= 2 * 32


def test_resume_from_the_last_epochs_checkpoint_reports_that_epoch_again(tmp_path: Path) -> None:
    """A trial whose last checkpoint closed it (the driver was killed before it heard) reports its final
    metrics once more when resumed, so the driver and the searcher see how it really ended."""
    last: list[Path] = []

    def keep(metrics: dict, checkpoint: Path | None) -> None:
        import shutil

        shutil.rmtree(tmp_path / "last", ignore_errors=True)
        shutil.copytree(checkpoint, tmp_path / "last")
        last[:] = [tmp_path / "last"]

    full: list[dict] = []
    fit(digits(epochs=2), lambda m, c: (keep(m, c), full.append(m)), RunContext())
    resumed: list[tuple[dict, Path | None]] = []
    fit(digits(epochs=2), lambda m, c: resumed.append((m, c)), RunContext(resume_from=last[0]))
    assert len(resumed) == 1 and resumed[0][1] is None
    assert resumed[0][0]["epoch"] == 2 and resumed[0][0]["val_loss"] == full[-1]["val_loss"]


def test_warmup_then_cosine_schedule() -> None:
    config = digits(epochs=10, warmup_epochs=2).train
    mult = [lr_multiplier(s, total_steps=100, warmup_steps=20, config=config) for s in range(100)]
    assert mult[0] == pytest.approx(0.05) and mult[19] == pytest.approx(1.0)
    assert mult[20] == pytest.approx(1.0) and mult[60] == pytest.approx(0.5, abs=0.02) and mult[-1] < 0.01
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = create_lr_schedule(config, opt, steps_per_epoch=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.05)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_clip_gradients_caps_global_norm() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_gradients([p], 1.0).item() == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert clip_gradients([p], None) is None


def test_step_policy_auto_is_off_on_cpu_and_bf16_on_request() -> None:
    cpu = torch.device("cpu")
    assert not StepPolicy.resolve(digits().train, cpu).bf16
    policy = StepPolicy.resolve(digits(amp="bf16").train, cpu)
    with autocast(policy):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_run(tmp_path: Path) -> None:
    summary = run_local(digits(epochs=3), tmp_path, device=torch.device("cuda"))
    assert summary.best["val_acc"] > 0.8
    policy = StepPolicy.resolve(digits().train, torch.device("cuda"))
    assert policy.bf16 and policy.channels_last


def test_plateau_counts_epochs_without_an_improvement_larger_than_min_delta() -> None:
    from raycls.train.state import Plateau

    plateau = Plateau("val_acc", patience=2, min_delta=0.01)
    assert [plateau.update({"val_acc": v}) for v in (0.5, 0.8, 0.805, 0.809, 0.9, 0.9, 0.95)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    lower = Plateau("val_loss", patience=1, min_delta=0.0)
    assert [lower.update({"val_loss": v}) for v in (1.0, 0.9, 0.9)] == [False, False, True]  # a tie is no gain


@pytest.mark.slow
def test_early_stopping_ends_a_run_whose_metric_has_flattened(tmp_path: Path) -> None:
    """train.early_stopping: the stage ends once `patience` epochs in a row gain no more than `min_delta`;
    the last epoch says why, and the best checkpoint is the best epoch's (not the last's)."""
    config = digits(epochs=30, early_stopping={"patience": 2, "min_delta": 0.02})
    summary = run_local(config, tmp_path, device=torch.device("cpu"))
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    accs = [h["val_acc"] for h in history]
    assert 3 <= len(history) < 30 and history[-1]["stopped_by"] == "patience"
    assert all("stopped_by" not in h for h in history[:-1])
    assert max(accs[-2:]) <= max(accs[:-2]) + 0.02  # the last two epochs gained no more than min_delta
    assert summary.best["val_acc"] == max(accs) >= 0.9
    assert json.loads((tmp_path / "checkpoints" / "best" / "metrics.json").read_text())["epoch"] == summary.best_epoch
    assert TrialConfig.from_json(config.to_json()) == config


def _fresh_model(config: TrialConfig) -> dict[str, torch.Tensor]:
    """The weights a run of `config` starts from (the loop seeds, then builds the model)."""
    from raycls.models import create_model
    from raycls.train.loop import load_data
    from raycls.train.steps import seed_everything

    spec = load_data(config).spec
    seed_everything(config.seed)
    return {k: v.clone() for k, v in create_model(config.model, spec).state_dict().items()}


@pytest.mark.slow
def test_a_frozen_backbone_is_bit_identical_after_a_head_only_run_and_changes_after_a_full_one(tmp_path: Path) -> None:
    """train.freeze: backbone trains only the classifier (BatchNorm statistics frozen too); the leaderboard's
    trainable_params says how many parameters trained."""
    head_only = digits(epochs=2, freeze="backbone")
    start = _fresh_model(head_only)
    summary = run_local(head_only, tmp_path / "head", device=torch.device("cpu"))
    after = torch.load(tmp_path / "head" / "checkpoints" / "best" / "model.pt", weights_only=True)
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"head.weight", "head.bias"}, changed
    assert summary.final["trainable_params"] == start["head.weight"].numel() + start["head.bias"].numel()
    run_local(digits(epochs=1), tmp_path / "full", device=torch.device("cpu"))
    full = torch.load(tmp_path / "full" / "checkpoints" / "best" / "model.pt", weights_only=True)
    assert not torch.equal(full["features.0.0.weight"], start["features.0.0.weight"])


def test_freezing_named_modules_and_a_bad_name(tmp_path: Path) -> None:
    from raycls.errors import ConfigError

    config = digits(epochs=1, freeze=["features.0"])
    start = _fresh_model(config)
    run_local(config, tmp_path / "named", device=torch.device("cpu"))
    after = torch.load(tmp_path / "named" / "checkpoints" / "best" / "model.pt", weights_only=True)
    assert all(torch.equal(start[k], after[k]) for k in start if k.startswith("features.0."))
    assert not torch.equal(start["features.1.0.weight"], after["features.1.0.weight"])
    with pytest.raises(ConfigError, match="train.freeze: no module 'trunk' in the model; known: .*features"):
        run_local(digits(epochs=1, freeze=["trunk"]), tmp_path / "bad", device=torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("select", [False, True], ids=["beside", "selected"])
def test_ema_weights_are_evaluated_beside_the_raw_ones_and_checkpointed_when_selected(
    tmp_path: Path, select: bool
) -> None:
    """train.ema: timm's ModelEmaV3 after every step. The checkpoint's model.pt holds the weights the epoch is
    judged by (the average when selected) and its val_acc is theirs; the other set, in the trainer state,
    scores the suffixed val_acc (`_ema` beside, `_raw` when selected)."""
    from raycls.train.loop import RunContext, build, evaluate, load_data

    config = digits(epochs=3, ema={"decay": 0.95, "select": select})
    run_local(config, tmp_path, device=torch.device("cpu"))
    last = tmp_path / "checkpoints" / "last"
    metrics = json.loads((last / "metrics.json").read_text())
    other_name = "val_acc_raw" if select else "val_acc_ema"
    assert {"val_acc", other_name, "val_loss"} <= set(metrics) and ("val_acc_ema" in metrics) != select
    judged = torch.load(last / "model.pt", weights_only=True)
    other = torch.load(last / "trainer.pt", weights_only=True)["average"]["weights"]
    assert any(not torch.equal(judged[k], other[k]) for k in judged if judged[k].is_floating_point())
    parts = build(config, config.stages[0], load_data(config), RunContext())
    for weights, name in ((judged, "val_acc"), (other, other_name)):
        parts.model.load_state_dict(weights)
        assert evaluate(parts.model, parts.phase, parts.val_loader, parts.policy)["val_acc"] == pytest.approx(
            metrics[name]
        )


@pytest.mark.slow
def test_swa_averages_the_last_epochs_and_updates_its_batchnorm_statistics(tmp_path: Path) -> None:
    """train.swa: from the last half of 4 epochs, the average of the epochs' weights with BatchNorm
    statistics recomputed on the training split (torch.optim.swa_utils): the checkpointed model is the
    average (its running statistics differ from the raw model's and score its val_acc); before averaging
    begins there is nothing to report beside the raw weights."""
    from raycls.train.loop import RunContext, build, evaluate, load_data

    config = digits(epochs=4, swa={"start": 0.5, "select": True})
    history: list[dict] = []
    run_local(config, tmp_path, device=torch.device("cpu"), on_epoch=history.append)
    assert ["val_acc_raw" in h for h in history] == [False, False, True, True]
    last = tmp_path / "checkpoints" / "last"
    averaged = torch.load(last / "model.pt", weights_only=True)
    state = torch.load(last / "trainer.pt", weights_only=True)["average"]
    raw = state["weights"]
    assert state["n_averaged"] == 2
    bn = "features.0.1.running_mean"
    assert not torch.equal(averaged[bn], raw[bn])  # update_bn recomputed the average's statistics
    parts = build(config, config.stages[0], load_data(config), RunContext())
    parts.model.load_state_dict(averaged)
    assert evaluate(parts.model, parts.phase, parts.val_loader, parts.policy)["val_acc"] == pytest.approx(
        history[-1]["val_acc"]
    )
    assert history[-1]["val_acc"] > 0.8


def test_ema_and_swa_together_are_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ema and swa are both set"):
        TrainConfig(ema={"decay": 0.99}, swa={"start": 0.5})


@pytest.mark.slow
def test_compiled_training_reports_its_compile_time_apart(tmp_path: Path) -> None:
    """train.compile: the training model goes through torch.compile (here its `eager` backend: Dynamo's
    tracing without kernel generation, seconds instead of minutes on a CPU); the first step's seconds are
    compile_s, the first epoch only, and the checkpoint's keys are the plain model's."""
    history: list[dict] = []
    config = digits(epochs=2, compile=True, compile_backend="eager")
    summary = run_local(config, tmp_path, device=torch.device("cpu"), on_epoch=history.append)
    assert history[0]["compile_s"] > 0 and "compile_s" not in history[1]
    assert summary.best["val_acc"] > 0.7
    weights = torch.load(tmp_path / "checkpoints" / "best" / "model.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in weights)
