"""The held-out evaluation (raycls.evaluate): metrics cross-checked against scikit-learn, calibration, OOD on
real MNIST vs Fashion-MNIST, planted label flips, 2-worker DDP equal to one process, the suite's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from sklearn import metrics as skm

from raycls import names
from raycls.config import TrialConfig
from raycls.errors import ConfigError
from raycls.evaluate.calibration import (
    brier,
    calibration_metrics,
    ece,
    fit_temperature,
    mce,
)
from raycls.evaluate.classification import (
    classification_metrics,
    confusion_matrix,
    per_class_report,
)
from raycls.evaluate.ood import OOD_SCORERS, separation
from raycls.evaluate.predict import predict
from raycls.evaluate.shift import CORRUPTIONS, corrupt
from raycls.evaluate.suite import (
    Evaluation,
    errors_step,
    ood_step,
    run_suite,
    shifted_sets,
)
from raycls.evaluate.tta import weighted_views
from raycls.models import load_weights
from raycls.train.evaluation import evaluate_weights
from raycls.train.local import run_local
from raycls.train.loop import Data, RunContext, build, load_data


def _predictions(n: int = 400, c: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 2.5 * F.one_hot(labels, c)  # a decent, imperfect classifier
    return logits, labels


# ------------------------------------------------------------------------------------------- metrics
def test_classification_metrics_match_scikit_learn() -> None:
    logits, labels = _predictions()
    got = classification_metrics(logits, labels, topk=(1, 3, 5))
    probs = F.softmax(logits.double(), -1).numpy()
    y, pred = labels.numpy(), logits.argmax(-1).numpy()
    assert got[names.TEST_ACC] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    for k in (3, 5):
        assert got[names.test_topk(k)] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=k), abs=1e-6)
    for average in ("macro", "weighted"):
        assert got[f"test_{average}_f1"] == pytest.approx(skm.f1_score(y, pred, average=average), abs=1e-5)
        assert got[f"test_{average}_precision"] == pytest.approx(
            skm.precision_score(y, pred, average=average), abs=1e-5
        )
        assert got[f"test_{average}_recall"] == pytest.approx(skm.recall_score(y, pred, average=average), abs=1e-5)
    assert got[names.TEST_AUROC] == pytest.approx(
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-4
    )
    assert got[names.TEST_NLL] == pytest.approx(skm.log_loss(y, probs), abs=1e-4)
    assert torch.equal(confusion_matrix(logits, labels), torch.from_numpy(skm.confusion_matrix(y, pred)))
    report = per_class_report(logits, labels, tuple("abcdefg"))
    assert [r["f1"] for r in report] == pytest.approx(list(skm.f1_score(y, pred, average=None)), abs=1e-5)
    assert sum(r["support"] for r in report) == len(labels)


def test_ece_mce_and_brier_on_a_hand_computed_case() -> None:
    # Two bins hold everything: 4 images at confidence 0.9 (3 right), 2 at 0.6 (both wrong).
    p_hi, p_lo = 0.9, 0.6
    probs = torch.tensor([[p_hi, 1 - p_hi]] * 4 + [[p_lo, 1 - p_lo]] * 2)
    logits = probs.log()
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # bin 0.9: |0.75 - 0.9| = 0.15, weight 4/6; bin 0.6: |0 - 0.6| = 0.6, weight 2/6
    assert ece(logits, labels) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.6, abs=1e-5)
    assert mce(logits, labels) == pytest.approx(0.6, abs=1e-5)
    expected_brier = (3 * (0.1**2 * 2) + (0.9**2 * 2) + 2 * (0.6**2 * 2)) / 6
    assert brier(logits, labels) == pytest.approx(expected_brier, abs=1e-6)


def test_temperature_scaling_lowers_the_nll_of_an_over_confident_model() -> None:
    logits, labels = _predictions(n=2000, seed=1)
    val_logits, val_labels = _predictions(n=1000, seed=2)
    # These logits are calibrated when scaled by 2.5 (a unit Gaussian shifted by 2.5 for the true class);
    # times 10 they keep their ranking and are far too sure of themselves: the fitted T should be near 4.
    over = logits * 10
    t = fit_temperature(val_logits * 10, val_labels)
    assert 3 < t < 5.5
    got = calibration_metrics(over, labels, val_logits=val_logits * 10, val_labels=val_labels)
    assert got[names.TEST_NLL_TS] < F.cross_entropy(over, labels).item() * 0.8
    assert got[names.TEST_ECE_TS] < got[names.TEST_ECE]


def test_ood_separation_measures() -> None:
    inside, outside = torch.arange(1.0, 101.0), torch.arange(0.0, 10.0)
    got = separation(inside, outside)
    # 95% of in-distribution scores lie above 5.95 (the 5th percentile of 1..100): 6, 7, 8, 9 of 0..9 pass.
    assert got["fpr95"] == pytest.approx(0.4)
    # AUROC: the share of (in, out) pairs ranked right, ties counting half: only 1..9 of `inside` meet `outside`.
    pairs_wrong = sum(float(o > i) + 0.5 * float(o == i) for i in range(1, 10) for o in range(10))
    assert got["auroc"] == pytest.approx(1 - pairs_wrong / 1000)


def test_corruptions_keep_shape_and_grow_with_severity() -> None:
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS.names():
        distances = []
        for severity in (1, 5):
            out = corrupt(images, name, severity, seed=1)
            assert out.dtype == torch.uint8 and out.shape == images.shape
            distances.append((out.float() - images.float()).abs().mean().item())
        assert distances[1] >= distances[0] > 0, name
    with pytest.raises(KeyError, match="unknown corruption 'fog_of_war'; known: brightness, contrast"):
        corrupt(images, "fog_of_war", 1)


def test_tta_views_are_airbenchs_six() -> None:
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    views = weighted_views(images, ("identity", "translate", "hflip"))
    assert [w for w, _ in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]  # airbench's weights
    assert views[0][1] is images and torch.equal(views[1][1], images.flip(-1))
    assert torch.equal(views[2][1][..., 1:, 1:], images[..., :-1, :-1])  # shifted by one pixel
    assert torch.equal(views[3][1], views[2][1].flip(-1))


# ---------------------------------------------------------------------------------- trained models
def _evaluation(config: TrialConfig, weights: dict, data: Data, out: Path, **eval_overrides) -> Evaluation:
    stage = config.stages[-1]
    parts = build(config, stage, data, RunContext())
    parts.model.load_state_dict(weights)
    eval_config = config.eval.model_copy(update=eval_overrides)
    return Evaluation(
        model=parts.model,
        phase=parts.phase,
        splits=data.splits,
        config=eval_config,
        out=out,
        batch_size=512,
        seed=config.seed,
        data_config=config.data,
    )


@pytest.fixture(scope="module")
def mnist_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """~12 s: a small CNN trained for 3 epochs on 4,000 real MNIST images (98% test accuracy)."""
    config = TrialConfig.model_validate(
        {
            "data": {"name": "mnist", "root": str(shared_data), "train_subset": 4000, "val_fraction": 0.1},
            "model": {"name": "small_cnn", "width": 16},
            "train": {"epochs": 3, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 0},
            "eval": {"on": "none"},
        }
    )
    out = tmp_path_factory.mktemp("mnist")
    run_local(config, out)
    return config, load_weights(out / "checkpoints" / "best"), load_data(config)


@pytest.mark.slow
def test_mnist_model_tells_fashion_mnist_apart(mnist_model, tmp_path: Path) -> None:
    """The feature-space scorers separate Fashion-MNIST from MNIST almost perfectly (measured AUROC 0.999 for
    Mahalanobis and ViM). The logit scorers do not, for this model: Fashion-MNIST's larger bright areas give
    this BatchNorm + global-pooling CNN *larger* logits than digits, so energy's AUROC was 0.43 after 3
    epochs on 4,000 images and only 0.81-0.88 after 4-6 epochs on 10,000 (MSP 0.76 -> 0.94): it grows with
    training, too slowly for a test. They are reported, and checked to be computed, not asserted above 0.9."""
    config, weights, data = mnist_model
    ev = _evaluation(config, weights, data, tmp_path / "eval", ood=("fashion_mnist", "uniform_noise"))
    got = ood_step(ev)
    print({k: round(v, 3) for k, v in got.items() if k.endswith("auroc")})
    for scorer in ("mahalanobis", "vim"):
        assert got[names.test_ood("fashion_mnist", scorer, "auroc")] > 0.95, scorer
        assert got[names.test_ood("fashion_mnist", scorer, "fpr95")] < 0.2, scorer
    assert all(0 <= got[names.test_ood("fashion_mnist", s, "auroc")] <= 1 for s in ("msp", "max_logit", "energy"))
    assert set(OOD_SCORERS.names()) == {
        k.split("_", 4)[-1].rsplit("_", 1)[0] for k in got if "fashion_mnist" in k and k.endswith("auroc")
    }
    assert Image.open(tmp_path / "eval" / "ood_scores.png").size[0] > 200


# The same checks as raycls.prepare's, at evaluation: `raycls eval --set` and sets whose classes only their
# files know reach the suite without the preflight.
OTHER_SETS = {
    "ood_channels": (
        "ood",
        "cifar10",
        ood_step,
        r"eval.ood: cifar10: its images have 3 channel\(s\), the model's have 1",
    ),
    "shift_classes": ("shift", "fashion_mnist", shifted_sets, r"eval.shift: fashion_mnist: its classes \(10: t-shirt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OTHER_SETS))
def test_an_eval_set_the_model_cannot_be_scored_on_is_a_clear_error(mnist_model, tmp_path: Path, case: str) -> None:
    key, name, step, message = OTHER_SETS[case]
    config, weights, data = mnist_model
    ev = _evaluation(config, weights, data, tmp_path / "eval", **{key: (name,)})
    with pytest.raises(ConfigError, match=message):
        step(ev)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory):
    """~5 s: a small CNN trained to ~95% on the 1,797 real 8x8 digits."""
    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.3},
            "model": {"name": "small_cnn", "width": 16},
            "train": {"epochs": 12, "batch_size": 64, "lr": 5e-3, "warmup_epochs": 0},
            "eval": {"on": "none"},
        }
    )
    out = tmp_path_factory.mktemp("digits")
    run_local(config, out)
    return config, load_weights(out / "checkpoints" / "best"), load_data(config)


# Measured on this model (98.7% validation accuracy), 16 flips among 539 images: recall 0.75 for the flip
# seed the test uses; 0.56-0.94 over flip seeds 0-5, and no image flagged that was not planted.
FLIP_RECALL_FLOOR = 0.6


def test_planted_label_flips_are_found_by_confident_learning(digits_model, tmp_path: Path) -> None:
    config, weights, data = digits_model
    splits = data.splits
    labels = splits.val.labels.clone()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(labels), size=16, replace=False)
    labels[flipped] = (labels[flipped] + torch.from_numpy(rng.integers(1, 10, 16))) % 10
    noisy = type(splits)(
        train=splits.train,
        val=splits.val,
        test=type(splits.val)(splits.val.images, labels, splits.val.classes),
        mean=splits.mean,
        std=splits.std,
    )
    ev = _evaluation(config, weights, Data(noisy, data.spec), tmp_path / "eval")
    got = errors_step(ev)
    rows = list(csv_rows(tmp_path / "eval" / "label_issues.csv"))
    found = {int(r["index"]) for r in rows}
    recall = len(found & set(flipped.tolist())) / len(flipped)
    print(f"label issues: recall {recall:.2f}, flagged {len(found)}")
    assert recall >= FLIP_RECALL_FLOOR and got[names.TEST_LABEL_ISSUES] == len(rows)
    suggested = {int(r["index"]): int(r["suggested"]) for r in rows}
    restored = [i for i in flipped.tolist() if i in suggested and suggested[i] == int(splits.val.labels[i])]
    assert len(restored) >= len(found & set(flipped.tolist())) * 0.8  # the suggestion is mostly the true label
    assert Image.open(tmp_path / "eval" / "confident_mistakes.png").size[1] > 100


def csv_rows(path: Path):
    import csv

    with open(path) as handle:
        yield from csv.DictReader(handle)


@pytest.mark.slow
def test_full_suite_writes_every_file_and_sane_images(digits_model, tmp_path: Path) -> None:
    config, weights, data = digits_model
    config = config.model_copy(
        update={"eval": config.eval.model_copy(update={"shift_images": 200, "severities": (1, 5)})}
    )
    summary = evaluate_weights(config, weights, data, RunContext(), out_uri=str(tmp_path / "eval"), suite="full")
    m = summary["metrics"]
    assert summary[names.EVAL_SPLIT] == "test"  # digits' carved test split
    assert m[names.TEST_ACC] > 0.85 and m[names.TEST_KNN_ACC] > 0.8 and 0 <= m[names.TEST_ECE] <= 1
    assert m[names.TEST_SHIFT_GAP] == pytest.approx(m[names.TEST_ACC] - m[names.TEST_SHIFT_MCA], abs=1e-6)
    assert names.TEST_ACC_TTA in m and names.test_ood("textures", "vim", "fpr95") in m
    files = {p.name for p in (tmp_path / "eval").iterdir()}
    assert {"metrics.json", "classification_report.csv", "confusion_matrix.csv", "label_issues.csv"} <= files
    pngs = sorted((tmp_path / "eval").glob("*.png"))
    assert {p.name for p in pngs} >= {
        "confusion_matrix.png",
        "reliability.png",
        "ood_scores.png",
        "corruptions.png",
        "confident_mistakes.png",
        "gradcam_per_class.png",
        "embeddings_tsne.png",
    }
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert 150 <= min(image.size) and max(image.size) <= 4000, (png.name, image.size)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == pytest.approx(m)
    # Evaluating again replaces the folder whole.
    (tmp_path / "eval" / "stale.txt").write_text("from an older evaluation")
    evaluate_weights(config, weights, data, RunContext(), out_uri=str(tmp_path / "eval"), suite="default")
    assert not (tmp_path / "eval" / "stale.txt").exists() and not (tmp_path / "eval" / "ood_scores.png").exists()


def test_gradcam_on_a_vision_transformer(tmp_path: Path) -> None:
    """The token reshape: a tiny timm ViT (random weights) gets one map per image, of the image's size."""
    from raycls.evaluate.cam import LogitsOf, gradcam_pp

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # on digits: 4 px patches, a 2x2 token grid
    config = TrialConfig.model_validate(
        {"data": {"name": "digits"}, "model": {"name": "vit_tiny_patch16_224", "kwargs": tiny}}
    )
    data = load_data(config)
    parts = build(config, config.stages[-1], data, RunContext())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = gradcam_pp(
        LogitsOf(parts.model, parts.phase.outputs), parts.phase.backbone(parts.model), x, torch.tensor([0, 1, 2])
    )
    assert maps.shape == (3, 8, 8) and torch.isfinite(maps).all()


