"""`train.freeze`: train only part of the model, the two-phase fine-tuning way (heads on a frozen backbone,
then everything at a lower lr). Frozen parameters stop requiring gradients (the optimizer never sees them)
and frozen BatchNorm layers stay in eval mode, so their running statistics are frozen too: a head-only
stage leaves the backbone bit-identical.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from raycls.config.schema import UnfreezeConfig
from raycls.errors import ConfigError
from raycls.models.classifier import classifier_of


def frozen_modules(model: nn.Module, backbone: nn.Module, freeze: str | list[str]) -> list[nn.Module]:
    """The modules `freeze` names: "none", "backbone" (the phase's backbone less its classifier, a head), or
    module names of the phase's model (`backbone.features`, `projector`, ...)."""
    if freeze in ("none", "progressive"):  # progressive: ProgressiveUnfreezing, once the optimizer holds them all
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


class ProgressiveUnfreezing:
    """`train.freeze: progressive`: the backbone's blocks, bottom (stem) to top, unfrozen from the top one
    more group at a time as epochs pass; the classifier (and timm's head group) and every module outside
    the backbone (a phase's heads) always train. Built after the optimizer, which holds every parameter
    from the start: a frozen parameter has no gradient, so the optimizer leaves it alone until it thaws."""

    def __init__(self, backbone: nn.Module, config: UnfreezeConfig):
        self.config = config
        self.blocks = backbone_blocks(backbone, coarse=config.coarse)
        if not self.blocks:
            raise ConfigError(f"train.freeze: progressive: found no blocks to unfreeze in {type(backbone).__name__}")

    def unfrozen_blocks(self, epoch: int) -> int:
        """How many blocks (from the top) train in `epoch` (counted from 0 within the stage)."""
        return min(len(self.blocks), (epoch // self.config.every) * self.config.blocks)

    def at_epoch(self, epoch: int) -> list[nn.Module]:
        """Set requires_grad for `epoch`; returns the modules frozen in it (their BatchNorms stay in eval)."""
        thawed = len(self.blocks) - self.unfrozen_blocks(epoch)
        frozen: list[nn.Module] = []
        for index, block in enumerate(self.blocks):
            for param in block.parameters:
                param.requires_grad_(index >= thawed)
            if index < thawed:
                frozen.extend(block.modules)
        return frozen


class Block:
    """One unfreezing unit: its parameters and the modules holding them."""

    def __init__(self, parameters: list[nn.Parameter], modules: list[nn.Module]):
        self.parameters = parameters
        self.modules = modules


def backbone_blocks(backbone: nn.Module, *, coarse: bool = False) -> list[Block]:
    """The backbone's blocks from the stem up, its head excluded: timm's layer groups (`group_matcher`, the
    groups layer-wise lr decay uses) where the model has them, else its children (Sequentials opened up)."""
    head = classifier_of(backbone)
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    if hasattr(backbone, "group_matcher"):
        from timm.models import group_parameters

        params = dict(backbone.named_parameters())
        modules = dict(backbone.named_modules())
        grouped = group_parameters(backbone, backbone.group_matcher(coarse=coarse))
        blocks = []
        for names in grouped.values():
            if any(id(params[n]) in head_params for n in names):
                continue  # timm's last group: the classifier (with the final norm, or unmatched names)
            owners = {modules[n.rsplit(".", 1)[0]] if "." in n else backbone for n in names}
            blocks.append(Block([params[n] for n in names], [m for m in owners if m is not backbone]))
        return blocks
    children = []
    for child in backbone.children():
        children.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return [
        Block(list(child.parameters()), [child])
        for child in children
        if any(True for _ in child.parameters()) and not (set(map(id, child.parameters())) & head_params)
    ]


def progressive_unfreezing(
    freeze: str | list[str], config: UnfreezeConfig, backbone: nn.Module
) -> ProgressiveUnfreezing | None:
    return ProgressiveUnfreezing(backbone, config) if freeze == "progressive" else None
