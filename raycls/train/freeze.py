"""`train.freeze`: train only part of the model, the two-phase fine-tuning way (heads on a frozen backbone,
then everything at a lower lr). Frozen parameters stop requiring gradients (the optimizer never sees them)
and frozen BatchNorm layers stay in eval mode, so their running statistics are frozen too: a head-only
stage leaves the backbone bit-identical.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from raycls.errors import ConfigError
from raycls.models.classifier import classifier_of


def frozen_modules(model: nn.Module, backbone: nn.Module, freeze: str | list[str]) -> list[nn.Module]:
    """The modules `freeze` names: "none", "backbone" (the phase's backbone less its classifier, a head), or
    module names of the phase's model (`backbone.features`, `projector`, ...)."""
    if freeze == "none":
        return []
    if freeze == "backbone":
        head = classifier_of(backbone)
        keep = set(head.modules()) if head is not None else set()
        # The backbone's direct children but its classifier (a classifier is often a child, never the root).
        return [child for child in backbone.children() if child not in keep] or [backbone]
    names = dict(model.named_modules())
    unknown = [name for name in freeze if name not in names]
    if unknown:
        known = ", ".join(name for name in names if name and name.count(".") < 2)
        raise ConfigError(f"train.freeze: no module {', '.join(map(repr, unknown))} in the model; known: {known}")
    return [names[name] for name in freeze]


def freeze_modules(modules: list[nn.Module]) -> None:
    for module in modules:
        module.requires_grad_(False)


def keep_frozen_norms_in_eval(modules: list[nn.Module]) -> None:
    """After `model.train()`: the frozen modules' BatchNorm layers go back to eval mode (frozen statistics)."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                layer.eval()


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
