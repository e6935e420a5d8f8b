"""Each training phase on digits (CPU, fixed seeds): what it reaches and what it costs.

supervised CE, SupCon (k-NN accuracy), each margin loss of the metric phase, distillation (from the
supervised run's checkpoint into a half-width student, and from an EMA teacher), and chains in one trial
(supcon > supervised; supcon > arcface > distill from the arcface stage) with the same total epochs, and the
supervised recipe with SAM, selected EMA weights and SWA, 3 seeds each.

    python benchmarks/phases_digits.py [--seeds 3] [--epochs 8]
    python benchmarks/phases_digits.py --only 'supervised*'   # some rows; the others' results are kept
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, write_result

from raycls.config import TrialConfig
from raycls.train import run_local


def run(config: dict, out: Path, metric: str) -> tuple[float, float]:
    started = time.perf_counter()
    summary = run_local(TrialConfig.model_validate(config), out, metric=metric, device=torch.device("cpu"))
    return summary.best[metric], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--only", default="*", help="run the rows whose names match this pattern")
    args = parser.parse_args()
    torch.set_num_threads(2)

    def base(seed: int, width: int = 16) -> dict:
        return {
            "seed": seed,
            "data": {"name": "digits", "val_fraction": 0.2},
            "model": {"name": "small_cnn", "width": width},
            "augment": {"random_crop": 1},
            "train": {"epochs": args.epochs, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1},
        }

    runs: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            folder = Path(tmp) / str(seed)
            plans = [
                ("supervised", {**base(seed), "phase": {"name": "supervised", "label_smoothing": 0.1}}, "val_acc"),
                ("supcon", {**base(seed), "phase": {"name": "supcon"}}, "val_knn_acc"),
                *[
                    (
                        f"metric:{loss}",
                        {**base(seed), "phase": {"name": "metric", "loss": loss, "margin_warmup_steps": 50}},
                        "val_acc",
                    )
                    for loss in ("arcface", "cosface", "adaface", "curricularface", "subcenter_arcface")
                ],
                (
                    "distill:checkpoint->w8",
                    {
                        **base(seed, 8),
                        "phase": {
                            "name": "distill",
                            "teacher": str(folder / "supervised" / "checkpoints" / "best"),
                            "teacher_model": {"name": "small_cnn", "width": 16},
                        },
                    },
                    "val_acc",
                ),
                (
                    "supervised:w8",
                    {**base(seed, 8), "phase": {"name": "supervised", "label_smoothing": 0.1}},
                    "val_acc",
                ),
                # The training toolkit on the supervised recipe: SAM (SGD + rho), EMA weights selected, SWA.
                *[
                    (
                        f"supervised+{label}",
                        {
                            **base(seed),
                            "phase": {"name": "supervised", "label_smoothing": 0.1},
                            "train": {**base(seed)["train"], **extra},
                        },
                        "val_acc",
                    )
                    for label, extra in (
                        ("sam", {"optimizer": "sgd", "lr": 0.05, "sam": {"rho": 0.05}}),
                        ("ema", {"ema": {"decay": 0.99, "warmup": True, "select": True}}),
                        ("swa", {"swa": {"start": 0.5, "select": True}}),
                    )
                ],
                ("distill:ema", {**base(seed), "phase": {"name": "distill", "ema_decay": 0.99}}, "val_acc"),
                # Chains: the same epochs in all, split over the stages (each from the previous stage's best).
                (
                    "chain:supcon>supervised",
                    {
                        **base(seed),
                        "phases": [
                            {"phase": {"name": "supcon"}, "train": {"epochs": args.epochs // 2}},
                            {
                                "phase": {"name": "supervised", "label_smoothing": 0.1},
                                "train": {"epochs": args.epochs - args.epochs // 2},
                            },
                        ],
                    },
                    "val_acc",
                ),
                (
                    "chain:supcon>arcface>distill",
                    {
                        **base(seed),
                        "phases": [
                            {"phase": {"name": "supcon"}, "train": {"epochs": args.epochs * 3 // 8}},
                            {
                                "name": "arcface",
                                "phase": {"name": "metric", "loss": "arcface", "margin_warmup_steps": 50},
                                "train": {"epochs": args.epochs * 3 // 8},
                            },
                            {
                                "name": "distill",
                                "phase": {"name": "distill", "teacher": "previous", "alpha": 0.5},
                                "train": {"epochs": args.epochs - 2 * (args.epochs * 3 // 8), "warmup_epochs": 0},
                            },
                        ],
                    },
                    "val_acc",
                ),
            ]
            for name, config, metric in plans:
                if not fnmatch.fnmatch(name, args.only) and not (
                    name == "supervised" and "distill:checkpoint" in args.only
                ):
                    continue
                runs.setdefault(name, []).append(
                    run(config, folder / name.split(":")[0] if name == "supervised" else folder / name, metric)
                )
                print(seed, name, runs[name][-1])
    results = {
        name: {
            "metric": "val_knn_acc" if name == "supcon" else "val_acc",
            "mean": statistics.mean(v for v, _ in values),
            "min": min(v for v, _ in values),
            "max": max(v for v, _ in values),
            "wall_s_mean": statistics.mean(s for _, s in values),
        }
        for name, values in runs.items()
    }
    previous = RESULTS / "phases_digits.json"
    if args.only != "*" and previous.is_file():  # a partial run: keep the other rows' results
        results = {**json.loads(previous.read_text())["results"], **results}
    path = write_result(
        "phases_digits",
        {
            "claim": "every phase trains on digits on a CPU; accuracy and cost per phase",
            "seeds": args.seeds,
            "epochs": args.epochs,
            "results": results,
        },
    )
    for name, r in results.items():
        print(
            f"{name:26s} {r['metric']:12s} {r['mean']:.4f} [{r['min']:.4f}, {r['max']:.4f}]  {r['wall_s_mean']:.1f} s"
        )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
