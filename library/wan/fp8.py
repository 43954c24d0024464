"""fp8 weights for frozen Linear layers: the format and its maths, the `FP8Linear` layer, and converting a
loaded model's block Linears (what belongs here; reading checkpoint files does not).

A weight is stored as float8 e4m3fn with an optional fp32 scale (one per tensor, or one per output
channel: `W ~ W_fp8 * scale`). `FP8Linear` is an `nn.Linear`, so LoRA hooks attach to it as to any
Linear; it dequantises its own weight for the duration of one matmul (fp32 math, then the compute
dtype), so at most one layer's weight exists in high precision at a time, and its backward pass keeps
only the fp8 weight (the dequantised copy is recomputed). On CUDA GPUs with fp8 tensor cores (compute
capability 8.9+) the frozen layer's matmuls can instead run in fp8 with `torch._scaled_mm`
(`use_scaled_mm`): the forward one with the activations quantised per token on the fly, and in training
the input gradient's, with the gradient quantised per token (the weight's own scale folded into it).

As musubi does, only the Linear layers inside the transformer blocks are converted: patch / text / time
embeddings, the time projection, norms, modulation and the output head keep their precision. ComfyUI
`fp8_scaled` files are used as stored (no round trip through bf16); other files are quantised one layer
at a time while loading. Loading a checkpoint straight into fp8 lives with the loaders
(`library.wan.loading.load_dit(fp8=...)`, `library.wan.text_encoder_fp8`), which build on this module;
this module imports no other part of `library.wan`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _warn_once(message: str, exc: Exception) -> None:
    """A failing fp8 matmul is reported once a process (one line per kind and error, not one per layer)."""
    key = f"{message}|{type(exc).__name__}"
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message + " (reported once; every fp8 layer falls back the same way)", exc)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what FP8Linear computes in
# Module-name fragments that are never converted (musubi's exclusions), even inside a block.
DEFAULT_EXCLUDE = ("norm", "modulation", "embedding", "head", "img_emb")


@dataclass(frozen=True)
class FP8Config:
    """How to store the DiT Linear weights in fp8 (`fp8_base`; `scaled` is `fp8_scaled`)."""

    scaled: bool = True  # fp32 scale per tensor (or channel); unscaled casts the weights as they are
    per_channel: bool = False  # one scale per output channel instead of one per tensor
    use_scaled_mm: bool = False  # fp8 x fp8 matmuls (forward, input gradient) on GPUs that support them
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    @property
    def mode(self) -> str:
        if not self.scaled:
            return "unscaled"
        return "per-channel scaled" if self.per_channel else "per-tensor scaled"


# ---- quantisation ------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, scaled: bool = True, per_channel: bool = False):
    """[out, in] weight -> (e4m3fn weight, fp32 scale [] or [out], or None when unscaled).

    The scale maps each tensor's (or row's) largest magnitude onto the fp8 maximum (448); unscaled
    weights are clamped into the fp8 range and cast."""
    w = weight.float()
    if not scaled:
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero row stays zero
    q = (w / _broadcast(scale, w)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight and its scale -> `dtype`, the product taken in fp32 (one rounding, like the loaders).

    For bf16 / fp16 no fp32 copy of the weight is made: the fp8 -> bf16 cast is exact, and the multiply by
    the fp32 scale (2-D, so it takes part in type promotion) runs in fp32 inside one kernel that writes
    `dtype` (3 bytes of traffic an element before the multiply's own 4, instead of about 19)."""
    if scale is None:
        return weight.to(dtype)
    if dtype == torch.float32 or weight.dim() != 2:
        return (weight.float() * _broadcast(scale.float(), weight)).to(dtype)
    low = weight.to(dtype)
    column = scale.float().reshape(-1, 1) if scale.dim() else scale.float().reshape(1, 1)
    return torch.mul(low, column, out=torch.empty_like(low))


def relative_error(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None) -> float:
    """||W - dequant(q)||_F / ||W||_F, in fp32."""
    return float(weight_error(weight, q, scale))


def weight_error(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`relative_error` as a 0-d tensor on the weight's device: read back later, no wait per layer."""
    w = weight.float()
    return (w - dequantize_weight(q, scale, torch.float32)).norm() / w.norm().clamp_min(1e-30)


def _broadcast(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (weight.dim() - 1))) if scale.dim() else scale


def _normalise_scale(scale: torch.Tensor | None, out_features: int) -> torch.Tensor | None:
    """A file's scale ([], [1], [out] or [out, 1]) -> fp32 [] or [out]."""
    if scale is None:
        return None
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() != out_features:
        raise ValueError(f"fp8 scale has {scale.numel()} values for a layer with {out_features} outputs")
    return scale.reshape(-1)


# ---- the layer ---------------------------------------------------------------------------------------


