"""SpectralAdam: Adam(W) for spectral factors, fused with a batched Stiefel retraction.

Layout follows ``torch/optim/adam.py``: a functional core (:func:`spectral_adam`) with a fused,
a foreach and a single-tensor implementation of the Adam update, and a thin
:class:`torch.optim.Optimizer` around it that owns argument checks, state and param groups.

Parameters are split per group into

* Euclidean parameters (plain tensors, e.g. ``s`` and biases): Adam / AdamW, numerically the same
  as ``torch.optim.Adam`` / ``torch.optim.AdamW``;
* Stiefel factors (any :class:`geoopt.ManifoldParameter` on a geoopt Stiefel manifold):
  ``mode="sct"``: the same Adam update as if Euclidean, then a QR retraction (the SCT paper's
  method); ``mode="riemannian"``: geoopt ``RiemannianAdam`` semantics (Euclidean-metric tangent
  projection, retraction, first moment transported by projection). Weight decay never applies to
  them: shrinking an orthonormal basis means nothing on the manifold.

Retractions are batched: all factors of one (shape, dtype, device) are factorized by one call.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import geoopt
import torch
from torch.optim import Optimizer

from .layers import spectral_triples
from .manifold import RETRACTIONS, _plain, is_stiefel, retract, retract_, retract_into, retract_triples_

__all__ = ["MODES", "FactorBank", "SpectralAdam", "retract_all", "spectral_adam"]

MODES: Tuple[str, ...] = ("sct", "riemannian")

TensorList = List[torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _dtensor_type() -> tuple:
    """``(DTensor,)``, or ``()`` for a torch without distributed; imported once, on first use."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return (DTensor,)


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor_type())


def _fused_supported(tensors: TensorList) -> bool:
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


def _adam_fused(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled):
    # torch's fused kernels walk the storages of p, g, m, v in lockstep, so they silently pair the
    # wrong elements when strides differ (e.g. a column-major factor with a row-major gradient):
    # such tensors take the foreach path instead.
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
    odd = [i for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)) if not _same_layout(p, g, m, v)]
    if odd:
        keep = sorted(set(range(len(params))) - set(odd))
        _adam_foreach(*([x[i] for i in odd] for x in lists), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled=decoupled)
        lists = tuple([x[i] for i in keep] for x in lists)
    for (p, g, m, v, st) in _group_tensors(*lists).values():
        torch._foreach_add_(st, 1)
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        kernel(p, g, m, v, [], st, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None)


def _adam_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled):
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


