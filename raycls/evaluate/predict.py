"""One forward pass over a whole split, on every worker's shard, gathered back into the split's order.

Every evaluation metric reads `Predictions` (tensors alone), so the model runs once per split however many
metrics there are. Under DDP each worker predicts its strided shard (`BatchLoader`: rank r holds images r,
r + W, ...); the shards are gathered and put back in dataset order, so a 2-worker evaluation sees exactly
the tensors a single process sees, and row i of every tensor is image i of the split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from raycls.config.schema import AugmentConfig
    from raycls.data.datasets import ArrayData


class Predicts(Protocol):
    """What the suite needs of a training phase (raycls.phases.Phase is one): the logits and embeddings of one
    forward pass, and the backbone. Named here so that evaluation depends on no phase."""

    def outputs(self, model: nn.Module, x: torch.Tensor) -> Any: ...

    def backbone(self, model: nn.Module) -> nn.Module: ...


@dataclass
class Predictions:
    """A model's answers for every image of one split, in the split's order (on the CPU, float32)."""

    labels: torch.Tensor  # [N] int64
    logits: torch.Tensor | None  # [N, C]; None: the model has no classifier (a supcon stage)
    embeddings: torch.Tensor | None  # [N, D] backbone embeddings

    @property
    def probs(self) -> torch.Tensor:
        assert self.logits is not None
        return F.softmax(self.logits.double(), dim=-1).float()

    def __len__(self) -> int:
        return len(self.labels)


def gather_in_order(tensors: dict[str, torch.Tensor], world_size: int, rank: int, n: int) -> dict[str, torch.Tensor]:
    """Every worker's strided shard (rank r: rows r, r + W, ...) of `n` rows, back in row order, on the CPU."""
    local = {k: v.detach().cpu() for k, v in tensors.items()}
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return local
    shards: list = [None] * world_size
    dist.all_gather_object(shards, local)
    order = torch.cat([torch.arange(r, n, world_size) for r in range(world_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return {k: torch.cat([s[k] for s in shards])[inverse] for k in local}


OutputsFn = Callable[[torch.Tensor], "tuple[torch.Tensor | None, torch.Tensor | None]"]


@torch.no_grad()
def predict(
    model: nn.Module,
    phase: Predicts,
    data: ArrayData,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int = 512,
    image_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    augment: AugmentConfig | None = None,
    seed: int = 0,
) -> Predictions:
    """The phase's outputs (its classifier's logits and its backbone's embeddings) for every image of `data`,
    through the training augmentation `augment` (seeded by `seed`) when given: TTA's random passes.
    Every worker must call this (a collective)."""
    from raycls.data import BatchLoader

    loader = BatchLoader(
        data,
        batch_size,
        mean=mean,
        std=std,
        device=device,
        train=False,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        augment=augment,
        seed=seed,
    )
    model.eval()
    logits, embeddings = [], []
    for x, _ in loader:
        out = phase.outputs(model, x)
        if out.logits is not None:
            logits.append(out.logits.float())
        if out.embeddings is not None:
            embeddings.append(out.embeddings.float())
    local: dict[str, torch.Tensor] = {"labels": torch.arange(rank, len(data), world_size)}
    local["labels"] = data.labels[local["labels"]]
    if logits:
        local["logits"] = torch.cat(logits)
    if embeddings:
        local["embeddings"] = torch.cat(embeddings)
    full = gather_in_order(local, world_size, rank, len(data))
    return Predictions(labels=full["labels"].long(), logits=full.get("logits"), embeddings=full.get("embeddings"))
