"""The dtypes named by the config: compute precision (`mixed_precision`), save precision and `vae_dtype`."""

from __future__ import annotations

import torch

BASE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}
VAE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
              "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
