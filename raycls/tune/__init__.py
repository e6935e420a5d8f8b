"""The Tune driver: Tuner assembly, Optuna search, schedulers, resume, callbacks. Imports Ray."""
