"""The `raycls` command: a table of subcommands, each a thin shell over one package function.

Errors a user can cause (RayclsError) print one message and exit with code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

from raycls.allocator import bound_malloc_arenas

bound_malloc_arenas()  # before any thread allocates (pyarrow's import starts one): the driver's memory

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from raycls.errors import RayclsError  # noqa: E402
from raycls.ranking import Ranking  # noqa: E402
from raycls.storage import ExperimentPaths, is_local  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ray-distributed hyperparameter search for image classification.",
)
space_app = typer.Typer(no_args_is_help=True, help="Inspect search-space YAMLs.")
app.add_typer(space_app, name="space")
cluster_app = typer.Typer(
    no_args_is_help=True, help="Check Ray cluster launcher YAMLs (cluster/); show a running cluster's hosts."
)
app.add_typer(cluster_app, name="cluster")
data_app = typer.Typer(no_args_is_help=True, help="Look at a dataset before training on it.")
app.add_typer(data_app, name="data")
# Wide output when piped (rich would wrap to 80 columns), the terminal's width otherwise.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 200)))

SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a config path: --set train.lr=0.01 (repeatable).")
]
StorageOption = Annotated[
    Optional[str],
    typer.Option(
        "--storage", help="Results root: a path or s3:// / gs:// URI. Default $RAYCLS_STORAGE or ./raycls_results."
    ),
]


def storage_root(storage: str | None) -> str:
    return storage or os.environ.get("RAYCLS_STORAGE") or str(Path("raycls_results").absolute())


# ------------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class TrainJob:
    """What `raycls train` runs: one trial config, how it is judged, where its workers run."""

    name: str
    config: Any  # TrialConfig
    metric: str
    mode: str
    resources: Any  # Resources
    # A PBT trial's replay: (first epoch, config) segments of its schedule (raycls.train.local.run_schedule).
    schedule: list = field(default_factory=list)


def _job_from_space(space: Path, overrides: list[str], storage: str, fast_dev_run: bool) -> TrainJob:
    from raycls.config import resolve_trial
    from raycls.prepare import prepare_experiment

    experiment = prepare_experiment(space, overrides, storage=storage, fast_dev_run=fast_dev_run)
    section = experiment.experiment
    return TrainJob(experiment.name, resolve_trial(experiment), section.metric, section.mode, section.resources)


def _job_from_row(reference: str, overrides: list[str], storage: str, fast_dev_run: bool) -> TrainJob:
    """Replay a leaderboard row: its full config and seed, judged by its metric, on its number of workers."""
    from raycls.config import load_experiment, parse_overrides
    from raycls.config.experiment import Resources
    from raycls.config.load import config_of_row
    from raycls.references import replay_row
    from raycls.storage import ExperimentPaths

    row = replay_row(storage, reference)
    config = config_of_row(row, parse_overrides(overrides))
    config = config.fast_dev_run() if fast_dev_run else config
    paths = ExperimentPaths(storage, row["experiment"])
    # The experiment's resources as it ran (space.yaml beside its leaderboard), else its rows' worker count.
    resources = (
        load_experiment(Path(paths.space_file())).experiment.resources
        if paths.local and paths.exists(paths.space_file())
        else Resources(workers=row.get("workers") or 1)
    )
    job = TrainJob(f"{row['experiment']}-{row['trial_id']}", config, row["metric"], row["mode"], resources)
    if row.get("schedule") and len(json.loads(row["schedule"])) > 1:  # a PBT trial that cloned: its schedule
        from raycls.train.local import schedule_segments

        pinned = parse_overrides(overrides)
        segments = schedule_segments(
            json.loads(row["schedule"]),
            lambda values: config_of_row(row, {**values, **pinned}),  # run_schedule shrinks a fast dev run
        )
        job = dataclasses.replace(job, schedule=segments)
    return job


@app.command()
def train(
    space: Annotated[Optional[Path], typer.Argument(help="Search-space YAML; its `base` config is trained.")] = None,
    trial: Annotated[
        Optional[str],
        typer.Option("--trial", help="EXPERIMENT/TRIAL_ID: replay that leaderboard row's config and seed."),
    ] = None,
    set_: SetOption = None,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="Run in this process (breakpoint() works).")] = False,
    fast_dev_run: Annotated[
        bool, typer.Option("--fast-dev-run", help="Smoke test: one epoch per stage, two batches of each split.")
    ] = False,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder (default: under the storage root).")
    ] = None,
    storage: StorageOption = None,
) -> None:
    """Train one trial: the space's `base` config (plus --set overrides), or a leaderboard row (--trial)."""
    if (space is None) == (trial is None):
        raise RayclsError("raycls train: give a SPACE.yaml or --trial EXPERIMENT/TRIAL_ID (one of the two)")
    root = storage_root(storage)
    job = (
        _job_from_space(space, set_ or [], root, fast_dev_run)
        if space is not None
        else _job_from_row(trial, set_ or [], root, fast_dev_run)
    )  # type: ignore[arg-type]
    out = out or Path(root) / job.name / "train" / time.strftime("%Y%m%d-%H%M%S")
    if not is_local(str(out)):
        raise RayclsError(f"--out {out}: `raycls train` writes to a local folder; use --out DIR")
    started = time.perf_counter()
    if job.schedule:  # a PBT trial's schedule: its segments, one after another, in this process
        from raycls.train.local import run_schedule

        console.print(f"[dim]replaying the trial's PBT schedule: {len(job.schedule)} segment(s), in this process[/]")
        summary = run_schedule(
            job.schedule, out, metric=job.metric, mode=job.mode, fast_dev_run=fast_dev_run, on_epoch=_print_epoch
        )
    elif no_ray:
        if trial is not None:
            # A replay computes as its trial did: Ray runs a trial with as many intra-op threads as CPUs it
            # asked for, and a CPU's float sums depend on how work is split over threads.
            import torch

            torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
        summary = _train_in_process(job.config, out, job.metric, job.mode, fast_dev_run)
    else:
        from raycls.cluster.resources import local_cpus_needed
        from raycls.train.ray_train import train_with_ray
        from raycls.tune.cluster import init_ray

        init_ray(None, needed_cpus=local_cpus_needed(job.resources))
        console.print(f"[dim]Ray Train: {job.resources.workers} worker(s); use --no-ray to debug in-process[/]")
        summary = train_with_ray(
            job.config,
            out,
            resources=job.resources,
            metric=job.metric,
            mode=job.mode,
            fast_dev_run=fast_dev_run,
            on_epoch=_print_epoch,
        )
    _print_summary(summary, time.perf_counter() - started)
    console.print(f"Wrote config.json, metrics.json and checkpoints/ to [bold]{out}[/]")


