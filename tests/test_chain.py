"""Chained phases (supcon > metric > ...): config, weight hand-over, epochs over the chain, resume mid-chain,
`init:` from another experiment, and the leaderboard's per-stage columns. Real training on digits, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from raycls import names
from raycls.config import TrialConfig
from raycls.config.load import load_experiment, resolve_trial, set_path
from raycls.errors import CheckpointError, ConfigError
from raycls.models.checkpoint import backbone_weights
from raycls.phases.base import Previous, check_experiment_metric
from raycls.references import resolve_references
from raycls.results.leaderboard import TrialRecord, param_columns, read_leaderboard, stage_columns, write_trial
from raycls.train.chain import fit
from raycls.train.loop import RunContext, build, load_data
from raycls.train.state import CARRY_FILE
from tests.conftest import Recorder, write_yaml

CHAIN = {
    "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 600},
    "model": {"width": 8},
    "train": {"batch_size": 64, "optimizer": "adamw", "lr": 3e-3},
    "augment": {"random_crop": 1},
    "phases": [
        {"phase": {"name": "supcon", "temperature": 0.1}, "train": {"epochs": 3}},
        # A vanishing lr, no momentum and no decay: the stage's weights stay where the hand-over put them.
        {
            "name": "head",
            "phase": {"name": "supervised"},
            "train": {
                "epochs": 1,
                "optimizer": "sgd",
                "lr": 1e-12,
                "momentum": 0.0,
                "nesterov": False,
                "weight_decay": 0.0,
            },
        },
    ],
}


def chain_config(**changes) -> TrialConfig:
    raw = {**CHAIN, **changes}
    return TrialConfig.model_validate(raw)


def weights(folder: Path, file: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(folder / file, weights_only=True)


def parameters_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # BatchNorm running statistics move with every forward pass in training mode, whatever the lr.
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_chain_config_merges_stage_sections_and_round_trips() -> None:
    config = chain_config()
    supcon, head = config.stages
    assert (supcon.label, head.label, config.chain, config.total_epochs) == ("supcon", "head", "supcon>head", 4)
    assert (supcon.train.lr, head.train.lr, head.train.batch_size) == (3e-3, 1e-12, 64)
    assert supcon.augment.random_crop == 1 == head.augment.random_crop
    assert TrialConfig.from_json(config.to_json()) == config
    # A top-level change reaches every stage that does not override it (so --set train.batch_size=... works).
    tree = config.to_dict()
    set_path(tree, "train.batch_size", 32)
    set_path(tree, "phases.head.phase.label_smoothing", 0.1)  # stages are addressed by name or index
    set_path(tree, "phases.0.train.epochs", 2)
    changed = TrialConfig.model_validate(tree)
    assert [s.train.batch_size for s in changed.stages] == [32, 32]
    assert changed.stages[1].phase.label_smoothing == 0.1 and changed.total_epochs == 3


def test_chain_config_errors_name_the_stage_key() -> None:
    with pytest.raises(ValidationError, match=r"phases.1.train.epoch: Extra inputs"):
        chain_config(phases=[CHAIN["phases"][0], {"phase": {"name": "supervised"}, "train": {"epoch": 2}}])
    with pytest.raises(ValidationError, match="stage names must differ"):
        chain_config(phases=[CHAIN["phases"][0], CHAIN["phases"][0]])
    with pytest.raises(ValidationError, match="either `phase`"):
        TrialConfig.model_validate({**CHAIN, "phase": {"name": "supervised"}})
    with pytest.raises(ConfigError, match="has no item 'arcface'"):
        set_path(chain_config().to_dict(), "phases.arcface.phase.margin", 0.2)


@pytest.mark.slow
def test_chain_hands_the_best_weights_on_and_counts_epochs_over_the_chain(tmp_path: Path) -> None:
    record = Recorder(tmp_path / "ckpt")
    fit(chain_config(), record, RunContext())
    assert [m[names.EPOCH] for m in record.metrics] == [1, 2, 3, 4]
    assert [m[names.STAGE] for m in record.metrics] == ["supcon"] * 3 + ["head"]
    supcon = record.metrics[:3]
    # Ties go to the later epoch (raycls.ranking's rule, as Ray's checkpoint manager keeps the later).
    best = max(range(3), key=lambda i: (supcon[i][names.VAL_KNN_ACC], i))
    # The last supcon checkpoint carries the stage's best weights so far (for a resume at the boundary).
    carried = weights(record.checkpoints[2], CARRY_FILE)
    assert carried["value"] == supcon[best][names.VAL_KNN_ACC]
    for key, value in weights(record.checkpoints[best]).items():
        assert torch.equal(carried["weights"][key], value), key
    # The next stage started from exactly that backbone (its lr is 1e-12: one epoch moves nothing).
    started = parameters_only(weights(record.checkpoints[3]))
    expected = parameters_only(backbone_weights(weights(record.checkpoints[best])))
    assert started.keys() == expected.keys()
    for key in started:
        torch.testing.assert_close(started[key], expected[key], rtol=0, atol=1e-8)
    # Each finished stage's metrics at its best epoch stay in every later epoch's report.
    assert record.metrics[3]["supcon.val_knn_acc"] == supcon[best][names.VAL_KNN_ACC]
    assert record.metrics[3]["supcon.epoch"] == best + 1
    assert record.metrics[3]["head.val_acc"] == record.metrics[3][names.VAL_ACC]


@pytest.mark.slow
@pytest.mark.parametrize("resume_epoch", [2, 3], ids=["mid-stage", "at-the-boundary"])
def test_resume_mid_chain_matches_an_uninterrupted_run(tmp_path: Path, resume_epoch: int) -> None:
    whole = Recorder(tmp_path / "whole")
    fit(chain_config(), whole, RunContext())
    resumed = Recorder(tmp_path / "resumed")
    fit(chain_config(), resumed, RunContext(resume_from=whole.checkpoints[resume_epoch - 1]))
    assert [m[names.EPOCH] for m in resumed.metrics] == list(range(resume_epoch + 1, 5))
    for before, after in zip(whole.metrics[resume_epoch:], resumed.metrics):
        assert before.keys() - {names.SETUP_S} == after.keys() - {names.SETUP_S}
        for key in (names.TRAIN_LOSS, names.VAL_ACC, names.VAL_KNN_ACC, "supcon.val_knn_acc"):
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-9), key


def test_experiment_metric_must_exist_in_every_stage(tmp_path: Path) -> None:
    space = write_yaml(
        tmp_path / "chain.yaml",
        """
