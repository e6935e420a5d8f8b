"""`raycls serve`: a trial's best model behind HTTP, as a Ray Serve application with a FastAPI ingress.

    POST /predict   an image (multipart upload, or the raw bytes as the body) -> class, confidence, top-k,
                    trial id, latency; requests are batched across callers (@serve.batch)
    GET  /healthz   200 once the model is loaded
    GET  /metadata  the trial, its classes, the input the model expects

Ray Serve rather than a bare FastAPI app: raycls users already run Ray (the search's own cluster serves the
model), Serve batches requests across callers, runs and restarts replicas and scales them with load, none of
which a single uvicorn process does. Every request (good or bad) is one row of a Parquet request log (file
name, bytes, status, latency, time), each its own small file in one folder (read it as one table, like the
leaderboard): nothing is lost if a replica dies, and replicas never write to the same file.
A bad upload gets 400, an oversized one 413, a missing or wrong token 401; the service keeps serving.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime,
# and Serve's class-based views do not resolve string annotations.

import hmac
import io
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from raycls.storage import ExperimentPaths

# Serve kills an HTTP proxy that is not ready 5 s after it starts; on a loaded machine or a busy node, starting
# the proxy's worker process alone can take longer (seen: the proxy killed before it ran, serve.start failing).
# Read by Serve's controller, which inherits the environment of the Ray started after this import.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

TOKEN_ENV = "RAYCLS_SERVE_TOKEN"
MAX_BYTES = 10 * 1024 * 1024
LOG_SCHEMA = pa.schema([("time", pa.string()), ("path", pa.string()), ("filename", pa.string()), ("bytes", pa.int64()),
                        ("status", pa.int64()), ("label", pa.string()), ("confidence", pa.float64()),
                        ("latency_ms", pa.float64()), ("error", pa.string())])  # fmt: skip


@dataclass(frozen=True)
class ServeOptions:
    storage: str
    experiment: str
    trial: str = "best"
    log_dir: str | None = None  # default <storage>/<experiment>/serve/requests
    token: str | None = None  # required as `Authorization: Bearer <token>` when set
    max_bytes: int = MAX_BYTES
    topk: int = 3
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    device: str | None = None


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode(data: bytes, channels: int, size: int) -> np.ndarray:
    """uint8 [C, H, W] from encoded image bytes (as `raycls predict` reads files); BadRequest(400) for
    anything PIL cannot decode."""
    from raycls.deliver.predict import read_image

    try:
        return read_image(io.BytesIO(data), channels, size)
    except Exception as err:  # noqa: BLE001 (not an image, truncated, unsupported: the client's error)
        raise BadRequest(400, f"not a readable image: {type(err).__name__}: {err}") from None


def write_log(folder: Path, rows: list[dict[str, Any]]) -> None:
    """One Parquet file for `rows` (a temp name, then a rename)."""
    if not rows:
        return
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in LOG_SCHEMA.names} for r in rows], schema=LOG_SCHEMA), tmp)
    os.replace(tmp, folder / name)


api = FastAPI(title="raycls", description="Image classification by a raycls trial's best model")


@serve.deployment
@serve.ingress(api)
class RayclsService:
    def __init__(self, options: ServeOptions):
        import torch

        from raycls.deliver.model import load_trial_model
        from raycls.deliver.predict import Predictor

        from raycls.train.steps import default_device

        device = torch.device(options.device) if options.device else default_device()
        trial = load_trial_model(options.storage, options.experiment, options.trial, device=str(device))
        self.options = options
        self.predictor = Predictor.from_trial(trial, device)
        self.log_dir = Path(options.log_dir) if options.log_dir else ExperimentPaths(options.storage, options.experiment).serve_log_dir()
        self.metadata = {"experiment": trial.experiment, "trial_id": trial.trial_id, "classes": list(trial.classes),
                         "input": {"channels": trial.channels, "size": trial.image_size}, "topk": options.topk}  # fmt: skip
        # The batch size and wait are per deployment options of the batched method.
        self._predict_batch.set_max_batch_size(options.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        logits = self.predictor.logits(torch.from_numpy(np.stack(images)))
        probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), -1)
        k = min(self.options.topk, probs.shape[1])
        answers = []
        for row in probs:
            conf, idx = row.topk(k)
            classes = self.predictor.classes
            answers.append({"label": classes[int(idx[0])], "confidence": float(conf[0]),
                            "topk": [{"label": classes[int(i)], "confidence": float(c)} for c, i in zip(conf, idx)]})  # fmt: skip
        return answers

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

    @api.post("/predict")
    async def predict(self, request: Request):
        started = time.perf_counter()
        row: dict[str, Any] = {"time": datetime.now(timezone.utc).isoformat(), "path": "/predict"}
        try:
            if not self._authorised(request):
                raise BadRequest(401, "missing or wrong token: send Authorization: Bearer <token>")
            data, row["filename"] = await self._payload(request)
            row["bytes"] = len(data)
            image = decode(data, self.predictor.channels, self.predictor.size)
            answer = await self._predict_batch(image)
            row.update(status=200, label=answer["label"], confidence=answer["confidence"])
            body, status = {**answer, "trial_id": self.predictor.trial_id}, 200
        except BadRequest as err:
            row.update(status=err.status, error=str(err))
            body, status = {"error": str(err)}, err.status
        latency = (time.perf_counter() - started) * 1000
        row["latency_ms"] = latency
        write_log(self.log_dir, [row])
        if status == 200:
            body["latency_ms"] = latency
        return JSONResponse(body, status_code=status)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "trial_id": self.predictor.trial_id}

    @api.get("/metadata")
    async def metadata_(self):
        return self.metadata


def deploy(options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
           max_replicas: int | None = None, name: str = "raycls"):  # fmt: skip
    """Start Serve's HTTP proxy on host:port and run the application (Ray must be initialised)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    deployment = RayclsService
    if max_replicas and max_replicas > replicas:  # scale with the queue between the two bounds
        deployment = deployment.options(autoscaling_config={"min_replicas": replicas, "max_replicas": max_replicas,
                                                            "target_ongoing_requests": options.max_batch_size})  # fmt: skip
    else:
        deployment = deployment.options(num_replicas=replicas)
    return serve.run(deployment.bind(options), name=name, route_prefix="/")


def stop() -> None:
    """Shut the Serve application and its HTTP proxy down (the Ray cluster lives on)."""
    serve.shutdown()
