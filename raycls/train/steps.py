"""The pieces of a training step, as named helpers with their own tests: precision, clipping, finiteness."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from raycls.config.schema import SamConfig, TrainConfig
from raycls.errors import NonFiniteLossError


@dataclass(frozen=True)
class StepPolicy:
    """How steps run on this device: resolved once per stage from TrainConfig's "auto" settings."""

    device: torch.device
    bf16: bool
    channels_last: bool
    grad_clip: float | None
    fp16: bool = False
    sam: SamConfig | None = None
    grad_centralization: bool = False
    # fp16's loss scaler: state that lives as long as the stage's optimizer (a fresh one per stage).
    scaler: torch.amp.GradScaler | None = field(default=None, compare=False)

    @classmethod
    def resolve(cls, config: TrainConfig, device: torch.device) -> StepPolicy:
        cuda = device.type == "cuda"
        fp16 = config.amp == "fp16"
        return cls(
            device=device,
            # bf16 needs no loss scaling (fp16 does); "auto" skips CPUs, where bf16 is usually slower.
            bf16=config.amp == "bf16" or (config.amp == "auto" and cuda),
            channels_last=config.channels_last == "on" or (config.channels_last == "auto" and cuda),
            grad_clip=config.grad_clip,
            fp16=fp16,
            sam=config.sam,
            grad_centralization=config.grad_centralization,
            scaler=torch.amp.GradScaler(device.type) if fp16 else None,
        )


def autocast(policy: StepPolicy) -> contextlib.AbstractContextManager:
    if policy.fp16:
        return torch.autocast(device_type=policy.device.type, dtype=torch.float16)
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
    tally: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimisation step. Returns the loss as a detached device tensor (no host sync here); adds the
    first forward pass's extra logs (a phase's training hits, raycls.phases.base.TRAIN_HITS) into `tally`."""
    scaler = policy.scaler

    def forward_backward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(policy):
            loss, extras = loss_fn(model, batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss, extras

    optimizer.zero_grad(set_to_none=True)
    loss, extras = forward_backward()
    if tally is not None:
        for key, value in extras.items():
            tally[key] = tally[key] + value.detach() if key in tally else value.detach()
    if policy.sam is not None:
        params = [p for p in model.parameters() if p.grad is not None]
        climbed = sam_climb(params, policy.sam)
        optimizer.zero_grad(set_to_none=True)
        forward_backward()  # the gradient at the worst nearby point is the one the optimizer takes
        with torch.no_grad():
            for param, step in zip(params, climbed):
                param.sub_(step)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping and centralisation see true gradients
    if policy.grad_centralization:
        centralize_gradients(model.parameters())
    clip_gradients(model.parameters(), policy.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return loss.detach()


@torch.no_grad()
def sam_climb(params: list[nn.Parameter], config: SamConfig) -> list[torch.Tensor]:
    """Move each parameter to w + e(w), e = rho * T^2 g / ||T g|| (T = |w| for ASAM, else 1); returns the
    steps taken, to be undone after the second backward pass."""
    scaled = [(p.abs() if config.adaptive else 1.0) * p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled])) + 1e-12
    steps = [(p.abs() if config.adaptive else 1.0) * g * (config.rho / norm) for p, g in zip(params, scaled)]
    for param, step in zip(params, steps):
        param.add_(step)
    return steps


@torch.no_grad()
def centralize_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Gradient centralisation: weights' gradients (conv and linear, ndim > 1) minus their mean per output."""
    for param in parameters:
        if param.grad is not None and param.grad.ndim > 1:
            param.grad.sub_(param.grad.mean(dim=tuple(range(1, param.grad.ndim)), keepdim=True))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
