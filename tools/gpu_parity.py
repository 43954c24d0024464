"""Our DiT against diffusers' WanTransformer3DModel at a variant's full block shape, a few blocks deep.

    python tools/gpu_parity.py --task t2v-A14B --blocks 2 --device cuda --attention all   # 832x480x81 latent
    python tools/gpu_parity.py --task t2v-tiny --device cpu --width 64 --height 64 --frames 9   # CPU dry run

The tests show parity on tiny configs; this tool checks the real shapes (for T2V-A14B: width 5120, 40 heads
of 128, FFN 13824, text 4096) where only a GPU has the memory and speed. It builds diffusers' model with
random weights (seeded; norms and the output head made non-trivial so every path counts), loads the same
weights into our `WanModel` under the official names, and runs both on one random latent and prompt:

1. fp32 (TF32 off): relative max error |ours - diffusers|max / |diffusers|max <= 1e-4 (the tests' bound).
2. bf16, each model cast as its loader does (our fp32 modules and diffusers' `_keep_in_fp32_modules` stay
   fp32): the error of each against the fp32 output. Passes when ours is no worse than
   max(2x diffusers' own bf16 error, 1e-2); the error of ours against diffusers in bf16 is printed too.
3. `--attention`: our bf16 model with each other attention kernel installed (flash_attn, flash3, xformers,
   sage_attn, and PyTorch's SDPA forced to its cudnn / flash / efficient kernel), against the fp32 output:
   exact kernels must stay within 2x our SDPA bf16 error + 1e-3; SageAttention (int8 QK) is reported only.

Exit 0 when every check passes, 1 when one is over its bound, 2 when diffusers is missing or an argument
is wrong. `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our `library`, never another package of that name (sd-scripts has one)

FP32_TOL = 1e-4
BF16_FLOOR = 1e-2
KERNEL_SLACK = 1e-3
# --attention names: (our backend, SDPA kernel forced or None, needed module or None, judged against a bound)
KERNELS = {
    "sdpa_cudnn": ("sdpa", "CUDNN_ATTENTION", None, True),
    "sdpa_flash": ("sdpa", "FLASH_ATTENTION", None, True),
    "sdpa_efficient": ("sdpa", "EFFICIENT_ATTENTION", None, True),
    "flash_attn": ("flash_attn", None, "flash_attn", True),
    "flash3": ("flash3", None, "flash_attn_interface", True),
    "xformers": ("xformers", None, "xformers", True),
    "sage_attn": ("sage_attn", None, "sageattention", False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="t2v-A14B", help="variant whose block shape is used")
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks to build (the variant has more)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--prompt_tokens", type=int, default=77, help="length of the random prompt")
    p.add_argument("--device", default="cuda")
    p.add_argument("--attention", default="", help="comma list of extra kernels to check, or 'all': "
                                                   + ", ".join(KERNELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def rel_max(a, b) -> float:
    """max |a - b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def build_pair(variant, device, seed: int):
    """diffusers' model with random weights on `device`, and our model holding the same weights (fp32)."""
    import torch
    from diffusers import WanTransformer3DModel

    from library.wan.dit_formats import diffusers_to_official
    from library.wan.model import WanModel

    torch.manual_seed(seed)
    with torch.device(device):
        ref = WanTransformer3DModel(
            patch_size=variant.patch_size, num_attention_heads=variant.num_heads,
            attention_head_dim=variant.head_dim, in_channels=variant.in_dim, out_channels=variant.out_dim,
            text_dim=variant.text_dim, freq_dim=variant.freq_dim, ffn_dim=variant.ffn_dim,
            num_layers=variant.num_layers, image_dim=variant.clip_dim if variant.image_embedding else None,
            added_kv_proj_dim=variant.dim if variant.image_embedding else None,
        ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.startswith("proj_out"):
                p.normal_(0, 0.2)
    with torch.device("meta"):
        ours = WanModel(variant)
    state = {diffusers_to_official(k): v.clone() for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True, assign=True)
    return ref, ours.eval()


def to_bf16(ref, ours) -> None:
    """Cast both models as their loaders do for bf16: the modules each keeps in fp32 stay fp32."""
    import torch

    keep = getattr(ref, "_keep_in_fp32_modules", None) or []
    for name, p in ref.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(torch.bfloat16)
    for name, p in ours.named_parameters():
        if not ours.is_fp32_param(name):
            p.data = p.data.to(torch.bfloat16)


def make_inputs(variant, args, device):
    """A random latent [1, C, F, H, W] for the requested video size, and one random prompt."""
    import torch

    st, sh, sw = variant.vae_stride
    shape = (1, variant.in_dim, (args.frames - 1) // st + 1, args.height // sh, args.width // sw)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    latent = torch.randn(shape, device=device, generator=gen)
    prompt = torch.randn(args.prompt_tokens, variant.text_dim, device=device, generator=gen)
    padded = torch.zeros(1, variant.text_len, variant.text_dim, device=device)  # diffusers' pipeline pads
    padded[0, : args.prompt_tokens] = prompt
    return latent, torch.tensor([500.0], device=device), prompt, padded


def run_ref(ref, inputs, dtype):
    import torch

    latent, t, _, padded = inputs
    with torch.no_grad():
        return ref(latent.to(dtype), t, padded.to(dtype), return_dict=False)[0].float()


def run_ours(ours, inputs, backend: str = "sdpa", sdpa_kernel: str | None = None):
    import torch

    latent, t, prompt, _ = inputs
    ours.set_attention_backend(backend)
    ctx = contextlib.nullcontext()
    if sdpa_kernel:
        from torch.nn.attention import SDPBackend
        from torch.nn.attention import sdpa_kernel as force

        ctx = force([getattr(SDPBackend, sdpa_kernel)])
    with torch.no_grad(), ctx:
        return ours(latent, t, [prompt]).float()


def check_kernels(names: list[str], ours, inputs, truth, sdpa_err: float, device) -> dict:
    """Our bf16 model with each other kernel: its error against the fp32 output, or why it was skipped."""
    results = {}
    bound = 2 * sdpa_err + KERNEL_SLACK
    for name in names:
        backend, forced, module, judged = KERNELS[name]
        if module and importlib.util.find_spec(module.split(".")[0]) is None:
            results[name] = {"skipped": f"{module} not installed"}
            continue
        if device.type != "cuda":
            results[name] = {"skipped": "CUDA-only kernel"}
            continue
        try:
            err = rel_max(run_ours(ours, inputs, backend, forced), truth)
        except RuntimeError as exc:  # e.g. "No available kernel" for this GPU / dtype / head size
            results[name] = {"error": str(exc).splitlines()[0][:200], "ok": False}
            continue
        results[name] = {"err": err, "bound": bound if judged else None, "ok": err <= bound or not judged}
    return results


def measure(args) -> dict:
    import torch

    from library.wan.variants import get_variant

    variant = dataclasses.replace(get_variant(args.task), num_layers=args.blocks)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    ref, ours = build_pair(variant, device, args.seed)
    inputs = make_inputs(variant, args, device)
    truth = run_ref(ref, inputs, torch.float32)
    fp32_err = rel_max(run_ours(ours, inputs), truth)
    to_bf16(ref, ours)
    ref16, ours16 = run_ref(ref, inputs, torch.bfloat16), run_ours(ours, inputs)
    ref_err, ours_err = rel_max(ref16, truth), rel_max(ours16, truth)
    bf16_bound = max(2 * ref_err, BF16_FLOOR)
    names = list(KERNELS) if args.attention == "all" else [n for n in args.attention.split(",") if n]
    kernels = check_kernels(names, ours, inputs, truth, ours_err, device)
    del ref
    tokens = inputs[0].shape[2] * (inputs[0].shape[3] // 2) * (inputs[0].shape[4] // 2)
    result = {
        "task": args.task, "blocks": args.blocks, "dim": variant.dim, "heads": variant.num_heads,
        "ffn_dim": variant.ffn_dim, "tokens": tokens, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "fp32_err": fp32_err, "fp32_tol": FP32_TOL, "bf16_ours_vs_fp32": ours_err,
        "bf16_diffusers_vs_fp32": ref_err, "bf16_ours_vs_diffusers": rel_max(ours16, ref16),
        "bf16_bound": bf16_bound, "kernels": kernels, "seconds": time.perf_counter() - start,
    }
    result["ok"] = (fp32_err <= FP32_TOL and ours_err <= bf16_bound
                    and all(k.get("ok", True) for k in kernels.values()))
    return result


def report(r: dict) -> str:
    lines = [(f"{r['task']} block shape (dim {r['dim']}, {r['heads']} heads, ffn {r['ffn_dim']}), "
              f"{r['blocks']} blocks, {r['tokens']} tokens on {r['device_name']}"),
             f"fp32  ours vs diffusers: relative max error {r['fp32_err']:.2e} (bound {r['fp32_tol']:.0e})",
             (f"bf16  ours vs fp32 {r['bf16_ours_vs_fp32']:.2e} (bound {r['bf16_bound']:.2e}), diffusers vs "
              f"fp32 {r['bf16_diffusers_vs_fp32']:.2e}, ours vs diffusers {r['bf16_ours_vs_diffusers']:.2e}")]
    for name, k in r["kernels"].items():
        what = (f"skipped: {k['skipped']}" if "skipped" in k else f"error: {k['error']}" if "error" in k else
                f"vs fp32 {k['err']:.2e}" + (f" (bound {k['bound']:.2e})" if k["bound"] else " (reported only)"))
        lines.append(f"kernel {name}: {what}")
    lines.append(f"parity: {'passed' if r['ok'] else 'FAILED'} in {r['seconds']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [n for n in args.attention.split(",") if n and n != "all" and n not in KERNELS]
    if unknown or args.blocks < 1:
        what = f"--attention {','.join(unknown)}: choose from all, {', '.join(KERNELS)}" if unknown else \
            f"--blocks {args.blocks}: build at least one block"
        print(what, file=sys.stderr)
        return 2
    try:
        from library.wan.variants import get_variant

        get_variant(args.task)
    except ValueError as exc:
        print(f"--task: {exc}", file=sys.stderr)
        return 2
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("gpu_parity.py needs diffusers (the independent reference implementation), which is not "
              "installed: `pip install diffusers`, or on a machine without a registry carry its wheel "
              "(bash tools/gpu_check.sh --fetch-wheels .whl, then --wheels .whl)", file=sys.stderr)
        return 2
    result = measure(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
