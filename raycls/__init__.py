"""raycls: Ray-distributed hyperparameter search for image classification.

The data path runs one way: cli -> tune -> train -> phases -> (config, data, models, evaluate, results).
Lower layers (config, data, models, phases, evaluate) are plain PyTorch and never import Ray.
"""

__version__ = "0.1.0"
