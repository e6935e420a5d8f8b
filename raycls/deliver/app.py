"""What `raycls serve` answers over HTTP, whichever engine hosts it (raycls.deliver.engines).

    POST /predict   an image (multipart upload, or the raw bytes as the body) -> class, confidence, top-k,
                    trial id, latency
    GET  /healthz   200 once the model is loaded
    GET  /metadata  the trial, its classes, the input the model expects, the engine and runtime serving it

The routes, the token, the size limits, the errors (400 unreadable, 413 too big, 401 no or wrong token) and
the request log (raycls.deliver.requestlog) live here once: an engine only hosts the app and says how images
reach the model (`Infer`: Ray Serve batches them across callers, the local engine calls the model inline).

The model runs in onnxruntime on a CPU when the trial's exported graph exists (`raycls export`, parity
checked there) or can be exported now; in PyTorch on a GPU, or when the export fails (/metadata says which).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.

import hmac
import io
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from raycls.deliver.requestlog import RequestLog
from raycls.storage import ExperimentPaths

TOKEN_ENV = "RAYCLS_SERVE_TOKEN"
MAX_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    storage: str
    experiment: str
    trial: str = "best"
    log_dir: str | None = None  # default <storage>/<experiment>/serve/requests
    token: str | None = None  # required as `Authorization: Bearer <token>` when set
    max_bytes: int = MAX_BYTES
    topk: int = 3
    max_batch_size: int = 16  # Ray Serve's @serve.batch; the local engine answers each request at once
    batch_wait_timeout_s: float = 0.01
    device: str | None = None
    log_rows: int = 256  # the request log is written every log_rows requests or log_seconds, and at shutdown
    log_seconds: float = 5.0
    onnx: bool = True  # onnxruntime on a CPU (exporting the graph first if needed); False: always PyTorch


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# An image in, its answer and the size of the batch it was computed in out.
Infer = Callable[[np.ndarray], Awaitable[tuple[dict[str, Any], int]]]


def decode(data: bytes, channels: int, size: int) -> np.ndarray:
    """uint8 [C, H, W] from encoded image bytes (as `raycls predict` reads files); BadRequest(400) for
    anything PIL cannot decode."""
    from raycls.deliver.predict import read_image

    try:
        return read_image(io.BytesIO(data), channels, size)
    except Exception as err:  # noqa: BLE001 (not an image, truncated, unsupported: the client's error)
        raise BadRequest(400, f"not a readable image: {type(err).__name__}: {err}") from None


def answers(logits: np.ndarray, classes: tuple[str, ...], topk: int) -> list[dict[str, Any]]:
    """Softmax top-k of each row of logits (numpy: a few microseconds, where torch's topk costs more than
    the model on a small net)."""
    z = np.asarray(logits, dtype=np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    k = min(topk, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(probs, order):
        top = [{"label": classes[int(i)], "confidence": float(row[i])} for i in idx]
        out.append({"label": top[0]["label"], "confidence": top[0]["confidence"], "topk": top})
    return out


def serving_predictor(options: ServeOptions) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The Predictor, the trial's metadata and what runs it: onnxruntime from
    `<storage>/<experiment>/export/<trial_id>/model.onnx` (exported now when missing) on a CPU, else PyTorch."""
    import torch

    from raycls.deliver.export import MODEL_FILE, export
    from raycls.deliver.model import load_trial_model
    from raycls.deliver.predict import Predictor
    from raycls.train.steps import default_device

    device = torch.device(options.device) if options.device else default_device()
    trial = load_trial_model(options.storage, options.experiment, options.trial, device=str(device))
    meta = {
        "experiment": trial.experiment,
        "trial_id": trial.trial_id,
        "classes": list(trial.classes),
        "input": {"channels": trial.channels, "size": trial.image_size},
        "topk": options.topk,
    }
    paths = ExperimentPaths(options.storage, options.experiment)
    graph = Path(paths.export_dir(trial.trial_id).removeprefix("file://")) / MODEL_FILE
    reason = _why_pytorch(options, device, paths)
    if reason is None and not graph.is_file():
        try:
            export(trial, graph.parent)  # on the CPU (reason None), parity checked as `raycls export` does
        except Exception as err:  # noqa: BLE001 (a model the exporter cannot trace still serves, in PyTorch)
            reason = f"export failed: {type(err).__name__}: {err}"
    if reason is None:
        runtime = {"runtime": "onnxruntime", "model": str(graph)}
        return Predictor.from_onnx(graph), meta, runtime
    return Predictor.from_trial(trial, device), meta, {"runtime": "pytorch", "device": str(device), "reason": reason}


