"""W&B runs, one per trial, grouped by experiment. Offline unless the user has a key or logged in.

Plain `wandb.init(mode=..., dir=...)` per trial from the Tune driver (Ray's WandbLoggerCallback refuses to
start without an API key even in offline mode). Offline runs land in `<storage>/<experiment>/wandb/`, ready
for `wandb sync`. raycls never writes the API key anywhere: it is read from the environment by wandb itself.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from raycls.config.experiment import WandbSection
from raycls.evaluate import figures
from raycls.results.background import BackgroundTracker

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


def open_run(settings: WandbSection, mode: str, folder: Path, *, requirements: bool = True, **init: Any) -> Any:
    """`wandb.init` as raycls opens every run (a trial's, the report's): silent, no code, no system stats.

    `requirements`: W&B lists every installed package into the run's requirements.txt, reading each one's
    metadata (~0.2 s of the driver's CPU per run, beside running trials): the experiment's report run keeps
    the list, its trial runs (same process, same packages) skip it.

    An offline run sends nothing: W&B's SDK otherwise starts its own telemetry exporter to W&B's servers
    (two OpenTelemetry threads, flushed when the process exits) even for offline runs; its documented
    switch, WANDB_ERROR_REPORTING=false, is set unless the user set it."""
    import wandb

    if mode == "offline":
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    folder.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=settings.project,
        entity=settings.entity,
        tags=settings.tags,
        dir=str(folder),
        mode=mode,
        reinit="create_new",  # several runs are open at once in the driver (one per running trial)
        resume="allow",  # a resumed experiment continues the same run
        settings=wandb.Settings(
            silent=True, console="off", save_code=False, x_disable_stats=True, x_save_requirements=requirements
        ),
        **init,
    )


def scrub(config: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if any(m in k.lower() for m in SECRET_MARKERS) else v) for k, v in config.items()}


# W&B's confusion chart is a table of classes x classes rows: 10,000 at 100 classes, a million at 1,000 (a
# trial's run would carry that table; confusion_matrix.csv stays in the evaluation folder either way).
CONFUSION_CHART_CLASSES = 100


def evaluation_media(folder: Path) -> dict[str, Any]:
    """A trial's evaluation as W&B media: each picture drawn with it (`eval/<name>`: an image), and the
    default suite's tables as W&B's own charts, which W&B draws (`eval/confusion_matrix`,
    `eval/reliability`, `eval/reliability_ts`: interactive, and nothing for the trial to draw)."""
    import wandb

    media: dict[str, Any] = {f"eval/{p.stem}": wandb.Image(str(p)) for p in sorted(folder.glob("*.png"))}
    matrix = figures.confusion(folder)
    if matrix is not None and "eval/confusion_matrix" not in media and len(matrix[0]) <= CONFUSION_CHART_CLASSES:
        classes, counts = matrix
        cells = [(t, p, n) for t, row in enumerate(counts) for p, n in enumerate(row)]
        media["eval/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=[t for t, _, n in cells for _ in range(n)],
            preds=[p for _, p, n in cells for _ in range(n)],
            class_names=classes,
            title="confusion matrix",
        )
    for name, table in (("reliability", figures.RELIABILITY_CSV), ("reliability_ts", figures.RELIABILITY_TS_CSV)):
        bins = figures.reliability(folder, table)
        if bins is None or f"eval/{name}" in media:
            continue
        points = [[c, a] for c, a in zip(bins.confidence, bins.accuracy) if math.isfinite(c) and math.isfinite(a)]
        media[f"eval/{name}"] = wandb.plot.line(
            wandb.Table(columns=["confidence", "accuracy"], data=points),
            "confidence",
            "accuracy",
            title=f"{name.replace('_', ' ')}: accuracy per confidence bin (perfect calibration: the diagonal)",
        )
    return media


class TrialRun:
    """A W&B run for one trial; every method is a no-op when mode is `disabled`."""

    def __init__(
        self, settings: WandbSection, mode: str, folder: Path, *, experiment: str, trial_id: str, config: dict[str, Any]
    ):
        self.run = None
        if mode == "disabled":
            return
        self.run = open_run(
            settings,
            mode,
            folder,
            group=experiment,
            name=trial_id,
            id=f"{experiment}-{trial_id}"[:64].replace("/", "-"),
            config=scrub(config),
            requirements=False,  # the report's run of the experiment lists the packages
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, step=step)

    def finish(self, summary: dict[str, Any], *, failed: bool = False, evaluation: Path | None = None) -> None:
        if self.run is None:
            return
        if evaluation is not None:
            media = evaluation_media(evaluation)
            if media:
                self.run.log(media)
        for key, value in summary.items():
            if value is not None and isinstance(value, (int, float, str, bool)):
                self.run.summary[key] = value
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None


class WandbWriter(BackgroundTracker):
    """All W&B calls of a search, on one background thread, in order (`wandb.init` and `run.finish` take
    about a second each); no thread at all when the mode is `disabled`."""

    label = "W&B"

    def __init__(self, settings: WandbSection, mode: str, folder: Path, *, experiment: str):
        self.settings, self.mode, self.folder, self.experiment = settings, mode, folder, experiment
        super().__init__(enabled=mode != "disabled")

    def open_run(self, trial_id: str, config: dict[str, Any]) -> TrialRun:
        return TrialRun(
            self.settings, self.mode, self.folder, experiment=self.experiment, trial_id=trial_id, config=config
        )

    def finish_run(
        self, trial_id: str, run: TrialRun, summary: dict[str, Any], *, failed: bool, evaluation: Path | None
    ) -> None:
        run.finish(summary, failed=failed, evaluation=evaluation)
