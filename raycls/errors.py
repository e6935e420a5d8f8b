"""One error root for everything a user can cause. The CLI turns these into a message and exit code 2."""

from __future__ import annotations


class RayclsError(Exception):
    """Base of every error raised for bad input or a bad environment (never for raycls bugs)."""


class ConfigError(RayclsError):
    """A YAML file, a `--set` override or a TrialConfig is invalid. Lists every problem at once."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = f"{head}{len(self.problems)} problems\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class RegistryError(RayclsError, KeyError):
    """An unknown name was asked of a registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(RayclsError):
    """A dataset is missing, empty, unreadable or cannot be downloaded."""


class CheckpointError(RayclsError):
    """A checkpoint is missing or cannot be loaded."""


class NonFiniteLossError(RayclsError):
    """Training produced a NaN or infinite loss: the trial is failed, not retried forever."""


class LeaderboardError(RayclsError):
    """A leaderboard cannot be read or written, or a query is malformed."""


class StorageError(RayclsError):
    """A storage path or URI cannot be reached (a bad scheme, missing credentials, no such bucket)."""


def last_error_line(text: str) -> str:
    """The line of a traceback or error text that says what went wrong (the last one naming an Error or
    Exception, else the last line), for a leaderboard cell rather than the whole traceback."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    informative = [line for line in lines if "Error" in line or "Exception" in line]
    return (informative[-1] if informative else (lines[-1] if lines else "unknown error"))[:2000]
