"""Claim: the default evaluation suite costs at most one training epoch of the same trial.

Trains a trial on a CIFAR-10 subset (small_cnn, CPU by default), measuring its epochs' seconds, then times
the default and the full evaluation suite on its best weights (the full CIFAR-10 test split, 10,000
images, as a search evaluates it), each repeated; reports seconds and the ratio to the median epoch.

    python benchmarks/eval_cost.py                                  # CIFAR-10 5k subset, small_cnn, CPU
    python benchmarks/eval_cost.py --model resnet18 --device cuda --subset 50000 --suites default full
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED_DATA, write_result

from raycls.config import TrialConfig
from raycls.models import load_weights
from raycls.train.evaluation import evaluate_weights
from raycls.train.local import run_local
from raycls.train.loop import RunContext, load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--suites", nargs="+", default=["default", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="eval_cost")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = TrialConfig.model_validate(
        {
            "data": {"name": args.dataset, "root": str(SHARED_DATA), "train_subset": args.subset},
            "model": {"name": args.model},
            "train": {"epochs": args.epochs, "batch_size": 128, "optimizer": "sgd", "lr": 0.05},
            "eval": {"on": "none"},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        history: list[dict] = []
        run_local(config, Path(tmp) / "train", device=device, on_epoch=history.append)
        epoch_s = statistics.median(h["epoch_s"] for h in history[1:] or history)  # the first warms up
        weights = load_weights(Path(tmp) / "train" / "checkpoints" / "best")
        data = load_data(config)
        suites: dict[str, dict] = {}
        for suite in args.suites:
            seconds, metrics = [], {}
            for repeat in range(args.repeats):
                started = time.perf_counter()
                summary = evaluate_weights(
                    config,
                    weights,
                    data,
                    RunContext(device=device),
                    out_uri=str(Path(tmp) / f"eval-{suite}"),
                    suite=suite,
                )
                seconds.append(time.perf_counter() - started)
                metrics = summary["metrics"]
                print(f"{suite} suite, repeat {repeat}: {seconds[-1]:.1f} s ({seconds[-1] / epoch_s:.2f} epochs)")
            suites[suite] = {
                "seconds": seconds,
                "median_s": statistics.median(seconds),
                "epochs": statistics.median(seconds) / epoch_s,
                "metrics": {k: v for k, v in metrics.items() if not k.startswith("test_ood_")},
                "ood_auroc": {k: v for k, v in metrics.items() if k.startswith("test_ood_") and k.endswith("auroc")},
            }
    default_epochs = suites.get("default", {}).get("epochs")
    path = write_result(
        args.out,
        {
            "claim": "the default evaluation suite costs <= 1 training epoch of the same trial",
            "config": vars(args),
            "train_images": len(data.splits.train),
            "test_images": len(data.splits.test or data.splits.val),
            "epoch_s": epoch_s,
            "train_history": history,
            "suites": suites,
            "goal": 1.0,
            "meets_goal": default_epochs is not None and default_epochs <= 1.0,
        },
    )
    print(
        f"epoch {epoch_s:.1f} s; "
        + "; ".join(f"{k} {v['median_s']:.1f} s = {v['epochs']:.2f} epochs" for k, v in suites.items())
        + f" -> {path}"
    )


if __name__ == "__main__":
    main()
