"""Shared fixtures. Real data comes from ../shared/data (see its README) or $RAYCLS_TEST_DATA."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYCLS_TEST_DATA", REPO.parent / "shared" / "data"))

# Explicit, and before anything imports Ray (it reads the mode at import): token authentication is Ray's
# default for new local clusters from 2.59 on, and what raycls users get.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Offline machines: make hub lookups fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set RAYCLS_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Decompressed dataset caches go to a per-session folder unless the user set one (CIFAR-10: ~10 s once).
    os.environ.setdefault("RAYCLS_CACHE", str(Path.home() / ".cache" / "raycls" / "cache"))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def kill_driver_after_rows(command: list[str], env: dict[str, str], board: Path, log: Path, *, rows: int = 2) -> dict[str, int]:
    """Run a `raycls tune` command in its own process group and SIGKILL the group once `rows` leaderboard
    files exist (or it exits, or 240 s pass). Its stderr goes to `log` (a pipe nobody reads could fill and
    stall it). Returns the rows written by then, with their modification times."""
    with open(log, "wb") as stderr:
        driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(board.glob("*.parquet"))) < rows and driver.poll() is None:
            time.sleep(0.2)
        # The driver's group: the driver, and a local Ray it started; a cluster's nodes live on in theirs.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return {p.name: p.stat().st_mtime_ns for p in board.glob("*.parquet")}
