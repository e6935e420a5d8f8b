"""The pieces of a training step, as named helpers with their own tests: precision, clipping, finiteness."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from raycls.config.schema import TrainConfig
from raycls.errors import NonFiniteLossError


@dataclass(frozen=True)
class StepPolicy:
    """How steps run on this device: resolved once from TrainConfig's "auto" settings."""

    device: torch.device
    bf16: bool
    channels_last: bool
    grad_clip: float | None

    @classmethod
    def resolve(cls, config: TrainConfig, device: torch.device) -> "StepPolicy":
        cuda = device.type == "cuda"
        return cls(
            device=device,
            # bf16 needs no loss scaling (fp16 would); "auto" skips CPUs, where bf16 is usually slower.
            bf16=config.amp == "bf16" or (config.amp == "auto" and cuda),
            channels_last=config.channels_last == "on" or (config.channels_last == "auto" and cuda),
            grad_clip=config.grad_clip,
        )


def autocast(policy: StepPolicy) -> contextlib.AbstractContextManager:
    if not policy.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=policy.device.type, dtype=torch.bfloat16)


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm; returns the norm before clipping (None when clipping is off)."""
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)


def check_finite(value: float, *, what: str, epoch: int) -> None:
    if not np.isfinite(value):
        raise NonFiniteLossError(f"{what} is {value} at epoch {epoch}: training diverged (lower train.lr?)")


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def train_step(
    model: nn.Module,
    loss_fn,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    policy: StepPolicy,
) -> torch.Tensor:
    """One optimisation step. Returns the loss as a detached device tensor (no host sync here)."""
    with autocast(policy):
        loss, _ = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(model.parameters(), policy.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()