# ----------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, init: str, out: str, config_json: str, weights_path: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = TrialConfig.from_json(config_json)
    data = load_data(config)
    parts = build(config, config.stages[-1], data, RunContext(rank=rank, world_size=world))
    parts.model.load_state_dict(torch.load(weights_path, weights_only=True))
    p = predict(
        parts.model,
        parts.phase,
        data.splits.val,
        mean=data.splits.mean,
        std=data.splits.std,
        device=torch.device("cpu"),
        batch_size=64,
        rank=rank,
        world_size=world,
    )
    torch.save({"logits": p.logits, "labels": p.labels, "embeddings": p.embeddings}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_worker_ddp_evaluation_equals_single_process(digits_model, tmp_path: Path) -> None:
    config, weights, data = digits_model
    torch.save(weights, tmp_path / "weights.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(
        _ddp_worker,
        args=(2, init, str(tmp_path / "shard"), config.to_json(), str(tmp_path / "weights.pt")),
        nprocs=2,
        join=True,
    )
    parts = build(config, config.stages[-1], data, RunContext())
    parts.model.load_state_dict(weights)
    single = predict(
        parts.model,
        parts.phase,
        data.splits.val,
        mean=data.splits.mean,
        std=data.splits.std,
        device=torch.device("cpu"),
        batch_size=64,
    )
    expected = classification_metrics(single.logits, single.labels)
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'shard'}.{rank}")
        assert torch.equal(got["labels"], single.labels)  # every image once, in the split's order
        assert torch.allclose(got["logits"], single.logits, atol=1e-5)
        assert classification_metrics(got["logits"], got["labels"]) == pytest.approx(expected, abs=1e-6)


