"""How epochs and trials rank, decided once.

Which way a metric is better, which epochs of a chain count, whether one value beats another, a trial's
best epoch, the order of trials, and `--trial best | top:K | ID`: the leaderboard row, the live table, the
progress lines, the target stopper, the searcher, ASHA, checkpoints, the report and the CLI all ask here,
and none of them compares modes itself (tests/test_ranking.py walks the code for strays).

A chain's product is its last stage: only the last stage's epochs count for a trial's score, its best epoch,
a target, ASHA's rungs and the searcher (a DeiT student's val_acc is never judged by its CNN teacher's). A
trial cut before its last stage has no score. Checkpoints, which Tune and Ray Train keep by one number in
every epoch, rank any later stage's epochs above any earlier stage's (`checkpoint_key`).

Ground floor: imports only the metric names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from raycls.names import CHAIN_SCORE, MODES, STAGE_COUNT, STAGE_INDEX, Mode

Row = TypeVar("Row", bound=Mapping[str, Any])

# Wider than any metric's range: stage k's epochs rank above every epoch of stages before it.
CHAIN_STRIDE = 1e6


def is_ranked(metric: str) -> bool:
    """Whether a metric has a direction (val_acc, train_loss, test_ece, ...); counters such as
    trainable_params or epoch_s have none, and no "best"."""
    return metric.rsplit(".", 1)[-1] in MODES


def mode_of(metric: str) -> Mode:
    """A metric's direction; a stage's metric (`supcon.val_knn_acc`) ranks like the metric itself."""
    return MODES.get(metric.rsplit(".", 1)[-1], "max")


def number(value: Any) -> float | None:
    """A finite number, or None (booleans, strings, NaN and missing values do not rank)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return None
    return float(value)