def _adam_single(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled):
    for p, g, m, v, st in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        st += 1
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        low = m.dtype != p.dtype  # moments stored in lower precision: compute in p's dtype, round on store
        mc, vc = (m.to(p.dtype), v.to(p.dtype)) if low else (m, v)
        mc.lerp_(g, 1 - beta1)
        vc.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        (bc1,), (bc2,) = _bias_corrections([st], beta1, beta2)
        denom = (vc.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(mc, denom, value=-lr / bc1)
        if low:
            m.copy_(mc)
            v.copy_(vc)


_ADAM_IMPLS = {"fused": _adam_fused, "foreach": _adam_foreach, "single": _adam_single}


def _adam_kernel(impl: str, params: TensorList, exp_avgs: TensorList):
    """The Adam implementation to run; moments stored in another dtype than their parameter
    (``state_dtype``) need the per-tensor path, which upcasts them."""
    if any(m.dtype != p.dtype for m, p in zip(exp_avgs, params)):
        impl = "single"
    return _ADAM_IMPLS[impl]


def _riemannian_adam(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, method):
    """geoopt ``RiemannianAdam`` on Euclidean-metric Stiefel factors, batched per shape.

    Per matrix: ``g = proj_X(grad)``, ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) <g, g>``
    (a scalar per matrix, as geoopt), ``X' = R(X - lr m_hat / (sqrt(v_hat) + eps))``,
    ``m = proj_X'(m)``.
    """
    groups = defaultdict(list)
    for i, p in enumerate(params):
        groups[(tuple(p.shape), p.dtype, p.device)].append(i)
    for idx in groups.values():
        P = torch.stack([_plain(params[i]) for i in idx])
        G = torch.stack([grads[i] for i in idx])
        M = torch.stack([exp_avgs[i] for i in idx])
        V = torch.stack([exp_avg_sqs[i] for i in idx])
        st = [steps[i] for i in idx]
        torch._foreach_add_(st, 1)
        bc1, bc2 = _bias_corrections(st, beta1, beta2)
        bc1 = torch.tensor(bc1, dtype=P.dtype, device=P.device).view(-1, 1, 1)
        bc2 = torch.tensor(bc2, dtype=P.dtype, device=P.device).view(-1, 1, 1)
        rgrad = _proju(P, G)
        M.mul_(beta1).add_(rgrad, alpha=1 - beta1)
        # geoopt's second moment is the manifold inner product <g, g>: one squared Frobenius norm
        # per matrix, broadcast over the (n, k) state (so the step is rotation-equivariant).
        V.mul_(beta2).add_(rgrad.square().sum(dim=(-2, -1), keepdim=True), alpha=1 - beta2)
        direction = (M / bc1) / (V / bc2).sqrt_().add_(eps)
        P_new = retract(P - lr * direction, method)
        M = _proju(P_new, M)
        torch._foreach_copy_([_plain(params[i]) for i in idx], list(P_new.unbind(0)))
        torch._foreach_copy_([exp_avgs[i] for i in idx], list(M.unbind(0)))
        torch._foreach_copy_([exp_avg_sqs[i] for i in idx], list(V.unbind(0)))


def _proju(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Projection onto the tangent space of the Euclidean-metric Stiefel manifold at ``x``."""
    xtu = x.mT @ u
    return u - x @ ((xtu + xtu.mT) / 2)


def spectral_adam(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    steps: TensorList,
    stiefel: List[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    mode: str,
    retraction: str,
    impl: str,
    banks: Sequence["FactorBank"] = (),
    in_bank: Optional[List[bool]] = None,
    retract_factors: bool = True,
) -> None:
    """Functional SpectralAdam step over parallel lists; ``stiefel[i]`` marks manifold factors.

    ``steps`` are float32 scalar tensors, incremented here. ``impl`` is ``"fused"``,
    ``"foreach"`` or ``"single"`` (the Adam update's implementation).

    ``banks`` hold some of the factors (``in_bank[i]`` marks them) in contiguous chunk slots: in
    ``"sct"`` mode each is retracted by one batched factorization per chunk, with no
    stacking and no copy back (:class:`FactorBank`). Factors not in a bank are stacked per shape
    and retracted by :func:`retract_`. ``retract_factors=False`` (``"sct"`` mode): the factors get
    the Adam update only; the caller retracts them (the function-preserving retraction does).
    """
    adam = _adam_kernel(impl, params, exp_avgs)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    euc = [i for i, s in enumerate(stiefel) if not s]
    man = [i for i, s in enumerate(stiefel) if s]
    pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
    if euc:
        adam(*(pick(x, euc) for x in (params, grads, exp_avgs, exp_avg_sqs, steps)),
             weight_decay=weight_decay, decoupled=decoupled_weight_decay, **hp)
    if not man:
        return
    if mode != "sct":
        _riemannian_adam(*(pick(x, man) for x in (params, grads, exp_avgs, exp_avg_sqs, steps)), method=retraction, **hp)
        return
    loose = man if in_bank is None or not retract_factors else [i for i in man if not in_bank[i]]
    if loose:
        adam(*(pick(x, loose) for x in (params, grads, exp_avgs, exp_avg_sqs, steps)),
             weight_decay=0.0, decoupled=True, **hp)
        if retract_factors:
            retract_(pick(params, loose), retraction)
    if not retract_factors:
        return
    if banks:
        # chunk by chunk: the Adam update leaves the chunk in cache for the retraction's GEMMs
        position = {id(p): i for i, p in enumerate(params)}
        for bank in banks:
            for j, chunk in enumerate(bank.chunks):
                idx = [position[id(p)] for p in chunk]
                adam(*(pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, steps)),
                     weight_decay=0.0, decoupled=True, **hp)
                bank.retract_chunk_(j, retraction)


def _nonfinite_candidates(grads: TensorList) -> List[int]:
    """Indices of gradients that may hold a NaN/Inf, found with one read of every gradient.

    Same-size fp32/fp64 gradients are taken in pairs, ``dot(g_i, g_j)``: the result is NaN/Inf
    whenever either holds a NaN/Inf (``Inf * 0`` is NaN too), and reading two streams at once is
    ~1.4x faster than a ``sum`` per tensor on CPU (~10x faster than an inf-norm). A finite result
    proves both finite; a non-finite one may also be an overflow of huge finite values, so the
    caller confirms each candidate exactly.
    """
    by_key: Dict[tuple, List[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        by_key[(g.device, g.dtype, g.numel())].append(i)
    per_device: Dict[torch.device, Tuple[list, list]] = defaultdict(lambda: ([], []))
    for (device, dtype, _), idx in by_key.items():
        values, owners = per_device[device]
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
    for values, owners in per_device.values():
        finite = torch.stack([v.float() for v in values]).isfinite()
        if bool(finite.all()):
            continue
        for j in (~finite).nonzero().flatten().tolist():
            out.extend(owners[j])
    return out


class FactorBank:
    """Same-shape Stiefel factors kept in contiguous chunk slots, retracted without copies.

    ``S = ceil(G / c) + 1`` slots of ``c`` matrices each (``c`` from ``chunk_bytes``): chunk ``j``
    of the factors lives in one slot, one slot is spare. The retraction of chunk ``j`` reads its
    slot and writes the result straight into the spare slot (one batched factorization,
    :func:`~stiefel_sct.manifold.retract_into`), the chunk's parameters are re-pointed there
    (``p.data``; values and identity unchanged) and the old slot becomes the spare. So the
    factorization runs on the parameters' own memory: no ``torch.stack``, no copy back, one chunk
    of extra memory. Slots are allocated one at a time when the bank is built, each right before
    its factors move in and free their old storage, so building never holds a second copy of
    the factors either.
    """

    def __init__(self, params: List[torch.Tensor], chunk_bytes: int = 32 << 20) -> None:
        first = params[0]
        per_matrix = first.numel() * first.element_size()
        c = max(1, min(len(params), chunk_bytes // per_matrix))
        n_chunks = -(-len(params) // c)
        self.params = params
        self.chunks = [params[j * c:(j + 1) * c] for j in range(n_chunks)]
        self.slots: List[torch.Tensor] = []
        with torch.no_grad():
            for chunk in self.chunks:
                slot = torch.empty((c,) + tuple(first.shape), dtype=first.dtype, device=first.device)
                views = slot[: len(chunk)].unbind(0)
                torch._foreach_copy_(list(views), [_plain(p) for p in chunk])
                for p, v in zip(chunk, views):
                    p.data = v
                self.slots.append(slot)
        self.slots.append(torch.empty_like(self.slots[0]))  # the spare
        self.slot_of = list(range(n_chunks))
        self.spare = n_chunks
        self.ids = {id(p) for p in params}
        self._ptrs = [p.data_ptr() for p in params]
        self._workspace: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # fp32, low-precision banks

    def intact(self) -> bool:
        """False once something else re-homed a factor (``model.to(...)``, ``p.data = ...``)."""
        first, slot = self.params[0], self.slots[0]
        return (
            first.device == slot.device and first.dtype == slot.dtype
            and all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._ptrs))
        )

    @torch.no_grad()
    def retract_chunk_(self, j: int, method: str) -> None:
        """Retract chunk ``j`` into the spare slot and re-point its parameters there."""
        chunk = self.chunks[j]
        b = len(chunk)
        dst = self.slots[self.spare][:b]
        if dst.dtype not in (torch.float32, torch.float64) and self._workspace is None:
            self._workspace = tuple(torch.empty(self.slots[0].shape, dtype=torch.float32, device=dst.device)
                                    for _ in range(2))
        retract_into(self.slots[self.slot_of[j]][:b], dst, method, self._workspace)
        for p, v in zip(chunk, dst.unbind(0)):
            p.data = v
        self.slot_of[j], self.spare = self.spare, self.slot_of[j]
        start = j * len(self.chunks[0])  # every chunk but the last is full
        self._ptrs[start:start + b] = [p.data_ptr() for p in chunk]

    def retract_(self, method: str) -> None:
        """Retract every factor of the bank."""
        for j in range(len(self.chunks)):
            self.retract_chunk_(j, method)


# ---------------------------------------------------------------------------------------------
# Optimizer class
# ---------------------------------------------------------------------------------------------
def _check_float(value, name: str, low: float, high: Optional[float] = None, *, high_open: bool = True) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and value >= low and (high is None or (value < high if high_open else value <= high))
    if not ok:
        rng = f"[{low}, {high})" if high is not None and high_open else f"[{low}, {high}]" if high is not None else f"[{low}, inf)"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def _group_hyperparameters(group: dict) -> dict:
    """A param group's settings as :func:`spectral_adam` keywords (all but ``mode``/``impl``)."""
    beta1, beta2 = group["betas"]
    return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"], retraction=group["retraction"])


def _check_group(group: dict) -> None:
    group["lr"] = _check_float(group["lr"], "lr", 0.0)
    group["eps"] = _check_float(group["eps"], "eps", 0.0)
    group["weight_decay"] = _check_float(group["weight_decay"], "weight_decay", 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    group["betas"] = (_check_float(betas[0], "betas[0]", 0.0, 1.0), _check_float(betas[1], "betas[1]", 0.0, 1.0))
    if group["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {group['mode']!r}")
    if group["retraction"] not in RETRACTIONS:
        raise ValueError(f"retraction must be one of {RETRACTIONS}, got {group['retraction']!r}")
    if group["preserve_function"] is True and group["mode"] != "sct":
        raise ValueError("preserve_function=True needs mode='sct'")
    for flag in ("decoupled_weight_decay", "preserve_function"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {type(group[flag]).__name__}")
    for i, p in enumerate(group["params"]):
        if isinstance(p, geoopt.ManifoldTensor) and not is_stiefel(p) and not isinstance(p.manifold, geoopt.Euclidean):
            raise TypeError(
                f"SpectralAdam supports Euclidean parameters and geoopt Stiefel ManifoldParameters; "
                f"param {i} of a group lies on {p.manifold!r}. Use geoopt.optim.RiemannianAdam for other manifolds."
            )
        if p.is_complex():
            raise TypeError(f"SpectralAdam does not support complex parameters (param {i} of a group)")
        if is_stiefel(p) and (p.dim() != 2 or p.shape[-1] > p.shape[-2]):
            raise ValueError(f"Stiefel factor {i} of a group must be a tall matrix (n, k) with k <= n, got {tuple(p.shape)}")


class SpectralAdam(Optimizer):
    """Adam(W) that keeps geoopt Stiefel factors on their manifold; a drop-in for torch's Adam.

    Args:
        params: iterable of parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate, ``>= 0`` (default ``1e-3``).
        betas: moment coefficients, each in ``[0, 1)`` (default ``(0.9, 0.999)``).
        eps: denominator term, ``>= 0`` (default ``1e-8``).
        weight_decay: ``>= 0``; applied to Euclidean parameters only (default ``0``).
        decoupled_weight_decay: ``True`` = AdamW's decoupled decay, ``False`` = Adam's L2 penalty.
        mode: ``"sct"`` (Adam step, then retraction; the paper's method) or ``"riemannian"``
            (geoopt ``RiemannianAdam`` semantics) for Stiefel factors.
        retraction: ``"cholqr2"`` (default: adaptive CholeskyQR, one GEMM pass when the factor is
            near the manifold, a second when not, Householder QR for rank-deficient input) or
            ``"qr"`` (Householder, sign-fixed). Both give the same Q (the thin QR with positive
            ``diag(R)`` is unique); CholeskyQR runs at GEMM speed: ~5x faster here, and as
            accurate (orthonormality error 4.7e-7 vs 6.2e-7 in fp32).
        foreach: use the multi-tensor implementation (``None``: choose the fastest available).
        fused: use torch's fused Adam kernel (``None``: where the device supports it).
        check_finite: before touching anything, check every gradient is finite and raise a
            ``FloatingPointError`` naming the offending parameter (one fused reduction per step).
        contiguous_factors: in ``"sct"`` groups, keep the Stiefel factors of each shape in one
            buffer (:class:`FactorBank`; the parameters become views of it and are re-pointed
            within it at each step; their values, identity and ``state_dict`` are unchanged) so
            the retraction runs batched on the buffer, without stacking or copying. Disable if
            something else owns the parameters' storage.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` (default: the parameter's). ``torch.bfloat16``
            halves optimizer memory; the update is computed in the parameter's dtype and the moments
            are rounded to nearest on store.
        step_in_backward: apply each parameter's Adam update inside ``backward()``, as soon as its
            gradient is accumulated (``register_post_accumulate_grad_hook``), then free the
            gradient: no gradient of the whole model is ever held. ``step()`` then only retracts
            the factors updated during backward (batched, as usual). The NaN/Inf check is per
            parameter in this mode: a bad gradient raises inside ``backward()`` before *that*
            parameter changes, but parameters updated earlier in the same backward stay updated.

        preserve_function: retract each spectral layer's ``(U, s, V)`` together so that its
            weight ``U diag(s) V^T`` is kept to rounding (the ``R`` factors of the QRs are folded
            into a re-diagonalised ``s``: :func:`~stiefel_sct.manifold.preserving_retraction`)
            instead of dropping ``R``, which moves the weight at every step. Every Stiefel factor
            of such a group must belong to a ``SpectralLinear``/``SpectralEmbedding`` whose
            ``U``, ``s`` and ``V`` are all given to this optimizer. Costs a Householder QR per
            factor and a ``k x k`` SVD per layer (batched by layer shape).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (the same as ``torch.optim.Adam``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        mode: str = "sct",
        retraction: str = "cholqr2",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        check_finite: bool = True,
        contiguous_factors: bool = True,
        state_dtype: Optional[torch.dtype] = None,
        step_in_backward: bool = False,
        preserve_function: bool = False,
    ) -> None:
        if fused and foreach:
            raise ValueError("fused and foreach cannot both be True")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, mode=mode, retraction=retraction,
            preserve_function=preserve_function,
        )
        _check_group(dict(defaults, params=[]))
        self.foreach = foreach
        self.fused = fused
        self.check_finite = bool(check_finite)
        self.contiguous_factors = bool(contiguous_factors)
        if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating-point torch.dtype or None, got {state_dtype!r}")
        self.state_dtype = state_dtype
        self.step_in_backward = bool(step_in_backward)
        self._pending: Dict[int, List[torch.Tensor]] = defaultdict(list)
        self._hooks: list = []
        self._banks: Dict[int, Tuple[tuple, List[FactorBank]]] = {}
        self._triples: Optional[Tuple[tuple, list]] = None
        super().__init__(params, defaults)
        self._check_triples()
        self._ready = True
        if self.step_in_backward:
            if any(g["mode"] != "sct" for g in self.param_groups):
                raise ValueError("step_in_backward supports mode='sct' only")
            self._register_hooks()
        if fused:
            every = [p for g in self.param_groups for p in g["params"]]
            if not _fused_supported(every):
                raise RuntimeError("fused=True needs floating-point parameters on a device with fused Adam kernels")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])
        if getattr(self, "_ready", False):  # __init__ checks once, after every group is in
            self._check_triples()

    # ---------------------------------------------------------------- function-preserving retraction
    def _layer_triples(self) -> list:
        """``(U, s, V)`` of the spectral layers whose factors sit in ``preserve_function`` groups."""
        every = [p for g in self.param_groups for p in g["params"]]
        key = tuple(id(p) for p in every)
        if self._triples is None or self._triples[0] != key:
            triples, _ = spectral_triples(every)
            preserve = {id(p) for g in self.param_groups if g["preserve_function"] for p in g["params"]}
            self._triples = (key, [t for t in triples if id(t[0]) in preserve or id(t[2]) in preserve])
        return self._triples[1]

    def _check_triples(self) -> None:
        self._triples = None
        in_triple = {id(p) for t in self._layer_triples() for p in (t[0], t[2])}
        for gi, group in enumerate(self.param_groups):
            if not group["preserve_function"]:
                continue
            for pi, p in enumerate(group["params"]):
                if is_stiefel(p) and id(p) not in in_triple:
                    raise ValueError(
                        f"preserve_function=True: {self._param_name(gi, pi)} is not the U or V of a spectral layer "
                        "whose U, s and V are all given to this optimizer"
                    )

    def _retract_triples(self, updated: set) -> None:
        retract_triples_([t for t in self._layer_triples() if id(t[0]) in updated or id(t[2]) in updated])

    # ---------------------------------------------------------------- helpers
    def _impl(self, tensors: TensorList) -> str:
        if self.fused or (self.fused is None and self.foreach is None and _fused_supported(tensors)):
            return "fused"
        if self.foreach is False:
            return "single"
        return "foreach"

    def _param_name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][pi]
        if names:
            return f"{names[pi]!r} (shape {tuple(p.shape)})"
        return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"

    @torch.no_grad()
    def _check_gradients(self) -> None:
        """Raise before any update if a gradient is sparse or holds NaN/Inf."""
        where, grads = [], []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"SpectralAdam does not support sparse gradients: {self._param_name(gi, pi)}")
                where.append((gi, pi))
                grads.append(p.grad)
        if not self.check_finite or not grads:
            return
        for i in _nonfinite_candidates(grads):
            if not bool(torch.isfinite(grads[i]).all()):
                raise FloatingPointError(
                    f"SpectralAdam.step(): non-finite gradient (NaN or Inf) in {self._param_name(*where[i])}; "
                    "no parameter or optimizer state was changed"
                )

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            dtype = self.state_dtype or p.dtype
            like = p.detach() if _is_dtensor(p) else _plain(p)  # sharded moments for sharded parameters
            state["exp_avg"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
        return state

    # ---------------------------------------------------------------- step in backward
    def _register_hooks(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(gi, pi)))

    def _make_hook(self, gi: int, pi: int):
        def hook(p: torch.Tensor) -> None:
            self._update_in_backward(gi, pi, p)
        return hook

    @torch.no_grad()
    def _update_in_backward(self, gi: int, pi: int, p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            return
        if self.check_finite and not bool(torch.isfinite(g).all()):
            raise FloatingPointError(
                f"SpectralAdam (step_in_backward): non-finite gradient (NaN or Inf) in {self._param_name(gi, pi)}; "
                "this parameter was not changed"
            )
        group = self.param_groups[gi]
        state = self._init_state(p)
        stiefel = is_stiefel(p)
        beta1, beta2 = group["betas"]
        adam = _adam_kernel(self._impl([p]), [p], [state["exp_avg"]])
        adam([p], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]],
                          lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=0.0 if stiefel else group["weight_decay"],
                          decoupled=True if stiefel else group["decoupled_weight_decay"])
        p.grad = None
        if stiefel:
            self._pending[gi].append(p)

    def _retract_pending(self) -> None:
        preserved = {id(p) for gi, ps in self._pending.items() if self.param_groups[gi]["preserve_function"] for p in ps}
        if preserved:
            self._retract_triples(preserved)
        for gi, pending in self._pending.items():
            group = self.param_groups[gi]
            if group["preserve_function"]:
                continue
            banks = self._banks_of(gi, group)
            live, in_bank = self._live_banks(banks, pending, [True] * len(pending))
            for bank in live:
                bank.retract_(group["retraction"])
            loose = [p for p, covered in zip(pending, in_bank or [False] * len(pending)) if not covered]
            if loose:
                retract_(loose, group["retraction"])
        self._pending.clear()

    def remove_hooks(self) -> None:
        """Detach the step-in-backward hooks (the optimizer then needs ``step_in_backward=False`` use)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.step_in_backward = False

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:
            self._retract_pending()
            return loss
        if any(_is_dtensor(p) for g in self.param_groups for p in g["params"]):
            self._step_sharded()
            return loss
        self._check_gradients()
        preserved: set = set()
        for gi, group in enumerate(self.param_groups):
            banks = self._banks_of(gi, group)  # before the state exists, so it takes their layout
            params, grads, exp_avgs, exp_avg_sqs, steps, stiefel = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                stiefel.append(is_stiefel(p))
            if not params:
                continue
            live, in_bank = self._live_banks(banks, params, stiefel)
            spectral_adam(
                params, grads, exp_avgs, exp_avg_sqs, steps, stiefel, **_group_hyperparameters(group),
                mode=group["mode"], impl=self._impl(params),
                banks=live, in_bank=in_bank, retract_factors=not group["preserve_function"],
            )
            if group["preserve_function"]:
                preserved.update(id(p) for p, s in zip(params, stiefel) if s)
        if preserved:  # after every group's update: a layer's s may sit in another group
            self._retract_triples(preserved)
        return loss

    def _step_sharded(self) -> None:
        """FSDP2 (parameters are sharded ``DTensor``s, see :func:`~stiefel_sct.distributed.shard_model`):
        the Adam update runs on each process's shards (it is elementwise, so it is the unsharded
        update), then the factors are retracted by :func:`~stiefel_sct.distributed.sharded_retract_`
        (CholeskyQR2 with all-reduced Gram matrices; no factor is gathered)."""
        import torch.distributed as dist

        from .distributed import is_sharded_factor, sharded_retract_

        if self.step_in_backward or any(g["mode"] != "sct" or g["preserve_function"] for g in self.param_groups):
            raise NotImplementedError("sharded (FSDP2) parameters support mode='sct' without preserve_function "
                                      "or step_in_backward")
        local = lambda t: t.to_local() if _is_dtensor(t) else t  # noqa: E731
        work = []
        for group in self.param_groups:
            rows = [(p, self._init_state(p)) for p in group["params"] if p.grad is not None]
            work.append((group, rows))
        mesh = next(p.device_mesh for g in self.param_groups for p in g["params"] if _is_dtensor(p))
        pg = mesh.get_group()
        if self.check_finite:  # every process must agree before anything changes
            bad = torch.zeros((), dtype=torch.float32)
            for _, rows in work:
                for p, _ in rows:
                    bad = torch.maximum(bad, (~torch.isfinite(local(p.grad))).any().float())
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=pg)
            if bool(bad):
                raise FloatingPointError("SpectralAdam.step(): non-finite gradient (NaN or Inf) on some process; "
                                         "no parameter or optimizer state was changed")
        shards = []
        for group, rows in work:
            if not rows:
                continue
            params = [local(p) for p, _ in rows]
            stiefel = [is_stiefel(p) or is_sharded_factor(p) for p, _ in rows]
            spectral_adam(
                params, [local(p.grad) for p, _ in rows], [local(st["exp_avg"]) for _, st in rows],
                [local(st["exp_avg_sq"]) for _, st in rows], [st["step"] for _, st in rows], stiefel,
                **_group_hyperparameters(group), mode="sct", impl=self._impl(params), retract_factors=False,
            )
            shards += [(x, tuple(p.shape)) for x, (p, _), f in zip(params, rows, stiefel) if f]
        sharded_retract_(shards, group=pg)

    def _banks_of(self, gi: int, group: dict) -> List[FactorBank]:
        """The factor banks of group ``gi``, (re)built when missing or invalidated."""
        if group["mode"] != "sct" or not self.contiguous_factors or group["preserve_function"]:
            return []
        factors = [p for p in group["params"] if is_stiefel(p) and not _is_dtensor(p)]
        key = tuple(id(p) for p in factors)
        cached = self._banks.get(gi)
        if cached is None or cached[0] != key or not all(b.intact() for b in cached[1]):
            by_layout: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
            for p in factors:
                by_layout[(tuple(p.shape), p.dtype, p.device)].append(p)
            cached = (key, [FactorBank(ps) for ps in by_layout.values() if len(ps) > 1])
            self._banks[gi] = cached
        return cached[1]

    @staticmethod
    def _live_banks(banks: List[FactorBank], params: TensorList, stiefel: List[bool]):
        """The banks whose every factor is updated this step, and which params they cover."""
        if not banks:
            return (), None
        updated = {id(p) for p, s in zip(params, stiefel) if s}
        live = [bank for bank in banks if bank.ids <= updated]
        covered = set().union(*(bank.ids for bank in live)) if live else set()
        return live, [id(p) in covered for p in params]


@torch.no_grad()
def retract_all(module_or_params, method: str = "cholqr2", preserve_function: bool = False) -> int:
    """Retract every geoopt Stiefel factor of a module (or an iterable of tensors) in place.

    For users who keep their own optimizer: call it after ``optimizer.step()``. Factors are
    batched by shape, one factorization call per shape. Returns the number of factors retracted.

    ``preserve_function=True`` (a module only): each spectral layer's ``(U, s, V)`` is retracted
    together so that its weight does not change (:func:`~stiefel_sct.manifold.preserving_retraction`:
    the ``R`` factors of the QRs are folded into a re-diagonalised ``s``); Stiefel factors outside
    spectral layers get the plain retraction.
    """
    if isinstance(module_or_params, torch.nn.Module):
        tensors = list(module_or_params.parameters())
    elif preserve_function:
        raise TypeError("preserve_function=True needs an nn.Module (to find each layer's U, s, V), "
                        f"got {type(module_or_params).__name__}")
    elif isinstance(module_or_params, torch.Tensor):
        tensors = [module_or_params]
    else:
        try:
            tensors = list(module_or_params)
        except TypeError:
            raise TypeError(
                f"module_or_params must be an nn.Module or an iterable of tensors, got {type(module_or_params).__name__}"
            ) from None
    factors = [t for t in tensors if isinstance(t, torch.Tensor) and is_stiefel(t)]
    if preserve_function:
        triples, rest = spectral_triples(tensors)
        retract_triples_(triples)
        factors_left = {id(t) for t in rest}
        retract_([p for p in factors if id(p) in factors_left], method)
    else:
        retract_(factors, method)
    return len(factors)
