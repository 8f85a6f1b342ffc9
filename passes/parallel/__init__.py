"""Parallel strategies: Ulysses, Ring, USP, DSP (sequence parallel) and CFG parallel."""
