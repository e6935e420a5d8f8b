"""What the first blocks of a backbone see: their activations for a few images, captured by forward hooks.

- A CNN: the last activation at each of its first `STAGES` spatial resolutions, i.e. the stem's output and
  each early stage's output (a ResNet: act1, layer1, layer2; raycls's small_cnn: its conv blocks before
  each pooling). Every module's 4-D output is seen as it is made, and the latest one at each resolution kept,
  so no model needs a list of layer names. 1x1 maps (squeeze-and-excitation gates) are not images.
- A vision transformer (timm's `blocks`): the first `STAGES` blocks' patch tokens, each token's L2 norm laid
  back on the patch grid (the class, distillation and register tokens dropped).

Hooks copy what they see: a later in-place activation (ReLU(inplace=True)) would change the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

STAGES = 3


@dataclass(frozen=True)
class FeatureMap:
    layer: str  # the module's qualified name in the backbone
    maps: torch.Tensor  # [B, K, H, W]: K channels (a CNN) or 1 token-norm map (a vision transformer)


def is_transformer(backbone: nn.Module) -> bool:
    blocks = getattr(backbone, "blocks", None)
    return isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0 and hasattr(backbone, "patch_embed")


def feature_maps(backbone: nn.Module, run: Callable[[], object], *, stages: int = STAGES) -> list[FeatureMap]:
    """The first `stages` feature maps of `backbone` while `run()` makes one forward pass through it."""
    if is_transformer(backbone):
        return _token_norm_maps(backbone, run, stages)
    return _cnn_maps(backbone, run, stages)


def _run_hooked(run: Callable[[], object], hooks: list[tuple[nn.Module, Callable]]) -> None:
    """One forward pass (`run`) without gradients, with each forward hook on its module for that pass only."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()


def _cnn_maps(backbone: nn.Module, run: Callable[[], object], stages: int) -> list[FeatureMap]:
    latest: dict[tuple[int, int], FeatureMap] = {}  # resolution -> its latest output, in first-seen order

    def hook(name: str) -> Callable:
        def keep(module: nn.Module, inputs: object, output: object) -> None:
            if not (isinstance(output, torch.Tensor) and output.dim() == 4 and output.is_floating_point()):
                return
            size = (output.shape[-2], output.shape[-1])
            if min(size) < 2 or (size not in latest and len(latest) >= stages):
                return  # a gate, or past the resolutions wanted
            latest[size] = FeatureMap(name or type(backbone).__name__, output.detach().float().cpu().clone())

        return keep

    _run_hooked(run, [(m, hook(n)) for n, m in backbone.named_modules()])
    if not latest:
        raise ValueError(f"{type(backbone).__name__}: no module made a 4-D feature map to show")
    return list(latest.values())[:stages]


def _token_norm_maps(backbone: nn.Module, run: Callable[[], object], stages: int) -> list[FeatureMap]:
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    found: list[FeatureMap] = []

    def hook(name: str) -> Callable:
        def keep(module: nn.Module, inputs: object, output: object) -> None:
            patches = output[:, prefix:, :].detach().float().cpu()
            side = int(round(patches.shape[1] ** 0.5))
            if side * side != patches.shape[1]:
                raise ValueError(f"{name}: {patches.shape[1]} patch tokens do not make a square grid")
            found.append(FeatureMap(name, patches.norm(dim=-1).reshape(len(patches), 1, side, side)))

        return keep

    blocks = list(backbone.blocks)[:stages]
    _run_hooked(run, [(block, hook(f"blocks.{i}")) for i, block in enumerate(blocks)])
    return found


def strongest_channels(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` channels of one image's [K, H, W] maps with the largest mean absolute activation."""
    return maps.abs().mean(dim=(1, 2)).topk(min(k, len(maps))).indices
