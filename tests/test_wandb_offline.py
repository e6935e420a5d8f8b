"""An offline W&B run (the default without a key) writes its files and sends nothing: W&B's SDK would start
its telemetry exporter to W&B's servers (two OpenTelemetry threads, flushed at exit) for offline runs too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# A fresh interpreter: the switch is process-wide (an environment variable W&B reads), as in the driver.
SCRIPT = """
import json, os, sys, threading
from pathlib import Path
from raycls.config.experiment import WandbSection
from raycls.results.wandb_log import TrialRun

run = TrialRun(WandbSection(), "offline", Path(sys.argv[1]), experiment="e", trial_id="t1", config={"lr": 0.1})
for epoch in (1, 2):
    run.log({"val_acc": 0.5 + epoch / 10, "epoch": epoch}, step=epoch)
run.finish({"score": 0.7})
print(json.dumps({
    "threads": [t.name for t in threading.enumerate()],
    "error_reporting": os.environ.get("WANDB_ERROR_REPORTING"),
}))
"""


def test_an_offline_trial_run_starts_no_telemetry_exporter(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "wandb")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [name for name in seen["threads"] if name.startswith("Otel")], seen["threads"]
    assert seen["error_reporting"] == "false"
    # The run itself is there, offline, ready for `wandb sync`; a trial's run does not list the installed
    # packages (the experiment's report run does: tests/test_tune.py).
    [run_dir] = (tmp_path / "wandb").rglob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb")) and (run_dir / "files").is_dir()
    assert not (run_dir / "files" / "requirements.txt").exists()
