"""Judging a finished (or running) training run: which saved checkpoint to test first (`pick`, from the
run's losses; the ranking itself is `library.training.report.ranking`, which report.html shows at every
save), the side-by-side render of every checkpoint with the same prompts and seeds (`compare`, with its
HTML page from `grid_page`), and sweeps of several variants of one config (`sweep`: the plan, the runs,
resuming; `sweep_page`: sweep.html). CLIs: `tools/pick_checkpoint.py`, `tools/compare_checkpoints.py`,
`tools/sweep.py`.

May import: `library.training` (the names of a run's saves, the report's style and ranking),
`library.sampling` (rendering), `library.wan`, `library.config`, `library.guide`. Nothing below imports it.
"""
