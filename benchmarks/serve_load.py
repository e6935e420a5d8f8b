"""Claim: `raycls serve` costs little over its hosts' own floors, measured in the same run.

Trains a digits trial (small_cnn, seconds), exports it (model.onnx, which both engines then run in
onnxruntime), and sends N requests at concurrency C (loopback only, one httpx client) to:

    ray_floor       Ray Serve's own floor: a FastAPI-ingress deployment returning a constant
    ray             `raycls serve` on Ray Serve, 1 replica (batches of up to 16)
    ray_2_replicas  the same, 2 replicas
    plain_floor     plain FastAPI + onnxruntime on the same model.onnx under uvicorn (serve_plain_app.py)
    local           `raycls serve --engine local` (a process of its own, like the plain app)

all up at once and loaded in turn, round after round (each target's best round kept: the CPU may be shared),
and reports requests/s, p50/p99 latency, errors and the ratios (ray / ray_floor, local / plain_floor: of the
best rounds, and the median over rounds of each round's own ratio, which cancels a shared CPU's drift), the
request log's file count, then the export's int8 verdict (each quantiser's latency and accuracy against fp32)
and the shipped files' CPU latency (batch 1 and 64).

    python benchmarks/serve_load.py                        # 1000 requests at concurrency 16, best of 3 rounds
    python benchmarks/serve_load.py --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from common import write_result
from PIL import Image

from raycls.config import TrialConfig
from raycls.deliver.export import INT8_FILE, MODEL_FILE, export, latency_ms, session
from raycls.deliver.model import load_trial_model
from raycls.results.leaderboard import TrialRecord, write_trial
from raycls.train.local import run_local


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        def one(i: int) -> tuple[int, float]:
            started = time.perf_counter()
            response = client.post(url, content=bodies[i % len(bodies)])
            return response.status_code, (time.perf_counter() - started) * 1000

        for i in range(concurrency):  # warm-up: replicas loaded, connections open
            one(i)
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - started
    latencies = sorted(ms for _, ms in results)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "seconds": seconds,
        "requests_per_s": requests / seconds,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
        "errors": sum(status != 200 for status, _ in results),
    }


HERE = Path(__file__).resolve().parent


@contextmanager
def process(command: list[str], url: str, env: dict[str, str]):
    """A server in a process of its own (not sharing this client's GIL), stopped by SIGTERM."""
    server = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if server.poll() is not None:
                    raise RuntimeError(f"{command} exited with {server.returncode}") from None
                time.sleep(0.3)
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def alternate(urls: dict[str, str], bodies: list[bytes], args: argparse.Namespace) -> dict[str, dict]:
    """Each target loaded once per round, in turn, all of them up the whole time: drift on a shared CPU hits
    every target alike. Each target's best round is kept (the least disturbed), every round is reported."""
    rounds: dict[str, list[dict]] = {label: [] for label in urls}
    for r in range(args.rounds):
        for label, url in urls.items():
            rounds[label].append(load(url, bodies, args.requests, args.concurrency))
            print(f"round {r}", label, rounds[label][-1], flush=True)
    return {
        label: {**max(runs, key=lambda run: run["requests_per_s"]), "rounds": runs} for label, runs in rounds.items()
    }


def paired_median(runs: dict[str, dict], over: str, under: str, key: str) -> float:
    """The median over rounds of `over`'s figure divided by `under`'s in the same round."""
    return statistics.median(a[key] / b[key] for a, b in zip(runs[over]["rounds"], runs[under]["rounds"]))


def ray_runs(storage: str, bodies: list[bytes], args: argparse.Namespace, logs: Path) -> dict[str, dict]:
    import ray
    from fastapi import FastAPI
    from ray import serve

    from raycls.deliver.serve import ServeOptions, deploy
    from raycls.tune.cluster import init_ray

    floor_api = FastAPI()

    @serve.deployment
    @serve.ingress(floor_api)
    class Constant:  # Ray Serve's own cost: proxy, router, replica, FastAPI; no model, no work
        @floor_api.post("/predict")
        async def predict(self) -> dict:
            return {"label": "0", "confidence": 1.0}

    init_ray(None, num_cpus=4)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Constant.bind(), name="floor", route_prefix="/floor")
        for label, replicas in (("ray", 1), ("ray_2_replicas", 2)):
            deploy(
                ServeOptions(storage=storage, experiment="bench", log_dir=str(logs / label)),
                port=port,
                replicas=replicas,
                name=label,
                route_prefix=f"/{label}",
            )
        base = f"http://127.0.0.1:{port}"
        runs = alternate(
            {
                "ray_floor": f"{base}/floor/predict",
                "ray": f"{base}/ray/predict",
                "ray_2_replicas": f"{base}/ray_2_replicas/predict",
            },
            bodies,
            args,
        )
        serve.shutdown()
    finally:
        ray.shutdown()
    for label in ("ray", "ray_2_replicas"):
        runs[label]["log_files"] = len(list((logs / label).glob("*.parquet")))
    return runs


