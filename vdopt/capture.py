"""Capture a model call as an ATen graph with ``torch.export`` (SDPA kept as one node).

What plain ``export`` cannot trace is captured for the call at hand, like ``torch.compile``:

* a size taken from tensor values (``nonzero``, a boolean mask, ``.item()``) or a Python
  branch on a tensor's value makes vdopt export again with real-tensor propagation. With
  ``symbolic`` (what the executable asks for), sizes stay *unbacked symbols* (``u0``): only
  the decisions the trace cannot take without a value (a branch, ``u0 == 0`` inside an op)
  take this call's outcome, kept as guards (``Ne(u0, 0)``), so one graph serves every length
  those guards allow. Without it, or when the symbolic export fails, every such value takes
  this call's value, every size in the graph becomes an int, and the assumption is kept as a
  guard (``Eq(u0, 4)``). The executable checks the guards (``vdopt.guards``) on every call and
  captures again when they fail;
* a tensor built inside ``forward`` through ``.data`` (CogVideoX's positional table for a
  size other than ``sample_*``) is traced as computation instead of a lifted fake constant.

What remains untraceable (values read through numpy, a float value turned into a size) is a
``CaptureError`` naming the submodule, the model's source line and what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import linecache
import logging
import os
import re
import sys
import time
import types
from typing import Any

import torch
import torch._functorch.config as fconfig
from torch._subclasses.fake_tensor import FakeTensor, is_fake, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._sympy.symbol import SymT, symbol_is_type

from vdopt.guards import Guards, split_guards

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be exported; the message names the module and the cause."""


def bind_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map a call to ``{parameter name: value}`` so positional and keyword calls agree.

    Defaults are left out: a call that omits an argument and one that passes its default
    capture the same graph because export specializes on the value either way.
    """
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(model).__name__}.forward{sig}: {e}") from None
    arguments = dict(bound.arguments)
    # Fold **kwargs catch-alls (diffusers models take **kwargs) into the top level.
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _module_names_by_id(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): (name or type(model).__name__) for name, m in model.named_modules()}


def _innermost_module(tb: types.TracebackType | None, names: dict[int, str]) -> str | None:
    """The deepest frame of the traceback that runs a submodule's method."""
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = f"{names[id(owner)]} ({type(owner).__name__}, {tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return found


# Frames in these are not the model's code (the model zoo in vdopt.models is, and is elsewhere).
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _model_source_line(tb: types.TracebackType | None) -> str | None:
    """``file:line (code)`` of the deepest frame in the model's code, not torch's or vdopt's."""
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
            code = (linecache.getline(filename, tb.tb_lineno) or "").strip()
            found = f"{filename}:{tb.tb_lineno}" + (f" ({code})" if code else "")
        tb = tb.tb_next
    return found


def _lifted_constant_owner(error: Exception) -> str | None:
    """``patch_embed`` out of export's "model attribute: patch_embed.lifted_tensor_0"."""
    match = re.search(r"model attribute: ([\w.]+?)\.?lifted_tensor_\d+", str(error))
    return match.group(1) or None if match else None


def _is_data_dependent(error: BaseException) -> bool:
    """Whether export failed on a value it could not know while tracing with fake tensors."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = f"{type(error).__name__} {error}".lower()
        if any(k in text for k in ("datadependent", "data-dependent", "data dependent", "dynamicoutputshape")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _is_data_getter(func: Any) -> bool:
    # ``Tensor.data.__get__`` is a fresh method-wrapper on every access: compare by name
    return getattr(func, "__name__", "") == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "data"


def _where_now(names: dict[int, str]) -> str | None:
    """The innermost submodule running and the model's source line, from the current stack."""
    frame, module, line = sys._getframe(1), None, None
    while frame is not None and (module is None or line is None):
        filename = frame.f_code.co_filename
        if line is None and not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
            code = (linecache.getline(filename, frame.f_lineno) or "").strip()
            line = f"{filename}:{frame.f_lineno}" + (f" ({code})" if code else "")
        owner = frame.f_locals.get("self")
        if module is None and owner is not None and id(owner) in names:
            module = f"module {names[id(owner)]} ({type(owner).__name__}, {frame.f_code.co_name})"
        frame = frame.f_back
    found = [p for p in (module, f"at {line}" if line else None) if p]
    return " ".join(found) or None


