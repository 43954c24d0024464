"""Loading a DiT with its block Linear weights in fp8 (`fp8_base`, `load_dit(fp8=...)`): fp8 files used byte
for byte with their scales, other files quantised one layer at a time as they are read, on the GPU when
there is one (the `work` device). Onto a GPU the weights to quantise reach it through the page-locked
staging buffers of `staged_load.py` in their file dtype (so the fp8 bytes and scales are those of a
per-tensor `.to(work)`), `join` orders each quantisation after its copies without a host wait, and the rest
of the model is staged as `load_dit` stages it. NaN / infinity is refused naming the file and tensor: at
once on the per-tensor path, when the load ends on the staged one. Re-exported by `loading.py`.
"""

from __future__ import annotations

import logging
import os

import torch

from .dit_formats import FP8_DTYPES
from .fp8 import (COMPUTE_DTYPES, FP8Config, FP8Linear, FP8Report, fp8_targets, quantize_weight, tensor_bytes,
                  weight_error)
from .load_common import check_finite, materialise, open_dit_model, target_dtype
from .model import WanModel
from .staged_load import staged_loader

logger = logging.getLogger(__name__)


def load_dit_fp8(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.bfloat16,
                 task: str | None = None, config: FP8Config = FP8Config()):
    """`load_dit` with the block Linear weights in fp8. fp8 tensors in the file (ComfyUI `fp8_scaled`,
    either scale spelling, or plain fp8) are used byte for byte with their scales; other weights are
    quantised layer by layer as they are read (on the GPU when one is available). Everything else is
    loaded as `load_dit` loads it. The model computes in `dtype` and carries `model.fp8_report`."""
    ckpt, layout, variant, model, expected = open_dit_model(path, task)
    device = torch.device(device)
    work = torch.device("cuda") if device.type == "cpu" and torch.cuda.is_available() else device
    targets = fp8_targets(model, config.exclude)
    weight_keys = {f"{t}.weight" for t in targets}
    sizes = [ref.numel() * (ckpt.dtype(layout.key_map[n]) if n in weight_keys else target_dtype(n, dtype)).itemsize
             for n, ref in expected.items()]
    report, errors, state = FP8Report(config.mode), {}, {}
    with staged_loader(work, lambda k, t: check_finite(ckpt, k, t), sizes) as stager:  # None: per-tensor `.to()`
        onto_device = stager if work == device else None  # the work GPU's stager, for what stays on the device
        for name in expected:
            if name not in weight_keys:
                state[name] = materialise(ckpt, layout, name, layout.key_map[name], device, target_dtype(name, dtype),
                                          onto_device)
        for target in targets:
            bias = state.pop(f"{target}.bias", None)
            model.set_submodule(target, _fp8_layer(ckpt, layout, target, bias, device, work, config, report,
                                                   stager, onto_device, errors))
    if errors:  # read back once: the errors stay on the work device until every layer is queued
        report.errors.update(zip(errors, torch.stack(list(errors.values())).tolist()))
    _load_rest(model, state, targets)
    model.compute_dtype = dtype if dtype in COMPUTE_DTYPES else torch.bfloat16
    model.requires_grad_(False).eval()
    model.fp8_report = report
    logger.info("loaded %s from %s: %s", variant.name, ckpt.source, report.summary())
    return model


def _fp8_layer(ckpt, layout, target: str, bias, device, work, config: FP8Config, report: FP8Report,
               stager, onto_device, errors: dict) -> FP8Linear:
    """One block Linear as FP8Linear: the file's fp8 bytes as they are, or this layer quantised now (its
    relative error, a 0-d tensor, goes to `errors`). `stager` stages onto `work`, `onto_device` onto `device`
    (the same one, or None when the device is the CPU)."""
    name = f"{target}.weight"
    file_key = layout.key_map[name]
    source = ckpt.read(file_key)
    if source.dtype in FP8_DTYPES:
        scale_key = layout.scales.get(name)
        report.mode = "from file, " + ("scaled" if scale_key else "unscaled")
        if onto_device is not None:  # bytes as stored, screened when the load ends
            weight = onto_device.load(file_key, source, source.dtype)
            scale = onto_device.load(scale_key, ckpt.read(scale_key), ckpt.dtype(scale_key)) if scale_key else None
        else:
            scale = ckpt.read(scale_key).to(device) if scale_key else None
            weight = source.to(device)
            check_finite(ckpt, file_key, weight)
            if scale is not None:
                check_finite(ckpt, scale_key, scale)
    else:
        if stager is not None:  # in the file's dtype, so the quantiser sees what `.to(work)` gives it
            original = stager.load(file_key, source, source.dtype, keep=source)  # screened from the file's values
            stager.join()
        else:
            original = source.to(work)
            check_finite(ckpt, file_key, original)
        weight, scale = quantize_weight(original, config.scaled, config.per_channel)
        errors[target] = weight_error(original, weight, scale)
        del original
        weight, scale = weight.to(device), None if scale is None else scale.to(device)
    if weight.data_ptr() != source.data_ptr():
        ckpt.release(file_key)
    report.layers += 1
    report.bytes_before += source.numel() * 2  # what the layer costs in bf16
    report.bytes_after += tensor_bytes(weight, scale)
    return FP8Linear(weight, scale, bias, config.use_scaled_mm)


def _load_rest(model: WanModel, state: dict, targets: list[str]) -> None:
    """Assign every non-fp8 tensor; the only keys allowed to be missing are the fp8 layers' own."""
    result = model.load_state_dict(state, strict=False, assign=True)
    own = {f"{t}.{leaf}" for t in targets for leaf in ("weight", "bias", "scale_weight")}
    stray = [k for k in result.missing_keys if k not in own] + list(result.unexpected_keys)
    if stray:
        raise RuntimeError(f"fp8 load left keys unassigned or unexpected: {stray[:5]}")
