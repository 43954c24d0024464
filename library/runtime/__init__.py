"""What makes a WAN model run within a memory and speed budget, for training and generation alike: fp8
application and activation offloading (`memory`), block swap between host and accelerator
(`block_swap`), exact-size page-locked host memory for both (`pinned`), `torch.compile` of the blocks and
the CUDA math flags (`compiling`), one sample's tokens split over several processes (`sequence_parallel`).

May import: `library.wan` (and torch). Knows models, not datasets, optimizers, LoRA or CLIs; imported by
`library.training`, `library.sampling` and the benchmarks.
"""
