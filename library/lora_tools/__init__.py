"""LoRA tools on WAN DiT checkpoint files: merging LoRAs into a DiT (`merge.py`: official, ComfyUI or
diffusers layouts, fp8 inputs; bf16 / fp16 / fp32 / fp8_scaled outputs, one tensor at a time) and
extracting a LoRA from a fine-tuned DiT and its base (`extract.py`). `tools/merge_lora.py` and
`tools/extract_lora.py` are their CLIs. The plain LoRA maths (reading and merging LoRA files, SVD, resize,
key formats) stays in `networks/`; what needs the model files is here.

May import: torch, safetensors, `networks` and `library.wan` (checkpoint files and layouts, fp8
quantisation). Nothing under `library/` or `networks/` imports this package: only `tools/`, entry scripts
and tests do.
"""
