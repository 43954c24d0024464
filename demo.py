"""CPU smoke demo of the WAN model family: tiny random-weight models written in the official formats,
loaded through the real loaders, a prompt encoded, a short clip denoised and decoded.

    python demo.py [--task t2v-tiny|ti2v-tiny] [--output demo_output] [--steps 8]

Writes OUTPUT/models/ (the tiny checkpoints), OUTPUT/sample.mp4 and OUTPUT/sample_frames.png. The
weights are random, so the video is structured noise: the point is that every stage runs end to end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # our `library`, not sd-scripts' package of that name

import numpy as np  # noqa: E402
import torch  # noqa: E402

from library.wan.loading import load_dit, load_text_encoder, load_vae  # noqa: E402
from library.wan.tiny import write_tiny_model_set  # noqa: E402


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The WAN inference schedule: linspace(1, 0) shifted by s*sigma / (1 + (s-1)*sigma), ending at 0."""
    sigma = torch.linspace(1.0, 0.0, steps + 1)
    return shift * sigma / (1 + (shift - 1) * sigma)


def write_outputs(video: torch.Tensor, folder: Path, fps: int) -> None:
    import cv2

    frames = ((video[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()  # [F, H, W, 3]
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(folder / "sample.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    sheet = np.concatenate(list(frames), axis=1)  # frames side by side
    cv2.imwrite(str(folder / "sample_frames.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="t2v-tiny", choices=["t2v-tiny", "i2v-tiny", "ti2v-tiny"])
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt", default="a golden cat walks slowly over a red field at sunset")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.output)
    models = write_tiny_model_set(out / "models", args.task)
    dit = load_dit(models.dit, task=args.task)
    vae = load_vae(models.vae)
    t5 = load_text_encoder(models.t5, models.tokenizer, dtype=torch.float32)
    variant = dit.variant
    width, height = variant.resolution
    frames = variant.num_frames
    (context,) = t5.encode([args.prompt])
    print(f"prompt -> {tuple(context.shape)} text tokens; {variant.describe()}")

    gen = torch.Generator().manual_seed(42)
    t_lat, h_lat, w_lat = 1 + (frames - 1) // 4, height // vae.spatial_stride, width // vae.spatial_stride
    latents = torch.randn(1, vae.z_dim, t_lat, h_lat, w_lat, generator=gen)  # [B, z, T, h, w]
    y = None
    if variant.is_i2v:  # condition on a gradient image as the first frame (mask + image latent)
        image = torch.linspace(-1, 1, width).expand(1, 3, 1, height, width)
        clip = torch.cat([image, torch.zeros(1, 3, frames - 1, height, width)], dim=2)
        mask = torch.zeros(1, 4, t_lat, h_lat, w_lat)
        mask[:, :, 0] = 1
        with torch.no_grad():
            y = torch.cat([mask, vae.encode(clip)], dim=1)
    sigmas = flow_sigmas(args.steps, variant.flow_shift)
    with torch.no_grad():
        for i in range(args.steps):  # Euler over the flow: x <- x + (sigma_next - sigma) * v
            flow = dit(latents, (sigmas[i] * 1000).expand(1), [context], y=y)
            latents = latents + (sigmas[i + 1] - sigmas[i]) * flow
        video = vae.decode(latents)  # [1, 3, F, H, W] in [-1, 1]
    write_outputs(video, out, variant.fps)
    print(f"wrote {out / 'sample.mp4'} and {out / 'sample_frames.png'} ({tuple(video.shape)}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
