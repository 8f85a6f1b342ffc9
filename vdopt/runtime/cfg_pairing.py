"""CFG parallel for pipelines that call the denoiser once for cond and once for uncond.

vdopt's CFG pass (``passes/parallel/cfg_parallel.py``) splits a call whose batch holds both
halves of classifier-free guidance. Wan, HunyuanVideo and other diffusers pipelines instead
call the denoiser twice per step, with the same latents and timestep and different text
arguments. ``CFGPairing`` pairs those two calls, for any pipeline, without knowing its code:

1. It watches the calls: equal timesteps are calls of one step (slot 0 = call A, slot 1 =
   call B); a lower timestep starts the next step; a higher one a new generation.
2. In the first step of a generation the calls run one after the other: the mesh's cfg-half 0
   computes A, cfg-half 1 computes B (each on its own sub-mesh, with Ulysses/Ring inside), and
   the result is broadcast to the other half. Comparing A's and B's arguments gives the ones
   that differ (the prompt embeddings, masks, pooled projections, ...); B's values of those are
   kept.
3. From the next step on, at call A every rank can tell B's arguments in advance: A's
   arguments with the differing ones replaced by the kept values. Half 0 computes A while
   half 1 computes B, and the two results are exchanged (one all-gather on the cfg axis).
   Call A returns A's result. Call B checks that its real arguments are the speculated ones
   (identity first, ``torch.equal`` otherwise; a tensor modified in place since call A, as
   its version counter tells, never matches) and returns the result computed at call A; if
   they differ it computes B itself and speculation stops until the next generation. The
   result never depends on the guess being right.

Calls whose batch splits in two (pipelines that batch cond and uncond, such as CogVideoX and
LTX-Video) take the batch split instead, which is as fast and needs no speculation.

Each half always computes the same role (half 1 only ever computes B calls), so the step state
of the executables (PAB caches per call slot) stays per role, as with one device.

Every rank receives the same calls, so every decision here (step, slot, speculation, match)
is the same on every rank and the collectives line up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from vdopt.capture import bind_call
from vdopt.mesh import Mesh
from vdopt.runtime.executable import Executable, input_key, model_device
from vdopt.runtime.failures import CollectiveError, Step, collective_error, is_collective_failure
from vdopt.runtime.pab import StepTracker, read_timestep
from vdopt.runtime.plan import Plan

log = logging.getLogger(__name__)

A_ROLE, B_ROLE = 0, 1
"""The cfg-half that computes the first (A) and the second (B) call of a step."""


@dataclasses.dataclass
class Pairing:
    """What the first step taught: which argument leaves differ between call A and call B."""

    spec: pytree.TreeSpec
    """Argument structure of both calls."""
    differing: dict[int, Any]
    """Leaf index -> B's value, for the leaves where B's arguments differ from A's."""


@dataclasses.dataclass
class PairingStats:
    """Counts for the report."""

    paired: int = 0
    """Steps whose two calls ran at once on the two cfg-halves."""
    serial: int = 0
    """Calls run by one cfg-half and broadcast (first steps, and calls that cannot pair)."""
    split: int = 0
    """Calls whose batch was split in two (cond and uncond in one call)."""
    misses: int = 0
    """Calls B whose arguments were not the speculated ones (computed again, exactly)."""


def _same_leaf(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        )
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  values that cannot compare are treated as different
        return False


def learn_pairing(a_inputs: dict[str, Any], b_inputs: dict[str, Any]) -> Pairing | None:
    """The pairing of two calls of one step, or None when B cannot be told from A: a
    different argument structure, or a differing leaf that is not a tensor of A's shape."""
    a_leaves, a_spec = pytree.tree_flatten(a_inputs)
    b_leaves, b_spec = pytree.tree_flatten(b_inputs)
    if a_spec != b_spec:
        return None
    differing = {}
    for i, (a, b) in enumerate(zip(a_leaves, b_leaves)):
        if _same_leaf(a, b):
            continue
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device):
            return None
        differing[i] = b
    return Pairing(spec=a_spec, differing=differing)


