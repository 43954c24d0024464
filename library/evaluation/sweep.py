"""A hyperparameter sweep from one training config: the guide's A/B test (conservative / standard /
aggressive, `library.guide.AB_TEST`) or any grid of `key=v1,v2` values, each variant trained in its own
output folder, one after another or one per GPU, resumable, and judged together in sweep.html.

    ROOT/sweep.json             the plan: base config, variants and their overrides
    ROOT/<variant>/             a normal training output folder (report.html inside)
    ROOT/<variant>/sweep_done.json   written when that training returned 0: the variant is finished
    ROOT/sweep.html             curves overlaid, samples side by side, the variants ranked

Resuming: a finished variant is skipped (its folder is not touched); an interrupted one (a training state
in its folder: every variant runs with `save_state = true`) continues with `resume = "latest"`; one that
never saved starts again. Ctrl-C stops the sweep after the running trainings have saved their state.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from library.config import ConfigError, load_config, validate
from library.guide import AB_TEST
from library.training.checkpoints import find_latest_state
from library.training.files import atomic_write_bytes

logger = logging.getLogger(__name__)
PLAN_FILE, DONE_FILE, LOG_FILE = "sweep.json", "sweep_done.json", "train.log"


@dataclass
class Variant:
    name: str
    overrides: dict[str, str]  # config key -> value as text, passed as --key value

    def flags(self) -> list[str]:
        return [part for key, value in self.overrides.items() for part in (f"--{key}", value)]


@dataclass
class SweepPlan:
    root: Path
    base_args: list[str]  # the training arguments every variant shares (--config_file ..., --set values)
    variants: list[Variant]
    output_name: str
    extra: dict = field(default_factory=dict)

    def folder(self, variant: Variant) -> Path:
        return self.root / variant.name

    def variant_args(self, variant: Variant) -> list[str]:
        """A variant's training arguments: shared ones, its overrides, its folder, a state to resume from."""
        return [*self.base_args, *variant.flags(), "--output_dir", str(self.folder(variant)), "--save_state", "true"]


def _number_text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def preset_variants(names: list[str], base_dim: int, base_alpha: float | None) -> list[Variant]:
    """The guide's A/B variants (learning rate, rank, epochs); alpha follows the rank when the base config
    has alpha = dim (the guide's setting), else the base alpha is kept."""
    unknown = [n for n in names if n not in AB_TEST]
    if unknown:
        raise ConfigError(f"--preset_sweep: unknown variant(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(AB_TEST)}")
    variants = []
    for name in names or list(AB_TEST):
        values = {k: _number_text(v) for k, v in AB_TEST[name].items()}
        if base_alpha is None or float(base_alpha) == float(base_dim):
            values["network_alpha"] = values["network_dim"]
        variants.append(Variant(name, values))
    return variants


def parse_assignment(text: str, flag: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()] if sep else []
    if not key.strip() or not items:
        raise ConfigError(f"{flag} {text!r}: write KEY=VALUE[,VALUE...], e.g. {flag} learning_rate=5e-5,1e-4")
    return key.strip().lstrip("-"), items


def grid_variants(assignments: list[str]) -> list[Variant]:
    """Every combination of the `--vary key=v1,v2` values; names like `learning_rate-5e-5_network_dim-16`."""
    axes = [parse_assignment(a, "--vary") for a in assignments]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--vary names a key twice ({', '.join(keys)}): give each key once with all its values")
    variants = []
    for combo in itertools.product(*(values for _, values in axes)):
        name = "_".join(f"{k}-{re.sub(r'[^A-Za-z0-9.+-]+', '-', v)}" for k, v in zip(keys, combo))
        variants.append(Variant(name, dict(zip(keys, combo))))
    return variants


def make_plan(config_file: str, root: str | None, preset_sweep: list[str] | None, vary: list[str],
              settings: list[str]) -> SweepPlan:
    """Check the base config and every variant's config (a typo fails here, before any training) and name
    the folders. `settings` (`--set key=value`) apply to every variant and win over the variants' values."""
    base_args = ["--config_file", config_file]
    for text in settings:
        key, sep, value = text.partition("=")
        if not key.strip() or not sep:
            raise ConfigError(f"--set {text!r}: write KEY=VALUE (an empty VALUE unsets the key), e.g. "
                              "--set max_train_epochs=2")
        base_args += [f"--{key.strip().lstrip('-')}", value.strip()]
    base = validate(load_config(base_args))
    if preset_sweep is not None and vary:
        raise ConfigError("use either --preset_sweep or --vary, not both")
    if preset_sweep is not None:
        variants = preset_variants(preset_sweep, base.network.network_dim, base.network.network_alpha)
    elif vary:
        variants = grid_variants(vary)
    else:
        raise ConfigError("nothing to sweep: pass --preset_sweep (the guide's conservative / standard / aggressive) "
                          "or --vary KEY=V1,V2")
    if base.finetune.full_fine_tune:  # no rank to vary: the guide's variants differ in learning rate and epochs
        for v in variants:
            v.overrides = {k: val for k, val in v.overrides.items() if k not in ("network_dim", "network_alpha")}
    set_keys = {a.split("=", 1)[0].strip().lstrip("-") for a in settings}
    for v in variants:
        v.overrides = {k: val for k, val in v.overrides.items() if k not in set_keys}  # --set wins
    root_dir = Path(root or base.saving.output_dir or "output").expanduser()
    plan = SweepPlan(root_dir, base_args, variants, base.saving.output_name or (
        "wan_finetune" if base.finetune.full_fine_tune else "wan_lora"),
        extra={"full_fine_tune": base.finetune.full_fine_tune})
    for v in variants:
        try:
            validate(load_config([*base_args, *v.flags()]))
        except ConfigError as exc:
            raise ConfigError(f"sweep variant {v.name}: {exc}") from None
    return plan


