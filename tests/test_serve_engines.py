"""`raycls serve` on both engines (local: uvicorn in this process; ray: Ray Serve): the same routes, token,
limits, errors and request log, checked by the same tests over real HTTP; the request log (batched Parquet
files, nothing lost on SIGTERM); onnxruntime from the trial's exported graph."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raycls.deliver.app import ServeOptions
from raycls.deliver.engines import ENGINES, Hosting
from raycls.deliver.export import MODEL_FILE
from raycls.deliver.model import load_trial_model
from raycls.deliver.predict import Predictor
from raycls.deliver.requestlog import RequestLog
from raycls.errors import RayclsError
from raycls.storage import ExperimentPaths

from .conftest import REPO, write_digits_row

EXPERIMENT = "digits-serve"


@pytest.fixture(scope="module")
def digits_row(digits_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The session's trained digits trial (conftest.digits_run) as this module's leaderboard row."""
    return write_digits_row(digits_run, tmp_path_factory.mktemp("serve") / "results", EXPERIMENT)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(engine: str, options: ServeOptions, request: pytest.FixtureRequest) -> Iterator[str]:
    """The app on a free port, on `engine`; stopped (its request log written) when the block ends."""
    port = _free_port()
    if engine == "local":
        from raycls.deliver.engines import local_server

        server = local_server(options, port=port)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(30)
        return
    import ray
    from ray import serve

    from raycls.deliver.serve import deploy
    from raycls.tune.cluster import init_ray

    request.getfixturevalue("own_ray")
    init_ray(None, num_cpus=4)
    try:
        deploy(options, port=port)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _png(images, i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(images[i, 0].numpy()).save(buffer, "PNG")
    return buffer.getvalue()


ENGINE_PARAMS = [pytest.param("local"), pytest.param("ray", marks=pytest.mark.slow)]


# ---------------------------------------------------------------------------------------- request log
def test_request_log_writes_by_count_by_age_and_on_close(tmp_path: Path) -> None:
    by_count = RequestLog(tmp_path / "count", rows=4, seconds=3600)
    for i in range(10):
        by_count.append({"path": "/predict", "status": 200, "bytes": i})
    assert len(list((tmp_path / "count").glob("*.parquet"))) == 2  # 4 + 4 written, 2 waiting
    by_count.close()
    assert sorted(pq.read_table(tmp_path / "count")["bytes"].to_pylist()) == list(range(10))
    assert len(list((tmp_path / "count").glob("*.parquet"))) == 3 and not list((tmp_path / "count").glob(".*"))
    by_age = RequestLog(tmp_path / "age", rows=1000, seconds=0.2)
    by_age.append({"path": "/predict", "status": 400})
    deadline = time.monotonic() + 10
    while not list((tmp_path / "age").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pq.read_table(tmp_path / "age")["status"].to_pylist() == [400]
    by_age.close()
    assert len(list((tmp_path / "age").glob("*.parquet"))) == 1  # nothing new: no empty file


def test_local_engine_refuses_what_needs_ray(tmp_path: Path) -> None:
    options = ServeOptions(storage=str(tmp_path), experiment="none")
    for hosting in (Hosting(replicas=2), Hosting(max_replicas=3), Hosting(address="auto")):
        with pytest.raises(RayclsError, match="need --engine ray"):
            ENGINES.get("local")(options, hosting, print)


# ------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_serve_answers_good_bad_and_concurrent_requests(engine: str, digits_row, tmp_path: Path, request) -> None:
    """local ~10 s; ray ~40 s (Ray Serve started here on 127.0.0.1, then shut down with nothing left)."""
    storage, trial_id = digits_row
    trial = load_trial_model(storage, EXPERIMENT, "best")
    val = trial.data.splits.val
    # What the trial's PyTorch model says (the served graph must agree, whether the model is right or not).
    expected = [
        trial.classes[int(i)]
        for i in Predictor.from_trial(trial, torch.device("cpu")).logits(val.images[:48]).argmax(1)
    ]
    options = ServeOptions(
        storage=storage,
        experiment=EXPERIMENT,
        log_dir=str(tmp_path / "log"),
        token="s3cret",
        max_bytes=20_000,
        log_rows=10,
        log_seconds=3600,
    )
    with served(engine, options, request) as url:
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.Client(timeout=60) as client:
            assert client.get(f"{url}/healthz").json()["trial_id"] == trial_id
            meta = client.get(f"{url}/metadata").json()
            assert meta["classes"] == list(trial.classes) and meta["input"] == {"channels": 1, "size": 8}
            # The trial's graph, exported on first use, runs in onnxruntime.
            graph = Path(ExperimentPaths(storage, EXPERIMENT).export_dir(trial_id)) / MODEL_FILE
            assert (
                meta["engine"] == engine
                and meta["runtime"] == "onnxruntime"
                and meta["model"] == str(graph)
                and graph.is_file()
            )
            good = client.post(
                f"{url}/predict", content=_png(val.images, 0), headers={**auth, "x-filename": "zero.png"}
            )
            assert good.status_code == 200 and good.json()["label"] == expected[0]
            assert (
                good.json()["trial_id"] == trial_id and len(good.json()["topk"]) == 3 and good.json()["latency_ms"] > 0
            )
            multipart = client.post(
                f"{url}/predict", files={"image": ("one.png", _png(val.images, 1), "image/png")}, headers=auth
            )
            assert multipart.status_code == 200 and multipart.json()["label"] == expected[1]
            assert client.post(f"{url}/predict", content=_png(val.images, 2)).status_code == 401  # no token
            assert (
                client.post(
                    f"{url}/predict", content=_png(val.images, 2), headers={"Authorization": "Bearer nope"}
                ).status_code
                == 401
            )
            bad = client.post(f"{url}/predict", content=b"not an image at all", headers=auth)
            assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]
            assert (
                client.post(f"{url}/predict", content=_png(val.images, 3)[:40], headers=auth).status_code == 400
            )  # truncated
            assert client.post(f"{url}/predict", content=b"\0" * 30_000, headers=auth).status_code == 413
        with (
            httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16)) as client,
            ThreadPoolExecutor(16) as pool,
        ):
            answers = list(
                pool.map(lambda i: client.post(f"{url}/predict", content=_png(val.images, i), headers=auth), range(48))
            )
            assert all(a.status_code == 200 for a in answers)
            assert [a.json()["label"] for a in answers] == expected
            assert client.get(f"{url}/healthz").status_code == 200  # still serving after the bad requests
    files = list((tmp_path / "log").glob("*.parquet"))
    log = pq.read_table(tmp_path / "log").to_pylist()
    assert len(log) == 2 + 2 + 3 + 48  # one row per /predict request, good or bad, the last ones written at shutdown
    assert len(files) == math.ceil(len(log) / 10)  # a file per 10 rows, not per request
    assert sorted(r["status"] for r in log).count(200) == 50 and {r["status"] for r in log} == {200, 400, 401, 413}
    assert any(r["filename"] == "zero.png" for r in log) and any(r["filename"] == "one.png" for r in log)
    if engine == "ray":  # 16 callers fill batches past Serve's default of 5 requests per replica at once
        assert max(r["batch"] or 0 for r in log) > 5
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)


