"""The held-out evaluation suite (metrics, calibration, OOD, shift, errors, CAM). No Ray here.
Metric names live on the ground floor (`raycls.names`), how they rank in `raycls.ranking`."""
