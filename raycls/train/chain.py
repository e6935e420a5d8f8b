"""A trial's chain of stages (supcon > arcface > distill), run one after another on the same worker.

Each stage starts from the previous stage's best weights (hand-over); epochs are numbered over the whole
chain (ASHA's time axis); each epoch of a chain also reports its stage's label and every finished stage's
metrics at its best epoch (`supcon.val_knn_acc`). A checkpoint records where in the chain it was taken
(`Position`) and, while more stages follow, the current stage's best weights so far (`carry.pt`), so a
trial resumes mid-chain. A single-phase trial is a chain of one stage.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch.nn as nn

from raycls import names
from raycls.config.schema import Stage, TrialConfig
from raycls.errors import CheckpointError
from raycls.evaluate.cost import measure_cost
from raycls.models.checkpoint import load_weights, unwrap
from raycls.phases import PHASES, Phase
from raycls.phases.base import Previous
from raycls.train.loop import Metrics, Reporter, RunContext, StageRun, load_data, train_stage
from raycls.train.state import Best, Position, Weights, read_best, read_metrics, read_position

# Images per batch for the batch-N latency (the stage's eval batch size, capped: this is a measurement, not a
# throughput benchmark, and it runs at the end of every trial).
COST_BATCH = 64


def fit(config: TrialConfig, report: Reporter, ctx: RunContext | None = None) -> list[Metrics]:
    """Train one trial (every stage of its chain, in order) on this worker; returns every epoch's metrics."""
    ctx = ctx or RunContext()
    runner = ChainRunner(config, report, ctx)
    position = read_position(ctx.resume_from) if ctx.resume_from else Position()
    runner.finished = dict(position.finished)
    stages = config.stages
    runner.evaluating = ctx.eval_dir is not None and config.eval.on != "none"
    handover = initial_weights(config)  # then each stage's best weights, for the next stage
    try:
        for index, stage in enumerate(stages):
            if index < position.stage:
                continue
            resume = ctx.resume_from if index == position.stage and position.epoch >= 0 else None
            if resume is not None and position.epoch + 1 >= stage.train.epochs:
                # The checkpoint closed this stage: the next one starts from its best, saved beside it.
                handover = read_best(resume, _phase_class(stage).metric).weights
                continue
            # Resuming mid-stage, the checkpoint holds the whole stage (a teacher too): nothing to hand over.
            previous = Previous.of(stages, index, None if resume is not None else handover)
            # A stage of another architecture than the previous one's starts fresh: that stage teaches it instead.
            fresh = resume is not None or (previous is not None and previous.model is not None)
            init = None if fresh else handover
            handover = runner.run_stage(
                index,
                stage,
                init=init,
                previous=previous,
                resume_from=resume,
                start=position.epoch + 1 if resume else 0,
            )
        if not runner.history and ctx.resume_from is not None:
            # Resumed from the checkpoint of the last epoch (the trial ended, the driver did not hear of it):
            # report that epoch again, so the driver, the scheduler and the searcher see the trial's true end
            # rather than the older result their snapshot holds.
            if runner.evaluating:
                # The last stage's best weights, saved beside the checkpoint; one written before raycls
                # kept them is evaluated as it is.
                runner.evaluate(handover if handover is not None else load_weights(ctx.resume_from))
            final = read_metrics(ctx.resume_from)
            report(final, None)
            runner.history.append(final)
    finally:
        shutil.rmtree(runner.scratch, ignore_errors=True)
    return runner.history


def initial_weights(config: TrialConfig) -> Weights | None:
    if config.init is None:
        return None
    if not isinstance(config.init, str):
        raise CheckpointError(
            f"init {config.init}: a leaderboard reference must be resolved by the driver "
            "(raycls tune / raycls train) before the trial starts"
        )
    return load_weights(config.init)


def _phase_class(stage: Stage) -> type[Phase]:
    return PHASES.get(stage.phase.name)