# ------------------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow  # a process killed, both engines (~10 s for the local one on 2 cores)
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_sigterm_keeps_every_request_in_the_log(engine: str, digits_row, tmp_path: Path, request) -> None:
    """`raycls serve` as a process, stopped by SIGTERM with every row still in memory: all are written."""
    storage, _ = digits_row
    if engine == "ray":
        request.getfixturevalue("own_ray")
    trial = load_trial_model(storage, EXPERIMENT, "best")
    port, log = _free_port(), tmp_path / "log"
    command = [
        sys.executable,
        "-m",
        "raycls.cli",
        "serve",
        EXPERIMENT,
        "--engine",
        engine,
        "--storage",
        storage,
        "--port",
        str(port),
        "--log-dir",
        str(log),
        "--log-rows",
        "1000",
        "--log-seconds",
        "3600",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "stderr", "wb") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            with httpx.Client(timeout=60) as client:
                statuses = [
                    client.post(
                        f"http://127.0.0.1:{port}/predict", content=_png(trial.data.splits.val.images, i)
                    ).status_code
                    for i in range(20)
                ]
            assert statuses == [200] * 20
            assert not list(log.glob("*.parquet"))  # all 20 rows wait in memory
            server.send_signal(signal.SIGTERM)
            assert server.wait(120) == 0 or server.returncode == -signal.SIGTERM
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    rows = pq.read_table(log).to_pylist()
    assert len(rows) == 20 and {r["status"] for r in rows} == {200}, (tmp_path / "stderr").read_text()[-2000:]
