"""YAML -> Experiment / TrialConfig; the search-space DSL; `--set` overrides; errors with file and key."""

from raycls.config.experiment import Experiment, Resources
from raycls.config.load import load_experiment, parse_overrides, resolve_trial
from raycls.config.schema import (
    PHASE_CONFIGS,
    AugmentConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PhaseConfig,
    SupervisedConfig,
    TrainConfig,
    TrialConfig,
)
from raycls.config.space import Space, suggest

__all__ = [
    "PHASE_CONFIGS",
    "AugmentConfig",
    "DataConfig",
    "EvalConfig",
    "Experiment",
    "ModelConfig",
    "PhaseConfig",
    "Resources",
    "Space",
    "SupervisedConfig",
    "TrainConfig",
    "TrialConfig",
    "load_experiment",
    "parse_overrides",
    "resolve_trial",
    "suggest",
]
