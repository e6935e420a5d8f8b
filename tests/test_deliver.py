"""`raycls export`: ONNX with its metadata, parity against PyTorch in onnxruntime, the int8 copy (real
onnxruntime; a leaderboard row written the way the driver writes it, pointing at a real checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from raycls.config import TrialConfig
from raycls.deliver.export import (
    MODEL_FILE,
    REPORT_FILE,
    export,
    onnx_logits,
    session,
    to_onnx,
    torch_logits,
)
from raycls.deliver.model import Classifier, TrialModel, load_trial_model
from raycls.results.leaderboard import TrialRecord, write_trial
from raycls.train.local import run_local
from raycls.train.loop import RunContext, build, load_data

from .conftest import write_digits_row


@pytest.fixture(scope="module")
def digits_row(digits_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The session's trained digits trial (conftest.digits_run) as this module's leaderboard row."""
    return write_digits_row(digits_run, tmp_path_factory.mktemp("deliver") / "results", "digits-export")


def test_export_of_the_best_trial_with_parity_and_int8(digits_row, tmp_path: Path) -> None:
    storage, trial_id = digits_row
    trial = load_trial_model(storage, "digits-export", "best")
    report = export(trial, tmp_path, int8=True)
    parity = report["parity"]
    print(json.dumps({k: report[k] for k in ("parity", "int8", "exporter")}, indent=1))
    assert parity["split"] == "test" and parity["images"] == len(trial.data.splits.test)
    assert parity["max_abs_logit_diff"] < 1e-3 and parity["top1_agreement"] == 1.0 and parity["onnx_acc"] > 0.9
    for q in report["int8"]["methods"].values():  # shipped or not (tests/test_leaderboard_startup_int8.py)
        assert abs(q["acc_delta"]) < 0.03 and q["size_ratio"] < 0.6 and q["latency_ms"] > 0
    assert json.loads((tmp_path / REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    props = {p.key: p.value for p in onnx.load(str(tmp_path / MODEL_FILE)).metadata_props}
    assert props["trial_id"] == trial_id and json.loads(props["class_names"]) == list(trial.classes)
    assert json.loads(props["input_size"]) == [1, 8, 8] and len(json.loads(props["mean"])) == 1
    # The exported graph takes any batch size, pixels in [0, 1]: normalisation is inside.
    for n in (1, 7):
        x = torch.rand(n, 1, 8, 8)
        assert session(tmp_path / MODEL_FILE).run(None, {"images": x.numpy()})[0].shape == (n, 10)


TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.mark.parametrize(
    "model, phase",
    [
        ({"name": "resnet18"}, {"name": "supervised"}),  # a timm CNN, with raycls's small-input stem at 32 px
        ({"name": "vit_tiny_patch16_224", "kwargs": TINY}, {"name": "supervised"}),  # a ViT, 4 px patches
        ({"name": "small_cnn", "width": 8}, {"name": "metric", "loss": "arcface"}),  # a cosine classifier head
        (
            {"name": "deit_tiny_distilled_patch16_224", "kwargs": TINY},
            {"name": "distill", "distill_token": True},
        ),  # DeiT's averaged heads
    ],
    ids=["resnet18", "vit", "cosine-head", "deit-distilled"],
)
def test_every_family_and_head_exports_with_parity_at_32_px(model: dict, phase: dict, tmp_path: Path) -> None:
    config = TrialConfig.model_validate({"data": {"name": "digits", "image_size": 32}, "model": model, "phase": phase})
    data = load_data(config)
    parts = build(config, config.stages[-1], data, RunContext())
    trial = TrialModel("x", "t", config, parts.model.eval(), parts.phase, data, 0)
    module = Classifier(trial).eval()
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    to_onnx(module, images[:2].float() / 255, tmp_path / MODEL_FILE, {"trial_id": "t"})
    got, reference = onnx_logits(session(tmp_path / MODEL_FILE), images), torch_logits(module, images)
    assert np.abs(got - reference).max() < 1e-3 and (got.argmax(1) == reference.argmax(1)).all()


def test_export_of_a_missing_experiment_or_trial_is_a_usage_error(digits_row, tmp_path: Path, capsys) -> None:
    from raycls.cli import main

    storage, _ = digits_row
    for argv, message in (
        (["export", "nope", "--storage", storage], "experiment 'nope': no leaderboard rows"),
        (["export", "digits-export", "--trial", "t9", "--storage", storage], "--trial 't9': no such trial"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().out


def test_raycls_export_command(digits_row, tmp_path: Path, capsys) -> None:
    from raycls.cli import main

    storage, trial_id = digits_row
    main(["export", "digits-export", "--storage", storage, "--out", str(tmp_path / "out")])
    assert {MODEL_FILE, REPORT_FILE} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "top-1 agreement 1.0000" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- predict
@pytest.mark.slow
def test_predict_a_real_image_folder_with_a_corrupt_file(shared_data: Path, tmp_path: Path) -> None:
    """~20 s: a small CNN trained a few epochs on imagenette-mini (300 real JPEGs, 32 px), then `raycls
    predict` over its 100 validation JPEGs plus a truncated JPEG and a text file: every file has its row."""
    from raycls.cli import main
    from raycls.deliver.predict import read_image

    folder = shared_data / "imagenette-mini"
    config = TrialConfig.model_validate(
        {
            "data": {"name": "folder", "path": str(folder), "folder_size": 32, "val_fraction": 0.1},
            "model": {"name": "small_cnn", "width": 16},
            "train": {"epochs": 6, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 0},
            "eval": {"on": "none"},
        }
    )
    summary = run_local(config, tmp_path / "run")
    write_trial(
        str(tmp_path / "results"),
        TrialRecord(
            experiment="nette",
            trial_id="n0001",
            status="completed",
            metric="val_acc",
            mode="max",
            params={},
            param_types={},
            history=[summary.at_best],
            config_json=config.to_json(),
            checkpoint=str(tmp_path / "run" / "checkpoints" / "best"),
        ),
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    first = next((folder / "val").rglob("*.JPEG"))
    (bad / "truncated.jpg").write_bytes(first.read_bytes()[:300])
    (bad / "notes.txt").write_text("not an image")
    with pytest.raises((OSError, SyntaxError)):  # PIL: a truncated JPEG is an OSError
        read_image(bad / "truncated.jpg", 3, 32)
    out = tmp_path / "predictions.parquet"
    main(
        [
            "predict",
            "nette",
            str(folder / "val"),
            str(bad / "truncated.jpg"),
            str(bad / "notes.txt"),
            "--storage",
            str(tmp_path / "results"),
            "--topk",
            "3",
            "--out",
            str(out),
        ]
    )
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    good = [r for r in rows if r["error"] is None]
    assert len(rows) == 102 and len(good) == 100
    assert {Path(r["path"]).name for r in rows if r["error"]} == {"truncated.jpg", "notes.txt"}
    assert all(
        len(r["topk_labels"]) == 3 and r["topk_confidences"] == sorted(r["topk_confidences"], reverse=True)
        for r in good
    )
    accuracy = sum(r["label"] == Path(r["path"]).parent.name for r in good) / len(good)
    print(f"imagenette-mini val accuracy {accuracy:.2f} (chance 0.10)")
    assert accuracy > 0.2


def test_predict_with_the_onnx_file_agrees_with_pytorch_and_tta_and_gradcam_run(digits_row, tmp_path: Path) -> None:
    from PIL import Image

    from raycls.deliver.predict import Predictor, predict, write_predictions

    storage, _ = digits_row
    trial = load_trial_model(storage, "digits-export", "best")
    export(trial, tmp_path / "export")
    val = trial.data.splits.val
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(val.images[i, 0].numpy()).save(paths[-1])
    torch_rows = predict(Predictor.from_trial(trial, torch.device("cpu")), paths, topk=2, gradcam=tmp_path / "cam")
    onnx_rows = predict(Predictor.from_onnx(tmp_path / "export" / MODEL_FILE), paths, topk=2)
    assert [r["label"] for r in torch_rows] == [r["label"] for r in onnx_rows]
    assert [r["confidence"] for r in torch_rows] == pytest.approx([r["confidence"] for r in onnx_rows], abs=1e-4)
    assert sum(r["label"] == trial.classes[int(val.labels[i])] for i, r in enumerate(torch_rows)) >= 17
    tta_rows = predict(Predictor.from_trial(trial, torch.device("cpu")), paths, tta=True)
    assert all(r["error"] is None and 0 < r["confidence"] <= 1 for r in tta_rows)
    assert len(list((tmp_path / "cam").glob("*_gradcam.png"))) == 20
    csv = write_predictions(torch_rows, tmp_path / "p.csv").read_text().splitlines()
    assert len(csv) == 21 and csv[0].startswith('"path"')
