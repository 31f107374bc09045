"""What one SpectralAdam step does to one param group, as a plan of units, and the loop that runs it.

A :class:`StepPlan` lists, as indices into the group's :class:`~stiefel_sct.optim_state.GroupTensors`:

* the loose Euclidean parameters (``s``, biases, ...): one Adam call, with the group's weight decay;
* one unit per factor-bank chunk: Adam on the chunk's factors, then, while the chunk is still in
  cache, its batched retraction (:meth:`~stiefel_sct.bank.FactorBank.retract_chunk_`) or, for a
  CholeskyQR bank of fp32/fp64 factors, its Gram matrices; such a bank's ``k x k`` work then runs
  once for all its chunks (:func:`~stiefel_sct.manifold.one_pass_factors`) before each chunk is
  retracted;
* the loose factors (no bank covers them): one Adam call, then handed to the caller's ``retract``,
  which retracts them at once or defers them (function-preserving triples after every group,
  FSDP2's sharded retraction, step-in-backward's pending factors until ``step()``).

A plan depends only on which parameters have a gradient and on the group's banks, so
:func:`plan_for` caches it and rebuilds it only when either changes. :func:`run_plan` is the step's
one loop: ``SpectralAdam.step -> run_plan -> Adam kernel`` and ``-> retract_chunk_`` (3 frames each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import geoopt
import torch

from .adam import adam_kernel, riemannian_adam
from .bank import FactorBank, live_banks
from .manifold import is_stiefel, one_pass_factors, plain, retract_triples_, stiefel_manifold
from .optim_state import GroupTensors
from .triples import Triple, spectral_triples

__all__ = ["PreservedTriples", "StepPlan", "plan_for", "riemannian_manifold", "run_plan", "stabilize_"]

Retract = Callable[[List[int]], None]  # receives indices (into the group's GroupTensors) of updated loose factors


@dataclass(frozen=True)
class StepPlan:
    """The units of one group's step (indices into its :class:`GroupTensors`); ``key`` identifies
    the parameters with a gradient and the banks it was built for."""

    key: tuple
    euclidean: List[int]
    banks: List[Tuple[FactorBank, List[List[int]]]]  # (bank, the indices of each of its chunks)
    factors: List[int]


def plan_for(tensors: GroupTensors, banks: Sequence[FactorBank], cached: Optional[StepPlan] = None) -> StepPlan:
    """The plan of ``tensors``' step, ``cached`` itself when it was built for the same parameters and banks.

    A bank is used only when every factor in it has a gradient (a bank's chunks are retracted
    whole); the factors of the other banks are loose."""
    key = (tuple(map(id, tensors.params)), tuple(map(id, banks)))
    if cached is not None and cached.key == key:
        return cached
    position = {id(p): i for i, p in enumerate(tensors.params)}
    with_grad = {id(p) for p, f in zip(tensors.params, tensors.factors) if f}
    live, covered = live_banks(banks, with_grad)
    per_bank = [(bank, [[position[id(p)] for p in chunk] for chunk in bank.chunks]) for bank in live]
    euclidean = [i for i, f in enumerate(tensors.factors) if not f]
    factors = [i for i, (p, f) in enumerate(zip(tensors.params, tensors.factors)) if f and id(p) not in covered]
    return StepPlan(key, euclidean, per_bank, factors)


def riemannian_manifold(p: torch.Tensor, retraction: str):
    """The manifold whose geometry ``mode="riemannian"`` follows for factor ``p``: its own when it
    has the canonical metric (``geoopt.Stiefel()``: canonical gradient, Cayley retraction), else
    the Euclidean-metric :class:`~stiefel_sct.manifold.Stiefel` with the group's ``retraction``."""
    manifold = getattr(p, "manifold", None)
    if isinstance(manifold, geoopt.CanonicalStiefel):
        return manifold
    return stiefel_manifold(retraction)


