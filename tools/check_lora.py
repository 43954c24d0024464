"""Diagnose WAN LoRA files: why a LoRA has no effect, why ComfyUI says "lora key not loaded", what model it is for.

    python tools/check_lora.py out/name_high_noise.safetensors out/name_low_noise.safetensors
    python tools/check_lora.py my_lora.safetensors --task t2v-A14B          # does it fit this variant?
    python tools/check_lora.py my_lora.safetensors --dit low_noise_model/  # fit + ||delta|| / ||W||
    python tools/check_lora.py *.safetensors --json report.json            # '-' writes JSON to stdout

No model is loaded: the LoRA file alone tells its format, shapes and effect; `--dit` reads the DiT's header
and only the weights the LoRA touches. Exit status: 0 when every file is OK or WARN, 1 when any is ERROR,
2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's packages first


def main(argv: list[str] | None = None) -> int:
    from library.diagnostics import diagnose, format_diagnosis, open_dit
    from library.wan.variants import get_variant

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="LoRA .safetensors files (any key format)")
    parser.add_argument("--task", help="WAN variant the LoRA must fit (t2v-A14B, i2v-A14B, ti2v-5B, t2v-1.3B, ...)")
    parser.add_argument("--dit", help="DiT checkpoint to check against (header read; norms of touched weights)")
    parser.add_argument("--json", metavar="OUT", help="also write the reports as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    task = get_variant(args.task).name if args.task else None  # an unknown task or a bad DiT: exit 2 (run_cli)
    dit = open_dit(args.dit, task) if args.dit else None
    reports = [diagnose(path, task=task, dit=dit) for path in args.files]
    text = "\n\n".join(format_diagnosis(r) for r in reports)
    data = json.dumps([r.to_dict() for r in reports], indent=2, default=str)
    if args.json == "-":
        print(data)
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(data + "\n")
    counts = {v: sum(r.verdict == v for r in reports) for v in ("OK", "WARN", "ERROR")}
    if len(reports) > 1 and args.json != "-":
        print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return 1 if counts["ERROR"] else 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))
