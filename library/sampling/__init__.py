"""Sampling: flow-matching schedules and solvers, the denoising loop (CFG, A14B experts, I2V / TI2V),
`generate` for the CLI, evaluation grids (strength sweeps; checkpoint grids are `library.evaluation`), LoRA
stacking, video / image / latent outputs, musubi-tuner's generation command lines.

Import from the submodules (`library.sampling.generate`, `.save`, ...); nothing is imported here so that
`import library.sampling` stays cheap. May import: `library.wan`, `library.runtime`, `library.config`,
`library.data` (media decoding for the VACE inputs, `vace`), `networks`; never `library.training` (training
uses sampling for its samples, not the other way round).
"""
