"""What a trained model costs to run: parameters, FLOPs per image, latency at batch 1 and batch N.

Measured on the trial's own device, in eval mode, through the same `forward` the predictions use, so that a
multi-objective search (`experiment.objectives`) trades accuracy against numbers of the model it would ship.
FLOPs come from torch.utils.flop_counter (counted per aten op, 2 per multiply-accumulate), not a hand count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from raycls import names

Forward = Callable[[torch.Tensor], object]

# Timing: warm-up calls (allocator, cuDNN autotuning, lazy init), then repeats until this much time or this
# many calls, whichever comes first (at least one); the median is robust to a stray slow call. It runs at the
# end of every trial, so it is kept short: ~0.3 s for a small CNN; a ResNet-50 at 224 px on a CPU core, whose
# batch of 64 takes ~19 s, pays one warm-up and one timed call per batch size.
WARMUP_CALLS = 2
TIMING_BUDGET_S = 0.1
MAX_CALLS = 30


def used_parameters(model: nn.Module, forward: Forward, example: torch.Tensor) -> int:
    """Parameters that the prediction touches: one backward pass from the outputs marks them. A distilled
    model's frozen teacher, or a head the prediction does not use, is not counted."""
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            out = forward(example)
            tensors = [t for t in _tensors(out) if t.requires_grad]
            if not tensors:
                return 0
            torch.autograd.backward([t.float().sum() for t in tensors])
        return sum(p.numel() for p in params if p.grad is not None)
    finally:
        for p, (requires_grad, grad) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(requires_grad)


def flops_per_image(forward: Forward, example: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(example[:1])
    return int(counter.get_total_flops())


def latency_ms(forward: Forward, batch: torch.Tensor) -> float:
    """Median milliseconds of one forward pass over `batch` (CUDA work waited for)."""
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    times: list[float] = []
    with torch.no_grad():
        for _call in range(WARMUP_CALLS):
            started = time.perf_counter()
            forward(batch)
            sync()
            if time.perf_counter() - started > TIMING_BUDGET_S:  # a slow model: warm after one call
                break
        spent = 0.0
        while not times or (len(times) < MAX_CALLS and spent < TIMING_BUDGET_S):
            started = time.perf_counter()
            forward(batch)
            sync()
            times.append(time.perf_counter() - started)
            spent += times[-1]
    return 1000.0 * statistics.median(times)


def measure_cost(
    model: nn.Module, forward: Forward, *, channels: int, image_size: int, batch_size: int, device: torch.device
) -> dict[str, float]:
    """The model's cost metrics (names.COST_METRICS). `forward` maps normalised images to the outputs."""
    was_training = model.training
    model.eval()
    try:
        images = torch.randn(batch_size, channels, image_size, image_size, device=device)
        return {
            names.PARAMS: float(used_parameters(model, forward, images[:1])),
            names.FLOPS: float(flops_per_image(forward, images)),
            names.LATENCY_MS: latency_ms(forward, images[:1]),
            names.LATENCY_MS_BATCH: latency_ms(forward, images),
            names.LATENCY_BATCH: float(batch_size),
        }
    finally:
        model.train(was_training)


def _tensors(out: object) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, a tuple, a dataclass such as phases' Outputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for name in out.__dataclass_fields__ for t in _tensors(getattr(out, name))]
    return []
