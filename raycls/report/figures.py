"""REPORT_SECTIONS: each section of a report is a Plotly figure built from ReportData, or a note saying why
that experiment has none (one trial, no sampled parameters, no finished trial, ...). A section is added by
registering one function; page.py lays them out in registration order.

Traces of many trials are drawn as one trace per status with gaps (None) between trials: a report of 2,000
trials stays a handful of traces, which browsers and kaleido draw in a blink.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from raycls import names
from raycls.registry import Registry
from raycls.report.data import ReportData, timestamp
from raycls.report.overfitting import overfitting_epoch
from raycls.results.render import cell

STATUS_COLOURS = {"completed": "#2b8a3e", "early_stopped": "#e8590c", "failed": "#c92a2a"}
TOP_EVALUATED = 3  # trials whose evaluation plots the report shows


@dataclass
class Section:
    name: str
    title: str
    about: str  # one sentence: what the figure shows and how to read it
    figure: go.Figure | None = None
    note: str | None = None  # why there is no figure (or what to keep in mind reading it)
    images: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG) shown under the figure


REPORT_SECTIONS: Registry[Callable[[ReportData], Section | None]] = Registry("report section")


def build_sections(data: ReportData) -> list[Section]:
    """Every registered section, in registration order (a builder returns None when it never applies)."""
    sections = [build(data) for _, build in REPORT_SECTIONS.in_order()]
    return [s for s in sections if s is not None]


def _fmt(value: Any) -> str:
    """A leaderboard cell as the CLI shows it (`cell`), but a NaN blank and a timestamp to the second."""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return cell(value)


def _layout(fig: go.Figure, title: str, **kwargs: Any) -> go.Figure:
    fig.update_layout(
        **{"title": title, "template": "plotly_white", "margin": {"l": 60, "r": 30, "t": 60, "b": 50}, **kwargs}
    )
    return fig


def _metric_label(data: ReportData) -> str:
    return f"{data.metric} ({'higher' if data.ranking.maximize else 'lower'} is better)"


# ------------------------------------------------------------------------------------------ sections
@REPORT_SECTIONS.register("leaderboard")
def leaderboard(data: ReportData) -> Section:
    """A table with buttons that sort it (Plotly's own update menus: no JavaScript of ours)."""
    columns = [
        "trial_id",
        "status",
        "score",
        data.metric,
        "test_acc",
        "epochs",
        "best_epoch",
        "wall_s",
        *data.params,
        "error",
    ]
    seen: set[str] = set()
    columns = [c for c in columns if any(c in r for r in data.rows) and not (c in seen or seen.add(c))]
    by_score = data.ranking.sort(data.rows)
    orders: dict[str, list[dict]] = {
        "score, best first": by_score,
        "end time": list(data.rows),
        "wall time, longest first": sorted(data.rows, key=lambda r: -(r.get("wall_s") or 0.0)),
        "status": sorted(by_score, key=lambda r: str(r.get("status"))),  # stable: best first within a status
    }
    if "test_acc" in columns:
        orders["test_acc, best first"] = sorted(data.rows, key=lambda r: -(r.get("test_acc") or -1.0))

    def cells(rows: list[dict]) -> list[list[str]]:
        return [[_fmt(r.get(c)) for r in rows] for c in columns]

    first = next(iter(orders.values()))
    fig = go.Figure(
        go.Table(
            header={"values": [f"<b>{c}</b>" for c in columns], "align": "left"},
            cells={"values": cells(first), "align": "left"},
        )
    )
    buttons = [
        {"label": f"sort by {label}", "method": "restyle", "args": [{"cells.values": [cells(rows)]}]}
        for label, rows in orders.items()
    ]
    _layout(
        fig,
        f"{len(data.rows)} trials",
        height=min(900, 120 + 26 * len(data.rows)),
        updatemenus=[
            {"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top"}
        ],
    )
    return Section("leaderboard", "Leaderboard", "Every trial's row; the menu at the top right sorts the table.", fig)


@REPORT_SECTIONS.register("status")
def status(data: ReportData) -> Section:
    counts = {s: sum(r.get("status") == s for r in data.rows) for s in STATUS_COLOURS}
    fig = go.Figure()
    for state, colour in STATUS_COLOURS.items():
        rows = [r for r in data.rows if r.get("status") == state]
        if rows:
            fig.add_bar(
                x=[r["trial_id"] for r in rows],
                y=[r.get("wall_s") or 0.0 for r in rows],
                name=f"{state} ({len(rows)})",
                marker_color=colour,
                hovertext=[_fmt(r.get("error")) for r in rows],
            )
    _layout(
        fig,
        "Wall time per trial, by status",
        xaxis_title="trial (in the order they ended)",
        yaxis_title="wall time (s)",
    )
    fig.update_xaxes(
        categoryorder="array", categoryarray=[r["trial_id"] for r in data.rows], showticklabels=len(data.rows) <= 40
    )
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    note = (
        f"{summary}. Every trial failed: see the error column of the leaderboard."
        if counts["failed"] == len(data.rows)
        else summary
    )
    return Section(
        "status",
        "Statuses and wall time",
        "Seconds each trial held its resources, coloured by how it ended.",
        fig,
        note,
    )


@REPORT_SECTIONS.register("best_so_far")
def best_so_far(data: ReportData) -> Section:
    # A failed trial's score (from its last epochs before the error) is not a result to build on.
    rows = [r for r in data.scored() if r.get("status") != "failed"]
    if not rows:
        return Section("best_so_far", "Best score so far", "", note="No trial ended with a score: nothing to compare.")
    start = min(timestamp(r.get("started_at")) for r in data.rows)
    best: list[float] = []
    for r in rows:
        best.append(r["score"] if not best or data.better(r["score"], best[-1]) else best[-1])
    hours = [(timestamp(r.get("ended_at")) - start) / 3600 if math.isfinite(start) else None for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("against trials", "against wall-clock time"))
    for col, x in ((1, list(range(1, len(rows) + 1))), (2, hours)):
        fig.add_scatter(
            x=x,
            y=[r["score"] for r in rows],
            mode="markers",
            name="trial",
            row=1,
            col=col,
            showlegend=col == 1,
            marker={"color": [STATUS_COLOURS.get(r.get("status"), "grey") for r in rows], "size": 6},
            text=[f"{r['trial_id']} ({r.get('status')})" for r in rows],
        )
        fig.add_scatter(
            x=x,
            y=best,
            mode="lines",
            line_shape="hv",
            name="best so far",
            row=1,
            col=col,
            showlegend=col == 1,
            line={"color": "#1c7ed6", "width": 2},
        )
    fig.update_xaxes(title_text="trials ended", row=1, col=1)
    fig.update_xaxes(title_text="hours since the first trial started", row=1, col=2)
    fig.update_yaxes(title_text=_metric_label(data), row=1, col=1)
    _layout(fig, f"Best {data.metric} so far")
    note = "One trial: there is no progress to show yet." if len(rows) == 1 else None
    return Section(
        "best_so_far",
        "Best score so far",
        "Each dot is a trial's score when it ended (colour: its status); the line is the best so far.",
        fig,
        note,
    )


@REPORT_SECTIONS.register("learning_curves")
def learning_curves(data: ReportData) -> Section:
    fig = go.Figure()
    drawn = 0
    for state, colour in STATUS_COLOURS.items():
        x: list[Any] = []
        y: list[Any] = []
        text: list[str] = []
        ends_x, ends_y = [], []
        for row in data.rows:
            epochs = [
                h for h in data.histories.get(row["trial_id"], []) if isinstance(h.get(data.metric), (int, float))
            ]
            if row.get("status") != state or not epochs:
                continue
            drawn += 1
            x += [h.get(names.EPOCH) for h in epochs] + [None]
            y += [h[data.metric] for h in epochs] + [None]
            text += [row["trial_id"]] * len(epochs) + [""]
            ends_x.append(epochs[-1].get(names.EPOCH))
            ends_y.append(epochs[-1][data.metric])
        if x:
            fig.add_scatter(
                x=x,
                y=y,
                text=text,
                mode="lines+markers",
                name=state,
                line={"color": colour, "width": 1},
                marker={"size": 3},
                opacity=0.7,
                connectgaps=False,
            )
            if state == "early_stopped":  # where ASHA stopped each one
                fig.add_scatter(
                    x=ends_x,
                    y=ends_y,
                    mode="markers",
                    name="stopped here",
                    marker={"symbol": "x", "size": 9, "color": colour},
                )
    if not drawn:
        return Section(
            "learning_curves", "Learning curves", "", note="No trial reported an epoch of the experiment metric."
        )
    rungs = data.rungs()
    for rung in rungs:
        fig.add_vline(x=rung, line_dash="dash", line_color="#868e96", annotation_text=f"rung {rung}")
    _layout(fig, f"{data.metric} per epoch, every trial", xaxis_title="epoch", yaxis_title=_metric_label(data))
    about = "Each line is a trial's validation metric per epoch."
    if rungs:
        about += " Dashed lines: ASHA's rungs, where it compared trials; an x: where it stopped one."
    return Section("learning_curves", "Learning curves", about, fig)


TOP_CURVES = 10  # trials whose train vs validation curves the report draws (best first; a menu picks one)
LOSSES = (names.TRAIN_LOSS, names.VAL_LOSS)
ACCURACIES = (names.TRAIN_ACC, names.VAL_ACC)


def trial_overfitting(history: list[dict[str, Any]]) -> int | None:
    """A trial's overfitting point (raycls.report.overfitting) over its last stage's epochs: a chain's
    stages train different objectives, whose losses do not continue one another."""
    last = max((h.get(names.STAGE_INDEX) or 0 for h in history), default=0)
    epochs = [h for h in history if (h.get(names.STAGE_INDEX) or 0) == last]
    return overfitting_epoch(
        [h.get(names.EPOCH) for h in epochs],
        [h.get(names.TRAIN_LOSS) for h in epochs],
        [h.get(names.VAL_LOSS) for h in epochs],
    )


@REPORT_SECTIONS.register("train_val_curves")
def train_val_curves(data: ReportData) -> Section:
    """Per trial: training vs validation loss, and accuracy, per epoch, with the overfitting point marked."""
    title = "Training vs validation"
    shown = [r for r in [*data.ranked(), *data.rows] if data.histories.get(r["trial_id"])]
    trials = list(dict.fromkeys(r["trial_id"] for r in shown))[:TOP_CURVES]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    owners: list[int] = []  # the trial (its position in `trials`) of each trace: what the menu shows
    points: dict[str, int] = {}
    for index, trial in enumerate(trials):
        history = data.histories[trial]
        epochs = [h.get(names.EPOCH) for h in history]
        for col, columns in ((1, LOSSES), (2, ACCURACIES)):
            for column in columns:
                values = [h.get(column) for h in history]
                if not any(isinstance(v, (int, float)) for v in values):
                    continue
                fig.add_scatter(
                    x=epochs,
                    y=values,
                    mode="lines+markers",
                    name=f"{trial} {column}",
                    legendgroup=trial,
                    line={"dash": "solid" if column.startswith("train") else "dash", "width": 1.5},
                    marker={"size": 4},
                    visible=index == 0,
                    row=1,
                    col=col,
                )
                owners.append(index)
        point = trial_overfitting(history)
        if point is None:
            continue
        points[trial] = point
        at = next(h for h in history if h.get(names.EPOCH) == point)
        for col, column in ((1, names.VAL_LOSS), (2, names.VAL_ACC)):
            if isinstance(at.get(column), (int, float)):
                fig.add_scatter(
                    x=[point],
                    y=[at[column]],
                    mode="markers+text",
                    text=[f"overfits after {point}"] if col == 1 else [""],
                    textposition="top center",
                    name=f"{trial} overfitting point",
                    legendgroup=trial,
                    showlegend=col == 1,
                    marker={"symbol": "star", "size": 14, "color": STATUS_COLOURS["failed"]},
                    visible=index == 0,
                    row=1,
                    col=col,
                )
                owners.append(index)
    if not owners:
        return Section(
            "train_val_curves", title, "", note="No trial reported a training or validation loss or accuracy per epoch."
        )
    fig.update_xaxes(title_text="epoch")
    _layout(fig, f"{trials[0]}: training (solid) vs validation (dashed)")
    if len(trials) > 1:
        buttons = [
            {
                "label": trial,
                "method": "update",
                "args": [
                    {"visible": [owner == index for owner in owners]},
                    {"title": f"{trial}: training (solid) vs validation (dashed)"},
                ],
            }
            for index, trial in enumerate(trials)
        ]
        fig.update_layout(
            updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15}]
        )
    about = (
        f"The {len(trials)} best trials' training and validation loss and accuracy per epoch (the menu picks "
        "one). A star: the overfitting point, the epoch after which the validation loss rises while the "
        "training loss keeps falling."
    )
    note = (
        "Overfitting points: " + ", ".join(f"{t} after epoch {e}" for t, e in points.items()) + "."
        if points
        else "No drawn trial overfits: its validation loss does not rise while its training loss falls."
    )
    if not any(names.TRAIN_ACC in h for t in trials for h in data.histories[t]):
        note += " Training accuracy is not recorded for these trials (phases that mix images have none)."
    return Section("train_val_curves", title, about, fig, note)


