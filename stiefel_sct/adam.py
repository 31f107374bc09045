"""Adam arithmetic: tensors and scalars in, updated tensors out. No manifold, no factor bank.

Four implementations with one signature, as in ``torch/optim/adam.py``:
``(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, amsgrad, lr, beta1, beta2, eps,
weight_decay, decoupled, maximize, moment_scales=None)`` (``max_exp_avg_sqs`` is read only with
``amsgrad``; ``maximize`` ascends; ``moment_scales``: the block scales of 8-bit moments)

* :func:`adam_fused`: torch's fused Adam/AdamW kernels (one launch per device and dtype);
* :func:`adam_foreach`: the multi-tensor ``torch._foreach_*`` ops;
* :func:`adam_single`: one tensor at a time; also the path for moments kept in another dtype
  than their parameter (``state_dtype``: bf16, which it upcasts; uint8, blockwise 8-bit codes of
  :mod:`stiefel_sct.quant`, which it decodes and re-encodes);
* :func:`riemannian_adam`: geoopt ``RiemannianAdam``'s update for matrices on manifolds given as
  objects with geoopt's batched ``egrad2rgrad``, ``component_inner`` and ``retr_transp`` (the
  caller's manifolds; this module knows none).

``steps`` are float32 scalar tensors, incremented here.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import torch

from .quant import BLOCK, dequantize, quantize_

__all__ = ["ADAM_IMPLS", "adam_foreach", "adam_fused", "adam_kernel", "adam_single", "fused_supported",
           "riemannian_adam"]

TensorList = List[torch.Tensor]
AdamKernel = Callable[..., None]


def fused_devices() -> List[str]:
    """The device types torch has fused Adam kernels for (in torch's order; empty without them)."""
    if not hasattr(torch, "_fused_adamw_"):
        return []
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = list(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - very old torch
        devices = ["cuda"]
    # fused CPU kernels arrived in torch 2.4
    if "cpu" in devices and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        devices.remove("cpu")
    return devices


@functools.cache
def _fused_device_types() -> frozenset:
    return frozenset(fused_devices())


def fused_supported(tensors: TensorList) -> bool:
    """Whether torch has fused Adam kernels for every tensor's device (floating point only)."""
    devices = _fused_device_types()
    return bool(devices) and all(t.device.type in devices and t.is_floating_point() for t in tensors)


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


def _one_kind(params: TensorList, *others: TensorList) -> bool:
    """Whether every tensor is contiguous and the parameters share one device and dtype: then the
    fused kernel takes the lists as they are, without the per-tensor regrouping (measured: ~16 us of
    Python per call; the step makes one call per factor-bank chunk, 230 at 80 layers of the 70B shape)."""
    if not params:
        return True
    device, dtype = params[0].device, params[0].dtype
    return (all(p.is_contiguous() and p.device == device and p.dtype == dtype for p in params)
            and all(t.is_contiguous() for ts in others for t in ts))


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps or overlaps (any dimension order)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _negated(grads: TensorList, maximize: bool) -> TensorList:
    return list(torch._foreach_neg(grads)) if maximize and grads else grads


def adam_fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, amsgrad, lr, beta1, beta2, eps,
               weight_decay, decoupled, maximize, moment_scales=None):
    """Adam/AdamW through torch's fused kernels (``torch._fused_adam(w)_``)."""
    # torch's fused kernels walk the storages of p, g, m, v in lockstep, so they silently pair the
    # wrong elements when strides differ (e.g. a column-major factor with a row-major gradient):
    # such tensors take the foreach path instead.
    hp = dict(amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              decoupled=decoupled, maximize=maximize)
    maxes = max_exp_avg_sqs if amsgrad else [None] * len(params)
    lists = (params, grads, exp_avgs, exp_avg_sqs, maxes, steps)
    if _one_kind(params, grads, exp_avgs, exp_avg_sqs):  # a bank chunk, or any usual list: one call
        groups: List[Tuple[TensorList, ...]] = [lists] if params else []
    else:
        odd = [i for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs))
               if not _same_layout(p, g, m, v)]
        if odd:
            keep = sorted(set(range(len(params))) - set(odd))
            p, g, m, v, mx, st = ([x[i] for i in odd] for x in lists)
            adam_foreach(p, g, m, v, mx if amsgrad else [], st, **hp)
            lists = tuple([x[i] for i in keep] for x in lists)
        groups = list(_group_tensors(*lists).values())
    for (p, g, m, v, mx, st) in groups:
        torch._foreach_add_(st, 1)
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        kernel(p, g, m, v, mx if amsgrad else [], st, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, eps=eps, maximize=maximize, grad_scale=None, found_inf=None)


