"""Batch mixing for every phase that has labels: MixUp / CutMix (timm's implementation: its mixing, its soft
targets), and the mixers of `phase.mix`, a registry: TokenMix and MixToken for ViTs, manifold mixup.

Every mixer pairs each image with the batch reversed (timm's batch mode) at one weight `lam` for the batch:
the soft targets are lam * one-hot(label) + (1 - lam) * one-hot(partner) (label smoothing applied), so they
sum to 1. Supervised and distill losses learn the soft targets; a margin loss needs hard labels, so it takes
both labels of each mixed image with the mixing ratio. Mixers that mix inside the model (MixToken's token
embeddings, manifold mixup's hidden features) hand the phase a context (`Mixed.inside`) that hooks the
backbone for the forward pass it wraps, and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from raycls.config.schema import MixConfig
from raycls.errors import ConfigError
from raycls.registry import Registry


@dataclass
class Mixed:
    images: torch.Tensor
    soft: torch.Tensor  # the mixed one-hot targets, label smoothing applied
    labels: torch.Tensor
    partners: torch.Tensor  # each image's other label
    lam: float  # the weight of `labels` (1 - lam: of `partners`)
    # The forward pass(es) of the mixed batch run inside this: hidden-feature mixers hook the backbone there.
    inside: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


def mixed_targets(y: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """timm's mixup_target: each image's label at lam, its partner's (the batch reversed) at 1 - lam."""
    from timm.data.mixup import mixup_target

    return mixup_target(y, num_classes, lam, smoothing)


class Mixer:
    """A mixer of `phase.mix`: called with a batch and the backbone it trains; returns the mixed batch."""

    # Whether it mixes inside the model (a teacher that sees the images cannot see that mix).
    hidden: bool = False

    def __init__(self, config: MixConfig, num_classes: int, label_smoothing: float = 0.0):
        self.config = config
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def draw(self) -> float:
        """The batch's weight of its own images: Beta(alpha, alpha), or 1 (no mixing) with prob 1 - prob."""
        if np.random.rand() >= self.config.prob:
            return 1.0
        return float(np.random.beta(self.config.alpha, self.config.alpha))

    def mixed(self, x: torch.Tensor, y: torch.Tensor, lam: float, inside: Any = None) -> Mixed:
        soft = mixed_targets(y, self.num_classes, lam, self.label_smoothing)
        return Mixed(x, soft, y, y.flip(0), lam, inside if inside is not None else contextlib.nullcontext())

    def __call__(self, x: torch.Tensor, y: torch.Tensor, backbone: nn.Module | None = None) -> Mixed:
        raise NotImplementedError


MIXERS: Registry[type[Mixer]] = Registry("batch mixer")


class TimmMixer(Mixer):
    """MixUp or CutMix through timm's Mixup (batch mode), with `mix.alpha` as its alpha."""

    kind = "mixup"

    def __init__(self, config: MixConfig, num_classes: int, label_smoothing: float = 0.0):
        super().__init__(config, num_classes, label_smoothing)
        self.batch = BatchMixer(
            mixup_alpha=config.alpha if self.kind == "mixup" else 0.0,
            cutmix_alpha=config.alpha if self.kind == "cutmix" else 0.0,
            num_classes=num_classes,
            label_smoothing=label_smoothing,
            prob=config.prob,
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, backbone: nn.Module | None = None) -> Mixed:
        return self.batch(x, y, backbone)


@MIXERS.register("mixup")
class MixUp(TimmMixer):
    kind = "mixup"


@MIXERS.register("cutmix")
class CutMix(TimmMixer):
    kind = "cutmix"


def token_grid(backbone: nn.Module | None, config: MixConfig, image_size: int) -> int:
    """The side of the token grid: `mix.grid`, else the ViT's patch grid, else 8."""
    if config.grid is not None:
        return config.grid
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    return int(grid[0]) if grid is not None else min(8, image_size)


@MIXERS.register("tokenmix")
class TokenMix(Mixer):
    """TokenMix (Liu et al. 2022): each image takes a random set of token-sized cells (the ViT's patches)
    from its partner; lam is the share of cells it keeps (TokenMix's area-based targets, without its
    teacher-attention variant)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, backbone: nn.Module | None = None) -> Mixed:
        lam = self.draw()
        grid = token_grid(backbone, self.config, x.shape[-1])
        cells = grid * grid
        taken = round((1.0 - lam) * cells)
        if taken == 0:
            return self.mixed(x, y, 1.0)
        mask = torch.zeros(cells, device=x.device)
        mask[torch.randperm(cells, device=x.device)[:taken]] = 1.0
        pixels = nn.functional.interpolate(mask.view(1, 1, grid, grid), size=x.shape[-2:], mode="nearest")[0]
        images = x * (1 - pixels) + x.flip(0) * pixels
        return self.mixed(images, y, 1.0 - taken / cells)


@contextlib.contextmanager
def hooked(module: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """`module`'s output replaced by change(output) for the forward passes inside the block."""
    handle = module.register_forward_hook(lambda m, inputs, output: change(output))
    try:
        yield
    finally:
        handle.remove()


