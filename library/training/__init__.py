"""Training: the loop, flow matching, experts, optimizers, memory features, checkpoints, sampling, monitoring."""
