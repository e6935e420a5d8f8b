"""`raycls predict`: image files, folders or globs in; one row per image (top-k classes, confidences) out.

The model is a trial's best checkpoint (PyTorch, on a GPU when there is one; `--tta` and `--gradcam` use the
trial's TTA views (raycls.evaluate.tta) and GradCAM++) or an exported `model.onnx` (onnxruntime; its metadata
carries the classes, the input size and the TTA views). Images are decoded like the `folder` dataset decodes them (RGB or grey, resized
to the model's input size, bilinear). A file that cannot be read gets its own row with the error; the rest go on.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from raycls.data.datasets import IMAGE_SUFFIXES
from raycls.deliver.model import Classifier, TrialModel
from raycls.errors import RayclsError
from raycls.evaluate.tta import IDENTITY, tta_logits
from raycls.files import atomic_path


def image_paths(inputs: Iterable[str]) -> list[Path]:
    """Files as given, a CSV's listed images (an unlabelled test set: `csv_images`), folders searched
    recursively for images, anything else as a glob; in that order, unique."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file() and path.suffix.lower() == ".csv":
            found += csv_images(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise RayclsError(f"{item}: no such file or folder, and no file matches it as a glob")
            found += matches
    return list(dict.fromkeys(found))


def csv_images(table: Path) -> list[Path]:
    """The image paths of a CSV with a header (a test set of file names, labelled or not): its path, filepath,
    file or image column (as `data.name: csv` reads them), else its first column; relative to the CSV's
    folder. A listed file that is missing gets its own row with the error, as an unreadable one does."""
    import csv

    from raycls.data.datasets import CSV_PATH_COLUMNS

    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        if not header:
            raise RayclsError(f"{table}: an empty CSV (expected a header and one image path per row)")
        column = next((c for c in CSV_PATH_COLUMNS if c in header), header[0])
        listed = [(row.get(column) or "").strip() for row in reader]
    return [table.parent / Path(name).expanduser() for name in listed if name]


# `invert`: grey images made light-on-dark before predicting (true), or only those lighter than half-grey
# ("auto"): a model trained on MNIST's white digits on black reads a dark digit drawn on white paper.
Invert = bool | str


def read_image(source: Path | BinaryIO, channels: int, size: int, invert: Invert = False) -> np.ndarray:
    """uint8 [C, H, W] from an image file or stream; raises on anything PIL cannot decode (a corrupt or
    truncated file, not an image)."""
    from PIL import Image

    with Image.open(source) as image:
        image.load()  # decode now: a truncated file fails here, not later
        converted = image.convert("RGB" if channels == 3 else "L").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.uint8)
    if channels == 1 and (invert is True or (invert == "auto" and array.mean() > 127.5)):
        array = 255 - array
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@dataclass
class Predictor:
    """Logits for uint8 [N, C, H, W] images, and what the rows need to say."""

    classes: tuple[str, ...]
    channels: int
    size: int
    trial_id: str
    module: Classifier | None = None  # PyTorch
    session: Any = None  # onnxruntime
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tta_views: tuple[str, ...] = (IDENTITY,)  # `--tta`: the trial's views (raycls.evaluate.tta)

    @classmethod
    def from_trial(cls, trial: TrialModel, device: torch.device) -> Predictor:
        return cls(
            trial.classes,
            trial.channels,
            trial.image_size,
            trial.trial_id,
            module=Classifier(trial).to(device).eval(),
            device=device,
            tta_views=trial.tta_views,
        )

    @classmethod
    def from_onnx(cls, path: Path) -> Predictor:
        import onnx

        from raycls.deliver.export import session

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "class_names" not in props:
            raise RayclsError(f"{path}: no raycls metadata (class_names, input_size); export it with `raycls export`")
        channels, size, _ = json.loads(props["input_size"])
        # Files exported before the views were stored get none but the image: a view the model never trained
        # on (a mirror) can lower its accuracy.
        views = tuple(json.loads(props.get("tta_views", json.dumps([IDENTITY]))))
        return cls(
            tuple(json.loads(props["class_names"])),
            channels,
            size,
            props.get("trial_id", ""),
            session=session(path),
            tta_views=views,
        )

    def logits(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 [N, C, H, W] (a tensor, or an array: onnxruntime then never touches torch, whose per-call
        overhead exceeds a small model's run) -> logits."""
        if self.session is not None:
            pixels = images.numpy() if isinstance(images, torch.Tensor) else images
            return self.session.run(None, {"images": pixels.astype(np.float32) / 255})[0]
        x = (images if isinstance(images, torch.Tensor) else torch.tensor(images)).float() / 255
        with torch.no_grad():
            return self.module(x.to(self.device)).float().cpu().numpy()

    def tta_logits(self, images: torch.Tensor) -> np.ndarray:
        """The trial's TTA views (those its evaluation averaged for `test_acc_tta`), weighted alike."""
        return tta_logits(images, self.tta_views, self.logits)


def predict(
    predictor: Predictor,
    paths: list[Path],
    *,
    topk: int = 3,
    tta: bool = False,
    batch_size: int = 64,
    gradcam: Path | None = None,
    invert: Invert = False,
) -> list[dict[str, Any]]:
    """One row per path, in order: the top-k classes and their softmax confidences, or the error."""
    rows: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images, readable, errors = [], [], {}
        for path in chunk:
            try:
                images.append(read_image(path, predictor.channels, predictor.size, invert))
                readable.append(path)
            except Exception as err:  # noqa: BLE001 (any decoding failure is this file's row, not the run's end)
                errors[path] = f"{type(err).__name__}: {err}"
        probs = None
        if images:
            batch = torch.from_numpy(np.stack(images))
            logits = predictor.tta_logits(batch) if tta else predictor.logits(batch)
            probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), -1)
            if gradcam is not None:
                _gradcam(predictor, batch, readable, probs.argmax(-1), gradcam)
        k = min(topk, len(predictor.classes))
        done = {p: i for i, p in enumerate(readable)}
        for path in chunk:
            row: dict[str, Any] = {"path": str(path), "trial_id": predictor.trial_id, "error": errors.get(path)}
            if path in done:
                conf, idx = probs[done[path]].topk(k)
                row.update(
                    label=predictor.classes[int(idx[0])],
                    confidence=float(conf[0]),
                    topk_labels=[predictor.classes[int(i)] for i in idx],
                    topk_confidences=[float(c) for c in conf],
                )
            else:
                row.update(label=None, confidence=None, topk_labels=None, topk_confidences=None)
            rows.append(row)
    return rows