experiment: {name: chain, metric: val_acc}
base:
  data: {name: digits}
  phases:
    - phase: {name: supcon}
    - phase: {name: metric}
""",
    )
    with pytest.raises(ConfigError, match=r"'val_acc' is not reported by phase\(s\) supcon.*val_knn_acc"):
        check_experiment_metric(load_experiment(space))
    check_experiment_metric(load_experiment(space, {"experiment.metric": "val_knn_acc"}))


def test_init_from_an_experiment_starts_from_its_best_checkpoint(tmp_path: Path) -> None:
    storage = str(tmp_path / "runs")
    trained = Recorder(tmp_path / "ckpt")
    fit(chain_config(), trained, RunContext())
    for trial, (checkpoint, score) in enumerate([(trained.checkpoints[0], 0.5), (trained.checkpoints[2], 0.9)]):
        write_trial(
            storage,
            TrialRecord(
                experiment="pre",
                trial_id=f"t{trial}",
                status="completed",
                metric="val_knn_acc",
                mode="max",
                params={},
                param_types={},
                history=[{"epoch": 1, "val_knn_acc": score}],
                checkpoint=str(checkpoint),
            ),
        )
    space = write_yaml(
        tmp_path / "fine.yaml",
        """
experiment: {name: fine, metric: val_acc}
base:
  data: {name: digits, val_fraction: 0.2, train_subset: 600}
  model: {width: 8}
  init: {from: pre, pick: best}
  train: {epochs: 1, optimizer: sgd, lr: 1.0e-12, momentum: 0.0, nesterov: false, weight_decay: 0.0}
