"""The driver's live table holds the running trials and the best ended ones, whatever the search's size."""

from __future__ import annotations

import contextlib
import io

from ray.tune.experiment import Trial

from raycls.tune.live import LiveTable


def run_trials(table: LiveTable, n: int, *, fail_every: int = 0) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # not a terminal: one line per event
        for i in range(n):
            trial = Trial("__fake", config={"train.lr": i / n}, trial_id=f"t{i:05d}", stub=True)
            table.on_trial_start(0, [], trial)
            if fail_every and i % fail_every == 0:
                table.on_trial_error(0, [], trial)
                continue
            for epoch in (1, 2):
                table.on_trial_result(0, [], trial, {"epoch": epoch, "val_acc": (i * 7919 % n) / n * epoch / 2})
            table.on_trial_complete(0, [], trial)
    return out.getvalue()


def test_the_live_table_keeps_running_and_best_trials_only() -> None:
    table = LiveTable("big", "val_acc", "max", 2000)
    lines = run_trials(table, 2000, fail_every=10).splitlines()
    assert table._rows == {}  # nothing running
    assert table._ended == {"completed": 1800, "early_stopped": 0, "failed": 200}
    best = [row["best"] for _, row in table._best]
    expected = sorted(((i * 7919 % 2000) / 2000 for i in range(2000) if i % 10), reverse=True)[: LiveTable.BEST_ENDED]
    assert best == expected  # the best ten, best first
    assert lines[-1].endswith("[2000/2000 ended]") and "t01999 completed epoch 2" in lines[-1]
    assert len(table._last_line) == 0  # per-trial line timers are dropped when a trial ends


def test_min_mode_keeps_the_smallest() -> None:
    table = LiveTable("small", "val_acc", "min", 50)
    run_trials(table, 50)
    assert [row["best"] for _, row in table._best] == sorted(row["best"] for _, row in table._best)
    assert table._best[0][1]["best"] == 0.0