def _print_epoch(metrics: dict[str, float]) -> None:
    shown = {
        k: metrics[k]
        for k in ("epoch", "stage", "train_loss", "val_loss", "val_acc", "val_knn_acc", "images_per_s")
        if k in metrics
    }
    from raycls.results.render import cell

    console.print("  ".join(f"{k}={cell(v)}" for k, v in shown.items()))


def _train_in_process(config, out: Path, metric: str, mode: str, fast_dev_run: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raycls.train import run_local

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
    ) as bar:
        state = {"epoch": 1, "task": bar.add_task("epoch 1", total=None, metrics="")}

        def on_progress(done: int, total: int) -> None:
            bar.update(state["task"], completed=done, total=total)

        def on_epoch(metrics: dict[str, float]) -> None:
            stage = f"{metrics['stage']} " if "stage" in metrics else ""  # a chain's stage
            text = f"{stage}{metric}={metrics.get(metric, float('nan')):.4f} loss={metrics.get('train_loss', float('nan')):.4f}"
            bar.update(state["task"], metrics=text)
            if metrics["epoch"] < config.total_epochs:
                state["epoch"] += 1
                state["task"] = bar.add_task(f"epoch {state['epoch']}", total=None, metrics="")

        return run_local(
            config, out, metric=metric, mode=mode, fast_dev_run=fast_dev_run, progress=on_progress, on_epoch=on_epoch
        )


def _print_summary(summary, seconds: float) -> None:
    from raycls.results.render import cell

    table = Table(title=f"Trial finished in {seconds:.1f} s (best epoch {summary.best_epoch} by {summary.metric})")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    for key, value in summary.final.items():
        best = summary.best.get(key)
        table.add_row(key, cell(value), "" if best is None else cell(best))
    console.print(table)


