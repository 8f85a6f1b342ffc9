"""Ahead-of-time artifacts: ``opt.save(path)`` writes them, ``vdopt.load(path, mesh)`` runs them.

An artifact is a directory::

    manifest.json                   what was saved and for what (written last)
    weights.rank{r}.pt              every constant rank r's packages need, stored once
    plan{i}/{variant}.rank{r}.pt2   one AOTInductor package per input signature, variant, rank

Each plan (input signature the model was called with) holds one package per *variant* of
its program: ``main`` for a plain program, one per pattern of reused kinds for PAB. Packages
hold code only (``aot_inductor.package_constants_in_so=False``); the weights are loaded once
per rank and handed to every package as user-managed constants, so PAB's variants share one
copy instead of each embedding the model.

The manifest records the call signature, every plan's input leaves (shape, dtype, device,
constant values) and output structure (a pytree spec), the program's step data (the PAB
schedule), the mesh degrees and the process groups the graphs name, the torch / triton /
vdopt versions and the device. ``load`` checks all of it before running anything and says
what differs and what to do. ``save`` writes into a hidden temporary directory next to the
target and renames it into place once complete, so an interrupted save leaves nothing at
``path`` that loads.

Loading on GPUs (researched from upstream reports; NOT verified on a GPU): a package of even
a trivial model failed to load on the H100 machine (torch 2.11). The matching upstream
report is pytorch/pytorch#173706 (regression since 2.10, open when last seen): in a fresh
process ``aoti_load_package`` reads the device information through
``torch._inductor.codecache`` without importing it and fails; it works in the process that
compiled the package, which has imported it. torch 2.13 imports it explicitly. Workaround
here: ``import torch._inductor.codecache`` before loading. Two neighbouring traps are
avoided too: ``load_package`` treats any ``RuntimeError`` of the new loader as an "outdated
package" and falls back to a legacy loader that fails obscurely on CUDA packages when CUDA
is unusable (pytorch/pytorch#145730, fixed after 2.11), so ``load`` checks CUDA and the
compute capability itself first; and without ``device_index`` every rank would load onto
``cuda:0`` (pytorch/pytorch#152087), so each rank passes its own device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import inspect as pyinspect
import json
import logging
import os
import platform
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

FORMAT = "vdopt-aot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PACKAGE_OPTIONS = {"aot_inductor.package_constants_in_so": False}
"""Inductor options for every package: code only, weights come from ``weights.rank{r}.pt``."""

_PLAIN_PROGRAM = "graph"


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, or does not fit this process, mesh or call."""


# -- environment -----------------------------------------------------------------------------

def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _vdopt_version() -> str:
    import vdopt

    return vdopt.__version__


def device_info(device: torch.device) -> dict[str, Any]:
    """What a package compiled for ``device`` needs from the machine that loads it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": [props.major, props.minor]}
    return {"type": device.type, "name": platform.machine(), "capability": None}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_device(kind: str) -> torch.device:
    if kind == "cuda":
        index = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device(kind)


# -- call signature and inputs ----------------------------------------------------------------

class _SavedDefault:
    """Stands in for a parameter default: defaults are left out of bound calls (see ``bind_call``)."""

    def __repr__(self) -> str:
        return "<default>"


_HAS_DEFAULT = _SavedDefault()


def call_signature(model: torch.nn.Module) -> list[dict[str, Any]]:
    """``model.forward``'s parameters (name, kind, whether it has a default) for the manifest."""
    return [
        {"name": p.name, "kind": p.kind.name, "has_default": p.default is not pyinspect.Parameter.empty}
        for p in pyinspect.signature(model.forward).parameters.values()
    ]


def _signature_from(params: Sequence[Mapping[str, Any]]) -> pyinspect.Signature:
    return pyinspect.Signature([
        pyinspect.Parameter(
            p["name"], getattr(pyinspect.Parameter, p["kind"]),
            default=_HAS_DEFAULT if p["has_default"] else pyinspect.Parameter.empty,
        )
        for p in params
    ])


