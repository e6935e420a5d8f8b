"""Test-time augmentation: fixed views of each image, averaged (the full suite's `*_tta` metrics, `raycls
predict --tta`).

A view is a registered family of copies of uint8 [N, C, H, W] images: `hflip` the mirror, `translate` the
one-pixel shifts up-left and down-right (reflect padding), `identity` none. Families compose in the order
listed, each keeping half the weight on the image it was given and sharing the other half among its copies:
[identity, translate, hflip] is airbench's 6 views with its weights (1/4 the image and its mirror, 1/8 each
shifted copy). Which families a trial gets follows its training augmentation (`tta_views`): a model that
never saw a mirrored image is not invariant to mirroring (a mirrored digit is another symbol).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from raycls.registry import Registry

if TYPE_CHECKING:
    from raycls.config.schema import AugmentConfig, TtaConfig

ViewFn = Callable[[torch.Tensor], list[torch.Tensor]]  # uint8 [N, C, H, W] -> its altered copies
TTA_VIEWS: Registry[ViewFn] = Registry("tta view")
IDENTITY = "identity"


@TTA_VIEWS.register(IDENTITY)
def identity(images: torch.Tensor) -> list[torch.Tensor]:
    return []  # the unaltered image is always a view


@TTA_VIEWS.register("hflip")
def hflip(images: torch.Tensor) -> list[torch.Tensor]:
    return [images.flip(-1)]


@TTA_VIEWS.register("translate")
def translate(images: torch.Tensor) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1), mode="reflect").to(images.dtype)
    h, w = images.shape[-2:]
    return [padded[..., 0:h, 0:w], padded[..., 2 : h + 2, 2 : w + 2]]


def tta_views(config: TtaConfig, augment: AugmentConfig) -> tuple[str, ...]:
    """The view families of a trial: `eval.tta.views` when given, else those its training augmentation taught
    the model to ignore (translate after random crops or affine shifts, hflip after random flips)."""
    if config.views is not None:
        return config.views
    shifted = augment.random_crop > 0 or (augment.affine is not None and augment.affine.translate > 0)
    return (IDENTITY, *(["translate"] if shifted else []), *(["hflip"] if augment.hflip else []))


def weighted_views(images: torch.Tensor, views: tuple[str, ...]) -> list[tuple[float, torch.Tensor]]:
    """(weight, images) of every view, the weights summing to 1; the first is `images` itself (same object)."""
    out = [(1.0, images)]
    for name in views:
        family = TTA_VIEWS.get(name)
        grown: list[tuple[float, torch.Tensor]] = []
        for weight, view in out:
            copies = family(view)
            grown.append((weight / 2 if copies else weight, view))
            grown += [(weight / 2 / len(copies), copy) for copy in copies]
        out = grown
    return out


def tta_logits(images: torch.Tensor, views: tuple[str, ...], logits_of: Callable[[torch.Tensor], Any]) -> Any:
    """The weighted average over the views of `images` of `logits_of(view images)`."""
    return sum(weight * logits_of(view) for weight, view in weighted_views(images, views))


__all__ = ["IDENTITY", "TTA_VIEWS", "tta_logits", "tta_views", "weighted_views"]
