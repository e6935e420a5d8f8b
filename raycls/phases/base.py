"""The phase interface. The training loop knows this interface only, never which phase runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn as nn

from raycls import names
from raycls.config.experiment import Experiment
from raycls.config.schema import ModelConfig, PhaseConfig, Stage
from raycls.errors import ConfigError
from raycls.evaluate.evaluators import DEFAULT_KNN_K, ClassifierMetrics, EmbeddingMetrics, Evaluator, Outputs
from raycls.models.registry import InputSpec, embed_and_classify
from raycls.registry import Registry

C = TypeVar("C", bound=PhaseConfig)
Batch = tuple[torch.Tensor, torch.Tensor]


# Extra logs of a training batch that the loop sums into the epoch's train_acc: a phase whose loss sees
# plain labels and class logits reports them (`training_hits`); one that mixes images has no accuracy.
TRAIN_CORRECT, TRAIN_SEEN = "train_correct", "train_seen"


def training_hits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's top-1 hits and images, detached (summed over the epoch into train_acc)."""
    correct = (logits.detach().argmax(-1) == labels).sum()
    return {TRAIN_CORRECT: correct, TRAIN_SEEN: torch.tensor(len(labels), device=labels.device)}


class Phase(ABC, Generic[C]):
    """One training objective: what it builds on the backbone (`build`) and its loss (`loss`).

    How it is evaluated is declared, not written: `evaluators` (raycls.evaluate.evaluators) turn what the
    model gives for a validation batch (`outputs`: by default a classifier's logits and its backbone's
    embeddings, from one pass) into metrics. A new classifier phase needs `build` and `loss`, little else.
    """

    # The metric this phase is judged by (a name from raycls.names).
    metric: ClassVar[str]
    # Augmented views of each training image per batch: batches arrive as [B, views, C, H, W] when > 1.
    views: ClassVar[int] = 1
    # What the phase is evaluated by. Every phase has embedding metrics (a chain's common yardstick);
    # phases that train a classifier add ClassifierMetrics.
    evaluators: ClassVar[tuple[type[Evaluator], ...]] = (ClassifierMetrics, EmbeddingMetrics)

    def __init__(self, config: C, spec: InputSpec, *, topk: int = 5, previous: Previous | None = None):
        self.config = config
        self.spec = spec
        # A chain's previous stage (its phase and best weights), for phases that build on more than its backbone.
        self.previous = previous
        # Top-k accuracy is reported beside top-1 (k capped at the number of classes).
        self.topk = min(topk, spec.num_classes)
        knn_k = getattr(config, "knn_k", DEFAULT_KNN_K)
        self.judges = [kind.for_phase(topk=self.topk, knn_k=knn_k) for kind in self.evaluators]

    def build(self, backbone: nn.Module) -> nn.Module:
        """The trainable module: the backbone plus whatever heads the phase needs."""
        return backbone

    def start(self, model: nn.Module, *, total_steps: int) -> None:
        """Called once the model is on its device, before the first step (schedules need the step count)."""

    def begin_epoch(self, epoch: int) -> None:
        """Called before each training epoch with its index within the stage (resumed stages too)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (EMA teachers update here). `model` is unwrapped."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss of one batch (and extra logs). `model` may be DDP-wrapped."""

    def outputs(self, model: nn.Module, x: torch.Tensor) -> Outputs:
        """What the model gives for one validation batch. Default: a classifier backbone's embeddings and
        logits from one pass through its trunk."""
        embeddings, logits = embed_and_classify(self.backbone(model), x)
        return Outputs(embeddings=embeddings, logits=logits)

    def eval_batch(self, model: nn.Module, batch: Batch) -> EvalBatch:
        """One validation batch: additive statistics (sums and counts, as 0-d tensors) and the backbone's
        embeddings of the images (one forward pass for both). The loop gathers every worker's embeddings."""
        x, y = batch
        out = self.outputs(model, x)
        sums: dict[str, torch.Tensor] = {}
        for judge in self.judges:
            sums.update(judge.batch_sums(out, y))
        return sums, out.embeddings

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Validation metrics from the statistics summed over all batches and workers."""
        return {k: v for judge in self.judges for k, v in judge.metrics(totals).items()}

    def embedding_metrics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics over the whole split's embeddings (all workers' together)."""
        return {k: v for judge in self.judges for k, v in judge.embedding_metrics(embeddings, labels).items()}

    def backbone(self, model: nn.Module) -> nn.Module:
        """The backbone inside the module `build` returned: what embeddings come from and what a chain hands
        on to its next phase. Wrappers (BackboneModel, DistillModel) expose it as `.backbone`; a bare
        classifier is its own backbone."""
        return getattr(model, "backbone", model)

    def classifier(self, model: nn.Module) -> nn.Module | None:
        """`model` (what `build` returned) as a module from images to class logits, for teaching another
        model; None when the phase trains no classifier."""
        return None

    @classmethod
    def check_stage(cls, stages: list[Stage], index: int) -> None:
        """Refuse (ConfigError) a stage this phase cannot run, before any trial starts. Default: no check."""

    @classmethod
    def reports(cls, topk: int) -> frozenset[str]:
        """The validation metrics this phase reports at every epoch (VAL_IMAGES is the loop's own)."""
        return frozenset({names.VAL_IMAGES}).union(*(kind.reports(topk) for kind in cls.evaluators))


