"""fp8 error at a variant's full Linear shapes: weights, layer outputs, and the fp8 matmul where it runs.

    python tools/fp8_error.py --task t2v-A14B --device cuda --tokens 4096     # [5120, 5120], [13824, 5120], ...
    python tools/fp8_error.py --task t2v-tiny --device cpu --tokens 48        # CPU dry run
    python tools/fp8_error.py --device cpu --emulate --tokens 2048            # fp8 matmul errors on the CPU

For each distinct block Linear shape of the variant (self / cross attention, FFN in and out) a random
weight N(0, 0.02) in bf16 is quantised to fp8 e4m3 (`library.wan.fp8`) per tensor, per output channel and
unscaled. Printed per mode: the relative weight error ||W - dequant(W_fp8)|| / ||W|| and the relative L2
error of `FP8Linear(x)` against the fp32 product x W^T for random bf16 activations x [tokens, in] (a bf16
Linear is shown as the floor). Where the device has fp8 tensor cores (compute capability 8.9+), the same
with `use_scaled_mm` (activations quantised per token / tensor, `torch._scaled_mm`) and the time of one
matmul each way, plus the error of the fp8 input gradient (`fp8_fast` in training) against the fp32
product g W and, for both, against the bf16 path (dequantised weight, bf16 matmul). `--emulate` runs the
fp8 matmul path where the device has no fp8 tensor cores, with `torch._scaled_mm` emulated by an fp32
matmul of the dequantised fp8 operands (exact products, fp32 accumulation: the GPU kernel's result up to
accumulation order; torch 2.13's own CPU `_scaled_mm` takes minutes for one A14B-sized product): its
errors are those of the fp8 path, its times mean nothing.
Bound: every output error <= 0.08 (e4m3 keeps 3 mantissa bits: about 0.025-0.04 is expected); a
`_scaled_mm` that fails and falls back to dequantising also fails the check. Exit 0 / 1; 2 for a wrong
argument. `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our `library`, never another package of that name (sd-scripts has one)

OUT_BOUND = 0.08
MODES = {"per_tensor": (True, False), "per_channel": (True, True), "unscaled": (False, False)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="t2v-A14B", help="variant whose Linear shapes are measured")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=4096, help="rows of the random activations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emulate", action="store_true",
                   help="run the fp8 matmul path without fp8 tensor cores (the CPU; errors only)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def linear_shapes(variant) -> list[tuple[int, int]]:
    """The distinct [out, in] shapes of a block's Linear layers."""
    d, f = variant.dim, variant.ffn_dim
    return sorted({(d, d), (f, d), (d, f)})


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def timed(fn, device, repeats: int = 5) -> tuple:
    """(result, milliseconds per call) after one warm-up call."""
    import torch

    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, 1000 * (time.perf_counter() - start) / repeats


def _emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype=None, bias=None, **_):
    """`torch._scaled_mm` as its maths: (a * scale_a) @ (b * scale_b) in fp32, rounded once to `out_dtype`."""
    out = (a.float() * scale_a.float()) @ (b.float() * scale_b.float())
    return (out if bias is None else out + bias).to(out_dtype or a.dtype)


def _input_gradients(q, scale, g, fast: bool):
    """The input gradient of an fp8 layer for the output gradient g: fp8 matmul, or dequantised bf16."""
    import torch

    from library.wan.fp8 import _FP8LinearFunction

    x = torch.zeros(g.shape[0], q.shape[1], device=g.device, dtype=torch.bfloat16, requires_grad=True)
    _FP8LinearFunction.apply(x, q, scale, None, torch.bfloat16, fast).backward(g)
    return x.grad


