"""Claim: TPE + ASHA with raycls's PRUNED bookkeeping reaches a good configuration for at most one third of
the epochs random search with FIFO spends (the compass goal); reported as measured, whatever it is.

The task: a stratified Fashion-MNIST subset (2,000 images, resized to 14 px), small_cnn, a space with real spread (optimizer, lr over five
decades, weight decay, width, batch size: too-low and too-high learning rates train badly or diverge). Four
methods search it with the same trial count, the same epochs per trial and the same seeds:

    random_fifo        random search, every trial trained to the last epoch (the baseline)
    random_asha        random search, ASHA stopping (grace 1, reduction factor 3)
    tpe_asha_pruned    TPE + ASHA, an ASHA-stopped trial told to Optuna as PRUNED (raycls's default)
    tpe_asha_complete  TPE + ASHA, an ASHA-stopped trial told COMPLETE with its rung score (Ray's OptunaSearch)

Per seed, the target is the best final `score` among random_fifo's completed trials. Each method's epochs
are put in time order (a trial's row `started_at` plus the loop's own setup_s + epoch_s, epoch by epoch: two
trials run at a time) and counted up to and including the first epoch whose val_acc >= target. A method
that never gets there is "not reached" for that seed (its total epochs are reported too). Reported per
method: the median epochs-to-target over the seeds that reached it, how many did, the median with
unreached seeds counted as never (None when half or more never did), the median total epochs, the ratios of
both medians to random_fifo's, every seed's raw numbers, and wall seconds per search. The goal is judged on
the unreached-as-never ratio: a median over the one seed of five that reached the target says little.

The searches run in-process through raycls's own driver (run_tune: Ray Tune, raycls's Optuna searcher,
leaderboard), one local Ray for all of them, storage in a temporary folder removed at the end.

    python benchmarks/search_efficiency.py                      # the default: 5 seeds, 20 trials, 9 epochs (~20-25 min, 2 cores)
    python benchmarks/search_efficiency.py --seeds 0 1 2 --trials 12
    python benchmarks/search_efficiency.py --quick              # a smoke check (1 seed, tiny searches)
    python benchmarks/search_efficiency.py --from-result OLD.json   # summarise an earlier run again, no training
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "token")

from common import SHARED_DATA, write_result  # noqa: E402

from raycls.config import load_experiment  # noqa: E402
from raycls.results import read_leaderboard  # noqa: E402

METHODS: dict[str, dict[str, str]] = {
    "random_fifo": {"algorithm": "random", "scheduler": "fifo", "early_stopped_as": "pruned"},
    "random_asha": {"algorithm": "random", "scheduler": "asha", "early_stopped_as": "pruned"},
    "tpe_asha_pruned": {"algorithm": "tpe", "scheduler": "asha", "early_stopped_as": "pruned"},
    "tpe_asha_complete": {"algorithm": "tpe", "scheduler": "asha", "early_stopped_as": "complete"},
}
BASELINE = "random_fifo"

# The space (YAML). Too-low learning rates barely train in a few epochs, too-high ones diverge or stall;
# adamw and sgd want learning rates two decades apart, so the good region is a narrow, conditional one.
SPACE = {
    "train.optimizer": {"type": "choice", "values": ["adamw", "sgd"]},
    "train.lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0},
    "train.weight_decay": {"type": "loguniform", "low": 1.0e-6, "high": 1.0e-1},
    "model.width": {"type": "choice", "values": [4, 8, 16]},
    "train.batch_size": {"type": "choice", "values": [64, 128, 256]},
}

YAML = """
experiment: {{name: {name}, trials: {trials}, concurrency: {concurrency}, metric: val_acc, mode: max}}
search: {{algorithm: {algorithm}, seed: {seed}, n_startup_trials: {startup}, early_stopped_as: {early_stopped_as}}}
scheduler: {{name: {scheduler}, max_t: {epochs}, grace_period: {grace}, reduction_factor: {reduction}}}
wandb: {{mode: disabled}}
base:
  seed: {seed}
  data: {{name: {dataset}, root: {root}, val_fraction: {val_fraction}, train_subset: {subset}, image_size: {image_size}, download: false}}
  model: {{name: small_cnn, width: 8}}
  train: {{epochs: {epochs}, batch_size: 64, optimizer: adamw, lr: 1.0e-3, weight_decay: 1.0e-4, warmup_epochs: 0}}
  eval: {{on: none}}
