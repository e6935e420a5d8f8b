"""Everything a report draws, read once from the experiment's storage.

The leaderboard and history files are read as `raycls leaderboard` reads them (results.leaderboard): one small
Parquet file per trial, which is most of a report's time for thousands of trials.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycls import names
from raycls.errors import LeaderboardError, RayclsError
from raycls.evaluate.figures import draw_figures
from raycls.ranking import Ranking
from raycls.results.leaderboard import param_columns, read_leaderboard, stage_columns
from raycls.storage import EVAL_DIR, HISTORY_DIR, ExperimentPaths

if TYPE_CHECKING:
    import optuna

    from raycls.config.experiment import Experiment


@dataclass
class ReportData:
    experiment: str
    storage: str
    rows: list[dict[str, Any]]  # one per ended trial, in the order they ended
    histories: dict[str, list[dict[str, Any]]]  # trial_id -> its epochs, in order
    metric: str
    mode: str  # "max" or "min"
    params: list[str] = field(default_factory=list)  # sampled parameters' columns
    stages: list[str] = field(default_factory=list)  # a chain's per-stage metric columns
    space: Experiment | None = None  # the space as run (space.yaml); None when the experiment has none
    skipped: list[str] = field(default_factory=list)  # files that could not be read, and why
    drawn: Path | None = None  # where evaluation pictures missing from a trial's eval folder are drawn

    @property
    def paths(self) -> ExperimentPaths:
        return ExperimentPaths(self.storage, self.experiment)

    def scored(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if isinstance(r.get("score"), (int, float))]

    @property
    def ranking(self) -> Ranking:
        return Ranking.of(self.metric, self.mode)

    def ranked(self) -> list[dict[str, Any]]:
        """Rows with a score, best first."""
        return self.ranking.sort(self.scored())

    def better(self, a: float, b: float) -> bool:
        return self.ranking.better(a, b)

    def rungs(self) -> list[int]:
        """The epochs at which ASHA compared trials (its milestones below max_t); none for other schedulers."""
        if self.space is None or self.space.scheduler.name != "asha":
            return []
        section, max_t = self.space.scheduler, self.space.max_t
        rungs, t = [], float(section.grace_period)
        while t < max_t:
            rungs.append(round(t))
            t *= section.reduction_factor
        return rungs

    @cached_property
    def objectives(self) -> list[tuple[str, str]]:
        """A multi-objective experiment's (metric, mode) pairs, as its rows record them; [] otherwise."""
        from raycls.results.pareto import OBJECTIVES, parse_objectives

        text = next((r[OBJECTIVES] for r in reversed(self.rows) if r.get(OBJECTIVES)), None)
        return parse_objectives(text)

    def study_target(self) -> dict[str, Any]:
        """Keyword arguments that point Optuna's plots at one value: a multi-objective study's first objective."""
        if not self.objectives:
            return {}
        return {"target": lambda trial: trial.values[0], "target_name": self.objectives[0][0]}

    @cached_property
    def study(self) -> optuna.Study | None:
        """The experiment's own Optuna study (its journal), or None when there is none to load."""
        import optuna

        from raycls.storage import journal_file
        from raycls.tune.searcher import open_study_storage

        journal = journal_file(self.paths.state_dir)
        if not journal.is_file():
            return None
        try:
            return optuna.load_study(study_name=self.experiment, storage=open_study_storage(journal))
        except KeyError:
            return None

    def eval_images(self, trial_id: str) -> list[Path]:
        """The PNGs of the trial's held-out evaluation, when it has one on this machine: those drawn with it
        (raycls eval, `eval.trial_plots`), and the default suite's others drawn now from its tables into
        `drawn` (a search's trials write the tables only)."""
        folder = self.paths.folder
        if folder is None:
            return []
        evaluated = folder / EVAL_DIR / trial_id
        pictures = set(evaluated.glob("*.png"))
        if self.drawn is not None and evaluated.is_dir():
            pictures.update(draw_figures(evaluated, self.drawn / trial_id))
        return sorted(pictures, key=lambda p: p.name)


def timestamp(value: datetime | None) -> float:
    """Seconds since the epoch; a row without the time sorts last."""
    return value.timestamp() if isinstance(value, datetime) else float("inf")


def load_report_data(storage: str, experiment: str) -> ReportData:
    """The experiment's rows and histories (read as `raycls leaderboard` reads them); a LeaderboardError
    when it has no row at all."""
    paths = ExperimentPaths(storage, experiment)
    board = read_leaderboard(storage, experiment)
    if board.table.num_rows == 0:
        raise LeaderboardError(
            f"{paths.leaderboard_dir()}: no leaderboard rows of experiment {experiment!r} "
            f"(expected <trial_id>.parquet files written by `raycls tune`)"
        )
    epochs = read_leaderboard(storage, experiment, kind=HISTORY_DIR)
    histories: dict[str, list[dict[str, Any]]] = {}
    for epoch in epochs.table.to_pylist():
        histories.setdefault(epoch["trial_id"], []).append(epoch)
    for history in histories.values():
        history.sort(key=lambda h: h.get(names.EPOCH) or 0)
    rows = sorted(board.table.to_pylist(), key=lambda r: (timestamp(r.get("ended_at")), r["trial_id"]))
    first = rows[0]
    return ReportData(
        experiment,
        paths.storage,
        rows,
        histories,
        metric=str(first.get("metric") or "score"),
        mode=str(first.get("mode") or "max"),
        params=param_columns(board.table),
        stages=stage_columns(board.table),
        space=_space_as_run(paths),
        skipped=board.skipped + epochs.skipped,
    )


def _space_as_run(paths: ExperimentPaths) -> Experiment | None:
    """The experiment's space.yaml, loaded (its scheduler tells the ASHA rungs); None if absent or invalid."""
    from raycls.config.load import load_experiment

    if not paths.exists(paths.space_file()):
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "space.yaml"
            local.write_text(paths.read_text(paths.space_file()))
            return load_experiment(local)
    except (RayclsError, OSError):  # a space this raycls no longer reads: the report goes on without rungs
        return None
