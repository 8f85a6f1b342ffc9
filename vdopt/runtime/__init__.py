"""The executable: runs rewritten graphs per call and holds step state (PAB caches, the PipeFusion schedule)."""
