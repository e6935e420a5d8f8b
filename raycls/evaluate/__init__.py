"""Metrics and their names. The evaluation suite (calibration, OOD, shift) grows here. No Ray here."""

from raycls.evaluate import names
from raycls.evaluate.names import MODES, mode_of

__all__ = ["MODES", "mode_of", "names"]
