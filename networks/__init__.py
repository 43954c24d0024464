"""LoRA networks: plain PyTorch LoRA (`lora.py`) and the WAN targets and Kohya entry points (`lora_wan.py`);
LoRA files: reading and writing them (`lora_files.py`), metadata (`metadata.py`), key formats
(`convert.py`), SVD resize (`resize.py`), merging LoRAs into one (`merge.py`) and the SVD of a weight
difference (`extract.py`).

May import: torch, safetensors and `library.errors` (the user-error type, which imports nothing) only; WAN
knowledge here is target and exclude names and file formats. Work on DiT checkpoint files (merge into a DiT,
extract from two) is `library.lora_tools`.
"""