@REPORT_SECTIONS.register("parallel_coordinates")
def parallel_coordinates(data: ReportData) -> Section:
    rows, params = data.scored(), data.params
    if not params or not rows:
        why = "No parameter was sampled (every trial ran the same config)." if not params else "No trial has a score."
        return Section("parallel_coordinates", "Sampled parameters", "", note=why)
    dimensions = []
    for param in params:
        values = [r.get(param) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values):
            numbers = [float(v) if v is not None else math.nan for v in values]
            dimensions.append({"label": param, "values": numbers})
        else:  # categorical: integer positions labelled with the choices
            choices = sorted({str(v) for v in values})
            dimensions.append(
                {
                    "label": param,
                    "values": [choices.index(str(v)) for v in values],
                    "tickvals": list(range(len(choices))),
                    "ticktext": choices,
                }
            )
    scores = [r["score"] for r in rows]
    dimensions.append({"label": data.metric, "values": scores})
    fig = go.Figure(
        go.Parcoords(
            dimensions=dimensions,
            line={
                "color": scores,
                "colorscale": "Viridis",
                "showscale": True,
                "reversescale": not data.ranking.maximize,
            },
        )
    )
    _layout(fig, "Sampled parameters, coloured by the score", margin={"l": 80, "r": 80, "t": 90, "b": 40})
    return Section(
        "parallel_coordinates",
        "Sampled parameters",
        "One line per scored trial through its sampled values; drag along an axis to filter.",
        fig,
        note="Early-stopped trials are scored at their last epoch, so they sit low by design.",
    )


