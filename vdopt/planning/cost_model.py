"""Predicted seconds and bytes of one rewritten graph on a device and link.

Per node, from the shapes in ``meta["val"]``:

* matrix products and convolutions: FLOPs at the device's achieved matmul rate, or their
  bytes at its memory bandwidth when that takes longer (roofline);
* attention (SDPA, ``vdopt::attention``, ``vdopt::ring_attention``): 4*B*N*Sq*Skv*D at the
  attention kernel's rate for that shape: long key sequences reach the row's rate, short
  ones less (``attention_efficiency``);
* every other op that moves data: its input and output bytes at the memory bandwidth; views
  and metadata ops are free;
* every op that runs: the row's fixed overhead per op (per view too where graphs run node
  by node, as uncompiled on a CPU);
* collectives (nodes with a ``CommRecord``): latency + bytes / bandwidth. Ulysses' and CFG's
  all-to-alls and gathers are waited on right after they start (the graph has nothing to
  run meanwhile), so they are exposed in full; ring attention passes K/V blocks while it
  computes the attention, so only the part of its transfer that outlasts the attention
  compute, and the latency of each hop, are exposed.

Memory: the weights the graph holds, and the peak of the activations alive at once when the
graph runs in order (views share their base's storage).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch

from vdopt import meta
from vdopt.collectives import CommRecord
from vdopt.passes.pipefusion.stage_split import node_flops
from vdopt.planning.devices import DeviceSpec, LinkSpec

aten = torch.ops.aten

ATTENTION_HALF_KV = 1024
"""Key length at which the attention kernel reaches half its long-sequence rate. Fitted to
the H100 measurements in ANCHORS.md (SDPA cuDNN: 568 TFLOP/s at Skv 32760, 268-309 at
Skv 1024, both within 10% with the head-dim term below)."""

ATTENTION_REFERENCE = (32760, 128)
"""(Skv, head dim) at which a device row's ``attention_tflops`` is stated (measured)."""

MATMULS = {aten.linear.default, aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
           aten.baddbmm.default, aten.convolution.default, aten.conv2d.default, aten.conv3d.default}

VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.unflatten.int, aten.flatten.using_ints, aten.slice.Tensor,
    aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.alias.default, aten.detach.default, aten._assert_tensor_metadata.default, aten.dropout.default,
    aten.lift_fresh_copy.default, aten.empty_like.default, aten.empty.memory_format, aten.sym_size.int,
    aten.as_strided.default, aten.view_as_real.default, aten.view_as_complex.default,
    torch.ops._c10d_functional.wait_tensor.default,
}
"""Ops that move no data (aliases, metadata, allocation)."""

ATTENTION_OPS = ("aten.scaled_dot_product_attention.default", "vdopt.attention.default")
RING_OP = "vdopt.ring_attention.default"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def tensor_bytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _arg_bytes(node: torch.fx.Node) -> int:
    total = 0
    for arg in node.all_input_nodes:
        total += tensor_bytes(arg.meta.get("val"))
    return total


def _is_view(node: torch.fx.Node) -> bool:
    import operator

    return node.target in VIEWS or node.target is operator.getitem


def attention_efficiency(kv_len: int, head_dim: int, half_kv: float | None = None) -> float:
    """Fraction of a row's attention rate reached at key length ``kv_len`` and ``head_dim``;
    ``half_kv``: the row's ``attention_half_kv`` (``None``: ``ATTENTION_HALF_KV``)."""
    half = ATTENTION_HALF_KV if half_kv is None else half_kv

    def raw(kv: int, d: int) -> float:
        return kv / (kv + half) * (min(d, 128) / 128) ** 0.4

    return min(1.0, raw(kv_len, head_dim) / raw(*ATTENTION_REFERENCE))


def attention_shape(node: torch.fx.Node) -> tuple[int, int, int]:
    """``(flops, kv_len, head_dim)`` of an attention node (SDPA, vdopt or ring attention)."""
    q = node.args[0].meta["val"]
    if str(node.target) == RING_OP:
        block_lens = node.args[7]
        k_fixed = node.args[3]
        kv = sum(block_lens) + (k_fixed.meta["val"].shape[-2] if isinstance(k_fixed, torch.fx.Node) else 0)
    else:
        kv = node.args[1].meta["val"].shape[-2]
    return 4 * math.prod(q.shape[:-1]) * kv * q.shape[-1], int(kv), int(q.shape[-1])


@dataclasses.dataclass(kw_only=True)
class GraphCost:
    """Predicted seconds of one run of a graph, by cause, and its memory."""

    matmul_s: float = 0.0
    """Matrix products and convolutions."""
    attention_s: float = 0.0
    """Attention kernels (ring attention's compute included)."""
    memory_s: float = 0.0
    """Memory-bound ops (norms, elementwise, copies, layout changes)."""
    overhead_s: float = 0.0
    """Fixed cost per op."""
    comm_s: float = 0.0
    """Exposed communication (not hidden behind compute)."""
    comm_bytes: float = 0
    """Bytes this rank sends per run (fractional only in a mean over patches)."""
    collectives: float = 0
    """Collectives per run (fractional only in a mean over patches)."""
    flops: float = 0
    """Matmul and attention FLOPs per run (fractional only in a mean over patches)."""
    activation_peak_bytes: int = 0
    """Most bytes of activations alive at once."""

    @property
    def seconds(self) -> float:
        return self.matmul_s + self.attention_s + self.memory_s + self.overhead_s + self.comm_s

    @property
    def compute_s(self) -> float:
        return self.matmul_s + self.attention_s + self.memory_s + self.overhead_s

    def add(self, other: GraphCost, times: float = 1.0) -> None:
        for f in ("matmul_s", "attention_s", "memory_s", "overhead_s", "comm_s"):
            setattr(self, f, getattr(self, f) + times * getattr(other, f))
        # exact (a mean over patches may be fractional): callers round the call's totals
        self.comm_bytes += times * other.comm_bytes
        self.collectives += times * other.collectives
        self.flops += times * other.flops
        self.activation_peak_bytes = max(self.activation_peak_bytes, other.activation_peak_bytes)

    def breakdown(self) -> dict[str, float]:
        return {"matmul": self.matmul_s, "attention": self.attention_s, "memory-bound ops": self.memory_s,
                "op overhead": self.overhead_s, "communication": self.comm_s}


