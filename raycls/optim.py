"""Optimizers and learning-rate schedules, as registries. Schedules are per step, with linear warm-up.

Outside `raycls.train` so that validating a config (`train.optimizer`, `train.scheduler`) loads these
registries without the training loop. In code the per-step lr schedule is never called a scheduler:
that word is for the trial schedulers (ASHA, FIFO) in `raycls.search`; the YAML key `train.scheduler`
keeps its name for existing search spaces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from raycls.config.schema import TrainConfig
from raycls.models.classifier import classifier_of
from raycls.ranking import Ranking
from raycls.registry import Registry

OptimizerFactory = Callable[[list[dict], TrainConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")

# A multiplier maps progress after warm-up (0 -> 1) and the config to a multiplier of the base lr.
Multiplier = Callable[[float, TrainConfig], float]


@dataclass(frozen=True)
class LrSchedule:
    """One `train.scheduler` entry: how it builds the per-batch stepper the training loop drives.

    `build(config, optimizer, steps_per_epoch, metric)` returns an object with torch's scheduler interface
    (`step()` after every batch, `state_dict()` / `load_state_dict()` for checkpoints); `metric` is the
    phase's metric, which only a schedule that reads validation results (plateau) uses."""

    build: Callable[[TrainConfig, torch.optim.Optimizer, int, str | None], Any]
    # The multiplier of progress, for schedules written as one (cosine, linear, constant); None for the
    # schedules that are torch.optim.lr_scheduler classes.
    multiplier: Multiplier | None = None


LR_SCHEDULES: Registry[LrSchedule] = Registry("lr schedule")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
    )


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=config.lr, betas=config.betas)


@OPTIMIZERS.register("lamb")
def lamb(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """LAMB (You et al. 2020), timm's implementation: Adam with a per-layer trust ratio, for large batches."""
    from timm.optim import Lamb

    return Lamb(groups, lr=config.lr, betas=config.betas)


@OPTIMIZERS.register("lars")
def lars(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """LARS (You et al. 2017), timm's implementation: SGD with a per-layer trust ratio."""
    from timm.optim import Lars

    return Lars(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)


def param_groups(
    model: nn.Module, weight_decay: float, *, backbone: nn.Module | None = None, backbone_lr_mult: float = 1.0
) -> list[dict]:
    """Weight decay on weights only: decaying biases and norm scales hurts accuracy and buys nothing.
    With `backbone` and a multiplier other than 1, its parameters (less its classifier, a head) get their
    own groups at `lr * backbone_lr_mult` (LambdaLR scales each group's own initial lr)."""
    slow = _backbone_body(backbone) if backbone is not None and backbone_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((param.ndim > 1, id(param) in slow), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            **({"lr_mult": backbone_lr_mult} if in_backbone else {}),
        }
        for (decay, in_backbone), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def _backbone_body(backbone: nn.Module) -> set[int]:
    """The backbone's parameters less its classifier (timm's get_classifier), which is a head."""
    head = classifier_of(backbone)
    excluded = {id(p) for p in head.parameters()} if head is not None else set()
    return {id(p) for p in backbone.parameters() if id(p) not in excluded}


def create_optimizer(
    config: TrainConfig, model: nn.Module, *, backbone: nn.Module | None = None
) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay, backbone=backbone, backbone_lr_mult=config.lr_mult.backbone)
    optimizer = OPTIMIZERS.create(config.optimizer, groups, config)
    for group in optimizer.param_groups:  # the multiplier becomes the group's own lr, which schedules scale
        group["lr"] = config.lr * group.pop("lr_mult", 1.0)
    if config.lookahead is not None:
        from timm.optim import Lookahead

        optimizer = Lookahead(optimizer, alpha=config.lookahead.alpha, k=config.lookahead.k)
    return optimizer


def cosine(progress: float, config: TrainConfig) -> float:
    floor = config.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(progress: float, config: TrainConfig) -> float:
    return 1.0 - (1.0 - config.min_lr_ratio) * progress


def constant(progress: float, config: TrainConfig) -> float:
    return 1.0


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, config: TrainConfig) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    multiplier = LR_SCHEDULES.get(config.scheduler).multiplier
    assert multiplier is not None, f"{config.scheduler} is not a multiplier schedule"
    return multiplier(min(progress, 1.0), config)


def _multiplier_schedule(multiplier: Multiplier) -> LrSchedule:
    def build(
        config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, metric: str | None
    ) -> torch.optim.lr_scheduler.LambdaLR:
        total = config.epochs * steps_per_epoch
        warmup = _warmup_steps(config, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total_steps=total, warmup_steps=warmup, config=config)
        )

    return LrSchedule(build=build, multiplier=multiplier)


LR_SCHEDULES.register("cosine")(_multiplier_schedule(cosine))
LR_SCHEDULES.register("linear")(_multiplier_schedule(linear))
LR_SCHEDULES.register("constant")(_multiplier_schedule(constant))


