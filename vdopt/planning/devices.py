"""Device and link rows: what the cost model knows about the hardware.

The rows live as data in ``hardware.json`` next to this file, each figure with its source.
``vdopt calibrate --out FILE`` writes a file of the same form holding one measured device row
and one measured link row; ``device=`` and ``link=`` accept a row name or such a file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

TABLE = Path(__file__).with_name("hardware.json")
"""The built-in rows."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """What one accelerator computes and holds."""

    key: str
    """Row name (``"h100"``) or the calibration file it came from."""
    name: str
    """Human-readable device name."""
    memory_gb: float
    """Device memory, GB (1e9 bytes)."""
    peak_tflops: dict[str, float]
    """Datasheet dense peak per dtype name (``"bfloat16"``), TFLOP/s."""
    matmul_tflops: dict[str, float]
    """What large matrix products reach per dtype name, TFLOP/s."""
    attention_tflops: dict[str, float]
    """What the attention kernel reaches at long sequences per dtype name, TFLOP/s
    (4*B*N*Sq*Skv*D per second); short sequences reach less (``cost_model``)."""
    attention_half_kv: float | None = None
    """Key length at which the attention kernel reaches half its long-sequence rate
    (``cost_model.attention_efficiency``); ``None``: the GPU kernels' ``ATTENTION_HALF_KV``.
    A calibrated row fits its own (CPU kernels lose little at short keys)."""
    memory_bandwidth_gbps: float
    """Bytes read and written per second by the memory-bound ops of a transformer block
    (elementwise, norms, copies) at activation sizes, GB/s: what a copy streams on a GPU;
    on a CPU less (norms and GELU are slower than their bytes)."""
    op_overhead_us: float
    """Fixed cost per executed op (launch, tail), microseconds."""
    view_overhead_us: float = 0.0
    """Fixed cost per view or metadata op (reshape, permute, getitem, ...), microseconds: 0
    where graphs are compiled (views fuse away), the Python dispatch cost where graphs run
    node by node (a calibrated CPU)."""
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    """Where each figure comes from."""

    def rate(self, table: dict[str, float], dtype: torch.dtype) -> float:
        """FLOP/s of ``table`` for ``dtype`` (float32 for dtypes the row does not list)."""
        name = str(dtype).removeprefix("torch.")
        return table.get(name, table["float32"]) * 1e12


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """What the link between the ranks of a mesh moves."""

    key: str
    """Row name (``"nvlink"``) or the calibration file it came from."""
    name: str
    """Human-readable link name."""
    bandwidth_gbps: float
    """Bytes one rank sends to the others per second in an all-to-all, GB/s."""
    latency_us: float
    """Fixed cost per collective (or per ring hop), microseconds."""
    sources: dict[str, str]
    """Where each figure comes from."""


def _table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def device_names() -> list[str]:
    return sorted(_table()["devices"])


def link_names() -> list[str]:
    return sorted(_table()["links"])


def _row(value: str | Path, section: str) -> tuple[str, dict[str, Any]]:
    rows = _table()[section]
    key = str(value)
    if key.lower() in rows:
        return key.lower(), rows[key.lower()]
    path = Path(value)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ValueError(f"{section[:-1]} file {path} does not exist: write it with `vdopt calibrate --out {path}`")
        data = json.loads(path.read_text())
        row = data.get(section[:-1])
        if not isinstance(row, dict):
            raise ValueError(f"{path} has no {section[:-1]!r} row: write it with `vdopt calibrate --out {path}`")
        return str(path), row
    raise ValueError(f"unknown {section[:-1]} {key!r}: use one of {', '.join(sorted(rows))}, or a file written by "
                     "`vdopt calibrate --out FILE`")


def _build(cls, key: str, row: dict[str, Any]):
    fields = {f.name for f in dataclasses.fields(cls)} - {"key"}
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING} - {"key"}
    missing = required - set(row)
    if missing:
        raise ValueError(f"{cls.__name__} row {key!r} lacks {sorted(missing)}")
    return cls(key=key, **{k: row[k] for k in fields if k in row})


def get_device(value: str | Path | DeviceSpec) -> DeviceSpec:
    """A device row by name (``"h100"``), from a calibration file, or as given."""
    if isinstance(value, DeviceSpec):
        return value
    return _build(DeviceSpec, *_row(value, "devices"))


def get_link(value: str | Path | LinkSpec) -> LinkSpec:
    """A link row by name (``"nvlink"``), from a calibration file, or as given."""
    if isinstance(value, LinkSpec):
        return value
    return _build(LinkSpec, *_row(value, "links"))


def as_row(spec: DeviceSpec | LinkSpec) -> dict[str, Any]:
    """The row of ``spec`` as stored in a file (without its key)."""
    row = dataclasses.asdict(spec)
    row.pop("key")
    return row