# -------------------------------------------------------------------------------------------- tune
@app.command()
def tune(
    space: Annotated[Path, typer.Argument(help="Search-space YAML.")],
    set_: SetOption = None,
    storage: StorageOption = None,
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster: auto, or ray://host:10001. Default: a local Ray.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the experiment in the storage (after Ctrl-C or a crash).")
    ] = False,
    wandb: Annotated[
        Optional[str], typer.Option(help="W&B mode: auto, online, offline or disabled (overrides the YAML).")
    ] = None,
    num_cpus: Annotated[
        Optional[int], typer.Option(help="Logical CPUs of a local Ray (default: enough for the trials).")
    ] = None,
    top: Annotated[int, typer.Option(help="Trials to print from the leaderboard at the end.")] = 5,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Ray's and the trials' own logs.")] = False,
    shared_storage: Annotated[
        bool, typer.Option("--shared-storage", help="--storage is a folder every node mounts at the same path (NFS).")
    ] = False,
    fast_dev_run: Annotated[
        bool,
        typer.Option(
            "--fast-dev-run",
            help="Smoke test: 2 trials of one epoch per stage, two batches per split, as EXPERIMENT-fast-dev-run.",
        ),
    ] = False,
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Do not write the experiment's HTML report at the end.")
    ] = False,
    report_png: Annotated[
        bool,
        typer.Option(
            "--report-png",
            help="Also write the report's figures as PNGs at the end (kaleido + Chromium, ~6 s); "
            "`raycls report EXPERIMENT` writes them by default.",
        ),
    ] = False,
    trials: Annotated[
        Optional[int],
        typer.Option(
            "--trials",
            help="Trials in all (instead of experiment.trials); with --resume, more than before extends the search.",
        ),
    ] = None,
    time_budget: Annotated[
        Optional[float],
        typer.Option(
            "--time-budget",
            help="Seconds for the whole search (instead of experiment.time_budget_s); --resume continues it.",
        ),
    ] = None,
) -> None:
    """Search the space: Optuna proposes trials, ASHA stops weak ones, every trial lands in the leaderboard."""
    from raycls.config import load_experiment, parse_overrides

    if wandb not in (None, "auto", "online", "offline", "disabled"):
        raise RayclsError(f"--wandb {wandb!r}: expected auto, online, offline or disabled")
    # --trials / --time-budget go in before the checks (a grid checks its trials against its combinations);
    # start_search runs every check once (raycls.prepare) and resolves references against the storage, all
    # before Ray starts.
    experiment = load_experiment(space, parse_overrides(set_ or [])).with_limits(
        trials=trials, time_budget_s=time_budget
    )
    if fast_dev_run:
        experiment = experiment.as_fast_dev_run()
    started = time.perf_counter()
    from raycls.tune.start import TuneOptions, start_search

    options = TuneOptions(
        storage=storage_root(storage),
        address=address,
        resume=resume,
        wandb_mode=wandb,
        num_cpus=num_cpus,
        verbose=verbose,
        shared_storage=shared_storage or None,
    )
    search = start_search(experiment, options)  # every check, then Ray coming up on a thread of its own
    from raycls.tune.driver import run_tune  # Ray Tune and Optuna (~2 s) load while Ray starts

    outcome = run_tune(experiment, options, search)
    board = outcome.leaderboard.table
    counts = {s: 0 for s in ("completed", "early_stopped", "failed")}
    for status in board.column("status").to_pylist() if board.num_rows else []:
        counts[status] = counts.get(status, 0) + 1
    console.print(
        f"{experiment.name}: {board.num_rows} trials in the leaderboard "
        f"({', '.join(f'{v} {k}' for k, v in counts.items())}) in {time.perf_counter() - started:.0f} s"
    )
    if outcome.ended is not None:
        console.print(
            f"[yellow]the search ended early[/]: {outcome.ended.detail}; "
            f"`raycls tune {space} --resume` runs the trials that have no row yet",
            highlight=False,
        )
    ranking = Ranking.of(experiment.experiment.metric, experiment.experiment.mode)
    from raycls.results.render import print_top

    print_top(console, outcome.leaderboard, ranking.metric, descending=ranking.maximize, top=top)
    console.print(
        f"Results: {outcome.experiment_dir}   (raycls leaderboard {storage_root(storage)} --experiment {experiment.name})"
    )
    from raycls.after import run_after

    after = run_after(experiment, storage_root(storage), say=lambda text: console.print(text, highlight=False))
    if not no_report and board.num_rows:
        _report_after_search(storage_root(storage), experiment.name, wandb, png=report_png)
    nothing = outcome.none_completed()
    if nothing is not None:  # last, and a non-zero exit: CI and schedulers see a search that produced nothing
        console.print(f"[red]{nothing}[/]", highlight=False, soft_wrap=True)  # one line, for grep and CI
        sys.exit(1)
    if after.failed:  # the search is safe, but a step the space asked for did not happen
        console.print(f"[red]after: {len(after.failed)} step(s) failed[/] (see {after.file})", highlight=False)
        sys.exit(1)


def _report_after_search(root: str, experiment: str, wandb_mode: str | None, *, png: bool) -> None:
    """The search's results are safe in the leaderboard: a report that cannot be drawn is said, not fatal.
    The interactive HTML only, unless asked: the PNGs start a browser (kaleido), 6 of the quickstart's 45 s."""
    from raycls.report.page import write_report

    try:
        files = write_report(root, experiment, wandb_mode=wandb_mode, png=png)
    except Exception as err:  # noqa: BLE001 - any failure here must not hide the finished search
        console.print(
            f"[yellow]the report could not be written[/] ({type(err).__name__}: {err}); "
            f"`raycls report {experiment}` tries again",
            highlight=False,
        )
        return
    _print_report(files)


