"""Training, LoRA and full fine-tuning: one loop (`trainer`, run by `cli` for both entry scripts).

Inside, bottom to top: `seeding`, `dtypes`, `files` (atomic writes, full-disk errors), `flow_matching`,
`conditioning` (TI2V) -> `engines` (what trains: LoRA, full weights, fused optimizer step, FSDP2 sharding,
base LoRAs merged first; behind the `TrainableNetwork` protocol) -> `experts` (ranges, samplers, routing),
`run`, `lock` (one run per output folder), `guard` (non-finite losses), `data`, `optimizers`, `planning`
(memory planner: `lora`, `full`, `auto`) -> `checkpoints` (names, weight files and metadata, resume state
(plain data, read with weights_only), listing, pruning, leftovers of killed saves), `parallel` (data x
sequence groups), `optimization`, `assemble` (experts loaded and made ready) -> `logs`, `monitor`,
`advice`, `samples`, `report` (plots, run_summary.json, the saves' ranking, report.html), `reporting` (the
loop's side of the report) -> `trainer`, `cli`, `benchmark`, `estimate` and `estimate_parallel` (step
estimates).

May import: `library.wan`, `library.runtime`, `library.config`, `library.data`, `library.sampling` (samples
during training, LoRA file checks), `networks`. Imported by `library.evaluation`, the entry scripts and
tools; never by `library.sampling` or anything below it."""
