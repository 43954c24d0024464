"""Lint a dataset TOML before caching: captions, token counts, sizes, frames, fps, buckets, duplicates,
and the dataset size against the training guide's minimum for the goal (with its rank and epochs).

    python tools/check_dataset.py --dataset_config dataset.toml [--task t2v-A14B] [--goal character] \
        [--tokenizer google/umt5-xxl] [--json lint.json]

Exit status 1 when there is an error (an item would be lost or the config is unusable), else 0; 2 when
the check itself cannot run (an unknown --task or --goal, a tokenizer folder that cannot be loaded, a
--json file that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts' package

from library.config.presets import MINIMUM_SAMPLES  # noqa: E402
from library.data.cache import write_text_atomic  # noqa: E402
from library.data.lint import format_report, lint_dataset  # noqa: E402
from library.data.media_types import VideoDecoderError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_config", required=True, help="dataset TOML (musubi-tuner schema)")
    parser.add_argument("--task", default=None, help="WAN task (t2v-A14B, i2v-A14B, ti2v-5B, ...): its fps and "
                        "bucket step (default: checked as t2v-A14B)")
    parser.add_argument("--goal", default=None, choices=sorted(MINIMUM_SAMPLES),
                        help="compare the dataset size with the guide's minimum for this goal")
    parser.add_argument("--tokenizer", default=None, help="umT5 tokenizer folder for exact caption token counts "
                        "(without it, counts are estimated)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = lint_dataset(args.dataset_config, task=args.task, goal=args.goal, tokenizer=args.tokenizer)
    except (ValueError, VideoDecoderError) as exc:  # an unknown task or goal, a tokenizer or decoder setting
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        try:
            write_text_atomic(Path(args.json), json.dumps(report.to_dict(), indent=2))
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and exc.filename != args.json else ""
            print(f"error: cannot write --json {args.json}: {exc.strerror or exc}{where}", file=sys.stderr)
            return 2
    return report.exit_code


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))
