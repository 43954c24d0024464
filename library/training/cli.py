"""The command line of both training entry scripts (`train_network_wan.py` for LoRA,
`finetune/fine_tune_wan.py` for full fine-tuning): config from TOML and flags, validated before anything
loads, `--output_config` to write it without training, the input files checked (`check_inputs`), then
the run. `main` runs under `library.errors.run_cli`: bad input (a config value, a model file, a dataset, a
path) is one message naming it and exit status 2, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from library.config import ConfigError, load_config, save_config, validate
from library.config.schema import TrainConfig
from library.errors import UserError, run_cli

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None, full_fine_tune: bool = False, usage: str | None = None) -> int:
    """Run a training from command-line arguments: 0 when done, 2 on bad input (the message says what to
    do), 130 when interrupted."""
    return run_cli(_train, list(sys.argv[1:] if argv is None else argv), full_fine_tune, usage)


def _train(args: list[str], full_fine_tune: bool, usage: str | None) -> int:
    if usage and ("--help" in args or "-h" in args):
        print(usage)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = validate(load_config(["--full_fine_tune", *args] if full_fine_tune else args))
    if cfg.run.output_config:
        print(f"wrote {save_config(cfg, cfg.run.output_config)}")
        return 0
    check_inputs(cfg)
    import torch

    from .trainer import Trainer  # torch, accelerate and the models only when training

    planned = 0.0
    if cfg.memory.auto_memory:
        from .planning.auto import PLANNED
        from .planning.margin import load_margin, output_dir_of

        planned = load_margin(output_dir_of(cfg))  # the margin this start plans with (a broken file stops it now)
        PLANNED.clear()
    try:
        return Trainer(cfg).run()
    except torch.cuda.OutOfMemoryError as exc:
        if cfg.memory.auto_memory:
            raise _learn_from_out_of_memory(cfg, str(exc), planned) from None
        where = f"--config_file {cfg.run.config_file}" if cfg.run.config_file else f"--task {cfg.model.task}"
        raise GPUMemoryError(
            f"the GPU ran out of memory ({str(exc).splitlines()[0]}): these settings do not fit this card. "
            f"`python tools/plan_memory.py {where} --width W --height H --frames F` (your largest bucket) shows "
            "what fits: gradient_checkpointing, fp8_base, blocks_to_swap, a smaller batch or resolution"
            + "; auto_memory = true picks it for you"
            + ". Saves made before are kept (resume = 'latest' continues from the last state)") from None


def _learn_from_out_of_memory(cfg: TrainConfig, message: str, planned: float) -> GPUMemoryError:
    """auto_memory ran out of GPU memory: record a larger margin in the output folder, so that the next start
    of this run plans with that much less memory (`planning/margin.py`)."""
    import torch

    from .checkpoints.state import find_latest_state
    from .planning.auto import PLANNED
    from .planning.margin import margin_path, output_dir_of, record_out_of_memory

    card = card_gib = None
    if torch.cuda.is_available():
        card = torch.cuda.get_device_name()
        card_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    out = output_dir_of(cfg)
    margin = record_out_of_memory(out, planned, message, card, card_gib, PLANNED.get("settings"))
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    saved = find_latest_state(out, cfg.saving.output_name) if out.is_dir() else None
    return GPUMemoryError(
        f"the GPU ran out of memory ({first}) with the settings auto_memory planned"
        + (f" ({PLANNED['settings']})" if PLANNED.get("settings") else "")
        + f": auto_memory will plan with {margin:g} GiB less next time (recorded in {margin_path(out)}; delete it to "
        "plan without): run the same command again"
        + (f"; saves made before are kept (resume = 'latest' continues from {saved})" if saved else ""))


class GPUMemoryError(UserError, RuntimeError):
    """CUDA ran out of memory during a run: the settings do not fit the card; the message names the planner."""


def check_inputs(cfg: TrainConfig) -> None:
    """Everything about the inputs that needs no model loaded, so a typo fails in a second rather than after
    a 14B DiT has loaded: each path the run reads exists, the output folder can be a folder, `dit` and
    `dit_high_noise` are two models, each model file's header says it is the model its key wants (and the
    DiTs the task's variant), the sample prompts parse, the optimizer imports. ConfigError (CheckpointError
    for a model file) otherwise."""
    from library.wan.loading import check_model_file

    from .optimizers import optimizer_class, scheduler_class

    m, sampling = cfg.model, bool(cfg.sampling.sample_prompts)
    paths = {"dataset_config": cfg.run.dataset_config, "dit": m.dit, "dit_high_noise": m.dit_high_noise,
             "network_weights": cfg.network.network_weights, "log_tracker_config": cfg.logging.log_tracker_config,
             **{f"base_weights[{i}]": p for i, p in enumerate(cfg.network.base_weights)},
             **({"sample_prompts": cfg.sampling.sample_prompts, "vae": m.vae, "t5": m.t5,
                 "t5_tokenizer": m.t5_tokenizer, "clip": m.clip} if sampling else {})}
    for key, value in paths.items():
        if value and not Path(value).expanduser().exists():
            where = f" (looked for {Path(value).expanduser().absolute()})" if not Path(value).is_absolute() else ""
            raise ConfigError(f"`{key}` = {value}: no such file or folder{where}; check the path")
    _check_output_dir(cfg.saving.output_dir or "output")
    _check_experts(m.dit, m.dit_high_noise)
    files = {"dit": m.dit, "dit_high_noise": m.dit_high_noise, **({"vae": m.vae, "t5": m.t5} if sampling else {})}
    for key, path in files.items():
        if path:  # headers only: a wrong or damaged file fails now, not after the DiTs have loaded
            check_model_file(path, "dit" if key.startswith("dit") else key, m.task)
    if sampling:
        _check_prompts(cfg.sampling.sample_prompts)
    optimizer_class(cfg.optimizer.optimizer_type)
    if cfg.scheduler.lr_scheduler_type:
        scheduler_class(cfg.scheduler.lr_scheduler_type)


def _check_output_dir(output_dir: str) -> None:
    """The output folder, or its nearest existing parent, is a writable folder."""
    path = Path(output_dir).expanduser()
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise ConfigError(f"`output_dir` = {output_dir} {what}, not a folder; point output_dir at a folder (it is "
                          "created when missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"`output_dir` = {output_dir}: {existing} is not writable by this user; fix its "
                          "permissions or point output_dir elsewhere")


def _check_experts(dit: str | None, dit_high_noise: str | None) -> None:
    """The two WAN 2.2 A14B experts are two files: the same path is an error, a copy a warning."""
    from library.wan.checkpoint_files import fingerprint

    if not (dit and dit_high_noise):
        return
    low, high = Path(dit).expanduser().resolve(), Path(dit_high_noise).expanduser().resolve()
    if low == high:
        raise ConfigError(f"`dit` and `dit_high_noise` are the same file ({low}): WAN 2.2 A14B has two experts; "
                          "pass low_noise_model as `dit` and high_noise_model as `dit_high_noise`, or drop "
                          "`dit_high_noise` to train one expert")
    if fingerprint(low) == fingerprint(high):
        logger.warning("`dit` (%s) and `dit_high_noise` (%s) hold the same bytes: both experts would start from one "
                       "model; pass the low- and high-noise expert files if that is not what you mean", low, high)


def _check_prompts(path: str) -> None:
    """The sample prompt file holds at least one usable prompt (the broken ones are logged and skipped)."""
    from library.sampling.prompts import PromptError, read_prompt_file

    try:
        requests, errors = read_prompt_file(path)
    except PromptError as exc:  # the whole file is unreadable
        raise ConfigError(f"`sample_prompts`: {exc}") from None
    for error in errors:
        logger.error("sample_prompts: %s (that prompt is skipped)", error)
    if not requests:
        found = f"all {len(errors)} prompt(s) have errors (above)" if errors else "it holds no prompt"
        raise ConfigError(f"`sample_prompts` = {path}: {found}; write one prompt per line (for example: a cat "
                          "walks on grass --w 832 --h 480 --f 81 --d 42 --s 20), or remove sample_prompts")
