"""`raycls export`: a trial's best model as ONNX, checked against PyTorch with onnxruntime, plus an int8 copy.

    TrialModel -> Classifier (pixels in [0, 1] -> logits, normalisation inside) -> model.onnx (+ metadata)
               -> parity on the held-out split (max |logit difference|, top-1 agreement)
               -> --int8: onnxruntime's dynamic quantisation -> accuracy delta, size ratio, CPU latency ratio

Everything measured goes to `export.json` beside the models; each file is written to a temp name first.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import raycls
from raycls.data.sampling import stratified_sample
from raycls.deliver.model import Classifier, TrialModel
from raycls.files import write_json_atomic

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export.json"
OPSET = 18


def metadata(trial: TrialModel) -> dict[str, str]:
    """What a consumer needs beside the graph, stored in the ONNX file's metadata_props (strings)."""
    return {
        "raycls_version": raycls.__version__, "experiment": trial.experiment, "trial_id": trial.trial_id,
        "class_names": json.dumps(list(trial.classes)), "input": "float32 [N, C, H, W], RGB (or grey) in [0, 1]",
        "input_size": json.dumps([trial.channels, trial.image_size, trial.image_size]),
        "mean": json.dumps(list(trial.data.splits.mean)), "std": json.dumps(list(trial.data.splits.std)),
        "normalisation": "inside the graph: (x - mean) / std", "phase": trial.config.chain,
        "model": trial.config.stages[trial.stage].model.name, "tta_views": json.dumps(list(trial.tta_views)),
    }  # fmt: skip


def to_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, props: dict[str, str]) -> str:
    """Export with a dynamic batch axis; returns the exporter used. torch.export's exporter first (PyTorch's
    default since 2.9); the TorchScript one when it cannot trace a model."""
    import onnx

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    module = module.eval()
    try:
        program = torch.onnx.export(module, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=OPSET,
                                    dynamo=True, verbose=False)  # fmt: skip
        program.save(str(tmp))
        exporter = "torch.export"
    except Exception:  # noqa: BLE001 (any failure of the new exporter: fall back to the TorchScript one)
        torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)  # fmt: skip
        exporter = "torchscript"
    model = onnx.load(str(tmp))
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return exporter


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Logits of uint8 [N, C, H, W] images through an onnxruntime session, in batches."""
    out = [sess.run(None, {"images": (images[i : i + batch].float() / 255).numpy()})[0] for i in range(0, len(images), batch)]
    return np.concatenate(out)


@torch.no_grad()
def torch_logits(module: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([module(images[i : i + batch].float() / 255) for i in range(0, len(images), batch)]).numpy()


def _resized(trial: TrialModel, images: torch.Tensor) -> torch.Tensor:
    size = trial.image_size
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                           align_corners=False).round().clamp(0, 255).to(torch.uint8)  # fmt: skip


def latency_ms(sess, images: torch.Tensor, repeats: int = 10) -> float:
    x = (images.float() / 255).numpy()
    sess.run(None, {"images": x})  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sess.run(None, {"images": x})
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def export(trial: TrialModel, out: Path, *, int8: bool = False, parity_images: int = 2000) -> dict[str, Any]:
    """Write model.onnx (and model.int8.onnx) and export.json into `out`; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    module = Classifier(trial).eval()
    split = "test"
    held_out = stratified_sample(trial.data.splits.test, parity_images, trial.config.seed)  # every class, not the first N
    n = len(held_out)
    images, labels = _resized(trial, held_out.images), held_out.labels.numpy()
    example = images[:2].float() / 255
    exporter = to_onnx(module, example, out / MODEL_FILE, metadata(trial))
    reference = torch_logits(module, images)
    fp32 = session(out / MODEL_FILE)
    got = onnx_logits(fp32, images)
    report: dict[str, Any] = {
        "experiment": trial.experiment, "trial_id": trial.trial_id, "exporter": exporter, "opset": OPSET,
        "parity": {"split": split, "images": n, "max_abs_logit_diff": float(np.abs(got - reference).max()),
                   "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
                   "torch_acc": float((reference.argmax(1) == labels).mean()), "onnx_acc": float((got.argmax(1) == labels).mean())},
        "files": {MODEL_FILE: (out / MODEL_FILE).stat().st_size}, "metadata": metadata(trial),
    }  # fmt: skip
    if int8:
        report["int8"] = quantize(out, fp32, images, labels, float((got.argmax(1) == labels).mean()))
        report["files"][INT8_FILE] = (out / INT8_FILE).stat().st_size
    write_json_atomic(out / REPORT_FILE, report)
    return report


def quantize(out: Path, fp32, images: torch.Tensor, labels: np.ndarray, fp32_acc: float) -> dict[str, float]:
    """onnxruntime's dynamic int8 quantisation (weights int8, activations quantised on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out / f".{INT8_FILE}.tmp{os.getpid()}"
    quantize_dynamic(str(out / MODEL_FILE), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, out / INT8_FILE)
    q = session(out / INT8_FILE)
    acc = float((onnx_logits(q, images).argmax(1) == labels).mean())
    batch = images[:64]
    fp32_ms, int8_ms = latency_ms(fp32, batch), latency_ms(q, batch)
    return {"acc": acc, "acc_delta": acc - fp32_acc, "size_ratio": (out / INT8_FILE).stat().st_size / (out / MODEL_FILE).stat().st_size,
            "latency_ms_fp32": fp32_ms, "latency_ms_int8": int8_ms, "latency_ratio": int8_ms / fp32_ms, "latency_batch": len(batch)}  # fmt: skip