def _pin_unbacked(value: Any, float_reads: dict[Any, str | None], names: dict[int, str]) -> None:
    """Specialize every data-dependent int in ``value`` to the value it has for this call.

    ``torch._check(u0 == 4)`` makes export replace ``u0`` by 4 everywhere after it (so every
    size downstream is a plain int) and record ``Eq(u0, 4)`` as a run-time assertion, which
    ``vdopt.guards`` turns into the plan's guard. Floats are left symbolic: they only flow
    into arithmetic, and pinning them would recapture on every new value; where each was read
    is kept in ``float_reads`` for the error if one is specialized on after all.
    """
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.SymFloat) and free_unbacked_symbols(leaf):
            if leaf.node.expr not in float_reads:
                float_reads[leaf.node.expr] = _where_now(names)
        syms = leaf.shape if isinstance(leaf, torch.Tensor) else (leaf,)
        for sym in syms:
            if not isinstance(sym, torch.SymInt) or not free_unbacked_symbols(sym):
                continue
            env = sym.node.shape_env
            real = sym.node.expr.xreplace(getattr(env, "real_tensor_prop_unbacked_vals", {}))
            if real.is_Integer:
                torch._check(sym == int(real))


class _NeedsSpecialization(Exception):
    """Raised inside a plain export at the first data-dependent value, to export again with
    real values at once (symbolic or specialized): tracing on with fake values only ends at a
    decision that needs the value (10 s of 15 on a tiny FramePack)."""


# How a capture treats data-dependent values (``_CaptureMode.mode``).
_PLAIN, _SYMBOLIC, _SPECIALIZE = "plain", "symbolic", "specialize"


# Conversions that need a tensor's value in Python (a branch, an int): data-dependent on a fake.
_VALUE_READS = {torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__}


def _has_unbacked(value: Any) -> bool:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            if any(isinstance(s, torch.SymInt) and free_unbacked_symbols(s) for s in leaf.shape):
                return True
        elif isinstance(leaf, (torch.SymInt, torch.SymBool)) and free_unbacked_symbols(leaf):
            return True
    return False


class _CaptureMode(TorchFunctionMode):
    """Active only while export traces the model: makes two Python-level patterns traceable.

    * ``tensor.data`` is no ATen op, so the tensor it returns is invisible to the trace and
      becomes a lifted *fake* constant; writes into it (CogVideoX's positional table for a
      size other than ``sample_*``) are lost. Under ``no_grad`` ``detach()`` is the same
      storage, and it is traced.
    * ``specialize``: data-dependent ints are pinned to this call's values (above);
      ``symbolic``: they stay symbols, and real values only settle what a trace must decide;
      ``plain``: the first data-dependent value stops the trace (``_NeedsSpecialization``).
    """

    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.mode = mode
        real = mode != _PLAIN
        self.names = _module_names_by_id(model) if real else {}
        self.float_reads: dict[Any, str | None] = {}
        """Unbacked float symbols (``.item()`` of a float tensor) and where the model read them."""
        # Real-tensor propagation (torch 2.13) gives a Parameter's fake an *uninitialized* real
        # value (meta_utils copies only from plain tensors), so data-dependent values computed
        # from weights would be garbage: the real weights are copied in at the first traced op.
        self._weights = dict(model.named_parameters(remove_duplicate=False)) if real else {}

    def _fill_real_weights(self) -> None:
        for name, real in self._weights.items():
            traced = functools.reduce(getattr, name.split("."), self.model)
            if not is_fake(traced):
                return  # export has not swapped in the fakes yet
            value = getattr(traced, "real_tensor", None)
            if value is not None:
                with unset_fake_temporarily(), torch.no_grad():
                    value.copy_(real)
        self._weights = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self._weights:
            self._fill_real_weights()
        # only the model's traced tensors: export's own fakification reads real ``.data`` too
        if _is_data_getter(func) and isinstance(args[0], torch.Tensor) and is_fake(args[0]):
            return args[0].detach()
        if self.mode == _PLAIN and func in _VALUE_READS and is_fake(args[0]) and args[0].constant is None:
            raise _NeedsSpecialization(f"{func.__name__} of a traced tensor")
        out = func(*args, **(kwargs or {}))
        if self.mode == _SPECIALIZE:
            _pin_unbacked(out, self.float_reads, self.names)
        elif self.mode == _SYMBOLIC:
            _note_unbacked_floats(out, self.float_reads, self.names)
        elif _has_unbacked(out):
            raise _NeedsSpecialization(f"{getattr(func, '__name__', func)} gives a data-dependent size or value")
        return out


def _note_unbacked_floats(value: Any, float_reads: dict[Any, str | None], names: dict[int, str]) -> None:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.SymFloat) and free_unbacked_symbols(leaf) and leaf.node.expr not in float_reads:
            float_reads[leaf.node.expr] = _where_now(names)