def bind_saved_call(params: Sequence[Mapping[str, Any]], args: tuple, kwargs: dict) -> dict[str, Any]:
    """``vdopt.capture.bind_call`` against a saved signature (no model object needed)."""
    sig = _signature_from(params)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"forward{sig}: {e}") from None
    arguments = dict(bound.arguments)
    for p in params:
        if p["kind"] == "VAR_KEYWORD" and p["name"] in arguments:
            arguments.update(arguments.pop(p["name"]))
    return arguments


def signature_record(key: tuple) -> dict[str, Any]:
    """JSON form of ``vdopt.runtime.executable.input_key``: the pytree structure and every leaf."""
    structure, leaf_keys = key
    leaves = []
    for leaf in leaf_keys:
        if leaf[0] == "tensor":
            _, shape, dtype, device = leaf
            leaves.append({"dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "device": device})
        else:
            leaves.append({"type": leaf[1], "value": repr(leaf[2])})
    return {"structure": structure, "leaves": leaves}


def _argument_names(structure: str) -> list[str] | None:
    """The argument names of a saved call, read from its input structure (``str(TreeSpec)``)."""
    import ast
    import re

    match = re.match(r"TreeSpec\(dict, (\[[^\]]*\])", structure)
    try:
        return list(ast.literal_eval(match.group(1))) if match else None
    except (ValueError, SyntaxError):
        return None


def _leaf_text(leaf: Mapping[str, Any]) -> str:
    if "dtype" in leaf:
        return f"{leaf['dtype']}{leaf['shape']} on {leaf['device']}"
    return f"{leaf['type']} {leaf['value']}"


def explain_mismatch(inputs: Mapping[str, Any], got: Mapping[str, Any], saved: Mapping[str, Any]) -> str:
    """How a call's inputs differ from a saved plan's (``signature_record`` of each)."""
    from vdopt.runtime.executable import describe_inputs

    if got["structure"] != saved["structure"] or len(got["leaves"]) != len(saved["leaves"]):
        names = _argument_names(saved["structure"])
        if names is not None and list(inputs) != names:
            extra = [f"{k}={describe_inputs({k: inputs[k]}).partition('=')[2]}" for k in inputs if k not in names]
            missing = [k for k in names if k not in inputs]
            parts = ([f"passes {', '.join(extra)}, which the saved call did not"] if extra else []) + (
                [f"does not pass {', '.join(missing)}, which the saved call did"] if missing else [])
            if parts:
                return "this call " + " and ".join(parts)
        return f"got {describe_inputs(dict(inputs))}"
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(dict(inputs))[0]]
    lines = [
        f"input {path}: got {_leaf_text(g)}, saved for {_leaf_text(s)}"
        for path, g, s in zip(paths, got["leaves"], saved["leaves"])
        if g != s
    ]
    return "; ".join(lines[:4]) + ("; ..." if len(lines) > 4 else "")


# -- what a program consists of ----------------------------------------------------------------

def program_parts(program: Any) -> tuple[str, dict[str, Any], dict[str, torch.fx.GraphModule]]:
    """``(kind, step data, graphs by variant name)`` of a program, for saving.

    A plain ``GraphProgram`` is kind ``"graph"`` with one variant, ``main``. Any other program
    takes part by implementing ``variants() -> {name: GraphModule}``, ``schedule_spec() ->
    JSON data`` and a classmethod ``from_spec(spec, runners)`` that rebuilds it over loaded
    runners with the graphs' call convention (``vdopt.runtime.pab.PABProgram`` does).
    """
    from vdopt.compile import original_graph
    from vdopt.runtime.executable import GraphProgram

    if isinstance(program, GraphProgram):
        return _PLAIN_PROGRAM, {}, {"main": original_graph(program.gm)}
    cls = type(program)
    missing = [m for m in ("variants", "schedule_spec", "from_spec") if not hasattr(cls, m)]
    if missing:
        raise ArtifactError(
            f"{cls.__name__} cannot be saved as AOT artifacts yet (it lacks {', '.join(missing)}); "
            "run it with vdopt.optimize in the process instead"
        )
    graphs = {name: original_graph(gm) for name, gm in program.variants().items()}
    return f"{cls.__module__}:{cls.__qualname__}", program.schedule_spec(), graphs


def rebuild_program(kind: str, spec: Mapping[str, Any], runners: Mapping[str, Callable]) -> Any:
    """The program of a saved plan over loaded runners (inverse of ``program_parts``)."""
    from vdopt.runtime.executable import GraphProgram

    if kind == _PLAIN_PROGRAM:
        return GraphProgram(runners["main"])
    module, _, qualname = kind.partition(":")
    if not module.startswith("vdopt.") or not qualname:
        raise ArtifactError(f"unknown program kind {kind!r} in the manifest")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls.from_spec(spec, runners)


# -- exporting one graph ---------------------------------------------------------------------

def example_inputs(gm: torch.fx.GraphModule) -> tuple[tuple, dict]:
    """Inputs for re-exporting ``gm``, made from its placeholders' ``meta["val"]``.

    Export only traces, so values do not matter: random tensors of each placeholder's
    shape, dtype, strides and device, and the constants themselves. A graph with pytree
    codegen (``ep.module()``) gets ``(args, kwargs)`` in the model's call convention.
    """
    leaves = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if "val" not in node.meta:
            raise ArtifactError(f"graph input {node.name} has no meta['val']: cannot export it")
        val = node.meta["val"]
        if isinstance(val, torch.Tensor):
            real = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=val.device)
            real.copy_(torch.randn(val.shape).to(val.dtype) if val.is_floating_point() else torch.ones(val.shape, dtype=val.dtype))
            leaves.append(real)
        else:
            leaves.append(val)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        args, kwargs = pytree.tree_unflatten(leaves, info.in_spec)
        return tuple(args), dict(kwargs)
    return tuple(leaves), {}