def torch_schedule(name: str) -> Callable[[Callable], Callable]:
    """Register a builder of a torch.optim.lr_scheduler schedule under `name`."""

    def add(build: Callable) -> Callable:
        LR_SCHEDULES.register(name)(LrSchedule(build=build))
        return build

    return add


def _warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    return round(config.warmup_epochs * steps_per_epoch)


def _with_warmup(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, main: Any
) -> torch.optim.lr_scheduler.LRScheduler:
    """`main` after the linear warm-up every schedule has (lr * (step + 1) / warm-up steps, as the multiplier
    schedules do), through torch's LinearLR and SequentialLR; `main` counts its steps from the warm-up's end."""
    warmup = _warmup_steps(config, steps_per_epoch)
    if warmup <= 1:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


# The epoch-based schedules below step after every batch, their periods counted in batches (epochs *
# steps_per_epoch): the lr changes exactly at the epoch boundaries torch's per-epoch stepping would change
# it at, and the warm-restart cosine moves within an epoch as torch documents (`step(epoch + i / iters)`).
@torch_schedule("step")
def _step_build(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, metric: str | None):
    options = config.lr_schedule
    main = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=options.step_epochs * steps_per_epoch, gamma=options.gamma
    )
    return _with_warmup(config, optimizer, steps_per_epoch, main)


@torch_schedule("multistep")
def _multistep_build(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, metric: str | None):
    options = config.lr_schedule
    milestones = [m * steps_per_epoch for m in options.milestones_for(config.epochs)]
    main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=options.gamma)
    return _with_warmup(config, optimizer, steps_per_epoch, main)


@torch_schedule("cosine_restarts")
def _restarts_build(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, metric: str | None):
    options = config.lr_schedule
    main = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer,
        T_0=options.restart_epochs * steps_per_epoch,
        T_mult=options.restart_mult,
        eta_min=config.lr * config.min_lr_ratio,
    )
    return _with_warmup(config, optimizer, steps_per_epoch, main)


@torch_schedule("onecycle")
def _onecycle_build(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, metric: str | None
) -> torch.optim.lr_scheduler.OneCycleLR:
    """Smith's one-cycle (torch's OneCycleLR): from lr / div_factor up to lr, then down to lr / (div_factor *
    final_div_factor). Its rise is its warm-up: `warmup_epochs`, when set, is the rise (pct_start)."""
    options = config.lr_schedule
    total = config.epochs * steps_per_epoch
    rise = config.warmup_epochs / config.epochs if config.warmup_epochs > 0 else options.pct_start
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],  # each group's own lr (lr_mult) is its peak
        total_steps=total,
        pct_start=rise,
        div_factor=options.div_factor,
        final_div_factor=options.final_div_factor,
    )


class PlateauSchedule:
    """torch's ReduceLROnPlateau on the phase's validation metric, once per epoch (`end_epoch`), its mode the
    metric's own (raycls.ranking); per batch it only warms up (lr * (step + 1) / warm-up steps)."""

    def __init__(self, config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, metric: str):
        options = config.lr_schedule
        self.metric = options.metric or metric
        self.optimizer = optimizer
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.warmup = _warmup_steps(config, steps_per_epoch)
        self.steps = 0
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=Ranking.of(self.metric).mode,
            factor=options.factor,
            patience=options.patience,
            threshold=options.threshold,
            threshold_mode="abs",
            min_lr=[lr * config.min_lr_ratio for lr in self.base],
        )
        self._set_warmup()

    def _set_warmup(self) -> None:
        if self.steps < self.warmup:
            for group, base in zip(self.optimizer.param_groups, self.base):
                group["lr"] = base * (self.steps + 1) / self.warmup

    def step(self) -> None:
        self.steps += 1
        if self.steps <= self.warmup:  # the warm-up's last step leaves each group at its base lr
            for group, base in zip(self.optimizer.param_groups, self.base):
                group["lr"] = base * min(self.steps + 1, self.warmup) / self.warmup

    def end_epoch(self, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is not None and self.steps >= self.warmup:
            self.plateau.step(value)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.plateau.load_state_dict(state["plateau"])


@torch_schedule("plateau")
def _plateau_build(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, metric: str | None
) -> PlateauSchedule:
    metric = config.lr_schedule.metric or metric
    if metric is None:
        raise ValueError("train.scheduler=plateau needs a validation metric: the phase's, or lr_schedule.metric")
    return PlateauSchedule(config, optimizer, steps_per_epoch, metric)


def create_lr_schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, *, metric: str | None = None
) -> Any:
    """The stage's lr stepper: `step()` after every batch, `end_epoch(lr_schedule, metrics)` after validation."""
    return LR_SCHEDULES.get(config.scheduler).build(config, optimizer, steps_per_epoch, metric)


def end_epoch(lr_schedule: Any, metrics: Mapping[str, float]) -> None:
    """After an epoch's validation: schedules that read the validation metric (plateau) take it."""
    hook = getattr(lr_schedule, "end_epoch", None)
    if hook is not None:
        hook(metrics)
