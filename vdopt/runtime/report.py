"""Render ``opt.report()``: the plan per input signature, as plain text."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdopt.mesh import Mesh
    from vdopt.runtime.plan import Plan


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _site_rewrites(plan: "Plan") -> dict[str, list[str]]:
    """Per-site notes passes reported under ``stats["per_site"]``."""
    notes: dict[str, list[str]] = {}
    for record in plan.passes:
        for site, note in record.stats.get("per_site", {}).items():
            notes.setdefault(site, []).append(str(note))
    return notes


def render_plan(plan: "Plan") -> str:
    out = [f"inputs: {plan.signature}"]
    if plan.layout is not None:
        lay = plan.layout
        text = f", text {lay.text_len}" if lay.text_len else ""
        out.append(
            f"token grid: batch {lay.batch}, T={lay.frames} H={lay.height} W={lay.width} "
            f"({lay.tokens} tokens{text})"
        )
    kinds = Counter(s.kind for s in plan.sites)
    out.append(f"attention sites: {len(plan.sites)} (" + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ")")
    notes = _site_rewrites(plan)
    rows = [
        [s.name, s.kind, s.block or "-", f"{s.heads}x{s.head_dim}", s.batch, s.q_len, s.kv_len,
         "; ".join(notes.get(s.name, [])) or "-"]
        for s in plan.sites
    ]
    out.append(table(rows, ["site", "kind", "block", "heads", "batch", "q_len", "kv_len", "rewrites"]))
    rows = [
        [r.name, r.graph, r.tier, "yes" if r.modified else "no",
         " ".join(f"{k}={v}" for k, v in r.stats.items() if k != "per_site") or "-", f"{r.seconds:.3f}"]
        for r in plan.passes
    ]
    out.append("passes:")
    out.append(table(rows, ["pass", "graph", "tier", "modified", "stats", "seconds"]))
    summary = plan.program.summary()
    for key, value in summary.items():
        out.append(f"{key}: {value}")
    if plan.guards is not None:
        out.append(plan.guards.report_line())
    out.append(f"capture {plan.capture_s:.2f} s, analysis and passes {plan.passes_s:.2f} s")
    return "\n".join(out)


def render_report(model_name: str, mesh: "Mesh", plans: list["Plan"]) -> str:
    head = f"vdopt plan for {model_name} on Mesh({mesh.describe()})"
    if not plans:
        return head + "\n(no call yet: the graph is captured on the first call)"
    capture_s = sum(p.capture_s for p in plans)
    passes_s = sum(p.passes_s for p in plans)
    parts = [head, f"captures: {len(plans)} (capture {capture_s:.2f} s, analysis and passes {passes_s:.2f} s in all)"]
    for i, plan in enumerate(plans, 1):
        parts.append(f"\n== signature {i} ==\n" + render_plan(plan))
    return "\n".join(parts)
