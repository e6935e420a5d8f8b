"""The phase interface. The training loop knows this interface only, never which phase runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn as nn

from raycls.config.schema import PhaseConfig
from raycls.models.registry import InputSpec
from raycls.registry import Registry

C = TypeVar("C", bound=PhaseConfig)
Batch = tuple[torch.Tensor, torch.Tensor]


class Phase(ABC, Generic[C]):
    """One training objective: what it builds on the backbone, its loss, and how it is evaluated.

    Evaluation is split in two so the loop can sum statistics over DDP workers in between:
    `eval_batch` returns additive sums for one batch, `eval_metrics` turns the summed totals into metrics.
    """

    # The metric this phase is judged by (a name from raycls.evaluate.names).
    metric: ClassVar[str]
    # Augmented views of each training image per batch: batches arrive as [B, views, C, H, W] when > 1.
    views: ClassVar[int] = 1

    def __init__(self, config: C, spec: InputSpec, *, topk: int = 5):
        self.config = config
        self.spec = spec
        # Top-k accuracy is reported beside top-1 (k capped at the number of classes).
        self.topk = min(topk, spec.num_classes)

    def build(self, backbone: nn.Module) -> nn.Module:
        """The trainable module: the backbone plus whatever heads the phase needs."""
        return backbone

    def start(self, model: nn.Module, *, total_steps: int) -> None:
        """Called once the model is on its device, before the first step (schedules need the step count)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (EMA teachers update here). `model` is unwrapped."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss of one batch (and extra logs). `model` may be DDP-wrapped."""

    @abstractmethod
    def eval_batch(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Additive statistics of one validation batch (sums and counts, as 0-d tensors)."""

    @abstractmethod
    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Validation metrics from the statistics summed over all batches and workers."""

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        """Embeddings of a validation batch for embedding metrics (k-NN), or None when the phase has none.
        The loop gathers them from every worker before calling `embedding_metrics`."""
        return None

    def embedding_metrics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics over the whole split's embeddings (all workers' together)."""
        return {}


PHASES: Registry[type[Phase]] = Registry("phase")


def create_phase(config: PhaseConfig, spec: InputSpec, *, topk: int = 5) -> Phase:
    return PHASES.get(config.name)(config, spec, topk=topk)