space: {space}
"""


def epoch_timeline(rows: list[dict], history: list[dict]) -> list[tuple[float, str, int, float | None]]:
    """Every trained epoch as (estimated end time, trial_id, epoch, val_acc), in time order. History rows
    carry no time stamp: an epoch ends at its trial's started_at plus the loop's setup_s and epoch_s so far."""
    started = {r["trial_id"]: r["started_at"].timestamp() if r.get("started_at") else math.inf for r in rows}
    per_trial: dict[str, list[dict]] = {}
    for h in history:
        per_trial.setdefault(h["trial_id"], []).append(h)
    timeline = []
    for trial_id, epochs in per_trial.items():
        clock = started.get(trial_id, math.inf)
        for h in sorted(epochs, key=lambda h: h["epoch"]):
            clock += (h.get("setup_s") or 0.0) + (h.get("epoch_s") or 0.0)
            timeline.append((clock, trial_id, int(h["epoch"]), h.get("val_acc")))
    timeline.sort(key=lambda e: (e[0], e[1], e[2]))
    return timeline


def epochs_to_target(timeline: list[tuple[float, str, int, float | None]], target: float) -> int | None:
    for count, (_, _, _, val_acc) in enumerate(timeline, start=1):
        if val_acc is not None and val_acc >= target:
            return count
    return None


def run_search(folder: Path, storage: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from raycls.tune.driver import TuneOptions, run_tune

    spec = METHODS[method]
    name = f"{method}-s{seed}"
    path = folder / f"{name}.yaml"
    path.write_text(
        YAML.format(
            name=name,
            trials=args.trials,
            concurrency=args.concurrency,
            seed=seed,
            startup=args.startup,
            epochs=args.epochs,
            grace=args.grace,
            reduction=args.reduction,
            dataset=args.dataset,
            root=SHARED_DATA,
            val_fraction=args.val_fraction,
            subset=args.subset,
            image_size=args.image_size,
            space=json.dumps(SPACE),
            **spec,
        )
    )
    experiment = load_experiment(path)
    started = time.perf_counter()
    run_tune(experiment, TuneOptions(storage=storage, live=False))
    wall = time.perf_counter() - started
    rows = read_leaderboard(storage, name).table.to_pylist()
    history = read_leaderboard(storage, name, kind="history").table.to_pylist()
    shutil.rmtree(Path(storage) / name, ignore_errors=True)  # checkpoints: keep the temp folder small
    timeline = epoch_timeline(rows, history)
    completed = [r["score"] for r in rows if r["status"] == "completed" and r.get("score") is not None]
    scored = [r["score"] for r in rows if r.get("score") is not None]
    return {
        "method": method,
        "seed": seed,
        "wall_s": round(wall, 1),
        "trials": len(rows),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "total_epochs": len(timeline),
        "best_completed_score": max(completed) if completed else None,
        "best_score": max(scored) if scored else None,
        # Every epoch in the order counted: [trial_id, epoch, val_acc].
        "timeline": [[t, e, round(v, 4) if v is not None else None] for _, t, e, v in timeline],
        "trials_detail": sorted(
            (
                {
                    "trial_id": r["trial_id"],
                    "status": r["status"],
                    "epochs": r.get("epochs"),
                    "score": r.get("score"),
                    "started_at": r["started_at"].isoformat() if r.get("started_at") else None,
                    **{k: r.get(k) for k in SPACE},
                }
                for r in rows
            ),
            key=lambda t: t["started_at"] or "",
        ),
        "_timeline": timeline,
    }


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[dict, dict]:
    per_seed: dict[str, dict] = {}
    for seed in seeds:
        target = runs[BASELINE][seed]["best_completed_score"]
        per_seed[str(seed)] = {"target": target}
        for method in METHODS:
            run = runs[method][seed]
            reached = epochs_to_target(run["_timeline"], target) if target is not None else None
            run["epochs_to_target"] = reached
            per_seed[str(seed)][method] = {
                "epochs_to_target": reached,
                "total_epochs": run["total_epochs"],
                "best_score": run["best_score"],
                "wall_s": run["wall_s"],
                "statuses": run["statuses"],
            }
    summary: dict[str, dict] = {}
    for method in METHODS:
        reached = [
            runs[method][s]["epochs_to_target"] for s in seeds if runs[method][s]["epochs_to_target"] is not None
        ]
        # Unreached seeds count as never: the median exists only while fewer than half never got there.
        censored = sorted([runs[method][s]["epochs_to_target"] or math.inf for s in seeds])
        median_censored = statistics.median(censored)
        summary[method] = {
            "median_epochs_to_target": median_or_none(reached),
            "seeds_reached": len(reached),
            "seeds": len(seeds),
            "median_epochs_to_target_unreached_as_never": None if math.isinf(median_censored) else median_censored,
            "median_total_epochs": statistics.median(runs[method][s]["total_epochs"] for s in seeds),
            "median_wall_s": statistics.median(runs[method][s]["wall_s"] for s in seeds),
            "best_score_per_seed": {str(s): runs[method][s]["best_score"] for s in seeds},
        }
    base = summary[BASELINE]["median_epochs_to_target"]
    base_never = summary[BASELINE]["median_epochs_to_target_unreached_as_never"]
    for method in METHODS:
        mine = summary[method]["median_epochs_to_target"]
        # Over the seeds that reached the target only: flattering when few did (read it with seeds_reached).
        summary[method]["ratio_vs_random_fifo"] = round(mine / base, 3) if mine is not None and base else None
        never = summary[method]["median_epochs_to_target_unreached_as_never"]
        # The goal's measure: unreached seeds count as never (None: half or more never reached the target).
        summary[method]["ratio_vs_random_fifo_unreached_as_never"] = (
            round(never / base_never, 3) if never is not None and base_never else None
        )
        # Per seed, where both reached: this method's epochs over random_fifo's (a paired view of the same).
        paired = [
            runs[method][s]["epochs_to_target"] / runs[BASELINE][s]["epochs_to_target"]
            for s in seeds
            if runs[method][s]["epochs_to_target"] and runs[BASELINE][s]["epochs_to_target"]
        ]
        summary[method]["median_paired_ratio_vs_random_fifo"] = round(statistics.median(paired), 3) if paired else None
    return summary, per_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="search.seed and base.seed of each repeat"
    )
    parser.add_argument("--trials", type=int, default=20, help="trials per search (every method)")
    parser.add_argument("--epochs", type=int, default=9, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period, epochs")
    parser.add_argument("--reduction", type=float, default=3.0, help="ASHA reduction factor")
    parser.add_argument("--startup", type=int, default=5, help="TPE's random startup trials (n_startup_trials)")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at a time (2 cores: at most 2)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument(
        "--subset", type=int, default=2000, help="stratified training subset (before the validation split)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument(
        "--image-size", type=int, default=14, help="images resized to this side (28: native; 14 trains ~3x faster)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="a subset of methods (timing only: the summary needs all four)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke check: 1 seed, 4 trials, 2 epochs, 600 images")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results/search_efficiency.json")
    parser.add_argument(
        "--from-result",
        type=Path,
        metavar="JSON",
        help="train nothing: summarise the raw runs (epoch timelines) of an earlier result file again",
    )
    args = parser.parse_args()
    if args.from_result:
        return resummarise(args.from_result, write=not args.no_write)
    if args.quick:
        args.seeds, args.trials, args.epochs, args.subset, args.startup = args.seeds[:1], 4, 2, 600, 2

    import ray

    from raycls.tune.cluster import init_ray

    started = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    folder = Path(tempfile.mkdtemp(prefix="search_efficiency-"))
    try:
        init_ray(None, num_cpus=8)
        for seed in args.seeds:
            for method in args.methods:
                run = run_search(folder, str(folder / "results"), method, seed, args)
                runs[method][seed] = run
                print(
                    f"seed {seed} {method}: {run['wall_s']} s, {run['total_epochs']} epochs, best {run['best_score']}, "
                    f"{run['statuses']}",
                    flush=True,
                )
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    total_wall = time.perf_counter() - started
    if set(args.methods) != set(METHODS):
        print(f"timing only ({total_wall:.0f} s): the summary needs every method")
        return

    config = {
        "dataset": args.dataset,
        "train_subset": args.subset,
        "val_fraction": args.val_fraction,
        "image_size": args.image_size,
        "model": "small_cnn",
        "space": SPACE,
        "trials": args.trials,
        "epochs_per_trial": args.epochs,
        "concurrency": args.concurrency,
        "asha": {"grace_period": args.grace, "reduction_factor": args.reduction, "max_t": args.epochs},
        "tpe_n_startup_trials": args.startup,
        "seeds": args.seeds,
        "quick": args.quick,
        "methods": METHODS,
        "target": "per seed, the best final score among random_fifo's completed trials",
        "epoch_order": "row started_at + cumulative setup_s + epoch_s per epoch (history has no time stamp)",
    }
    report(config, runs, total_wall, write=not args.no_write)


def resummarise(path: Path, *, write: bool) -> None:
    """The summary of an earlier result's raw runs again (their stored timelines are already in time order)."""
    earlier = json.loads(path.read_text())
    config = earlier["config"]
    runs = {
        m: {
            int(s): {**run, "_timeline": [(i, t, e, v) for i, (t, e, v) in enumerate(run["timeline"])]}
            for s, run in by_seed.items()
        }
        for m, by_seed in earlier["runs"].items()
    }
    measured = {
        "measured_at_commit": earlier.get("measured_at_commit", earlier.get("git_commit")),
        "measured_at": earlier.get("measured_at", earlier.get("written_at")),
    }
    report(config, runs, earlier["total_wall_s"], write=write, measured=measured)


