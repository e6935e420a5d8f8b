"""Training phases, one file each, behind one small interface (phases/base.py). No Ray here."""

from raycls.phases import distill, metric, supcon, supervised, token_distill  # noqa: F401  (registers the built-in phases)
from raycls.phases.base import PHASES, Phase, create_phase

__all__ = ["PHASES", "Phase", "create_phase"]
