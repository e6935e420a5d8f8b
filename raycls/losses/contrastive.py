"""Supervised contrastive learning (Khosla et al. 2020): the SupCon loss and its projection head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls.errors import ConfigError
from raycls.losses import LOSSES, at_least_float32


class ProjectionHead(nn.Module):
    """MLP from the backbone embedding to the L2-normalised space the contrastive loss compares in.

    Linear -> ReLU -> Linear, as in the SupCon and SimCLR code. It is dropped after pre-training: the paper
    trains the classifier on the backbone embedding, which transfers better than the projection.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        rules = [
            (in_dim >= 1, f"{in_dim=} must be >= 1"),
            (hidden >= 1, f"{hidden=} must be >= 1"),
            (out_dim >= 1, f"{out_dim=} must be >= 1"),
        ]
        problems = [msg for ok, msg in rules if not ok]
        if problems:
            raise ConfigError(problems)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


@LOSSES.register("supcon")
class SupConLoss(nn.Module):
    """SupCon, the paper's L_out (the positives' average outside the log, which the paper found better):

        L = mean_i  -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

    over all B*V views i; P(i) are the other views with i's label. `labels=None` makes every image its own
    class, which is SimCLR's NT-Xent. Anchors with no positive (one view of a label seen once) are left out of
    the mean. Default temperature: 0.1, the paper's; its reference code defaults to 0.07 and also scales the
    loss by tau / 0.07, which only rescales the gradient and is left out here.
    """

    def __init__(self, *, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"{temperature=} must be > 0")
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`features` [B, V, D]: V views of each of B images, already L2-normalised; `labels` [B]."""
        if features.ndim != 3:
            raise ValueError(f"features must be [batch, views, dim], got shape {tuple(features.shape)}")
        batch, views, _ = features.shape
        if labels is None:
            if views < 2:
                raise ValueError(f"without labels every positive is another view: {views=} must be >= 2")
            labels = torch.arange(batch, device=features.device)
        z = at_least_float32(features.flatten(0, 1))  # view i of image b is row b*V + i
        y = labels.repeat_interleave(views)
        is_self = torch.eye(len(z), dtype=torch.bool, device=z.device)
        # The anchor is excluded from its own denominator (A(i) = all but i).
        logits = (z @ z.T / self.temperature).masked_fill(is_self, float("-inf"))
        log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
        positive = (y[:, None] == y[None, :]) & ~is_self
        n_positive = positive.sum(dim=1)
        # masked_fill, not multiplication: the diagonal is -inf and -inf * 0 is NaN.
        mean_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / n_positive.clamp(min=1)
        has_positive = n_positive > 0
        # No `if` on has_positive: branching on a GPU value would wait for the device every step.
        return -(mean_log_prob * has_positive).sum() / has_positive.sum().clamp(min=1)