# Held-out columns a per-choice comparison shows beside the score, when the trials were evaluated.
COMPARED = (names.TEST_ACC, names.TEST_SHIFT_MCA, "test_shift_cifar10_1_acc", names.TEST_ECE)


@REPORT_SECTIONS.register("choices")
def choices(data: ReportData) -> Section | None:
    """Each categorical parameter (model.name in a zoo) compared value by value: the best trial of each
    value's score and held-out metrics side by side."""
    rows = [r for r in data.scored() if r.get("status") != "failed"]
    categorical = [p for p in data.params if any(isinstance(r.get(p), (str, bool)) for r in rows)]
    if not categorical or not rows:
        return None
    shown = ["score", *[c for c in COMPARED if any(isinstance(r.get(c), (int, float)) for r in rows)]]
    fig = make_subplots(rows=len(categorical), cols=1, subplot_titles=categorical)
    for index, param in enumerate(categorical, start=1):
        best: dict[str, dict] = {}
        for row in rows:
            key = str(row.get(param))
            if key not in best or data.better(row["score"], best[key]["score"]):
                best[key] = row
        values = [str(r.get(param)) for r in data.ranking.sort(best.values())]
        for column in shown:
            label = data.metric if column == "score" else column
            fig.add_bar(
                x=values,
                y=[best[v].get(column) for v in values],
                name=label,
                legendgroup=label,
                showlegend=index == 1,
                row=index,
                col=1,
            )
    _layout(fig, "Best trial per choice", barmode="group", height=320 * len(categorical) + 80)
    return Section(
        "choices",
        "Choices compared",
        f"For each value of a categorical parameter, its best trial's {data.metric} and held-out metrics.",
        fig,
        note="test_shift_mca: mean accuracy over the generated corruptions (CIFAR-10-C protocol).",
    )


