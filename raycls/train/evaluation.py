"""A trial's best weights through the evaluation suite, on the trial's own workers (or in `raycls eval`).

    weights -> the last stage's phase module -> raycls.evaluate.suite -> metrics.json + files -> eval folder

Rank 0 writes the suite's files to a local temp folder; the whole folder then replaces the trial's
`<storage>/<experiment>/eval/<trial_id>/` (a rename on local storage, a copy on object storage): a reader
never sees half an evaluation, and evaluating again replaces it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raycls.config.schema import Stage, TrialConfig
from raycls.evaluate.suite import Evaluation, run_suite
from raycls.files import replace_dir
from raycls.models import load_weights, unwrap
from raycls.phases.base import Previous
from raycls.storage import absolute, filesystem, is_local
from raycls.train.distributed import broadcast_from_rank0
from raycls.train.loop import Data, Parts, RunContext, build
from raycls.train.state import STATE_FILE, Weights, read_position


def evaluate_weights(
    config: TrialConfig,
    weights: Weights,
    data: Data,
    ctx: RunContext,
    *,
    out_uri: str | None,
    suite: str | None = None,
    stage: int | None = None,
    draw: bool = True,
) -> dict[str, Any]:
    """Evaluate the whole phase module's `weights` (of chain stage `stage`, default the last) with `suite`
    (default: the config's), drawing the default suite's pictures when `draw`; returns the summary run_suite
    gives (metrics, split, suite). Every worker must call it."""
    stages = config.stages
    index = len(stages) - 1 if stage is None else stage
    parts = stage_model(config, weights, data, ctx, index)
    # Every rank scores its shard with rank 0's weights: the checkpoint's, and `raycls eval`'s afterwards.
    broadcast_from_rank0(unwrap(parts.model).state_dict().values())
    scratch = Path(tempfile.mkdtemp(prefix="raycls-eval-"))
    try:
        evaluation = Evaluation(
            model=parts.model,
            phase=parts.phase,
            splits=data.splits,
            config=config.eval,
            out=scratch / "eval",
            device=ctx.device,
            batch_size=stages[index].train.eval_batch_size,
            image_size=config.data.image_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=config.seed,
            data_config=config.data,
            augment=stages[index].augment,
            draw=draw,
        )
        summary = run_suite(evaluation, suite or config.eval.suite)
        if ctx.rank == 0 and out_uri is not None:
            publish(evaluation.out, out_uri)
        return summary
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stage_model(config: TrialConfig, weights: Weights, data: Data, ctx: RunContext, stage: int) -> Parts:
    """Chain stage `stage`'s phase module (model, phase, loaders) holding `weights`, the whole module's."""
    previous = Previous.of(config.stages, stage, None)  # a teacher's weights are in `weights`
    parts = build(config, without_downloads(config.stages[stage]), data, ctx, index=stage, previous=previous)
    unwrap(parts.model).load_state_dict(weights)
    return parts


def without_downloads(stage: Stage) -> Stage:
    """The stage with `pretrained: false` on its model and teacher model: every weight is about to come from
    the checkpoint, so `raycls eval/export/serve` neither download (nor need) the pretrained ones."""
    update: dict[str, Any] = {"model": stage.model.model_copy(update={"pretrained": False})}
    teacher = getattr(stage.phase, "teacher_model", None)
    if teacher is not None:
        update["phase"] = stage.phase.model_copy(
            update={"teacher_model": teacher.model_copy(update={"pretrained": False})}
        )
    return stage.model_copy(update=update)


def checkpoint_stage(uri: str) -> int | None:
    """The chain stage a checkpoint was taken in (None: a weights-only folder), without loading its weights."""
    with local_checkpoint(uri) as folder:
        return read_position(folder).stage if (folder / STATE_FILE).is_file() else None


def read_checkpoint(uri: str) -> tuple[Weights, int | None]:
    """A checkpoint's model weights and the chain stage it was taken in (None: a weights-only folder)."""
    with local_checkpoint(uri) as folder:
        return load_weights(folder), read_position(folder).stage if (folder / STATE_FILE).is_file() else None


def trial_rows(storage: str, experiment: str) -> list[dict[str, Any]]:
    """The experiment's leaderboard rows; a clear error when it has none (`raycls eval/export/predict/serve`)."""
    from raycls.errors import RayclsError
    from raycls.results import read_leaderboard

    rows = read_leaderboard(storage, experiment).table.to_pylist()
    if not rows:
        raise RayclsError(
            f"experiment {experiment!r}: no leaderboard rows under {storage.rstrip('/')}/{experiment}/leaderboard "
            "(run `raycls tune` first, or pass --storage)"
        )
    return rows


def publish(local: Path, uri: str) -> None:
    """Make `uri` hold exactly the files of folder `local`, replacing what was there."""
    if is_local(uri):
        target = Path(absolute(uri))
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(local, target)
        return
    fs, path = filesystem(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


# ------------------------------------------------------------------------------------ `raycls eval`
def pick_rows(rows: list[dict[str, Any]], pick: str, experiment: str) -> list[dict[str, Any]]:
    """`best`, `top:K` (by score, completed trials) or a trial id (any status with a checkpoint)."""
    from raycls.errors import ConfigError
    from raycls.ranking import NoCompletedTrial, PickError, Ranking

    usable = [r for r in rows if r.get("checkpoint") and r.get("config_json")]
    ranked = pick == "best" or pick.startswith("top:")
    try:
        picked = (
            Ranking.of(rows[0].get("metric") or "score", rows[0].get("mode")) if rows else Ranking.of("score", "max")
        )
        match = picked.pick(usable if ranked else rows, pick, what=f"experiment {experiment!r}: --trial")
    except NoCompletedTrial:
        if rows:  # rows exist, but none that a ranked pick may evaluate
            statuses = sorted({str(r.get("status")) for r in rows})
            raise ConfigError(
                f"experiment {experiment!r}: no completed trial with a checkpoint to evaluate "
                f"({len(rows)} row(s); statuses: {statuses})"
            ) from None
        raise ConfigError(f"experiment {experiment!r}: no leaderboard rows") from None
    except PickError as err:
        raise ConfigError(str(err)) from None
    if match[0] not in usable:
        raise ConfigError(f"--trial {pick!r}: the trial has no checkpoint to evaluate (status {match[0]['status']})")
    return match


def evaluate_rows(
    storage: str,
    experiment: str,
    rows: list[dict[str, Any]],
    *,
    suite: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    draw: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate each row's checkpoint in this process (drawing the pictures when `draw`); its
    `eval/<trial_id>/` folder and its row's evaluation columns are replaced. Returns each trial's summary."""

    import torch

    from raycls.config.load import config_of_row
    from raycls.results.leaderboard import update_evaluation
    from raycls.storage import ExperimentPaths
    from raycls.train.loop import load_data
    from raycls.train.steps import default_device

    paths = ExperimentPaths(storage, experiment)
    run_on = torch.device(device) if device else default_device()
    summaries = []
    for row in rows:
        config = config_of_row(row, overrides)
        weights, stage = read_checkpoint(row["checkpoint"])
        summary = evaluate_weights(
            config,
            weights,
            load_data(config),
            RunContext(device=run_on),
            out_uri=paths.eval_dir(row["trial_id"]),
            suite=suite,
            stage=stage,
            draw=draw,
        )
        update_evaluation(storage, experiment, row["trial_id"], summary)
        summaries.append({"trial_id": row["trial_id"], **summary})
    return summaries


class local_checkpoint:
    """A checkpoint URI as a local folder (object storage: copied to a temp folder for the duration)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        from raycls.errors import CheckpointError

        if is_local(self.uri):
            folder = Path(self.uri.removeprefix("file://"))
            if not folder.is_dir():
                raise CheckpointError(f"checkpoint {self.uri} does not exist (moved or deleted?)")
            return folder
        fs, path = filesystem(self.uri)
        self.tmp = Path(tempfile.mkdtemp(prefix="raycls-ckpt-"))
        pafs.copy_files(path, str(self.tmp), source_filesystem=fs)
        return self.tmp

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