def speculate(pairing: Pairing, a_inputs: dict[str, Any]) -> dict[str, Any] | None:
    """B's arguments for this step, from A's: the differing leaves replaced by B's values."""
    leaves, spec = pytree.tree_flatten(a_inputs)
    if spec != pairing.spec:
        return None
    for i, value in pairing.differing.items():
        leaves[i] = value
    return pytree.tree_unflatten(leaves, spec)


def _version(x: Any) -> int | None:
    if not isinstance(x, torch.Tensor) or x.is_inference():
        return None  # inference tensors cannot change in place outside inference mode, and keep no counter
    return x._version


def versions(inputs: dict[str, Any]) -> list[int | None]:
    """In-place modification counters of the tensor leaves (``None`` for other leaves)."""
    return [_version(x) for x in pytree.tree_leaves(inputs)]


def matches(actual: dict[str, Any], speculated: dict[str, Any], computed_versions: list[int | None]) -> bool:
    """Whether the real call B is the speculated one: same structure, no speculated tensor
    modified in place since it was computed with, and every leaf the same object or equal."""
    a_leaves, a_spec = pytree.tree_flatten(actual)
    s_leaves, s_spec = pytree.tree_flatten(speculated)
    if a_spec != s_spec or versions(speculated) != computed_versions:
        return False
    return all(_same_leaf(a, s) for a, s in zip(a_leaves, s_leaves))


@dataclasses.dataclass(frozen=True)
class OutputMeta:
    """Structure of a call's outputs: what a half that does not compute it receives."""

    spec: pytree.TreeSpec
    leaves: tuple[Any, ...]
    """``(shape, dtype)`` per tensor leaf; the value itself for a non-tensor leaf."""


