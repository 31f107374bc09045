"""Adam arithmetic: tensors and scalars in, updated tensors out. No manifold, no factor bank.

Four implementations with one signature, as in ``torch/optim/adam.py``:
``(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled)``

* :func:`adam_fused`: torch's fused Adam/AdamW kernels (one launch per device and dtype);
* :func:`adam_foreach`: the multi-tensor ``torch._foreach_*`` ops;
* :func:`adam_single`: one tensor at a time; also the path for moments kept in another dtype
  than their parameter (``state_dtype``), which it upcasts;
* :func:`riemannian_adam`: geoopt ``RiemannianAdam``'s update for matrices on a manifold given as
  an object with batched ``proju(x, u)`` and ``retr(x, u)`` (the caller's manifold; this module
  knows none).

``steps`` are float32 scalar tensors, incremented here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import torch

__all__ = ["ADAM_IMPLS", "adam_foreach", "adam_fused", "adam_kernel", "adam_single", "fused_supported",
           "riemannian_adam"]

TensorList = List[torch.Tensor]
AdamKernel = Callable[..., None]


def fused_supported(tensors: TensorList) -> bool:
    """Whether torch has fused Adam kernels for every tensor's device (floating point only)."""
    if not hasattr(torch, "_fused_adamw_"):
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - very old torch
        devices = {"cuda"}
    # fused CPU kernels arrived in torch 2.4
    if "cpu" in devices and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        devices.discard("cpu")
    return all(t.device.type in devices and t.is_floating_point() for t in tensors)


def _group_tensors(*lists: TensorList) -> Dict[tuple, Tuple[TensorList, ...]]:
    """Group parallel tensor lists by (device, dtype) of the first list."""
    out: Dict[tuple, Tuple[TensorList, ...]] = defaultdict(lambda: tuple([] for _ in lists))
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        for dst, t in zip(out[key], items):
            dst.append(t)
    return out


def _bias_corrections(steps: TensorList, beta1: float, beta2: float) -> Tuple[List[float], List[float]]:
    values = [float(s) for s in steps]
    return [1 - beta1**s for s in values], [1 - beta2**s for s in values]


def _same_layout(*tensors: torch.Tensor) -> bool:
    if all(t.is_contiguous() for t in tensors):  # the common case, decided in C
        return True
    first = tensors[0]
    return all(t.stride() == first.stride() for t in tensors[1:]) and _dense(first)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps or overlaps (any dimension order)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def adam_fused(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled):
    """Adam/AdamW through torch's fused kernels (``torch._fused_adam(w)_``)."""
    # torch's fused kernels walk the storages of p, g, m, v in lockstep, so they silently pair the
    # wrong elements when strides differ (e.g. a column-major factor with a row-major gradient):
    # such tensors take the foreach path instead.
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
    odd = [i for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)) if not _same_layout(p, g, m, v)]
    if odd:
        keep = sorted(set(range(len(params))) - set(odd))
        adam_foreach(*([x[i] for i in odd] for x in lists), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, decoupled=decoupled)
        lists = tuple([x[i] for i in keep] for x in lists)
    for (p, g, m, v, st) in _group_tensors(*lists).values():
        torch._foreach_add_(st, 1)
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        kernel(p, g, m, v, [], st, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None)


def adam_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled):
    """Adam/AdamW with the multi-tensor ``torch._foreach_*`` ops, per (device, dtype)."""
    for (p, g, m, v, st) in _group_tensors(params, grads, exp_avgs, exp_avg_sqs, steps).values():
        torch._foreach_add_(st, 1)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(p, 1 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, p, alpha=weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        bc1, bc2 = _bias_corrections(st, beta1, beta2)
        step_size = [-lr / b for b in bc1]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, step_size)


def adam_single(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled):
    """Adam/AdamW one tensor at a time; moments in a lower precision than their parameter are
    computed in the parameter's dtype and rounded to nearest on store."""
    for p, g, m, v, st in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        st += 1
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        low = m.dtype != p.dtype
        mc, vc = (m.to(p.dtype), v.to(p.dtype)) if low else (m, v)
        mc.lerp_(g, 1 - beta1)
        vc.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        (bc1,), (bc2,) = _bias_corrections([st], beta1, beta2)
        denom = (vc.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(mc, denom, value=-lr / bc1)
        if low:
            m.copy_(mc)
            v.copy_(vc)


ADAM_IMPLS: Dict[str, AdamKernel] = {"fused": adam_fused, "foreach": adam_foreach, "single": adam_single}


def adam_kernel(impl: str, params: TensorList, exp_avgs: TensorList) -> AdamKernel:
    """The Adam implementation to run for ``impl`` (``"fused"``, ``"foreach"`` or ``"single"``);
    moments stored in another dtype than their parameter need the per-tensor path."""
    if any(m.dtype != p.dtype for m, p in zip(exp_avgs, params)):
        impl = "single"
    return ADAM_IMPLS[impl]


def riemannian_adam(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, manifold) -> None:
    """geoopt ``RiemannianAdam`` on matrices, batched per (shape, dtype, device).

    Per matrix: ``g = proju(X, grad)``, ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) <g, g>``
    (a scalar per matrix, as geoopt), ``X' = retr(X, -lr m_hat / (sqrt(v_hat) + eps))``,
    ``m = proju(X', m)``. ``params`` must be plain tensors (their storage is written).
    """
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(tuple(p.shape), p.dtype, p.device)].append(i)
    for idx in groups.values():
        P = torch.stack([params[i] for i in idx])
        G = torch.stack([grads[i] for i in idx])
        M = torch.stack([exp_avgs[i] for i in idx])
        V = torch.stack([exp_avg_sqs[i] for i in idx])
        st = [steps[i] for i in idx]
        torch._foreach_add_(st, 1)
        bc1, bc2 = _bias_corrections(st, beta1, beta2)
        bc1 = torch.tensor(bc1, dtype=P.dtype, device=P.device).view(-1, 1, 1)
        bc2 = torch.tensor(bc2, dtype=P.dtype, device=P.device).view(-1, 1, 1)
        rgrad = manifold.proju(P, G)
        M.mul_(beta1).add_(rgrad, alpha=1 - beta1)
        # geoopt's second moment is the manifold inner product <g, g>: one squared Frobenius norm
        # per matrix, broadcast over the (n, k) state (so the step is rotation-equivariant).
        V.mul_(beta2).add_(rgrad.square().sum(dim=(-2, -1), keepdim=True), alpha=1 - beta2)
        direction = (M / bc1) / (V / bc2).sqrt_().add_(eps)
        P_new = manifold.retr(P, -lr * direction)
        M = manifold.proju(P_new, M)
        torch._foreach_copy_([params[i] for i in idx], list(P_new.unbind(0)))
        torch._foreach_copy_([exp_avgs[i] for i in idx], list(M.unbind(0)))
        torch._foreach_copy_([exp_avg_sqs[i] for i in idx], list(V.unbind(0)))