def measure_shape(shape, tokens: int, device, gen, emulate: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    from library.wan.fp8 import FP8Linear, quantize_weight, relative_error, scaled_mm_supported

    out_f, in_f = shape
    w = (torch.randn(shape, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(tokens, in_f, device=device, generator=gen).to(torch.bfloat16)
    truth = x.float() @ w.float().t()
    row = {"shape": list(shape)}
    reps = 1 if emulate else 5  # emulated times mean nothing: one call each
    y, row["bf16_ms"] = timed(lambda: F.linear(x, w), device, reps)
    row["bf16_out_err"] = rel_l2(y, truth)
    fast = emulate or scaled_mm_supported(device, in_f, out_f)
    g = torch.randn(tokens, out_f, device=device, generator=gen).to(torch.bfloat16)
    grad_truth = g.float() @ w.float()
    for mode, (scaled, per_channel) in MODES.items():
        q, scale = quantize_weight(w, scaled, per_channel)
        row[f"{mode}_weight_err"] = relative_error(w, q, scale)
        layer = FP8Linear(q, scale, None)
        with torch.no_grad():
            y, row[f"{mode}_ms"] = timed(lambda layer=layer: layer(x), device, reps)
        row[f"{mode}_out_err"] = rel_l2(y, truth)
        if fast and scaled:
            bf16_out = y
            layer = FP8Linear(q, scale, None, use_scaled_mm=True)
            if emulate:  # the device check would send the layer down the dequantising path
                layer._fast_path = lambda x: True
            with torch.no_grad():
                y, row[f"{mode}_scaled_mm_ms"] = timed(lambda layer=layer: layer(x), device, reps)
            row[f"{mode}_scaled_mm_out_err"] = rel_l2(y, truth)
            row[f"{mode}_scaled_mm_vs_bf16"] = rel_l2(y, bf16_out)
            row[f"{mode}_scaled_mm_fell_back"] = layer._scaled_mm_failed
            bf16_grad, fp8_grad = (_input_gradients(q, scale, g, f) for f in (False, True))
            row[f"{mode}_bf16_grad_err"] = rel_l2(bf16_grad, grad_truth)
            row[f"{mode}_scaled_mm_grad_err"] = rel_l2(fp8_grad, grad_truth)
            row[f"{mode}_scaled_mm_grad_vs_bf16"] = rel_l2(fp8_grad, bf16_grad)
    return row


def measure(args) -> dict:
    import torch

    from library.wan.fp8 import scaled_mm_supported
    from library.wan.variants import get_variant

    variant = get_variant(args.task)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.emulate:
        torch._scaled_mm = _emulated_scaled_mm
    rows = [measure_shape(s, args.tokens, device, gen, args.emulate) for s in linear_shapes(variant)]
    errors = [v for r in rows for k, v in r.items() if k.endswith("out_err") and not k.startswith("bf16")]
    fell_back = [r["shape"] for r in rows for k, v in r.items() if k.endswith("fell_back") and v]
    s = variant.dim
    return {
        "task": args.task, "device": str(device), "tokens": args.tokens, "rows": rows,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "scaled_mm": scaled_mm_supported(device, s, s) or args.emulate, "emulated": args.emulate,
        "scaled_mm_fell_back": fell_back,
        "max_out_err": max(errors), "bound": OUT_BOUND, "ok": max(errors) <= OUT_BOUND and not fell_back,
    }


def report(r: dict) -> str:
    lines = [(f"fp8 e4m3 error, {r['task']} Linear shapes, {r['tokens']} tokens on {r['device_name']} "
              f"(fp8 matmul: {'emulated' if r.get('emulated') else 'yes' if r['scaled_mm'] else 'not on this device'}"
              ")")]
    for row in r["rows"]:
        out_f, in_f = row["shape"]
        lines.append(f"[{out_f}, {in_f}]  bf16 Linear: output {row['bf16_out_err']:.4f}, {row['bf16_ms']:.3f} ms")
        for mode in MODES:
            text = (f"  {mode:<11} weight {row[f'{mode}_weight_err']:.4f}  output {row[f'{mode}_out_err']:.4f}  "
                    f"{row[f'{mode}_ms']:.3f} ms")
            if f"{mode}_scaled_mm_out_err" in row:
                text += (f"  | fp8 matmul: output {row[f'{mode}_scaled_mm_out_err']:.4f}  "
                         f"{row[f'{mode}_scaled_mm_ms']:.3f} ms, {row[f'{mode}_scaled_mm_vs_bf16']:.4f} against "
                         f"the bf16 path; input gradient {row[f'{mode}_scaled_mm_grad_err']:.4f} (bf16 path "
                         f"{row[f'{mode}_bf16_grad_err']:.4f}), {row[f'{mode}_scaled_mm_grad_vs_bf16']:.4f} "
                         "against it"
                         + ("  (FAILED, fell back)" if row[f"{mode}_scaled_mm_fell_back"] else ""))
            lines.append(text)
    lines.append(f"max output error {r['max_out_err']:.4f} (bound {r['bound']}): {'passed' if r['ok'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from library.wan.variants import get_variant

    try:
        get_variant(args.task)
    except ValueError as exc:
        print(f"--task: {exc}", file=sys.stderr)
        return 2
    if args.tokens < 1:
        print(f"--tokens {args.tokens}: give at least one row of activations", file=sys.stderr)
        return 2
    result = measure(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