EvalBatch = tuple[dict[str, torch.Tensor], torch.Tensor | None]


PHASES: Registry[type[Phase]] = Registry("phase")


@dataclass(frozen=True)
class Previous:
    """The stage before this one in a chain: its phase config, its best weights (the whole module's; None
    when a checkpoint of this stage is about to be restored over them), and its model when that is not this
    stage's architecture (a CNN teacher stage before a ViT student: the teacher is rebuilt as that model)."""

    phase: PhaseConfig
    weights: dict[str, torch.Tensor] | None
    model: ModelConfig | None = None

    @classmethod
    def of(cls, stages: list[Stage], index: int, weights: dict[str, torch.Tensor] | None) -> Previous | None:
        """Stage `index`'s previous stage, holding `weights`; None for the first stage."""
        if index == 0:
            return None
        before = stages[index - 1]
        return cls(before.phase, weights, None if before.model.same_architecture(stages[index].model) else before.model)


def create_phase(config: PhaseConfig, spec: InputSpec, *, topk: int = 5, previous: Previous | None = None) -> Phase:
    return PHASES.get(config.name)(config, spec, topk=topk, previous=previous)


def check_experiment_metric(experiment: Experiment) -> None:
    """Every stage must report the experiment's metric at every epoch: Tune rejects a result without it, and
    ASHA compares trials by it. A chain that starts with supcon (no classifier yet) ranks by val_knn_acc."""
    metric, topk, stages = experiment.experiment.metric, experiment.base.eval.val_topk, experiment.base.stages
    missing = [s.label for s in stages if metric not in PHASES.get(s.phase.name).reports(topk)]
    if missing:
        common = frozenset.intersection(*(PHASES.get(s.phase.name).reports(topk) for s in stages)) - {names.VAL_IMAGES}
        raise ConfigError(
            f"experiment.metric: {metric!r} is not reported by phase(s) {', '.join(missing)}; "
            f"every phase of {experiment.base.chain} reports: {', '.join(sorted(common))}",
            source=experiment.source,
        )


def check_objectives(experiment: Experiment) -> None:
    """Every objective is something a trial ends with: a metric its last stage reports each epoch, a
    held-out `test_*` metric (when trials are evaluated), or a cost (params, flops, latency_ms); every
    `stop` target is a metric each stage reports; every constraint names one of the first kinds."""
    section, base = experiment.experiment, experiment.base
    last = base.stages[-1]
    reported = PHASES.get(last.phase.name).reports(base.eval.val_topk)
    problems = []
    for index, objective in enumerate(section.objectives):
        metric = objective.metric
        if metric in reported or metric in names.COST_OBJECTIVES:
            continue
        if names.is_evaluation_metric(metric):
            if base.eval.on == "none":
                problems.append(
                    f"experiment.objectives.{index}.metric: {metric!r} is a held-out metric, and "
                    "eval.on is 'none' (trials are not evaluated)"
                )
            continue
        known = sorted(set(reported) - {names.VAL_IMAGES}) + ["test_acc", "test_...", *names.COST_OBJECTIVES]
        problems.append(
            f"experiment.objectives.{index}.metric: {metric!r} is not reported by phase {last.label}; "
            f"known: {', '.join(known)}"
        )
    every = frozenset.intersection(*(PHASES.get(s.phase.name).reports(base.eval.val_topk) for s in base.stages))
    problems += [
        f"experiment.stop.{metric}: not reported every epoch by every phase of {base.chain}; they report: "
        f"{', '.join(sorted(every - {names.VAL_IMAGES}))}"
        for metric in section.targets
        if metric not in every
    ]
    for index, constraint in enumerate(section.parsed_constraints):
        metric = constraint.metric
        if names.is_evaluation_metric(metric) and base.eval.on == "none":
            problems.append(f"experiment.constraints.{index}: {metric!r} is a held-out metric, and eval.on is 'none'")
        elif not (metric in reported or metric in names.COST_METRICS or names.is_evaluation_metric(metric)):
            known = sorted(set(reported) - {names.VAL_IMAGES}) + ["test_...", *names.COST_METRICS]
            problems.append(
                f"experiment.constraints.{index}: {metric!r} is not a metric trials end with; known: {', '.join(known)}"
            )
    if problems:
        raise ConfigError(problems, source=experiment.source)


def check_stages(experiment: Experiment) -> None:
    """Each stage of the base trial passes its phase's own check (token_distill: ViT student and teacher)."""
    stages = experiment.base.stages
    for index, stage in enumerate(stages):
        try:
            PHASES.get(stage.phase.name).check_stage(stages, index)
        except ConfigError as err:
            where = f"phases.{index} ({stage.label})" if experiment.base.phases else "phase"
            raise ConfigError([f"{where}: {problem}" for problem in err.problems], source=experiment.source) from None
