"""`raycls export`: a trial's best model as ONNX, checked against PyTorch with onnxruntime, plus an int8 copy.

    TrialModel -> Classifier (pixels in [0, 1] -> logits, normalisation inside) -> model.onnx (+ metadata)
               -> parity on the held-out split (max |logit difference|, top-1 agreement)
               -> --int8: onnxruntime's dynamic and static (QDQ, calibrated on validation images) quantisation
                  -> accuracy delta, size ratio, CPU latency ratio of each; model.int8.onnx only when one is
                     faster than fp32 at the same accuracy

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
from raycls.files import atomic_path, write_json_atomic

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export.json"
OPSET = 18


def metadata(trial: TrialModel) -> dict[str, str]:
    """What a consumer needs beside the graph, stored in the ONNX file's metadata_props (strings)."""
    return {
        "raycls_version": raycls.__version__,
        "experiment": trial.experiment,
        "trial_id": trial.trial_id,
        "class_names": json.dumps(list(trial.classes)),
        "input": "float32 [N, C, H, W], RGB (or grey) in [0, 1]",
        "input_size": json.dumps([trial.channels, trial.image_size, trial.image_size]),
        "mean": json.dumps(list(trial.data.splits.mean)),
        "std": json.dumps(list(trial.data.splits.std)),
        "normalisation": "inside the graph: (x - mean) / std",
        "phase": trial.config.chain,
        "model": trial.config.stages[trial.stage].model.name,
        "tta_views": json.dumps(list(trial.tta_views)),
    }


def to_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, props: dict[str, str]) -> str:
    """Export with a dynamic batch axis; returns the exporter used. torch.export's exporter first (PyTorch's
    default since 2.9); the TorchScript one when it cannot trace a model."""
    import onnx

    with atomic_path(path) as tmp:
        exporter = _export_onnx(module.eval(), example, tmp)
        model = onnx.load(str(tmp))
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(tmp))
    return exporter


def _export_onnx(module: torch.nn.Module, example: torch.Tensor, tmp: Path) -> str:
    try:
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
        program.save(str(tmp))
        exporter = "torch.export"
    except Exception:  # noqa: BLE001 (any failure of the new exporter: fall back to the TorchScript one)
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        exporter = "torchscript"
    return exporter


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Logits of uint8 [N, C, H, W] images through an onnxruntime session, in batches."""
    out = [
        sess.run(None, {"images": (images[i : i + batch].float() / 255).numpy()})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out)


@torch.no_grad()
def torch_logits(module: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([module(images[i : i + batch].float() / 255) for i in range(0, len(images), batch)]).numpy()


def _resized(trial: TrialModel, images: torch.Tensor) -> torch.Tensor:
    size = trial.image_size
    if images.shape[-1] == size:
        return images
    return (
        torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )


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
    held_out = stratified_sample(
        trial.data.splits.test, parity_images, trial.config.seed
    )  # every class, not the first N
    n = len(held_out)
    images, labels = _resized(trial, held_out.images), held_out.labels.numpy()
    example = images[:2].float() / 255
    exporter = to_onnx(module, example, out / MODEL_FILE, metadata(trial))
    reference = torch_logits(module, images)
    fp32 = session(out / MODEL_FILE)
    got = onnx_logits(fp32, images)
    report: dict[str, Any] = {
        "experiment": trial.experiment,
        "trial_id": trial.trial_id,
        "exporter": exporter,
        "opset": OPSET,
        "parity": {
            "split": split,
            "images": n,
            "max_abs_logit_diff": float(np.abs(got - reference).max()),
            "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
            "torch_acc": float((reference.argmax(1) == labels).mean()),
            "onnx_acc": float((got.argmax(1) == labels).mean()),
        },
        "files": {MODEL_FILE: (out / MODEL_FILE).stat().st_size},
        "metadata": metadata(trial),
    }
    if int8:
        report["int8"] = quantize(trial, out, fp32, images, labels, float((got.argmax(1) == labels).mean()))
        if report["int8"]["shipped"]:
            report["files"][INT8_FILE] = (out / INT8_FILE).stat().st_size
    write_json_atomic(out / REPORT_FILE, report)
    return report


# ------------------------------------------------------------------------------------------------ int8
# An int8 copy is shipped only when it earns its place: faster than fp32 at the same accuracy. Accuracy is
# measured on the held-out images of the parity check; "the same" within this many points of it (0.5 points:
# ~1 image in 200, below the noise between two seeds of one config).
INT8_ACC_TOLERANCE = 0.005
CALIBRATION_IMAGES = 512  # validation images (stratified) static quantisation calibrates activation ranges on
LATENCY_BATCH = 64


def _dynamic(fp32: Path, int8: Path, calibration: torch.Tensor) -> None:
    """Weights int8, activations quantised on the fly at every call (no calibration; pays off on MatMul-heavy
    models, ViTs, not on convolutions)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)


