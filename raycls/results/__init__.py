"""Where trials end up: the Parquet leaderboard (write, read, query) and W&B runs. No Ray here."""

from raycls.results.leaderboard import TrialRecord, read_leaderboard, write_trial, written_trials
from raycls.results.query import run_sql, select

__all__ = ["TrialRecord", "read_leaderboard", "run_sql", "select", "write_trial", "written_trials"]
