"""W&B runs, one per trial, grouped by experiment. Offline unless the user has a key or logged in.

Plain `wandb.init(mode=..., dir=...)` per trial from the Tune driver (Ray's WandbLoggerCallback refuses to
start without an API key even in offline mode). Offline runs land in `<storage>/<experiment>/wandb/`, ready
for `wandb sync`. raycls never writes the API key anywhere: it is read from the environment by wandb itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raycls.config.experiment import WandbSection

# Keys whose values must never be logged (configs are checked before they reach W&B).
SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password", "credential")


def resolve_mode(requested: str) -> str:
    """auto -> online when WANDB_API_KEY is set or ~/.netrc has W&B credentials, else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def scrub(config: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if any(m in k.lower() for m in SECRET_MARKERS) else v) for k, v in config.items()}


class TrialRun:
    """A W&B run for one trial; every method is a no-op when mode is `disabled`."""

    def __init__(
        self, settings: WandbSection, mode: str, folder: Path, *, experiment: str, trial_id: str, config: dict[str, Any]
    ):
        self.run = None
        if mode == "disabled":
            return
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=experiment,
            name=trial_id,
            id=f"{experiment}-{trial_id}"[:64].replace("/", "-"),
            tags=settings.tags,
            config=scrub(config),
            dir=str(folder),
            mode=mode,
            reinit="create_new",  # several trials' runs are open at once in the driver
            resume="allow",  # a resumed experiment continues the same run
            settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, step=step)

    def finish(self, summary: dict[str, Any], *, failed: bool = False, images: dict[str, str] | None = None) -> None:
        if self.run is None:
            return
        if images:  # the evaluation's plots, one image each (reliability diagram, confusion matrix, ...)
            import wandb

            self.run.log({key: wandb.Image(path) for key, path in images.items()})
        for key, value in summary.items():
            if value is not None and isinstance(value, (int, float, str, bool)):
                self.run.summary[key] = value
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None


class WandbWriter:
    """All W&B calls of a search, on one background thread, in order.

    `wandb.init` and `run.finish` take about a second each; on the Tune driver's thread that would stall
    scheduling for every trial. A failing W&B call is reported once per trial and never stops the search.
    """

    def __init__(self, settings: WandbSection, mode: str, folder: Path, *, experiment: str):
        from concurrent.futures import ThreadPoolExecutor

        self.settings, self.mode, self.folder, self.experiment = settings, mode, folder, experiment
        self.runs: dict[str, TrialRun] = {}  # filled on the background thread
        self.started: set[str] = set()  # filled on the caller's thread
        self.failed: set[str] = set()
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="raycls-wandb") if mode != "disabled" else None
        )

    def _submit(self, trial_id: str, fn, *args: Any) -> None:
        if self._pool is None:
            return

        def call() -> None:
            if trial_id in self.failed:
                return
            try:
                fn(*args)
            except Exception as err:  # W&B is a mirror of the leaderboard: never let it break the search
                self.failed.add(trial_id)
                print(f"raycls: W&B logging for trial {trial_id} failed and is off for it: {err}")

        self._pool.submit(call)

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        if trial_id in self.started:  # a retried trial goes on logging to its first run
            return
        self.started.add(trial_id)

        def start() -> None:
            self.runs[trial_id] = TrialRun(
                self.settings, self.mode, self.folder, experiment=self.experiment, trial_id=trial_id, config=config
            )

        self._submit(trial_id, start)

    def log(self, trial_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        self._submit(trial_id, lambda: self.runs[trial_id].log(metrics, step) if trial_id in self.runs else None)

    def finish(
        self, trial_id: str, summary: dict[str, Any], *, failed: bool = False, images: dict[str, str] | None = None
    ) -> None:
        def finish() -> None:
            run = self.runs.pop(trial_id, None)
            if run is not None:
                run.finish(summary, failed=failed, images=images)

        self._submit(trial_id, finish)

    def close(self) -> None:
        """Finish runs still open (an interrupted search) and wait for every queued call."""
        for trial_id in list(self.runs):
            self.finish(trial_id, {}, failed=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