def _print_report(files) -> None:
    console.print(f"Report: {files.html}  ({len(files.pngs)} PNGs beside it, {files.seconds:.1f} s)", highlight=False)
    if files.png_error:
        console.print(f"[yellow]no PNGs[/]: {files.png_error}", highlight=False)


# ------------------------------------------------------------------------------------- leaderboard
@app.command()
def leaderboard(
    storage: Annotated[
        Optional[str],
        typer.Argument(
            help="Results root (default $RAYCLS_STORAGE or ./raycls_results); `compact [ROOT]` rebuilds the query index."
        ),
    ] = None,
    compact_root: Annotated[
        Optional[str], typer.Argument(help="After `compact`: the results root.", show_default=False)
    ] = None,
    experiment: Annotated[Optional[str], typer.Option(help="Only this experiment.")] = None,
    top: Annotated[Optional[int], typer.Option(help="Only the best K rows.")] = None,
    sort: Annotated[
        Optional[str], typer.Option(help="Column to sort by (default: score, the experiment metric).")
    ] = None,
    ascending: Annotated[bool, typer.Option("--ascending", help="Sort smallest first.")] = False,
    where: Annotated[
        Optional[str], typer.Option(help="Filter, SQL syntax: \"train.lr < 0.01 and status = 'completed'\".")
    ] = None,
    sql: Annotated[Optional[str], typer.Option(help="Any DuckDB SQL over the table `leaderboard`.")] = None,
    format: Annotated[str, typer.Option(help="table, csv, json or markdown.")] = "table",
    columns: Annotated[Optional[str], typer.Option(help="Comma-separated columns to show.")] = None,
    history: Annotated[bool, typer.Option("--history", help="Query the per-epoch history instead.")] = False,
    pareto: Annotated[
        bool,
        typer.Option("--pareto", help="Only the Pareto front of a multi-objective experiment (experiment.objectives)."),
    ] = False,
) -> None:
    """Query the leaderboards of one or all experiments."""
    from raycls.results import read_leaderboard, run_sql, select
    from raycls.results.render import render, rich_table
    from raycls.storage import HISTORY_DIR, LEADERBOARD_DIR

    kind = HISTORY_DIR if history else LEADERBOARD_DIR
    if storage == "compact":
        _compact(storage_root(compact_root), experiment)
        return
    if compact_root is not None:
        raise RayclsError(
            f"leaderboard: one results root, got {storage!r} and {compact_root!r} (`raycls leaderboard compact ROOT` rebuilds the index)"
        )
    root = storage_root(storage)
    read = read_leaderboard(root, experiment, kind=kind)
    for problem in read.skipped:
        Console(stderr=True).print(f"[yellow]skipped[/] {problem}", highlight=False)
    if read.table.num_rows == 0 and not read.files:
        where = f"{root.rstrip('/')}/{experiment}" if experiment else root
        raise RayclsError(
            f"no {kind} files under {where}: expected <storage>/<experiment>/{kind}/<trial_id>.parquet, "
            "as `raycls tune` writes them (pass the storage root, or set $RAYCLS_STORAGE)"
        )
    table = read.table
    if pareto:
        table, first, first_max, shown = _pareto_rows(table, experiment or root)
        if sort is None:  # the front in order of its first objective, best first
            sort, ascending = first, not first_max
    if sql:
        rows = run_sql(table, sql)
    else:
        default_sort = None if history else ("score" if "score" in read.table.column_names else None)
        rows = select(table, where=where, sort=sort or default_sort, descending=not ascending, top=top)
    wanted = [c.strip() for c in columns.split(",")] if columns else (shown if pareto else None)
    if wanted:
        missing = [c for c in wanted if c not in rows.column_names]
        if missing:
            raise RayclsError(f"--columns: no such column {missing}; columns: {', '.join(rows.column_names)}")
        rows = rows.select(wanted)
    if format == "table":
        console.print(rich_table(rows, columns=wanted or (None if not sql and not history else rows.column_names)))
    else:
        sys.stdout.write(render(rows, format))


def _compact(root: str, experiment: str | None) -> None:
    """Rebuild every experiment's query index from its files (reads do it incrementally on their own)."""
    from raycls.results import read_leaderboard
    from raycls.storage import HISTORY_DIR, LEADERBOARD_DIR

    for kind in (LEADERBOARD_DIR, HISTORY_DIR):
        started = time.perf_counter()
        read = read_leaderboard(root, experiment, kind=kind, rebuild_index=True)
        console.print(
            f"{kind}: {read.files} files, {read.table.num_rows} rows indexed in {time.perf_counter() - started:.1f} s"
            + (f" ({len(read.skipped)} skipped)" if read.skipped else ""),
            highlight=False,
        )


