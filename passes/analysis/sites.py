"""What analysis finds: attention sites and the video token layout."""

from __future__ import annotations

import dataclasses
from typing import Literal

Kind = Literal["spatial", "temporal", "full", "cross", "joint_text", "text"]
KINDS: tuple[Kind, ...] = ("spatial", "temporal", "full", "cross", "joint_text", "text")
"""``text`` is self-attention among text tokens only (HunyuanVideo's token refiner): its queries
do not depend on the latent, so parallel passes leave it replicated and PAB leaves it alone."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoLayout:
    """The latent's token grid after patch embedding."""

    batch: int
    """Batch of the latent input (2 with batched CFG)."""
    frames: int
    """T: latent frames after temporal patching."""
    height: int
    """H: patches along the height."""
    width: int
    """W: patches along the width."""
    text_len: int | None = None
    """Number of text tokens, when the model takes a text sequence."""
    source: str | None = None
    """Name of the graph node the grid is read off: the patch embedding convolution, the
    reshape that merges ``(T, H, W)`` into tokens, or where flat tokens arrive (``grid.py``)."""
    source_dim: int | None = None
    """The dim of ``source`` holding the ``T*H*W`` tokens; None for a convolution, whose
    output holds T, H and W in dims of their own."""

    @property
    def spatial_tokens(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionSite:
    """One attention call in the captured graph."""

    name: str
    """Module path of the attention module (``transformer_blocks.0.attn1``), or the node name."""
    node: str
    """Name of the SDPA node in the graph."""
    kind: Kind
    """``spatial``, ``temporal``, ``full`` (joint space-time), ``cross``, ``joint_text`` or ``text``."""
    axes: tuple[str, ...]
    """Axes the queries attend over, from ``("text", "T", "H", "W")``."""
    block: str | None
    """The transformer block (``transformer_blocks.3``), or None outside any block."""
    batch: int
    """Leading dim of the SDPA inputs (e.g. B*T for spatial attention)."""
    heads: int
    head_dim: int
    q_len: int
    kv_len: int
    has_mask: bool = False
    """Whether the site takes an attention mask."""

    def as_row(self) -> dict:
        return dataclasses.asdict(self)