def test_unknown_suite_and_bad_eval_keys_are_config_errors() -> None:
    from pydantic import ValidationError

    for bad, match in (
        ({"suite": "everything"}, "unknown eval suite 'everything'; known: default, full"),
        ({"ood": ["svhn_typo"]}, "unknown OOD set 'svhn_typo'"),
        ({"corruptions": ["fog"]}, "unknown corruption"),
        ({"on": "sometimes"}, "completed"),
    ):
        with pytest.raises(ValidationError, match=match):
            TrialConfig.model_validate({"eval": bad})
    assert TrialConfig.model_validate({"eval": {"topk": 5}}).eval.topk == (1, 5)


def test_run_suite_counts_the_split_it_evaluated(digits_model, tmp_path: Path) -> None:
    config, weights, data = digits_model
    summary = run_suite(_evaluation(config, weights, data, tmp_path / "eval"), "default")
    assert summary["metrics"][names.TEST_IMAGES] == len(data.splits.test)
    assert names.TEST_TEMPERATURE in summary["metrics"]  # fitted on validation, scored on the test split


def test_picking_the_trials_to_evaluate() -> None:
    from raycls.train.evaluation import pick_rows

    rows = [
        {"trial_id": f"t{i}", "status": s, "score": v, "mode": "max", "checkpoint": c, "config_json": "{}"}
        for i, (s, v, c) in enumerate(
            [
                ("completed", 0.9, "/c0"),
                ("completed", 0.95, "/c1"),
                ("early_stopped", 0.99, "/c2"),
                ("failed", None, None),
            ]
        )
    ]
    assert [r["trial_id"] for r in pick_rows(rows, "best", "x")] == ["t1"]  # stopped trials never rank
    assert [r["trial_id"] for r in pick_rows(rows, "top:5", "x")] == ["t1", "t0"]
    assert [r["trial_id"] for r in pick_rows(rows, "t2", "x")] == ["t2"]  # by id: any trial with a checkpoint
    for pick, match in (("top:0", "expected best, top:K"), ("t9", "no such trial"), ("t3", "has no checkpoint")):
        with pytest.raises(ConfigError, match=match):
            pick_rows(rows, pick, "x")
    with pytest.raises(ConfigError, match="no completed trial with a checkpoint"):
        pick_rows(rows[2:], "best", "x")


