"""The evaluation suite: what a trial's best weights are worth on data never used for selection.

    Evaluation(model, phase, splits)  ->  steps of the suite, in order  ->  metrics + files in one folder

A suite is a list of steps (`EVAL_SUITES`); each step reads predictions (one cached forward pass per split,
`Evaluation.predict`) and returns `test_*` metrics, writing its tables and pictures on rank 0. Every worker
runs every step (predictions are gathered onto all of them), so steps stay free of collective logic. The
default suite's pictures are drawn from its tables at the end, when `Evaluation.draw` (raycls.evaluate.figures:
`raycls eval` draws them; a search's trials leave them to the report and W&B unless `eval.trial_plots`).

- `default` (cheap: about one forward pass over the test and validation splits): classification metrics,
  calibration with temperature scaling, per-class report, confusion matrix, reliability diagram and the
  confidence histogram of correct vs wrong predictions (no forward pass of its own); k-NN accuracy for a
  model with no classifier yet (a supcon stage).
- `full`: the default plus one-vs-rest ROC curves per class, TTA (raycls.evaluate.tta), OOD detection,
  distribution shift (with and without TTA), error analysis (confident mistakes, cleanlab's label issues),
  GradCAM++ overlays, the first blocks' feature maps (raycls.evaluate.feature_maps) and a 2-D map of the
  test embeddings.

`eval.images` evaluates a stratified seeded sample of each set instead of all of it (fast dev runs).

The heavy libraries (scikit-learn, matplotlib, cleanlab, pytorch-grad-cam) are imported by the steps that
use them: validating a config that names a suite imports this module, nothing more. torchmetrics is not
imported at all (seconds in a fresh process): raycls.evaluate.stats computes its statistics in plain torch.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raycls import names
from raycls.evaluate import figures
from raycls.evaluate.predict import Predictions, Predicts, predict
from raycls.registry import Registry
from raycls.storage import METRICS_FILE

if TYPE_CHECKING:
    from raycls.config.schema import AugmentConfig, EvalConfig
    from raycls.data.datasets import ArrayData
    from raycls.data.splits import Splits

Step = Callable[["Evaluation"], dict[str, float]]
EVAL_STEPS: Registry[Step] = Registry("eval step")
EVAL_SUITES: Registry[tuple[str, ...]] = Registry("eval suite")
# OOD sets made on the fly, no download: (n, channels, size, seed) -> uint8 images.
GENERATED_OOD: Registry[Callable[[int, int, int, int], torch.Tensor]] = Registry("ood set")
CORRUPTIONS_SET = "corruptions"  # `eval.shift: [corruptions]`: the generated corruption suite
# Shift sets that are not datasets (a dataset with the same classes, such as cifar10_1, is one too).
SHIFT_SETS: Registry[str] = Registry("shift set")
SHIFT_SETS.register(CORRUPTIONS_SET)(CORRUPTIONS_SET)
TSNE_IMAGES = 1500  # test images in the t-SNE map (its cost grows as n log n; more points only overlap)
step = EVAL_STEPS.register


@dataclass
class Evaluation:
    """One model's evaluation: its inputs, the predictions made so far, and where files go (rank 0)."""

    model: nn.Module
    phase: Predicts
    splits: Splits
    config: EvalConfig
    out: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 512
    image_size: int | None = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    data_config: Any = None  # the trial's DataConfig (OOD and shift sets are read from its root)
    augment: AugmentConfig | None = None  # the evaluated stage's training augmentation (TTA follows it)
    draw: bool = True  # a search's trials leave the default suite's pictures to whoever shows them
    notes: list[str] = field(default_factory=list)
    _cache: dict[str, Predictions] = field(default_factory=dict)
    _arrays: dict[str, ArrayData] = field(default_factory=dict)

    # The held-out split, never used for selection: every dataset has one (raycls.data.splits.carve_test).
    split = "test"

    @property
    def test(self) -> ArrayData:
        return self.arrays(self.split)

    def arrays(self, split: str) -> ArrayData:
        """A split as arrays (`eval.images` of them, a stratified sample). A streamed trial's splits are files:
        the suite's steps index images at random (CAM, error grids, shift samples), so they are decoded here,
        through the node's decode cache."""
        if split not in self._arrays:
            from raycls.data.datasets import FileData, cache_dir

            data = {"test": self.splits.test, "val": self.splits.val, "train": self.splits.train}[split]
            data = self.sample(data, self.config.images)  # type: ignore[arg-type]
            if isinstance(data, FileData):
                keep = self.data_config is None or self.data_config.decode_cache
                data = data.decode(cache_dir() if keep else None)
            self._arrays[split] = data  # type: ignore[assignment]
        return self._arrays[split]

    @property
    def writes(self) -> bool:
        return self.rank == 0

    @property
    def draws(self) -> bool:
        """Whether the default suite's pictures are drawn here, from its tables (raycls.evaluate.figures)."""
        return self.writes and self.draw

    def predict(
        self, data: ArrayData, key: str | None = None, *, augment: AugmentConfig | None = None, run: int = 0
    ) -> Predictions:
        """Predictions for every image of `data` (`eval.images` of them; cached under `key`), through the
        training `augment` when given (TTA's random passes; `run` seeds each). Every worker must call it."""
        if key is not None and key in self._cache:
            return self._cache[key]
        result = predict(
            self.model,
            self.phase,
            self.sample(data, self.config.images),
            mean=self.splits.mean,
            std=self.splits.std,
            device=self.device,
            batch_size=self.batch_size,
            image_size=self.image_size,
            rank=self.rank,
            world_size=self.world_size,
            augment=augment,
            seed=self.seed + run,
        )
        if key is not None:
            self._cache[key] = result
        return result

    def predictions(self, split: str) -> Predictions:
        return self.predict(self.test if split == "test" else self.arrays(split), key=split)

    def sample(self, data: ArrayData, n: int | None) -> ArrayData:
        """`n` images of `data` (all when None), stratified and seeded: never its first n (sets may be sorted
        by class)."""
        from raycls.data.sampling import stratified_sample

        return stratified_sample(data, n, self.seed)

    @property
    def tta_views(self) -> tuple[str, ...]:
        from raycls.config.schema import AugmentConfig
        from raycls.evaluate.tta import tta_views

        return tta_views(self.config.tta, self.augment or AugmentConfig())

    def tta_logits(self, data: ArrayData, clean: Predictions) -> torch.Tensor:
        """TTA's logits for `data` (whose plain predictions are `clean`, reused for the unaltered view): the
        views' weighted average, and `eval.tta.runs` passes through the training augmentation."""
        from raycls.data.datasets import ArrayData
        from raycls.evaluate.tta import tta_logits

        def logits_of(images: torch.Tensor) -> torch.Tensor:
            return (
                clean.logits
                if images is data.images
                else self.predict(ArrayData(images, data.labels, data.classes)).logits
            )

        logits = tta_logits(data.images, self.tta_views, logits_of)
        runs = self.config.tta.runs if self.augment is not None else 0
        for run in range(runs):
            logits = logits + self.predict(data, augment=self.augment, run=run + 1).logits
        return logits / (1 + runs)

    def file(self, name: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / name


def run_suite(evaluation: Evaluation, suite: str) -> dict[str, Any]:
    """Run every step of `suite`; returns the metrics (rank 0 also writes them to `metrics.json`)."""
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    for name in EVAL_SUITES.get(suite):
        metrics.update(EVAL_STEPS.get(name)(evaluation))
    metrics[names.TEST_IMAGES] = len(evaluation.predictions("test"))
    metrics[names.EVAL_S] = time.perf_counter() - started
    summary = {
        "metrics": metrics,
        names.EVAL_SPLIT: evaluation.split,
        names.EVAL_SUITE: suite,
        "notes": evaluation.notes,
    }
    if evaluation.writes:
        evaluation.file(METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if evaluation.draws:
        figures.draw_figures(evaluation.out)
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["index"])
        writer.writeheader()
        writer.writerows(rows)


def _classes(evaluation: Evaluation) -> tuple[str, ...]:
    return evaluation.splits.train.classes


# ------------------------------------------------------------------------------------------------ steps
@step("classification")
def classification_step(ev: Evaluation) -> dict[str, float]:
    from raycls.evaluate.classification import (
        classification_metrics,
        confusion_matrix,
        per_class_report,
    )

    test = ev.predictions("test")
    if test.logits is None:
        ev.notes.append("no classifier (a supcon stage): classification metrics left out; see test_knn_acc")
        return {}
    metrics = classification_metrics(test.logits, test.labels, topk=tuple(ev.config.topk))
    if ev.writes:
        _write_csv(ev.file("classification_report.csv"), per_class_report(test.logits, test.labels, _classes(ev)))
        matrix = confusion_matrix(test.logits, test.labels)
        _write_csv(
            ev.file(figures.CONFUSION_CSV),
            [
                {"true": _classes(ev)[i], **{c: int(v) for c, v in zip(_classes(ev), row)}}
                for i, row in enumerate(matrix.tolist())
            ],
        )
    return metrics


@step("calibration")
def calibration_step(ev: Evaluation) -> dict[str, float]:
    from raycls.evaluate.calibration import calibration_metrics, reliability_bins

    test = ev.predictions("test")
    if test.logits is None:
        return {}
    val = ev.predictions("val")  # T is fitted on validation, never on the split it is scored on
    metrics = calibration_metrics(test.logits, test.labels, val_logits=val.logits, val_labels=val.labels)
    if ev.writes:  # the reliability diagrams' tables (raycls.evaluate.figures draws them)
        _write_csv(ev.file(figures.RELIABILITY_CSV), figures.bin_rows(reliability_bins(test.logits, test.labels)))
        if names.TEST_TEMPERATURE in metrics:
            scaled = test.logits / metrics[names.TEST_TEMPERATURE]
            _write_csv(ev.file(figures.RELIABILITY_TS_CSV), figures.bin_rows(reliability_bins(scaled, test.labels)))
    return metrics


@step("knn")
def knn_step(ev: Evaluation) -> dict[str, float]:
    """k-NN classification of the test embeddings by the train embeddings (a model with no classifier)."""
    test = ev.predictions("test")
    if test.embeddings is None:
        return {}
    train = ev.predictions("train")
    return {names.TEST_KNN_ACC: knn_classify(train.embeddings, train.labels, test.embeddings, test.labels)}


@step("knn_if_no_classifier")
def knn_if_no_classifier(ev: Evaluation) -> dict[str, float]:
    return knn_step(ev) if ev.predictions("test").logits is None else {}


def knn_classify(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted k-NN vote of the train embeddings for each test embedding (cosine similarity)."""
    a, b = torch.nn.functional.normalize(train.float(), dim=-1), torch.nn.functional.normalize(test.float(), dim=-1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(b), 1024):
        sim = b[start : start + 1024] @ a.T
        top, idx = sim.topk(min(k, len(a)), dim=-1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, train_labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(-1) == test_labels[start : start + 1024]).sum())
    return correct / max(len(b), 1)


@step("tta")
def tta_step(ev: Evaluation) -> dict[str, float]:
    clean = ev.predictions("test")
    if clean.logits is None:
        return {}
    logits = ev.tta_logits(ev.test, clean)
    return {names.TEST_ACC_TTA: float((logits.argmax(-1) == clean.labels).float().mean())}


def ood_set(ev: Evaluation, name: str) -> ArrayData:
    """An OOD set at the in-distribution image size: generated, or any registered dataset's test split."""
    from raycls.data.datasets import ArrayData

    test = ev.test
    n, channels, size = min(len(test), 2000), test.images.shape[1], test.images.shape[-1]
    if name in GENERATED_OOD:
        images = GENERATED_OOD.get(name)(n, channels, size, ev.seed)
    else:
        images = ev.sample(registered_set(ev, name, key="eval.ood"), n).images
    return ArrayData(images, torch.zeros(len(images), dtype=torch.long), test.classes)


# The sets of each family that raycls makes for any model (what an error suggests instead of a dataset).
MADE_FOR_ANY_MODEL = {"eval.ood": GENERATED_OOD, "eval.shift": SHIFT_SETS}


def set_channels_problem(name: str, channels: int, *, key: str) -> str | None:
    """Why the registered dataset `name` cannot be an OOD or shift set (`key`: eval.ood or eval.shift) of a
    model of `channels`-channel images, from the registry without reading it: checked before any trial
    starts and again before it is read."""
    from raycls.data.datasets import DATASETS

    found = DATASETS.get(name).channels
    if found == channels:
        return None
    # Suggestions come from the registries: a name raycls cannot read would only move the error.
    others = [
        n
        for n in DATASETS.names()
        if n != name and not DATASETS.get(n).eval_only and DATASETS.get(n).channels == channels
    ]
    return (
        f"{key}: {name}: its images have {found} channel(s), the model's have {channels}; "
        f"choose a generated set (made with any channels: {', '.join(MADE_FOR_ANY_MODEL[key].names())}) "
        f"or a registered dataset of {channels}-channel images ({', '.join(others)})"
    )


def shift_classes_problem(found: tuple[str, ...], classes: tuple[str, ...], *, what: str) -> str | None:
    """Why a shift set whose class names are `found` cannot be scored against a model of `classes`: its
    accuracy would compare unrelated labels. Checked from the registry before any trial starts where both
    are fixed, and on the images read in any case."""
    if found == classes:
        return None

    def few(names: tuple[str, ...]) -> str:
        return f"{len(names)}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"

    return (
        f"{what}: its classes ({few(found)}) are not the model's ({few(classes)}); a shift set holds the same "
        f"classes from another distribution (cifar10_1 for cifar10)"
    )


def registered_set(ev: Evaluation, name: str, *, key: str) -> ArrayData:
    """A registered dataset's test split (its training pool when it has none), read from the trial's data
    root and resized to the evaluated images' size; its channels must match."""
    from raycls.config.schema import DataConfig
    from raycls.data.datasets import DATASETS, ArrayData, data_root
    from raycls.errors import ConfigError

    channels, size = ev.test.images.shape[1], ev.test.images.shape[-1]
    problem = set_channels_problem(name, channels, key=key)  # before reading it (CIFAR-10: 60k images)
    if problem:
        raise ConfigError(problem)
    config = DataConfig(name=name, root=getattr(ev.data_config, "root", None)) if name != "folder" else ev.data_config
    raw = DATASETS.get(name).read(config, data_root(config))
    data = raw.test if raw.test is not None else raw.train
    images = data.images
    if images.shape[-1] != size or images.shape[-2] != size:
        images = (
            torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )
    return ArrayData(images, data.labels, data.classes)


@step("ood")
def ood_step(ev: Evaluation) -> dict[str, float]:
    from raycls.evaluate.ood import OOD_SCORERS, fit_feature_stats, separation
    from raycls.plots import histograms

    test = ev.predictions("test")
    if test.logits is None or not ev.config.ood:
        return {}
    stats = fit_feature_stats(ev.predictions("train")) if test.embeddings is not None else None
    scorers = {name: OOD_SCORERS.get(name) for name in OOD_SCORERS.names()}
    usable = {k: s.score for k, s in scorers.items() if stats is not None or not s.needs_features}
    metrics: dict[str, float] = {}
    scores: dict[str, dict[str, Any]] = {k: {ev.split: fn(test, stats).numpy()} for k, fn in usable.items()}
    for name in ev.config.ood:
        out = ev.predict(ood_set(ev, name))
        for scorer, fn in usable.items():
            out_scores = fn(out, stats)
            for measure, value in separation(fn(test, stats), out_scores).items():
                metrics[names.test_ood(name, scorer, measure)] = value
            scores[scorer][name] = out_scores.numpy()
    if ev.writes:
        histograms(scores, ev.file("ood_scores.png"))
    return metrics


ShiftedSet = tuple[str, "int | None", "ArrayData"]  # (dataset or corruption, severity or None, its images)


def shifted_sets(ev: Evaluation) -> list[ShiftedSet]:
    """The full suite's shifted sets (`eval.shift`): datasets with the same classes, and each corruption at
    each severity of `eval.shift_images` test images (a stratified sample)."""
    from raycls.data.datasets import ArrayData
    from raycls.errors import ConfigError
    from raycls.evaluate.shift import corrupt

    sets: list[ShiftedSet] = []
    for name in ev.config.shift:
        if name != CORRUPTIONS_SET:  # a dataset with the same classes (CIFAR-10.1 for CIFAR-10)
            data = registered_set(ev, name, key="eval.shift")
            problem = shift_classes_problem(data.classes, ev.test.classes, what=f"eval.shift: {name}")
            if problem:
                raise ConfigError(problem)
            sets.append((name, None, ev.sample(data, ev.config.images)))
            continue
        sample = ev.sample(ev.test, ev.config.shift_images)
        for corruption in ev.config.corruptions:
            for severity in ev.config.severities:
                images = corrupt(sample.images, corruption, severity, seed=ev.seed + severity)
                sets.append((corruption, severity, ArrayData(images, sample.labels, sample.classes)))
    return sets


def shift_accuracies(
    sets: list[ShiftedSet], accuracy: Callable[[ArrayData], float], suffix: Callable[[str], str] = str
) -> dict[str, float]:
    """`accuracy` on every shifted set (`shifted_sets`): per dataset, per corruption (mean over severities) and
    their mean (`test_shift_mca`); `suffix` names each metric (plain, or with TTA)."""
    metrics: dict[str, float] = {}
    per_corruption: dict[str, list[float]] = {}
    for name, severity, data in sets:
        if severity is None:
            metrics[suffix(names.test_shift(name))] = accuracy(data)
        else:
            per_corruption.setdefault(name, []).append(accuracy(data))
    for corruption, accuracies in per_corruption.items():
        metrics[suffix(names.test_shift(corruption))] = sum(accuracies) / len(accuracies)
    if per_corruption:
        metrics[suffix(names.TEST_SHIFT_MCA)] = sum(sum(a) / len(a) for a in per_corruption.values()) / len(
            per_corruption
        )
    return metrics


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


@step("shift")
def shift_step(ev: Evaluation) -> dict[str, float]:
    from raycls.plots import bars

    clean = ev.predictions("test")
    if clean.logits is None or not ev.config.shift:
        return {}

    def accuracy(data: ArrayData) -> float:
        shifted = ev.predict(data)
        return _accuracy(shifted.logits, shifted.labels)

    metrics = shift_accuracies(shifted_sets(ev), accuracy)
    if names.TEST_SHIFT_MCA in metrics:
        clean_acc = _accuracy(clean.logits, clean.labels)
        metrics[names.TEST_SHIFT_GAP] = clean_acc - metrics[names.TEST_SHIFT_MCA]
        if ev.writes:
            per_corruption = {c: metrics[names.test_shift(c)] for c in ev.config.corruptions}
            bars(
                per_corruption,
                ev.file("corruptions.png"),
                title="accuracy under corruption (mean over severities)",
                ylabel="accuracy",
                reference=clean_acc,
            )
    return metrics


@step("shift_tta")
def shift_tta_step(ev: Evaluation) -> dict[str, float]:
    """The shifted sets' accuracies with TTA (`test_shift_mca_tta`, ...): does TTA help under shift?"""
    if ev.predictions("test").logits is None or not ev.config.shift:
        return {}

    def accuracy(data: ArrayData) -> float:
        plain = ev.predict(data)
        return _accuracy(ev.tta_logits(data, plain), plain.labels)

    return shift_accuracies(shifted_sets(ev), accuracy, names.with_tta)


@step("errors")
def errors_step(ev: Evaluation) -> dict[str, float]:
    from raycls.evaluate.errors import confident_mistakes, label_issues
    from raycls.plots import image_grid

    test = ev.predictions("test")
    if test.logits is None:
        return {}
    classes = _classes(ev)
    issues = label_issues(test.probs, test.labels)
    if ev.writes:
        mistakes = confident_mistakes(test.probs, test.labels, top=ev.config.gallery)
        if mistakes:
            index = torch.tensor([m["index"] for m in mistakes])
            captions = [
                f"true {classes[m['label']]}\npred {classes[m['predicted']]} {m['confidence']:.2f}" for m in mistakes
            ]
            image_grid(ev.test.images[index], captions, ev.file("confident_mistakes.png"))
        rows = [{**r, "label_name": classes[r["label"]], "suggested_name": classes[r["suggested"]]} for r in issues]
        _write_csv(ev.file("label_issues.csv"), rows)
    return {names.TEST_LABEL_ISSUES: float(len(issues))}


@step("cam")
def cam_step(ev: Evaluation) -> dict[str, float]:
    from raycls.evaluate.cam import LogitsOf, gradcam_pp
    from raycls.evaluate.errors import confident_mistakes
    from raycls.plots import image_grid

    test = ev.predictions("test")
    if test.logits is None or not ev.writes:
        return {}
    per_class = ev.config.cam_per_class
    picks = [int(i) for c in range(len(_classes(ev))) for i in (test.labels == c).nonzero().flatten()[:per_class]]
    mistakes = [m["index"] for m in confident_mistakes(test.probs, test.labels, top=8)]
    classifier = LogitsOf(ev.model, ev.phase.outputs).eval()
    backbone = ev.phase.backbone(ev.model)
    predicted = test.logits.argmax(-1)
    for name, index in (("gradcam_per_class.png", picks), ("gradcam_mistakes.png", mistakes)):
        if not index:
            continue
        idx = torch.tensor(index)
        images = ev.test.images[idx]
        x = _normalise(ev, images)
        maps = gradcam_pp(classifier, backbone, x, predicted[idx])
        maps = torch.nn.functional.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
        captions = [f"{_classes(ev)[int(test.labels[i])]} -> {_classes(ev)[int(predicted[i])]}" for i in index]
        image_grid(images, captions, ev.file(name), overlays=maps)
    return {}


def _rgb(image: torch.Tensor) -> Any:
    """A uint8 [C, H, W] image as an [H, W, 3] array to draw (grey repeated, extra channels dropped)."""
    return (image if image.shape[0] >= 3 else image[:1].repeat(3, 1, 1))[:3].permute(1, 2, 0).numpy()


def _normalise(ev: Evaluation, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(ev.splits.mean, device=ev.device).view(1, -1, 1, 1)
    std = torch.tensor(ev.splits.std, device=ev.device).view(1, -1, 1, 1)
    x = (images.to(ev.device).float() / 255.0 - mean) / std
    if ev.image_size is not None and ev.image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(
            x, size=(ev.image_size, ev.image_size), mode="bilinear", align_corners=False
        )
    return x


@step("embedding_map")
def embedding_map_step(ev: Evaluation) -> dict[str, float]:
    from sklearn.manifold import TSNE

    from raycls.plots import scatter_2d

    test = ev.predictions("test")
    if test.embeddings is None or not ev.writes or len(test) < 10:
        return {}
    from raycls.data.sampling import stratified_subset

    keep = torch.from_numpy(stratified_subset(test.labels.numpy(), TSNE_IMAGES, ev.seed))
    points = TSNE(n_components=2, init="pca", perplexity=min(30, len(keep) - 1), random_state=ev.seed).fit_transform(
        test.embeddings[keep].numpy()
    )
    scatter_2d(
        points,
        test.labels[keep].numpy(),
        _classes(ev),
        ev.file("embeddings_tsne.png"),
        title=f"t-SNE of {ev.split} embeddings",
    )
    return {}


@step("confidence")
def confidence_step(ev: Evaluation) -> dict[str, float]:
    """The confidence histogram of correct vs wrong predictions (confidence_histogram.png and .csv)."""
    from raycls.evaluate.confidence import confidence_histogram, confidence_metrics

    test = ev.predictions("test")
    if test.logits is None:
        return {}
    metrics = confidence_metrics(test.logits, test.labels)
    if ev.writes:
        histogram = confidence_histogram(test.logits, test.labels)
        edges = histogram.edges
        _write_csv(
            ev.file(figures.CONFIDENCE_CSV),
            [
                {"low": edges[i], "high": edges[i + 1], "correct": histogram.correct[i], "wrong": histogram.wrong[i]}
                for i in range(len(histogram.correct))
            ],
        )
    return metrics


ROC_CURVES_DRAWN = 10  # more classes: the worst ones are drawn (every class's AUROC is in roc_auroc.csv)


@step("roc")
def roc_step(ev: Evaluation) -> dict[str, float]:
    """One-vs-rest ROC curves per class (roc_curves.png), every class's AUROC (roc_auroc.csv)."""
    from raycls.evaluate.roc import roc_curves, roc_metrics
    from raycls.plots import roc_curves as draw

    test = ev.predictions("test")
    if test.logits is None:
        return {}
    curves = roc_curves(test.logits, test.labels)
    if ev.writes:
        classes = _classes(ev)
        _write_csv(
            ev.file("roc_auroc.csv"),
            [
                {"class": classes[i] if i < len(classes) else str(i), "positives": c.positives, "auroc": c.auroc}
                for i, c in enumerate(curves)
            ],
        )
        present = [i for i, c in enumerate(curves) if c.positives > 0]
        drawn = sorted(present, key=lambda i: curves[i].auroc)[:ROC_CURVES_DRAWN]
        title = f"{ev.split}: one-vs-rest ROC" + (
            f", the {len(drawn)} worst of {len(present)} classes" if len(drawn) < len(present) else ""
        )
        draw(
            [
                (str(classes[i]) if i < len(classes) else str(i), curves[i].fpr, curves[i].tpr, curves[i].auroc)
                for i in sorted(drawn)
            ],
            ev.file("roc_curves.png"),
            title=title,
        )
    return roc_metrics(curves)


FEATURE_MAP_IMAGES = 4  # test images whose feature maps are drawn (of different classes)
FEATURE_MAP_CHANNELS = 8  # strongest channels of each CNN layer drawn for the first of them


@step("feature_maps")
def feature_maps_step(ev: Evaluation) -> dict[str, float]:
    """The first blocks' activations for a few test images (feature_maps.png: channel mean or token norm per
    layer; feature_channels.png: a CNN's strongest channels for the first image)."""
    from raycls.evaluate.feature_maps import feature_maps, strongest_channels
    from raycls.plots import map_grid

    if not ev.writes:
        return {}
    test = ev.test
    picks: list[int] = []
    for c in range(len(_classes(ev))):
        picks += [int(i) for i in (test.labels == c).nonzero().flatten()[:1]]
        if len(picks) == FEATURE_MAP_IMAGES:
            break
    if not picks:
        return {}
    images = test.images[torch.tensor(picks)]
    x = _normalise(ev, images)
    ev.model.eval()
    layers = feature_maps(ev.phase.backbone(ev.model), lambda: ev.phase.outputs(ev.model, x))
    shown = [_rgb(image) for image in images]
    cells = [[shown[b]] + [layer.maps[b].abs().mean(0).numpy() for layer in layers] for b in range(len(picks))]
    titles = [
        [f"{_classes(ev)[int(test.labels[i])]}"] + [f"{layer.layer} {tuple(layer.maps.shape[-2:])}" for layer in layers]
        for i in picks
    ]
    map_grid(cells, titles, ev.file("feature_maps.png"))
    cnn_layers = [layer for layer in layers if layer.maps.shape[1] > 1]
    if cnn_layers:
        rows, row_titles = [], []
        for layer in cnn_layers:
            index = strongest_channels(layer.maps[0], FEATURE_MAP_CHANNELS)
            rows.append([layer.maps[0, k].numpy() for k in index])
            row_titles.append([f"{layer.layer} ch {int(k)}" for k in index])
        map_grid(rows, row_titles, ev.file("feature_channels.png"))
    return {}


# -------------------------------------------------------------------------------------- generated OOD sets
_generated = GENERATED_OOD.register


@_generated("uniform_noise")
def uniform_noise(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


@_generated("gaussian_blobs")
def gaussian_blobs(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random blobs: Gaussian noise blurred at a few pixels' scale, stretched to the full range."""
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(n, channels, size, size, generator=g)
    sigma = max(size / 16, 1.0)
    radius = int(3 * sigma)
    kernel = torch.exp(-(torch.arange(-radius, radius + 1).float() ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(noise, (radius,) * 4, mode="circular"), kernel, groups=channels
    )
    blurred = torch.nn.functional.conv2d(blurred, kernel.transpose(-1, -2), groups=channels)
    lo = blurred.amin(dim=(1, 2, 3), keepdim=True)
    hi = blurred.amax(dim=(1, 2, 3), keepdim=True)
    return ((blurred - lo) / (hi - lo + 1e-8) * 255).round().to(torch.uint8)


@_generated("textures")
def textures(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Oriented sinusoidal gratings and checkerboards at random frequencies, phases and colours."""
    g = torch.Generator().manual_seed(seed + 2)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    theta = torch.rand(n, 1, 1, generator=g) * torch.pi
    freq = 0.15 + torch.rand(n, 1, 1, generator=g) * 0.8
    phase = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi
    wave = torch.sin(freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    checker = torch.sign(torch.sin(freq * xx + phase) * torch.sin(freq * yy))
    pattern = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, wave, checker)
    colour = torch.rand(n, channels, 1, 1, generator=g)
    return ((pattern[:, None] * 0.5 + 0.5) * colour * 255).round().to(torch.uint8)


DEFAULT_STEPS = ("classification", "calibration", "confidence", "knn_if_no_classifier")
EVAL_SUITES.register("default")(DEFAULT_STEPS)
EVAL_SUITES.register("full")(
    (
        "classification",
        "calibration",
        "confidence",
        "roc",
        "knn",
        "tta",
        "ood",
        "shift",
        "shift_tta",
        "errors",
        "cam",
        "feature_maps",
        "embedding_map",
    )
)
