"""Plain PyTorch LoRA for nn.Linear layers: modules, a network over a model, LoRA key names (file I/O itself
is `lora_files.py`, re-exported here).

No model-family knowledge lives here: the caller names the target Linear layers (module-name suffixes),
the include / exclude regexes and, optionally, a function that maps foreign (diffusers) module names
to the model's own. A LoRA module is attached with a forward hook on its Linear (output + delta), never
by replacing `forward`, so it detaches cleanly (`remove()`) and survives checkpointing and compile.
LoRA weights are fp32 (the optimizer's masters). Over an fp32 base the delta is computed and added in fp32;
over a bf16 / fp16 base (fp8 bases compute in bf16) the down-projection runs in the input's dtype and the
up-projection is added to the base output in its dtype by one `addmm` with fp32 accumulation.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora_files import LoraInputError, read_lora_file, write_lora_file  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_HALF = (torch.float16, torch.bfloat16)
# suffix -> part, in the spellings Kohya, ComfyUI, diffusers and peft write
_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down",
          ".lora_B.weight": "up", ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
          ".alpha": "alpha"}
_MODULE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
KOHYA_PREFIX = "lora_unet_"


def _autocast_on(device_type: str) -> bool:
    """Autocast is on for this device type (False for types autocast does not know, such as `meta`)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def kohya_name(module_name: str, prefix: str = KOHYA_PREFIX) -> str:
    """`blocks.0.self_attn.q` -> `lora_unet_blocks_0_self_attn_q`."""
    return prefix + module_name.replace(".", "_")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a Linear stand-in (an fp8 Linear) that declares its feature sizes."""
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
    )


class LoRAModule(nn.Module):
    """delta(x) = up(down(x)) * multiplier * alpha / rank, added to one Linear's output by a hook."""

    def __init__(self, lora_name: str, org_module: nn.Module, official_name: str, multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        weight = getattr(org_module, "weight", None)
        device = torch.device("cpu") if weight is None or weight.is_meta else weight.device
        self.lora_name, self.official_name, self.lora_dim = lora_name, official_name, lora_dim
        # 1. down [r, in] kaiming-uniform, up [out, r] zero: a new LoRA starts as the identity
        self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # 2. alpha is a buffer (saved as `.alpha`); 0 or None means alpha = rank (scale 1), as Kohya
        self.register_buffer("alpha", torch.tensor(float(alpha or lora_dim)))
        self.scale = float(alpha or lora_dim) / lora_dim
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._org = [org_module]  # a list, so the base Linear is not registered as a child
        self._handle = None
        self.merged = False

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(float(alpha))
        self.scale = float(alpha) / self.lora_dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "alpha" in state_dict:  # keep the python-side scale in step (no GPU sync in forward)
            self.scale = float(state_dict[prefix + "alpha"]) / self.lora_dim

    def _down(self, x: torch.Tensor, fp32: bool) -> tuple[torch.Tensor, float]:
        """x [..., in] -> (h [..., r], scale): the down-projection with the dropouts of a training step; h in
        fp32 (`fp32`) or in the input's dtype."""
        down = self.lora_down.weight
        if x.dtype in _HALF and down.dtype == torch.float32:
            # down-projection in the input's precision: autograd then keeps a reference to the base layer's
            # input instead of an fp32 copy per LoRA (q, k and v would each hold one), the largest share of
            # activation memory at video lengths
            h = F.linear(x, down.to(x.dtype))  # [..., r]
            h = h.float() if fp32 else h
        else:
            h = self.lora_down(x.to(down.dtype))  # [..., r]
        scale = self.scale
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout and h.dim() >= 2:
            keep = torch.rand(h.shape[0], *[1] * (h.dim() - 2), self.lora_dim, device=h.device) > self.rank_dropout
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return h, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] in the base dtype -> the fp32 delta [..., out]. LoRA weights are fp32 parameters."""
        device_type = x.device.type
        if _autocast_on(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.forward(x)
        h, scale = self._down(x, fp32=True)
        return self.lora_up(h) * (self.multiplier * scale)

    def _add_to(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """output + delta(x) for a bf16 / fp16 base output [..., out]: the up-projection runs in the output's
        dtype and is added by the same kernel (`addmm`, fp32 accumulation, one rounding), instead of an fp32
        up-projection, an fp32 scale, a cast and an add over [..., out] (about 3.4x the memory traffic)."""
        h, scale = self._down(x, fp32=False)
        up = self.lora_up.weight.to(output.dtype)  # [out, r]
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]).to(output.dtype), up.t(),
                           alpha=self.multiplier * scale)
        return flat.view(output.shape)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0:
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        device_type = output.device.type
        if output.dtype in _HALF and self.lora_up.weight.dtype == torch.float32:
            if _autocast_on(device_type):
                with torch.autocast(device_type, enabled=False):
                    return self._add_to(args[0], output)
            return self._add_to(args[0], output)
        return output + self(args[0]).to(output.dtype)  # fp32: the delta in fp32, exactly as the formula

    def apply_to(self) -> None:
        if self._handle is None and not self.merged:
            self._handle = self.org_module.register_forward_hook(self._hook)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The full fp32 weight delta [out, in] this module adds at its current multiplier."""
        return (self.lora_up.weight @ self.lora_down.weight) * (self.multiplier * self.scale)

    @torch.no_grad()
    def merge_to(self) -> None:
        """Add the delta into the base weight (inference); the hook is removed so it is not applied twice."""
        weight = self.org_module.weight
        if weight.dtype in _FP8:
            raise RuntimeError(f"{self.official_name}: cannot merge a LoRA into an fp8 weight; load the base "
                               "in bf16 / fp16 to merge, or keep the LoRA attached")
        if not self.merged:
            weight += self.delta_weight().to(device=weight.device, dtype=weight.dtype)
            self.remove()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged delta (exact in fp32, within rounding in bf16 / fp16) and re-attach the hook."""
        if self.merged:
            weight = self.org_module.weight
            weight -= self.delta_weight().to(device=weight.device, dtype=weight.dtype)
            self.merged = False
            self.apply_to()


@dataclass
class LoadReport:
    """What `load_weights` did: modules filled, keys it could not use, network modules left untouched."""

    loaded: int = 0
    unknown_keys: list[str] = field(default_factory=list)
    missing_modules: list[str] = field(default_factory=list)


def split_lora_key(key: str, name_map: Callable[[str], str] | None = None, prefix: str = KOHYA_PREFIX):
    """A LoRA file key -> (Kohya module name, "down" | "up" | "alpha"), or None when it is not one."""
    part = next((p for s, p in _PARTS.items() if key.endswith(s)), None)
    if part is None:
        return None
    stem = key[: -len(next(s for s in _PARTS if key.endswith(s)))]
    if stem.startswith(prefix + "_"):  # Wan-Fun writes `lora_unet__blocks_...`
        stem = prefix + stem[len(prefix) + 1:]
    if stem.startswith(prefix):
        return stem, part
    for module_prefix in _MODULE_PREFIXES:
        if stem.startswith(module_prefix):
            name = stem[len(module_prefix):]
            return kohya_name(name_map(name) if name_map else name, prefix), part
    return None


def group_lora_keys(sd: Mapping[str, torch.Tensor], name_map=None, prefix: str = KOHYA_PREFIX):
    """{Kohya module name: {part: tensor}} and the keys that are not LoRA up / down / alpha tensors."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        parsed = split_lora_key(key, name_map, prefix)
        if parsed is None:
            unknown.append(key)
        else:
            grouped.setdefault(parsed[0], {})[parsed[1]] = tensor
    return grouped, unknown


