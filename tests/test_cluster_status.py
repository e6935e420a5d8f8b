"""`raycls cluster status`'s reading of which trial runs in which process (the multi-host tests run the
whole command on a real cluster: tests/test_multihost.py)."""

from __future__ import annotations

import json
from pathlib import Path

from raycls.results.leaderboard import TrialRecord, write_trial
from raycls.tune.cluster_status import last_reporters


def _report(folder: Path, *lines: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"trial_id": "cut')


def test_running_trials_are_matched_to_the_process_that_reported_last(tmp_path: Path) -> None:
    """Tune reuses a trial actor for the next trial: the process goes to the trial that reported last from
    it; a trial with a leaderboard row has ended and runs nowhere; a half-written last line is skipped."""
    exp = tmp_path / "exp"
    _report(exp / "tune_trainable_a", {"trial_id": "a", "node_ip": "10.0.0.11", "pid": 7, "timestamp": 100})
    _report(exp / "tune_trainable_b", {"trial_id": "b", "node_ip": "10.0.0.11", "pid": 7, "timestamp": 200})
    _report(exp / "tune_trainable_c", {"trial_id": "c", "node_ip": "10.0.0.12", "pid": 7, "timestamp": 150})
    _report(exp / "tune_trainable_d", {"trial_id": "d", "node_ip": "10.0.0.12", "pid": 9, "timestamp": 300})
    record = TrialRecord(
        experiment="exp", trial_id="d", status="completed", metric="val_acc", mode="max", params={}, param_types={}
    )
    write_trial(str(tmp_path), record)
    assert last_reporters(tmp_path) == {"b": ("10.0.0.11", 7), "c": ("10.0.0.12", 7)}
    assert last_reporters(tmp_path / "missing") == {}