@MIXERS.register("mixtoken")
class MixToken(Mixer):
    """MixToken (Jiang et al. 2021, LV-ViT): CutMix on the token embeddings, after the patch embedding: a
    box of the token grid comes from the partner image's tokens; lam is the share of tokens kept."""

    hidden = True

    def __call__(self, x: torch.Tensor, y: torch.Tensor, backbone: nn.Module | None = None) -> Mixed:
        embed = getattr(backbone, "patch_embed", None)
        if embed is None:
            raise ConfigError(
                f"phase.mix: mixtoken needs a ViT (a patch embedding); {type(backbone).__name__} has none"
            )
        from timm.data.mixup import rand_bbox

        lam = self.draw()
        grid = token_grid(backbone, self.config, x.shape[-1])
        top, bottom, left, right = rand_bbox((grid, grid), lam)
        mask = torch.zeros(grid, grid, device=x.device)
        mask[top:bottom, left:right] = 1.0
        kept = 1.0 - float(mask.mean())
        flat = mask.view(1, grid * grid, 1)

        def mix(tokens: torch.Tensor) -> torch.Tensor:
            if tokens.ndim != 3 or tokens.shape[1] != grid * grid:
                raise ConfigError(
                    f"phase.mix: mixtoken expected {grid}x{grid} patch tokens [B, N, C] from the patch embedding, "
                    f"got {tuple(tokens.shape)}; set phase.mix.grid"
                )
            return tokens * (1 - flat.to(tokens.dtype)) + tokens.flip(0) * flat.to(tokens.dtype)

        return self.mixed(x, y, kept, hooked(embed, mix) if kept < 1.0 else None)


def mixing_points(backbone: nn.Module) -> list[nn.Module]:
    """Where manifold mixup may mix: a ViT's blocks, a CNN's feature stages (timm's feature_info)."""
    from raycls.models.modules import TomeBlocks

    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, TomeBlocks):
        raise ConfigError("phase.mix: manifold_mixup cannot mix between ToMe's merging blocks (model.modules.tome)")
    if hasattr(backbone, "patch_embed") and isinstance(blocks, nn.Sequential):
        return list(blocks)
    if hasattr(backbone, "feature_info"):
        named = dict(backbone.named_modules())
        return [named[f["module"]] for f in backbone.feature_info if any(True for _ in named[f["module"]].parameters())]
    raise ConfigError(
        f"phase.mix: manifold_mixup needs a ViT's blocks or a CNN's feature stages (timm's feature_info); "
        f"{type(backbone).__name__} has neither"
    )


@MIXERS.register("manifold_mixup")
class ManifoldMixup(Mixer):
    """Manifold mixup (Verma et al. 2019): a layer drawn at random for each batch, the input or one of the
    hidden blocks, and mixup applied to its output (each image with the batch reversed) at Beta(alpha, alpha)."""

    hidden = True

    def __call__(self, x: torch.Tensor, y: torch.Tensor, backbone: nn.Module | None = None) -> Mixed:
        points = mixing_points(backbone)
        lam = self.draw()
        where = int(np.random.randint(len(points) + 1))  # 0: the input itself
        if where == 0 or lam == 1.0:
            return self.mixed(x * lam + x.flip(0) * (1 - lam), y, lam)
        return self.mixed(x, y, lam, hooked(points[where - 1], lambda h: h * lam + h.flip(0) * (1 - lam)))


class BatchMixer:
    """MixUp / CutMix from the phase's `mixup_alpha` / `cutmix_alpha`, through timm's Mixup."""

    def __init__(
        self,
        *,
        mixup_alpha: float,
        cutmix_alpha: float,
        num_classes: int,
        label_smoothing: float = 0.0,
        prob: float = 1.0,
    ):
        from timm.data import Mixup

        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
            prob=prob,
        )

    @classmethod
    def maybe(cls, config, num_classes: int, label_smoothing: float = 0.0) -> BatchMixer | Mixer | None:
        """The phase's mixer: `mix` (a MIXERS entry), else MixUp / CutMix from the alphas, else None."""
        mix = getattr(config, "mix", None)
        if mix is not None:
            return MIXERS.get(mix.name)(mix, num_classes, label_smoothing)
        if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
            return cls(
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                num_classes=num_classes,
                label_smoothing=label_smoothing,
            )
        return None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, backbone: nn.Module | None = None) -> Mixed:
        x = x.clone()  # timm mixes in place
        lam = float(self.mixup._mix_batch(x))  # timm's batch mode: each image with the batch reversed
        soft = mixed_targets(y, self.mixup.num_classes, lam, self.mixup.label_smoothing)
        return Mixed(x, soft, y, y.flip(0), lam)


def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return torch.sum(-soft * torch.nn.functional.log_softmax(logits.float(), dim=-1), dim=-1).mean()
