"""Which passes run, in which order, for a given mesh and set of options.

``build_pipeline`` lists the passes over the captured graph. After them, features derive
more graphs from the rewritten one, each by its own passes (run by the runner too):
PipeFusion's stage cut and patch rewrite, PAB's specialization (``feature_passes``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.kernels.selection import MeasuredChoice
from vdopt.mesh import Mesh
from vdopt.passes.base import GraphPass
from vdopt.passes.parallel.cfg_parallel import CFGParallel
from vdopt.passes.cleanup.drop_noops import DropNoOps
from vdopt.passes.parallel.sequence_parallel import SequenceParallel
from vdopt.passes.lowering.sdpa_to_triton import SdpaToTriton
from vdopt.passes.cleanup.fold_views import FoldViews
from vdopt.passes.pab.specialize import PABSpecialize
from vdopt.passes.pipefusion.patch_rewrite import PatchRewrite
from vdopt.passes.pipefusion.stage_cut import StageCut
from vdopt.passes.pipefusion.stage_split import StageSplit
from vdopt.passes.lowering.temporal_layout import TemporalLayout

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """Everything that selects and configures passes."""

    mesh: Mesh
    """The device mesh."""
    pab: PABConfig | None = None
    """Pyramid Attention Broadcast, or None."""
    pipefusion: PipeFusionConfig | None = None
    """PipeFusion options, or None."""
    kernels: str = "auto"
    """``auto`` (CUDA, where measured faster), ``triton`` (every supported site), ``sdpa``, or
    ``fp8`` (every supported site in fp8, approximate)."""
    compile: bool | None = None
    """Run the graphs through Inductor: ``None`` on CUDA only (``vdopt.compile.should_compile``)."""
    training: bool = False
    """Differentiable graphs (``vdopt.runtime.training``): exact passes only, attention left to SDPA."""
    checkpoint_blocks: bool = False
    """With ``training``: recompute each transformer block's activations in the backward pass."""


def build_pipeline(options: PipelineOptions) -> list[GraphPass]:
    """The rewrite passes, in order. Approx passes are added only when asked for."""
    unsupported = {
        axis: degree
        for axis, degree in options.mesh.degrees.items()
        if degree > 1 and axis not in SUPPORTED_AXES
    }
    if unsupported:
        raise ValueError(
            f"Mesh({options.mesh.describe()}): this vdopt build has no pass for "
            + ", ".join(f"{a}={d}" for a, d in unsupported.items())
            + f"; supported axes: {sorted(SUPPORTED_AXES) or 'none (one device only)'}"
        )
    if options.training:
        check_training(options)
    elif options.checkpoint_blocks:
        raise ValueError("checkpoint_blocks=True needs training=True (it recomputes activations in backward)")
    # DropNoOps right after: every later pass sees neither export's asserts nor identity casts
    passes: list[GraphPass] = [FoldViews(), DropNoOps()]
    if options.mesh.pipefusion > 1:
        # first, so later passes see the stage markers as opaque ops
        balance = options.pipefusion.balance if options.pipefusion is not None else "flops"
        passes.append(StageSplit(stages=options.mesh.pipefusion, balance=balance))
    if options.mesh.cfg > 1:
        # before sequence parallelism: that pass then sees a graph of half the batch
        passes.append(CFGParallel())
    if options.mesh.sequence_degree > 1:
        passes.append(SequenceParallel())
    if options.training:
        return passes  # SDPA has a backward; vdopt's attention kernels have none
    # Last: other passes match SDPA nodes. It acts on ctx.kernels (auto: CUDA only, and only
    # where the kernel is measured faster; "triton" lowers every supported site).
    passes.append(SdpaToTriton(choose=MeasuredChoice() if options.kernels == "auto" else None))
    # Needs the lowered op: only vdopt's kernels read the 5-D views it leaves.
    passes.append(TemporalLayout())
    return passes


def check_training(options: PipelineOptions) -> None:
    """Refuse what has no backward or is not exact: training must give single-device gradients."""
    refused = []
    if options.pab is not None:
        refused.append("pab (it reuses attention outputs across denoising steps; a training step has none)")
    if options.pipefusion is not None or options.mesh.pipefusion > 1:
        refused.append("pipefusion (stale K/V across patches is approximate and has no backward)")
    if options.kernels in ("triton", "fp8"):
        refused.append(f"kernels={options.kernels!r} (vdopt's attention kernels have no backward)")
    if refused:
        raise ValueError(
            "training=True cannot be combined with " + "; ".join(refused)
            + ". Use sequence parallelism (ulysses, ring, dsp) and/or cfg with kernels='auto' or 'sdpa'."
        )


def feature_passes(options: PipelineOptions) -> list[str]:
    """Names of the passes that derive a plan's other graphs from the rewritten one, in order."""
    names = [StageCut.name, PatchRewrite.name] if options.mesh.pipefusion > 1 else []
    if options.pab is not None:
        names.append(PABSpecialize.name)
    return names


def check_disabled(options: PipelineOptions, disabled: Iterable[str]) -> None:
    """Warn about names in ``disabled`` that no pass of this plan has (a typo disables nothing)."""
    known = [p.name for p in build_pipeline(options)] + feature_passes(options)
    unknown = set(disabled) - set(known)
    if unknown:
        log.warning("disabled passes %s are not in this pipeline (%s)", sorted(unknown), known)


SUPPORTED_AXES: frozenset[str] = frozenset({"pipefusion", "cfg", "ulysses", "ring", "dsp"})
