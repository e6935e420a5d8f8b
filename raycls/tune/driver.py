"""`raycls tune`: assemble the Tuner (trainable, Optuna search, scheduler, storage, callbacks) and run it.

    Tuner(trainable, TuneConfig(OptunaSearch(define-by-run space), ASHA), RunConfig(storage, callbacks))

One Tune trial = one TrialConfig (the base config with the sampled values applied; `--set` wins over both).
Everything about a run lives under `<storage>/<experiment>/`: Tune's state (for `--resume`), the Optuna
journal, `leaderboard/`, `history/`, `wandb/` and, for multi-worker trials, `train_runs/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.tune

from raycls import names
from raycls.cluster.preflight import preflight, shared_storage_from_env
from raycls.cluster.resources import trial_bundle
from raycls.config.experiment import Experiment
from raycls.errors import RayclsError
from raycls.ranking import checkpoint_attribute
from raycls.results.leaderboard import SCORED_STATUSES, ReadResult, read_leaderboard
from raycls.results.provenance import git_state, write_space_as_run
from raycls.results.wandb_log import resolve_mode
from raycls.search import TRIAL_SCHEDULERS, population_based
from raycls.storage import ExperimentPaths, journal_file
from raycls.tune.cluster import cluster_nodes
from raycls.tune.ledger import EndedTrialTrimmer, TrialLedger, record_told_trials
from raycls.tune.live import LiveTable
from raycls.tune.resume import ResumeMode, ResumePlan, SnapshotKeeper, prepare_resume, reconcile_study
from raycls.tune.searcher import open_study_storage, search_algorithm
from raycls.tune.start import StartedSearch, TuneOptions, start_search
from raycls.tune.stop import SearchEnd, SearchStopper, clear_end, read_end
from raycls.tune.trainable import tune_trainable


@dataclass(frozen=True)
class TuneOutcome:
    experiment_dir: str
    leaderboard: ReadResult
    trials: int
    errors: int
    ended: SearchEnd | None = None  # the search ended before its trials: a time budget or a target reached

    def none_completed(self) -> str | None:
        """Why the search has nothing to show (no trial ended completed or early_stopped with a score), said
        with the first error; None when one did. The CLI exits non-zero on it, so CI and schedulers can tell."""
        rows = self.leaderboard.table.to_pylist()
        if any(r["status"] in SCORED_STATUSES and r.get("score") is not None for r in rows):
            return None
        failed = [r for r in rows if r["status"] == "failed"]
        first = next((r["error"] for r in failed if r.get("error")), None)
        ended = f"{len(failed)} failed" + (
            f", {len(rows) - len(failed)} without a score" if len(rows) > len(failed) else ""
        )
        return f"no trial completed: {ended or 'no trial ran'}" + (f" (first error: {first})" if first else "")


def run_tune(experiment: Experiment, options: TuneOptions, started: StartedSearch | None = None) -> TuneOutcome:
    """`started`: the checks and the Ray the caller began (`raycls tune`: Ray comes up while this module is
    imported); None: both happen here, Ray on this thread."""
    # Tune warns whenever checkpoints force experiment snapshots (every epoch here, by design: a trial's
    # best-k checkpoints must stay consistent with the experiment state that --resume reads).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own per-trial CSV and TensorBoard files repeat the leaderboard, W&B and the report; building
    # the TensorBoard writer alone imports tensorboardX (1.6 s) before the first trial starts. The JSON log
    # (result.json) stays: Tune's results and `raycls cluster status` read it. "0" brings the others back.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    started = started or start_search(experiment, options, background=False)
    experiment, storage, resources = started.experiment, started.storage, started.experiment.experiment.resources
    wandb_mode = resolve_mode(options.wandb_mode or experiment.wandb.mode)  # auto: online with a key
    if started.ray.in_background:  # else Ray is up already: nothing to overlap
        _import_ahead(wandb_mode)
    started.ray.wait()
    shared = shared_storage_from_env() if options.shared_storage is None else options.shared_storage
    # Refuse what Ray would only punish later (node-local storage on several nodes, workers no node holds).
    plan = preflight(
        resources, storage, cluster_nodes(), concurrency=experiment.experiment.concurrency, shared_storage=shared
    )
    concurrency = min(plan.concurrency, experiment.experiment.trials)

    paths = ExperimentPaths(storage, experiment.name)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(tune_trainable, experiment_json=experiment.model_dump_json(), storage=storage),
        trial_bundle(resources, pin_on_demand=plan.pin_on_demand),
    )
    errors = _fit(experiment, options, paths, trainable, concurrency, wandb_mode)
    if experiment.base.eval.on == "all":
        _evaluate_stopped(experiment, storage)
    board = read_leaderboard(storage, experiment.name)
    _reconcile(experiment, paths.state_dir, board)
    return TuneOutcome(paths.root, board, board.table.num_rows, errors, read_end(paths.state_dir))


def _import_ahead(wandb_mode: str) -> None:
    """What the search would otherwise import between `Tuner.fit` and its first trial, imported while Ray is
    still starting (`raycls tune` starts it on a thread of its own): Tune counts the callbacks it is given,
    for Ray's usage statistics, by importing its own MLflow integration (`import mlflow`: 1.4 s here, MLflow
    unused), and the W&B writer's first run imports wandb (about 1 s), holding the driver's interpreter."""
    import importlib

    for module in ("ray.air.integrations.mlflow", "wandb" if wandb_mode != "disabled" else None):
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:  # not installed: then Tune and the writer do without it too
            pass


def _fit(
    experiment: Experiment,
    options: TuneOptions,
    paths: ExperimentPaths,
    trainable: Any,
    concurrency: int,
    wandb_mode: str,
) -> int:
    """Run the search's trials, the one door for --resume: a fresh search, Tune's restore of an interrupted
    one, or a rebuilt search of the trials that have no row yet. Returns how many trials errored."""
    path, state = paths.root, paths.state_dir
    resume = _resume_plan(options, paths)
    if resume.mode is not ResumeMode.RESTORE:
        clear_end(state)  # a new run (or a continued one) ends for its own reasons
    if resume.note:
        print(f"resume: {resume.note}" if options.resume else resume.note)
    if resume.mode is ResumeMode.RESTORE:
        # Tune restores its callbacks, searcher and scheduler from the experiment folder; trials that were
        # running resume from their checkpoints, and those that already have a row end at once.
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        grid = tuner.fit()
        errors = sum(1 for r in grid if r.error is not None)
    else:
        # A new experiment, or one whose Tune state was lost: run the trials that have no row yet (a trial
        # Optuna already closed counts as done: its row is written from its folder first).
        if options.resume:
            _record_told(experiment, paths)
        remaining = experiment.experiment.trials - (len(paths.trial_ids()) if options.resume else 0)
        if options.resume:
            experiment = _without_evaluated_points(
                experiment, read_leaderboard(paths.storage, experiment.name).table.to_pylist()
            )
        errors = 0
        if remaining > 0:
            tuner = _new_tuner(
                experiment, options, paths, trainable, min(concurrency, remaining), remaining, wandb_mode
            )
            grid = tuner.fit()
            errors = sum(1 for r in grid if r.error is not None)
    if resume.mode is ResumeMode.RESTORE:
        # Tune may restore a trial Optuna closed as ended, without its row (a rebuilt search wrote them first).
        _record_told(experiment, paths)
    return errors


def _without_evaluated_points(experiment: Experiment, rows: list[dict]) -> Experiment:
    """`search.points_to_evaluate` less those a row already has: a rebuilt search must not queue them again."""

    def evaluated(point: dict) -> bool:
        return any(all(row.get(k) == v for k, v in point.items()) for row in rows)

    points = [p for p in experiment.search.points_to_evaluate if not evaluated(p)]
    return experiment.model_copy(update={"search": experiment.search.model_copy(update={"points_to_evaluate": points})})


def _resume_plan(options: TuneOptions, paths: ExperimentPaths) -> ResumePlan:
    if not options.resume:
        had = len(paths.trial_ids())
        # Like Optuna's load_if_exists: a second run of a name adds its trials to the same leaderboard and
        # study (TPE learns from the first run's). Said, since a user may have meant --resume or a new name.
        note = (
            f"{paths.root} already has {had} trial row(s): adding this run's trials to the same leaderboard "
            "and Optuna study (--resume finishes an interrupted run instead; a new experiment.name starts apart)"
        )
        return ResumePlan(ResumeMode.START, note=note if had else "")
    end = read_end(paths.state_dir)
    if end is not None:
        # Tune's run ended on purpose: its trials are all closed, and a restore would re-arm the old stop.
        return ResumePlan(
            ResumeMode.REBUILD, note=f"the last run ended early ({end.detail}): running the trials that have no row yet"
        )
    plan = prepare_resume(paths.folder, can_restore=ray.tune.Tuner.can_restore(paths.root))
    if plan.mode is ResumeMode.START:
        return ResumePlan(ResumeMode.START, note=f"nothing to resume at {paths.root}: starting the experiment")
    return plan


def _evaluate_stopped(experiment: Experiment, storage: str) -> None:
    """`eval.on: all`: trials ASHA stopped never reached their own evaluation; the driver evaluates them."""
    from raycls.train.evaluation import evaluate_rows

    rows = [
        r
        for r in read_leaderboard(storage, experiment.name).table.to_pylist()
        if r["status"] == "early_stopped" and r.get("checkpoint") and not r.get(names.EVAL_SPLIT)
    ]
    if rows:
        print(f"eval.on=all: evaluating {len(rows)} early-stopped trial(s) in the driver")
        evaluate_rows(storage, experiment.name, rows, draw=experiment.base.eval.trial_plots)


def _study(experiment: Experiment, state: Path) -> optuna.Study | None:
    """The experiment's Optuna study, when its journal holds one."""
    journal = journal_file(state)
    if not journal.is_file():
        return None
    try:
        return optuna.load_study(study_name=experiment.name, storage=open_study_storage(journal))
    except KeyError:  # no study of this name in the journal (nothing was ever asked)
        return None


