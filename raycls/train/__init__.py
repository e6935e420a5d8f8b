"""Training one trial on a worker, and the ways to launch it.

- `loop.py`: one stage, top to bottom (build, optimizer, then per epoch: train, evaluate, report);
- `chain.py`: `fit`, a trial's stages in order (hand-over, positions, resume mid-chain);
- `state.py`: checkpoints; `steps.py`: the pieces of a step; `distributed.py`: DDP collectives;
- `local.py`: `run_local`, in this process (`raycls train --no-ray`); `ray_train.py` (the only Ray user
  here, and never `ray.tune`): the per-worker function under Ray Train and the TorchTrainer.
"""

from raycls.train.chain import fit
from raycls.train.local import run_local
from raycls.train.loop import RunContext

__all__ = ["RunContext", "fit", "run_local"]
