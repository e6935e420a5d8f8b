"""CST-style token distillation losses between ViTs: token representation and token relation (correlation).

Both take patch tokens [B, N, D] (no class or distillation token) of one student layer and one teacher
layer, on the same N-token grid (`match_grid` resamples the teacher's). The teacher's tokens are detached.

- L_tok: the student's tokens, projected to the teacher's width (a linear layer the phase trains), regress
  the teacher's tokens standardised per token (layer norm without affine): the teacher's scale (DINOv2's
  tokens have norms in the tens) does not set the loss's.
- L_rel: each token's softmax over its cosine similarities to the image's tokens (temperature tau), the
  student's against the teacher's, as KL(teacher || student) per token, averaged over B*N tokens. It needs no
  projection: an N x N matrix is the same shape for any width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raycls.losses import at_least_float32


def token_representation_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the student's projected tokens and the teacher's standardised tokens, both [B, N, Dt]."""
    target = F.layer_norm(at_least_float32(teacher.detach()), teacher.shape[-1:])
    return F.mse_loss(at_least_float32(projected), target)


def token_similarities(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token to every token of its image: [B, N, N]."""
    unit = F.normalize(at_least_float32(tokens), dim=-1)
    return unit @ unit.transpose(1, 2)


def token_relation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """KL(teacher || student) of the token-similarity rows (softmax at `temperature`), mean over B*N rows."""
    s = F.log_softmax(token_similarities(student) / temperature, dim=-1)
    t = F.log_softmax(token_similarities(teacher.detach()) / temperature, dim=-1)
    return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")


def match_grid(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """Teacher tokens [B, M, D] on a square grid resampled to `count` tokens (a square grid too): averaged
    over cells when the teacher's grid is finer (DINOv2's 16x16 at 224 px onto a CIFAR ViT's 8x8), bilinear
    when it is coarser."""
    side, want = math.isqrt(tokens.shape[1]), math.isqrt(count)
    if side * side != tokens.shape[1] or want * want != count:
        raise ValueError(f"token grids must be square: {tokens.shape[1]} teacher tokens, {count} student tokens")
    if side == want:
        return tokens
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    grid = (
        F.adaptive_avg_pool2d(grid, want)
        if side > want
        else F.interpolate(grid, size=want, mode="bilinear", align_corners=False)
    )
    return grid.flatten(2).transpose(1, 2)
