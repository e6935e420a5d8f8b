"""Issue 31's evaluation and report additions: confidence histograms, one-vs-rest ROC curves, feature maps
(a real trained digits CNN and a tiny ViT), train vs validation curves with the overfitting point, the
supervised space's early stopping, and the MNIST results benchmark in its smoke mode."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn import metrics as skm
from torch import nn
from torchmetrics.functional.classification import multiclass_auroc

from raycls import names
from raycls.config import TrialConfig
from raycls.evaluate.classification import classification_metrics
from raycls.evaluate.confidence import confidence_histogram, confidence_metrics
from raycls.evaluate.feature_maps import feature_maps
from raycls.evaluate.figures import draw_figures
from raycls.evaluate.roc import per_class_auroc, roc_curves, roc_metrics
from raycls.evaluate.suite import (
    EVAL_SUITES,
    Evaluation,
    confidence_step,
    feature_maps_step,
    roc_step,
    run_suite,
)
from raycls.models import load_weights
from raycls.report.overfitting import overfitting_epoch
from raycls.train.loop import RunContext, build, load_data

REPO = Path(__file__).resolve().parents[1]


def _logits(n: int = 600, c: int = 5, seed: int = 0, signal: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    return torch.randn(n, c, generator=g) + signal * F.one_hot(labels, c), labels


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------ confidence histogram
def test_confidence_histogram_counts_every_image_once_split_by_correctness() -> None:
    logits, labels = _logits()
    h = confidence_histogram(logits, labels)
    correct = int((logits.argmax(-1) == labels).sum())
    assert h.total == len(labels) and sum(h.correct) == correct and sum(h.wrong) == len(labels) - correct
    assert 0 < correct < len(labels) and len(h.edges) == len(h.correct) + 1
    # No image is below 1/C confident: the bins under 1/5 are empty.
    assert sum(h.correct[:4]) + sum(h.wrong[:4]) == 0
    m = confidence_metrics(logits, labels)
    assert m[names.TEST_CONF_CORRECT] > m[names.TEST_CONF_WRONG]  # a decent model is surer when right
    assert m[names.TEST_CONF_GAP] == pytest.approx(m[names.TEST_CONF_CORRECT] - m[names.TEST_CONF_WRONG])


def test_a_certain_perfect_classifier_is_all_in_the_last_bin_and_has_no_wrong_mean() -> None:
    labels = torch.arange(10) % 4
    logits = 1000.0 * F.one_hot(labels, 4).float()  # softmax: exactly 1.0 in float64
    h = confidence_histogram(logits, labels, bins=10)
    assert h.correct == [0] * 9 + [10] and h.wrong == [0] * 10
    assert confidence_metrics(logits, labels) == {names.TEST_CONF_CORRECT: 1.0}


# ---------------------------------------------------------------------------------------------- ROC
def test_auroc_of_a_perfect_classifier_is_one_and_of_a_constant_one_half() -> None:
    labels = torch.arange(30) % 3
    perfect = roc_curves(5.0 * F.one_hot(labels, 3).float(), labels)
    constant = roc_curves(torch.zeros(30, 3), labels)
    assert [c.auroc for c in perfect] == [1.0, 1.0, 1.0] and [c.auroc for c in constant] == [0.5, 0.5, 0.5]
    assert perfect[0].fpr[0] == 0.0 and perfect[0].tpr[-1] == 1.0 and [c.positives for c in perfect] == [10] * 3
    assert roc_metrics(constant) == {names.TEST_AUROC_WORST: 0.5}


def test_per_class_auroc_matches_scikit_learn_and_a_missing_class_is_left_out() -> None:
    logits, labels = _logits(signal=1.0)
    probs = F.softmax(logits, -1).numpy()
    expected = [skm.roc_auc_score(labels.numpy() == k, probs[:, k]) for k in range(5)]
    curves = roc_curves(logits, labels)
    assert [c.auroc for c in curves] == pytest.approx(expected, abs=1e-5)
    for k in (0, 3):  # the curve itself is scikit-learn's (same points, torchmetrics drops none)
        fpr, tpr, _ = skm.roc_curve(labels.numpy() == k, probs[:, k], drop_intermediate=False)
        assert np.interp(0.2, curves[k].fpr, curves[k].tpr) == pytest.approx(np.interp(0.2, fpr, tpr), abs=1e-3)
    assert roc_metrics(curves)[names.TEST_AUROC_WORST] == pytest.approx(min(expected), abs=1e-5)
    # Class 4 absent from the split: NaN, and not a 0 in the macro average (torchmetrics' own would be).
    keep = labels != 4
    aurocs = per_class_auroc(logits[keep], labels[keep])
    assert math.isnan(aurocs[4]) and not aurocs[:4].isnan().any()
    macro = classification_metrics(logits[keep], labels[keep])[names.TEST_AUROC]
    counted_as_zero = multiclass_auroc(F.softmax(logits[keep], -1), labels[keep], num_classes=5, average="macro")
    assert macro == pytest.approx(float(aurocs[:4].mean())) and macro == pytest.approx(float(counted_as_zero) * 5 / 4)


# -------------------------------------------------------------------------------------- feature maps
def test_cnn_feature_maps_are_the_last_activation_at_each_resolution() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),  # a 1x1 map: not drawn
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    x = torch.randn(2, 1, 8, 8)
    got = feature_maps(net, lambda: net(x), stages=3)
    assert [(m.layer, tuple(m.maps.shape)) for m in got] == [("1", (2, 4, 8, 8)), ("4", (2, 6, 4, 4))]
    first = torch.relu(net[0](x))
    assert torch.equal(got[0].maps, first)
    assert torch.equal(got[1].maps, torch.relu(net[3](net[2](first))))
    assert [m.layer for m in feature_maps(net, lambda: net(x), stages=1)] == ["1"]


def test_vit_feature_maps_are_patch_token_norms_of_the_first_blocks() -> None:
    tiny = {"embed_dim": 32, "depth": 4, "num_heads": 2}  # on digits: 4 px patches, a 2x2 token grid
    config = TrialConfig.model_validate(
        {"data": {"name": "digits"}, "model": {"name": "vit_tiny_patch16_224", "kwargs": tiny}}
    )
    parts = build(config, config.stages[-1], load_data(config), RunContext())
    model, phase = parts.model.eval(), parts.phase
    backbone = phase.backbone(model)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = feature_maps(backbone, lambda: phase.outputs(model, x))
    assert [m.layer for m in got] == ["blocks.0", "blocks.1", "blocks.2"]
    tokens: list[torch.Tensor] = []
    handle = backbone.blocks[1].register_forward_hook(lambda m, i, o: tokens.append(o))
    with torch.no_grad():
        phase.outputs(model, x)
    handle.remove()
    prefix = backbone.num_prefix_tokens
    side = int(math.isqrt(tokens[0].shape[1] - prefix))
    expected = tokens[0][:, prefix:].norm(dim=-1).reshape(3, 1, side, side)
    assert got[1].maps.shape == (3, 1, side, side) and torch.allclose(got[1].maps, expected)


# ------------------------------------------------------------------------- the steps on a trained model
def _evaluation(digits_run, out: Path) -> Evaluation:
    config, _, run = digits_run
    data = load_data(config)
    parts = build(config, config.stages[-1], data, RunContext())
    parts.model.load_state_dict(load_weights(run / "checkpoints" / "best"))
    return Evaluation(
        model=parts.model,
        phase=parts.phase,
        splits=data.splits,
        config=config.eval,
        out=out,
        seed=config.seed,
        data_config=config.data,
    )


def test_the_suites_name_the_new_steps() -> None:
    assert "confidence" in EVAL_SUITES.get("default")
    assert {"confidence", "roc", "feature_maps"} <= set(EVAL_SUITES.get("full"))


def test_the_steps_write_their_files_on_a_trained_digits_cnn(digits_run, tmp_path: Path) -> None:
    ev = _evaluation(digits_run, tmp_path / "eval")
    test = ev.predictions("test")
    n = len(test)
    conf = confidence_step(ev)
    rows = _rows(tmp_path / "eval" / "confidence_histogram.csv")
    assert sum(int(r["correct"]) + int(r["wrong"]) for r in rows) == n
    correct = int((test.logits.argmax(-1) == test.labels).sum())
    assert sum(int(r["correct"]) for r in rows) == correct and correct > 0.8 * n
    assert 0.5 < conf[names.TEST_CONF_CORRECT] <= 1 and conf[names.TEST_CONF_GAP] > 0

    roc = roc_step(ev)
    aurocs = _rows(tmp_path / "eval" / "roc_auroc.csv")
    assert [r["class"] for r in aurocs] == list(ev.splits.train.classes)
    assert sum(int(r["positives"]) for r in aurocs) == n
    values = [float(r["auroc"]) for r in aurocs]
    macro = classification_metrics(test.logits, test.labels)[names.TEST_AUROC]
    assert np.mean(values) == pytest.approx(macro) and 0.95 < macro <= 1
    assert roc[names.TEST_AUROC_WORST] == pytest.approx(min(values))

    assert feature_maps_step(ev) == {}
    assert not (tmp_path / "eval" / "confidence_histogram.png").exists()  # a step writes the table only
    draw_figures(ev.out)  # ... and the picture is drawn from it
    for name in ("confidence_histogram.png", "roc_curves.png", "feature_maps.png", "feature_channels.png"):
        with Image.open(tmp_path / "eval" / name) as image:
            image.verify()
        with Image.open(tmp_path / "eval" / name) as image:
            assert 150 <= min(image.size) and max(image.size) <= 4000, (name, image.size)


def test_the_default_suite_writes_the_confidence_histogram_and_its_metrics(digits_run, tmp_path: Path) -> None:
    summary = run_suite(_evaluation(digits_run, tmp_path / "eval"), "default")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert {names.TEST_CONF_CORRECT, names.TEST_CONF_GAP} <= set(written) and written == summary["metrics"]
    assert (tmp_path / "eval" / "confidence_histogram.png").is_file()
    assert not (tmp_path / "eval" / "roc_curves.png").exists()  # the full suite's


def test_a_trials_evaluation_writes_tables_and_the_pictures_are_drawn_from_them(digits_run, tmp_path: Path) -> None:
    """A search's trial (draw=False) writes the default suite's tables only; draw_figures draws the same
    pictures `raycls eval` does from them, into another folder when asked (the report's), and W&B gets the
    tables as its own charts."""
    from raycls.evaluate.figures import FIGURES, confusion, reliability
    from raycls.results.wandb_log import evaluation_media

    trial = _evaluation(digits_run, tmp_path / "trial")
    trial.draw = False
    metrics = run_suite(trial, "default")["metrics"]
    folder = tmp_path / "trial"
    assert not list(folder.glob("*.png"))
    classes, counts = confusion(folder)  # type: ignore[misc]
    assert sum(map(sum, counts)) == metrics[names.TEST_IMAGES] and len(classes) == 10
    assert sum(counts[i][i] for i in range(10)) / metrics[names.TEST_IMAGES] == pytest.approx(metrics[names.TEST_ACC])
    bins = reliability(folder)
    assert bins is not None and sum(bins.count) == metrics[names.TEST_IMAGES]

    drawn = draw_figures(folder, tmp_path / "report")
    assert {p.name for p in drawn} == {f"{name}.png" for name in FIGURES.names()} and not list(folder.glob("*.png"))
    for png in drawn:
        assert png.parent == tmp_path / "report"
        with Image.open(png) as image:
            assert 150 <= min(image.size), png

    evaluated = _evaluation(digits_run, tmp_path / "eval")  # `raycls eval`: the same pictures, drawn with it
    run_suite(evaluated, "default")
    assert {p.name for p in (tmp_path / "eval").glob("*.png")} == {p.name for p in drawn}

    media = evaluation_media(folder)
    assert set(media) == {"eval/confusion_matrix", "eval/reliability", "eval/reliability_ts"}
    cells = media["eval/confusion_matrix"].table.data
    assert sum(n for _, _, n in cells) == metrics[names.TEST_IMAGES]
    assert {k for k in evaluation_media(tmp_path / "eval")} >= {"eval/confusion_matrix", "eval/confidence_histogram"}


def test_wandb_gets_no_confusion_chart_past_its_class_limit(tmp_path: Path) -> None:
    """A chart's table has classes x classes rows: past CONFUSION_CHART_CLASSES the CSV stays, the chart is left out."""
    from raycls.results.wandb_log import CONFUSION_CHART_CLASSES, evaluation_media

    for classes, charted in ((CONFUSION_CHART_CLASSES, True), (CONFUSION_CHART_CLASSES + 1, False)):
        folder = tmp_path / str(classes)
        folder.mkdir()
        names_ = [f"c{i}" for i in range(classes)]
        with open(folder / "confusion_matrix.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["true", *names_])
            writer.writeheader()
            writer.writerows({"true": t, **{c: int(c == t) for c in names_}} for t in names_)
        media = evaluation_media(folder)
        assert ("eval/confusion_matrix" in media) is charted
        if charted:
            assert sum(n for _, _, n in media["eval/confusion_matrix"].table.data) == classes


# ------------------------------------------------------------------------------- overfitting point
def test_overfitting_point_is_where_validation_rises_while_training_falls() -> None:
    epochs = [1, 2, 3, 4, 5, 6]
    train = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3]
    assert overfitting_epoch(epochs, train, [1.1, 0.9, 0.7, 0.75, 0.8, 0.9]) == 3
    assert overfitting_epoch(epochs, train, [1.1, 0.9, 0.7, 0.6, 0.5, 0.45]) is None  # still improving
    assert overfitting_epoch(epochs, train, [1.1, 0.9, 0.7, 0.6, 0.5, 0.7]) is None  # one epoch up is no trend
    assert overfitting_epoch(epochs, train, [1.1, 0.9, 0.7, 0.7, 0.703, 0.704]) is None  # within 1%: a plateau
    tie = [1.1, 0.9, 0.7, 0.8, 0.7, 0.8, 0.9]  # the minimum twice: the later epoch
    assert overfitting_epoch([*epochs, 7], [*train, 0.2], tie) == 5
    rising_train = [1.0, 0.8, 0.6, 0.7, 0.8, 0.9]  # both rise: diverging, not overfitting
    assert overfitting_epoch(epochs, rising_train, [1.1, 0.9, 0.7, 0.75, 0.8, 0.9]) is None
    assert overfitting_epoch(epochs, train, [1.1, None, 0.7, float("nan"), 0.8, 0.9]) == 3  # gaps skipped
    assert overfitting_epoch([1, 2], [1.0, 0.5], [1.0, 1.2]) is None
    with pytest.raises(ValueError, match="3 epochs, 2 training and 3 validation losses"):
        overfitting_epoch([1, 2, 3], [1.0, 0.5], [1.0, 1.1, 1.2])


def _write_rows(storage: Path, histories: dict[str, list[dict]]) -> None:
    from raycls.results.leaderboard import TrialRecord, write_trial

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i, (trial, history) in enumerate(histories.items()):
        write_trial(
            str(storage),
            TrialRecord(
                experiment="curves",
                trial_id=trial,
                status="completed",
                metric="val_acc",
                mode="max",
                params={},
                param_types={},
                history=history,
                started_at=start + timedelta(minutes=i),
                ended_at=start + timedelta(minutes=i + 1),
            ),
        )


def test_the_report_draws_train_vs_validation_curves_of_a_real_run(digits_run, tmp_path: Path) -> None:
    """The digits trial's real history, and a built one that overfits (its point marked); the menu picks the
    trial, best first."""
    from raycls.report.data import load_report_data
    from raycls.report.figures import build_sections, trial_overfitting

    _, _, run = digits_run
    real = json.loads((run / "metrics.json").read_text())["history"]
    assert len(real) == 8 and all(names.TRAIN_LOSS in h and names.VAL_LOSS in h for h in real)
    assert all(0 < h[names.TRAIN_ACC] <= 1 for h in real) and real[-1][names.TRAIN_ACC] > real[0][names.TRAIN_ACC]
    losses = [0.9, 0.6, 0.4, 0.45, 0.5, 0.6]
    overfit = [
        {
            names.EPOCH: e + 1,
            names.TRAIN_LOSS: 1.0 - 0.1 * e,
            names.VAL_LOSS: v,
            names.VAL_ACC: 0.5 + 0.05 * e,
            names.TRAIN_ACC: 0.5 + 0.08 * e,
        }
        for e, v in enumerate(losses)
    ]
    _write_rows(tmp_path, {"real": real, "overfits": overfit})
    data = load_report_data(str(tmp_path), "curves")
    sections = {s.name: s for s in build_sections(data)}
    names_in_order = list(sections)
    assert names_in_order.index("train_val_curves") == names_in_order.index("learning_curves") + 1
    section = sections["train_val_curves"]
    fig = section.figure
    assert fig is not None and "overfits after epoch 3" in section.note
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["overfits train_loss"].y) == pytest.approx([1.0 - 0.1 * e for e in range(6)])
    assert list(by_name["overfits val_loss"].y) == losses
    assert list(by_name["real val_loss"].y) == pytest.approx([h[names.VAL_LOSS] for h in real])
    assert list(by_name["real train_acc"].y) == pytest.approx([h[names.TRAIN_ACC] for h in real])
    star = [t for t in fig.data if t.name == "overfits overfitting point"]
    assert [(list(t.x), list(t.y)) for t in star] == [([3], [0.4]), ([3], [0.6])]
    assert trial_overfitting(data.histories["real"]) == (
        overfitting_epoch(
            [h[names.EPOCH] for h in real], [h[names.TRAIN_LOSS] for h in real], [h[names.VAL_LOSS] for h in real]
        )
    )
    # The menu: one button per trial; each shows that trial's traces only. The best trial shows first.
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == [r["trial_id"] for r in data.ranked()] and len(buttons) == 2
    for button in buttons:
        visible = button.args[0]["visible"]
        assert [t.name.split()[0] for t, v in zip(fig.data, visible) if v] == [button.label] * sum(visible)
    first = buttons[0].label
    assert all(bool(t.visible) == t.name.startswith(first) for t in fig.data)
    from raycls.report.page import render_html

    page = render_html(data, list(sections.values()))
    assert '<section id="train_val_curves">' in page and 'id="figure-train_val_curves"' in page


