"""Claim: every seed pipeline's CPU twin runs end to end as one `raycls tune` command, as shipped; each
twin's best test accuracy and wall time on this machine, beside the published number its full space
should beat (REFERENCE.md; on CIFAR-10 or MNIST, not these twins' data).

Runs each twin space with `raycls tune` in its own process, as a user would (the twin's own trials,
concurrency and evaluation), W&B off, then reads its leaderboard.

    python benchmarks/seeds_cpu.py                         # every twin
    python benchmarks/seeds_cpu.py --only zoo-digits deit-cst-digits
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, write_result

from raycls.config import load_experiment
from raycls.results import read_leaderboard

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
# twin -> (the full space it stands for, the published number that space should beat)
TWINS = {
    "zoo-digits": ("zoo.yaml", "CIFAR-10: resnet18 87.3%, densenet121 91.9%, efficientnet_b0 89.6%, deit_tiny 66.6%"),
    "adaptive-deit-digits": ("adaptive-deit.yaml", "CIFAR-10: AdaptiveCNN 82.9%, DeiT distilled from it 84.4%"),
    "deit-cst-digits": ("deit-cst.yaml", "CIFAR-10: DeiT with CST from DINOv2 ViT-S/14 89.2%"),
    "finetune-imagenette": ("finetune.yaml", "none published (the seed's own data); the twin trains from scratch"),
    "pipeline-digits": ("pipeline.yaml", "none published for the chain; quickstart digits ~0.99"),
}


def run_twin(name: str, storage: Path) -> dict:
    sets = ["--set", f"data.path={SHARED_DATA / 'imagenette-mini'}"] if name == "finetune-imagenette" else []
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "raycls.cli",
            "tune",
            str(SPACES / f"{name}.yaml"),
            "--storage",
            str(storage),
            "--wandb",
            "disabled",
            "--no-report",
            *sets,
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"twin": name, "error": (done.stdout + done.stderr)[-2000:], "wall_s": wall}
    experiment = load_experiment(SPACES / f"{name}.yaml")
    rows = read_leaderboard(str(storage), experiment.name).table.to_pylist()
    best = max((r for r in rows if r.get("score") is not None), key=lambda r: r["score"])
    return {
        "twin": name,
        "stands_for": TWINS[name][0],
        "to_beat": TWINS[name][1],
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "wall_s": round(wall, 1),
        "best_trial": best["trial_id"],
        "best_val": best["score"],
        "best_test_acc": best.get("test_acc"),
        "best_test_shift_mca": best.get("test_shift_mca"),
        "best_params": {k: best[k] for k in experiment.space.params if k in best},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(TWINS), default=list(TWINS))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            result = run_twin(name, Path(tmp) / "runs")
            results.append(result)
            print(result, flush=True)
    path = write_result("seeds_cpu", {"twins": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