def _pareto_rows(table, where: str):
    """The rows on the Pareto front; the first objective and its direction (the default sort); the columns
    worth showing (the objectives, the rank, the sampled parameters)."""
    import pyarrow.compute as pc

    from raycls.results.leaderboard import param_columns
    from raycls.results.pareto import OBJECTIVES, PARETO, PARETO_RANK, parse_objectives

    if PARETO not in table.column_names:
        raise RayclsError(
            f"--pareto: {where} has no multi-objective experiment (its rows have no experiment.objectives); "
            "a single-objective experiment's best row is `--top 1`"
        )
    front = table.filter(pc.fill_null(table.column(PARETO), False))
    objectives = parse_objectives(front.column(OBJECTIVES)[0].as_py()) if front.num_rows else [("score", "max")]
    shown = ["experiment", "trial_id", *(m for m, _ in objectives), PARETO_RANK, "score", *param_columns(front)]
    first = Ranking.of(*objectives[0])
    return front, first.metric, first.maximize, [c for c in dict.fromkeys(shown) if c in table.column_names]


# -------------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    experiment: Annotated[str, typer.Argument(help="Experiment name (a folder of the storage).")],
    trial: Annotated[str, typer.Option(help="best, top:K (by score), or a trial id.")] = "best",
    suite: Annotated[
        Optional[str], typer.Option(help="Evaluation suite: default or full (default: the trial's eval.suite).")
    ] = None,
    storage: StorageOption = None,
    set_: SetOption = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 (default: cuda when there is one).")] = None,
    ensemble: Annotated[
        Optional[str],
        typer.Option(
            help="top:K: average the K best trials' probabilities on the test split (a row of kind ensemble); "
            "snapshots:best or snapshots:TRIAL: those of one trial's kept checkpoints (experiment.keep_checkpoints)."
        ),
    ] = None,
) -> None:
    """Evaluate finished trials' best checkpoints on held-out data; results become leaderboard columns."""
    from raycls.config import parse_overrides
    from raycls.registry import check_name
    from raycls.train.evaluation import evaluate_rows, pick_rows, trial_rows

    if ensemble is not None:
        return _eval_ensemble(experiment, ensemble, storage_root(storage), device or "cpu", suite or "default")
    if suite is not None:
        check_name("eval suite", suite)
    root = storage_root(storage)
    rows = pick_rows(trial_rows(root, experiment), trial, experiment)
    started = time.perf_counter()
    summaries = evaluate_rows(root, experiment, rows, suite=suite, overrides=parse_overrides(set_ or []), device=device)
    for summary in summaries:
        metrics = summary["metrics"]
        shown = {
            k: v
            for k, v in metrics.items()
            if k
            in (
                "test_acc",
                "test_macro_f1",
                "test_auroc",
                "test_ece",
                "test_ece_ts",
                "test_acc_tta",
                "test_shift_mca",
                "test_knn_acc",
            )
        }
        console.print(
            f"{summary['trial_id']}  ({summary['eval_split']} split, suite {summary['eval_suite']}): "
            + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()),
            highlight=False,
        )
    console.print(
        f"evaluated {len(summaries)} trial(s) in {time.perf_counter() - started:.1f} s; files under "
        f"{root.rstrip('/')}/{experiment}/eval/"
    )


def _eval_ensemble(experiment: str, pick: str, root: str, device: str, suite: str) -> None:
    from raycls import names
    from raycls.deliver.ensemble import evaluate_ensemble, load_ensemble
    from raycls.registry import check_name

    check_name("eval suite", suite)
    started = time.perf_counter()
    row = evaluate_ensemble(root, load_ensemble(root, experiment, pick, device=device), suite=suite)
    members = ", ".join(f"{k}={v:.4f}" for k, v in json.loads(row["member_test_acc"]).items())
    console.print(
        f"{row['trial_id']} (test split, {int(row['test_images'])} images): test_acc={row['test_acc']:.4f} "
        f"test_nll={row['test_nll']:.4f} test_ece={row['test_ece']:.4f} params={row['params']:.0f} "
        f"latency_ms={row['latency_ms']:.2f}; members' test_acc: {members} "
        f"({time.perf_counter() - started:.1f} s)",
        highlight=False,
    )
    if names.TEST_SHIFT_MCA in row:  # the suite has the shift step (full)
        shifted = ", ".join(f"{k}={v:.4f}" for k, v in json.loads(row["member_test_shift_mca"]).items())
        console.print(f"  under shift: test_shift_mca={row[names.TEST_SHIFT_MCA]:.4f}; members': {shifted}")