def _study_section(name: str, title: str, about: str, data: ReportData, plot: Callable[[Any], go.Figure]) -> Section:
    """A figure of Optuna's own visualization module, drawn from the experiment's study."""
    import optuna

    study = data.study
    if study is None:
        return Section(name, title, about, note="The experiment has no Optuna study on this machine (optuna.journal).")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or not data.params:
        why = "no parameter was sampled" if not data.params else f"{len(complete)} trial(s) completed"
        return Section(name, title, about, note=f"Needs at least two completed trials and a sampled parameter: {why}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks these plots experimental
        try:
            fig = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. every completed trial has the same values
            return Section(name, title, about, note=f"Optuna could not draw it: {err}")
    return Section(name, title, about, _layout(fig, title))


@REPORT_SECTIONS.register("importance")
def importance(data: ReportData) -> Section:
    def plot(study: Any) -> go.Figure:
        import optuna

        # Optuna's default trees grow to depth 64: 8 s for 2,000 trials on 2 cores. Depth 8 gives the same
        # importances to two decimals (measured on benchmarks/report_time.py's study) in about 1 s.
        evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=64, max_depth=8, seed=0)
        return optuna.visualization.plot_param_importances(study, evaluator=evaluator, **data.study_target())

    return _study_section(
        "importance",
        "Parameter importance (fANOVA)",
        "How much of the score's variance each parameter explains, by Optuna's fANOVA over the completed trials.",
        data,
        plot,
    )