# ------------------------------------------------------------------------------------------ data explore
def test_duplicates_and_leakage_are_found(tmp_path: Path) -> None:
    from raycls.data.datasets import ArrayData
    from raycls.data.explore import leakage, perceptual_hashes, split_stats

    splits = load_data(TrialConfig()).splits  # digits
    images, labels = splits.train.images[:200].clone(), splits.train.labels[:200].clone()
    images[10] = images[3]  # an exact copy
    images[11] = (images[4].double() * 0.9).round().to(torch.uint8)  # a dimmer copy: not byte-equal, same pHash
    assert perceptual_hashes(images[11:12])[0] == perceptual_hashes(images[4:5])[0]
    stats = split_stats(ArrayData(images, labels, splits.train.classes))
    assert stats["exact_duplicate_images"] == 1 and stats["near_duplicate_images"] >= 2
    assert [3, 10] in stats["near_duplicate_examples"] and [4, 11] in stats["near_duplicate_examples"]
    assert sum(stats["class_counts"].values()) == 200 and 0 < stats["brightness"]["mean"] < 1
    test = ArrayData(
        torch.stack([images[3], images[11], splits.val.images[0]]),
        torch.zeros(3, dtype=torch.long),
        splits.train.classes,
    )
    leak = leakage(ArrayData(images, labels, splits.train.classes), test)
    assert leak["exact"] == 2 and leak["exact_test_indices"] == [0, 1]  # images[11] is itself in the pool
    assert leak["near"] >= 2 and {0, 1} <= set(leak["near_test_indices"])


