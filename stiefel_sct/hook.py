"""Any torch optimizer becomes an SCT optimizer: a step post-hook that retracts its Stiefel factors.

``SpectralAdam`` fuses Adam with the retraction. Users of another optimizer (``SGD``,
``Adafactor``, Lion, an 8-bit Adam, GaLore) keep it and add one line::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    handle = stiefel_retraction(opt)      # after every opt.step(): one batched QR per factor shape
    ...
    handle.remove()                       # stop retracting

The hook reads which parameters are factors from the tensors (``p.manifold``, as geoopt's
optimizers do) and imports no layer.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .checks import check_bool, renamed_argument
from .manifold import check_retraction, is_stiefel, retract_
from .optim import SpectralAdam

__all__ = ["RetractionHandle", "stiefel_retraction"]

class RetractionHandle:
    """What :func:`stiefel_retraction` returns: ``remove()`` stops the retraction; ``factors``
    lists the parameters it retracts; ``split_groups`` says how many param groups it split to
    exclude factors from weight decay (those stay split after ``remove()``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, retraction: str, split_groups: int) -> None:
        self.optimizer = optimizer
        self.retraction = retraction
        self.split_groups = split_groups
        self._cache: Optional[Tuple[tuple, List[torch.Tensor]]] = None
        self._handle = optimizer.register_step_post_hook(self._after_step)

    @property
    def factors(self) -> List[torch.Tensor]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        key = tuple(id(p) for p in params)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, [p for p in params if is_stiefel(p)])
        return self._cache[1]

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        # only factors the step can have moved: those with a gradient (torch's optimizers skip
        # the others, and retracting an untouched factor would only add rounding)
        retract_([p for p in self.factors if p.grad is not None], self.retraction)

    def remove(self) -> None:
        """Stop retracting after each step."""
        self._handle.remove()


def _exclude_from_weight_decay(optimizer: torch.optim.Optimizer) -> int:
    """Move the Stiefel factors of every group with a nonzero weight decay into a copy of the
    group without it; returns how many groups were split. A group holding only factors has its
    decay set to 0 in place. Warns (and changes nothing) where it cannot."""
    plans = []  # (group index, indices of its factors): groups whose factors feel a weight decay
    for gi, group in enumerate(optimizer.param_groups):
        decay = group.get("weight_decay")  # torch's, bitsandbytes', torchao's and GaLore's key
        factors = [i for i, p in enumerate(group["params"]) if is_stiefel(p)]
        if isinstance(decay, (int, float)) and decay != 0 and factors:
            plans.append((gi, factors))
    if not plans:
        return 0
    mixed = [plan for plan in plans if len(plan[1]) != len(optimizer.param_groups[plan[0]]["params"])]
    if mixed and any("initial_lr" in g for g in optimizer.param_groups):
        warnings.warn(
            "stiefel_retraction: an LR scheduler is already attached to this optimizer, so its param groups "
            "cannot be split to exclude the Stiefel factors from weight decay (the scheduler would not see the "
            "new group); the factors keep the weight decay. Call stiefel_retraction before creating the "
            "scheduler, or put the factors in their own group with weight_decay=0.",
            stacklevel=3,
        )
        plans = [plan for plan in plans if plan not in mixed]
    split = 0
    for gi, factors in plans:
        group = optimizer.param_groups[gi]
        if len(factors) == len(group["params"]):
            group["weight_decay"] = 0.0
            continue
        chosen = set(factors)
        new_group: Dict = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        new_group["weight_decay"] = 0.0
        new_group["params"] = [group["params"][i] for i in factors]
        if "param_names" in group:
            new_group["param_names"] = [group["param_names"][i] for i in factors]
            group["param_names"] = [n for i, n in enumerate(group["param_names"]) if i not in chosen]
        group["params"] = [p for i, p in enumerate(group["params"]) if i not in chosen]
        optimizer.add_param_group(new_group)
        split += 1
    return split


@renamed_argument("method", "retraction")
def stiefel_retraction(optimizer: torch.optim.Optimizer, retraction: str = "cholqr2", *,
                       exclude_from_weight_decay: bool = True) -> RetractionHandle:
    """Make ``optimizer`` keep its geoopt Stiefel factors on the manifold: after every
    ``optimizer.step()``, retract each factor that had a gradient (one batched factorization per
    factor shape, :func:`~stiefel_sct.manifold.retract_`).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (torch's, bitsandbytes', torchao's, GaLore's...)
            except :class:`~stiefel_sct.SpectralAdam`, which retracts by itself.
        retraction: ``"cholqr2"`` (default) or ``"qr"``; see :class:`~stiefel_sct.SpectralAdam`
            (``method=``, its old name, still works with a ``DeprecationWarning``).
        exclude_from_weight_decay: move the factors out of weight decay, which has no meaning on
            the manifold (an L2 penalty's gradient ``wd * X`` is normal to it, yet still moves
            Adam-type moments). Groups mixing factors and other parameters are split in two (the
            factors' copy has ``weight_decay=0``; optimizer state is keyed by parameter, so it
            carries over). If an LR scheduler is already attached, splitting would hide the new
            group from it: a warning says so and the decay is left as it is.

    Returns:
        a :class:`RetractionHandle`; ``handle.remove()`` stops the retraction.

    Note: like every optimizer hook, the retraction is not part of ``optimizer.state_dict()`` and
    does not survive ``copy.deepcopy(optimizer)``; call this again on the copy.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, SpectralAdam):
        raise ValueError("SpectralAdam retracts its factors itself; stiefel_retraction is for other optimizers")
    check_retraction(retraction)
    check_bool(exclude_from_weight_decay, "exclude_from_weight_decay")
    split = _exclude_from_weight_decay(optimizer) if exclude_from_weight_decay else 0
    handle = RetractionHandle(optimizer, retraction, split)
    if not handle.factors:
        warnings.warn("stiefel_retraction: the optimizer holds no geoopt Stiefel factor; nothing will be retracted",
                      stacklevel=2)
    return handle