class CFGPairing(torch.nn.Module):
    """Drop-in denoiser for ``Mesh(cfg=2)``: pairs separate cond/uncond calls; see the module doc.

    ``split`` runs a call with the cfg batch split (both halves in one batch); ``whole`` runs a
    call whole on each cfg-half's sub-mesh (built with the ``cfg_parallel`` pass disabled).
    Both wrap the same model; plans are built lazily, so an unused one costs nothing.
    """

    def __init__(self, split: Executable, whole: Executable, mesh: Mesh) -> None:
        super().__init__()
        if mesh.cfg != 2:
            raise ValueError(f"CFGPairing needs a mesh with cfg=2, got Mesh({mesh.describe()})")
        # plain references: the executables (and the model) are not submodules to move or train
        object.__setattr__(self, "_split", split)
        object.__setattr__(self, "_whole", whole)
        object.__setattr__(self, "_model", whole._model)
        self.mesh = mesh
        self.stats = PairingStats()
        self._tracker = StepTracker()
        self._pairing: Pairing | None = None
        self._first: dict[str, Any] | None = None
        self._pending: tuple[dict[str, Any], list[int | None], Any] | None = None
        # call B's speculated arguments, their tensors' version counters, and B's result
        self._speculate = True
        self._metas: dict[tuple, OutputMeta] = {}
        self._warned_single = False

    # -- the call ------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bind_call(self._model, args, kwargs)
        batch = _batch(inputs)
        if batch is not None and batch % 2 == 0:
            self.stats.split += 1
            return self._split(**inputs)
        try:
            timestep = read_timestep(inputs)
        except ValueError:
            # no timestep: steps cannot be told apart; every half runs the call itself
            return self._whole(**inputs)
        slot, new_generation = self._tracker.advance(timestep)
        if new_generation:
            self._start_generation()
        if slot == 0:
            return self._call_a(inputs)
        if slot == 1:
            return self._call_b(inputs)
        # a third call at the same timestep (e.g. an extra guidance term): every half runs it
        return self._whole(**inputs)

    def _start_generation(self) -> None:
        # the prompts may change between generations: learn the pairing again
        self._pairing = None
        self._pending = None
        self._first = None
        self._speculate = True

    def _call_a(self, inputs: dict[str, Any]) -> Any:
        self._pending = None
        self._first = inputs
        if self._pairing is not None and self._speculate:
            b_inputs = speculate(self._pairing, inputs)
            if b_inputs is not None:
                computed = versions(b_inputs)
                a_out, b_out = self._run_pair(inputs, b_inputs)
                self._pending = (b_inputs, computed, b_out)
                self.stats.paired += 1
                return a_out
        return self._run_role(inputs, A_ROLE)

    def _call_b(self, inputs: dict[str, Any]) -> Any:
        if self._pending is not None:
            speculated, computed, b_out = self._pending
            self._pending = None
            if matches(inputs, speculated, computed):
                return b_out
            self.stats.misses += 1
            self._speculate = False
            log.warning(
                "CFG pairing: the second call of this step has other arguments than the first step "
                "taught; it is computed again (exactly) and pairing stops until the next generation"
            )
            return self._run_role(inputs, B_ROLE)
        out = self._run_role(inputs, B_ROLE)
        if self._pairing is None and self._first is not None and self._speculate:
            self._pairing = learn_pairing(self._first, inputs)
            if self._pairing is None:
                self._speculate = False
                log.warning("CFG pairing: the two calls of a step differ in structure or shapes; they run one "
                            "after the other (exact, no CFG speed-up)")
        return out

    # -- collectives ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _exchange(self, what: str):
        """Re-raise a failed exchange on the cfg axis as ``CollectiveError`` (where, which ranks)."""
        try:
            yield
        except CollectiveError:
            raise
        except Exception as e:
            if not is_collective_failure(e):
                raise
            device = model_device(self._model)
            name = self.mesh.axis_groups(device)["cfg"].group_name
            call = f"CFG pairing of {type(self._model).__name__} (step call {self._tracker.slot + 1})"
            raise collective_error(e, mesh=self.mesh, device=device, call=call,
                                   step=Step(what=what, groups=(name,))) from e

    def _group(self) -> tuple[dist.ProcessGroup, int, list[int]]:
        """The cfg-axis group of this rank, this rank's cfg coordinate, and the group's global ranks."""
        from torch.distributed.distributed_c10d import _resolve_process_group

        device = model_device(self._model)
        axis = self.mesh.axis_groups(device)["cfg"]
        group = _resolve_process_group(axis.group_name)
        coords = self.mesh.coordinates(dist.get_rank())
        ranks = [self.mesh.rank_of({**coords, "cfg": i}) for i in range(axis.size)]
        return group, axis.rank, ranks

    def _meta_of(self, key: tuple, out: Any | None, source_rank: int, group: dist.ProcessGroup) -> OutputMeta:
        """The output structure of calls with input key ``key``, sent once from the half that computed one."""
        meta = self._metas.get(key)
        if meta is None:
            payload = [None]
            if out is not None:
                leaves, spec = pytree.tree_flatten(out)
                payload = [OutputMeta(spec, tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x
                                                  for x in leaves))]
            dist.broadcast_object_list(payload, src=source_rank, group=group)
            meta = self._metas[key] = payload[0]
        return meta

    def _run_role(self, inputs: dict[str, Any], role: int) -> Any:
        """One call computed by the cfg-half ``role`` and broadcast to the other half."""
        group, me, ranks = self._group()
        self.stats.serial += 1
        out = self._whole(**inputs) if me == role else None
        with self._exchange(f"the broadcast of cfg-half {role}'s output"):
            meta = self._meta_of(input_key(inputs), out, ranks[role], group)
            if out is not None:
                leaves = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in pytree.tree_leaves(out)]
            else:
                device = model_device(self._model)
                leaves = [torch.empty(x[0], dtype=x[1], device=device) if _is_tensor_meta(x) else x
                          for x in meta.leaves]
            for leaf, m in zip(leaves, meta.leaves):
                if _is_tensor_meta(m):
                    dist.broadcast(leaf, src=ranks[role], group=group)
        return pytree.tree_unflatten(leaves, meta.spec)

    def _run_pair(self, a_inputs: dict[str, Any], b_inputs: dict[str, Any]) -> tuple[Any, Any]:
        """A on cfg-half 0 and B on cfg-half 1 at once; both results on every rank."""
        group, me, ranks = self._group()
        mine = self._whole(**(a_inputs if me == A_ROLE else b_inputs))
        leaves, spec = pytree.tree_flatten(mine)
        a_leaves, b_leaves = [], []
        with self._exchange("the all-gather of the paired cond and uncond outputs"):
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor):
                    parts = [torch.empty(leaf.shape, dtype=leaf.dtype, device=leaf.device) for _ in ranks]
                    dist.all_gather(parts, leaf.contiguous(), group=group)
                    a_leaves.append(parts[A_ROLE])
                    b_leaves.append(parts[B_ROLE])
                else:
                    a_leaves.append(leaf)
                    b_leaves.append(leaf)
        return pytree.tree_unflatten(a_leaves, spec), pytree.tree_unflatten(b_leaves, spec)

    # -- what pipelines and users read ---------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: clears the pairing and the executables' step state."""
        self._tracker.reset()
        self._start_generation()
        self._split.reset()
        self._whole.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str, **context: Any):
        """Accepted for diffusers pipelines that wrap each call in ``cache_context``."""
        yield

    @property
    def plans(self) -> list[Plan]:
        """Plans of both executables (the batch split's first)."""
        return self._split.plans + self._whole.plans

    def report(self) -> str:
        s = self.stats
        lines = [
            f"CFG pairing on Mesh({self.mesh.describe()}): {s.paired} step(s) paired (cond and uncond at once on "
            f"the two cfg-halves), {s.serial} call(s) run by one half and broadcast, {s.split} call(s) with the "
            f"batch split, {s.misses} speculation miss(es)"
        ]
        if self._pairing is not None:
            names = _leaf_names(self._pairing)
            lines.append("  arguments that differ between the two calls of a step: " + (", ".join(names) or "none"))
        for title, executable in (("batch split (cond and uncond in one call)", self._split),
                                  ("one call per cfg-half", self._whole)):
            if executable.plans:
                lines += ["", f"-- {title} --", executable.report()]
        return "\n".join(lines)

    def save(self, path: Any) -> Any:
        raise ValueError(
            "a denoiser optimized for separate cond/uncond calls (CFG pairing) cannot be saved as artifacts: "
            "optimize the denoiser alone with vdopt.optimize(pipe.transformer, mesh) and save that"
        )

    def __getattr__(self, name: str) -> Any:
        # config, dtype, device, ... are read from the executable (and through it the model)
        try:
            return super().__getattr__(name)
        except AttributeError:
            whole = self.__dict__.get("_whole")
            if whole is None:
                raise
            return getattr(whole, name)

    def extra_repr(self) -> str:
        return f"model={type(self._model).__name__}, mesh=({self.mesh.describe()})"


def _is_tensor_meta(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.dtype)


def _batch(inputs: dict[str, Any]) -> int | None:
    """Leading dim of the largest floating point tensor argument (the latent)."""
    tensors = [x for x in pytree.tree_leaves(inputs)
               if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2]
    return int(max(tensors, key=lambda t: t.numel()).shape[0]) if tensors else None


def _leaf_names(pairing: Pairing) -> list[str]:
    """Argument names of the differing leaves (``encoder_hidden_states``, ...)."""
    names = []
    # placeholders that are leaves (None is an empty node to pytree, not a leaf)
    paths = pytree.tree_flatten_with_path(pytree.tree_unflatten([0] * pairing.spec.num_leaves, pairing.spec))[0]
    for i in sorted(pairing.differing):
        names.append(pytree.keystr(paths[i][0]).strip("[]'\""))
    return names
