"""Lower ``aten.scaled_dot_product_attention`` to vdopt's Triton attention op.

Legend: B batch, N heads, S tokens (``Sq`` queries, ``Skv`` keys), D head dim.

A site is lowered when the kernels take it: 4-D inputs of one dtype (fp16/bf16/fp32), a head
dim they support, no dropout, not causal, no GQA, and no mask or a boolean key-padding mask
(a mask that broadcasts as ``(B or 1, 1, 1, Skv)``; it is passed on as an expanded
``(B, Skv)`` view, no copy). Every other site keeps SDPA, and the reason is counted in the
pass's stats (``kept_<reason>``).

The new node's output has q's dimension order, as SDPA's does; a site whose recorded SDPA
output strides differ is kept, so no later ``view`` can break.

With ``choose`` (the pipeline sets it for ``kernels="auto"``: ``kernels/selection.py``), a
supported site is lowered only where the kernel is measured faster than SDPA on its exact
inputs; the others are kept as ``slower``, with both times in the report's per-site column.

With ``kernels="fp8"`` (approximate, opt-in) every supported site is lowered to
``vdopt::attention_fp8`` (Q, K and V in e4m3: ``kernels/fp8_attention.py``), except short
unmasked ones (temporal attention, at most ``SHORT_SEQ_LEN`` tokens), which are memory-bound:
fp8 would only add quantization error there, so they get the exact kernel. A device without
fp8 tensor cores is refused when the pass runs, with what to use instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections import Counter
from typing import Callable, ClassVar

import torch
import torch.fx

from vdopt import meta
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.graph_utils import call_function_nodes, insert_call

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoweringSite:
    """One SDPA node and how it is lowered (or why it is not)."""

    node: torch.fx.Node
    """The SDPA node."""
    reason: str | None
    """Why the site keeps SDPA; None when it is lowered."""
    scale: float = 0.0
    """Softmax scale (SDPA's default ``1/sqrt(D)`` resolved)."""
    mask: torch.fx.Node | None = None
    """The boolean key-padding mask node, if any."""
    mask_batch: int = 1
    """Leading dim of the mask (1 or B); it is expanded to B."""
    fp8: bool = False
    """Lowered to the approximate fp8 op (``kernels="fp8"``) instead of the exact one."""


def sdpa_arguments(node: torch.fx.Node) -> dict:
    """SDPA's arguments by name, defaults filled in."""
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _check_site(node: torch.fx.Node) -> LoweringSite:
    from vdopt.kernels.dispatch import unsupported_reason
    from vdopt.kernels.flash_attention import new_output

    args = sdpa_arguments(node)
    q, k, v = (args[name].meta["val"] for name in ("query", "key", "value"))

    def keep(reason: str) -> LoweringSite:
        return LoweringSite(node=node, reason=reason)

    if args["dropout_p"] != 0.0:
        return keep("dropout")
    if args["is_causal"]:
        return keep("causal")
    if q.dim() != 4:
        return keep("rank")
    reason = unsupported_reason(tuple(q.shape), tuple(k.shape), tuple(v.shape), (q.dtype, k.dtype, v.dtype))
    if reason is not None:
        return keep(reason.split(":")[0])
    mask, mask_batch = args["attn_mask"], 1
    if mask is not None:
        m = mask.meta["val"]
        if m.dtype != torch.bool:
            return keep("float_mask")
        shape = (1,) * (4 - m.dim()) + tuple(m.shape)
        if m.dim() > 4 or shape[1:] != (1, 1, k.shape[-2]) or shape[0] not in (1, q.shape[0]):
            return keep("mask_shape")
        mask_batch = shape[0]
    if tuple(new_output(q).stride()) != tuple(node.meta["val"].stride()):
        return keep("output_layout")
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    return LoweringSite(node=node, reason=None, scale=float(scale), mask=mask, mask_batch=mask_batch)


def _short(site: LoweringSite) -> bool:
    """Whether the site takes the short-sequence (temporal) kernel: memory-bound, kept exact."""
    from vdopt.kernels.dispatch import SHORT_SEQ_LEN

    args = sdpa_arguments(site.node)
    sq, skv = args["query"].meta["val"].shape[-2], args["key"].meta["val"].shape[-2]
    return site.mask is None and sq <= SHORT_SEQ_LEN and skv <= SHORT_SEQ_LEN


def find_sdpa_sites(graph: torch.fx.Graph) -> list[LoweringSite]:
    """Every SDPA node with its lowering decision, in graph order (pure: no rewrite)."""
    return [_check_site(n) for n in call_function_nodes(graph, aten.scaled_dot_product_attention.default)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SdpaToTriton:
    """Replace SDPA sites the Triton kernels support with ``vdopt::attention``.

    Runs when ``ctx.kernels`` is ``"triton"`` or ``"fp8"``, or ``"auto"`` on a CUDA device;
    never for ``"sdpa"``. Run it last: other passes match SDPA nodes. Its tier is ``exact``
    except with ``kernels="fp8"``, which the user asks for by name.
    """

    name: ClassVar[str] = "sdpa_to_triton"
    tier: ClassVar[str] = "exact"

    choose: Callable | None = None
    """``SiteInputs -> Choice`` deciding per supported site whether the kernel is faster
    (``vdopt.kernels.selection.MeasuredChoice``); None lowers every supported site."""

    def enabled(self, ctx: PassContext) -> bool:
        from vdopt.kernels.dispatch import triton_available

        if ctx.kernels in ("triton", "fp8"):
            return True
        return ctx.kernels == "auto" and ctx.device.type == "cuda" and triton_available()

    def rewrite(self, graph: torch.fx.Graph, site: LoweringSite) -> None:
        import vdopt.ops  # noqa: F401  registers torch.ops.vdopt.attention

        node = site.node
        args = sdpa_arguments(node)
        q, k = args["query"], args["key"]
        with graph.inserting_before(node):
            key_mask = None
            if site.mask is not None:
                batch, kv_len = q.meta["val"].shape[0], k.meta["val"].shape[-2]
                key_mask = insert_call(
                    graph, aten.reshape.default, (site.mask, [site.mask_batch, kv_len]), created_by=self.name, like=node
                )
                if site.mask_batch != batch:
                    key_mask = insert_call(
                        graph, aten.expand.default, (key_mask, [batch, kv_len]), created_by=self.name, like=node
                    )
            attention = insert_call(
                graph,
                torch.ops.vdopt.attention_fp8.default if site.fp8 else torch.ops.vdopt.attention.default,
                (q, k, args["value"], site.scale, key_mask),
                created_by=self.name,
                like=node,
            )
            if meta.SITE in node.meta:
                attention.meta[meta.SITE] = node.meta[meta.SITE]
            out = insert_call(graph, operator.getitem, (attention, 0), created_by=self.name, like=node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)

    def _measured(self, site: LoweringSite, timings: dict[torch.fx.Node, str]) -> LoweringSite:
        """``site``, kept as ``slower`` unless ``choose`` finds the kernel faster."""
        from vdopt.kernels.selection import SiteInputs

        if site.reason is not None:
            return site
        args = sdpa_arguments(site.node)
        q, k, v = (args[name].meta["val"] for name in ("query", "key", "value"))
        inputs = SiteInputs(q=q, k=k, v=v, scale=site.scale, mask_batch=site.mask_batch if site.mask is not None else None)
        try:
            choice = self.choose(inputs)
        except Exception as e:  # noqa: BLE001  a kernel that fails here must not fail the capture
            log.warning("sdpa_to_triton: timing the kernel failed (%s: %s); keeping SDPA", type(e).__name__, e)
            return dataclasses.replace(site, reason="kernel_error")
        timings[site.node] = choice.describe()
        return site if choice.use_kernel else dataclasses.replace(site, reason="slower")

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if not self.enabled(ctx):
            return PassResult(gm=gm, modified=False, stats={})
        sites = find_sdpa_sites(gm.graph)
        timings: dict[torch.fx.Node, str] = {}
        if self.choose is not None:
            sites = [self._measured(site, timings) for site in sites]
        if ctx.kernels == "fp8":
            from vdopt.kernels.fp8_attention import check_fp8_device

            check_fp8_device(ctx.device)
            sites = [dataclasses.replace(site, fp8=site.reason is None and not _short(site)) for site in sites]
        kept = Counter(site.reason for site in sites if site.reason is not None)
        lowered = [site for site in sites if site.reason is None]
        for site in lowered:
            self.rewrite(gm.graph, site)
        if kept:
            log.info("sdpa_to_triton kept %d SDPA site(s): %s", sum(kept.values()), dict(kept))
        stats = {"lowered": len(lowered), **{f"kept_{reason}": n for reason, n in sorted(kept.items())}}
        if ctx.kernels == "fp8":
            stats["lowered_fp8"] = sum(site.fp8 for site in lowered)
        per_site = {
            site.node.meta[meta.SITE].name: (("triton-fp8" if site.fp8 else "triton") if site.reason is None
                                             else f"sdpa ({site.reason})")
            + (f" [{timings[site.node]}]" if site.node in timings else "")
            for site in sites
            if meta.SITE in site.node.meta
        }
        if per_site:
            stats["per_site"] = per_site
        return PassResult(gm=gm, modified=bool(lowered), stats=stats)
