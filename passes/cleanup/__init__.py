"""Exact clean-ups that every later pass relies on: folded view chains, no export asserts or identity ops."""
