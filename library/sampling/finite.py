"""A render whose numbers went non-finite is refused, never saved: NaN latents decode to an all-black video
that looks like a result. The check runs on the latents before the VAE decodes them (no decode is
wasted) and on the decoded frames (a VAE with damaged weights), and names the prompt it was for."""

from __future__ import annotations

import torch

from library.errors import UserError


class NonFiniteSampleError(UserError, ValueError):
    """A sample whose latents or frames hold NaN or infinity; the message names its prompt."""


def check_finite_sample(tensor: torch.Tensor, what: str, request) -> None:
    """Raise NonFiniteSampleError when `tensor` (the `what` of `request`'s render) is not all finite."""
    if bool(torch.isfinite(tensor).all()):
        return
    prompt = request.prompt if len(request.prompt) <= 60 else request.prompt[:57] + "..."
    raise NonFiniteSampleError(
        f"{request.source}: the {what} of {prompt!r} hold NaN or infinite values, so nothing was saved for it; a "
        "LoRA or model file with non-finite weights (tools/check_lora.py checks a LoRA), or a LoRA strength too "
        "high for it")
