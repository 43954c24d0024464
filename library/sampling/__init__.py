"""Sampling: flow-matching schedules and solvers, the denoising loop (CFG, A14B experts, I2V / TI2V),
`generate` for the CLI, evaluation grids and samples during training, LoRA stacking, video outputs.

Import from the submodules (`library.sampling.generate`, `.save`, ...); nothing is imported here so that
`import library.sampling` stays cheap.
"""
