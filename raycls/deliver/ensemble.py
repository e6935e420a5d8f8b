"""Ensembles: `raycls eval EXP --ensemble top:K` averages the K best trials' probabilities, `--ensemble
snapshots:best` (or `snapshots:TRIAL`) those of one trial's kept checkpoints (snapshot ensembling: set
`experiment.keep_checkpoints: K`, Tune keeps the trial's K best epochs).

    members (top:K: K leaderboard rows by raycls.ranking, completed and feasible, best first; snapshots: the
    checkpoints beside the trial's best, of its stage) -> their Classifiers (normalisation inside each) ->
    Ensemble: log of the mean softmax -> held-out metrics and cost -> a row of kind `ensemble` under
    `<experiment>/ensembles/`, and (`raycls export --ensemble ...`) one ONNX graph of all members.

The ensemble's output is the log of the averaged probabilities: a softmax of it gives them back, so everything
that reads logits (predict, serve, parity checks) reads an ensemble the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

import raycls
from raycls import names
from raycls.deliver.model import Classifier, TrialModel, model_of_row
from raycls.errors import ConfigError
from raycls.files import write_json_atomic
from raycls.results.index import write_table_atomic
from raycls.storage import ENSEMBLE_DIR, ExperimentPaths, sibling_checkpoints
from raycls.train.evaluation import pick_rows, trial_rows

KIND = "ensemble"


class Ensemble(nn.Module):
    """Pixels in [0, 1] -> log of the members' mean softmax probabilities."""

    def __init__(self, members: list[TrialModel]):
        super().__init__()
        self.members = nn.ModuleList(Classifier(member) for member in members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([member(images).softmax(-1) for member in self.members]).mean(0)
        return probabilities.clamp_min(1e-12).log()


@dataclass
class LoadedEnsemble:
    experiment: str
    name: str  # "ensemble-top3", "ensemble-snapshots-<trial id>"
    pick: str
    members: list[TrialModel]
    rows: list[dict[str, Any]]  # each member's leaderboard row (a snapshot ensemble: one trial's, K times)
    member_ids: list[str]  # trial ids; a snapshot: "<trial id>/<checkpoint folder>"

    @property
    def module(self) -> Ensemble:
        return Ensemble(self.members).eval()

    @property
    def first(self) -> TrialModel:
        return self.members[0]


def load_ensemble(storage: str, experiment: str, pick: str, *, device: str = "cpu") -> LoadedEnsemble:
    """The members `pick` names: `top:K` (the K best trials) or `snapshots:best|TRIAL` (one trial's kept
    checkpoints). They must see the same images: one dataset, classes and size."""
    kind, _, what = pick.partition(":")
    if kind not in MEMBERS or not what:
        raise ConfigError(
            f"--ensemble {pick!r}: expected top:K (the K best completed trials, e.g. top:3) or snapshots:best | "
            "snapshots:TRIAL (one trial's kept checkpoints, experiment.keep_checkpoints)"
        )
    members, rows, ids = MEMBERS[kind](trial_rows(storage, experiment), what, experiment, device)
    first = members[0]
    for member, member_id in zip(members[1:], ids[1:], strict=True):
        if (member.config.data.name, member.classes, member.image_size, member.channels) != (
            first.config.data.name,
            first.classes,
            first.image_size,
            first.channels,
        ):
            raise ConfigError(
                f"--ensemble {pick}: {member_id} sees other images than {ids[0]} (dataset, classes, size or "
                "channels differ): its probabilities cannot be averaged with theirs"
            )
    name = f"ensemble-{pick.replace(':', '')}" if kind == "top" else f"ensemble-{kind}-{rows[0]['trial_id']}"
    return LoadedEnsemble(experiment, name, pick, members, rows, ids)


Members = tuple[list[TrialModel], list[dict[str, Any]], list[str]]


def _top_trials(rows: list[dict[str, Any]], what: str, experiment: str, device: str) -> Members:
    picked = pick_rows(rows, f"top:{what}", experiment)
    return [model_of_row(row, device=device) for row in picked], picked, [r["trial_id"] for r in picked]


def _snapshots(rows: list[dict[str, Any]], what: str, experiment: str, device: str) -> Members:
    """The checkpoints Tune kept beside the trial's best (its `keep_checkpoints` best epochs), those of the
    best's chain stage: an earlier stage's model may not even classify."""
    row = pick_rows(rows, what, experiment)[0]
    best = model_of_row(row, device=device)
    members, ids = [], []
    for checkpoint in sibling_checkpoints(row["checkpoint"]):
        member = (
            best
            if checkpoint == row["checkpoint"]
            else model_of_row(row, device=device, checkpoint=checkpoint, data=best.data)
        )
        if member.stage == best.stage:
            members.append(member)
            ids.append(f"{row['trial_id']}/{checkpoint.rpartition('/')[2]}")
    if len(members) < 2:
        raise ConfigError(
            f"--ensemble snapshots:{what}: trial {row['trial_id']} kept {len(members)} checkpoint(s) of its last "
            "stage; a snapshot ensemble needs 2 or more: set experiment.keep_checkpoints (e.g. 3) and run the search"
        )
    return members, [row] * len(members), ids


MEMBERS = {"top": _top_trials, "snapshots": _snapshots}  # --ensemble KIND:WHAT


@torch.no_grad()
def probabilities(module: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Softmax probabilities of uint8 [N, C, H, W] images."""
    return torch.cat([module(images[i : i + batch].float() / 255).softmax(-1) for i in range(0, len(images), batch)])


def held_out_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, negative log-likelihood and top-label ECE (15 bins; raycls.evaluate.stats, torchmetrics'
    numbers without its import) of probabilities."""
    from raycls.evaluate.stats import calibration_error

    return {
        names.TEST_ACC: float((probs.argmax(1) == labels).float().mean()),
        "test_nll": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)),
        "test_ece": float(calibration_error(probs, labels, 15, "l1")),
    }


