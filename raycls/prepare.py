"""From a search-space file to an Experiment ready to run: one path for `raycls tune`, `raycls train`,
`raycls space validate` and `run_tune`, so each checks the same things in the same order.

    load the YAML (--set applied, once) -> the fast-dev-run variant -> every stage reports the metric
    -> leaderboard references resolved (teacher / init: {from: EXPERIMENT, pick: best})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raycls.config import load_experiment, parse_overrides
from raycls.config.experiment import Experiment
from raycls.errors import ConfigError
from raycls.phases.base import check_experiment_metric, check_objectives, check_stages
from raycls.results.references import resolve_references
from raycls.search import check_search


def prepare_experiment(
    source: str | Path | Experiment,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    storage: str | None = None,
    fast_dev_run: bool = False,
) -> Experiment:
    """`storage`: where references are looked up (None: left unresolved, as `space validate` does)."""
    if isinstance(source, Experiment):
        experiment = source
    else:
        pinned = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides or []))
        experiment = load_experiment(source, pinned)
    if fast_dev_run:  # one epoch per stage; the loop runs two batches per split
        experiment = experiment.as_fast_dev_run()
    # Before anything starts: a chain whose stages do not all report the experiment metric is refused.
    check_experiment_metric(experiment)
    check_objectives(experiment)  # objectives and stop targets name metrics a trial reports
    check_search(experiment)  # a grid enumerates choices, and has enough of them
    check_stages(experiment)  # what each phase can run on (token_distill: ViTs only)
    check_loader(experiment)  # data.loader: stream reads image files only
    return resolve_references(experiment, storage) if storage is not None else experiment


def check_loader(experiment: Experiment) -> None:
    """`data.loader: stream` on a dataset held as arrays (MNIST, CIFAR) is refused before any trial starts."""
    from raycls.data.datasets import DATASETS
    from raycls.data.splits import streamable

    data = experiment.base.data
    if data.loader == "stream" and DATASETS.get(data.name).list_files is None:
        raise ConfigError([f"data.loader: stream needs a dataset of image files ({', '.join(streamable())}); "
                           f"data.name {data.name!r} is read into memory whole: use loader memory or auto"],
                          source=experiment.source)  # fmt: skip