def export_graph(gm: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """Re-export a rewritten graph (same call convention) for AOTInductor."""
    args, kwargs = example_inputs(gm)
    with torch.no_grad():
        return torch.export.export(gm, args, kwargs, strict=False)


def exported_constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Parameters, buffers and lifted constants of ``ep`` by the names AOTInductor uses."""
    out = {k: v for k, v in ep.state_dict.items()}
    out.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return out


def group_names(gm: torch.fx.GraphModule) -> dict[str, list[int]]:
    """Process groups the graph names (functional collectives, ``vdopt::`` ops): name -> ranks."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    if not (dist.is_available() and dist.is_initialized()):
        return {}
    found: dict[str, list[int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for value in pytree.tree_leaves((node.args, node.kwargs)):
            if not isinstance(value, str) or value in found:
                continue
            try:
                group = _resolve_process_group(value)
            except Exception:  # not a group name (e.g. a reduce op "sum")
                continue
            found[value] = dist.get_process_group_ranks(group)
    return found


# -- files -----------------------------------------------------------------------------------

def _file_record(root: Path, path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _check_file(root: Path, record: Mapping[str, Any]) -> Path:
    path = root / record["path"]
    if not path.is_file():
        raise ArtifactError(
            f"artifact {root} is incomplete: {record['path']} is missing; copy the whole directory "
            "or save it again"
        )
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(
            f"artifact file {record['path']} in {root} has {size} bytes but {record['bytes']} were saved "
            "(truncated or modified); copy it again or save it again"
        )
    return path


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``, replacing an earlier artifact there."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _check_target(path: Path) -> None:
    if path.exists() and not (path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))):
        raise ArtifactError(f"{path} exists and is not a vdopt artifact: choose another path or remove it")


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -- save ------------------------------------------------------------------------------------

def save(opt: Any, path: str | os.PathLike) -> Path:
    """Write ``opt``'s plans as AOTInductor artifacts at ``path``; call it on every rank.

    Every input signature ``opt`` has been called with (or given as ``example_inputs``) is
    saved. With several ranks, ``path`` must be on a filesystem every rank sees.
    """
    from vdopt.runtime.executable import model_device

    plans = list(opt._plans.items())  # (input key, plan), one per input signature
    if not plans:
        raise ArtifactError(
            "nothing to save yet: artifacts are compiled for the input shapes the model was called "
            "with; call the optimized model once (or pass example_inputs to vdopt.optimize) first"
        )
    rank, world = _rank_world()
    if world != opt.mesh.size:
        raise ArtifactError(f"save runs on every rank of Mesh({opt.mesh.describe()}), but the world size is {world}")
    path = Path(path).absolute()
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_broadcast(str(path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}"))))
    if rank == 0:
        tmp.mkdir()
    _barrier()
    try:
        record = _save_rank(opt, plans, tmp, rank, model_device(opt._model))
        records = _gather(record)
        if rank == 0:
            manifest = _manifest(opt, plans, records, world)
            _write_json(tmp / MANIFEST, manifest)
            _move_into_place(tmp, path)
        _barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d plan(s) of %s to %s", len(plans), opt._model_name, path)
    return path


def _save_rank(opt: Any, plans: Sequence[Any], tmp: Path, rank: int, device: torch.device) -> dict[str, Any]:
    """This rank's packages and weights; returns what the manifest needs from this rank."""
    from tqdm.auto import tqdm

    parts = [program_parts(plan.program) for _, plan in plans]
    total = sum(len(graphs) for _, _, graphs in parts)
    weights: dict[str, torch.Tensor] = {}
    stored_as: dict[tuple, str] = {}  # tensor identity -> stored name, so shared weights are stored once
    plan_records = []
    groups: dict[str, list[int]] = {}
    quiet = rank != 0
    with tqdm(total=total, desc=f"vdopt save {opt._model_name}", leave=False, disable=True if quiet else None) as bar:
        for index, (kind, spec, graphs) in enumerate(parts):
            (tmp / f"plan{index}").mkdir(exist_ok=True)
            variants = {}
            for name, gm in graphs.items():
                bar.set_postfix_str(f"plan {index} {name}")
                start = time.perf_counter()
                groups.update(group_names(gm))
                ep = export_graph(gm)
                package = tmp / f"plan{index}" / f"{name}.rank{rank}.pt2"
                with _private_inductor_cache(rank, opt.mesh.size):
                    torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=PACKAGE_OPTIONS)
                available = exported_constants(ep)
                constants = {}
                for fqn in _needed_constants(package, available, name, device):
                    tensor = available[fqn]
                    key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                           tuple(tensor.stride()), tensor.dtype, tensor.device)
                    if key not in stored_as:
                        stored = fqn if fqn not in weights else f"{fqn}#{len(weights)}"
                        stored_as[key] = stored
                        weights[stored] = tensor.detach().clone() if tensor.untyped_storage().nbytes() > tensor.nbytes else tensor.detach()
                    constants[fqn] = stored_as[key]
                variants[name] = {"package": _file_record(tmp, package), "constants": constants,
                                  "compile_s": round(time.perf_counter() - start, 3)}
                bar.update(1)
            plan_records.append({"kind": kind, "spec": spec, "variants": variants})
    weights_path = tmp / f"weights.rank{rank}.pt"
    torch.save(weights, weights_path)
    return {"rank": rank, "plans": plan_records, "weights": _file_record(tmp, weights_path),
            "groups": groups, "device": device_info(device)}


@contextlib.contextmanager
def _private_inductor_cache(rank: int, world: int):
    """Give each rank its own Inductor cache directory while it compiles packages.

    Ranks of a symmetric mesh build identical graphs, so AOTInductor writes them to the same
    cache path; it re-links the ``.so`` in place under a lock but packages it after releasing
    the lock, so one rank could zip a library that another rank is rewriting (a race found by
    reading the code; not observed).
    """
    if world == 1:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import cache_dir, temporary_cache_dir

    with temporary_cache_dir(os.path.join(cache_dir(), f"vdopt-rank{rank}")):
        yield


def _needed_constants(package: Path, available: Mapping[str, torch.Tensor], name: str, device: torch.device) -> list[str]:
    """The constants the package reads (AOTInductor drops unused ones); fails at save, not load."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    needed = sorted(_load_package(package, index).get_constant_fqns())
    missing = [fqn for fqn in needed if fqn not in available]
    if missing:
        raise ArtifactError(f"variant {name}: the package needs constants that export did not list: {missing[:5]}")
    return needed


def _manifest(opt: Any, plans: Sequence[Any], records: list[dict[str, Any]], world: int) -> dict[str, Any]:
    first = records[0]
    out_plans = []
    for index, (key, plan) in enumerate(plans):
        base = first["plans"][index]
        out_plans.append({
            "signature": plan.signature,
            "inputs": signature_record(key),
            "program": base["kind"],
            "spec": base["spec"],
            "variants": {
                name: {
                    "packages": [r["plans"][index]["variants"][name]["package"] for r in records],
                    "constants": [r["plans"][index]["variants"][name]["constants"] for r in records],
                    "compile_s": [r["plans"][index]["variants"][name]["compile_s"] for r in records],
                }
                for name in base["variants"]
            },
        })
    pab = next((p["spec"].get("rules") for p in out_plans if p["spec"].get("rules") is not None), None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": opt._model_name,
        "versions": {"torch": torch.__version__, "triton": _triton_version(), "vdopt": _vdopt_version(),
                     "python": platform.python_version()},
        "device": first["device"],
        "mesh": {"degrees": opt.mesh.degrees, "world_size": world},
        "process_groups": [r["groups"] for r in records],
        "call": call_signature(opt._model),
        "config": model_config(opt._model),
        "pab_schedule": pab,
        "weights": [r["weights"] for r in records],
        "plans": out_plans,
    }


# -- load ------------------------------------------------------------------------------------

def _load_package(path: Path, device_index: int) -> Any:
    # torch 2.10 and 2.11 read the device information through ``torch._inductor.codecache``
    # without importing it (pytorch/pytorch#173706), so a fresh process that never compiled
    # anything failed to load any package. Importing it first is harmless on every version.
    import torch._inductor.codecache  # noqa: F401

    return torch._inductor.aoti_load_package(str(path), device_index=device_index)


def _import_spec_types(spec: str | None) -> None:
    """Import the modules that define the pytree node types a serialized spec names.

    Output containers such as diffusers' ``Transformer2DModelOutput`` register themselves
    with pytree when their module is imported; the loading process may not have done so.
    """
    if not spec:
        return
    stack = [json.loads(spec)[1]]
    while stack:
        node = stack.pop()
        type_name = node.get("type")
        if type_name and not type_name.startswith(("builtins.", "collections.")):
            module = type_name.rpartition(".")[0]
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ArtifactError(
                    f"the model's outputs are {type_name}, whose module {module} cannot be imported here ({e}); "
                    "install it, or save a model called with return_dict=False"
                ) from None
        stack.extend(node.get("children_spec") or [])


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, or an ``ArtifactError`` saying what is wrong."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"no artifact at {root}: save one with opt.save(path) or `vdopt compile MODEL --out {root}`")
    if not root.is_dir():
        raise ArtifactError(f"{root} is a file; a vdopt artifact is the directory opt.save or `vdopt compile` writes")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST}: it is not a vdopt artifact, or its save did not finish "
            "(the manifest is written last and the directory renamed into place); save it again"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is corrupt ({e}); save the artifact again") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this vdopt reads {FORMAT!r} version {FORMAT_VERSION}: save the artifact again with this vdopt"
        )
    return manifest


def check_environment(manifest: Mapping[str, Any], root: Path) -> torch.device:
    """Versions and device; returns the device this rank loads onto."""
    saved = manifest["versions"]
    if saved["torch"] != torch.__version__:
        raise ArtifactError(
            f"artifact {root} was compiled with torch {saved['torch']}, this process runs torch {torch.__version__}; "
            "AOTInductor packages load only in the torch build that made them: install that torch, "
            "or re-create the artifact here (opt.save or `vdopt compile`)"
        )
    if saved["vdopt"] != _vdopt_version():
        log.warning("artifact %s was saved by vdopt %s, this is vdopt %s", root, saved["vdopt"], _vdopt_version())
    want = manifest["device"]
    if want["type"] == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError(
                f"artifact {root} was compiled for CUDA ({want['name']}) but CUDA is not available in this "
                "process; load it on a GPU machine, or re-create it here for the CPU"
            )
        device = _local_device("cuda")
        have = device_info(device)
        if have["capability"] != want["capability"]:
            raise ArtifactError(
                f"artifact {root} was compiled for {want['name']} (sm {want['capability']}), this GPU is "
                f"{have['name']} (sm {have['capability']}); re-create the artifact on this GPU"
            )
        return device
    if want["type"] != "cpu":
        raise ArtifactError(f"artifact {root} was compiled for device {want['type']!r}, which vdopt.load does not support")
    return torch.device("cpu")


def check_mesh(manifest: Mapping[str, Any], mesh: Any, root: Path) -> Any:
    """The mesh to run on: ``mesh`` if it matches the saved degrees, else an ``ArtifactError``."""
    from vdopt.mesh import Mesh

    degrees = manifest["mesh"]["degrees"]
    saved = ", ".join(f"{a}={d}" for a, d in degrees.items())
    world_saved = manifest["mesh"]["world_size"]
    _, world = _rank_world()
    if world != world_saved:
        raise ArtifactError(
            f"artifact {root} was saved for {world_saved} rank(s) (Mesh({saved})) but this process group has "
            f"{world}: launch with torchrun --nproc-per-node {world_saved}, or re-create the artifact for "
            f"{world} rank(s)"
        )
    if mesh is None:
        return Mesh(**degrees)
    if mesh.degrees != degrees:
        raise ArtifactError(
            f"artifact {root} was saved for Mesh({saved}) but vdopt.load got Mesh({mesh.describe()}); pass the "
            "saved mesh (or mesh=None), or re-create the artifact for this mesh"
        )
    return mesh


def check_groups(manifest: Mapping[str, Any], mesh: Any, device: torch.device, rank: int, root: Path) -> None:
    """Create the mesh's groups and check they carry the names the packages were built with."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    saved = manifest["process_groups"][rank]
    if not saved:
        return
    mesh.axis_groups(device)  # same creation order as when the graphs were built
    for name, ranks in saved.items():
        try:
            have = dist.get_process_group_ranks(_resolve_process_group(name))
        except Exception:
            have = None
        if have != ranks:
            raise ArtifactError(
                f"artifact {root}: rank {rank}'s packages use process group {name!r} over ranks {ranks}, but in this "
                f"process that name is {'unknown' if have is None else f'the group of ranks {have}'}. AOTInductor "
                "bakes group names in: call vdopt.load before creating other process groups (or pass the mesh "
                "the model was optimized with, in the process that optimized it)"
            )


class _Config(dict):
    """The wrapped model's ``config`` as saved: item and attribute access (like diffusers')."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's ``config`` (diffusers models have one) if it is JSON data, else None."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass(kw_only=True)
class LoadedPlan:
    """One saved input signature and the program that runs it."""

    signature: str
    """Human-readable input signature."""
    inputs: dict[str, Any]
    """``signature_record`` of the saved call."""
    program: Any
    """Runs the calls (``GraphProgram``, ``PABProgram``, ...) over the loaded packages."""
    variants: tuple[str, ...]
    """Names of the packages loaded for this plan."""


def load(path: str | os.PathLike, mesh: Any = None) -> "LoadedModel":
    """Load an artifact saved by ``opt.save`` or ``vdopt compile``; call it on every rank.

    The model's Python code is not needed. Everything is checked before anything runs:
    format, torch version, device, world size and mesh, process group names and every file.
    """
    import vdopt.ops  # noqa: F401  registers the vdopt:: ops the packages call

    start = time.perf_counter()
    root = Path(path)
    manifest = read_manifest(root)
    device = check_environment(manifest, root)
    mesh = check_mesh(manifest, mesh, root)
    rank, _ = _rank_world()
    check_groups(manifest, mesh, device, rank, root)
    weights_path = _check_file(root, manifest["weights"][rank])
    for plan in manifest["plans"]:
        for variant in plan["variants"].values():
            _check_file(root, variant["packages"][rank])
    try:
        weights = torch.load(weights_path, map_location=device, mmap=True, weights_only=True)
    except Exception as e:
        raise ArtifactError(f"cannot read {weights_path} ({type(e).__name__}: {e}); save the artifact again") from None
    device_index = device.index if device.type == "cuda" else -1
    plans = []
    for plan in manifest["plans"]:
        runners = {}
        for name, variant in plan["variants"].items():
            package = root / variant["packages"][rank]["path"]
            try:
                runner = _load_package(package, device_index)
            except Exception as e:
                raise ArtifactError(f"cannot load {package} ({type(e).__name__}: {e}); save the artifact again") from None
            in_spec, out_spec = runner.loader.get_call_spec()
            _import_spec_types(out_spec)
            runner.load_constants(
                {fqn: weights[stored] for fqn, stored in variant["constants"][rank].items()},
                check_full_update=True, user_managed=True,
            )
            runners[name] = runner
        _import_spec_types(plan["spec"].get("out_spec"))
        plans.append(LoadedPlan(
            signature=plan["signature"], inputs=plan["inputs"], variants=tuple(runners),
            program=rebuild_program(plan["program"], plan["spec"], runners),
        ))
    startup_s = time.perf_counter() - start
    log.info("loaded %s from %s in %.2f s", manifest["model"], root, startup_s)
    return LoadedModel(root=root, manifest=manifest, mesh=mesh, plans=plans, weights=weights,
                       device=device, startup_s=startup_s)


class LoadedModel(torch.nn.Module):
    """A loaded artifact: the saved model's call signature, output structure and step behaviour."""

    def __init__(
        self,
        *,
        root: Path,
        manifest: dict[str, Any],
        mesh: Any,
        plans: list[LoadedPlan],
        weights: dict[str, torch.Tensor],
        device: torch.device,
        startup_s: float,
    ) -> None:
        super().__init__()
        self.root = root
        self.manifest = manifest
        self.mesh = mesh
        self.plans = plans
        # The packages hold pointers into these tensors (user-managed constants): keep them.
        self._weights = weights
        self._device = device
        self.startup_s = startup_s
        """Seconds ``vdopt.load`` took (checks, weights, packages)."""
        saved_config = manifest.get("config")
        self.config = _Config(saved_config) if saved_config is not None else None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        floats = [t.dtype for t in self._weights.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bind_saved_call(self.manifest["call"], args, kwargs)
        plan = self._plan_for(inputs)
        # Below autograd, not just no_grad: AOTInductor runs with the GIL held, and the functional
        # collectives' autograd kernels are Python, so their tensors get Python objects. A gloo
        # worker thread dropping such a tensor then waits for the GIL while this thread waits
        # for that worker inside the package: a deadlock (seen on 2 gloo ranks, torch 2.13).
        with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            return plan.program(inputs)

    def _plan_for(self, inputs: dict[str, Any]) -> LoadedPlan:
        from vdopt.runtime.executable import input_key

        got = signature_record(input_key(inputs))
        for plan in self.plans:
            if plan.inputs == got:
                return plan
        closest = self.plans[0]
        saved = "; ".join(p.signature for p in self.plans)
        raise ArtifactError(
            f"artifact {self.root} was not compiled for these inputs: {explain_mismatch(inputs, got, closest.inputs)}. "
            f"AOT artifacts are specialized to the inputs they were saved with ({saved}): call the optimized "
            "model with these inputs too before opt.save (one plan is saved per input signature), or re-run "
            "`vdopt compile` with these shapes"
        )

    def reset(self) -> None:
        """Start a new generation: clears step state (PAB caches, call counters)."""
        for plan in self.plans:
            plan.program.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str, *args: Any, **kwargs: Any):
        """Accepted for diffusers pipelines; step state is keyed by timestep and call order."""
        yield

    def report(self) -> str:
        m = self.manifest
        degrees = ", ".join(f"{a}={d}" for a, d in m["mesh"]["degrees"].items())
        lines = [
            f"vdopt artifact {self.root}: {m['model']} on Mesh({degrees}), {m['device']['type']} "
            f"({m['device']['name']}), saved {m['created']} with torch {m['versions']['torch']}",
            f"start-up {self.startup_s:.2f} s",
        ]
        for i, plan in enumerate(self.plans, 1):
            lines.append(f"\n== signature {i} ==\ninputs: {plan.signature}")
            lines.append(f"variants: {', '.join(plan.variants)}")
            lines.extend(f"{k}: {v}" for k, v in plan.program.summary().items())
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"path={self.root}, model={self.manifest['model']}, plans={len(self.plans)}"
