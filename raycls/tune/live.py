"""The driver's view of a search on stdout: a rich table on a terminal, one line per trial event elsewhere.
Ranks trials as their rows do (raycls.ranking)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from raycls import names
from raycls.ranking import Ranking
from raycls.tune.searcher import stopped_early


class LiveTable(Callback):
    """Trial progress on the driver's stdout: a rich table that redraws as results arrive on a terminal, and
    one line per trial event where stdout is not one (`ray job submit`, CI, nohup: a live table would print
    nothing until the end). Tune's own reporter is turned off. Whether stdout is a terminal is read at
    every event, so a search started in a terminal and resumed under nohup logs lines.

    It holds the running trials and the best `BEST_ENDED` ended ones, and counts the rest: a search of
    100,000 trials draws (and keeps) a table as small as one of ten (`raycls leaderboard` lists them all)."""

    # Seconds between two result lines of the same trial when not on a terminal.
    LINE_EVERY_S = 5.0
    BEST_ENDED = 10
    ENDED = ("completed", "early_stopped", "failed")

    def __init__(self, experiment_name: str, metric: str, mode: str, total: int):
        self.experiment_name, self.metric, self.total = experiment_name, metric, total
        self.ranking = Ranking.of(metric, mode)  # the row's rule: a chain's last stage only
        self._live = None
        self._rows: dict[str, dict[str, Any]] = {}  # running trials
        self._best: list[tuple[str, dict[str, Any]]] = []  # the best ended trials, best first
        self._ended: dict[str, int] = dict.fromkeys(self.ENDED, 0)
        self._last_draw = 0.0
        self._last_line: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "_live": None,
            "_rows": {},
            "_best": [],
            "_ended": dict.fromkeys(self.ENDED, 0),
            "_last_draw": 0.0,
            "_last_line": {},
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_last_line": {}, "_best": [], "_ended": dict.fromkeys(self.ENDED, 0), **state})
        if "ranking" not in state:  # pickled by an older raycls (tuner.pkl of a resumed search)
            self.ranking = Ranking.of(state["metric"], state.get("mode"))

    @staticmethod
    def _on_terminal() -> bool:
        return sys.stdout.isatty()

    def _draw(self, force: bool = False) -> None:
        from rich.live import Live
        from rich.table import Table

        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in self._ended.items() if n)
        table = Table(
            title=f"{self.experiment_name}: {sum(self._ended.values())}/{self.total} trials ended"
            f"{f' ({counts})' if counts else ''}, {len(self._rows)} running",
            caption=f"running trials, then the best {self.BEST_ENDED} ended" if self._best else None,
        )
        for column in ("trial", "status", "epoch", self.metric, "params"):
            table.add_column(column)
        for trial_id, row in [*self._rows.items(), *self._best]:
            value = row.get("best") if row["status"] in self.ENDED else row.get(self.metric)
            table.add_row(
                trial_id,
                row["status"],
                str(row.get("epoch", "")),
                "" if value is None else f"{value:.4f}",
                row["params"],
            )
        if self._live is None:
            self._live = Live(table, refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self._live.update(table)

    def _line(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {self.experiment_name} {text}", flush=True)

    def _show(self, trial: Trial, row: dict[str, Any], event: str, *, force: bool = False) -> None:
        if self._on_terminal():
            self._draw(force=force)
            return
        if event == "result":
            now = time.monotonic()
            if now - self._last_line.get(trial.trial_id, float("-inf")) < self.LINE_EVERY_S:
                return
            self._last_line[trial.trial_id] = now
        value = row.get(self.metric)
        score = "" if value is None else f" {self.metric}={value:.4f}"
        best = row.get("best")
        best_text = "" if best is None or event == "started" else f" best={best:.4f}"
        epoch = f" epoch {row['epoch']}" if row.get("epoch") is not None and event != "started" else ""
        if row.get("stage") and event != "started":
            epoch += f" ({row['stage']})"
        params = f" {row['params']}" if event == "started" else ""
        word = event if event in ("started", "result") else row["status"]
        self._line(
            f"trial {trial.trial_id} {word}{epoch}{score}{best_text}"
            f"{params} [{sum(self._ended.values())}/{self.total} ended]"
        )

    def _set(self, trial: Trial, status: str, result: dict | None = None) -> dict[str, Any]:
        row = self._rows.setdefault(trial.trial_id, {"params": _short(trial.config)})
        row["status"] = status
        if result:
            row["epoch"] = result.get(names.EPOCH, row.get("epoch"))
            shown = result.get(self.metric)
            row[self.metric] = shown if isinstance(shown, (int, float)) else None
            row["stage"] = result.get(names.STAGE)  # a chain's stage: shown, but only its last stage counts
            value = self.ranking.value(result)  # None in a chain's earlier stages: they do not count for "best"
            if value is not None and self.ranking.as_good(value, row.get("best")):
                row["best"] = value
        if status in self.ENDED:  # out of the running rows: counted, and kept only among the best
            self._rows.pop(trial.trial_id, None)
            self._last_line.pop(trial.trial_id, None)
            self._ended[status] += 1
            self._keep_if_best(trial.trial_id, row)
        return row

    def _keep_if_best(self, trial_id: str, row: dict[str, Any]) -> None:
        ranked = self.ranking.sort(
            [{**row, "trial_id": tid} for tid, row in [*self._best, (trial_id, row)]], key="best"
        )
        self._best = [(r["trial_id"], r) for r in ranked[: self.BEST_ENDED]]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._show(trial, self._set(trial, "running"), "started")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        self._show(trial, self._set(trial, "running", result), "result")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        row = self._set(trial, "early_stopped" if stopped_early(trial.last_result) else "completed")
        self._show(trial, row, "ended", force=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._show(trial, self._set(trial, "failed"), "ended", force=True)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self._live is not None:
            self._draw(force=True)
            self._live.stop()
            self._live = None


def _short(config: dict[str, Any]) -> str:
    parts = []
    for key, value in config.items():
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    return " ".join(parts)