@dataclass(frozen=True)
class Ranking:
    """One metric and its direction: everything that compares values of it."""

    metric: str
    mode: Mode

    @classmethod
    def of(cls, metric: str, mode: str | None = None) -> Ranking:
        if mode not in (None, "max", "min"):
            raise ValueError(f"{mode=} must be 'max' or 'min'")
        return cls(metric, mode or mode_of(metric))  # type: ignore[arg-type]

    @property
    def maximize(self) -> bool:
        return self.mode == "max"

    # ---------------------------------------------------------------------------------------- values
    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` beats `than` (None: nothing yet, so anything does). Ties keep the earlier one."""
        return than is None or (value > than if self.maximize else value < than)

    def as_good(self, value: float, than: float | None) -> bool:
        """Whether the epoch scoring `value` becomes the best over an earlier best `than`: ties go to the later
        epoch, as in Ray's checkpoint manager, which keeps the later of two equal checkpoints. The row's best
        epoch, its checkpoint and the weights evaluated are then always the same epoch's."""
        return than is None or (value >= than if self.maximize else value <= than)

    def improves(self, value: float, than: float | None, min_delta: float) -> bool:
        """Better than `than` by more than `min_delta` (early stopping's patience)."""
        return than is None or self.better(value, than + (min_delta if self.maximize else -min_delta))

    def reached(self, value: Any, target: float) -> bool:
        """Whether a value meets a target (`experiment.stop`)."""
        value = number(value)
        return value is not None and (value >= target if self.maximize else value <= target)

    def best_of(self, values: Iterable[float]) -> float | None:
        kept = [v for v in values if number(v) is not None]
        return (max(kept) if self.maximize else min(kept)) if kept else None

    def signed(self, value: float) -> float:
        """Larger is better, whatever the mode (for sorting and for losses to minimise)."""
        return value if self.maximize else -value

    # ---------------------------------------------------------------------------------------- epochs
    @staticmethod
    def counts(epoch: Mapping[str, Any]) -> bool:
        """Whether an epoch is judged: every epoch of a one-stage trial, only the last stage's of a chain.
        (Epochs written before chains said their length carry no STAGE_COUNT: they all count, ordered by
        `checkpoint_key`.)"""
        index, count = epoch.get(STAGE_INDEX), epoch.get(STAGE_COUNT)
        return index is None or count is None or int(index) == int(count) - 1

    def value(self, epoch: Mapping[str, Any]) -> float | None:
        """The epoch's score: the metric, when the epoch counts."""
        return number(epoch.get(self.metric)) if self.counts(epoch) else None

    def checkpoint_key(self, epoch: Mapping[str, Any]) -> float | None:
        """The metric as checkpoints rank it: a later stage's epoch above any earlier stage's, then by the
        metric (names.CHAIN_SCORE, which Tune and Ray Train keep a chain's checkpoints by)."""
        value = number(epoch.get(self.metric))
        if value is None:
            return None
        stride = float(epoch.get(STAGE_INDEX, 0) or 0) * CHAIN_STRIDE
        return value + stride if self.maximize else value - stride

    def best_epoch(self, history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
        """The epoch whose score is best (ties: the later); None when no epoch counts."""
        best: Mapping[str, Any] | None = None
        for epoch in history:
            key = self.checkpoint_key(epoch) if self.value(epoch) is not None else None
            if key is not None and self.as_good(key, None if best is None else self.checkpoint_key(best)):
                best = epoch
        return best

    # ---------------------------------------------------------------------------------------- trials
    def sort(self, rows: Iterable[Row], key: str = "score") -> list[Row]:
        """Rows best first by `key`; rows without a number last; equal scores keep their order (the one that
        ended first stays first)."""
        rows = list(rows)
        return sorted(rows, key=lambda r: (number(r.get(key)) is None, -self.signed(number(r.get(key)) or 0.0)))

    def pick(self, rows: Sequence[Row], pick: str, *, what: str = "--trial") -> list[Row]:
        """`best` (the completed trial with the best score), `top:K` (the K best completed trials) or a trial
        id (any status). A trial that breaks the experiment's constraints (`feasible` false) is never best nor
        in a top:K. Raises PickError with what was expected and what there is."""
        if pick == "best" or pick.startswith("top:"):
            k = 1 if pick == "best" else _positive(pick.removeprefix("top:"), what)
            done = [r for r in rows if r.get("status") == "completed" and number(r.get("score")) is not None]
            if not done:
                statuses = sorted({str(r.get("status")) for r in rows})
                raise NoCompletedTrial(
                    f"{what} {pick}: no completed trial with a score ({len(rows)} row(s); statuses: {statuses})"
                )
            done = [r for r in done if r.get("feasible") is not False]
            if not done:
                raise NoCompletedTrial(f"{what} {pick}: every completed trial breaks the experiment's constraints")
            return self.sort(done)[:k]
        return [row_of(rows, pick, what=what, hint="; or use best / top:K")]


def row_of(rows: Sequence[Row], trial_id: str, *, what: str = "--trial", hint: str = "") -> Row:
    """The row of one trial id; PickError listing the known ids otherwise."""
    match = next((r for r in rows if r.get("trial_id") == trial_id), None)
    if match is None:
        known = ", ".join(sorted(str(r.get("trial_id")) for r in rows))
        raise PickError(f"{what} {trial_id!r}: no such trial (known: {known}){hint}")
    return match


class PickError(ValueError):
    """`--trial` / `pick:` names nothing that exists. Callers turn it into their own error type."""


class NoCompletedTrial(PickError):
    """`best` / `top:K` over rows of which none completed with a score."""


def _positive(text: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise PickError(f"{what} top:{text}: expected best, top:K with K >= 1, or a trial id")
    return int(text)


def checkpoint_attribute(metric: str, stages: int) -> str:
    """What Tune and Ray Train keep a trial's best checkpoints by: the metric, or a chain's CHAIN_SCORE."""
    return CHAIN_SCORE if stages > 1 else metric