class LoRANetwork(nn.Module):
    """LoRA modules over the Linear layers of `model` that match the targets and patterns.

    A Linear named N is selected when N ends with a `target_names` entry and no `exclude_patterns` regex
    matches N (`re.match`, as musubi), or when an `include_patterns` regex matches N (include wins over
    exclude and can add Linear layers outside the targets). `modules_dim` (Kohya name -> rank), when given,
    selects exactly those modules instead (a network rebuilt from a file).
    """

    def __init__(self, model: nn.Module, target_names: Iterable[str], dim: int = 4, alpha: float | None = 1.0,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, include_patterns: Iterable[str] = (),
                 exclude_patterns: Iterable[str] = (), loraplus_lr_ratio: float | None = None,
                 modules_dim: Mapping[str, int] | None = None, modules_alpha: Mapping[str, float] | None = None,
                 name_map: Callable[[str], str] | None = None, prefix: str = KOHYA_PREFIX, verbose: bool = False):
        super().__init__()
        self.multiplier, self.loraplus_lr_ratio = multiplier, loraplus_lr_ratio
        self.name_map, self.prefix = name_map, prefix
        self.loras: list[LoRAModule] = []
        selected = self._select(model, tuple(target_names), include_patterns, exclude_patterns, modules_dim, prefix)
        for name, module in selected:
            lora_name = kohya_name(name, prefix)
            rank = modules_dim[lora_name] if modules_dim else dim
            lora_alpha = (modules_alpha or {}).get(lora_name, rank if modules_dim else alpha)
            lora = LoRAModule(lora_name, module, name, multiplier, rank, lora_alpha, dropout, rank_dropout,
                              module_dropout)
            self.add_module(lora_name, lora)
            self.loras.append(lora)
            if verbose:
                logger.info("LoRA %s: rank %d, alpha %g", name, rank, float(lora.alpha))
        if not self.loras:
            raise LoraInputError("no Linear layer matched the LoRA targets and patterns: nothing to train; loosen "
                                 "`exclude_patterns` / `include_patterns` in network_args")
        logger.info("LoRA network: %d modules", len(self.loras))

    @staticmethod
    def _select(model, targets, include, exclude, modules_dim, prefix):
        include = [re.compile(p) for p in include]
        exclude = [re.compile(p) for p in exclude]
        for name, module in model.named_modules():
            if not name or not is_linear(module):
                continue
            if modules_dim is not None:
                chosen = kohya_name(name, prefix) in modules_dim
            else:
                targeted = any(name == t or name.endswith("." + t) for t in targets)
                excluded = any(p.match(name) for p in exclude)
                chosen = (targeted and not excluded) or any(p.match(name) for p in include)
            if chosen:
                yield name, module

    # ---- lifecycle -------------------------------------------------------------------------------

    def apply_to(self) -> None:
        """Attach every module's hook to its Linear (idempotent)."""
        for lora in self.loras:
            lora.apply_to()

    def remove(self) -> None:
        """Detach every hook: the model computes exactly as before `apply_to`."""
        for lora in self.loras:
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def merge_to(self) -> None:
        for lora in self.loras:
            lora.merge_to()

    def unmerge(self) -> None:
        for lora in self.loras:
            lora.unmerge()

    def is_mergeable(self) -> bool:
        return True

    # ---- training --------------------------------------------------------------------------------

    def prepare_optimizer_params(self, lr: float) -> list[dict]:
        """Param groups: every LoRA weight at `lr`, or with LoRA+ the up weights at lr * loraplus_lr_ratio."""
        downs = [lo.lora_down.weight for lo in self.loras if lo.lora_down.weight.requires_grad]
        ups = [lo.lora_up.weight for lo in self.loras if lo.lora_up.weight.requires_grad]
        if self.loraplus_lr_ratio and self.loraplus_lr_ratio != 1:
            return [{"params": downs, "lr": lr, "name": "lora"},
                    {"params": ups, "lr": lr * self.loraplus_lr_ratio, "name": "lora_plus"}]
        return [{"params": downs + ups, "lr": lr, "name": "lora"}]

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device=None) -> tuple[int, float, float]:
        """Scale down every module whose delta norm exceeds `max_norm` (Kohya `scale_weight_norms`).
        Returns (modules scaled, mean norm, max norm) after scaling."""
        norms, scaled = [], 0
        for lora in self.loras:
            norm = ((lora.lora_up.weight @ lora.lora_down.weight) * lora.scale).norm()
            ratio = torch.clamp(norm / max_norm, min=1.0)
            if ratio > 1:
                scaled += 1
                lora.lora_down.weight.div_(ratio.sqrt())
                lora.lora_up.weight.div_(ratio.sqrt())
            norms.append((norm / ratio).item())
        return scaled, sum(norms) / len(norms), max(norms)

    # ---- files -----------------------------------------------------------------------------------

    def lora_state_dict(self, fmt: str = "kohya", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Kohya keys (`lora_unet_<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`) or ComfyUI keys
        (`diffusion_model.<official name>.lora_A.weight`, `.lora_B.weight`, `.alpha`), on the CPU."""
        if fmt not in ("kohya", "comfyui"):
            raise ValueError(f"unknown LoRA format {fmt!r}; use 'kohya' or 'comfyui'")
        out: dict[str, torch.Tensor] = {}
        for lora in self.loras:
            stem, down, up = ((lora.lora_name, "lora_down", "lora_up") if fmt == "kohya"
                              else (f"diffusion_model.{lora.official_name}", "lora_A", "lora_B"))
            for part, tensor in ((down, lora.lora_down.weight), (up, lora.lora_up.weight)):
                out[f"{stem}.{part}.weight"] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
            out[f"{stem}.alpha"] = lora.alpha.detach().to("cpu", dtype or torch.float32).clone()
        return out

    def save_weights(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None, fmt: str = "kohya", write: bool = True) -> Path:
        """Write a .safetensors LoRA atomically (temp file, then os.replace); adds the sshs hashes. A LoRA is
        never sharded, so a process without `write` has nothing to take part in."""
        if not write:
            return Path(path)
        return write_lora_file(self.lora_state_dict(fmt, dtype), path, metadata)

    def load_weights(self, path_or_sd, strict: bool = False) -> LoadReport:
        """Fill the modules from a Kohya, ComfyUI or diffusers LoRA (file or state dict). Keys this network
        cannot use are reported (logged, and an error when `strict`), never silently dropped."""
        sd, _ = read_lora_file(path_or_sd)
        grouped, unknown = group_lora_keys(sd, self.name_map, self.prefix)
        modules = {lo.lora_name: lo for lo in self.loras}
        report = LoadReport(unknown_keys=unknown)
        for lora_name, parts in grouped.items():
            lora = modules.get(lora_name)
            if lora is None or "down" not in parts or "up" not in parts:
                report.unknown_keys += [f"{lora_name}.{p}" for p in parts]
                continue
            _copy_into(lora, parts)
            report.loaded += 1
        report.missing_modules = [n for n in modules if n not in grouped]
        _report(report, str(path_or_sd) if not isinstance(path_or_sd, Mapping) else "state dict", strict)
        return report


def _copy_into(lora: LoRAModule, parts: dict[str, torch.Tensor]) -> None:
    down, up = parts["down"], parts["up"]
    if tuple(down.shape) != tuple(lora.lora_down.weight.shape) or tuple(up.shape) != tuple(lora.lora_up.weight.shape):
        raise LoraInputError(f"{lora.official_name}: LoRA file has down {list(down.shape)} / up {list(up.shape)}, the "
                         f"network has {list(lora.lora_down.weight.shape)} / {list(lora.lora_up.weight.shape)}; "
                         "set `dim_from_weights` to take the rank from the file")
    with torch.no_grad():
        lora.lora_down.weight.copy_(down.float())
        lora.lora_up.weight.copy_(up.float())
        lora.set_alpha(float(parts["alpha"]) if "alpha" in parts else lora.lora_dim)


def _report(report: LoadReport, source: str, strict: bool) -> None:
    if report.unknown_keys:
        msg = (f"{source}: {len(report.unknown_keys)} LoRA keys match no module of this network "
               f"(e.g. {', '.join(report.unknown_keys[:5])})")
        if strict:
            raise LoraInputError(msg)
        logger.warning(msg)
    if report.missing_modules:
        msg = (f"{source}: {len(report.missing_modules)} network modules have no weights in the file "
               f"(e.g. {', '.join(report.missing_modules[:5])}); they keep their current values")
        if strict:
            raise LoraInputError(msg)
        logger.warning(msg)
    logger.info("%s: loaded %d LoRA modules", source, report.loaded)
