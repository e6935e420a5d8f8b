"""Claim (issue 28): the README's quickstart, `raycls tune search_spaces/quickstart.yaml` from a fresh clone,
ends in <= 30 s on 2 cores with its 12 trials and its accuracy; and where its seconds go.

A fresh `git clone` of this checkout into a temp folder (the install, `pip install -e .`, is the user's first
command and is not timed: the clone runs with PYTHONPATH on it), then the README's command as a user runs it
(default W&B mode: offline without a key; the HTML report at the end). A thread watches the experiment
folder and stamps the milestones: the folder written (checks done, before Ray), the first trial started
(its Tune folder), the first and last leaderboard rows, the report, the process's end. Beside it, in the same
rounds: the same command with `--no-report --wandb disabled` (what the platform's extras cost on top), the
README's command with PYTHONDONTWRITEBYTECODE=1 (this machine's image sets it: every process then compiles
raycls from source again; the other runs write bytecode, as CPython does by default), and the floors no
search on this machine goes under, each in a fresh process: Ray's own start and stop
(`ray.init` of a local Ray with as many logical CPUs as the quickstart's and no dashboard, as raycls starts
it), and what every trial actor imports before its first step (Ray Tune and PyTorch).

    python benchmarks/quickstart.py              # both runs, JSON in benchmarks/results/quickstart.json
    python benchmarks/quickstart.py --rounds 2   # the median of 2 rounds each
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import write_result

from raycls.config import load_experiment
from raycls.results import read_leaderboard
from raycls.tune.cluster import local_num_cpus, search_ray

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 30.0


def watch(experiment_dir: Path, started: float, stamps: dict[str, float], done: threading.Event) -> None:
    """Seconds from the command's start to each milestone, polled every 50 ms."""
    checks = {
        "experiment_folder": lambda: experiment_dir.is_dir(),
        "first_trial_started": lambda: any(experiment_dir.glob("tune_trainable_*/params.json")),
        "first_row": lambda: any((experiment_dir / "leaderboard").glob("*.parquet")),
        "report": lambda: (experiment_dir / "report" / "report.html").is_file(),
    }
    while not done.is_set():
        for name, check in checks.items():
            if name not in stamps and check():
                stamps[name] = round(time.perf_counter() - started, 2)
        time.sleep(0.05)


def run_once(clone: Path, storage: Path, extra: list[str], bytecode: bool) -> dict:
    experiment_dir = storage / "quickstart"
    stamps: dict[str, float] = {}
    done = threading.Event()
    command = [sys.executable, "-m", "raycls.cli", "tune", "search_spaces/quickstart.yaml", "--storage", str(storage)]
    started = time.perf_counter()
    watcher = threading.Thread(target=watch, args=(experiment_dir, started, stamps, done), daemon=True)
    watcher.start()
    finished = subprocess.run(
        [*command, *extra],
        cwd=clone,
        capture_output=True,
        text=True,
        env=command_env(clone, bytecode),
    )
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    if finished.returncode != 0:
        raise SystemExit(
            f"quickstart failed ({finished.returncode}):\n{finished.stdout[-3000:]}{finished.stderr[-3000:]}"
        )
    rows = read_leaderboard(str(storage), "quickstart").table.to_pylist()
    completed = [r for r in rows if r["status"] == "completed"]
    best = max(completed, key=lambda r: r["val_acc"])
    return {
        "wall_s": round(wall, 2),
        "milestones_s": stamps,
        "trials": len(rows),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
        "best_val_acc": best["val_acc"],
        "best_test_acc": best.get("test_acc"),
    }


def command_env(clone: Path, bytecode: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(clone)} | ({} if bytecode else {"PYTHONDONTWRITEBYTECODE": "1"})


# The floors, each timed inside a fresh Python process (its own interpreter start excluded).
FLOORS = {
    "ray_start_and_stop": """
import time; t = time.perf_counter()
import ray
ray.init(num_cpus={num_cpus}, include_dashboard=False, logging_level="ERROR")
ray.shutdown()
print(time.perf_counter() - t)
""",
    "trial_actor_imports": """
import time; t = time.perf_counter()
import ray.tune, torch
print(time.perf_counter() - t)
""",
}


def quickstart_num_cpus() -> int:
    """The logical CPUs raycls gives the quickstart's local Ray (its concurrency, the driver, the cores)."""
    ray_args = search_ray(load_experiment(REPO / "search_spaces" / "quickstart.yaml"), None)
    return local_num_cpus(ray_args["needed_cpus"])


def floor_once(code: str, num_cpus: int) -> float:
    code = code.replace("{num_cpus}", str(num_cpus))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    variants = {  # name: (extra arguments, bytecode written)
        "readme_command": ([], True),
        "no_report_no_wandb": (["--no-report", "--wandb", "disabled"], True),
        "readme_command_no_bytecode": ([], False),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    floors: dict[str, list[float]] = {name: [] for name in FLOORS}
    num_cpus = quickstart_num_cpus()
    with tempfile.TemporaryDirectory(prefix="raycls-quickstart-") as tmp:
        clone = Path(tmp) / "raycls"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        for round_ in range(args.rounds):
            for name, (extra, bytecode) in variants.items():  # interleaved: a noisy minute hits them all
                result = run_once(clone, Path(tmp) / f"results-{name}-{round_}", extra, bytecode)
                print(name, result, flush=True)
                runs[name].append(result)
            for name, code in FLOORS.items():
                floors[name].append(floor_once(code, num_cpus))
                print(name, floors[name][-1], flush=True)
    summary = {name: statistics.median(r["wall_s"] for r in found) for name, found in runs.items()}
    write_result(
        "quickstart",
        {
            "claim": f"the README's quickstart from a fresh clone in <= {GOAL_S:.0f} s on 2 cores, 12 trials",
            "goal_s": GOAL_S,
            "median_wall_s": summary,
            "met": summary["readme_command"] <= GOAL_S,
            "extras_ratio": round(summary["readme_command"] / summary["no_report_no_wandb"], 3),
            "no_bytecode_ratio": round(summary["readme_command_no_bytecode"] / summary["readme_command"], 3),
            "bytecode": "written (CPython's default) except in readme_command_no_bytecode; PYTHONDONTWRITEBYTECODE="
            + os.environ.get("PYTHONDONTWRITEBYTECODE", "(unset)")
            + " in this machine's environment",
            # Seconds of every quickstart that are Ray's and PyTorch's, not raycls's: the start of Ray, and
            # a trial actor's imports (paid before the first trial; two actors share the 2 cores).
            "floors_median_s": {name: statistics.median(found) for name, found in floors.items()},
            "floors_s": floors,
            "runs": runs,
        },
    )
    print(summary)


if __name__ == "__main__":
    main()
