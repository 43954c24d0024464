"""Rewrite report.html of a training output folder from what is in it (the trainer writes it at the start,
at every save and at the end; run this after adding a strength sweep or a checkpoint comparison inside the
folder, or for a folder of an older version).

    python tools/report.py OUTPUT_DIR [--output_name NAME] [--plots]

--plots redraws the PNG plots from loss.csv first (matplotlib when installed, else OpenCV's loss.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's `library`


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the training output_dir")
    parser.add_argument("--output_name", help="the run's output_name (default: from run_summary.json)")
    parser.add_argument("--plots", action="store_true", help="redraw the plots from loss.csv first")
    args = parser.parse_args(argv)
    from library.errors import UserError
    from library.training.logs import read_loss_csv
    from library.training.report import write_report
    from library.training.report.plots import draw_plots
    from library.training.report.summary import read_summary

    folder = Path(args.output_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; pass a training output_dir")
    if args.plots and (folder / "loss.csv").is_file():
        experts = {e["name"]: tuple(e["timesteps"]) for e in read_summary(folder).get("experts", [])}
        draw_plots(read_loss_csv(folder / "loss.csv")[0], folder, experts)
    print(f"wrote {write_report(folder, args.output_name)}")
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))
