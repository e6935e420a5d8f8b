"""From a trial's per-epoch metrics to its summary: final values, best values, best epoch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from raycls.names import EPOCH, Mode
from raycls.ranking import Ranking, is_ranked


@dataclass(frozen=True)
class Summary:
    metric: str
    mode: Mode
    best_epoch: int | None = None
    # Every metric at the epoch where `metric` was best (the leaderboard's row); {} when no epoch counts.
    at_best: dict[str, float] = field(default_factory=dict)
    # Every metric at the last epoch.
    final: dict[str, float] = field(default_factory=dict)
    # Each ranked metric's own best value over the epochs that count (metrics.json's "best"); counters such
    # as trainable_params or epoch_s have no best.
    best: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best_epoch": self.best_epoch,
            "at_best": self.at_best,
            "final": self.final,
            "best": self.best,
        }


def summarize(history: Sequence[dict[str, float]], metric: str, mode: Mode | None = None) -> Summary:
    ranking = Ranking.of(metric, mode)
    if not history:
        return Summary(metric, ranking.mode)
    best_row = ranking.best_epoch(history)  # the best epoch of a chain's last stage (raycls.ranking)
    best: dict[str, float] = {}
    for row in history:
        if not ranking.counts(row):
            continue
        for key, value in row.items():
            if key != EPOCH and is_ranked(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                if Ranking.of(key).better(value, best.get(key)):
                    best[key] = value
    return Summary(
        metric=metric,
        mode=ranking.mode,
        best_epoch=int(best_row.get(EPOCH, len(history))) if best_row is not None else None,
        at_best=dict(best_row) if best_row is not None else {},
        final=dict(history[-1]),
        best=best,
    )
