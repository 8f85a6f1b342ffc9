"""Sizes taken from tensor values (``nonzero``, masks) kept symbolic: one plan serves every
length its guards allow, on one device and under Ulysses on real gloo ranks; where a step
needs a concrete value, the plan is specialized on the call's values and the report says
which size, which step and why. References: the eager model on the same inputs."""

from __future__ import annotations

import torch

import vdopt

from test_capture import MaskedAttention, MaskedTextDiT, assert_close, eager, masked_text_inputs

RTOL = 1e-5

# three token counts (5, 2, 6 of 7) for MaskedAttention
COUNTS = ([1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 1, 0], [1, 1, 1, 0, 1, 1, 1])
# three text lengths (3, 1, 4 of 5) for MaskedTextDiT; none empty, so the cross attention runs
TEXT = ([1, 1, 0, 1, 0], [0, 0, 0, 1, 0], [1, 1, 1, 0, 1])


def test_one_plan_serves_every_token_count_of_nonzero():
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    opt = vdopt.optimize(model)
    for mask in COUNTS:
        x, mask = torch.randn(2, 7, 8), torch.tensor(mask)
        assert_close(opt(x, mask), eager(model, hidden_states=x, mask=mask))
    assert len(opt.plans) == 1  # one capture for three lengths
    plan = opt.plans[0]
    assert plan.guards.symbols and plan.guards.symbols[0].startswith("u0 from aten.nonzero at test_capture.py:")
    assert plan.guards.why_specialized is None
    (site,) = plan.sites
    assert str(site.q_len) == str(site.kv_len) == "u0"  # the site's length stays a symbol
    report = opt.report()
    assert "captures: 1 " in report and "symbolic sizes kept: u0 from aten.nonzero" in report
    assert "valid while Ne(u0, 0)" in report  # the one decision the trace took on the value
    # an empty selection breaks that guard: captured again (that plan specializes u0 = 0)
    x, none = torch.randn(2, 7, 8), torch.zeros(7, dtype=torch.int64)
    out = opt(x, none)
    assert out.shape == (2, 0, 8) and len(opt.plans) == 2


def _symbolic_under_ulysses(rank: int, world: int) -> dict:
    torch.manual_seed(0)  # same weights on every rank
    text_model, token_model = MaskedTextDiT().eval(), MaskedAttention().eval()
    mesh = vdopt.Mesh(ulysses=2)
    text_opt, token_opt = vdopt.optimize(text_model, mesh), vdopt.optimize(token_model, mesh)
    errors = []
    for text in TEXT:
        kwargs = masked_text_inputs(text)
        ref = eager(text_model, **kwargs)
        errors.append(float((text_opt(**kwargs) - ref).abs().max() / ref.abs().max()))
    for count in COUNTS[:2]:
        x, mask = torch.randn(2, 7, 8), torch.tensor(count)
        ref = eager(token_model, hidden_states=x, mask=mask)
        errors.append(float((token_opt(x, mask) - ref).abs().max() / ref.abs().max()))
    return {"errors": errors, "text_guards": [p.guards for p in text_opt.plans],
            "token_guards": [p.guards for p in token_opt.plans],
            "text_report": text_opt.report(), "token_report": token_opt.report()}


def test_ulysses_keeps_a_symbolic_text_length_and_specializes_a_sharded_one():
    from multirank import run_on_ranks

    results = run_on_ranks(2, _symbolic_under_ulysses, timeout=300)
    for r in results:
        assert max(r["errors"]) <= RTOL, r["errors"]
        # the text length (cross-attention K/V, not sharded) stays symbolic: one plan, three lengths
        (text,) = r["text_guards"]
        assert [s.split(" at ")[0] for s in text.symbols] == ["u1 from aten.nonzero"]
        assert text.why_specialized is None
        # the selected tokens are the sharded dim: Ulysses needs their count, so each count
        # is a plan specialized on it, and the report says which pass needed which size
        assert len(r["token_guards"]) == 2
        for guards, n in zip(r["token_guards"], (5, 2)):
            assert guards.symbols == () and guards.describe() == f"Eq(u0, {n})"
            assert guards.why_specialized.startswith("pass 'sequence_parallel' (exact) needs a concrete value of u0")
            assert "sequence_parallel.py" in guards.why_specialized
    assert "captures: 1 " in results[0]["text_report"] and "ulysses: all_to_all" in results[0]["text_report"]
    assert "symbolic sizes kept: u1 from aten.nonzero" in results[0]["text_report"]
    token_report = results[0]["token_report"]
    assert "captures: 2 " in token_report
    assert token_report.count("pass 'sequence_parallel' (exact) needs a concrete value of u0") == 2
