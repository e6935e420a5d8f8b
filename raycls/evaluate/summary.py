"""From a trial's per-epoch metrics to its summary: final values, best values, best epoch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from raycls.evaluate.names import CHAIN_SCORE, EPOCH, STAGE_INDEX, Mode, as_good, better, mode_of, ranked_value


@dataclass(frozen=True)
class Summary:
    metric: str
    mode: Mode
    best_epoch: int | None = None
    # Every metric at the epoch where `metric` was best (the leaderboard's row).
    at_best: dict[str, float] = field(default_factory=dict)
    # Every metric at the last epoch.
    final: dict[str, float] = field(default_factory=dict)
    # Each ranked metric's own best value over epochs (metrics.json's "best").
    best: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "best_epoch": self.best_epoch,
                "at_best": self.at_best, "final": self.final, "best": self.best}  # fmt: skip


def summarize(history: Sequence[dict[str, float]], metric: str, mode: Mode | None = None) -> Summary:
    mode = mode or mode_of(metric)
    if not history:
        return Summary(metric, mode)
    # Ranked as chains rank epochs (names.ranked_value): the best epoch of the last stage reached.
    scored = [h for h in history if ranked_value(h, metric, mode) is not None]
    best_row = scored[0] if scored else history[-1]
    for row in scored[1:]:
        if as_good(ranked_value(row, metric, mode), ranked_value(best_row, metric, mode), mode):  # type: ignore[arg-type]
            best_row = row
    best: dict[str, float] = {}
    for row in history:
        for key, value in row.items():
            if key in (EPOCH, STAGE_INDEX, CHAIN_SCORE) or not isinstance(value, (int, float)):  # nor is `stage`
                continue
            if better(value, best.get(key), mode_of(key)):
                best[key] = value
    return Summary(
        metric=metric,
        mode=mode,
        best_epoch=int(best_row.get(EPOCH, len(history))),
        at_best=dict(best_row),
        final=dict(history[-1]),
        best=best,
    )
