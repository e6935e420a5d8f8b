"""MixUp / CutMix for every phase that has labels, through timm's Mixup (its mixing, its soft targets).

Supervised and distill losses learn the soft targets; a margin loss needs hard labels, so it takes both
labels of each mixed image with the mixing ratio (timm mixes each image with the batch reversed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mixed:
    images: torch.Tensor
    soft: torch.Tensor  # the mixed one-hot targets, label smoothing applied
    labels: torch.Tensor
    partners: torch.Tensor  # each image's other label
    lam: float  # the weight of `labels` (1 - lam: of `partners`)


class BatchMixer:
    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, num_classes: int, label_smoothing: float = 0.0):
        from timm.data import Mixup

        self.mixup = Mixup(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes
        )

    @classmethod
    def maybe(cls, config, num_classes: int, label_smoothing: float = 0.0) -> BatchMixer | None:
        """A mixer when the phase config asks for MixUp or CutMix, else None."""
        if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
            return cls(
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                num_classes=num_classes,
                label_smoothing=label_smoothing,
            )
        return None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Mixed:
        from timm.data.mixup import mixup_target

        x = x.clone()  # timm mixes in place
        lam = float(self.mixup._mix_batch(x))  # timm's batch mode: each image with the batch reversed
        soft = mixup_target(y, self.mixup.num_classes, lam, self.mixup.label_smoothing)
        return Mixed(x, soft, y, y.flip(0), lam)


def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return torch.sum(-soft * torch.nn.functional.log_softmax(logits.float(), dim=-1), dim=-1).mean()