def report(
    config: dict, runs: dict[str, dict[int, dict]], total_wall: float, *, write: bool, measured: dict | None = None
) -> None:
    summary, per_seed = summarise(runs, config["seeds"])
    for method, s in summary.items():
        print(
            f"{method:18s} median epochs-to-target {s['median_epochs_to_target']} (reached {s['seeds_reached']}/{s['seeds']}, "
            f"unreached as never: {s['median_epochs_to_target_unreached_as_never']}), ratio {s['ratio_vs_random_fifo']} "
            f"(paired {s['median_paired_ratio_vs_random_fifo']}, unreached as never "
            f"{s['ratio_vs_random_fifo_unreached_as_never']}), median total epochs {s['median_total_epochs']}, "
            f"median wall {s['median_wall_s']} s"
        )
    print(f"total wall {total_wall:.0f} s")
    if not write:
        return
    # The goal counts a seed that never reached the target as never: a median over the one seed that did
    # (ratio_vs_random_fifo) would call a method that mostly fails "fast".
    goal = summary["tpe_asha_pruned"]["ratio_vs_random_fifo_unreached_as_never"]
    path = write_result(
        "search_efficiency",
        {
            "claim": "epochs for each method to reach random+FIFO's best final score (median over seeds); "
            "compass goal: TPE+ASHA (PRUNED) at most 1/3 of random+FIFO's epochs",
            "config": config,
            "summary": summary,
            "goal_ratio": 1 / 3,
            "meets_goal": goal is not None and goal <= 1 / 3,
            "per_seed": per_seed,
            "runs": {
                m: {str(s): {k: v for k, v in run.items() if k != "_timeline"} for s, run in by_seed.items()}
                for m, by_seed in runs.items()
            },
            "total_wall_s": round(total_wall, 1),
            **(measured or {}),
        },
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