# ------------------------------------------------------------------------------------------ report
@app.command("report")
def report_(
    experiment: Annotated[str, typer.Argument(help="Experiment name (a folder of the storage).")],
    storage: StorageOption = None,
    out: Annotated[
        Optional[Path],
        typer.Option(help="The HTML file (default: <storage>/<experiment>/report/report.html); PNGs go beside it."),
    ] = None,
    png: Annotated[
        bool,
        typer.Option("--png/--no-png", help="Also write each figure as a PNG (kaleido, with a Chrome or Chromium)."),
    ] = True,
    wandb: Annotated[
        Optional[str],
        typer.Option(
            help="W&B mode for the report's run: auto, online, offline or disabled (default: the experiment's)."
        ),
    ] = None,
) -> None:
    """Draw an experiment: one self-contained HTML page (leaderboard, best so far, learning curves, parameters,
    importance, stages, evaluation), its figures as PNGs, and the same figures in W&B."""
    from raycls.report.page import write_report

    if wandb not in (None, "auto", "online", "offline", "disabled"):
        raise RayclsError(f"--wandb {wandb!r}: expected auto, online, offline or disabled")
    _print_report(write_report(storage_root(storage), experiment, out=out, png=png, wandb_mode=wandb))


# ------------------------------------------------------------------------------------------ export
@app.command("export")
def export_(
    experiment: Annotated[str, typer.Argument(help="Experiment name (a folder of the storage).")],
    trial: Annotated[str, typer.Option(help="best (by score) or a trial id.")] = "best",
    format: Annotated[str, typer.Option(help="Export format (onnx).")] = "onnx",
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also try int8 copies (dynamic, static QDQ); write the fastest that beats fp32 at the same accuracy, export.json says why not otherwise.",
        ),
    ] = False,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Folder (default <storage>/<experiment>/export/<trial_id>).")
    ] = None,
    storage: StorageOption = None,
    ensemble: Annotated[
        Optional[str],
        typer.Option(
            help="top:K (the K best trials) or snapshots:best|TRIAL (one trial's kept checkpoints) as one ONNX graph "
            "(their mean probabilities).",
        ),
    ] = None,
) -> None:
    """Export a trial's best model to ONNX (metadata inside), checked against PyTorch with onnxruntime."""
    from raycls.deliver.export import REPORT_FILE, export
    from raycls.deliver.model import load_trial_model

    if format != "onnx":
        raise RayclsError(f"--format {format!r}: only onnx is supported")
    root = storage_root(storage)
    if ensemble is not None:
        from raycls.deliver.ensemble import export_ensemble, load_ensemble

        loaded = load_ensemble(root, experiment, ensemble)
        folder = out or Path(ExperimentPaths(root, experiment).export_dir(loaded.name))
        parity = export_ensemble(loaded, folder)["parity"]
        console.print(
            f"{loaded.name} ({len(loaded.members)} members): max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
            f"accuracy torch {parity['torch_acc']:.4f} / onnx {parity['onnx_acc']:.4f}; wrote {folder}",
            highlight=False,
        )
        return
    model = load_trial_model(root, experiment, trial)
    out = out or Path(ExperimentPaths(root, experiment).export_dir(model.trial_id))
    if not is_local(str(out)):
        raise RayclsError(f"--out {out}: export writes to a local folder; use --out DIR")
    started = time.perf_counter()
    report = export(model, out, int8=int8)
    parity = report["parity"]
    console.print(
        f"{model.trial_id}: {parity['images']} {parity['split']} images, max |logit diff| "
        f"{parity['max_abs_logit_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}, "
        f"accuracy torch {parity['torch_acc']:.4f} / onnx {parity['onnx_acc']:.4f}",
        highlight=False,
    )
    if "int8" in report and report["int8"]["shipped"]:
        q = report["int8"]
        console.print(
            f"int8 ({q['shipped']}): accuracy {q['acc']:.4f} ({q['acc_delta']:+.4f}), size x{q['size_ratio']:.2f}, "
            f"CPU latency x{q['latency_ratio']:.2f}",
            highlight=False,
        )
    elif "int8" in report:
        console.print(f"int8: not written, {report['int8']['why']}", highlight=False)
    console.print(
        f"Wrote {', '.join(report['files'])} and {REPORT_FILE} to [bold]{out}[/] in {time.perf_counter() - started:.1f} s"
    )