@REPORT_SECTIONS.register("slices")
def slices(data: ReportData) -> Section:
    def plot(study: Any) -> go.Figure:
        import optuna

        return optuna.visualization.plot_slice(study, **data.study_target())

    return _study_section(
        "slices", "Slice plots", "The score against each parameter, one dot per completed trial.", data, plot
    )


@REPORT_SECTIONS.register("stages")
def stages(data: ReportData) -> Section | None:
    """A chain's stages, each with its own validation metric (`supcon.val_knn_acc`, `arcface.val_acc`)."""
    columns = data.stages
    if not columns:
        return None  # not a chain: no section at all
    fig = go.Figure()
    for state, colour in STATUS_COLOURS.items():
        x: list[Any] = []
        y: list[Any] = []
        for row in data.rows:
            if row.get("status") == state:
                x += [*columns, None]
                y += [row.get(c) for c in columns] + [None]
        if x:
            fig.add_scatter(x=x, y=y, mode="lines+markers", name=state, line={"color": colour, "width": 1}, opacity=0.7)
    _layout(fig, "Each stage's validation metric, per trial", xaxis_title="stage metric", yaxis_title="value")
    return Section("stages", "Chain stages", "One line per trial across the stages of its chain.", fig)


def exploits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every PBT exploit of the experiment, from its rows' `lineage` JSON: {trial, epoch, cloned, from_epoch,
    values}, in epoch order."""
    found = []
    for row in rows:
        for event in json.loads(row.get("lineage") or "[]"):
            found.append({"trial": row["trial_id"], **event})
    return sorted(found, key=lambda e: (e["epoch"], e["trial"]))


@REPORT_SECTIONS.register("lineage")
def lineage(data: ReportData) -> Section | None:
    """PBT / PB2: which trial cloned which, when, and the values it went on with."""
    if not any(row.get("lineage") for row in data.rows):
        return None  # not a population-based search: no section at all
    events = exploits(data.rows)
    fig = go.Figure()
    order = [row["trial_id"] for row in data.rows]
    x: list[Any] = []
    y: list[Any] = []
    for row in data.rows:  # each trial's life, epoch 0 to its last
        x += [0, row.get("epochs") or 0, None]
        y += [row["trial_id"], row["trial_id"], None]
    fig.add_scatter(x=x, y=y, mode="lines", name="trial", line={"color": "#adb5bd", "width": 6})
    if events:
        ex: list[Any] = []
        ey: list[Any] = []
        text: list[str] = []
        for event in events:
            values = ", ".join(f"{k}={_fmt(v)}" for k, v in event["values"].items())
            ex += [event["from_epoch"], event["epoch"], None]
            ey += [event["cloned"], event["trial"], None]
            text += ["", f"{event['trial']} cloned {event['cloned']} (its epoch {event['from_epoch']}): {values}", ""]
        fig.add_scatter(
            x=ex,
            y=ey,
            text=text,
            hoverinfo="text",
            mode="lines+markers",
            name="exploit (clone + perturb)",
            line={"color": "#1c7ed6", "width": 2},
            marker={"symbol": "arrow-bar-up", "size": 9, "angleref": "previous"},
        )
    _layout(
        fig,
        f"PBT lineage: {len(events)} exploit(s)",
        xaxis_title="epoch",
        yaxis={"title": "trial", "categoryorder": "array", "categoryarray": order},
    )
    about = (
        "Each grey bar is a trial; each blue arrow an exploit: the trial at the arrow's head took the checkpoint of "
        "the trial at its tail (at the tail's epoch) and went on with perturbed values (hover for them)."
    )
    note = None if events else "No trial was exploited (none fell in the bottom quantile at a perturbation)."
    return Section("lineage", "Population-based training lineage", about, fig, note=note)


@REPORT_SECTIONS.register("evaluation")
def evaluation(data: ReportData) -> Section:
    images = [
        (f"{row['trial_id']}: {png.stem.replace('_', ' ')}", png)
        for row in data.ranked()[:TOP_EVALUATED]
        for png in data.eval_images(row["trial_id"])
    ]
    about = f"The held-out evaluation of the top {TOP_EVALUATED} trials (raycls eval), when they have one."
    if not images:
        return Section(
            "evaluation",
            "Evaluation of the top trials",
            about,
            note="None of the top trials has evaluation plots (run `raycls eval EXPERIMENT --trial top:3`).",
        )
    return Section("evaluation", "Evaluation of the top trials", about, images=images)


@REPORT_SECTIONS.register("after")
def after(data: ReportData) -> Section | None:
    """What the space's `after:` did with the winner (raycls.after): one table row per step and trial."""
    from raycls.after import read_after

    done = read_after(data.paths)
    if done is None:
        return None
    about = (
        f"The space's after: steps ({', '.join(done['steps'])}) for the {done['trials']} trial(s), run when the "
        "search ended; files under the experiment's eval/, export/ and after/ folders."
    )
    records = done["records"]
    columns = ["step", "trial", "status", "seconds", "results", "output"]
    cells = [
        [r["step"] for r in records],
        [r.get("trial_id") or "" for r in records],
        [r["status"] for r in records],
        [_fmt(r.get("seconds")) for r in records],
        [r.get("error") or ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("metrics") or {}).items()) for r in records],
        [r.get("out") or "" for r in records],
    ]
    fig = go.Figure(go.Table(header={"values": columns, "align": "left"}, cells={"values": cells, "align": "left"}))
    explore = data.paths.after_explore_dir()
    images = [(f"data: {png.stem.replace('_', ' ')}", png) for png in sorted(explore.glob("*.png"))]
    failed = [r for r in records if r["status"] == "failed"]
    note = f"{len(failed)} step(s) failed: see the results column." if failed else None
    return Section("after", "After the search", about, _layout(fig, "After the search"), note=note, images=images)


