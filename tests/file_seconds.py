"""Seconds each test took in the last measured full run, for pytest-xdist's order (conftest's
`pytest_collection_modifyitems`): the files with the most selected seconds start first, so that the two
processes end together instead of one running a long file alone at the end. Tests under half a second are
left out (they count as 0). Refresh after a full run:

    pytest -n 2 --dist loadfile --junitxml=run.xml && python -m tests.file_seconds run.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).with_name("file_seconds.json")
REPO = Path(__file__).resolve().parents[1]
SHORTEST_KEPT_S = 0.5


def measured() -> dict[str, dict[str, float]]:
    """`tests/test_x.py` -> {test name: seconds}; empty when the table is missing."""
    return json.loads(TABLE.read_text()) if TABLE.is_file() else {}


def from_junit(path: Path) -> dict[str, dict[str, float]]:
    seconds: dict[str, dict[str, float]] = defaultdict(dict)
    for case in ET.parse(path).getroot().iter("testcase"):
        took, tests = float(case.get("time") or 0), seconds[_file_of(case.get("classname", ""))]
        if took >= SHORTEST_KEPT_S:  # every file is listed, measured, even with no test to list
            tests[case.get("name", "")] = round(took, 1)
    return {name: dict(sorted(tests.items())) for name, tests in sorted(seconds.items())}


def _file_of(classname: str) -> str:
    """junit's `tests.test_x` (or `tests.test_x.TestClass`) -> `tests/test_x.py`."""
    parts = classname.split(".")
    while len(parts) > 1 and not (REPO / Path(*parts).with_suffix(".py")).is_file():
        parts.pop()
    return "/".join(parts) + ".py"


if __name__ == "__main__":
    TABLE.write_text(json.dumps(from_junit(Path(sys.argv[1])), indent=1) + "\n")