def _static_qdq(fp32: Path, int8: Path, calibration: torch.Tensor) -> None:
    """Weights int8, activations uint8 with ranges fixed beforehand from validation images; QDQ format
    (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [
                    {"images": (calibration[i : i + LATENCY_BATCH].float() / 255).numpy()}
                    for i in range(0, len(calibration), LATENCY_BATCH)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    # Shape inference and graph optimisation first, as onnxruntime recommends: the quantiser then sees folded
    # constants and fused Conv+BN instead of the exporter's raw graph.
    prepared = int8.with_name(f"{int8.name}.prepared")
    try:
        quant_pre_process(str(fp32), str(prepared))
        # uint8 activations, int8 weights (U8S8): onnxruntime's CPU provider fuses those QDQ pairs into
        # QLinearConv; int8 activations left every Conv in float between its Q/DQ pairs (9x slower, measured).
        quantize_static(
            str(prepared),
            str(int8),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)


# method -> writes the int8 model of an fp32 one, given uint8 calibration images [N, C, H, W]
QUANTISERS = {"dynamic": _dynamic, "static_qdq": _static_qdq}


def verdict(candidates: dict[str, dict[str, Any]]) -> str | None:
    """The method whose copy ships: the fastest that is faster than fp32 (latency ratio < 1) with the accuracy
    of fp32 (at most INT8_ACC_TOLERANCE lower); None when none is."""
    good = {
        m: c
        for m, c in candidates.items()
        if "error" not in c and c["acc_delta"] >= -INT8_ACC_TOLERANCE and c["latency_ratio"] < 1
    }
    return min(good, key=lambda m: good[m]["latency_ratio"]) if good else None


def quantize(
    trial: TrialModel, out: Path, fp32, images: torch.Tensor, labels: np.ndarray, fp32_acc: float
) -> dict[str, Any]:
    """Every quantiser's int8 copy, measured against fp32 on the held-out images (accuracy) and one batch
    (CPU latency); the fastest copy that is faster than fp32 at the same accuracy (INT8_ACC_TOLERANCE) is
    shipped as model.int8.onnx, else none is and `why` says so with the measured ratios."""
    calibration = _resized(
        trial, stratified_sample(trial.data.splits.val, CALIBRATION_IMAGES, trial.config.seed).images
    )
    batch = images[:LATENCY_BATCH]
    fp32_ms = latency_ms(fp32, batch)
    candidates: dict[str, dict[str, Any]] = {}
    for method, write in QUANTISERS.items():
        path = out / f".{method}.{INT8_FILE}.tmp{os.getpid()}"
        try:
            write(out / MODEL_FILE, path, calibration)
            q = session(path)
            acc = float((onnx_logits(q, images).argmax(1) == labels).mean())
            ms = latency_ms(q, batch)
            candidates[method] = {
                "path": path,
                "acc": acc,
                "acc_delta": acc - fp32_acc,
                "size_ratio": path.stat().st_size / (out / MODEL_FILE).stat().st_size,
                "latency_ms": ms,
                "latency_ratio": ms / fp32_ms,
            }
        except Exception as err:  # noqa: BLE001 (a quantiser that cannot handle the graph is reported, not fatal)
            path.unlink(missing_ok=True)
            candidates[method] = {
                "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            }
    shipped = verdict(candidates)
    (out / INT8_FILE).unlink(missing_ok=True)  # a copy from an earlier export must not outlive this verdict
    for method, c in candidates.items():
        path = c.pop("path", None)
        if path is not None and method == shipped:
            os.replace(path, out / INT8_FILE)
        elif path is not None:
            path.unlink(missing_ok=True)
    report: dict[str, Any] = {
        "shipped": shipped,
        "acc_tolerance": INT8_ACC_TOLERANCE,
        "calibration_images": len(calibration),
        "latency_batch": len(batch),
        "latency_ms_fp32": fp32_ms,
        "methods": candidates,
    }
    if shipped is None:
        report["why"] = "no int8 copy is faster than fp32 at the same accuracy: " + "; ".join(
            f"{m}: {c['error']}"
            if "error" in c
            else f"{m}: latency x{c['latency_ratio']:.2f}, accuracy {c['acc_delta']:+.4f}"
            for m, c in candidates.items()
        )
        return report
    c = candidates[shipped]
    return {
        **report,
        "acc": c["acc"],
        "acc_delta": c["acc_delta"],
        "size_ratio": c["size_ratio"],
        "latency_ms_int8": c["latency_ms"],
        "latency_ratio": c["latency_ratio"],
    }
