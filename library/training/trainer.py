"""The training run (LoRA or full fine-tuning): `setup`, `train`, `save`, `cleanup`.

    for each optimizer step:
        expert  <- the expert owning one draw of the timestep distribution   (experts.py)
        sigma, noise ~ per-sample generators keyed by (seed, step, sample)  (reproducible, resumable)
        x_t     = (1 - sigma) x0 + sigma noise;  target = noise - x0         (flow_matching.py)
        loss    = mean((DiT(x_t, 1000 sigma, text, y) - target)^2)           (+ I2V / TI2V conditioning)
        backward, average gradients across processes, clip, step, schedule

Randomness never comes from a shared stream: every draw is keyed by the seed and the position in the
run, so a resumed run continues with exactly the numbers the uninterrupted run would have used, and a
2-process run draws the same noise for each item as 1 process on the same global batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, replace

import torch

from library.config import save_config
from library.config.schema import TrainConfig
from library.errors import UserError
from library.wan.variants import get_variant

from . import checkpoints as ckpt
from .assemble import build_experts
from .checkpoints.state import StateError, load_state, restore_payload, save_state, state_payload
from .checkpoints.weights import save_weights
from .conditioning import extra_inputs, model_inputs, ti2v_condition
from .data import build_data
from .engines.sharding import sharding
from .experts import ExpertRouter, base_sampler, boundary_of
from .flow_matching import add_noise
from .guard import (MAX_BAD_STEPS, NonFiniteLossError, diverged_message, finite_everywhere, stop_message,
                    weights_finite)
from .lock import lock_run_folder
from .logs import LossLog
from .monitor import LossMonitor
from .optimization import build_optimization
from .parallel import setup_parallel
from .planning.auto import auto_full_settings, auto_sequence_parallel
from .reporting import RunReporter, start_of_run_advice
from .run import RunState, make_accelerator, resolve_run
from .samples import TrainingSampler
from .seeding import derive_seed, generator
from .timestep_buckets import TimestepBuckets

logger = logging.getLogger(__name__)
VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed noise levels of the validation loss
__all__ = ["MAX_BAD_STEPS", "NonFiniteLossError", "Trainer"]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.variant = get_variant(cfg.model.task)
        self.accelerator = self.lock = None

    # ---- lifecycle ----------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.setup()
            try:
                self.train()
            except KeyboardInterrupt:
                logger.warning("interrupted: saving the training state before exiting")
                self.save(kind="interrupt")
                return 130
        finally:
            self.cleanup()
        return 0

    def setup(self) -> None:
        """Everything before the first step; the output folder is locked for the run (released by `cleanup`,
        or here when setup fails)."""
        self.accelerator = make_accelerator(self.cfg)
        self.device = self.accelerator.device
        self.run_info = resolve_run(self.cfg, self.accelerator)  # seed, output dir/name, dtypes
        self.lock = lock_run_folder(self.run_info.output_dir, self.accelerator)
        try:
            self._setup()
        except BaseException:
            self._release()
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        if self.is_main:
            ckpt.clean_leftovers(self.run_info.output_dir, self.run_info.output_name)
        self.accelerator.wait_for_everyone()
        payload = None
        if cfg.saving.resume:
            acc = self.accelerator
            payload = load_state(cfg.saving.resume, self.run_info.output_dir, self.run_info.output_name,
                                 acc.process_index, acc.num_processes)
            self.run_info = replace(self.run_info, seed=payload["run_state"]["seed"])  # continue the same run
        self.state = RunState(seed=self.run_info.seed)
        self.data = build_data(cfg, self.variant, self.accelerator, self.run_info.seed)
        processes = self.accelerator.num_processes
        cfg = self.cfg = auto_sequence_parallel(cfg, self.variant, self.data, self.device, processes)
        self.layout = setup_parallel(cfg, self.variant, self.accelerator, self.data, payload)  # data x sequence
        self.state.sequence_parallel = self.layout.size
        self.buckets = TimestepBuckets.from_config(cfg, self.data, self.accelerator.process_index // self.layout.size)
        if cfg.finetune.full_fine_tune and cfg.memory.auto_memory:
            cfg = self.cfg = auto_full_settings(cfg, self.variant, self.data, self.device, processes)
        if payload is not None and payload["sharded"] != sharding(cfg):
            raise StateError(f"resume: {payload['folder']} was saved {'with' if payload['sharded'] else 'without'} "
                             f"fsdp sharding; resume it {'with' if payload['sharded'] else 'without'} `fsdp`")
        torch.manual_seed(derive_seed(self.run_info.seed, "init"))  # LoRA initialisation depends only on the seed
        self.experts = build_experts(cfg, self.variant, self.run_info, self.device, self.data)
        boundary = boundary_of(self.variant, cfg.timesteps.timestep_boundary)
        self.router = ExpertRouter(self.experts, base_sampler(cfg), boundary, cfg.memory.offload_inactive_dit,
                                   self.device)
        self.opt = build_optimization(cfg, self.experts, self.data, self.accelerator, self.run_info.seed)
        if payload is not None:
            restore_payload(payload, self.experts, self.opt.optimizer, self.opt.scheduler, self.opt.sharded)
            self.state = RunState.restore(payload["run_state"])
            logger.info("resumed at step %d (epoch %d, batch %d)", self.state.global_step, self.state.epoch,
                        self.state.batch_in_epoch)
        self.committed = replace(self.state)  # the state as of the last optimizer step
        self.log = LossLog(self.run_info.output_dir, resume_step=self.state.global_step) if self.is_main else None
        self.reporter = RunReporter(self) if self.is_main else None
        self.last_lr, self.last_grad_norm, self.last_expert = self.opt.scheduler.get_last_lr()[0], math.nan, ""
        self.monitor = LossMonitor(self.opt.total_steps, self.run_info.output_dir if self.is_main else None)
        self.sampler = TrainingSampler(cfg, self.experts, self.device) if cfg.sampling.sample_prompts else None
        if self.is_main:
            self.advice = start_of_run_advice(self)  # logged; (lines, warnings) for report.html
            save_config(cfg, self.run_info.output_dir / f"{self.run_info.output_name}_config.toml")
            self.log.experts = {e.name: (e.sampler.min_timestep, e.sampler.max_timestep) for e in self.experts}
            self.reporter.write("start")
        self.bad_steps = 0
        # full fine-tuning: autocast's weight cache would keep a bf16 copy of every fp32 master weight until the
        # forward pass ends (2 bytes a parameter, checkpointing or not); recast per use instead
        from accelerate.utils import AutocastKwargs

        self.autocast_kwargs = AutocastKwargs(cache_enabled=False) if cfg.finetune.full_fine_tune else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def cleanup(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- the loop -----------------------------------------------------------------------------------

    def train(self) -> None:
        from tqdm import tqdm

        total, accum = self.opt.total_steps, self.cfg.loop.gradient_accumulation_steps
        bar = tqdm(total=total, initial=self.state.global_step, disable=not self.is_main, desc="steps")
        if self.sampler and self.cfg.sampling.sample_at_first and self.state.global_step == 0:
            self.sample()
        if self.data.validation and self.cfg.loop.validate_every_n_steps and self.state.global_step == 0:
            self.validate()  # the baseline: the untrained model's validation loss, which later points read against
        try:
            while self.state.global_step < total:
                loader = self.data.loader(self.state.epoch, skip=self.state.batch_in_epoch)
                for batch in loader:
                    loss = self.micro_step(batch)
                    self.state.batch_in_epoch += 1
                    if self.state.batch_in_epoch % accum and self.state.batch_in_epoch < self.data.batches_per_epoch:
                        continue
                    self.optimizer_step()
                    self.after_step(loss, bar)
                    if self.state.global_step >= total:
                        break
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    self.after_epoch()
        finally:
            bar.close()
        if self.is_main:
            self.log.plot()
        self.save(kind="final")

    def micro_step(self, batch: dict) -> float:
        """Forward and backward of one batch; returns the loss (NaN when the batch was skipped)."""
        st, cfg = self.state, self.cfg
        pos = (st.seed, st.global_step, st.batch_in_epoch % cfg.loop.gradient_accumulation_steps)
        shape = batch["latents"].shape  # [B, z, T, h, w]
        tokens = (shape[3] // 2) * (shape[4] // 2)  # tokens per frame, for flux_shift
        expert = self.router.draw(generator(*pos, "expert"), tokens)
        self.router.activate(expert)
        self._seed_dropout(derive_seed(*pos, "dropout"))
        with self.layout.active(expert.model):  # sequence parallelism: the recomputed blocks of the backward too
            loss = self.loss(batch, expert, pos)
            self.last_keys, self.last_expert = batch["keys"], expert.name
            if not finite_everywhere(loss, self.accelerator):
                self._bad_batch(batch, loss)
                return float("nan")
            self.accelerator.backward(loss / cfg.loop.gradient_accumulation_steps)
        self.bad_steps = 0
        return loss.item()

    def _seed_dropout(self, seed: int) -> None:
        """LoRA dropout reproducible per step. Not torch.manual_seed: on a machine without CUDA initialised
        it queues a lazy CUDA seeding call with a formatted stack trace every time (about 2 ms)."""
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def loss(self, batch: dict, expert, pos: tuple, sigma: float | None = None) -> torch.Tensor:
        """The flow-matching loss of one batch on one expert (the maths of the module docstring); a fixed
        `sigma` replaces the sampled noise levels (validation)."""
        dev = self.device
        x0 = batch["latents"].to(dev, torch.float32)  # [B, z, T, h, w]
        keys = batch["keys"]  # draws keyed by item, not by position: any process split sees the same numbers
        gens = [generator(*pos, "sample", key, keys[:i].count(key)) for i, key in enumerate(keys)]
        if sigma is None:
            tokens = (x0.shape[3] // 2) * (x0.shape[4] // 2)  # tokens per frame, for flux_shift
            u = self.buckets.uniforms(self.state.epoch, self.state.batch_in_epoch, len(keys)) if self.buckets else None
            sigma = (expert.sampler.from_uniform(u, tokens) if u is not None else  # num_timestep_buckets
                     torch.cat([expert.sampler.sample(1, g, tokens) for g in gens])).to(dev)  # [B]
            if self.is_main:  # for the report's timestep histogram
                self.reporter.timesteps += (sigma * 1000.0).tolist()
        else:
            sigma = torch.full((len(keys),), float(sigma), device=dev)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(dev)
        x_t, target = add_noise(x0, noise, sigma)
        timestep, mask = sigma * 1000.0, None
        extra = extra_inputs(expert.model.variant, batch, dev)  # one-frame RoPE positions, Fun-Control full_ref
        y, clip_fea = model_inputs(self.variant, batch, dev)  # I2V / FLF2V / one-frame / Fun / VACE conditioning
        if y is None and self.variant.model_type == "ti2v" and self.cfg.loop.i2v_probability > 0:
            use_image = torch.tensor([torch.rand(1, generator=g).item() < self.cfg.loop.i2v_probability for g in gens])
            x_t, timestep, mask = ti2v_condition(x0, x_t, sigma, use_image.to(dev), self.variant.patch_size)
        context = [c.to(dev) for c in batch["context"]]
        with self.accelerator.autocast(self.autocast_kwargs):
            pred = expert.model(x_t, timestep, context, y=y, clip_fea=clip_fea, **extra)  # fp32
        err = (pred.float() - target) ** 2
        if mask is not None:
            per_sample = (err * mask).sum(dim=(1, 2, 3, 4)) / (mask.sum(dim=(1, 2, 3, 4)) * err[0, :, 0].numel())
        else:
            per_sample = err.mean(dim=(1, 2, 3, 4))
        return (per_sample * expert.sampler.loss_weight(sigma.cpu()).to(dev)).mean()

    def optimizer_step(self) -> None:
        opt = self.opt
        opt.average_gradients(self.accelerator)
        if self.cfg.optimizer.max_grad_norm and not opt.fused:  # fused: each tensor was clipped in the backward
            clip = self.accelerator.clip_grad_norm_ if self.cfg.loop.mixed_precision == "fp16" else \
                torch.nn.utils.clip_grad_norm_  # fp16: accelerate unscales first
            self.last_grad_norm = float(clip(opt.trainable, self.cfg.optimizer.max_grad_norm))  # before clipping
        opt.optimizer.step()
        if self.cfg.network.scale_weight_norms:
            self._scale_weight_norms()
        self.last_lr = opt.scheduler.get_last_lr()[0]  # the rate this step used
        opt.scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.committed = replace(self.state)

    def _scale_weight_norms(self) -> None:
        """Kohya's max-norm regularisation: each LoRA module's delta scaled down to `scale_weight_norms`."""
        scaled, norms = 0, []
        for expert in self.experts:
            n, mean, top = expert.network.apply_max_norm_regularization(self.cfg.network.scale_weight_norms)
            scaled, norms = scaled + n, norms + [(mean, top)]
        if self.is_main:
            self.accelerator.log({"max_norm/keys_scaled": scaled,
                                  "max_norm/average_key_norm": sum(m for m, _ in norms) / len(norms),
                                  "max_norm/max_key_norm": max(t for _, t in norms)}, step=self.state.global_step + 1)

    def after_step(self, loss: float, bar) -> None:
        st, saving = self.state, self.cfg.saving
        lr = self.last_lr
        if self.is_main:
            avg = self.log.add(st.global_step, st.epoch, loss, lr, grad_norm=self.last_grad_norm,
                               expert=self.last_expert, timesteps=self.reporter.step_done())
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", avg=f"{avg:.4f}", lr=f"{lr:.2e}")
            values = {"loss/current": loss, "loss/average": avg, "lr": lr}
            self.accelerator.log({k: v for k, v in values.items() if math.isfinite(v)}, step=st.global_step)
            self.monitor.update(st.global_step, loss, self.last_keys)
        every = self.cfg.loop.validate_every_n_steps
        if every and self.data.validation and st.global_step % every == 0:
            self.validate()
        if self.sampler and self.sampler.due(st.global_step):
            self.sample()
        if saving.save_every_n_steps and st.global_step % saving.save_every_n_steps == 0:
            self.save(kind="step")

    def sample(self) -> None:
        self.sampler.render(self.accelerator, self.run_info.output_dir, self.run_info.output_name,
                            self.state.global_step, self.state.epoch)

    def after_epoch(self) -> None:
        if self.sampler and self.sampler.due(self.state.global_step, epoch_end=self.state.epoch):
            self.sample()
        every = self.cfg.saving.save_every_n_epochs
        if every and self.state.epoch % every == 0 and self.state.global_step < self.opt.total_steps:
            self.save(kind="epoch")

    def _bad_batch(self, batch: dict, loss: torch.Tensor) -> None:
        self.bad_steps += 1
        logger.error("non-finite loss %s at step %d on items %s: batch skipped", loss.item(),
                     self.state.global_step, ", ".join(batch["keys"]))
        self.opt.optimizer.zero_grad(set_to_none=True)
        if self.bad_steps >= MAX_BAD_STEPS:
            raise self._stop_for_bad_losses(batch["keys"])

    def _stop_for_bad_losses(self, items: list[str]) -> NonFiniteLossError:
        """Save the state of the last optimizer step if its weights are finite; the error says what was saved."""
        saved, reason = None, None
        if not weights_finite(self.opt.trainable, self.accelerator):
            reason = "the trained weights themselves are no longer finite (the run diverged)"
        else:
            try:
                saved = self.save(kind="stopped")
            except (OSError, UserError) as exc:
                reason = f"saving it failed ({exc})"
        newest = None if saved else ckpt.find_latest_state(self.run_info.output_dir, self.run_info.output_name)
        return NonFiniteLossError(stop_message(self.bad_steps, self.state.global_step, items, saved, reason, newest))

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the validation items at fixed noise levels and fixed noise: comparable across
        steps and runs. Each level goes to the expert that owns it."""
        total, count = 0.0, 0
        for expert in self.experts:
            expert.network.eval()
        for sigma_index, sigma in enumerate(VALIDATION_SIGMAS):
            owner = self.router.owner(sigma)
            self.router.activate(owner)
            for batch in self.val_batches:
                with self.layout.active(owner.model):
                    total += self.loss(batch, owner, (self.state.seed, "validation", sigma_index), sigma).item()
                count += 1
        for expert in self.experts:
            expert.network.train()
        value = total / max(1, count)
        if self.is_main:
            self.log.add(self.state.global_step, self.state.epoch, value, self.last_lr, kind="val")
            self.accelerator.log({"loss/validation": value}, step=self.state.global_step)
            self.monitor.update_validation(self.state.global_step, value)
        return value

    @property
    def val_batches(self) -> list[dict]:
        if not hasattr(self, "_val_batches"):
            self._val_batches = self.data.validation_batches()
        return self._val_batches

    # ---- saving and resuming ------------------------------------------------------------------------

    def save(self, kind: str):
        """kind: step, epoch, final, interrupt (Ctrl-C) or stopped (non-finite losses); the last two save the
        state only. Weight files on the main process, state if asked; returns the state folder, if one was
        saved. A sharded run (fsdp) saves on every process: the weights are gathered together, each writes its
        state shard."""
        acc, sharded = self.accelerator, self.opt.sharded
        acc.wait_for_everyone()
        if not weights_finite(self.opt.trainable, acc):  # never a NaN save over the good ones
            newest = ckpt.find_latest_state(self.run_info.output_dir, self.run_info.output_name)
            raise NonFiniteLossError(diverged_message(self.committed.global_step, newest))
        if not (self.is_main or sharded):
            return None
        st, saving, info = self.committed, self.cfg.saving, self.run_info
        step = st.global_step if kind in ("step", "interrupt", "stopped") else None
        epoch = st.epoch if kind == "epoch" else None
        if self.is_main:
            self.log.plot(force=kind not in ("step", "epoch"))  # loss.csv with every save; the plots at most every 30 s
        if kind not in ("interrupt", "stopped"):
            for expert in self.experts:
                path = ckpt.lora_path(info.output_dir, info.output_name, expert.suffix, epoch, step)
                save_weights(expert, path, self.cfg, self.variant, st, self.opt.facts, write=self.is_main)
            if self.is_main:
                suffixes = tuple(e.suffix for e in self.experts)
                ckpt.prune(info.output_dir, info.output_name, "step", saving.save_last_n_steps, suffixes)
                ckpt.prune(info.output_dir, info.output_name, "epoch", saving.save_last_n_epochs, suffixes)
        if self.is_main:
            self.reporter.write(kind)  # report.html with this save (and its summary, plots and ranking)
        want_state = saving.save_state or kind in ("interrupt", "stopped") or (
            kind == "final" and saving.save_state_on_train_end)
        if not want_state:
            return None
        folder = ckpt.state_dir(info.output_dir, info.output_name, epoch, step)
        payload = state_payload(self.experts, self.opt.optimizer, self.opt.scheduler, asdict(st), sharded)
        if sharded:
            save_state(folder, payload, st.info(self.cfg), acc.process_index, acc.num_processes, acc.wait_for_everyone)
        else:
            save_state(folder, payload, st.info(self.cfg))
        if self.is_main:
            ckpt.prune(info.output_dir, info.output_name, "step-state", saving.save_last_n_steps_state)
            ckpt.prune(info.output_dir, info.output_name, "epoch-state", saving.save_last_n_epochs_state)
        return folder