def evaluate_ensemble(storage: str, ensemble: LoadedEnsemble, *, suite: str = "default") -> dict[str, Any]:
    """Each member's and the ensemble's held-out metrics (the test split), the ensemble's cost, and with a suite
    that has the `shift` step (`full`) their accuracies on the first member's `eval.shift` sets; written as the
    ensemble's row (kind `ensemble`, under `ensembles/`). Returns the row."""
    from raycls.deliver.export import _resized
    from raycls.evaluate.cost import measure_cost
    from raycls.evaluate.suite import EVAL_SUITES

    first = ensemble.first
    test = first.data.splits.test
    images, labels = _resized(first, test.images), test.labels.long()
    module = ensemble.module
    member_acc = {
        member_id: held_out_metrics(probabilities(Classifier(member).eval(), images), labels)[names.TEST_ACC]
        for member, member_id in zip(ensemble.members, ensemble.member_ids, strict=True)
    }
    metrics = held_out_metrics(probabilities(module, images), labels)
    shift: dict[str, Any] = {}
    if "shift" in EVAL_SUITES.get(suite):
        shift = shift_metrics(ensemble)
    device = next(module.parameters()).device
    cost = measure_cost(
        module,
        lambda x: module(x),
        channels=first.channels,
        image_size=first.image_size,
        batch_size=min(64, len(images)),
        device=device,
    )
    row = {
        "experiment": ensemble.experiment,
        "trial_id": ensemble.name,
        "kind": KIND,
        "status": "completed",
        "metric": names.TEST_ACC,
        "mode": "max",
        "score": metrics[names.TEST_ACC],
        "members": json.dumps(ensemble.member_ids),
        "member_test_acc": json.dumps(member_acc),
        names.EVAL_SPLIT: "test",
        "test_images": float(len(labels)),
        **metrics,
        **shift,
        **cost,
        "ended_at": datetime.now(timezone.utc),
        "raycls_version": raycls.__version__,
    }
    paths = ExperimentPaths(storage, ensemble.experiment)
    write_table_atomic(*paths.locate(paths.ensemble_row(ensemble.name)), pa.Table.from_pylist([row]))
    return row


