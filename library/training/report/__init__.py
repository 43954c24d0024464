"""A run's report, written into its output folder by the trainer (at the start, at every save, at the end)
and rebuildable from the folder alone (`tools/report.py`):

    plots.py     the PNG plots (matplotlib's Agg renderer; OpenCV's loss.png when matplotlib is missing)
    summary.py   run_summary.json: the run's facts (experts, dataset, settings, time per step, memory)
    ranking.py   the saves ranked by the run's losses (what tools/pick_checkpoint.py prints)
    html.py      the shared HTML style (also used by sweep.html and the checkpoint-comparison grids)
    page.py      report.html

May import: the training modules below the loop (`logs`, `files`, `checkpoints`), `library.config`. Never
the loop (`trainer`), which calls it.
"""

from .page import REPORT_FILE, write_report  # noqa: F401
