"""One background thread per tracker (W&B, MLflow): every call of a search to it runs there, in order.

Opening and finishing a tracker's run takes about a second; on the Tune driver's thread that would stall
scheduling for every trial. A failing call is reported once per trial and turns the tracker off for that
trial; it never stops the search (a tracker mirrors the leaderboard, which stays the record).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


class BackgroundTracker:
    """start / log / finish / close for one tracker; a subclass says how to open and finish one trial's run.

    A subclass sets `label` (for messages) and implements `open_run` and `finish_run`; its run objects have
    `log(metrics, step)`. `enabled=False` makes every call a no-op (no thread is started).
    """

    label = "tracker"

    def __init__(self, *, enabled: bool = True):
        self.runs: dict[str, Any] = {}  # filled on the background thread
        self.started: set[str] = set()  # filled on the caller's thread
        self.failed: set[str] = set()
        self._pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"raycls-{self.label.lower()}") if enabled else None
        )

    def open_run(self, trial_id: str, config: dict[str, Any]) -> Any:
        raise NotImplementedError

    def finish_run(
        self, trial_id: str, run: Any, summary: dict[str, Any], *, failed: bool, evaluation: Path | None
    ) -> None:
        raise NotImplementedError

    def _submit(self, trial_id: str, fn: Callable[[], None]) -> None:
        if self._pool is None:
            return

        def call() -> None:
            if trial_id in self.failed:
                return
            try:
                fn()
            except Exception as err:  # a mirror of the leaderboard: never let it break the search
                self.failed.add(trial_id)
                print(f"raycls: {self.label} logging for trial {trial_id} failed and is off for it: {err}")

        self._pool.submit(call)

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        if trial_id in self.started:  # a retried trial goes on logging to its first run
            return
        self.started.add(trial_id)

        def start() -> None:
            self.runs[trial_id] = self.open_run(trial_id, config)

        self._submit(trial_id, start)

    def log(self, trial_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        self._submit(trial_id, lambda: self.runs[trial_id].log(metrics, step) if trial_id in self.runs else None)

    def finish(
        self, trial_id: str, summary: dict[str, Any], *, failed: bool = False, evaluation: Path | None = None
    ) -> None:
        def finish() -> None:
            run = self.runs.pop(trial_id, None)
            if run is not None:
                self.finish_run(trial_id, run, summary, failed=failed, evaluation=evaluation)

        self._submit(trial_id, finish)

    def close(self) -> None:
        """Finish runs still open (an interrupted search) and wait for every queued call."""
        for trial_id in list(self.runs):
            self.finish(trial_id, {}, failed=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
