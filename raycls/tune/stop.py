"""When a whole search ends before its trials do: a wall-clock budget (`experiment.time_budget_s`,
`--time-budget`), a target any trial reaches (`experiment.stop: {val_acc: 0.99}`), or a plateau: the search's
best score has not improved by more than `min_delta` for `patience` epochs in a row, counted over every trial's
reports in the order they arrive (`experiment.stop: {plateau: {patience: 12, min_delta: 0.002}}`).

One Tune Stopper does both (Tune's own `time_budget_s` is the same `stop_all` check, but cannot say why the
search ended): it stops nothing per trial, and once the budget is spent or a target is reached its
`stop_all` ends the search. It then writes `<experiment>/.raycls/search_end.json`, which
- the trial ledger reads, so trials cut by the end say `stopped_by: time_budget | target | plateau`;
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

from raycls.config.experiment import Experiment, PlateauRule
from raycls.files import write_text_atomic
from raycls.ranking import Ranking
from raycls.storage import end_file

Reason = Literal["time_budget", "target", "plateau"]


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
            metric: (value, section.direction(metric)) for metric, value in section.targets.items()
        }  # picklable
        rule = section.plateau
        self.plateau = (rule.patience, rule.min_delta, section.metric, section.mode) if rule else None
        self.state_dir = str(state_dir)
        self._clock()

    def _watch(self) -> None:
        rule = getattr(self, "plateau", None)  # a stopper pickled before plateaus existed has none
        self.watch = PlateauWatch(*rule) if rule else None

    def _clock(self) -> None:
        self.started = time.monotonic()
        self.end: SearchEnd | None = None
        self._watch()  # a resumed search waits `patience` epochs afresh

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Restored by Tune on --resume (a killed driver): the budget counts again from the resumed start.
        self.__dict__.update(state)
        self._clock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("budget_s", "targets", "plateau", "state_dir")}

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
        if self.end is None and self.watch is not None and self.watch.update(result):
            self._finish("plateau", self.watch.detail())
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


class PlateauWatch:
    """The search's best score and how many epochs in a row (over all trials) have not raised it by more
    than `min_delta`. Pure: fed one result at a time."""

    def __init__(self, patience: int, min_delta: float, metric: str, mode: str):
        self.rule = PlateauRule(patience=patience, min_delta=min_delta)
        self.ranking = Ranking.of(metric, mode)
        self.best: float | None = None
        self.waited = 0  # epochs reported since the best last improved

    def update(self, result: dict[str, Any]) -> bool:
        """Take one epoch's result; whether the search has now plateaued. Epochs that do not count (a
        chain's earlier stages) are not judged and do not count toward patience."""
        value = self.ranking.value(result)
        if value is None:
            return False
        if self.ranking.improves(value, self.best, self.rule.min_delta):
            self.best, self.waited = value, 0
            return False
        self.waited += 1
        return self.waited >= self.rule.patience

    def detail(self) -> str:
        return (
            f"{self.waited} epochs in a row did not raise the best {self.ranking.metric}={self.best:.4g} "
            f"by more than {self.rule.min_delta:g} (plateau patience {self.rule.patience})"
        )
