"""The `raycls` command's contract with a user who typed something wrong: a usage message and exit 2, never a
traceback. Every subcommand is found by walking the command table, so a new one is covered without a test."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from raycls.cli import app, main


def leaf_commands(group=None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    group = group or typer.main.get_command(app)
    found: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        if getattr(command, "commands", None):  # a sub-table (space, cluster)
            found += leaf_commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def test_the_table_has_every_command() -> None:
    assert {("tune",), ("train",), ("leaderboard",), ("space", "validate"), ("cluster", "validate")} <= set(
        leaf_commands()
    )


@pytest.mark.parametrize("command", leaf_commands(), ids=" ".join)
def test_unknown_option_is_a_usage_error(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run([*command, "--bogus"], capsys)
    assert code == 2 and "No such option: --bogus" in text and "Usage:" in text
    assert "Traceback" not in text


def needs_an_argument(command: tuple[str, ...]) -> bool:
    """Whether the command has a required argument (`cluster status` reads the cluster it is on)."""
    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]
    return any(param.required for param in group.params)


@pytest.mark.parametrize(
    "command",
    [c for c in leaf_commands() if c not in {("leaderboard",), ("train",)} and needs_an_argument(c)],
    ids=" ".join,
)
def test_missing_argument_is_a_usage_error(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run(list(command), capsys)
    assert code == 2 and "Missing argument" in text and "Traceback" not in text


def test_bad_option_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run(["leaderboard", "--top", "many"], capsys)
    assert code == 2 and "Invalid value for '--top'" in text and "Traceback" not in text


def test_train_needs_a_space_or_a_trial(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run(["train"], capsys)
    assert code == 2 and "SPACE.yaml or --trial" in text
    code, text = run(["train", "--trial", "no-slash"], capsys)
    assert code == 2 and "EXPERIMENT/TRIAL_ID" in text


def test_leaderboard_of_a_folder_without_one_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not-an-experiment").mkdir()
    code, text = run(["leaderboard", str(tmp_path)], capsys)
    text = " ".join(text.split())  # the console wraps long lines: a longer tmp path moved the break (seen)
    assert code == 2 and f"no leaderboard files under {tmp_path}" in text and "<trial_id>.parquet" in text
    code, text = run(["leaderboard", str(tmp_path), "--history"], capsys)
    assert code == 2 and "no history files" in text


def test_eval_of_a_missing_experiment_or_trial_says_what_to_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run(["eval", "nope", "--storage", str(tmp_path)], capsys)
    assert code == 2 and "experiment 'nope': no leaderboard rows under" in text and "Traceback" not in text
    code, text = run(["eval", "nope", "--suite", "everything", "--storage", str(tmp_path)], capsys)
    assert code == 2 and "unknown eval suite 'everything'; known: default, full" in text
