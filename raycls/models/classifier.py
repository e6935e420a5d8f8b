"""A backbone's classifier head, found the timm way: shared by the registry, adapters, optimizers and freezing."""

from __future__ import annotations

import torch.nn as nn


def classifier_of(backbone: nn.Module) -> nn.Module | None:
    """The backbone's classifier head (timm's get_classifier), or None when it has none as a module."""
    head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    return head if isinstance(head, nn.Module) else None
