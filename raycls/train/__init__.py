"""The per-worker loop, optimizers/schedules, checkpoints, and the ways to launch a trial.

`loop.fit` is plain PyTorch; `local.run_local` runs it in-process; `ray_train` (the only Ray user here)
launches it on Ray Train workers.
"""

from raycls.train.local import run_local
from raycls.train.loop import RunContext, fit

__all__ = ["RunContext", "fit", "run_local"]
