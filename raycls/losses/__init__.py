"""Losses for the training phases, plain PyTorch (no Ray): margin (ArcFace family), contrastive, distillation.

Every loss is an `nn.Module` registered in LOSSES under the name a YAML uses, so a phase looks its loss up by
name and never branches on it. Constructors take the essentials positionally and everything else by keyword.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from raycls.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to float32, whose softmax and margin arithmetic stay accurate at scale 64; float64 stays
    float64, so gradcheck can run on the losses."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# Imported after LOSSES exists: each module registers its losses into it on import.
from raycls.losses import contrastive, distill, margin  # noqa: E402, F401
from raycls.losses.contrastive import ProjectionHead, SupConLoss  # noqa: E402
from raycls.losses.distill import ALPHA_SCHEDULES, KD_LOSSES, HardKD, SoftKD, kd_alpha  # noqa: E402
from raycls.losses.margin import (  # noqa: E402
    AdaFace,
    ArcFace,
    CosFace,
    CosineHead,
    CurricularFace,
    MarginLoss,
    MarginOutput,
    SubCenterArcFace,
)

# The losses a `metric` phase can use (a cosine classifier with a margin): configs check names against it.
MARGIN_LOSSES: Registry[type[MarginLoss]] = Registry("margin loss")
for _name in LOSSES.names():
    if issubclass(LOSSES.get(_name), MarginLoss):
        MARGIN_LOSSES.register(_name)(LOSSES.get(_name))


def create_loss(name: str, /, *args: object, **kwargs: object) -> nn.Module:
    """`create_loss("arcface", 512, 10, margin=0.3)`: the registered class called with the given arguments."""
    return LOSSES.create(name, *args, **kwargs)


__all__ = [
    "ALPHA_SCHEDULES",
    "KD_LOSSES",
    "LOSSES",
    "AdaFace",
    "ArcFace",
    "CosFace",
    "CosineHead",
    "CurricularFace",
    "HardKD",
    "MarginLoss",
    "MarginOutput",
    "ProjectionHead",
    "SoftKD",
    "SubCenterArcFace",
    "SupConLoss",
    "create_loss",
    "kd_alpha",
]
