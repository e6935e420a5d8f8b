"""Write a report: one self-contained HTML page (plotly.js and the evaluation PNGs inlined, so it opens
offline from a laptop or a cluster's shared folder), each figure as a PNG beside it, and one W&B run.

PNGs come from kaleido, which drives a Chrome or Chromium the machine already has; without one the HTML is
still written and the report says why there are no PNGs. Matplotlib could draw PNGs without a browser,
but every figure would then be drawn twice, by two libraries that disagree on the details.
"""

from __future__ import annotations

import base64
import html
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import raycls
from raycls.files import write_text_atomic
from raycls.report.data import ReportData, load_report_data
from raycls.report.figures import Section, build_sections

PNG_SIZE = {"width": 1200, "height": 700}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #212529; }
nav a { margin-right: 1em; }
section { margin-top: 2.5em; border-top: 1px solid #dee2e6; }
.about { color: #495057; } .note { color: #9c3600; }
figure { display: inline-block; margin: 0.5em; } figure img { max-width: 600px; }
"""


@dataclass
class ReportFiles:
    html: Path
    pngs: list[Path] = field(default_factory=list)
    png_error: str | None = None  # why no PNGs were written
    wandb_dir: Path | None = None  # the W&B run's folder (offline runs: ready for `wandb sync`)
    sections: list[Section] = field(default_factory=list)
    seconds: float = 0.0


def default_out(storage: str, experiment: str) -> Path:
    from raycls.storage import ExperimentPaths

    paths = ExperimentPaths(storage, experiment)
    return paths.report_file()


def write_report(
    storage: str, experiment: str, *, out: Path | None = None, png: bool = True, wandb_mode: str | None = None
) -> ReportFiles:
    """Draw the experiment; a LeaderboardError when it has no row to draw."""
    started = time.perf_counter()
    data = load_report_data(storage, experiment)
    out = Path(out) if out is not None else default_out(storage, experiment)
    with tempfile.TemporaryDirectory(prefix="raycls-report-") as scratch:
        data.drawn = Path(scratch)  # the evaluation pictures a trial left to its viewers, inlined below
        sections = build_sections(data)
        files = ReportFiles(out, sections=sections)
        if png:
            files.pngs, files.png_error = write_pngs(sections, out.parent)
        write_text_atomic(out, render_html(data, sections, png_error=files.png_error))
    mode = wandb_mode or (data.space.wandb.mode if data.space is not None else "auto")
    if wandb_mode is None and data.space is not None and "wandb" not in data.space.experiment.tracking:
        mode = "disabled"  # the experiment tracks elsewhere (experiment.tracking: [mlflow])
    files.wandb_dir = log_to_wandb(data, sections, files.pngs, mode)
    files.seconds = time.perf_counter() - started
    return files


# --------------------------------------------------------------------------------------------- HTML
def render_html(data: ReportData, sections: list[Section], *, png_error: str | None = None) -> str:
    from plotly.offline import get_plotlyjs

    best = data.ranked()[0] if data.scored() else None
    counts = ", ".join(
        f"{sum(r.get('status') == s for r in data.rows)} {s}" for s in ("completed", "early_stopped", "failed")
    )
    headline = (
        f"{len(data.rows)} trial{'s' if len(data.rows) != 1 else ''} ({counts}); metric {data.metric} ({data.mode})"
    )
    if best is not None:
        headline += f"; best: {best['trial_id']} with {data.metric} = {best['score']:.4g}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>raycls report: {html.escape(data.experiment)}</title>",
        f"<script>{get_plotlyjs()}</script>",  # plotly.js itself, inlined: the page needs no network
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Experiment {html.escape(data.experiment)}</h1>",
        f"<p>{html.escape(headline)}.</p>",
        (
            f'<p class="about">Storage {html.escape(data.storage)}; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC '
            f"by raycls {raycls.__version__}.{' PNGs: ' + html.escape(png_error) if png_error else ''}</p>"
        ),
        "<nav>" + "".join(f'<a href="#{s.name}">{html.escape(s.title)}</a>' for s in sections) + "</nav>",
    ]
    parts += [f'<p class="note">Skipped: {html.escape(problem)}</p>' for problem in data.skipped]
    for section in sections:
        parts.append(f'<section id="{section.name}"><h2>{html.escape(section.title)}</h2>')
        if section.about:
            parts.append(f'<p class="about">{html.escape(section.about)}</p>')
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.figure is not None:
            parts.append(
                section.figure.to_html(
                    full_html=False,
                    include_plotlyjs=False,
                    div_id=f"figure-{section.name}",
                    config={"displaylogo": False, "responsive": True},
                )
            )
        for caption, png in section.images:
            encoded = base64.b64encode(png.read_bytes()).decode()
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- PNGs
def write_pngs(sections: list[Section], folder: Path) -> tuple[list[Path], str | None]:
    """Every figure as `<section>.png` in `folder` (one browser session for all); (files, why none)."""
    import plotly.io as pio

    drawn = [s for s in sections if s.figure is not None]
    if not drawn:
        return [], None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".png-") as tmp:
        paths = {s.name: Path(tmp) / f"{s.name}.png" for s in drawn}
        figures = {s.name: s.figure for s in drawn}
        try:
            # plotly's write_images drops the errors kaleido returns per figure (a render that timed out on a
            # busy machine writes no file and raises nothing): what is missing is drawn once more.
            for _ in range(2):
                missing = [name for name, path in paths.items() if not path.is_file()]
                if missing:
                    pio.write_images(
                        [figures[n] for n in missing], [paths[n] for n in missing], format="png", **PNG_SIZE
                    )
        except Exception as err:  # noqa: BLE001 - kaleido raises its own types (no Chrome, a crashed browser)
            why = (
                f"kaleido could not draw them ({error_reason(err)}); install Chrome or Chromium "
                "(`plotly_get_chrome`, or apt install chromium) and run `raycls report` again"
            )
            return [], why
        missing = [name for name, path in paths.items() if not path.is_file()]
        why = f"kaleido drew no {', '.join(missing)} (twice); run `raycls report` again" if missing else None
        # Whole files only: each PNG lands under its name by a rename.
        return [Path(shutil.move(str(p), folder / p.name)) for p in paths.values() if p.is_file()], why


def error_reason(err: BaseException) -> str:
    """`Type: first line` of the error, or of the error it was raised from when its own text is empty (kaleido
    raises a bare RuntimeError when its browser does not start), else the type and that it gave no reason."""
    for cause in (err, err.__cause__, err.__context__):
        lines = str(cause).strip().splitlines() if cause is not None else []
        if lines:
            return f"{type(cause).__name__}: {lines[0]}"
    return f"{type(err).__name__} without a message; usually no Chrome or Chromium that kaleido can start"


# ---------------------------------------------------------------------------------------------- W&B
def log_to_wandb(data: ReportData, sections: list[Section], pngs: list[Path], mode: str) -> Path | None:
    """The figures as one run of the experiment's W&B group (job_type "report"), beside its trial runs."""
    from raycls.config.experiment import WandbSection
    from raycls.results.wandb_log import open_run, resolve_mode

    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    import wandb

    settings = data.space.wandb if data.space is not None else WandbSection()
    run = open_run(
        settings,
        mode,
        data.paths.state_dir,
        group=data.experiment,
        job_type="report",
        name=f"{data.experiment}-report",
        id=f"{data.experiment}-report"[:64],
    )
    try:
        logged = {f"report/{s.name}": wandb.Plotly(s.figure) for s in sections if s.figure is not None}
        logged.update({f"report/png/{p.stem}": wandb.Image(str(p)) for p in pngs})
        run.log(logged)
        run.summary["report/trials"] = len(data.rows)
    finally:
        run.finish()
    return Path(run.dir).parent
