"""The plain floor for benchmarks/serve_load.py: FastAPI + onnxruntime on the same `model.onnx`, nothing else
(no token, no log, no limits), decoded as raycls decodes.  uvicorn serve_plain_app:app  (RAYCLS_BENCH_ONNX=path)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnx
from fastapi import FastAPI, Request

from raycls.deliver.export import session
from raycls.deliver.predict import read_image

MODEL = os.environ["RAYCLS_BENCH_ONNX"]
PROPS = {p.key: p.value for p in onnx.load(MODEL, load_external_data=False).metadata_props}
CLASSES = json.loads(PROPS["class_names"])
CHANNELS, SIZE, _ = json.loads(PROPS["input_size"])
SESSION = session(MODEL)
app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@app.post("/predict")
async def predict(request: Request) -> dict:
    image = read_image(io.BytesIO(await request.body()), CHANNELS, SIZE)
    logits = SESSION.run(None, {"images": image[None].astype(np.float32) / 255})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return {"label": CLASSES[int(probs.argmax())], "confidence": float(probs.max())}
