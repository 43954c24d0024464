"""LoRA networks: plain PyTorch LoRA (`lora.py`) and the WAN targets and Kohya entry points (`lora_wan.py`)."""
