"""Claim: `raycls serve` answers a bounded local load without errors; batching raises throughput.

Trains a digits trial (small_cnn, seconds), serves it on 127.0.0.1 with Ray Serve, and sends N requests at
concurrency C (loopback only), once with request batching (max_batch_size 16) and once without (1); reports
requests/s, p50/p99 latency and errors. Then ONNX int8 vs fp32 CPU latency of the same model (batch 1 and 64).

    python benchmarks/serve_load.py                        # 500 requests at concurrency 8
    python benchmarks/serve_load.py --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
    return {"requests": requests, "concurrency": concurrency, "seconds": seconds, "requests_per_s": requests / seconds,
            "p50_ms": statistics.median(latencies), "p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
            "errors": sum(status != 200 for status, _ in results)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="serve_load")
    args = parser.parse_args()

    import ray
    from ray import serve

    from raycls.deliver.serve import ServeOptions, deploy
    from raycls.tune.cluster import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = TrialConfig.model_validate({"data": {"name": "digits"}, "model": {"name": "small_cnn", "width": 16},
                                             "train": {"epochs": 4, "optimizer": "adamw", "lr": 5e-3}, "eval": {"on": "none"}})  # fmt: skip
        summary = run_local(config, root / "run")
        write_trial(str(root / "results"), TrialRecord(experiment="bench", trial_id="b1", status="completed", metric="val_acc",
                    mode="max", params={}, param_types={}, history=[summary.at_best], config_json=config.to_json(),
                    checkpoint=str(root / "run" / "checkpoints" / "best")))  # fmt: skip
        trial = load_trial_model(str(root / "results"), "bench")
        bodies = []
        for i in range(32):
            buffer = io.BytesIO()
            Image.fromarray(trial.data.splits.val.images[i, 0].numpy()).save(buffer, "PNG")
            bodies.append(buffer.getvalue())
        init_ray(None, num_cpus=4)
        runs = {}
        for label, batch in (("batched", 16), ("unbatched", 1)):
            port = free_port()
            deploy(ServeOptions(storage=str(root / "results"), experiment="bench", log_dir=str(root / f"log-{label}"),
                                max_batch_size=batch), port=port)  # fmt: skip
            runs[label] = {**load(f"http://127.0.0.1:{port}/predict", bodies, args.requests, args.concurrency), "max_batch_size": batch}
            serve.shutdown()
            print(label, runs[label])
        ray.shutdown()
        report = export(trial, root / "export", int8=True)
        fp32, int8 = session(root / "export" / MODEL_FILE), session(root / "export" / INT8_FILE)
        images = trial.data.splits.val.images[:64]
        onnx = {f"batch{n}": {"fp32_ms": latency_ms(fp32, images[:n], repeats=30), "int8_ms": latency_ms(int8, images[:n], repeats=30)}
                for n in (1, 64)}  # fmt: skip
        for figures in onnx.values():
            figures["int8_over_fp32"] = figures["int8_ms"] / figures["fp32_ms"]
    path = write_result(args.out, {
        "claim": "raycls serve: 0 errors under a bounded local load; request batching raises throughput",
        "config": vars(args), "serve": runs, "batching_speedup": runs["batched"]["requests_per_s"] / runs["unbatched"]["requests_per_s"],
        "onnx_cpu_latency": onnx, "int8_accuracy_delta": report["int8"]["acc_delta"], "torch_threads": torch.get_num_threads(),
    })  # fmt: skip
    print(f"batched {runs['batched']['requests_per_s']:.0f} req/s vs unbatched {runs['unbatched']['requests_per_s']:.0f}; "
          f"int8/fp32 latency {onnx['batch64']['int8_over_fp32']:.2f} (batch 64) -> {path}")  # fmt: skip


if __name__ == "__main__":
    main()