# ----------------------------------------------------------------------------------------- predict
@app.command("predict")
def predict_(
    source: Annotated[str, typer.Argument(help="An experiment name (its --trial) or an exported model.onnx.")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or globs.")],
    trial: Annotated[str, typer.Option(help="best (by score) or a trial id (with an experiment).")] = "best",
    topk: Annotated[int, typer.Option(help="Classes per image.", min=1)] = 3,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Average the trial's TTA views (those of its test_acc_tta; flips only if it trained with them).",
        ),
    ] = False,
    gradcam: Annotated[
        Optional[Path], typer.Option("--gradcam", help="Write a GradCAM++ overlay per image to this folder.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="predictions.parquet or predictions.csv")] = Path(
        "predictions.parquet"
    ),
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 64,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda (default: cuda when there is one).")] = None,
    invert: Annotated[
        str,
        typer.Option(help="Grey images made light-on-dark first: no, yes, or auto (those lighter than mid-grey)."),
    ] = "no",
    storage: StorageOption = None,
) -> None:
    """Predict classes for images (files, folders, globs, or CSVs of file names such as an unlabelled test
    set) with a trial's best model (or an exported ONNX file); one row per image."""
    import torch

    from raycls.deliver.model import load_trial_model
    from raycls.deliver.predict import Predictor, image_paths, predict, write_predictions
    from raycls.train.steps import default_device

    run_on = torch.device(device) if device else default_device()
    if source.endswith(".onnx"):
        if not Path(source).is_file():
            raise RayclsError(f"{source}: no such ONNX file")
        predictor = Predictor.from_onnx(Path(source))
    else:
        predictor = Predictor.from_trial(
            load_trial_model(storage_root(storage), source, trial, device=str(run_on)), run_on
        )
    paths = image_paths(images)
    started = time.perf_counter()
    inverted = {"no": False, "yes": True, "auto": "auto"}
    if invert not in inverted:
        raise RayclsError(f"--invert {invert!r}: expected no, yes or auto")
    rows = predict(
        predictor, paths, topk=topk, tta=tta, batch_size=batch_size, gradcam=gradcam, invert=inverted[invert]
    )
    write_predictions(rows, out)
    failed = sum(r["error"] is not None for r in rows)
    console.print(
        f"{len(rows)} image(s), {failed} unreadable, in {time.perf_counter() - started:.1f} s -> [bold]{out}[/]"
    )


