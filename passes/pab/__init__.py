"""Pyramid Attention Broadcast: the graph specialization per pattern of reused attention kinds."""