def run_plan(plan: StepPlan, t: GroupTensors, hp: Mapping[str, Any], *, mode: str, retraction: str, impl: str,
             retract: Retract) -> None:
    """One group's step: Adam on every unit of ``plan`` (``hp``: :func:`~stiefel_sct.optim_settings.group_hyperparameters`),
    each bank chunk retracted after its update (see the module docstring), the loose factors handed to ``retract``.
    Factors never get weight decay (shrinking an orthonormal basis means nothing on the manifold);
    ``mode="riemannian"`` gives them geoopt ``RiemannianAdam``'s update instead. Run it under
    ``torch.no_grad()``, as ``step()`` does (no decorator here: it would be a frame on every
    kernel call's path)."""
    adam = adam_kernel(impl, t.params, t.exp_avgs)
    if plan.euclidean:
        e = t.take(plan.euclidean)
        adam(*e.kernel_args(), moment_scales=e.scales, **hp)
    on_manifold = dict(hp, weight_decay=0.0, decoupled=True)
    if mode == "riemannian":
        if plan.factors:
            f = t.take(plan.factors)
            on_manifold.pop("weight_decay"), on_manifold.pop("decoupled")
            riemannian_adam([plain(x) for x in f.params], *f.kernel_args()[1:],
                            manifolds=[riemannian_manifold(x, retraction) for x in f.params], **on_manifold)
        return
    for bank, chunks in plan.banks:
        batched = bank.batches(retraction)
        for j, idx in enumerate(chunks):
            c = t.take(idx)
            adam(*c.kernel_args(), moment_scales=c.scales, **on_manifold)
            if batched:
                bank.gram(j)
            else:
                bank.retract_chunk_(j, retraction)
        if batched:
            passes = one_pass_factors(bank.grams())
            for j in range(len(chunks)):
                bank.retract_chunk_(j, retraction, passes)
    if plan.factors:
        f = t.take(plan.factors)
        adam(*f.kernel_args(), moment_scales=f.scales, **on_manifold)
        retract(plan.factors)


@torch.no_grad()
def stabilize_(t: GroupTensors, every: int, retraction: str) -> None:
    """geoopt's ``stabilize``: when a factor's step count reaches a multiple of ``every``, project
    the group's factors onto the manifold and their first moments onto the tangent space."""
    if not any(f and int(st) % every == 0 for f, st in zip(t.factors, t.steps)):
        return
    for p, m, f in zip(t.params, t.exp_avgs, t.factors):
        if f:
            manifold = riemannian_manifold(p, retraction)
            x = plain(p)
            x.copy_(manifold.projx(x))
            m.copy_(manifold.proju(x, m.to(x.dtype)))


class PreservedTriples:
    """The deferred work of ``preserve_function`` groups: the ``(U, s, V)`` of the spectral layers
    whose factors sit in such groups (cached until the optimizer's parameters change), retracted
    together after every group's update (a layer's ``s`` may sit in another group)."""

    def __init__(self) -> None:
        self._cached: Optional[Tuple[tuple, List[Triple]]] = None

    def of(self, param_groups: Sequence[Dict[str, Any]]) -> List[Triple]:
        every = [p for g in param_groups for p in g["params"]]
        key = tuple(map(id, every))
        if self._cached is None or self._cached[0] != key:
            triples, _ = spectral_triples(every)
            preserve = {id(p) for g in param_groups if g["preserve_function"] for p in g["params"]}
            self._cached = (key, [t for t in triples if id(t[0]) in preserve or id(t[2]) in preserve])
        return self._cached[1]

    def check(self, param_groups: Sequence[Dict[str, Any]], name: Callable[[int, int], str]) -> None:
        """``ValueError`` naming (``name(gi, pi)``) a factor of a ``preserve_function`` group that
        is not the ``U`` or ``V`` of a layer whose three factors are all in ``param_groups``."""
        self._cached = None
        in_triple = {id(p) for t in self.of(param_groups) for p in (t[0], t[2])}
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"] if group["preserve_function"] else ()):
                if is_stiefel(p) and id(p) not in in_triple:
                    raise ValueError(f"preserve_function=True: {name(gi, pi)} is not the U or V of a spectral "
                                     "layer whose U, s and V are all given to this optimizer")

    def retract(self, param_groups: Sequence[Dict[str, Any]], updated: Set[int]) -> None:
        """The function-preserving retraction of every layer with a factor in ``updated`` (ids)."""
        retract_triples_([t for t in self.of(param_groups) if id(t[0]) in updated or id(t[2]) in updated])

    def forget(self) -> None:
        self._cached = None
