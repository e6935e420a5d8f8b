"""Sample the space without Ray: `raycls space validate` and tests resolve sampled configs through here."""

from __future__ import annotations

from typing import Any

from raycls.config.experiment import Experiment
from raycls.config.load import resolve_trial
from raycls.config.schema import TrialConfig
from raycls.config.space import suggest


def sample_configs(experiment: Experiment, n: int, *, seed: int = 0) -> list[tuple[dict[str, Any], TrialConfig]]:
    """`n` random parameter sets (an in-memory Optuna study) and the TrialConfig each resolves to."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    pinned = experiment.overrides
    samples = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, experiment.space, fixed=pinned)
        samples.append((params, resolve_trial(experiment, params)))
        study.tell(trial, 0.0)
    return samples
