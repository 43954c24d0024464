"""Cache umT5 outputs for every caption of a dataset TOML (musubi-tuner compatible flags).

    python tools/cache_text_encoder_outputs.py --dataset_config data.toml --t5 models_t5_umt5-xxl-enc-bf16.pth

Every flag of musubi-tuner's `wan_cache_text_encoder_outputs.py` is accepted (the script of that name at the
repository root is this tool); flags without a use here are logged as skipped (`library/data/caching_args.py`).
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts'


def main(argv=None) -> int:
    import torch

    from library.data.caching_args import common_parser, musubi_flag_problems, process_split, run_and_report
    from library.errors import EXIT_USER_ERROR
    from library.data.dataset_config import load_dataset_config
    from library.data.text_caching import cache_text_encoder_outputs

    parser = common_parser("Cache umT5 text-encoder outputs for every caption of a dataset TOML.")
    parser.add_argument("--t5", required=True, help="umT5-XXL encoder weights (.pth or .safetensors)")
    parser.add_argument("--tokenizer", default=None,
                        help="umT5 tokenizer folder (default: google/umt5-xxl beside --t5)")
    parser.add_argument("--fp8_t5", action="store_true",
                        help="umT5 block Linear weights in fp8 e4m3fn with per-channel scales (about 4.6 GB less "
                             "memory for umT5-XXL; ComfyUI fp8 files used as stored). The embeddings differ "
                             "slightly, so switching this rebuilds the caches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problem = musubi_flag_problems(args)
    if problem:
        logging.getLogger("cache_text_encoder_outputs").error("%s", problem)
        return EXIT_USER_ERROR
    if args.num_workers is not None:
        logging.getLogger("cache_text_encoder_outputs").info(
            "skipping --num_workers %d: captions are read in this process (there is no media to decode)",
            args.num_workers)
    rank, world_size, device = process_split(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return run_and_report(
        lambda: cache_text_encoder_outputs(load_dataset_config(args.dataset_config), args.t5, tokenizer=args.tokenizer,
                                           device=device, dtype=dtype, fp8_t5=args.fp8_t5,
                                           batch_size=args.batch_size or 16, strict=args.strict, rank=rank,
                                           world_size=world_size, progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
