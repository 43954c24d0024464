"""Caption images and clips with a transformers model (the training guide's step 4).

    python tools/caption.py training_dataset/ --model Salesforce/blip-image-captioning-large
    python tools/caption.py training_dataset/ --model /models/Qwen2.5-VL-7B-Instruct --trigger sks \
        --mode append --batch_size 4 --frames 6

Inputs are a dataset root (with images/ and videos/; captions go to captions/NAME.txt), media folders
(captions go next to the media as NAME.txt) or files. --model is a local folder (read with
local_files_only, nothing downloaded) or a hub id; BLIP / BLIP-2 / Qwen2.5-VL are told apart by the
folder's config.json. Modes: skip_existing (default), overwrite, append.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts' package

from library.errors import positive_int, run_cli  # noqa: E402
from library.prep.caption_files import MODES, caption_media, find_media  # noqa: E402
from library.prep.captioning import load_captioner  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="dataset root(s), media folders or files")
    parser.add_argument("--model", required=True, help="local model folder or hub id (BLIP, BLIP-2, Qwen2.5-VL)")
    parser.add_argument("--family", choices=("blip", "blip2", "qwen2_5_vl", "qwen2_vl"), default=None,
                        help="override the family read from config.json")
    parser.add_argument("--mode", choices=MODES, default="skip_existing")
    parser.add_argument("--trigger", default="", help="trigger word put first in every caption")
    parser.add_argument("--prefix", default="", help="text put right before the generated caption")
    parser.add_argument("--prompt", default=None,
                        help="BLIP: text to continue; BLIP-2: a question; Qwen: replaces the built-in instruction")
    parser.add_argument("--batch_size", type=positive_int, default=4)
    parser.add_argument("--frames", type=positive_int, default=6, help="frames sampled per clip")
    parser.add_argument("--max_new_tokens", type=positive_int, default=96)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default bf16 on GPU")
    parser.add_argument("--caption_extension", default=".txt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    media = find_media(args.inputs)  # a missing input or a model that cannot load: exit 2 (run_cli)
    if not media:
        print(f"error: no images or videos under {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 2
    captioner = load_captioner(args.model, args.family, args.device, args.dtype, args.max_new_tokens, args.prompt)
    stats = caption_media(media, captioner, args.mode, args.trigger, args.prefix, args.batch_size, args.frames,
                          args.caption_extension, progress=not args.quiet)
    print(f"{len(media)} items: {stats.written} captions written, {stats.skipped} kept as they were, "
          f"{len(stats.failed)} unreadable")
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