class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = dequant(W_fp8); the backward pass saves and re-dequantises the fp8 weight."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype, use_scaled_mm):
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype, ctx.use_scaled_mm = dtype, x.dtype, use_scaled_mm
        ctx.bias_dtype = None if bias is None else bias.dtype
        b = None if bias is None else bias.to(dtype)
        if use_scaled_mm:
            return _scaled_mm_linear(x, weight, scale, b, dtype)
        return F.linear(x.to(dtype), dequantize_weight(weight, scale, dtype), b)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise RuntimeError("FP8Linear weights are frozen; train a LoRA over them instead")
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = None
            if ctx.use_scaled_mm:
                try:
                    grad_x = _scaled_mm_grad_input(grad_out, weight, scale, ctx.dtype).to(ctx.x_dtype)
                except RuntimeError as exc:  # an unsupported shape or build: dequantise for this step
                    _warn_once("fp8 input-gradient matmul (torch._scaled_mm) failed (%s); dequantising", exc)
            if grad_x is None:
                grad_x = (grad_out.to(ctx.dtype) @ dequantize_weight(weight, scale, ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_b, None, None


def scaled_mm_supported(device: torch.device, in_features: int, out_features: int) -> bool:
    """fp8 tensor-core matmuls: a CUDA GPU of compute capability 8.9+ (Ada, Hopper) and sizes % 16 == 0."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or in_features % 16 or out_features % 16:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm_linear(x, weight, scale, bias, dtype):
    """Forward matmul in fp8: activations quantised per token (per-channel weights) or per tensor. A bf16 bias
    is added by the matmul itself (`_scaled_mm(bias=)`: bf16 bias with bf16 output, valid for tensor-wise and
    row-wise scales on CUDA; added to the fp32 accumulator before the one rounding to bf16, instead of a second
    kernel reading and writing the output and rounding twice); other output dtypes add it afterwards."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, in], in its own dtype: no fp32 copy
    per_row = scale is not None and scale.dim() == 1
    xq, x_scale = _rowwise_fp8(x2) if per_row else _tensorwise_fp8(x2)
    w_scale = torch.ones((), device=x.device) if scale is None else scale.float()
    w_scale = w_scale.view(1, -1) if per_row else w_scale
    fused = bias is not None and dtype == torch.bfloat16 and bias.dtype == torch.bfloat16
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, bias=bias if fused else None,
                           out_dtype=dtype)
    if bias is not None and not fused:
        out = out + bias
    return out.reshape(*x.shape[:-1], -1)


def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3fn [M, K], fp32 scale [M, 1]): each row's largest magnitude mapped onto 448. The maximum is
    taken in t's dtype (exact), the division in fp32 (the fp32 [M, 1] scale promotes it): the same bits as
    quantising an fp32 copy of t, without making one."""
    scale = (t.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    return (t / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _tensorwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3fn [M, K], fp32 scale []): the tensor's largest magnitude mapped onto 448, computed as
    `_rowwise_fp8` does (a [1, 1] view of the scale keeps the division in fp32 for bf16 / fp16 inputs)."""
    scale = (t.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    return (t / scale.view(1, 1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _scaled_mm_grad_input(grad_out, weight, scale, dtype):
    """The input gradient grad_out [..., out] @ W [out, in] as an fp8 matmul: the weight's scale (per
    tensor or per output channel, both along this product's reduction) is folded into grad_out first, whose
    rows are then quantised to e4m3 with a scale each. `_scaled_mm` takes its second operand column-major, so
    this product needs W^T row-major: a transposed fp8 copy of W, made here (one read and one write of the fp8
    weight, 26 MB for a [5120, 5120] layer against 0.5 GB of gradient traffic at 32k tokens). The stored layout
    is the one the forward matmul (run twice a step with checkpointing) takes as it is; keeping a transposed
    copy as well would cost the fp8 weights' memory twice (14 GiB more for an A14B expert)."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # [M, out]
    if scale is not None:
        g = torch.mul(g, scale.float().reshape(1, -1), out=torch.empty_like(g))
    gq, g_scale = _rowwise_fp8(g)
    ones = torch.ones(1, weight.shape[1], device=g.device, dtype=torch.float32)
    out = torch._scaled_mm(gq, weight.t().contiguous().t(), scale_a=g_scale, scale_b=ones, out_dtype=dtype)
    return out.reshape(*grad_out.shape[:-1], -1)


class FP8Linear(nn.Linear):
    """A frozen Linear whose weight is fp8 (+ fp32 `scale_weight`); computes in the input's dtype (or the
    autocast dtype). Still an `nn.Linear`, so LoRA hooks and `isinstance` checks work unchanged."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                 use_scaled_mm: bool = False):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is ever allocated
        if weight.dtype not in _FP8_DTYPES:
            raise TypeError(f"FP8Linear needs a float8 weight, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scale_weight", _normalise_scale(scale, self.out_features))
        self.use_scaled_mm = use_scaled_mm
        self._scaled_mm_failed = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8Config = FP8Config(), work_device=None):
        """(FP8Linear, relative weight error) from a Linear; the maths runs on `work_device` when given and
        the result is stored where the Linear's weight lives."""
        home = linear.weight.device
        weight = linear.weight.detach().to(work_device or home)
        q, scale = quantize_weight(weight, config.scaled, config.per_channel)
        error = relative_error(weight, q, scale)
        scale = None if scale is None else scale.to(home)
        layer = cls(q.to(home), scale, None if linear.bias is None else linear.bias.detach(), config.use_scaled_mm)
        return layer, error

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.dtype in COMPUTE_DTYPES else torch.bfloat16

    def _fast_path(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """fp8 matmuls for this call: bf16 compute only. The input gradient always scales per row, and
        PyTorch's row-wise fp8 kernel outside cuBLAS 12.9 on Hopper (Ada cards, older CUDA) writes bf16 only:
        an fp16 run would fail inside a compiled block, past the fallback below. fp16 dequantises (said once,
        when the model is set up: `library.runtime.memory`)."""
        if not self.use_scaled_mm or self._scaled_mm_failed:
            return False
        return dtype == torch.bfloat16 and scaled_mm_supported(x.device, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            if self._fast_path(x, dtype):
                try:
                    return _FP8LinearFunction.apply(x, self.weight, self.scale_weight, self.bias, dtype, True)
                except RuntimeError as exc:  # an unsupported shape or build: fall back for good, once
                    self._scaled_mm_failed = True
                    _warn_once("fp8 matmul (torch._scaled_mm) failed (%s); dequantising instead", exc)
            return _FP8LinearFunction.apply(x, self.weight, self.scale_weight, self.bias, dtype, False)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves as usual, but a dtype cast never converts the fp8 weight or its fp32 scale
        (casting an fp8 value to a wider float and back is exact)."""
        fp8_dtype, scale = self.weight.dtype, self.scale_weight
        super()._apply(fn, recurse)
        if self.weight.dtype != fp8_dtype:
            self.weight.data = self.weight.data.to(fp8_dtype)
        if scale is not None and self.scale_weight.dtype != torch.float32:
            self.scale_weight = scale.to(self.scale_weight.device)
        return self

    def extra_repr(self) -> str:
        kind = "unscaled" if self.scale_weight is None else ("per-channel" if self.scale_weight.dim() else "per-tensor")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"{self.weight.dtype}, {kind}"


# ---- whole models ------------------------------------------------------------------------------------


@dataclass
class FP8Report:
    """What a conversion did: per-layer relative weight error, bytes of the converted weights."""

    mode: str
    errors: dict[str, float] = field(default_factory=dict)  # layer -> ||W - dequant||_F / ||W||_F
    layers: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else float("nan")

    @property
    def max_error(self) -> float:
        return max(self.errors.values()) if self.errors else float("nan")

    def summary(self) -> str:
        size = f"{self.bytes_before / 2**30:.2f} -> {self.bytes_after / 2**30:.2f} GiB"
        if not self.errors:
            return f"fp8 ({self.mode}): {self.layers} Linear layers, {size}"
        return (f"fp8 ({self.mode}): {self.layers} Linear layers, {size}, relative weight error mean "
                f"{self.mean_error:.4f}, max {self.max_error:.4f}")


def _excluded(name: str, exclude) -> bool:
    return any(part in name for part in exclude)


def fp8_targets(model: nn.Module, exclude=DEFAULT_EXCLUDE) -> list[str]:
    """Names of the Linear layers inside `model.blocks` that fp8 converts (norms etc. are excluded)."""
    return [name for name, m in model.blocks.named_modules(prefix="blocks")
            if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear) and not _excluded(name, exclude)]


def tensor_bytes(*tensors) -> int:
    """Bytes held by the given tensors (None counts as nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_block_fp8(block: nn.Module, prefix: str, config: FP8Config = FP8Config(), work_device=None,
                      report: FP8Report | None = None) -> FP8Report:
    """Replace the Linear layers of one block (named `prefix.<name>` for the exclusion rules) by
    `FP8Linear`, one layer at a time; adds to `report` and returns it."""
    report = report if report is not None else FP8Report(config.mode)
    for name, linear in list(block.named_modules()):
        full = f"{prefix}.{name}"
        if not isinstance(linear, nn.Linear) or isinstance(linear, FP8Linear) or _excluded(full, config.exclude):
            continue
        layer, report.errors[full] = FP8Linear.from_linear(linear, config, work_device)
        report.bytes_before += tensor_bytes(linear.weight)
        report.bytes_after += tensor_bytes(layer.weight, layer.scale_weight)
        block.set_submodule(name, layer)
        report.layers += 1
    return report


def quantize_model_fp8(model: nn.Module, scaled: bool = True, per_channel: bool = False,
                       exclude=DEFAULT_EXCLUDE, use_scaled_mm: bool = False, work_device=None) -> FP8Report:
    """Replace the block Linear layers of a loaded WAN model by `FP8Linear`, one layer at a time (the
    maths on `work_device` when given, e.g. the GPU for a model still on the CPU). The model keeps
    computing in the dtype it used before. Returns the per-layer relative error report."""
    config = FP8Config(scaled, per_channel, use_scaled_mm, tuple(exclude))
    if getattr(model, "compute_dtype", "absent") is None:
        model.compute_dtype = model._dtype()  # fp8 weights would otherwise make the model guess bf16
    report = FP8Report(config.mode)
    for i, block in enumerate(model.blocks):
        quantize_block_fp8(block, f"blocks.{i}", config, work_device, report)
    logger.info("%s", report.summary())
    return report