def _export(model: torch.nn.Module, kwargs: dict[str, Any], *, mode: str,
            training: bool = False) -> torch.export.ExportedProgram:
    # Real-tensor propagation runs every op on real values beside the fake ones: a branch on
    # a tensor value takes the branch of this call and becomes a run-time assertion.
    # Training exports with grad mode on, so the graph's ops stay differentiable.
    grad = contextlib.nullcontext() if training else torch.no_grad()
    capture_mode = _CaptureMode(model, mode)
    real = mode != _PLAIN
    with grad, fconfig.patch(fake_tensor_propagate_real_tensors=real), capture_mode:
        ep = torch.export.export(model, (), kwargs, strict=False)
    if real:
        _check_every_specialization_is_guarded(model, ep, capture_mode.float_reads)
        _drop_real_values(ep, forget_unbacked=mode == _SYMBOLIC)
    return ep


def _drop_real_values(ep: torch.export.ExportedProgram, *, forget_unbacked: bool) -> None:
    """Real-tensor propagation leaves each node's fake value holding its real value: every
    activation of a whole forward, kept alive by the graph. Only the fakes are needed.

    ``forget_unbacked`` (symbolic captures): the shape environment forgets the capturing
    call's values of unbacked symbols too: with them, a pass asking ``u0 == 5`` would silently
    get this call's answer, unguarded; without, it gets ``GuardOnDataDependentSymNode`` and the
    plan falls back to specialization. (A specialized graph keeps them: its sizes are pinned.)"""
    for n in ep.graph.nodes:
        for leaf in pytree.tree_leaves(n.meta.get("val")):
            if isinstance(leaf, FakeTensor) and getattr(leaf, "real_tensor", None) is not None:
                leaf.real_tensor = None
    env = _shape_env(ep.graph) if forget_unbacked else None
    if env is not None and getattr(env, "real_tensor_prop_unbacked_vals", None):
        env.real_tensor_prop_unbacked_vals.clear()


def _shape_env(graph: torch.fx.Graph) -> Any:
    for n in graph.nodes:
        for leaf in pytree.tree_leaves(n.meta.get("val")):
            if isinstance(leaf, FakeTensor) and leaf.fake_mode.shape_env is not None:
                return leaf.fake_mode.shape_env
    return None


def _has_unbacked_sizes(ep: torch.export.ExportedProgram) -> bool:
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, (torch.Tensor, torch.SymInt)) and free_unbacked_symbols(val):
            return True
    return False