def adam_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, amsgrad, lr, beta1, beta2, eps,
                 weight_decay, decoupled, maximize, moment_scales=None):
    """Adam/AdamW with the multi-tensor ``torch._foreach_*`` ops, per (device, dtype)."""
    maxes = max_exp_avg_sqs if amsgrad else [None] * len(params)
    for (p, g, m, v, mx, st) in _group_tensors(params, grads, exp_avgs, exp_avg_sqs, maxes, steps).values():
        torch._foreach_add_(st, 1)
        g = _negated(g, maximize)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(p, 1 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, p, alpha=weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        if amsgrad:
            torch._foreach_maximum_(mx, v)
        bc1, bc2 = _bias_corrections(st, beta1, beta2)
        step_size = [-lr / b for b in bc1]
        denom = torch._foreach_sqrt(mx if amsgrad else v)
        torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, step_size)


def adam_single(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, amsgrad, lr, beta1, beta2, eps,
                weight_decay, decoupled, maximize, moment_scales=None):
    """Adam/AdamW one tensor at a time.

    Moments in a lower precision than their parameter are computed in the parameter's dtype and
    rounded to nearest on store; uint8 moments are blockwise 8-bit codes (:mod:`stiefel_sct.quant`)
    whose scales come in ``moment_scales`` = ``(exp_avg scales, exp_avg_sq scales, max_exp_avg_sq
    scales)``, parallel to ``params``.
    """
    n = len(params)
    maxes = max_exp_avg_sqs if amsgrad else [None] * n
    scales = moment_scales if moment_scales is not None else ([None] * n, [None] * n, [None] * n)
    for i, (p, g, m, v, mx, st) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, maxes, steps)):
        st += 1
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        (bc1,), (bc2,) = _bias_corrections([st], beta1, beta2)
        if m.dtype == torch.uint8 and p.is_contiguous():
            # 8-bit moments: a pass per chunk of the flattened tensor, so the decoded fp32 copies
            # are a few hundred KB, not several of the parameter's size (the 70B-shaped step's
            # embedding factor is 4.1M elements: ~16 MB per temporary without chunks)
            flat = [p.view(-1), g.reshape(-1), m.view(-1), v.view(-1), mx.view(-1) if amsgrad else None]
            for a in range(0, p.numel(), _CHUNK_8BIT):
                sl, bl = slice(a, a + _CHUNK_8BIT), slice(a // BLOCK, (a + _CHUNK_8BIT) // BLOCK)
                codes = [(flat[2][sl], scales[0][i][bl], True), (flat[3][sl], scales[1][i][bl], False)]
                if amsgrad:
                    codes.append((flat[4][sl], scales[2][i][bl], False))
                _adam_update(flat[0][sl], flat[1][sl], codes, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
                             eps=eps, bc1=bc1, bc2=bc2)
            continue
        stored = [(m, scales[0][i], True), (v, scales[1][i], False)] + ([(mx, scales[2][i], False)] if amsgrad else [])
        _adam_update(p, g, stored, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2, eps=eps, bc1=bc1, bc2=bc2)


_CHUNK_8BIT = 1 << 16  # elements per pass over 8-bit moments (a multiple of quant.BLOCK)


def _adam_update(p, g, stored, *, amsgrad, lr, beta1, beta2, eps, bc1, bc2) -> None:
    """One Adam update of ``p`` from ``g`` (weight decay and ``maximize`` already applied);
    ``stored`` = ``[(moment, scales, signed)]`` for ``exp_avg``, ``exp_avg_sq`` (and
    ``max_exp_avg_sq``), read in ``p``'s dtype and written back in their own."""
    mc, vc, *mxc = (_load(t, sc, signed, p.dtype) for t, sc, signed in stored)
    mc.lerp_(g, 1 - beta1)
    vc.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if amsgrad:
        torch.maximum(mxc[0], vc, out=mxc[0])
    denom = ((mxc[0] if amsgrad else vc).sqrt() / math.sqrt(bc2)).add_(eps)
    p.addcdiv_(mc, denom, value=-lr / bc1)
    for (t, sc, signed), value in zip(stored, [mc, vc, *mxc]):
        _store(t, sc, signed, value)


def _load(t: torch.Tensor, scales, signed: bool, dtype: torch.dtype) -> torch.Tensor:
    """A moment in the compute dtype ``dtype``: itself, an upcast copy, or its 8-bit codes decoded."""
    if t.dtype == torch.uint8:
        return dequantize(t, scales, signed, dtype)
    return t.to(dtype) if t.dtype != dtype else t


def _store(t: torch.Tensor, scales, signed: bool, value: torch.Tensor) -> None:
    if t.dtype == torch.uint8:
        quantize_(value, t, scales, signed)
    elif value is not t:
        t.copy_(value)


ADAM_IMPLS: Dict[str, AdamKernel] = {"fused": adam_fused, "foreach": adam_foreach, "single": adam_single}


def adam_kernel(impl: str, params: TensorList, exp_avgs: TensorList) -> AdamKernel:
    """The Adam implementation to run for ``impl`` (``"fused"``, ``"foreach"`` or ``"single"``);
    moments stored in another dtype than their parameter (bf16, 8-bit) need the per-tensor path."""
    if any(m.dtype != p.dtype for m, p in zip(exp_avgs, params)):
        impl = "single"
    return ADAM_IMPLS[impl]


def riemannian_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, amsgrad, lr, beta1, beta2,
                    eps, maximize, manifolds) -> None:
    """geoopt ``RiemannianAdam`` on matrices, batched per (manifold, shape, dtype, device).

    ``manifolds[i]`` is the manifold object of ``params[i]`` (anything with geoopt's batched
    ``egrad2rgrad(x, u)``, ``component_inner(x, u)`` and ``retr_transp(x, u, v)``; this module
    knows none). Per matrix: ``g = egrad2rgrad(X, +-grad)``, ``m = b1 m + (1 - b1) g``,
    ``v = b2 v + (1 - b2) <g, g>_X`` (one inner product per matrix, as geoopt, broadcast over the
    state), ``amsgrad``: the running maximum of ``v`` normalises, ``X', m' = retr_transp(X,
    -lr m_hat / (sqrt(v_hat) + eps), m)``. ``params`` must be plain tensors (their storage is
    written). Moments kept in a lower precision are computed in the parameter's dtype.
    """
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(id(manifolds[i]), tuple(p.shape), p.dtype, p.device)].append(i)
    for idx in groups.values():
        manifold = manifolds[idx[0]]
        P = torch.stack([params[i] for i in idx])
        G = torch.stack([grads[i] for i in idx]).to(P.dtype)
        M = torch.stack([exp_avgs[i] for i in idx]).to(P.dtype)
        V = torch.stack([exp_avg_sqs[i] for i in idx]).to(P.dtype)
        st = [steps[i] for i in idx]
        torch._foreach_add_(st, 1)
        corrections = _bias_corrections(st, beta1, beta2)
        bc1, bc2 = (torch.tensor(c, dtype=P.dtype, device=P.device).view(-1, 1, 1) for c in corrections)
        rgrad = manifold.egrad2rgrad(P, G.neg_() if maximize else G)
        M.mul_(beta1).add_(rgrad, alpha=1 - beta1)
        # geoopt's second moment is the manifold inner product <g, g>: one number per matrix,
        # broadcast over the (n, k) state (so the step is rotation-equivariant).
        V.mul_(beta2).add_(manifold.component_inner(P, rgrad), alpha=1 - beta2)
        if amsgrad:
            MX = torch.maximum(torch.stack([max_exp_avg_sqs[i] for i in idx]).to(P.dtype), V)
            torch._foreach_copy_([max_exp_avg_sqs[i] for i in idx], list(MX.unbind(0)))
        direction = (M / bc1) / ((MX if amsgrad else V) / bc2).sqrt_().add_(eps)
        P_new, M = manifold.retr_transp(P, -lr * direction, M)
        torch._foreach_copy_([params[i] for i in idx], list(P_new.unbind(0)))
        torch._foreach_copy_([exp_avgs[i] for i in idx], list(M.unbind(0)))
        torch._foreach_copy_([exp_avg_sqs[i] for i in idx], list(V.unbind(0)))
