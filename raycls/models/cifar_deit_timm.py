"""CIFAR DeiT-tiny's two classes on timm's ViTs (raycls.models.cifar_deit builds them). A module of its own,
imported on first use: importing timm's models imports timm.utils, which imports wandb, and raycls.models
must stay light to import (tests/test_structure.py)."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer


def drop_class_token(tokens: torch.Tensor, prefix: int, p: float) -> torch.Tensor:
    """The class token (position 0) of each image replaced by its patch tokens' mean with probability p."""
    if p <= 0.0:
        return tokens
    replace = torch.rand(tokens.shape[0], 1, device=tokens.device) < p
    cls = torch.where(replace, tokens[:, prefix:].mean(dim=1), tokens[:, 0])
    return torch.cat([cls.unsqueeze(1), tokens[:, 1:]], dim=1)


class CifarDeiT(VisionTransformer):
    """The class-token model: timm's ViT with the hybrid embedding and class-token dropout."""

    def __init__(self, *, cls_token_drop: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.cls_token_drop = cls_token_drop

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.training:
            x = drop_class_token(x, self.num_prefix_tokens, self.cls_token_drop)
        return super().forward_head(x, pre_logits=pre_logits)


class CifarDeiTDistilled(VisionTransformerDistilled):
    """With DeiT's distillation token: in distilled training (the distill phase's loss) both heads' logits;
    otherwise the head `inference_head` names."""

    def __init__(self, *, cls_token_drop: float, inference_head: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.cls_token_drop, self.inference_head = cls_token_drop, inference_head

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            x = drop_class_token(x, self.num_prefix_tokens, self.cls_token_drop)
        cls, dist = x[:, 0], x[:, 1]
        if self.distilled_training and self.training and not pre_logits:
            return self.head(cls), self.head_dist(dist)
        if self.inference_head == "class":
            return cls if pre_logits else self.head(cls)
        if self.inference_head == "distill":
            return dist if pre_logits else self.head_dist(dist)
        return (cls + dist) / 2 if pre_logits else (self.head(cls) + self.head_dist(dist)) / 2
