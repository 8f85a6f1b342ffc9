"""Which is faster for one attention site, SDPA or vdopt's kernel: measured on the device, cached.

``kernels="auto"`` lowers an SDPA site only where vdopt's kernel wins on that site's exact
inputs (shapes, strides, dtype, mask) on this device. The first time a site signature is
seen, both run on random tensors with those strides (warm-up first, so Triton's autotuning
and compilation are not timed) and the result is stored in a JSON file keyed by device,
torch and Triton versions, so later captures, processes and re-runs reuse it. The kernel
must beat SDPA by ``margin`` to be chosen: SDPA is the known quantity.

The cache lives at ``$VDOPT_CACHE_DIR/kernel_choices.json`` (default
``~/.cache/vdopt``). A cache file that cannot be read is ignored (and rewritten), never fatal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CACHE_FILE = "kernel_choices.json"


def default_cache_path() -> Path:
    root = os.environ.get("VDOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vdopt")
    return Path(root) / CACHE_FILE


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiteInputs:
    """What an attention site is called with (from the graph's fake values)."""

    q: torch.Tensor
    """Query (a fake or real tensor: only shape, strides, dtype and device are read)."""
    k: torch.Tensor
    """Key."""
    v: torch.Tensor
    """Value."""
    scale: float
    """Softmax scale."""
    mask_batch: int | None = None
    """Leading dim of a boolean key-padding mask (1 or B), None without a mask."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice:
    """The decision for one site signature."""

    use_kernel: bool
    """True when vdopt's kernel is faster by the margin."""
    sdpa_ms: float
    """SDPA's time per call."""
    kernel_ms: float
    """vdopt's kernel's time per call."""
    cached: bool
    """Whether the times came from the cache file (not measured in this process)."""

    def describe(self) -> str:
        source = "cached" if self.cached else "measured"
        return f"{source}: triton {self.kernel_ms:.3f} ms vs sdpa {self.sdpa_ms:.3f} ms"


def _versions(device: torch.device) -> str:
    from vdopt.kernels.dispatch import triton_available

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    triton = "none"
    if triton_available():
        import triton as triton_module

        triton = triton_module.__version__
    return f"{name}|torch {torch.__version__}|triton {triton}"


def site_key(site: SiteInputs) -> str:
    """The cache key: device, versions and everything about the inputs that changes the timing."""
    tensors = ";".join(f"{tuple(t.shape)}/{tuple(t.stride())}" for t in (site.q, site.k, site.v))
    mask = "none" if site.mask_batch is None else f"bool({site.mask_batch},{site.k.shape[-2]})"
    return f"{_versions(site.q.device)}|{site.q.dtype}|{tensors}|mask {mask}"


def _real(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A real tensor with ``like``'s shape, strides, dtype and device, filled with N(0, 1)."""
    t = torch.empty_strided(tuple(like.shape), tuple(like.stride()), dtype=like.dtype, device=like.device)
    values = torch.randn(tuple(like.shape), generator=generator, dtype=torch.float32)
    return t.copy_(values.to(t.device))


def _time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) * 1e3 / repeats


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeasuredChoice:
    """Decide per site signature by timing both implementations (see the module docstring)."""

    cache_path: Path | None = None
    """JSON cache file; None for ``default_cache_path()``."""
    margin: float = 0.03
    """How much faster (fraction) the kernel must be to replace SDPA."""
    warmup: int = 3
    """Untimed calls of each implementation first (compilation, autotuning)."""
    repeats: int = 10
    """Timed calls of each."""

    def __call__(self, site: SiteInputs) -> Choice:
        path = self.cache_path or default_cache_path()
        key = site_key(site)
        entries = _read_cache(path)
        if key in entries:
            sdpa_ms, kernel_ms = entries[key]["sdpa_ms"], entries[key]["kernel_ms"]
            return Choice(use_kernel=self._wins(sdpa_ms, kernel_ms), sdpa_ms=sdpa_ms, kernel_ms=kernel_ms, cached=True)
        sdpa_ms, kernel_ms = self.measure(site)
        entries = _read_cache(path)  # another process may have added entries meanwhile
        entries[key] = {"sdpa_ms": sdpa_ms, "kernel_ms": kernel_ms}
        _write_cache(path, entries)
        return Choice(use_kernel=self._wins(sdpa_ms, kernel_ms), sdpa_ms=sdpa_ms, kernel_ms=kernel_ms, cached=False)

    def _wins(self, sdpa_ms: float, kernel_ms: float) -> bool:
        return kernel_ms * (1.0 + self.margin) < sdpa_ms

    def measure(self, site: SiteInputs) -> tuple[float, float]:
        """``(sdpa_ms, kernel_ms)`` per call on random inputs with the site's layout."""
        # The launcher the vdopt::attention op runs: timing it needs no op registration (the
        # ops layer sits above the kernels).
        from vdopt.kernels.dispatch import attention_forward

        generator = torch.Generator().manual_seed(0)
        q, k, v = (_real(t, generator) for t in (site.q, site.k, site.v))
        key_mask = sdpa_mask = None
        if site.mask_batch is not None:
            batch, kv_len = q.shape[0], k.shape[-2]
            key_mask = (torch.rand(batch, kv_len, generator=generator) > 0.1).to(q.device)
            key_mask[:, 0] = True
            sdpa_mask = key_mask[:, None, None, :]
        device = q.device
        with torch.no_grad():
            sdpa_ms = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=site.scale),
                               device, self.warmup, self.repeats)
            kernel_ms = _time_ms(lambda: attention_forward(q, k, v, site.scale, key_mask),
                                 device, self.warmup, self.repeats)
        return sdpa_ms, kernel_ms


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        with open(path) as f:
            entries = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the kernel choice cache %s (%s); it will be rewritten", path, e)
        return {}
    if not isinstance(entries, dict):
        log.warning("ignoring the kernel choice cache %s (not a JSON object); it will be rewritten", path)
        return {}
    return entries


def _write_cache(path: Path, entries: dict[str, dict[str, float]]) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home is no reason to fail a capture
        log.warning("cannot write the kernel choice cache %s (%s); choices will be measured again", path, e)
