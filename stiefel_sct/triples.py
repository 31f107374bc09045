"""Which ``(U, s, V)`` belong together: written by the spectral layers, read by whoever needs a
layer's three factors while holding only parameters (the optimizer's function-preserving
retraction, :func:`~stiefel_sct.manifold.retract_all`, FSDP2 sharding).

torch optimizers see only parameter groups, so the grouping cannot come from the module tree.
It lives here, in a module that imports no layer: an owner is any object with attributes ``U``,
``s`` and ``V`` that calls :func:`register_factors` whenever it (re)binds them.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Triple", "owner_of", "register_factors", "spectral_triples"]

Triple = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
FACTOR_NAMES: Tuple[str, str, str] = ("U", "s", "V")

# id(factor) -> (weak ref to the factor, weak ref to its owner). Weak both ways (the registry keeps
# nothing alive; an entry leaves with its factor). Keyed by id because tensors compare elementwise,
# which rules out a WeakKeyDictionary.
_OWNERS: Dict[int, Tuple[weakref.ref, weakref.ref]] = {}


def _register(param: torch.Tensor, owner: object) -> None:
    key = id(param)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _OWNERS.get(key, (None,))[0] is ref:
            del _OWNERS[key]

    _OWNERS[key] = (weakref.ref(param, forget), weakref.ref(owner))


def register_factors(owner: object) -> None:
    """Record ``owner`` as the holder of its current ``U``, ``s`` and ``V`` (those not ``None``).

    Call again whenever the attributes are rebound to new tensors (``Module._apply``, a copy,
    ``fully_shard``): the registry is keyed by tensor identity.
    """
    for name in FACTOR_NAMES:
        p = getattr(owner, name, None)
        if isinstance(p, torch.Tensor):
            _register(p, owner)


def owner_of(param: torch.Tensor) -> Optional[object]:
    """The object that registered ``param`` as one of its factors (``None`` if none is alive)."""
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1]()


def spectral_triples(params: Sequence[torch.Tensor]) -> Tuple[List[Triple], List[torch.Tensor]]:
    """Split ``params`` into the ``(U, s, V)`` triples whose three members are all in ``params``
    and the rest. A triple is listed once, in the order its first member appears."""
    given = {id(p) for p in params}
    triples: List[Triple] = []
    seen: set = set()
    covered: set = set()
    for p in params:
        owner = owner_of(p)
        if owner is None or id(owner) in seen:
            continue
        triple = tuple(getattr(owner, name) for name in FACTOR_NAMES)
        if any(t is p for t in triple) and all(id(t) in given for t in triple):
            seen.add(id(owner))
            triples.append((triple[0], triple[1], triple[2]))
            covered.update(id(t) for t in triple)
    return triples, [p for p in params if id(p) not in covered]