def shift_metrics(ensemble: LoadedEnsemble) -> dict[str, Any]:
    """The ensemble's accuracies on the shifted sets the evaluation suite draws for its first member (its
    `eval.shift`: corruptions, same-class datasets): the `test_shift_*` columns, and each member's
    `test_shift_mca` beside them (`member_test_shift_mca`): does averaging help under shift?"""
    import tempfile

    from raycls.deliver.export import _resized
    from raycls.evaluate.suite import Evaluation, shift_accuracies, shifted_sets

    first = ensemble.first
    config = first.config
    # Only to draw the sets (the same samples and corruption seeds as a trial's own evaluation): writes nothing.
    drawer = Evaluation(
        model=first.model,
        phase=first.phase,
        splits=first.data.splits,
        config=config.eval,
        out=Path(tempfile.gettempdir()),
        image_size=config.data.image_size,
        seed=config.seed,
        data_config=config.data,
    )
    sets = shifted_sets(drawer)

    def accuracy_of(model: nn.Module):
        def accuracy(data) -> float:
            probs = probabilities(model, _resized(first, data.images))
            return float((probs.argmax(1) == data.labels.long()).float().mean())

        return accuracy

    metrics: dict[str, Any] = shift_accuracies(sets, accuracy_of(ensemble.module))
    if names.TEST_SHIFT_MCA in metrics:
        members = {
            member_id: shift_accuracies(sets, accuracy_of(Classifier(member).eval())).get(names.TEST_SHIFT_MCA)
            for member, member_id in zip(ensemble.members, ensemble.member_ids, strict=True)
        }
        metrics["member_test_shift_mca"] = json.dumps(members)
    return metrics


def read_ensembles(storage: str, experiment: str) -> list[dict[str, Any]]:
    """The experiment's ensemble rows."""
    from raycls.results import read_leaderboard

    return read_leaderboard(storage, experiment, kind=ENSEMBLE_DIR).table.to_pylist()


def export_ensemble(ensemble: LoadedEnsemble, out: Path, *, parity_images: int = 500) -> dict[str, Any]:
    """One ONNX graph of every member (model.onnx, output: log mean probabilities), checked against PyTorch."""
    from raycls.data.sampling import stratified_sample
    from raycls.deliver.export import MODEL_FILE, REPORT_FILE, _resized, metadata, onnx_logits, session, to_onnx

    out.mkdir(parents=True, exist_ok=True)
    first, module = ensemble.first, ensemble.module
    held_out = stratified_sample(first.data.splits.test, parity_images, first.config.seed)
    images, labels = _resized(first, held_out.images), held_out.labels.numpy()
    props = {
        **metadata(first),
        "trial_id": ensemble.name,
        "ensemble": json.dumps(ensemble.member_ids),
        "output": "log of the members' mean softmax probabilities",
    }
    exporter = to_onnx(module, images[:2].float() / 255, out / MODEL_FILE, props)
    with torch.no_grad():
        reference = torch.cat([module(images[i : i + 256].float() / 255) for i in range(0, len(images), 256)]).numpy()
    got = onnx_logits(session(out / MODEL_FILE), images)
    report = {
        "experiment": ensemble.experiment,
        "trial_id": ensemble.name,
        "members": ensemble.member_ids,
        "exporter": exporter,
        "parity": {
            "split": "test",
            "images": len(labels),
            "max_abs_logit_diff": float(np.abs(got - reference).max()),
            "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
            "torch_acc": float((reference.argmax(1) == labels).mean()),
            "onnx_acc": float((got.argmax(1) == labels).mean()),
        },
        "files": {MODEL_FILE: (out / MODEL_FILE).stat().st_size},
    }
    write_json_atomic(out / REPORT_FILE, report)
    return report