# ---------------------------------------------------------------------------- supervised.yaml's option
def test_supervised_space_shows_the_seeds_early_stopping_and_it_loads_when_used(tmp_path: Path) -> None:
    from raycls.config.load import load_experiment, resolve_trial

    space = REPO / "search_spaces" / "supervised.yaml"
    text = space.read_text()
    assert resolve_trial(load_experiment(space)).stages[0].train.early_stopping is None  # off, as in the seed
    commented = [line for line in text.splitlines() if line.strip().startswith("# early_stopping:")]
    assert len(commented) == 1
    used = tmp_path / "supervised.yaml"
    used.write_text(text.replace(commented[0], commented[0].replace("# ", "", 1)))
    stopping = resolve_trial(load_experiment(used)).stages[0].train.early_stopping
    assert (stopping.patience, stopping.min_delta) == (5, 0.001)
    by_set = load_experiment(space, overrides={"train.early_stopping.patience": 5})
    assert resolve_trial(by_set).stages[0].train.early_stopping.patience == 5


# ------------------------------------------------------------------------------------- train_acc
def test_train_acc_counts_the_hits_of_unmixed_batches_only() -> None:
    from raycls.phases import create_phase
    from raycls.phases.base import TRAIN_CORRECT, TRAIN_SEEN
    from raycls.train.steps import StepPolicy, train_step

    config = TrialConfig.model_validate({"data": {"name": "digits"}, "model": {"name": "small_cnn", "width": 8}})
    parts = build(config, config.stages[-1], load_data(config), RunContext())
    # Evaluation mode and lr 0: both steps see the logits computed here (BatchNorm's running statistics).
    model, phase = parts.model.eval(), parts.phase
    x, y = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    with torch.no_grad():
        expected = int((model(x).argmax(-1) == y).sum())
    tally: dict[str, torch.Tensor] = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    policy = StepPolicy.resolve(config.stages[-1].train, torch.device("cpu"))
    for _ in range(2):
        train_step(model, phase.loss, (x, y), optimizer, schedule, policy, tally)
    assert int(tally[TRAIN_SEEN]) == 32 and int(tally[TRAIN_CORRECT]) == 2 * expected
    mixing = TrialConfig.model_validate(
        {"data": {"name": "digits"}, "model": {"name": "small_cnn", "width": 8}, "phase": {"cutmix_alpha": 1.0}}
    )
    mixed = create_phase(mixing.stages[-1].phase, parts.phase.spec)
    _, extras = mixed.loss(model, (x, y))
    assert TRAIN_CORRECT not in extras  # a mixed batch has no label to be right about