def comm_seconds(record: CommRecord, link: LinkSpec, degrees: dict[str, int]) -> float:
    """Latency + bytes / bandwidth; ring attention pays the latency once per hop."""
    hops = max(degrees.get(record.axis, 1) - 1, 1) if record.kind == "p2p" else 1
    return hops * link.latency_us * 1e-6 + record.bytes / (link.bandwidth_gbps * 1e9)


def graph_cost(
    gm: torch.fx.GraphModule,
    device: DeviceSpec,
    link: LinkSpec,
    degrees: dict[str, int],
    *,
    computed: Callable[[str], float] | None = None,
) -> GraphCost:
    """Predicted cost of one run of ``gm``.

    ``computed(site)``: the fraction of calls on which attention site ``site`` (and the
    collectives that serve it) runs, below 1 with PAB; every other node always runs.
    """
    cost = GraphCost()
    bandwidth = device.memory_bandwidth_gbps * 1e9
    overhead = device.op_overhead_us * 1e-6
    view_overhead = device.view_overhead_us * 1e-6
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if _is_view(node):
            cost.overhead_s += view_overhead
            continue
        record: CommRecord | None = node.meta.get(meta.COMM)
        site = node.meta.get(meta.SITE)
        share = computed(site.name) if computed is not None and site is not None else 1.0
        if record is not None and computed is not None and record.purpose not in ("", None):
            share = computed(record.purpose)
        target = str(node.target)
        out = node.meta.get("val")
        moved = _arg_bytes(node) + tensor_bytes(out)
        if target in ATTENTION_OPS or target == RING_OP:
            flops, kv, d = attention_shape(node)
            dtype = out.dtype if isinstance(out, torch.Tensor) else torch.float32
            rate = device.rate(device.attention_tflops, dtype) * attention_efficiency(kv, d, device.attention_half_kv)
            compute = max(flops / rate, moved / bandwidth)
            cost.attention_s += share * compute
            cost.flops += int(share * flops)
            if record is not None:  # ring attention: the transfer overlaps the compute
                hops = max(degrees.get(record.axis, 1) - 1, 1)
                transfer = record.bytes / (link.bandwidth_gbps * 1e9)
                cost.comm_s += share * (max(0.0, transfer - compute) + hops * link.latency_us * 1e-6)
                cost.comm_bytes += int(share * record.bytes)
                cost.collectives += 1
        elif record is not None:
            cost.comm_s += share * comm_seconds(record, link, degrees)
            cost.comm_bytes += int(share * record.bytes)
            cost.collectives += 1
            continue  # its wait carries no compute; no op overhead is added on top of latency
        elif node.target in MATMULS:
            flops = node_flops(node)
            dtype = out.dtype if isinstance(out, torch.Tensor) else torch.float32
            cost.matmul_s += max(flops / device.rate(device.matmul_tflops, dtype), moved / bandwidth)
            cost.flops += flops
        else:
            cost.memory_s += moved / bandwidth
        cost.overhead_s += overhead
    cost.activation_peak_bytes = activation_peak_bytes(gm)
    return cost


def activation_peak_bytes(gm: torch.fx.GraphModule) -> int:
    """Most bytes of graph values alive at once when ``gm`` runs in order.

    Inputs are alive from the start; a value dies after its last user; a view keeps its base
    alive and adds nothing. Weights (``get_attr``) are not activations.
    """
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    base: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes:
        if n.op == "call_function" and _is_view(n) and n.all_input_nodes:
            first = n.all_input_nodes[0]
            base[n] = base.get(first, first)
    last_use: dict[torch.fx.Node, int] = {}
    for n in nodes:
        for arg in n.all_input_nodes:
            owner = base.get(arg, arg)
            last_use[owner] = max(last_use.get(owner, 0), position[n])
    live = peak = 0
    dying: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "call_function") and n not in base:
            size = tensor_bytes(n.meta.get("val"))
            live += size
            dying.setdefault(last_use.get(n, i), []).append(size)
        peak = max(peak, live)
        live -= sum(dying.pop(i, []))
    return peak


def weight_bytes(gms: Iterable[torch.nn.Module]) -> int:
    """Bytes of the distinct weights the graphs hold (by identity: meta tensors have no storage)."""
    seen: dict[int, int] = {}
    for gm in gms:
        for t in [*gm.parameters(), *gm.buffers()]:
            seen[id(t)] = t.numel() * t.element_size()
        for value in vars(gm).values():
            if isinstance(value, torch.Tensor):
                seen.setdefault(id(value), value.numel() * value.element_size())
    return sum(seen.values())
