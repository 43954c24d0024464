"""LoRA file diagnostics: what a WAN LoRA file is and why it may do nothing (key format, ComfyUI names, the
variant its shapes fit, the A14B expert and its partner, the size of its effect, its training facts).
`tools/check_lora.py` is the CLI; `diagnose` and `format_diagnosis` are what it and the tests call.

    keys.py          key formats, ComfyUI compatibility, non-WAN families, the split into modules
    architecture.py  the variants a LoRA fits, the variant its metadata names, a DiT to compare with
    effect.py        ||up @ down|| * alpha / rank per module, relative to the base weight
    checks.py        the checks in order and `diagnose`
    report.py        Diagnosis and its findings, the verdict, the human report

May import: torch, safetensors, `networks` (LoRA keys and names), `library.wan` (variants, checkpoint
files) and `library.config`; besides, two helpers of packages beside it: the expert file naming of
`library.sampling.loras` and the metadata readers of `library.registry.files`. Nothing under `library/`
or `networks/` imports this package: only `tools/`, entry scripts and tests do.
"""

from .architecture import DitReference, open_dit
from .checks import diagnose
from .effect import gram_norm
from .report import Diagnosis, Finding, format_diagnosis

__all__ = ["Diagnosis", "DitReference", "Finding", "diagnose", "format_diagnosis", "gram_norm", "open_dit"]
