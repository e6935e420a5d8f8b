"""Issue 26 (5, 6, 14): fast dev runs evaluate stratified seeded subsets, not the first N images; TTA views
follow the training augmentation and are configurable; a fast dev run shrinks its evaluation too."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from raycls import names
from raycls.config.schema import FAST_DEV_BATCHES, TrialConfig
from raycls.data import Splits
from raycls.data.datasets import ArrayData
from raycls.train.loop import Data, RunContext, build, load_data
from tests.conftest import write_yaml


def _class_sorted(data: ArrayData) -> ArrayData:
    """The split ordered by class, like the shared CIFAR-10 copy: any "first N" subset is one or two classes."""
    return data.subset(np.argsort(data.labels.numpy(), kind="stable"))


def _digits(**eval_config) -> tuple[TrialConfig, Data]:
    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.3},
            "model": {"name": "small_cnn", "width": 8},
            "eval": eval_config,
        }
    ).fast_dev_run()
    data = load_data(config)
    splits = data.splits
    sorted_splits = Splits(
        train=_class_sorted(splits.train),
        val=_class_sorted(splits.val),
        test=_class_sorted(splits.test),
        mean=splits.mean,
        std=splits.std,
    )
    return config, Data(sorted_splits, data.spec)


# ------------------------------------------------------------------------------- stratified subsets (5)
def test_a_stratified_subset_of_class_sorted_labels_has_every_class() -> None:
    from raycls.data.sampling import stratified_subset

    labels = np.repeat(np.arange(10), [100] * 9 + [1])  # sorted by class; class 9 has a single image
    picked = stratified_subset(labels, 50, seed=0)
    assert len(picked) == 50 and len(set(picked.tolist())) == 50 and (np.diff(picked) > 0).all()
    counts = np.bincount(labels[picked], minlength=10)
    assert counts[9] == 1 and (counts[:9] >= 5).all()  # every class, in proportion to its size
    assert np.array_equal(picked, stratified_subset(labels, 50, seed=0))  # seeded
    assert not np.array_equal(picked, stratified_subset(labels, 50, seed=1))
    assert len(np.unique(labels[stratified_subset(labels, 10, seed=3)])) == 10  # n = classes: one each
    assert np.array_equal(stratified_subset(labels, 5000, seed=0), np.arange(len(labels)))  # n >= N: all


def test_a_fast_dev_runs_validation_batches_cover_the_classes_of_a_sorted_split() -> None:
    config, data = _digits()
    parts = build(config, config.stages[0], data, RunContext(limit_batches=FAST_DEV_BATCHES))
    labels = torch.cat([y for _, y in parts.val_loader])
    assert len(labels) == FAST_DEV_BATCHES * config.train.eval_batch_size
    assert len(labels.unique()) == 10  # the first 64 of the sorted split hold 2 classes


def test_a_fast_dev_runs_evaluation_covers_the_classes_of_a_sorted_split(tmp_path: Path) -> None:
    from raycls.train.evaluation import evaluate_weights

    config, data = _digits(suite="full")
    model = build(config, config.stages[0], data, RunContext()).model
    summary = evaluate_weights(
        config, model.state_dict(), data, RunContext(limit_batches=FAST_DEV_BATCHES), out_uri=str(tmp_path / "eval")
    )
    with open(tmp_path / "eval" / "classification_report.csv") as handle:
        support = [int(row["support"]) for row in csv.DictReader(handle)]
    assert sum(support) == summary["metrics"][names.TEST_IMAGES] <= 64
    assert sum(s > 0 for s in support) == 10


# ------------------------------------------------------------------------------------ TTA views (6)
@pytest.mark.parametrize("hflip", [False, True])
def test_tta_views_follow_the_training_flip(hflip: bool) -> None:
    from raycls.evaluate.tta import tta_views, weighted_views

    config = TrialConfig.model_validate({"augment": {"hflip": hflip, "random_crop": 1}})
    views = tta_views(config.eval.tta, config.augment)
    assert ("hflip" in views) == hflip and "translate" in views
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    got = weighted_views(images, views)
    flipped = any(torch.equal(view, images.flip(-1)) for _, view in got)
    assert flipped == hflip and sum(w for w, _ in got) == pytest.approx(1.0)
    assert len(got) == (6 if hflip else 3)  # airbench's 6 views with flips, their 3 unflipped ones without


def test_tta_views_and_runs_are_configurable(tmp_path: Path) -> None:
    from raycls.evaluate.tta import tta_views

    config = TrialConfig.model_validate(
        {"augment": {"hflip": True}, "eval": {"tta": {"views": ["identity"], "runs": 2}}}
    )
    assert tta_views(config.eval.tta, config.augment) == ("identity",) and config.eval.tta.runs == 2


def test_an_unknown_tta_view_is_a_config_error_listing_the_known_views(tmp_path: Path) -> None:
    from raycls.config.load import load_experiment
    from raycls.errors import ConfigError

    space = write_yaml(
        tmp_path / "space.yaml",
        """