def test_raycls_data_explore_writes_a_report(tmp_path: Path, capsys) -> None:
    from raycls.cli import main

    main(
        [
            "data",
            "explore",
            str(Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml"),
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert set(report["splits"]) == {"train", "val", "test"} and report["splits"]["train"]["image_size"] == [8, 8]
    assert sum(report["splits"][name]["images"] for name in ("train", "val", "test")) == 1797
    for png in tmp_path.glob("*.png"):
        with Image.open(png) as image:
            assert min(image.size) >= 150
    assert {"class_balance_train.png", "brightness_contrast.png"} <= {p.name for p in tmp_path.glob("*.png")}
    assert "Wrote data_report.json" in capsys.readouterr().out


@pytest.mark.parametrize("phase, has_classifier", [("supcon", False), ("metric", True)])
def test_every_phase_is_evaluated_through_the_head_it_predicts_with(
    phase: str, has_classifier: bool, tmp_path: Path
) -> None:
    """A supcon model has no classifier yet: k-NN accuracy of its embeddings; a metric model is scored through
    its cosine classifier. Both through `raycls train --no-ray`'s path (run_local), at the trial's end."""
    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits"},
            "model": {"name": "small_cnn", "width": 8},
            "phase": {"name": phase},
            "train": {"epochs": 1, "batch_size": 64},
        }
    )
    run_local(config, tmp_path)
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (names.TEST_ACC in summary["metrics"]) == has_classifier
    assert (names.TEST_KNN_ACC in summary["metrics"]) == (not has_classifier)
    assert summary["metrics"][names.TEST_IMAGES] == len(load_data(config).splits.test)


@pytest.mark.parametrize("name", OOD_SCORERS.names())
def test_every_ood_scorer_ranks_the_training_clusters_above_far_points(name: str) -> None:
    """Contract over the registry: three tight feature clusters with a linear classifier's logits; points
    far from every cluster (with weak logits) must score lower."""
    from raycls.evaluate.ood import fit_feature_stats
    from raycls.evaluate.predict import Predictions

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 6
    labels = torch.arange(300) % 3
    features = centres[labels] + 0.3 * torch.randn(300, 8, generator=g)
    head = torch.eye(3, 8)
    inside = Predictions(labels, features @ head.T, features)
    far_features = 0.3 * torch.randn(100, 8, generator=g) + torch.tensor([0, 0, 0, 6.0, 6.0, 0, 0, 0])
    outside = Predictions(torch.zeros(100, dtype=torch.long), far_features @ head.T, far_features)
    scorer = OOD_SCORERS.get(name)
    stats = fit_feature_stats(inside)
    assert separation(scorer.score(inside, stats), scorer.score(outside, stats))["auroc"] > 0.95


@pytest.mark.slow
def test_cifar10_1_shift_through_its_reader(shared_data: Path, tmp_path: Path) -> None:
    """`eval.shift: [cifar10_1]` on a file in CIFAR-10.1's format that the test writes (the real one cannot
    be downloaded here): the images are read by the dataset's reader and scored with their own labels."""
    from raycls.evaluate.suite import shift_step

    root = tmp_path / "data"
    (root / "cifar10_1").mkdir(parents=True)
    (root / "cifar10").symlink_to(shared_data / "cifar10")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.save(root / "cifar10_1" / "cifar10.1_v6_data.npy", images)
    np.save(root / "cifar10_1" / "cifar10.1_v6_labels.npy", np.arange(40) % 10)
    config = TrialConfig.model_validate(
        {
            "data": {"name": "cifar10", "root": str(root), "train_subset": 500},
            "model": {"name": "small_cnn", "width": 8},
        }
    )
    data = load_data(config)
    parts = build(config, config.stages[-1], data, RunContext())
    ev = _evaluation(config, parts.model.state_dict(), data, tmp_path / "eval", shift=("cifar10_1",))
    got = shift_step(ev)
    from raycls.data.datasets import ArrayData

    fake = ArrayData(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.arange(40) % 10, data.splits.train.classes
    )
    p = predict(parts.model, parts.phase, fake, mean=data.splits.mean, std=data.splits.std, device=torch.device("cpu"))
    assert got == {
        names.test_shift("cifar10_1"): pytest.approx(float((p.logits.argmax(-1) == p.labels).float().mean()))
    }


def test_yaml_on_is_a_key_not_a_boolean(tmp_path: Path) -> None:
    """YAML 1.1 reads `on` as true: `eval: {on: none}` would become {True: 'none'} (YAML 1.2 booleans here)."""
    from raycls.config import load_experiment

    space = tmp_path / "on.yaml"
    space.write_text(
        "experiment: {name: on-key}\nbase:\n  eval: {on: none, suite: full}\n  model: {pretrained: false}\n"
    )
    experiment = load_experiment(space)
    assert (
        experiment.base.eval.on == "none"
        and experiment.base.eval.suite == "full"
        and experiment.base.model.pretrained is False
    )


def test_label_issues_never_forks_a_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """cleanlab forks a multiprocessing pool by default; forked from a Ray trial actor's training thread, a
    child can inherit a held lock and hang the trial forever (seen in a zoo search). raycls asks for one job."""
    import multiprocessing.pool

    from raycls.evaluate.errors import label_issues

    def refuse(*args, **kwargs):
        raise AssertionError("label_issues started a multiprocessing pool")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", refuse)
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(400, 10, generator=gen), dim=1)
    labels = torch.randint(0, 10, (400,), generator=gen)
    issues = label_issues(probs, labels)
    assert issues and all(0 <= i["index"] < 400 for i in issues)