def _record_told(experiment: Experiment, paths: ExperimentPaths) -> None:
    """Rows for the trials Optuna closed but a killed driver left without one (see record_told_trials)."""
    study = _study(experiment, paths.state_dir)
    if study is not None:
        told = record_told_trials(experiment, paths, study, git_state(experiment.source))
        if told:
            print(f"resume: wrote the rows of {len(told)} trial(s) that ended before the kill: {', '.join(told)}")


def _reconcile(experiment: Experiment, state: Path, board: ReadResult) -> None:
    """Every trial has ended: Optuna's trials take their rows' states (see raycls.tune.resume)."""
    study = _study(experiment, state)
    if study is not None:
        reconcile_study(study, board.table.select(["trial_id", "status", "score"]).to_pylist())


def _new_tuner(
    experiment: Experiment,
    options: TuneOptions,
    paths: ExperimentPaths,
    trainable,
    concurrency: int,
    trials: int,
    wandb_mode: str,
):
    section, storage, state = experiment.experiment, paths.storage, paths.state_dir
    warm = experiment.search.warm_start
    warm_dir = ExperimentPaths(storage, warm).state_dir if warm else None
    if warm_dir is not None and not journal_file(warm_dir).is_file():
        raise RayclsError(f"search.warm_start: no Optuna study for experiment {warm!r} at {journal_file(warm_dir)}")
    write_space_as_run(experiment, storage)  # `raycls tune <experiment>/space.yaml` runs this search again
    callbacks = [
        TrialLedger(experiment, storage, state, wandb_mode, git_state(experiment.source)),
        ray.tune.logger.JsonLoggerCallback(),
    ]
    if paths.folder is not None:  # object stores write whole objects: Tune's own snapshot cannot be cut short
        callbacks.append(SnapshotKeeper(paths.folder))
    if options.live:
        callbacks.append(LiveTable(experiment.name, section.metric, section.mode, trials))
    score_key = checkpoint_attribute(section.metric, len(experiment.base.stages))
    if options.bounded_state:  # last: every callback before it has read the ended trial whole
        callbacks.append(EndedTrialTrimmer(frozenset({section.metric, score_key, names.EPOCH})))
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            metric=section.metric,
            mode=section.mode,
            # raycls's Optuna search behind its own concurrency limit (or PBT's population: raycls.tune.searcher)
            search_alg=search_algorithm(experiment, state, warm_dir, concurrency, trials),
            scheduler=TRIAL_SCHEDULERS.create(experiment.scheduler.name, experiment),
            num_samples=trials,
            max_concurrent_trials=None,  # search_algorithm limits it
            # A trial actor that ends is reused for the next trial: no new Python process, and torch,
            # sklearn and raycls are imported once per actor instead of once per trial (seconds each).
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=experiment.name,
            storage_path=storage,
            callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=section.max_failures),
            checkpoint_config=ray.tune.CheckpointConfig(
                # PBT / PB2 restore other trials' checkpoints, maybe epochs later: none is deleted under them.
                num_to_keep=None if population_based(experiment.scheduler.name) else section.keep_checkpoints,
                # A chain's epochs rank later stages first (names.CHAIN_SCORE): its product is its last stage.
                checkpoint_score_attribute=score_key,
                checkpoint_score_order=section.mode,
            ),
            verbose=0 if options.live else 1,
            stop=SearchStopper(experiment, state) if section.time_budget_s or section.stop else None,
        ),
    )
