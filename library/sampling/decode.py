"""`--latent_path`: decode latent files (written with `--output_type latent` / `both`, here or by
musubi-tuner) with the VAE alone, into videos or PNG frames. No DiT and no text encoder load.

Each file becomes `{output_name}_{file stem}` (`.mp4` or a frame folder) with the seed, prompt and sizes
its metadata recorded; a file that cannot be decoded (missing, not a latent, channels of the other VAE) is
named in the log and the others still decode (exit 1).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .generate import Sample
from .outputs import LatentFileError, read_latent, save_outputs
from .prompts import SampleRequest

logger = logging.getLogger(__name__)


def _settings(meta: dict, latent: torch.Tensor, variant, path: Path, fps: float | None) -> dict:
    frames = (latent.shape[2] - 1) * variant.vae_stride[0] + 1
    stride = variant.vae_stride[1]
    settings = {"task": variant.name, "source": str(path), "frames": frames, "height": latent.shape[3] * stride,
                "width": latent.shape[4] * stride, "fps": fps or float(meta.get("fps", variant.fps)),
                "prompt": meta.get("prompt", ""), "seed": meta.get("seeds", "unknown")}
    for key in ("negative_prompt", "infer_steps", "guidance_scale", "flow_shift"):
        if key in meta:
            settings[key] = meta[key]
    return settings


def decode_latent_files(args, variant) -> int:
    """Decode every `args.latent_path` file; returns the exit code (0, or 1 when a file failed)."""
    from library.wan.loading import load_vae

    from .cli import DTYPES

    device = torch.device(args.device)
    dtype = DTYPES[args.vae_dtype] if args.vae_dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    vae = load_vae(args.vae, device=device, dtype=dtype, cache_cpu=args.vae_cache_cpu)
    name = args.output_name or time.strftime("%Y%m%d-%H%M%S")
    failed = 0
    for text in args.latent_path:
        path = Path(text).expanduser()
        try:
            latent, meta = read_latent(path)
            if latent.shape[1] != vae.z_dim:
                raise LatentFileError(f"{path}: {latent.shape[1]} latent channels, but the VAE {args.vae} makes "
                                      f"{vae.z_dim}; decode it with the VAE it was made for")
            with torch.no_grad():
                video = vae.decode(latent.to(device))[0].float().cpu()  # [3, F, H, W]
            settings = _settings(meta, latent, variant, path, args.fps)
            sample = Sample(SampleRequest(settings["prompt"], source=str(path)), settings, latent, video)
            paths = save_outputs(sample, args.output_dir, f"{name}_{path.stem}", args.output_type,
                                 save_frames=args.save_frames, trim=args.trim_tail_frames,
                                 metadata=not args.no_metadata, extra={"latent_metadata": meta}, fps=args.fps)
        except (ValueError, OSError) as exc:
            logger.error("%s", exc)
            failed += 1
            continue
        logger.info("decoded %s -> %s", path, ", ".join(str(p) for k, p in paths.items() if k != "sidecar"))
    return 1 if failed else 0