def process_runs(
    storage: str, bodies: list[bytes], args: argparse.Namespace, logs: Path, graph: Path
) -> dict[str, dict]:
    plain_port, local_port = free_port(), free_port()
    plain = [
        sys.executable,
        "-m",
        "uvicorn",
        "serve_plain_app:app",
        "--port",
        str(plain_port),
        "--log-level",
        "warning",
    ]
    local = [
        sys.executable,
        "-m",
        "raycls.cli",
        "serve",
        "bench",
        "--engine",
        "local",
        "--storage",
        storage,
        "--port",
        str(local_port),
        "--log-dir",
        str(logs / "local"),
    ]
    plain_url, local_url = f"http://127.0.0.1:{plain_port}", f"http://127.0.0.1:{local_port}"
    with (
        process(plain, plain_url, {"RAYCLS_BENCH_ONNX": str(graph), "PYTHONPATH": f"{HERE}:{HERE.parent}"}),
        process(local, local_url, {"PYTHONPATH": str(HERE.parent)}),
    ):
        runs = alternate({"plain_floor": f"{plain_url}/predict", "local": f"{local_url}/predict"}, bodies, args)
    runs["local"]["log_files"] = len(list((logs / "local").glob("*.parquet")))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="Loads per target, alternating; the best is kept.")
    parser.add_argument("--out", default="serve_load")
    args = parser.parse_args()

    from raycls.storage import ExperimentPaths

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        storage = str(root / "results")
        config = TrialConfig.model_validate(
            {
                "data": {"name": "digits"},
                "model": {"name": "small_cnn", "width": 16},
                "train": {"epochs": 4, "optimizer": "adamw", "lr": 5e-3},
                "eval": {"on": "none"},
            }
        )
        summary = run_local(config, root / "run")
        write_trial(
            storage,
            TrialRecord(
                experiment="bench",
                trial_id="b1",
                status="completed",
                metric="val_acc",
                mode="max",
                params={},
                param_types={},
                history=[summary.at_best],
                config_json=config.to_json(),
                checkpoint=str(root / "run" / "checkpoints" / "best"),
            ),
        )
        trial = load_trial_model(storage, "bench")
        out = Path(ExperimentPaths(storage, "bench").export_dir(trial.trial_id))  # where `raycls serve` looks for it
        report = export(trial, out, int8=True)
        bodies = []
        for i in range(32):
            buffer = io.BytesIO()
            Image.fromarray(trial.data.splits.val.images[i, 0].numpy()).save(buffer, "PNG")
            bodies.append(buffer.getvalue())
        runs = {
            **ray_runs(storage, bodies, args, root / "logs"),
            **process_runs(storage, bodies, args, root / "logs", out / MODEL_FILE),
        }
        # The export measured every int8 quantiser against fp32 and shipped one only if it is faster at the
        # same accuracy (its report says which and why); the latencies here are the shipped files'.
        shipped = {"fp32": session(out / MODEL_FILE)}
        if (out / INT8_FILE).is_file():
            shipped["int8"] = session(out / INT8_FILE)
        images = trial.data.splits.val.images[:64]
        onnx = {
            f"batch{n}": {f"{name}_ms": latency_ms(run, images[:n], repeats=30) for name, run in shipped.items()}
            for n in (1, 64)
        }
        for figures in onnx.values():
            if "int8_ms" in figures:
                figures["int8_over_fp32"] = figures["int8_ms"] / figures["fp32_ms"]
    ratios = {
        "ray_over_ray_floor_rps": runs["ray"]["requests_per_s"] / runs["ray_floor"]["requests_per_s"],
        "ray_over_ray_floor_p99": runs["ray"]["p99_ms"] / runs["ray_floor"]["p99_ms"],
        "ray_2_replicas_over_ray_floor_rps": runs["ray_2_replicas"]["requests_per_s"]
        / runs["ray_floor"]["requests_per_s"],
        "local_over_plain_floor_rps": runs["local"]["requests_per_s"] / runs["plain_floor"]["requests_per_s"],
        "local_over_ray_rps": runs["local"]["requests_per_s"] / runs["ray"]["requests_per_s"],
    }
    # The best rounds of two targets may come from different minutes of a shared CPU; the ratio within each
    # round (the two loaded back to back) cancels that drift: its median over the rounds is the steadier one.
    paired = {
        "ray_over_ray_floor_rps": paired_median(runs, "ray", "ray_floor", "requests_per_s"),
        "ray_over_ray_floor_p99": paired_median(runs, "ray", "ray_floor", "p99_ms"),
        "ray_2_replicas_over_ray_floor_rps": paired_median(runs, "ray_2_replicas", "ray_floor", "requests_per_s"),
        "local_over_plain_floor_rps": paired_median(runs, "local", "plain_floor", "requests_per_s"),
    }
    path = write_result(
        args.out,
        {
            "claim": "raycls serve: >= 0.8x its host's floor req/s (Ray Serve: p99 <= 2x), 0 errors, a log file per batch of rows",
            "config": vars(args),
            "serve": runs,
            "ratios": ratios,
            "ratios_median_of_rounds": paired,
            "onnx_cpu_latency": onnx,
            "int8_export": report["int8"],
            "torch_threads": torch.get_num_threads(),
        },
    )
    print(" ".join(f"{k} {v:.2f}" for k, v in ratios.items()), f"-> {path}")
    print("median of rounds:", " ".join(f"{k} {v:.2f}" for k, v in paired.items()))


if __name__ == "__main__":
    main()