""",
    )
    experiment = resolve_references(load_experiment(space), storage)
    assert experiment.base.init == str(trained.checkpoints[2])  # the best trial's checkpoint
    out = Recorder(tmp_path / "fine")
    fit(resolve_trial(experiment), out, RunContext())
    started = parameters_only(weights(out.checkpoints[0]))
    for key, value in parameters_only(backbone_weights(weights(trained.checkpoints[2]))).items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=1e-8)
    with pytest.raises(CheckpointError, match="no leaderboard for that experiment"):
        resolve_references(load_experiment(space, {"init": {"from": "nope", "pick": "best"}}), storage)
    with pytest.raises(CheckpointError, match="no such trial"):
        resolve_references(load_experiment(space, {"init": {"from": "pre", "pick": "t9"}}), storage)


def test_leaderboard_keeps_each_stage_and_names_the_chain(tmp_path: Path) -> None:
    record = Recorder(tmp_path / "ckpt")
    config = chain_config()
    fit(config, record, RunContext())
    write_trial(
        str(tmp_path),
        TrialRecord(
            experiment="chain",
            trial_id="a",
            status="completed",
            metric="val_knn_acc",
            mode="max",
            params={},
            param_types={},
            history=record.metrics,
            phase=config.chain,
            max_epochs=config.total_epochs,
        ),
    )
    table = read_leaderboard(str(tmp_path), "chain").table
    assert "supcon.val_knn_acc" in stage_columns(table) and "supcon.val_knn_acc" not in param_columns(table)
    row = table.to_pylist()[0]
    assert row["phase"] == "supcon>head" and row["max_epochs"] == 4
    assert row["supcon.val_knn_acc"] == record.metrics[-1]["supcon.val_knn_acc"]
    assert row["head.val_acc"] == record.metrics[-1]["head.val_acc"]


def test_distill_from_the_previous_stage_teaches_with_its_cosine_classifier(tmp_path: Path) -> None:
    """supcon > arcface > distill(teacher: previous): the teacher is the arcface stage's best model, whole."""
    phases = [
        {"phase": {"name": "supcon"}, "train": {"epochs": 1}},
        {"name": "arcface", "phase": {"name": "metric", "loss": "arcface", "scale": 16.0}, "train": {"epochs": 2}},
        {"name": "distill", "phase": {"name": "distill", "teacher": "previous", "alpha": 0.5}, "train": {"epochs": 1}},
    ]
    record = Recorder(tmp_path / "ckpt")
    fit(chain_config(phases=phases), record, RunContext())
    assert [m[names.STAGE] for m in record.metrics] == ["supcon", "arcface", "arcface", "distill"]
    arcface = record.metrics[1:3]
    best = 1 + max(range(2), key=lambda i: arcface[i][names.VAL_ACC])
    taught = weights(record.checkpoints[3])
    # The frozen teacher is the arcface model (backbone and class centres) at its best epoch, exactly.
    for key, value in weights(record.checkpoints[best]).items():
        assert torch.equal(taught[f"teacher.model.{key}"], value), key
    # ... and it teaches through its cosine classifier: logits = scale * cosine, the arcface stage's own.
    config = chain_config(phases=phases)
    data = load_data(config)
    arcface_stage, distill_stage = config.stages[1:]
    arcface = build(config, arcface_stage, data, RunContext(), index=1).model
    arcface.load_state_dict(weights(record.checkpoints[best]))
    distill = build(
        config,
        distill_stage,
        data,
        RunContext(),
        index=2,
        init=weights(record.checkpoints[best]),
        previous=Previous(arcface_stage.phase, weights(record.checkpoints[best])),
    ).model
    images = torch.randn(4, 1, 8, 8)
    arcface.eval()
    torch.testing.assert_close(distill.teacher_logits(images), 16.0 * arcface(images))


def test_distill_from_a_stage_without_a_classifier_is_refused(tmp_path: Path) -> None:
    phases = [
        {"phase": {"name": "supcon"}, "train": {"epochs": 1}},
        {"phase": {"name": "distill", "teacher": "previous"}, "train": {"epochs": 1}},
    ]
    with pytest.raises(ConfigError, match="a supcon model has no classifier to teach with"):
        fit(chain_config(phases=phases), Recorder(tmp_path), RunContext())
    with pytest.raises(ValidationError, match="`previous` needs an earlier stage"):
        TrialConfig.model_validate({"phase": {"name": "distill", "teacher": "previous"}})


def test_a_reference_given_with_set_stays_resolved_in_every_trial(tmp_path: Path) -> None:
    storage = str(tmp_path / "runs")
    write_trial(
        storage,
        TrialRecord(
            experiment="pre",
            trial_id="t0",
            status="completed",
            metric="val_acc",
            mode="max",
            params={},
            param_types={},
            history=[{"epoch": 1, "val_acc": 0.9}],
            checkpoint="/some/checkpoint",
        ),
    )
    space = write_yaml(tmp_path / "d.yaml", "base: {data: {name: digits}, phase: {name: distill}}\n")
    experiment = resolve_references(load_experiment(space, {"phase.teacher": {"from": "pre", "pick": "best"}}), storage)
    assert resolve_trial(experiment, {}).phase.teacher == "/some/checkpoint"


@pytest.mark.slow
def test_two_phase_fine_tuning_heads_then_everything_at_a_lower_lr(tmp_path: Path) -> None:
    """The seed's fine-tuning recipe as a chain: the head alone on a frozen backbone, then everything at a
    tenth of the lr with early stopping; the second stage starts from the first's best weights."""
    from raycls.config import TrialConfig
    from raycls.train import run_local

    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2},
            "model": {"width": 8},
            "eval": {"on": "none"},
            "train": {"batch_size": 64, "optimizer": "adamw", "lr": 1e-2},
            "phases": [
                {"name": "head", "phase": {"name": "supervised"}, "train": {"epochs": 2, "freeze": "backbone"}},
                {
                    "name": "all",
                    "phase": {"name": "supervised"},
                    "train": {"epochs": 3, "lr": 1e-3, "early_stopping": {"patience": 2, "min_delta": 0.0}},
                },
            ],
        }
    )
    history: list[dict] = []
    run_local(config, tmp_path, device=torch.device("cpu"), on_epoch=history.append)
    head, full = [h for h in history if h["stage"] == "head"], [h for h in history if h["stage"] == "all"]
    assert len(head) == 2 and 1 <= len(full) <= 3
    assert head[0]["trainable_params"] < full[0]["trainable_params"] / 10
    assert head[0]["lr"] > full[0]["lr"]