class ChainRunner:
    """Runs a trial's stages one after another through `train_stage`, keeping every epoch's metrics."""

    def __init__(self, config: TrialConfig, report: Reporter, ctx: RunContext):
        self.config, self.report, self.ctx = config, report, ctx
        self.entered = time.perf_counter()
        self.data = load_data(config)
        self.stages = config.stages
        self.chained = len(self.stages) > 1
        self.finished: dict[str, dict[str, float]] = {}  # stage label -> its metrics at its best epoch
        self.history: list[Metrics] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="raycls-ckpt-"))
        self.evaluating = False  # the last stage's best weights are evaluated when the chain ends

    def run_stage(
        self,
        index: int,
        stage: Stage,
        *,
        init: Weights | None,
        previous: Previous | None,
        resume_from: Path | None,
        start: int,
    ) -> Weights | None:
        """Train one stage; returns its best weights (the whole phase module's) when a later stage needs them."""
        run = StageRun(
            index=index,
            offset=sum(s.train.epochs for s in self.stages[:index]),
            init=init,
            previous=previous,
            resume_from=resume_from,
            start=start,
            # The best weights go on to the next stage, or to the held-out evaluation after the last one.
            keep_best=index + 1 < len(self.stages) or self.evaluating,
            entered=time.perf_counter() if self.history else self.entered,  # the first stage also loaded the data
            scratch=self.scratch / "checkpoint",
            annotate=(lambda metrics, best, last: self._chain_metrics(stage, metrics, best, last=last))
            if self.chained
            else None,
            finished=self.finished,
            on_last_epoch=self._last_epoch if index + 1 == len(self.stages) else None,
        )
        best = train_stage(self.config, stage, self.data, self.ctx, self._report, run)
        return best.weights

    def _last_epoch(self, best: Best, model: nn.Module, phase: Phase) -> Metrics:
        """The trial's last epoch: what its model costs to run and, when evaluating, its held-out metrics,
        both reported with the epoch (a multi-objective search is told them)."""
        stage = self.stages[-1]
        started = time.perf_counter()
        cost = measure_cost(
            unwrap(model),
            lambda x: phase.outputs(unwrap(model), x),
            channels=self.data.spec.in_chans,
            image_size=self.config.data.image_size or self.data.splits.train.size,
            batch_size=min(stage.train.eval_batch_size, COST_BATCH),
            device=self.ctx.device,
        )
        cost[names.COST_S] = time.perf_counter() - started
        if not self.evaluating:
            return cost
        # A stage whose metric was never reported (NaN-free but missing) has no best: its last weights.
        weights = (
            best.weights
            if best.weights is not None
            else {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
        )
        return {**cost, **self.evaluate(weights)}

    def evaluate(self, weights: Weights) -> Metrics:
        """The held-out evaluation of the trial's best weights (raycls.train.evaluation), on every worker;
        returns its numeric `test_*` metrics."""
        from raycls.train.evaluation import evaluate_weights

        summary = evaluate_weights(
            self.config, weights, self.data, self.ctx, out_uri=self.ctx.eval_dir, draw=self.config.eval.trial_plots
        )
        return {
            k: float(v)
            for k, v in summary.get("metrics", {}).items()
            if k.startswith(names.EVAL_PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    def _report(self, metrics: Metrics, checkpoint: Path | None) -> None:
        self.report(metrics, checkpoint)
        self.history.append(metrics)

    def _chain_metrics(self, stage: Stage, metrics: Metrics, best: Best, *, last: bool) -> Metrics:
        """A chain's epoch also says its stage and, from each finished stage, its metrics at its best epoch."""
        if last:
            self.finished[stage.label] = {
                k: v for k, v in best.metrics.items() if k.startswith("val_") or k == names.EPOCH
            }
        kept = {names.stage_metric(label, k): v for label, done in self.finished.items() for k, v in done.items()}
        index = [s.label for s in self.stages].index(stage.label)
        return {
            **metrics,
            names.STAGE: stage.label,
            names.STAGE_INDEX: index,
            names.STAGE_COUNT: len(self.stages),
            **kept,
        }