def _why_pytorch(options: ServeOptions, device: Any, paths: ExperimentPaths) -> str | None:
    if not options.onnx:
        return "onnx disabled"
    if device.type != "cpu":
        return f"{device.type}: PyTorch on the accelerator (onnxruntime runs on the CPU here)"
    if paths.folder is None:
        return "storage is not local: no exported graph to read or write"
    return None


class Endpoint:
    """The model, its request log and the app's behaviour; `infer` is how an engine runs the model."""

    def __init__(self, options: ServeOptions, engine: str):
        self.options = options
        self.predictor, meta, runtime = serving_predictor(options)
        self.metadata = {**meta, "engine": engine, **runtime}
        folder = (
            Path(options.log_dir)
            if options.log_dir
            else ExperimentPaths(options.storage, options.experiment).serve_log_dir()
        )
        self.log = RequestLog(folder, rows=options.log_rows, seconds=options.log_seconds)

    def answer(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Answers for uint8 [N, C, H, W] images."""
        return answers(self.predictor.logits(images), self.predictor.classes, self.options.topk)

    async def infer_inline(self, image: np.ndarray) -> tuple[dict[str, Any], int]:
        return self.answer(image[None])[0], 1

    def close(self) -> None:
        self.log.close()

    def _authorised(self, request: Request) -> bool:
        if not self.options.token:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.options.token}".encode())

    async def _payload(self, request: Request) -> tuple[bytes, str | None]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.options.max_bytes + 64 * 1024:
            raise BadRequest(413, f"request body of {declared} bytes; the limit is {self.options.max_bytes}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            uploads = [v for v in form.values() if hasattr(v, "read")]
            if not uploads:
                raise BadRequest(400, "multipart request without a file part")
            data, filename = await uploads[0].read(), uploads[0].filename
        else:
            data, filename = await request.body(), request.headers.get("x-filename")
        if len(data) > self.options.max_bytes:
            raise BadRequest(413, f"image of {len(data)} bytes; the limit is {self.options.max_bytes}")
        if not data:
            raise BadRequest(400, "empty request body: send an image (multipart or raw bytes)")
        return data, filename

    async def predict(self, request: Request, infer: Infer) -> JSONResponse:
        started = time.perf_counter()
        row: dict[str, Any] = {"time": datetime.now(timezone.utc).isoformat(), "path": "/predict"}
        try:
            if not self._authorised(request):
                raise BadRequest(401, "missing or wrong token: send Authorization: Bearer <token>")
            data, row["filename"] = await self._payload(request)
            row["bytes"] = len(data)
            image = decode(data, self.predictor.channels, self.predictor.size)
            answer, row["batch"] = await infer(image)
            row.update(status=200, label=answer["label"], confidence=answer["confidence"])
            body, status = {**answer, "trial_id": self.predictor.trial_id}, 200
        except BadRequest as err:
            row.update(status=err.status, error=str(err))
            body, status = {"error": str(err)}, err.status
        latency = (time.perf_counter() - started) * 1000
        row["latency_ms"] = latency
        self.log.append(row)
        if status == 200:
            body["latency_ms"] = latency
        return JSONResponse(body, status_code=status)


def build_app(endpoint: Endpoint, infer: Infer) -> FastAPI:
    """The FastAPI app both engines host; its shutdown writes the request log's last rows."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        endpoint.close()

    api = FastAPI(title="raycls", description="Image classification by a raycls trial's best model", lifespan=lifespan)

    @api.post("/predict")
    async def predict(request: Request):
        return await endpoint.predict(request, infer)

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok", "trial_id": endpoint.predictor.trial_id}

    @api.get("/metadata")
    async def metadata():
        return endpoint.metadata

    return api
