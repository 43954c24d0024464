"""fp8 weights for the umT5 text encoder (`fp8_t5`): which Linear layers are stored in fp8, the setting
(`t5_fp8_config`), the gated FFN that runs over fp8 layers (`FP8GatedFFN`), and putting `FP8Linear`
layers into a model being built, quantised one layer at a time (fp8 files are used as stored).

What does not belong here: the fp8 format and `FP8Linear` (`fp8.py`), the umT5 checkpoint formats and
`build_text_encoder` (`text_encoder.py`, which calls `assign_fp8_layers`), reading files (`loading.py`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .fp8 import FP8Config, FP8Linear, FP8Report, quantize_weight, relative_error
from .staged_load import staged_loader

if TYPE_CHECKING:  # transformers is imported by text_encoder.py, which builds the model
    from transformers import UMT5EncoderModel

# The Linear layers that `fp8_t5` stores in fp8: attention q/k/v/o and the gated FFN of every block.
FP8_TARGET_RE = re.compile(
    r"^encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_0|wi_1|wo))\.weight$"
)
_FP8_CHUNK = 1 << 24  # elements quantised at once (64 MiB in fp32): bounds the transient per layer


def t5_fp8_config(fp8):
    """The fp8 setting for umT5: None (off), True (per-channel scaled e4m3fn) or an `FP8Config` as is.

    Per-channel scales cost 4 bytes a row and follow umT5's uneven row magnitudes better than one scale
    a tensor; the matmul always dequantises (no fp8 activations: umT5's activations have outliers)."""
    if fp8 is None or fp8 is False:
        return None
    if fp8 is True:
        return FP8Config(scaled=True, per_channel=True, use_scaled_mm=False, exclude=())
    if not isinstance(fp8, FP8Config):
        raise TypeError(f"fp8 must be a bool or an FP8Config, not {type(fp8).__name__}")
    return fp8


class FP8GatedFFN(nn.Module):
    """umT5's gated-GELU FFN over fp8 layers: `wo(gelu_tanh(wi_0 x) * wi_1 x)`, with the same names.

    It replaces transformers' `UMT5DenseGatedActDense`, whose forward casts the activations to
    `wo.weight.dtype` (float8 here) before `wo`. In float16 the product is upcast to float32 before `wo`
    instead, as transformers' fp32 `wo` does (umT5 overflows in fp16 there)."""

    def __init__(self, ffn: nn.Module, wi_0: nn.Module, wi_1: nn.Module, wo: nn.Module):
        super().__init__()
        self.wi_0, self.wi_1, self.wo = wi_0, wi_1, wo
        self.dropout, self.act = ffn.dropout, ffn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, L, C]
        h = self.dropout(self.act(self.wi_0(x)) * self.wi_1(x))  # [B, L, d_ff]
        return self.wo(h.float() if h.dtype == torch.float16 else h)


def _quantize_by_rows(weight: torch.Tensor, config, work: torch.device, to_work=None):
    """(fp8 weight on `work`, scale or None, relative error) of one [out, in] weight. Per-channel and
    unscaled quantisation treat rows independently, so they run over row chunks and only a chunk exists
    in fp32 at a time; a per-tensor scale needs the whole tensor at once. `to_work(tensor)` moves a tensor
    (or chunk) to `work` in its own dtype (default: `.to(work)`)."""
    to_work = to_work or (lambda tensor: tensor.to(work))
    if config.scaled and not config.per_channel:
        w = to_work(weight)
        q, scale = quantize_weight(w, True, False)
        return q, scale, relative_error(w, q, scale)
    rows = max(1, _FP8_CHUNK // max(1, weight.shape[1]))
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=work)
    scales, err2, norm2 = [], 0.0, 0.0
    for start in range(0, weight.shape[0], rows):
        w = to_work(weight[start:start + rows])
        q[start:start + rows], s = quantize_weight(w, config.scaled, True)
        norm = float(w.float().norm())
        err2 += (relative_error(w, q[start:start + rows], s) * norm) ** 2
        norm2 += norm**2
        if s is not None:
            scales.append(s)
    scale = torch.cat(scales) if scales else None
    return q, scale, (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def assign_fp8_layers(model: UMT5EncoderModel, sd_hf: dict, scales: dict, device, config, release, check=None):
    """Put an `FP8Linear` in place of every target Linear of the (meta) model, one layer at a time:
    fp8 tensors of the file go in as stored with their scale, others are quantised now (on the GPU
    when there is one, which they reach through the page-locked staging buffers of `staged_load.py` in
    their own dtype: the same bytes as `.to(work)`). The gated FFNs become `FP8GatedFFN`. `check(key, source,
    tensor)`, when given, refuses a weight or scale holding NaN or infinity (on a staged load at its end,
    with the file's bytes of the tensor). Returns the `FP8Report`."""
    device = torch.device(device)
    work = torch.device("cuda") if device.type == "cpu" and torch.cuda.is_available() else device
    report = FP8Report(config.mode)
    keys = [k for k in sd_hf if FP8_TARGET_RE.match(k)]
    check = check or (lambda key, source, tensor: None)
    sizes = (sd_hf[k].numel() * sd_hf[k].element_size() for k in keys)
    with staged_loader(work, lambda key, tensor: check(key, sd_hf[key], tensor), sizes) as stager:
        for key in keys:
            _assign_layer(model, key, sd_hf[key], scales.get(key), device, work, config, report, release, stager,
                          check)
    for block in model.encoder.block:
        ffn = block.layer[1].DenseReluDense
        block.layer[1].DenseReluDense = FP8GatedFFN(ffn, ffn.wi_0, ffn.wi_1, ffn.wo)
    return report


def _assign_layer(model, key: str, source: torch.Tensor, scale, device, work, config, report: FP8Report, release,
                  stager, check) -> None:
    """One target Linear as `FP8Linear`: the file's fp8 bytes as stored, or quantised now (`stager`, when
    given, moves onto `work`; the quantisation waits for its copies on the device, not the host). Each
    staged piece is screened at the end of the load (as its host piece: no device copy kept alive), the
    rest here."""
    name = key.removesuffix(".weight")

    def to_work(tensor: torch.Tensor) -> torch.Tensor:
        staged = stager.load(key, tensor, tensor.dtype, keep=tensor)
        stager.join()
        return staged

    if source.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        staged = stager is not None and work == device
        weight = to_work(source) if staged else source.to(device)
        if not staged:
            check(key, source, weight)
        report.mode = "from file, " + ("scaled" if scale is not None else "unscaled")
        if scale is not None:
            check(key, scale, scale)
            scale = scale.to(device=device, dtype=torch.float32)
    else:
        if stager is None:
            check(key, source, source)
        weight, scale, report.errors[name] = _quantize_by_rows(source, config, work,
                                                               to_work if stager is not None else None)
        weight, scale = weight.to(device), None if scale is None else scale.to(device)
    if release is not None and weight.data_ptr() != source.data_ptr():
        release(source)
    report.layers += 1
    report.bytes_before += source.numel() * 2  # what the layer costs in bf16
    report.bytes_after += weight.numel() * weight.element_size() + (0 if scale is None else scale.numel() * 4)
    model.set_submodule(name, FP8Linear(weight, scale, None, config.use_scaled_mm))