def write_plan(plan: SweepPlan) -> Path:
    plan.root.mkdir(parents=True, exist_ok=True)
    data = {"base_args": plan.base_args, "output_name": plan.output_name,
            "variants": [asdict(v) for v in plan.variants], **plan.extra}
    path = plan.root / PLAN_FILE
    atomic_write_bytes(path, json.dumps(data, indent=2).encode("utf-8"))
    return path


def read_plan(root: Path) -> SweepPlan:
    data = json.loads((Path(root) / PLAN_FILE).read_text(encoding="utf-8"))
    return SweepPlan(Path(root), data["base_args"], [Variant(**v) for v in data["variants"]], data["output_name"],
                     extra={k: v for k, v in data.items() if k not in ("base_args", "output_name", "variants")})


def variant_status(plan: SweepPlan, variant: Variant) -> str:
    """finished, interrupted (a state to resume from), or new."""
    folder = plan.folder(variant)
    if (folder / DONE_FILE).is_file():
        return "finished"
    if folder.is_dir() and find_latest_state(folder, plan.output_name) is not None:
        return "interrupted"
    return "new"


def run_variant(plan: SweepPlan, variant: Variant, command: list[str], gpu: str | None, to_log: bool) -> int:
    """Train one variant to the end (resuming it when it has a state); returns the training's exit code."""
    folder = plan.folder(variant)
    folder.mkdir(parents=True, exist_ok=True)
    status = variant_status(plan, variant)
    args = plan.variant_args(variant) + (["--resume", "latest"] if status == "interrupted" else [])
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    where = f" on GPU {gpu}" if gpu is not None else ""
    logger.info("sweep: %s %s%s (%s)", "resuming" if status == "interrupted" else "training", variant.name, where,
                ", ".join(f"{k} = {v}" for k, v in variant.overrides.items()))
    start = time.time()
    if to_log:
        with open(folder / LOG_FILE, "ab") as log:
            rc = subprocess.run([*command, *args], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    else:
        rc = subprocess.run([*command, *args], env=env).returncode
    if rc == 0:
        done = {"variant": variant.name, "overrides": variant.overrides, "seconds": time.time() - start,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_bytes(folder / DONE_FILE, json.dumps(done, indent=2).encode("utf-8"))
    logger.info("sweep: %s %s (exit %d)", variant.name, "finished" if rc == 0 else "stopped", rc)
    return rc


def run_sweep(plan: SweepPlan, command: list[str], gpus: list[str] | None = None,
              on_progress=None, jobs: int = 1) -> dict[str, int]:
    """Train every variant that is not finished; returns {variant: exit code} (0 for those skipped). With
    `gpus`, one training per GPU at a time; else `jobs` trainings at a time on the visible device (small
    models: the CPU, or several small runs on one large GPU). Trainings that run side by side write their
    output to each folder's train.log. `on_progress` is called after each variant (sweep.html is rewritten
    there)."""
    write_plan(plan)
    results: dict[str, int] = {}
    todo: queue.Queue = queue.Queue()
    for v in plan.variants:
        if variant_status(plan, v) == "finished":
            logger.info("sweep: %s is finished; skipped", v.name)
            results[v.name] = 0
        else:
            todo.put(v)
    stop = threading.Event()
    lock = threading.Lock()

    def worker(gpu: str | None) -> None:
        while not stop.is_set():
            try:
                variant = todo.get_nowait()
            except queue.Empty:
                return
            rc = run_variant(plan, variant, command, gpu, to_log=len(slots) > 1)
            with lock:
                results[variant.name] = rc
                if rc == 130:  # interrupted: its state is saved; stop taking new variants
                    stop.set()
                if on_progress:
                    on_progress()

    slots = gpus or [None] * max(1, jobs)
    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in slots]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
    except KeyboardInterrupt:  # the trainings got the same Ctrl-C: they save their state and exit
        stop.set()
        for t in threads:
            t.join()
        results.setdefault("interrupted", 130)
    return results