def _gradcam(predictor: Predictor, batch: torch.Tensor, paths: list[Path], targets: torch.Tensor, folder: Path) -> None:
    from raycls.evaluate.cam import LogitsOf, gradcam_pp
    from raycls.plots import image_grid

    if predictor.module is None:
        raise RayclsError("--gradcam needs the PyTorch model (an experiment), not an ONNX file")
    module = predictor.module
    x = ((batch.float() / 255).to(predictor.device) - module.mean) / module.std
    maps = gradcam_pp(LogitsOf(module.model, module.phase.outputs), module.phase.backbone(module.model), x, targets)
    for i, path in enumerate(paths):
        image_grid(
            batch[i : i + 1],
            [f"{path.name}: {predictor.classes[int(targets[i])]}"],
            folder / f"{path.stem}_gradcam.png",
            columns=1,
            overlays=maps[i : i + 1],
        )


SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("trial_id", pa.string()),
        ("error", pa.string()),
        ("label", pa.string()),
        ("confidence", pa.float64()),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_confidences", pa.list_(pa.float64())),
    ]
)


def write_predictions(rows: list[dict[str, Any]], out: Path) -> Path:
    """Parquet (.parquet) or CSV (.csv; the top-k lists joined by ';'), written whole or not at all."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if out.suffix not in (".csv", ".parquet"):
        raise RayclsError(f"--out {out}: write .parquet or .csv")
    with atomic_path(out) as tmp:
        _write_table(table, tmp, csv=out.suffix == ".csv")
    return out


def _write_table(table: pa.Table, tmp: Path, *, csv: bool) -> None:
    if csv:
        flat = {
            **{n: table[n] for n in table.column_names},
            "topk_labels": pa.array([";".join(v) if v else None for v in table["topk_labels"].to_pylist()]),
            "topk_confidences": pa.array(
                [";".join(f"{c:.6f}" for c in v) if v else None for v in table["topk_confidences"].to_pylist()]
            ),
        }
        pacsv.write_csv(pa.table(flat), tmp)
    else:
        pq.write_table(table, tmp)
