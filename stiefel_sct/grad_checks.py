"""The step's one gradient check: sparse gradients refused, a NaN/Inf found with one read of every
gradient and named by its parameter, before anything changes."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .optim_state import local

__all__ = ["check_gradients", "first_nonfinite", "param_name"]


def _nonfinite_candidates(grads: Sequence[torch.Tensor]) -> List[int]:
    """Indices of gradients that may hold a NaN/Inf, found with one read of every gradient.

    Same-size fp32/fp64 gradients are taken in pairs, ``dot(g_i, g_j)``: the result is NaN/Inf
    whenever either holds a NaN/Inf (``Inf * 0`` is NaN too), and reading two streams at once is
    ~1.4x faster than a ``sum`` per tensor on CPU (~10x faster than an inf-norm). A finite result
    proves both finite; a non-finite one may also be an overflow of huge finite values, so the
    caller confirms each candidate exactly. The gradients are read last to first: the step then
    updates the first ones (the first bank chunks) while the cache still holds them (bench_ab,
    70B-shaped set, 8 layers, AMD EPYC: 0.990 and 0.992 of the step read first to last, 60 and
    40 rounds).
    """
    by_key: Dict[tuple, List[int]] = defaultdict(list)
    for i in range(len(grads) - 1, -1, -1):  # last first: see the docstring
        g = grads[i]
        by_key[(g.device, g.dtype, g.numel())].append(i)
    # per (device, dtype): the results stack as they are (a cast per result was ~1 us each, 840
    # of them at 80 layers of the 70B shape)
    per_kind: Dict[tuple, Tuple[list, list]] = defaultdict(lambda: ([], []))
    for (device, dtype, _), idx in by_key.items():
        values, owners = per_kind[(device, dtype)]
        flat = [grads[i].reshape(-1) for i in idx]
        paired = dtype in (torch.float32, torch.float64)
        stop = len(idx) - (len(idx) % 2) if paired else 0
        for a in range(0, stop, 2):
            values.append(torch.dot(flat[a], flat[a + 1]))
            owners.append((idx[a], idx[a + 1]))
        for a in range(stop, len(idx)):
            values.append(flat[a].sum())
            owners.append((idx[a],))
    out: List[int] = []
    for values, owners in per_kind.values():
        finite = torch.stack(values).isfinite()
        if bool(finite.all()):
            continue
        for j in (~finite).nonzero().flatten().tolist():
            out.extend(owners[j])
    return out


@torch.no_grad()
def first_nonfinite(grads: Sequence[torch.Tensor]) -> Optional[int]:
    """Index of the first tensor of ``grads`` holding a NaN or Inf, ``None`` if all are finite."""
    bad = [i for i in _nonfinite_candidates(grads) if not bool(torch.isfinite(grads[i]).all())] if grads else []
    return min(bad) if bad else None


def param_name(param_groups: Sequence[Dict[str, Any]], gi: int, pi: int) -> str:
    """How errors name parameter ``pi`` of group ``gi``: by its name where the group has
    ``param_names``, else by its position; with its shape."""
    group = param_groups[gi]
    names = group.get("param_names")
    p = group["params"][pi]
    if names:
        return f"{names[pi]!r} (shape {tuple(p.shape)})"
    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"


@torch.no_grad()
def check_gradients(param_groups: Sequence[Dict[str, Any]], check_finite: bool, process_group: Any = None) -> None:
    """Refuse sparse gradients and (``check_finite``) raise ``FloatingPointError`` naming the first
    parameter whose gradient holds a NaN/Inf. With a ``process_group`` (sharded parameters) the
    processes agree first, so all raise or none."""
    where, grads = [], []
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"SpectralAdam does not support sparse gradients: {param_name(param_groups, gi, pi)}")
            where.append((gi, pi))
            grads.append(local(p.grad))
    if not check_finite:
        return
    bad = first_nonfinite(grads)
    if process_group is not None:
        import torch.distributed as dist

        flag = torch.tensor(float(bad is not None), device=grads[0].device if grads else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
        if bad is None and bool(flag):
            raise FloatingPointError("SpectralAdam.step(): non-finite gradient (NaN or Inf) on another process; "
                                     "no parameter or optimizer state was changed")
    if bad is not None:
        raise FloatingPointError(
            f"SpectralAdam.step(): non-finite gradient (NaN or Inf) in {param_name(param_groups, *where[bad])}; "
            "no parameter or optimizer state was changed"
        )
