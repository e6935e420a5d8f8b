"""When a whole search ends before its trials do: a wall-clock budget (`experiment.time_budget_s`,
`--time-budget`) or a target any trial reaches (`experiment.stop: {val_acc: 0.99}`).

One Tune Stopper does both (Tune's own `time_budget_s` is the same `stop_all` check, but cannot say why the
search ended): it stops nothing per trial, and once the budget is spent or a target is reached its
`stop_all` ends the search. It then writes `<experiment>/.raycls/search_end.json`, which
- the trial ledger reads, so trials cut by the end say `stopped_by: time_budget | target` in their rows;
- `raycls tune` reads to say why the search ended;
- `--resume` reads to continue: a new Tune run of the trials without a row, in the same Optuna study, with
  the budget counted afresh.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ray.tune import Stopper

from raycls.config.experiment import Experiment
from raycls.files import write_text_atomic
from raycls.ranking import Ranking
from raycls.storage import end_file

Reason = Literal["time_budget", "target"]


@dataclass(frozen=True)
class SearchEnd:
    reason: Reason
    detail: str  # for people: "its 60 s time budget was spent", "trial 3f2a_00004 reached val_acc=0.991 (target 0.99)"
    elapsed_s: float


def read_end(state_dir: Path) -> SearchEnd | None:
    """Why the last run of this search ended early (None: it ran its trials, or it is running)."""
    try:
        return SearchEnd(**json.loads(end_file(state_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def clear_end(state_dir: Path) -> None:
    end_file(state_dir).unlink(missing_ok=True)


class SearchStopper(Stopper):
    def __init__(self, experiment: Experiment, state_dir: Path):
        section = experiment.experiment
        self.budget_s = section.time_budget_s
        self.targets = {
            metric: (value, section.direction(metric)) for metric, value in section.stop.items()
        }  # picklable
        self.state_dir = str(state_dir)
        self._clock()

    def _clock(self) -> None:
        self.started = time.monotonic()
        self.end: SearchEnd | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Restored by Tune on --resume (a killed driver): the budget counts again from the resumed start.
        self.__dict__.update(state)
        self._clock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("budget_s", "targets", "state_dir")}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if self.end is None:
            for metric, (target, mode) in self.targets.items():
                ranking = Ranking.of(metric, mode)
                # Judged like the row: a chain's earlier stages (a teacher) never end the search.
                if ranking.reached(ranking.value(result), target):
                    self._finish(
                        "target", f"trial {trial_id} reached {metric}={result[metric]:.4g} (target {target:g})"
                    )
                    break
        return False  # no trial is stopped on its own: stop_all ends them all

    def stop_all(self) -> bool:
        if self.end is None and self.budget_s is not None and self.elapsed() >= self.budget_s:
            self._finish("time_budget", f"its {self.budget_s:g} s time budget was spent")
        return self.end is not None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _finish(self, reason: Reason, detail: str) -> None:
        self.end = SearchEnd(reason, detail, round(self.elapsed(), 3))
        write_text_atomic(end_file(Path(self.state_dir)), json.dumps(asdict(self.end)))