@REPORT_SECTIONS.register("pareto")
def pareto(data: ReportData) -> Section | None:
    """Multi-objective experiments only: the completed trials on the first two objectives, the front (rank 0,
    computed on read by raycls.results.pareto) drawn as a line, the dominated trials grey."""
    if len(data.objectives) < 2:
        return None
    (x, x_mode), (y, y_mode) = data.objectives[:2]
    about = f"Completed trials by {x} and {y}: on the front, no other trial is as good on every objective and better on one."
    ranked = [r for r in data.rows if r.get("pareto_rank") is not None]
    if not ranked:
        return Section("pareto", "Pareto front", about, note="No completed trial has every objective yet.")
    front = sorted((r for r in ranked if r["pareto"]), key=lambda r: r[x])
    rest = [r for r in ranked if not r["pareto"]]

    def hover(rows: list[dict[str, Any]]) -> list[str]:
        return ["<br>".join([r["trial_id"], *(f"{p}={_fmt(r.get(p))}" for p in data.params)]) for r in rows]

    fig = go.Figure()
    fig.add_scatter(
        x=[r[x] for r in rest],
        y=[r[y] for r in rest],
        mode="markers",
        name="dominated",
        marker={"color": "#adb5bd", "size": 8},
        text=hover(rest),
        hoverinfo="text+x+y",
    )
    fig.add_scatter(
        x=[r[x] for r in front],
        y=[r[y] for r in front],
        mode="lines+markers",
        name="Pareto front",
        marker={"color": STATUS_COLOURS["completed"], "size": 10},
        text=hover(front),
        hoverinfo="text+x+y",
    )
    better = {"max": "higher is better", "min": "lower is better"}
    _layout(fig, "Pareto front", xaxis_title=f"{x} ({better[x_mode]})", yaxis_title=f"{y} ({better[y_mode]})")
    for axis, metric in (("xaxis", x), ("yaxis", y)):
        values = [r[metric] for r in ranked if r[metric] and r[metric] > 0]
        if metric in names.COST_METRICS and values and max(values) > 20 * min(values):  # sizes span decades
            fig.update_layout(**{axis: {"type": "log"}})
    note = (
        f"{len(data.objectives)} objectives: the front is over all of them, drawn on the first two."
        if len(data.objectives) > 2
        else None
    )
    return Section("pareto", "Pareto front", about, fig, note=note)
