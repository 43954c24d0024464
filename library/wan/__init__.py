"""The WAN model family: DiT (`model`), variants, both VAEs, umT5 text encoder, CLIP vision, checkpoint
formats and loading, fp8 weights, attention backends, and the input facts shared by training and
generation (`conditioning`: the I2V mask, which A14B expert owns a timestep). VACE: the VACE blocks over the
DiT (`vace`, with `build_dit` choosing the class) and the VACE context (`vace_context`).

May import: torch, safetensors, transformers; nothing of the project outside `library.wan`. Knows nothing
of datasets, training, LoRA or command lines."""
