"""Rank the saved checkpoints of a training run by its losses and say which to test first.

    python tools/pick_checkpoint.py output/ [--output_name NAME] [--json report.json]

Reads the run's loss.csv (training moving average and, with a validation set, validation loss) and its
checkpoint files; recommends the save with the lowest validation loss (and says when later saves overfit),
or without validation the saves at 60-80% of the run, as the guide advises.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's `library`


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the training output_dir (checkpoints and loss.csv)")
    parser.add_argument("--output_name", help="only the checkpoints of this output_name")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    from library.evaluation.pick import format_report, rank_checkpoints

    report = rank_checkpoints(args.run_dir, args.output_name)  # no checkpoints there: exit 2 (run_cli)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))
