"""Optuna samplers raycls adjusts for Tune's ask-and-tell loop. Module level, so Tune's searcher checkpoint
(plain pickle) can save them; loaded by raycls.search's factories only when a search is built."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler calls `Study.stop` once the grid is used up, which works only inside
    `study.optimize`; Tune asks and tells, so every grid search warned. `experiment.trials` (checked against
    the grid's size before any trial, raycls.search.check_search) is what ends a search: the stop is left out."""

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        return None
