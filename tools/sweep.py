"""Train several variants of one config and judge them together: the guide's A/B test or any grid.

    python tools/sweep.py --config_file my_lora.toml --preset_sweep         # conservative, standard, aggressive
    python tools/sweep.py --config_file my_lora.toml --vary learning_rate=5e-5,1e-4,2e-4 --vary network_dim=16,32
    python tools/sweep.py --config_file my_lora.toml --preset_sweep --gpus 0,1,2    # one variant per GPU

Each variant trains in OUTPUT_DIR/<variant>/ (OUTPUT_DIR: --output_dir, else the config's output_dir) with
its own report.html; OUTPUT_DIR/sweep.html overlays the curves, puts the samples side by side and ranks the
variants by validation loss. Run the same command again to continue: finished variants are skipped, an
interrupted one resumes from its last state. `--set KEY=VALUE` changes a setting of every variant (and wins
over the variants' own values, e.g. `--set max_train_epochs=2` for a quick try of the A/B test).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this repo's `library`


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config_file", required=True, help="the training TOML every variant starts from")
    p.add_argument("--output_dir", help="the sweep's folder (default: the config's output_dir)")
    p.add_argument("--preset_sweep", nargs="*", metavar="VARIANT",
                   help="the guide's A/B test: conservative (lr 8e-5, dim 64, 12 epochs), standard (1.2e-4, 64, 15), "
                        "aggressive (1.5e-4, 96, 18); all three when no name is given")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values; several --vary make a grid of every combination")
    p.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY=VALUE",
                   help="a setting for every variant (wins over the variants' values)")
    p.add_argument("--gpus", help="comma list of GPU indices: one variant per GPU at a time (default: one after "
                                  "another on the visible device)")
    p.add_argument("--jobs", type=int, default=1, help="without --gpus: trainings at a time on the visible device "
                                                        "(default 1; more for small models or a large GPU)")
    p.add_argument("--report_only", action="store_true", help="only rewrite sweep.html from the folders")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from library.evaluation.sweep import make_plan, run_sweep, variant_status, write_plan
    from library.evaluation.sweep_page import write_sweep_page

    plan = make_plan(args.config_file, args.output_dir, args.preset_sweep, args.vary, args.settings)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    for v in plan.variants:
        print(f"  {v.name}: {variant_status(plan, v)}; " + ", ".join(f"{k} = {x}" for k, x in v.overrides.items()))
    if args.report_only:
        write_plan(plan)
        print(f"wrote {write_sweep_page(plan)}")
        return 0
    script = REPO / ("finetune/fine_tune_wan.py" if plan.extra.get("full_fine_tune") else "train_network_wan.py")
    results = run_sweep(plan, [sys.executable, str(script)], gpus, on_progress=lambda: write_sweep_page(plan),
                        jobs=args.jobs)
    page = write_sweep_page(plan)
    failed = {k: v for k, v in results.items() if v}
    print(f"wrote {page}" + (f"; not finished: {', '.join(f'{k} (exit {v})' for k, v in failed.items())}"
                             if failed else ""))
    return 130 if 130 in failed.values() else (1 if failed else 0)


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))
