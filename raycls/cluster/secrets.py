"""No access keys, tokens or private keys written in a cluster file; `$VAR` / `${VAR}` references and files
(file_mounts, Kubernetes Secrets) are fine. Runs on every cluster file, whatever its shape."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raycls.cluster.doc import Doc, dotted

# ------------------------------------------------------------------------------------------- secrets
SECRET_NAMES = ("WANDB_API_KEY", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# A value is a reference, not a secret, when it is empty or starts with `$` ($VAR, ${VAR}, $(cat FILE)).
_LITERAL = r"[\"']?(?!\$)[^\s\"'$;&|]{4,}"
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "an AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
    "a GCP service-account key": re.compile(r"\"private_key\"\s*:"),
    "an inline secret": re.compile(
        rf"\b(?:{'|'.join(SECRET_NAMES)}|aws_secret_access_key)\b(?:\s*[=:]\s*|\s+){_LITERAL}", re.IGNORECASE
    ),
}
# Comments are prose, so only the patterns that cannot be prose are looked for there.
COMMENT_PATTERNS = ("an AWS access key id", "a private key", "a GCP service-account key")


def secret_problems(doc: Doc, path: Path) -> list[str]:
    problems = [f"{key}: {what} written in the file; {SECRET_ADVICE}" for key, what in _secrets_in(doc, ())]
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("#"):
            problems += [
                f"line {number} (a comment): {what} written in the file; {SECRET_ADVICE}"
                for what in COMMENT_PATTERNS
                if SECRET_PATTERNS[what].search(line)
            ]
    return problems


SECRET_ADVICE = "take it from an env var ($NAME), a file copied by file_mounts, or a Kubernetes Secret"


def _secrets_in(value: Any, key: tuple[str | int, ...]) -> Iterator[tuple[str, str]]:
    """(dotted key, what) for every secret-looking value: strings, `NAME: value` pairs and k8s env entries."""
    if isinstance(value, str):
        yield from ((dotted(key), what) for what, pattern in SECRET_PATTERNS.items() if pattern.search(value))
    elif isinstance(value, dict):
        if _is_secret_name(value.get("name")) and _is_literal(value.get("value")):
            yield dotted((*key, "value")), f"a literal {value['name']}"
        for name, item in value.items():
            if _is_secret_name(name) and _is_literal(item):
                yield dotted((*key, name)), f"a literal {name}"
            else:
                yield from _secrets_in(item, (*key, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _secrets_in(item, (*key, index))


def _is_secret_name(name: Any) -> bool:
    return isinstance(name, str) and name.upper() in SECRET_NAMES


def _is_literal(value: Any) -> bool:
    return isinstance(value, (str, int)) and str(value).strip() != "" and not str(value).startswith("$")
