"""`raycls report`: an experiment drawn as one self-contained HTML page, its figures as PNGs beside it.

data.py     what the report reads: leaderboard rows, per-epoch histories, the space as run, the study
figures.py  REPORT_SECTIONS: one Plotly figure (or a note saying why there is none) per section
page.py     the HTML page (plotly.js inlined: it opens offline), the PNGs (kaleido) and the W&B run
"""
