"""Lowering onto vdopt's kernels: SDPA to the Triton attention op, temporal attention on the latent in place."""
