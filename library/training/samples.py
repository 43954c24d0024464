"""Samples during training: the prompt file encoded once at the start (the text encoder is then freed),
the VAE kept for decoding, and every expert with its current LoRA rendered into OUTPUT_DIR/sample/
with step numbers, logged to TensorBoard when it is on.

Sampling draws from its own generators (library/sampling) and restores train / eval modes, and the
training draws are keyed by position (trainer.py), so samples never change the training numbers.
"""

from __future__ import annotations

import gc
import logging

import torch

from library.config.schema import TrainConfig

from .dtypes import VAE_DTYPES

logger = logging.getLogger(__name__)


class TrainingSampler:
    def __init__(self, cfg: TrainConfig, experts: list, device):
        from library.sampling.generate import SamplingModels, encode_requests
        from library.sampling.prompts import read_prompt_file
        from library.wan.loading import load_clip_vision, load_text_encoder, load_vae

        s, m = cfg.sampling, cfg.model
        requests, errors = read_prompt_file(s.sample_prompts)
        for error in errors:
            logger.error("sample_prompts: %s (that prompt is skipped)", error)
        if not requests:
            raise ValueError(f"{s.sample_prompts}: no usable prompt")
        variant = experts[0].model.variant
        encoder = load_text_encoder(m.t5, m.t5_tokenizer, device=device, fp8=cfg.memory.fp8_t5,
                                    dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.requests = encode_requests(encoder, requests, variant)
        del encoder
        gc.collect()
        # `vae_dtype` as musubi-tuner reads it (its WAN default: bfloat16; on the CPU float32, which is faster there)
        default = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae_dtype = VAE_DTYPES[m.vae_dtype] if m.vae_dtype else default
        vae = load_vae(m.vae, device=device, dtype=vae_dtype, cache_cpu=cfg.memory.vae_cache_cpu)
        vae.tile_sample_min_size = cfg.memory.vae_tile_size  # `vae_tiling`: samples decoded tile by tile
        clip = None
        if variant.image_embedding and variant.is_i2v:  # WAN 2.1 I2V: the start image's CLIP tokens (validated)
            clip_dtype = torch.float16 if device.type == "cuda" else torch.float32
            clip = load_clip_vision(m.clip, device=device, dtype=clip_dtype)
        self.models = SamplingModels(
            variant=variant, experts={e.name: e.model for e in experts}, vae=vae,
            networks=[e.network for e in experts], boundary=cfg.timesteps.timestep_boundary, clip=clip,
        )
        self.cfg = cfg
        logger.info("samples: %d prompt(s) from %s", len(self.requests), s.sample_prompts)

    def due(self, step: int, epoch_end: int | None = None) -> bool:
        s = self.cfg.sampling
        if epoch_end is not None:
            return bool(s.sample_every_n_epochs) and epoch_end % s.sample_every_n_epochs == 0
        return bool(s.sample_every_n_steps) and not s.sample_every_n_epochs and step % s.sample_every_n_steps == 0

    def _autocast(self, device):
        """Full fine-tuning keeps fp32 master weights and computes in bf16 / fp16 (`compute_dtype`): sample
        the way it trains, under autocast. LoRA runs compute in the weights' own dtype: nothing to do."""
        import contextlib

        for model in self.models.experts.values():
            compute = getattr(model, "compute_dtype", None)
            if compute is not None and compute != model.blocks[0].self_attn.q.weight.dtype:
                return torch.autocast(device.type, dtype=compute)
        return contextlib.nullcontext()

    def render(self, accelerator, output_dir, output_name: str, step: int, epoch: int) -> None:
        """Render every prompt (main process only). An expert offloaded by `offload_inactive_dit` comes back
        to the device for sampling; the next training step offloads it again."""
        from library.sampling.save import sample_during_training

        if not accelerator.is_main_process:
            return
        for expert_model in self.models.experts.values():
            expert_model.to(accelerator.device)
        with self._autocast(accelerator.device):
            results = sample_during_training(self.models, self.requests, output_dir, step=step, epoch=epoch,
                                             output_name=output_name)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                for r in results:
                    if r.contact_sheet is not None:
                        tracker.writer.add_image(f"samples/{r.index:02d}", r.contact_sheet, step, dataformats="HWC")
        logger.info("step %d: %d sample(s) in %s/sample", step, sum(r.error is None for r in results), output_dir)
