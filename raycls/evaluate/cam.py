"""GradCAM++ heat maps (pytorch-grad-cam) from the same weights the metrics read, for CNNs and ViTs.

The explained module maps images to the logits the phase predicts with (`Phase.outputs`: a linear head, a
cosine classifier, a distilled model's averaged heads), so the maps explain the prediction that was scored.
The target layer is the backbone's last convolution; for a vision transformer (timm's `blocks`), the last
block's first norm, its tokens (after the class and register tokens) reshaped back into the patch grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LogitsOf(nn.Module):
    """`phase.outputs(model, x).logits` as a module (what pytorch-grad-cam calls)."""

    def __init__(self, model: nn.Module, outputs: Callable[[nn.Module, torch.Tensor], object]):
        super().__init__()
        self.model = model
        self._outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._outputs(self.model, x).logits


def target_layer(backbone: nn.Module) -> tuple[nn.Module, Callable | None]:
    """(layer whose activations and gradients make the map, how to turn its output into [B, C, H, W])."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[-1], "norm1"):
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))

        def reshape(tokens: torch.Tensor) -> torch.Tensor:
            patches = tokens[:, prefix:, :]
            side = int(round(patches.shape[1] ** 0.5))
            return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)

        return blocks[-1].norm1, reshape
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(backbone).__name__}: no convolution and no transformer blocks to explain")
    return convs[-1], None


def gradcam_pp(classifier: nn.Module, backbone: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """GradCAM++ maps [B, H, W] in [0, 1] of class `targets` for normalised images `x`."""
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = target_layer(backbone)
    with (
        torch.enable_grad(),
        GradCAMPlusPlus(model=classifier, target_layers=[layer], reshape_transform=reshape) as cam,
    ):
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(maps).float()
