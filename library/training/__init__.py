"""Training, LoRA and full fine-tuning: one loop (`trainer`, run by `cli` for both entry scripts).

Inside, bottom to top: `seeding`, `dtypes`, `flow_matching`, `conditioning` (TI2V) -> `engines` (what
trains: LoRA, full weights, fused optimizer step, FSDP2 sharding, base LoRAs merged first; behind the
`TrainableNetwork` protocol) -> `experts` (ranges, samplers, routing), `run`, `data`, `optimizers`,
`planning` (memory planner: `lora`, `full`, `auto`) -> `checkpoints` (names, weight files and metadata,
resume state, listing, pruning), `optimization`, `assemble` (experts loaded and made ready) -> `logs`,
`monitor`, `advice`, `samples` -> `trainer`, `cli`, `benchmark`.

May import: `library.wan`, `library.runtime`, `library.config`, `library.data`, `library.sampling` (samples
during training, LoRA file checks), `networks`. Imported by `library.evaluation`, the entry scripts and
tools; never by `library.sampling` or anything below it."""
