"""Where a trial starts to overfit, from its per-epoch losses alone (no plotting here: tested directly).

The overfitting point is the epoch of the lowest validation loss when, over every later epoch, the
validation loss stays above that minimum and ends at least `rise` (relative) above it while the training
loss keeps falling (it ends below its value at that epoch). Ties go to the later epoch, as the best
checkpoint's do. Too few epochs after the minimum (`after`) are not a trend: no point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_EPOCHS_AFTER = 2  # epochs after the minimum needed to call it a trend
MIN_RISE = 0.01  # the last validation loss at least 1% above its minimum


def overfitting_epoch(
    epochs: Sequence[int],
    train_loss: Sequence[float | None],
    val_loss: Sequence[float | None],
    *,
    after: int = MIN_EPOCHS_AFTER,
    rise: float = MIN_RISE,
) -> int | None:
    """The epoch after which the validation loss rises while the training loss keeps falling; None when the
    curves show no such point (or an epoch lacks either loss)."""
    if not (len(epochs) == len(train_loss) == len(val_loss)):
        raise ValueError(f"{len(epochs)} epochs, {len(train_loss)} training and {len(val_loss)} validation losses")
    points = [(e, t, v) for e, t, v in zip(epochs, train_loss, val_loss) if _finite(t) and _finite(v)]
    if len(points) < after + 1:
        return None
    lowest = min(v for _, _, v in points)
    at = max(i for i, (_, _, v) in enumerate(points) if v == lowest)  # the later epoch on a tie
    later = points[at + 1 :]
    if len(later) < after:
        return None
    rising = later[-1][2] > lowest + rise * abs(lowest)
    falling = later[-1][1] < points[at][1]
    return points[at][0] if rising and falling else None


def _finite(value: float | None) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
