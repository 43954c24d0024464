"""Judging a finished (or running) training run: which saved checkpoint to test first (`pick`, from the
run's losses) and the side-by-side render of every checkpoint with the same prompts and seeds
(`compare`). CLIs: `tools/pick_checkpoint.py`, `tools/compare_checkpoints.py`.

May import: `library.training.checkpoints` (the names of a run's saves), `library.sampling` (rendering),
`library.wan`, `library.config`. Nothing below imports it.
"""