# ------------------------------------------------------------------------------------------- serve
@app.command("serve")
def serve_(
    experiment: Annotated[str, typer.Argument(help="Experiment name (a folder of the storage).")],
    trial: Annotated[str, typer.Option(help="best (by score) or a trial id.")] = "best",
    engine: Annotated[
        str,
        typer.Option(
            help="local: uvicorn in this process (one machine, no cluster); ray: Ray Serve (--address, replicas, autoscaling)."
        ),
    ] = "ray",
    replicas: Annotated[
        int, typer.Option(help="Replicas of the model (the minimum when --max-replicas is set).", min=1)
    ] = 1,
    max_replicas: Annotated[
        Optional[int], typer.Option(help="Autoscale up to this many replicas with the request queue.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Annotated[
        Optional[str], typer.Option(help="A Ray cluster to serve on (`auto`: the one this node belongs to).")
    ] = None,
    log_dir: Annotated[
        Optional[str], typer.Option(help="Request log folder (default <storage>/<experiment>/serve/requests).")
    ] = None,
    log_rows: Annotated[int, typer.Option(help="Write the request log every this many requests ...", min=1)] = 256,
    log_seconds: Annotated[float, typer.Option(help="... or this many seconds, and at shutdown.", min=0.01)] = 5.0,
    storage: StorageOption = None,
) -> None:
    """Serve a trial's best model over HTTP: POST /predict, GET /healthz, GET /metadata."""
    from raycls.deliver.app import TOKEN_ENV, ServeOptions
    from raycls.deliver.engines import ENGINES, Hosting

    run = ENGINES.get(engine)
    token = os.environ.get(TOKEN_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1"):
        Console(stderr=True).print(
            f"[yellow]warning:[/] listening on {host}: reachable from other machines"
            + ("" if token else f"; set {TOKEN_ENV} to require a bearer token")
        )
    options = ServeOptions(
        storage=storage_root(storage),
        experiment=experiment,
        trial=trial,
        log_dir=log_dir,
        token=token,
        log_rows=log_rows,
        log_seconds=log_seconds,
    )
    hosting = Hosting(host=host, port=port, replicas=replicas, max_replicas=max_replicas, address=address)
    run(
        options,
        hosting,
        lambda url: console.print(f"serving {experiment} ({trial}) at {url}/predict with {engine}  (Ctrl-C stops)"),
    )


@data_app.command("explore")
def data_explore(
    space: Annotated[Path, typer.Argument(help="Search-space YAML; its `base` data section (and seed) is explored.")],
    set_: SetOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Report folder (default: <storage>/data/<dataset>).")
    ] = None,
    storage: StorageOption = None,
) -> None:
    """Class balance, sizes, brightness/contrast, channel stats, duplicates and train/test leakage."""
    from raycls.config import resolve_trial
    from raycls.data.explore import REPORT_FILE, explore
    from raycls.prepare import prepare_experiment

    config = resolve_trial(prepare_experiment(space, set_ or []))
    out = out or Path(storage_root(storage)) / "data" / config.data.name
    report = explore(config, out)
    for name, split in report["splits"].items():
        console.print(
            f"{name}: {split['images']} images {split['channels']}x{split['image_size'][0]}x{split['image_size'][1]}, "
            f"imbalance {split['imbalance_ratio']:.2f}, brightness {split['brightness']['mean']:.3f}, "
            f"exact duplicates {split['exact_duplicate_images']}, near duplicates {split['near_duplicate_images']}",
            highlight=False,
        )
    if "train_test_leakage" in report:
        leak = report["train_test_leakage"]
        console.print(
            f"train/test leakage: {leak['exact']} exact, {leak['near']} near-duplicate test images", highlight=False
        )
    console.print(f"Wrote {REPORT_FILE} and PNGs to [bold]{out}[/]")


# ------------------------------------------------------------------------------------------- space
@space_app.command("validate")
def space_validate(
    space: Annotated[Path, typer.Argument(help="Search-space YAML to check.")],
    samples: Annotated[int, typer.Option(help="How many parameter sets to sample and resolve.")] = 3,
    set_: SetOption = None,
) -> None:
    """Check a search-space YAML and print parameter sets sampled from it."""
    from raycls.config.sampling import sample_configs
    from raycls.prepare import environment_problems, prepare_experiment

    # The file is checked here; what this machine lacks (data, weights) is said, and refused by `raycls tune`.
    experiment = prepare_experiment(space, set_, environment=False)
    table = Table(
        title=f"{experiment.name}: {len(experiment.space.params)} parameters, "
        f"{experiment.experiment.trials} trials by {experiment.search.algorithm}"
    )
    table.add_column("parameter")
    table.add_column("distribution")
    table.add_column("when")
    for path, param in experiment.space.params.items():
        spec = param.model_dump(exclude={"when", "type"})
        table.add_row(path, f"{param.type} {spec}", str(param.when or ""))
    console.print(table)
    for i, (params, _config) in enumerate(sample_configs(experiment, samples, seed=experiment.search.seed)):
        console.print(f"sample {i + 1}: {params}")
    for problem in environment_problems(experiment):
        console.print(f"[yellow]not on this machine[/] (`raycls tune` refuses it): {problem}", highlight=False)
    console.print(f"[green]OK[/] {space}")


@cluster_app.command("validate")
def cluster_validate(
    launcher: Annotated[Path, typer.Argument(help="A `ray up` YAML or a KubeRay RayCluster manifest.")],
) -> None:
    """Check a cluster YAML against Ray's schema and raycls's rules (shared storage, GPUs, dashboard, secrets)."""
    from raycls.cluster.validate import check_launcher

    check_launcher(launcher)
    console.print(f"[green]OK[/] {launcher}")


@cluster_app.command("status")
def cluster_status(
    address: Annotated[str, typer.Argument(help="The cluster: auto (the one this node belongs to) or HOST:PORT.")],
    storage: StorageOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The cluster's hosts, their resources and which trials run on each, from Ray's State API (on the head, or
    through `ray dashboard`). With --storage, trials are named by their trial ids."""
    from raycls.tune.cluster import init_ray
    from raycls.tune.cluster_status import as_json
    from raycls.tune.cluster_status import cluster_status as read_status

    init_ray(address)
    hosts = read_status(storage)
    if json_:
        print(as_json(hosts))
        return
    table = Table(title=f"{sum(h.alive for h in hosts)} alive hosts")
    for column in ("host", "address", "node", "state", "resources", "actors", "trials"):
        table.add_column(column)
    for h in hosts:
        resources = ", ".join(f"{k}={v:g}" for k, v in sorted(h.resources.items()))
        actors = ", ".join(f"{k}={v}" for k, v in h.actors.items())
        state = ("head, " if h.head else "") + ("alive" if h.alive else "dead")
        table.add_row(h.hostname, h.ip, h.node_id[:12], state, resources, actors, " ".join(h.trials))
    console.print(table)


# -------------------------------------------------------------------------------------------- main
def usage_errors() -> tuple[type[Exception], ...]:
    """Click's exceptions: typer >= 0.29 raises its vendored copy (`typer._click`), older typers click's own."""
    import click

    errors: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        errors.append(VendoredClickException)
    except ImportError:  # a typer that uses click itself
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except RayclsError as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)  # a path in it stays whole
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except usage_errors() as err:  # a missing argument, an unknown option, a bad value: usage and exit 2
        err.show()  # type: ignore[attr-defined]
        sys.exit(err.exit_code)  # type: ignore[attr-defined]


def run() -> None:
    """The `raycls` command: `main`, then the process ends. A search leaves a heap of torch, Ray and Arrow
    objects that the interpreter's last collections at exit walk: 3.5 s from the quickstart's return to the
    process's end, 2.1 s with them frozen (measured on 2 cores). Frozen, those collections skip them;
    atexit handlers (Ray's shutdown, W&B's) still run. Not in `main`: tests call it in their own process."""
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
