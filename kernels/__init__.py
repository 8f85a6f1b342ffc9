"""vdopt's Triton attention kernels (imported lazily: ``import vdopt`` works without Triton)."""