experiment: {name: bad-tta, metric: val_acc, mode: max, trials: 1}
base:
  data: {name: digits}
  eval: {suite: full, tta: {views: [identity, vflip]}}
""",
    )
    with pytest.raises(ConfigError) as err:
        load_experiment(space)
    message = str(err.value)
    assert "space.yaml" in message and "eval.tta.views" in message and "vflip" in message
    assert "known: hflip, identity, translate" in message


def test_the_full_suite_reports_tta_on_the_shifted_sets(tmp_path: Path) -> None:
    from raycls.train.evaluation import evaluate_weights

    config, data = _digits(suite="full", tta={"runs": 1})
    model = build(config, config.stages[0], data, RunContext()).model
    metrics = evaluate_weights(config, model.state_dict(), data, RunContext(), out_uri=None)["metrics"]
    corruption = config.eval.corruptions[0]
    for name in (names.TEST_ACC_TTA, names.TEST_SHIFT_MCA_TTA, names.with_tta(names.test_shift(corruption))):
        assert 0 <= metrics[name] <= 1, name


# ----------------------------------------------------------------------------- fast dev evaluation (14)
def test_a_fast_dev_run_shrinks_its_evaluation() -> None:
    full = TrialConfig.model_validate({"eval": {"suite": "full", "tta": {"runs": 4}}})
    small = full.fast_dev_run().eval
    assert small.suite == "full"  # every step still runs, on little data
    assert len(small.corruptions) == len(small.severities) == len(small.ood) == 1
    assert small.images is not None and small.images <= 64 and small.shift_images <= small.images
    assert small.cam_per_class == 1 and small.gallery <= 8 and small.tta.runs == 1
    assert full.eval.images is None  # an ordinary trial evaluates every image


def test_predict_tta_averages_the_trials_views() -> None:
    """`raycls predict --tta` asks the same owner (raycls.evaluate.tta) as the suite: no flip unless listed."""
    from raycls.deliver.predict import Predictor

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)

    def predictor(views: tuple[str, ...]) -> Predictor:
        return Predictor(("a", "b", "c"), 1, 4, "t", module=module, tta_views=views)  # type: ignore[arg-type]

    plain = predictor(("identity",))
    assert np.allclose(plain.tta_logits(images), plain.logits(images))
    mirrored = (plain.logits(images) + plain.logits(images.flip(-1))) / 2
    assert np.allclose(predictor(("identity", "hflip")).tta_logits(images), mirrored, atol=1e-6)


@pytest.mark.slow  # Ray Data on the session's Ray
def test_a_streamed_fast_dev_run_reads_a_stratified_sample_of_each_split(ray_local, tmp_path: Path) -> None:
    """A folder lists its files class by class: a fast dev run's streamed splits were their first files."""
    from raycls.train.ray_data import trial_datasets
    from tests.test_stream import CLASSES, image_folder

    folder = image_folder(tmp_path / "images", per_class=12, test_per_class=1)
    config = TrialConfig.model_validate(
        {
            "data": {"name": "folder", "path": str(folder), "folder_size": 8, "val_fraction": 0.5, "loader": "stream"},
            "train": {"batch_size": 4, "eval_batch_size": 4},
        }
    )
    datasets = trial_datasets(config, limit_batches=1)
    for split, dataset in datasets.items():
        labels = [row["label"] for row in dataset.take_all()]
        assert len(labels) == 4 and len(set(labels)) == CLASSES, (split, labels)