def export_model(
    model: torch.nn.Module, kwargs: dict[str, Any], *, specialize: bool | None = None, training: bool = False,
    symbolic: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` on keyword inputs, with errors that name the module.

    A model with data-dependent control flow or sizes is exported a second time with real
    values: with ``symbolic``, data-dependent sizes stay unbacked symbols and only the
    decisions a trace cannot take without a value are settled by this call's values (each a
    run-time assertion); otherwise, or when that export fails, every data-dependent value
    takes this call's value (``specialize``). ``specialize=None`` exports again only when
    needed (a plain export fails on a data-dependent value); ``True`` specializes at once.

    The exported program is not decomposed further: the training IR keeps
    ``aten.scaled_dot_product_attention`` as one node, which every attention pass relies on
    (the default decomposition table would lower it to matmuls). ``training``: export with
    grad mode on, so the graph run with autograd differentiates to the model's own parameters.
    """
    return _export_call(model, kwargs, specialize=specialize, training=training, symbolic=symbolic)[0]


def _export_call(
    model: torch.nn.Module, kwargs: dict[str, Any], *, specialize: bool | None, training: bool, symbolic: bool
) -> tuple[torch.export.ExportedProgram, str | None]:
    """``export_model``, and why a symbolic capture was asked for but not made (``None`` if it was)."""
    first = bool(specialize)
    try:
        ep = _export(model, kwargs, mode=_SPECIALIZE if first else _PLAIN, training=training)
    except CaptureError:
        raise
    except _NeedsSpecialization as e:
        log.info("%s: %s: capturing again with this call's values", type(model).__name__, e)
        return _export_with_values(model, kwargs, training, symbolic)
    except Exception as e:  # export raises many types; all become one clear error
        if specialize is not None or not _is_data_dependent(e):
            raise _capture_error(model, e, specialized=first) from e
        log.info("%s branches on or sizes by tensor values: capturing again with this call's values",
                 type(model).__name__)
        return _export_with_values(model, kwargs, training, symbolic)
    if specialize is None and _has_unbacked_sizes(ep):
        log.info("%s has data-dependent sizes: capturing again with this call's values", type(model).__name__)
        return _export_with_values(model, kwargs, training, symbolic)
    return ep, None


def _export_with_values(
    model: torch.nn.Module, kwargs: dict[str, Any], training: bool, symbolic: bool
) -> tuple[torch.export.ExportedProgram, str | None]:
    why = None
    if symbolic:
        try:
            return _export(model, kwargs, mode=_SYMBOLIC, training=training), None
        except CaptureError:
            raise
        except Exception as e:  # any failure of the symbolic trace: the specialized one is the fallback
            why = f"the symbolic capture failed{_at(e)}: {_first_line(e)}"
            log.info("%s: %s; specialized on this call's values instead", type(model).__name__, why)
    try:
        return _export(model, kwargs, mode=_SPECIALIZE, training=training), why
    except CaptureError:
        raise
    except Exception as e:
        raise _capture_error(model, e, specialized=True) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _at(e: BaseException) -> str:
    source = _model_source_line(e.__traceback__)
    return f" at {source}" if source else ""


def symbolic_sizes(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """Each unbacked size left in ``gm``'s tensors, with the op and model line that made it
    (``u0 from aten.nonzero at model.py:12 (keep = mask.nonzero()[:, 0])``)."""
    env = _shape_env(gm.graph)
    pinned = {s for s, to in (env.replacements.items() if env is not None else ()) if to.is_number}
    symbols: dict[Any, None] = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            for s in sorted(free_unbacked_symbols(val), key=str):
                if s not in pinned:  # ``Eq(u0, 0)`` made it a constant after this op
                    symbols.setdefault(s, None)
    made_by = {}
    for n in gm.graph.nodes:
        for s in (n.meta.get("unbacked_bindings") or {}):
            made_by.setdefault(s, n)
    out = []
    for s in symbols:
        node = made_by.get(s)
        if node is None:
            out.append(str(s))
            continue
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        source = _stack_trace_line(node.meta.get("stack_trace") or "")
        out.append(f"{s} from aten.{op}" + (f" at {source}" if source else ""))
    return tuple(out)


def _stack_trace_line(trace: str) -> str | None:
    """``file:line (code)`` of the innermost frame in a node's ``stack_trace``."""
    found = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    if not found:
        return None
    filename, line, code = found[-1]
    return f"{os.path.basename(filename)}:{line}" + (f" ({code.strip()})" if code.strip() else "")


def needs_concrete_size(error: BaseException) -> str | None:
    """What a step after capture needed a concrete value of, when a symbolic size stopped it
    (``u0 < 2 at passes/parallel/sequence_parallel.py:153 in validate``); ``None`` when
    ``error`` is about something else."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, GuardOnDataDependentSymNode):
            match = re.search(r"data-dependent expression (.+?) \(unhinted", str(e))
            where = re.search(r"Caused by: \((.+?)\)", str(e))
            at = f" at {where.group(1)}" if where else ""
            return (match.group(1) if match else _first_line(e)) + at
    return None


def _check_every_specialization_is_guarded(
    model: torch.nn.Module, ep: torch.export.ExportedProgram, float_reads: dict[Any, str | None]
) -> None:
    """Refuse a graph specialized on a float value: export keeps no run-time assertion for it
    (``int(mask.sum().item())`` on a float mask), so no guard could tell when it changes."""
    env = next((n.meta["val"].fake_mode.shape_env for n in ep.graph.nodes
                if isinstance(n.meta.get("val"), FakeTensor)), None)
    if env is None:
        return
    for asserts in env.deferred_runtime_asserts.values():
        for ra in asserts:
            floats = [s for s in ra.expr.free_symbols if symbol_is_type(s, SymT.UNBACKED_FLOAT)]
            if floats:
                where = next((float_reads[s] for s in floats if float_reads.get(s)), None)
                at = f" in {where}" if where else ""
                raise CaptureError(
                    f"torch.export could not capture {type(model).__name__}{at}: it turns a float tensor value "
                    f"into a size or a branch ({ra.expr}), which vdopt cannot guard at run time.\n"
                    "Compute that value in an integer or bool dtype (mask.sum(dtype=torch.int), "
                    "(x > 0).any()) so vdopt can specialize on it and check it on every call."
                )


def _capture_error(model: torch.nn.Module, e: Exception, *, specialized: bool) -> CaptureError:
    names = _module_names_by_id(model)
    where = _innermost_module(e.__traceback__, names)
    owner = _lifted_constant_owner(e)
    if where is None and owner is not None and owner in names.values():
        module = dict(model.named_modules())[owner]
        where = f"{owner} ({type(module).__name__}, forward)"
    source = _model_source_line(e.__traceback__)
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    location = f"in module {where}" if where else f"in {type(model).__name__}"
    at = f" at {source}" if source else ""
    return CaptureError(
        f"torch.export could not capture {type(model).__name__} {location}{at}: "
        f"{type(e).__name__}: {cause}\n{_advice(e, specialized=specialized, lifted=owner is not None)}"
    )


def _advice(error: Exception, *, specialized: bool, lifted: bool) -> str:
    if lifted:
        return (
            "That module builds a tensor inside forward in a way the trace cannot follow (through "
            "numpy, .data or another tensor's storage): build it with torch operations on the "
            "inputs' sizes, or register it as a buffer in __init__."
        )
    text = str(error).lower()
    if any(k in text for k in (".numpy()", "data pointer", "data_ptr", "storage of fake")):
        return (
            "That code reads tensor values outside torch (numpy, data pointers), which no trace "
            "can follow. Compute them with torch operations: vdopt specializes on values read "
            "with .item(), bool() or nonzero() and checks them on every call."
        )
    if _is_data_dependent(error):
        tried = " even when specialized on this call's values" if specialized else ""
        return (
            f"It depends on tensor values{tried}: vdopt specializes branches on tensor values and sizes "
            "from nonzero()/masks/.item() to the call's values, but not values that leave torch (numpy, "
            ".tolist() into Python containers used as data, printing). Compute them with torch "
            "operations, or pass them as Python ints/bools arguments of forward."
        )
    return (
        "The model failed while being traced with these inputs: check that they are what the "
        "model expects (shapes, dtypes, devices), e.g. by calling the model eagerly."
    )


@dataclasses.dataclass
class Captured:
    """A captured call: the graph, its data-dependent guards and what it cost."""

    gm: torch.fx.GraphModule
    """The call as a ``GraphModule`` with the model's call signature (pytree in/out)."""
    guards: Guards | None
    """Conditions on data-dependent values the graph is valid for (its symbolic sizes and why
    it was specialized, if it was, in ``guards.symbols``/``guards.why_specialized``); ``None``
    if the graph holds for every call of its input signature."""
    seconds: float
    """Wall time of the capture (export and guard extraction)."""

    @property
    def symbols(self) -> tuple[str, ...]:
        """The unbacked sizes kept symbolic (empty for a specialized graph)."""
        return self.guards.symbols if self.guards is not None else ()


def capture_guarded(
    model: torch.nn.Module, kwargs: dict[str, Any], *, training: bool = False, symbolic: bool = False,
    why_specialized: str | None = None,
) -> Captured:
    """The model call as a graph, and the guards that keep it valid.

    ``symbolic``: keep sizes taken from tensor values (``nonzero``, masks, ``.item()``) as
    unbacked symbols where export can, so the graph serves every such length its guards allow;
    otherwise (or where it cannot) every size is an int specialized on this call's values.
    ``why_specialized``: the reason to record when the caller asked for no symbols because a
    later step needed a concrete value. ``training``: see ``export_model``."""
    start = time.perf_counter()
    ep, why = _export_call(model, kwargs, specialize=None, training=training, symbolic=symbolic)
    gm = ep.module()
    symbols = symbolic_sizes(gm)
    guards = split_guards(gm, symbols=symbols, why_specialized=why or why_specialized)
    if guards is not None and guards.symbols:
        # ``Eq(u0, 1)`` among the guards: the trace specialized that size after all
        pinned = {m.group(1) for c in guards.conditions if (m := re.fullmatch(r"Eq\((u\d+), -?\d+\)", c))}
        kept = tuple(s for s in guards.symbols if s.split(" ")[0] not in pinned)
        guards = dataclasses.replace(guards, symbols=kept)
    log.debug("captured %s: %d nodes, symbolic sizes %s", type(model).__name__, len(gm.graph.nodes), symbols)
    return Captured(gm=gm, guards=guards, seconds=time.perf_counter() - start)


def capture(model: torch.nn.Module, kwargs: dict[str, Any], *, training: bool = False) -> torch.fx.GraphModule:
    """The model call as a ``GraphModule`` with the model's call signature (pytree in/out),
    every size an int.

    A graph specialized on data-dependent values is valid only for calls whose values match;
    ``capture_guarded`` returns the guards that check it.
    """
    return capture_guarded(model, kwargs, training=training).gm
