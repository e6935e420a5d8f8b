"""Claim: `raycls report` draws 2,000 trials in under 10 s on 2 cores (HTML; the PNGs are timed apart).

Generates experiments of 12, 200 and 2,000 trials as a search leaves them: a leaderboard row and a history
file per trial (written by raycls's own writer), the space as run (ASHA, three sampled parameters) and
an Optuna journal whose trials carry the same values. Scores follow a smooth function of the parameters
plus noise; ASHA-like stops cut the weaker half at each rung. Then times write_report without PNGs, and
with them (kaleido, when a Chrome or Chromium is installed), each repeated.

    python benchmarks/report_time.py                  # 12, 200, 2000 trials
    python benchmarks/report_time.py --trials 12 200 --repeats 1
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
from common import write_result

from raycls.config.load import load_experiment
from raycls.report.page import write_report
from raycls.results.leaderboard import TrialRecord, write_trial
from raycls.results.provenance import write_space_as_run
from raycls.results.row import param_types
from raycls.storage import journal_file
from raycls.tune.resume import TRIAL_ID_ATTR
from raycls.tune.searcher import open_study_storage

SPACE = """
experiment: {{name: {name}, trials: {trials}, metric: val_acc, mode: max}}
scheduler: {{name: asha, max_t: 27, grace_period: 3, reduction_factor: 3}}
wandb: {{mode: disabled}}
base:
  data: {{name: digits}}
  train: {{epochs: 27}}
space:
  train.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-1}}
  train.weight_decay: {{type: loguniform, low: 1.0e-6, high: 1.0e-2}}
  train.optimizer: {{type: choice, values: [sgd, adamw]}}
"""


def synthetic_experiment(storage: Path, name: str, trials: int, seed: int = 0) -> None:
    """A finished ASHA search of `trials` trials, as `raycls tune` leaves it on disk."""
    rng = random.Random(seed)
    yaml_path = storage / f"{name}.yaml"
    yaml_path.write_text(SPACE.format(name=name, trials=trials))
    experiment = load_experiment(yaml_path)
    write_space_as_run(experiment, str(storage))
    types = param_types(experiment)
    study = optuna.create_study(
        study_name=name, direction="maximize", storage=open_study_storage(journal_file(storage / name))
    )
    distributions = {
        "train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "train.weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True),
        "train.optimizer": optuna.distributions.CategoricalDistribution(["sgd", "adamw"]),
    }
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rung_best: dict[int, list[float]] = {3: [], 9: []}
    for i in range(trials):
        params = {
            "train.lr": 10 ** rng.uniform(-4, -1),
            "train.weight_decay": 10 ** rng.uniform(-6, -2),
            "train.optimizer": rng.choice(["sgd", "adamw"]),
        }
        ceiling = (
            0.97
            - 0.08 * (math.log10(params["train.lr"]) + 2.5) ** 2
            - (0.02 if params["train.optimizer"] == "sgd" else 0)
        )
        history, status = [], "completed"
        for epoch in range(1, 28):
            acc = max(0.1, ceiling * (1 - math.exp(-epoch / 5)) + rng.gauss(0, 0.01))
            history.append({"epoch": epoch, "val_acc": acc, "val_loss": 2.3 * (1 - acc), "epoch_s": 1.0 + rng.random()})
            if epoch in rung_best:
                seen = rung_best[epoch]
                seen.append(acc)
                if acc < statistics.median(seen) and len(seen) > 2:
                    status = "early_stopped"
                    break
        if rng.random() < 0.03:
            status, history = "failed", history[: rng.randint(0, 2)]
        started = start + timedelta(seconds=10 * i)
        record = TrialRecord(
            experiment=name,
            trial_id=f"{i:05d}",
            status=status,
            metric="val_acc",
            mode="max",
            params=params,
            param_types=types,
            history=history,
            max_epochs=27,
            started_at=started,
            ended_at=started + timedelta(seconds=sum(h["epoch_s"] for h in history) + 5),
            error="RuntimeError: synthetic" if status == "failed" else None,
        )
        write_trial(str(storage), record)
        trial = optuna.trial.create_trial(
            params=params,
            distributions=distributions,
            user_attrs={TRIAL_ID_ATTR: record.trial_id},
            state={
                "completed": optuna.trial.TrialState.COMPLETE,
                "early_stopped": optuna.trial.TrialState.PRUNED,
                "failed": optuna.trial.TrialState.FAIL,
            }[status],
            value=max(h["val_acc"] for h in history) if status == "completed" else None,
        )
        study.add_trial(trial)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, nargs="+", default=[12, 200, 2000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="report")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for trials in args.trials:
            name = f"bench{trials}"
            made = time.perf_counter()
            synthetic_experiment(Path(tmp), name, trials)
            made = time.perf_counter() - made
            timings: dict[str, list[float]] = {"html": [], "html_and_png": []}
            size, pngs, png_error = 0, 0, None
            for _ in range(args.repeats):
                for kind, png in (("html", False), ("html_and_png", True)):
                    t = time.perf_counter()
                    files = write_report(tmp, name, png=png, wandb_mode="disabled")
                    timings[kind].append(time.perf_counter() - t)
                    size = files.html.stat().st_size
                    if png:
                        pngs, png_error = len(files.pngs), files.png_error
            row = {
                "trials": trials,
                "html_s": min(timings["html"]),
                "html_and_png_s": min(timings["html_and_png"]),
                "html_bytes": size,
                "pngs": pngs,
                "png_error": png_error,
                "generate_s": round(made, 1),
                "runs": timings,
            }
            print(row)
            results.append(row)
    largest = max(results, key=lambda r: r["trials"])
    print(
        write_result(
            args.out,
            {
                "claim": "report of 2,000 trials in under 10 s on 2 cores (HTML)",
                "goal_s": 10.0,
                "met": largest["html_s"] < 10.0,
                "results": results,
            },
        )
    )


if __name__ == "__main__":
    main()
