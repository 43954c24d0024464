"""Cache WAN VAE latents for every item of a dataset TOML (musubi-tuner compatible flags).

    python tools/cache_latents.py --dataset_config data.toml --vae Wan2.1_VAE.pth --task i2v-A14B
    python tools/cache_latents.py --dataset_config data.toml --vae Wan2.1_VAE.pth --task i2v-14B \
        --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
    accelerate launch --num_processes 2 tools/cache_latents.py --dataset_config data.toml --vae ...

Every flag of musubi-tuner's `wan_cache_latents.py` is accepted (`wan_cache_latents.py` at the repository
root is this tool under musubi-tuner's name); `--vae_tiling` / `--vae_spatial_tile_sample_min_size` encode
large frames tile by tile, and flags without a use here are logged as skipped
(`library/data/caching_args.py`).
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts'


def main(argv=None) -> int:
    from library.data.caching_args import (
        DTYPES, add_vae_flags, common_parser, musubi_flag_problems, process_split, run_and_report, vae_tile_size,
    )
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.errors import EXIT_USER_ERROR

    parser = common_parser("Cache VAE latents (and I2V image latents) for a dataset TOML.")
    parser.add_argument("--vae", required=True, help="WAN 2.1 or 2.2 VAE file (.pth or .safetensors)")
    parser.add_argument("--vae_dtype", default=None, choices=sorted(DTYPES),
                        help="VAE precision (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--vae_cache_cpu", action="store_true",
                        help="keep the VAE's causal chunk cache in host memory (less VRAM, same latents)")
    parser.add_argument("--i2v", action="store_true", help="also cache image_latents (implied by an I2V --task)")
    parser.add_argument("--clip", default=None,
                        help="CLIP vision file for WAN 2.1 I2V (i2v-14B; required there): official "
                             "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors")
    add_vae_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problem = musubi_flag_problems(args)
    if problem:
        logging.getLogger("cache_latents").error("%s", problem)
        return EXIT_USER_ERROR
    rank, world_size, device = process_split(args.device)
    dtype = DTYPES[args.vae_dtype] if args.vae_dtype else (torch_dtype_for(device))
    return run_and_report(
        lambda: cache_latents(load_dataset_config(args.dataset_config), args.vae, task=args.task, i2v=args.i2v,
                              clip_path=args.clip, device=device, vae_dtype=dtype, vae_cache_cpu=args.vae_cache_cpu,
                              vae_tile_size=vae_tile_size(args), batch_size=args.batch_size or 1,
                              num_workers=2 if args.num_workers is None else args.num_workers, strict=args.strict,
                              rank=rank, world_size=world_size, progress=not args.no_progress))


def torch_dtype_for(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


if __name__ == "__main__":
    sys.exit(main())
