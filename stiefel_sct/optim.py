"""SpectralAdam: Adam(W) for spectral factors, fused with a batched Stiefel retraction.

Layout follows ``torch/optim/adam.py``: the Adam arithmetic lives in :mod:`stiefel_sct.adam`
(fused, foreach, single-tensor and Riemannian kernels, one signature); :func:`spectral_adam` is
the functional step over parallel tensor lists (Adam, then the retraction of the Stiefel
factors); :class:`SpectralAdam` owns the argument checks, the state and the param groups, and
collects each group once per step (:meth:`SpectralAdam._init_group`).

Parameters are split per group into

* Euclidean parameters (plain tensors, e.g. ``s`` and biases): Adam / AdamW, numerically the same
  as ``torch.optim.Adam`` / ``torch.optim.AdamW``;
* Stiefel factors (any :class:`geoopt.ManifoldParameter` on a geoopt Stiefel manifold):
  ``mode="sct"``: the same Adam update as if Euclidean, then a QR retraction (the SCT paper's
  method); ``mode="riemannian"``: geoopt ``RiemannianAdam`` semantics (Euclidean-metric tangent
  projection, retraction, first moment transported by projection). Weight decay never applies to
  them: shrinking an orthonormal basis means nothing on the manifold.

The optimizer reads the geometry from the tensors (``p.manifold``, as geoopt's optimizers do) and
which ``(U, s, V)`` belong together from :mod:`stiefel_sct.triples`; it imports no layer.
Retractions are batched: all factors of one (shape, dtype, device) are factorized by one call.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union, cast

import geoopt
import torch
from torch.optim import Optimizer

from .adam import adam_kernel, fused_devices, fused_supported, riemannian_adam
from .bank import FactorBank, chunk_bytes_for
from .checks import is_int, is_real
from .distributed import is_sharded_factor, sharded_retract_
from .manifold import check_retraction, is_stiefel, plain, retract_, retract_triples_, stiefel_manifold
from .quant import dequantize, quantize_, quantized_zeros
from .triples import spectral_triples

__all__ = ["ADAM_KEYS", "MODES", "SCT_KEYS", "SpectralAdam", "SpectralAdamW", "first_nonfinite",
           "riemannian_manifold", "spectral_adam"]

MODES: Tuple[str, ...] = ("sct", "riemannian")

TensorList = List[torch.Tensor]


@functools.cache
def _dtensor_type() -> tuple:
    """``(DTensor,)``, or ``()`` for a torch without distributed; imported once, on first use."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return (DTensor,)


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor_type())


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor``; any other tensor as it is."""
    return cast(Any, t).to_local() if _is_dtensor(t) else t  # a DTensor (torch's stubs type it as Tensor)


# ---------------------------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------------------------
def spectral_adam(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    max_exp_avg_sqs: List[Optional[torch.Tensor]],
    steps: TensorList,
    stiefel: List[bool],
    *,
    amsgrad: bool,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    mode: str,
    retraction: str,
    impl: str,
    moment_scales: Optional[Tuple[list, list, list]] = None,
    retract_factors: bool = True,
) -> None:
    """Functional SpectralAdam step over parallel lists; ``stiefel[i]`` marks manifold factors.

    Only tensors and scalars: ``steps`` are float32 scalar tensors, incremented here;
    ``max_exp_avg_sqs`` is read only with ``amsgrad``; ``impl`` is ``"fused"``, ``"foreach"`` or
    ``"single"`` (the Adam update's implementation, see :mod:`stiefel_sct.adam`);
    ``moment_scales``: the block scales of 8-bit moments (``(exp_avg, exp_avg_sq,
    max_exp_avg_sq)`` lists parallel to ``params``, entries ``None`` for unquantised moments).
    Euclidean parameters get Adam/AdamW with ``weight_decay``; factors get, in ``"sct"`` mode,
    Adam without weight decay and then one batched retraction per shape
    (:func:`~stiefel_sct.manifold.retract_`; ``retract_factors=False``: Adam only, the caller
    retracts), in ``"riemannian"`` mode geoopt's ``RiemannianAdam`` update in the factor's own
    metric (:func:`riemannian_manifold`).
    """
    adam = adam_kernel(impl, params, exp_avgs)
    hp = dict(amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    euc = [i for i, s in enumerate(stiefel) if not s]
    man = [i for i, s in enumerate(stiefel) if s]
    maxes = max_exp_avg_sqs if amsgrad else [None] * len(params)  # the kernels read it only with amsgrad

    def pick(idx: List[int]) -> Tuple[List[Any], ...]:  # the maxes list holds None without amsgrad
        return tuple([seq[i] for i in idx] for seq in (params, grads, exp_avgs, exp_avg_sqs, maxes, steps))

    def scales(idx: List[int]):
        return None if moment_scales is None else tuple([seq[i] for i in idx] for seq in moment_scales)

    if euc:
        adam(*pick(euc), weight_decay=weight_decay, decoupled=decoupled_weight_decay, maximize=maximize,
             moment_scales=scales(euc), **hp)
    if not man:
        return
    if mode == "riemannian":
        p, g, m, v, mx, st = pick(man)
        riemannian_adam([plain(x) for x in p], g, m, v, mx, st, maximize=maximize,
                        manifolds=[riemannian_manifold(x, retraction) for x in p], **hp)
        return
    adam(*pick(man), weight_decay=0.0, decoupled=True, maximize=maximize, moment_scales=scales(man), **hp)
    if retract_factors:
        retract_([params[i] for i in man], retraction)


def riemannian_manifold(p: torch.Tensor, retraction: str):
    """The manifold whose geometry ``mode="riemannian"`` follows for factor ``p``: its own when it
    has the canonical metric (``geoopt.Stiefel()``: canonical gradient, Cayley retraction), else
    the Euclidean-metric :class:`~stiefel_sct.manifold.Stiefel` with the group's ``retraction``."""
    manifold = getattr(p, "manifold", None)
    if isinstance(manifold, geoopt.CanonicalStiefel):
        return manifold
    return stiefel_manifold(retraction)


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


@torch.no_grad()
def first_nonfinite(grads: TensorList) -> Optional[int]:
    """Index of the first tensor of ``grads`` holding a NaN or Inf, ``None`` if all are finite."""
    bad = [i for i in _nonfinite_candidates(grads) if not bool(torch.isfinite(grads[i]).all())] if grads else []
    return min(bad) if bad else None


# ---------------------------------------------------------------------------------------------
# Optimizer class
# ---------------------------------------------------------------------------------------------
def _check_float(value, name: str, low: float, high: Optional[float] = None, *, high_open: bool = True,
                 torch_says: Optional[str] = None) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` and its range. ``torch_says`` is the
    message ``torch.optim.Adam`` raises for the same argument: ours follows it (``torch_says (ours)``),
    so code and tests written against torch's wording (torch's own optimizer suite) match."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not is_real(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and value >= low and (high is None or (value < high if high_open else value <= high))
    if not ok:
        if high is None:
            rng = f"[{low}, inf)"
        else:
            rng = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        ours = f"{name} must be in {rng}, got {value}"
        raise ValueError(f"{torch_says} ({ours})" if torch_says else ours)
    return value


def _check_bool(group: dict, key: str, *, optional: bool = False) -> None:
    value = group[key]
    if not (isinstance(value, bool) or (optional and value is None)):
        allowed = "a bool or None" if optional else "a bool"
        raise TypeError(f"{key} must be {allowed}, got {value!r}")


# Keys a param group may hold: torch.optim.Adam's (so Adam/AdamW state dicts load), ours, the ones
# torch's LR schedulers and SWA write into groups, and torch's own bookkeeping. Any other key is an
# error: a setting that does nothing must never pass silently.
ADAM_KEYS: Tuple[str, ...] = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                              "differentiable", "fused", "decoupled_weight_decay")
SCT_KEYS: Tuple[str, ...] = ("mode", "retraction", "preserve_function", "stabilize", "state_dtype")
_SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum", "swa_lr")
_GROUP_KEYS = frozenset(ADAM_KEYS + SCT_KEYS + _SCHEDULER_KEYS + ("params", "param_names"))


def _check_lr(group: dict) -> None:
    lr = group["lr"]
    # a tensor lr stays a tensor: changing it in place changes the step
    _check_float(lr, "lr", 0.0, torch_says=f"Invalid learning rate: {lr}")
    if isinstance(lr, torch.Tensor) and group["foreach"] and not group["capturable"]:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")


def _check_betas(group: dict) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if tensors[0] != tensors[1]:
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        _check_float(b, f"betas[{i}]", 0.0, 1.0, torch_says=f"Invalid beta parameter at index {i}: {b}")
        if tensors[i] and group["foreach"] and not group["capturable"]:
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
    group["betas"] = tuple(b.squeeze() if isinstance(b, torch.Tensor) else float(b) for b in betas)


def _check_state_dtype(group: dict) -> None:
    dtype = group["state_dtype"]
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype == torch.uint8):
        raise TypeError(f"state_dtype must be None, a floating-point torch.dtype or torch.uint8 (8-bit moments), "
                        f"got {dtype!r}")
    if dtype == torch.uint8 and group["mode"] != "sct":
        raise ValueError("state_dtype=torch.uint8 (8-bit moments) needs mode='sct'")


def _check_group(group: dict) -> None:
    """Validate one param group in place (normalising ``betas`` to a tuple); raise on the first
    bad or unknown setting, naming it and its allowed values."""
    unknown = sorted(set(group) - _GROUP_KEYS)
    if unknown:
        raise ValueError(f"unknown param-group key(s) {unknown}; SpectralAdam's keys are "
                         f"{sorted(ADAM_KEYS + SCT_KEYS)} (plus 'params', 'param_names' and LR-scheduler keys)")
    for key in ("amsgrad", "maximize", "decoupled_weight_decay", "preserve_function", "capturable", "differentiable"):
        _check_bool(group, key)
    for key in ("foreach", "fused"):
        _check_bool(group, key, optional=True)
    if group["fused"] and group["foreach"]:
        raise ValueError("fused and foreach cannot both be True")
    if group["capturable"]:
        raise NotImplementedError(
            "capturable=True (a step that CUDA graphs can capture) is not supported: the retraction decides "
            "between one and two CholeskyQR passes from each factor's condition number, read on the host")
    if group["differentiable"]:
        raise NotImplementedError(
            "differentiable=True (autograd through the step) is not supported: the retraction writes the "
            "factors in place and the factor banks re-point their storage")
    _check_lr(group)
    _check_betas(group)
    _check_float(group["eps"], "eps", 0.0, torch_says=f"Invalid epsilon value: {group['eps']}")
    _check_float(group["weight_decay"], "weight_decay", 0.0,
                 torch_says=f"Invalid weight_decay value: {group['weight_decay']}")
    if group["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {group['mode']!r}")
    check_retraction(group["retraction"])
    if group["preserve_function"] and group["mode"] != "sct":
        raise ValueError("preserve_function=True needs mode='sct'")
    stabilize = group["stabilize"]
    if stabilize is not None:
        if not is_int(stabilize) or stabilize < 1:
            raise ValueError(f"stabilize must be None or an int >= 1, got {stabilize!r}")
        if group["mode"] != "riemannian":
            raise ValueError("stabilize applies to mode='riemannian' (mode='sct' retracts at every step)")
    _check_state_dtype(group)
    for i, p in enumerate(group["params"]):
        if isinstance(p, geoopt.ManifoldTensor) and not is_stiefel(p) and not isinstance(p.manifold, geoopt.Euclidean):
            raise TypeError(
                f"SpectralAdam supports Euclidean parameters and geoopt Stiefel ManifoldParameters; "
                f"param {i} of a group lies on {p.manifold!r}. Use geoopt.optim.RiemannianAdam for other manifolds."
            )
        if p.is_complex():
            raise TypeError(f"SpectralAdam does not support complex parameters (param {i} of a group): a complex "
                            "parameter can be optimized as torch.view_as_real(p) by torch.optim.Adam")
        if is_stiefel(p) and (p.dim() != 2 or p.shape[-1] > p.shape[-2]):
            raise ValueError(f"Stiefel factor {i} of a group must be a tall matrix (n, k) with k <= n, got {tuple(p.shape)}")


def _group_hyperparameters(group: dict) -> dict:
    """A param group's settings as :func:`spectral_adam` keywords (all but ``mode``/``impl``).

    A tensor ``lr`` or ``betas`` is read here, at every step, so changing it in place takes effect."""
    beta1, beta2 = (float(b) for b in group["betas"])
    return dict(amsgrad=group["amsgrad"], lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"], retraction=group["retraction"])


_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False))  # (key, signed)
_OPTIONS = ("check_finite", "contiguous_factors", "step_in_backward")  # optimizer-wide, not per group


class SpectralAdam(Optimizer):
    """Adam(W) that keeps geoopt Stiefel factors on their manifold; a drop-in for torch's Adam.

    Takes every argument of :class:`torch.optim.Adam` with its meaning and default (so
    ``SpectralAdam(params, **adam_kwargs)`` is the same step as ``Adam(params, **adam_kwargs)`` on
    Euclidean parameters, and loads ``Adam``/``AdamW`` state dicts), plus the SCT settings.

    Args:
        params: iterable of parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: learning rate, ``>= 0``, a float or a 1-element tensor (default ``1e-3``).
        betas: moment coefficients, each in ``[0, 1)``, both floats or both 1-element tensors.
        eps: denominator term, ``>= 0`` (default ``1e-8``).
        weight_decay: ``>= 0``; applied to Euclidean parameters only (default ``0``).
        amsgrad: use the running maximum of the second moment (AMSGrad), as torch's Adam; in
            ``"riemannian"`` mode, as geoopt's ``RiemannianAdam``.
        foreach: use the multi-tensor implementation (``None``: choose the fastest available).
        maximize: maximize the objective (ascend the gradient).
        capturable: only ``False``; ``True`` raises ``NotImplementedError`` (see below).
        differentiable: only ``False``; ``True`` raises ``NotImplementedError`` (see below).
        fused: use torch's fused Adam kernel (``None``: where the device supports it). Checked at
            ``step()``, as torch does, so the optimizer can be built on ``meta`` parameters.
        decoupled_weight_decay: ``True`` = AdamW's decoupled decay, ``False`` (default, as
            ``torch.optim.Adam``) = Adam's L2 penalty. :class:`SpectralAdamW` defaults to ``True``.
        mode: ``"sct"`` (Adam step, then retraction; the paper's method) or ``"riemannian"``
            (geoopt ``RiemannianAdam`` semantics) for Stiefel factors.
        retraction: ``"cholqr2"`` (default: adaptive CholeskyQR, one GEMM pass when the factor is
            near the manifold, a second when not, Householder QR for rank-deficient input) or
            ``"qr"`` (Householder, sign-fixed). Both give the same Q (the thin QR with positive
            ``diag(R)`` is unique); CholeskyQR runs at GEMM speed: ~5x faster here, and as
            accurate (orthonormality error 4.7e-7 vs 6.2e-7 in fp32).
        preserve_function: retract each spectral layer's ``(U, s, V)`` together so that its
            weight (``V diag(s) U^T``) is kept to rounding (the ``R`` factors of the QRs are folded
            into a re-diagonalised ``s``: :func:`~stiefel_sct.manifold.preserving_retraction`)
            instead of dropping ``R``, which moves the weight at every step. Every Stiefel factor
            of such a group must belong to a ``SpectralLinear``/``SpectralEmbedding`` whose
            ``U``, ``s`` and ``V`` are all given to this optimizer. Costs a Householder QR per
            factor and a ``k x k`` SVD per layer (batched by layer shape).
        stabilize: ``"riemannian"`` mode only, as geoopt: every ``stabilize`` steps, project the
            factors onto the manifold (``projx``) and their first moments onto the tangent space.
        state_dtype: dtype of the moments (default: the parameter's). ``torch.bfloat16`` halves
            optimizer memory; ``torch.uint8`` keeps them as blockwise 8-bit codes
            (:mod:`stiefel_sct.quant`: ~1.02 bytes per element, ``mode="sct"``). The update is
            computed in the parameter's dtype; moments are rounded to nearest on store.
        check_finite: before touching anything, check every gradient is finite and raise a
            ``FloatingPointError`` naming the offending parameter (one fused reduction per step).
        contiguous_factors: in ``"sct"`` groups, keep the Stiefel factors of each shape in one
            buffer (:class:`~stiefel_sct.bank.FactorBank`; the parameters become views of it and are re-pointed
            within it at each step; their values, identity and ``state_dict`` are unchanged) so
            the retraction runs batched on the buffer, without stacking or copying. Disable if
            something else owns the parameters' storage.
        step_in_backward: apply each parameter's Adam update inside ``backward()``, as soon as its
            gradient is accumulated (``register_post_accumulate_grad_hook``), then free the
            gradient: no gradient of the whole model is ever held. ``step()`` then only retracts
            the factors updated during backward (batched, as usual). Gradients are updated in
            batches of up to one factor-bank chunk of bytes (8 MB on CPU), the last when
            ``backward()`` ends, so at most one batch of gradients is held. The NaN/Inf check is
            per batch in this mode: a bad gradient raises inside ``backward()`` before any
            parameter of its batch changes, but batches updated earlier in the same backward
            stay updated.

    ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``, ``foreach``, ``fused``,
    ``decoupled_weight_decay``, ``mode``, ``retraction``, ``preserve_function``, ``stabilize`` and
    ``state_dtype`` may differ per param group; ``check_finite``, ``contiguous_factors`` and
    ``step_in_backward`` are optimizer-wide. A param group with any other key is refused
    (``ValueError``), except the keys torch's LR schedulers add.

    Not supported, with a clear error: ``capturable=True`` (the retraction's adaptive pass choice
    reads each factor's condition number on the host, so the step cannot be captured in a CUDA
    graph), ``differentiable=True`` (the retraction and the factor banks write the factors in
    place), complex parameters, sparse gradients.

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` and, with ``amsgrad``,
    ``max_exp_avg_sq`` (the same as ``torch.optim.Adam``); 8-bit moments add a ``<key>_scale``
    (fp32, one per 256-element block) beside each. ``load_state_dict`` restores every moment in
    this optimizer's ``state_dtype`` (a bf16 or 8-bit state survives a save/load round trip
    bitwise) and accepts ``torch.optim.Adam``/``AdamW`` state dicts: settings a saved group lacks
    take this optimizer's defaults.
    """

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        mode: str = "sct",
        retraction: str = "cholqr2",
        preserve_function: bool = False,
        stabilize: Optional[int] = None,
        state_dtype: Optional[torch.dtype] = None,
        check_finite: bool = True,
        contiguous_factors: bool = True,
        step_in_backward: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, mode=mode, retraction=retraction,
            preserve_function=preserve_function, stabilize=stabilize, state_dtype=state_dtype,
        )
        _check_group(dict(defaults, params=[]))
        for name, value in (("check_finite", check_finite), ("contiguous_factors", contiguous_factors),
                            ("step_in_backward", step_in_backward)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.check_finite = check_finite
        self.contiguous_factors = contiguous_factors
        self.step_in_backward = step_in_backward
        self._reset_transient()
        super().__init__(params, defaults)
        self._check_triples()
        self._ready = True
        if self.step_in_backward:
            if any(g["mode"] != "sct" for g in self.param_groups):
                raise ValueError("step_in_backward supports mode='sct' only")
            self._register_hooks()

    def _reset_transient(self) -> None:
        """Caches and hooks that a copy or a reload must rebuild, not inherit."""
        self._pending: Dict[int, List[torch.Tensor]] = defaultdict(list)
        # step in backward: parameters whose gradient has arrived, updated together (see _flush_updates)
        self._batch: List[Tuple[int, int, torch.Tensor]] = []
        self._batch_bytes = 0
        self._flush_queued = False
        self._hooks: list = []
        self._banks: Dict[int, Tuple[tuple, List[FactorBank]]] = {}
        self._triples: Optional[Tuple[tuple, list]] = None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
            if getattr(self, "_ready", False):  # __init__ checks once, after every group is in
                self._check_triples()
                if self.step_in_backward:
                    if self.param_groups[-1]["mode"] != "sct":
                        raise ValueError("step_in_backward supports mode='sct' only")
                    self._register_hooks(len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()  # nothing half-added
            self._triples = None
            raise

    def parameters_replaced(self) -> None:
        """Call after replacing parameter objects in ``param_groups`` (and their entries in
        ``state``), as :class:`~stiefel_sct.RankScheduler` does: the factor banks and the layer
        triples are rebuilt at the next step and step-in-backward hooks move to the new tensors,
        so nothing here refers to a replaced tensor."""
        if self._pending or self._batch:
            raise RuntimeError("parameters_replaced() between backward() and step(): retract first")
        hooks = bool(self._hooks)
        for h in self._hooks:
            h.remove()
        self._reset_transient()
        self._check_triples()
        if hooks:
            self._register_hooks()

    # ---------------------------------------------------------------- copy, pickle, state dicts
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_options"] = {k: getattr(self, k) for k in _OPTIONS}
        return state

    def __setstate__(self, state: dict) -> None:
        options = state.pop("_options", None)
        super().__setstate__(state)
        for group in self.param_groups:  # an Adam/AdamW state dict lacks our settings: take the defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])
        for st in self.state.values():  # old or foreign checkpoints may hold plain-number steps
            if "step" in st and not torch.is_tensor(st["step"]):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
        if options is not None:  # a copy or an unpickled optimizer: rebuild what was not copied
            for key, value in options.items():
                setattr(self, key, value)
            self._reset_transient()
            self._ready = True
            if self.step_in_backward:
                self._register_hooks()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer, or of ``torch.optim.Adam``/``AdamW``.

        Saved settings win (as in torch); settings a saved group lacks take this optimizer's
        defaults. Every moment is restored in the group's ``state_dtype`` straight from the saved
        tensor (torch's loader casts moments to the parameter's dtype, which would undo a bf16
        or 8-bit state). On any error nothing changes."""
        saved_groups = state_dict["param_groups"]
        id_map = {pid: p for sg, g in zip(saved_groups, self.param_groups) for pid, p in zip(sg["params"], g["params"])}
        before = (self.state, self.param_groups)
        super().load_state_dict(state_dict)
        try:
            for group in self.param_groups:
                _check_group(group)
            owner = {id(p): g for g in self.param_groups for p in g["params"]}
            for pid, saved in state_dict["state"].items():
                if pid in id_map:
                    p = id_map[pid]
                    self._restore_moments(p, owner[id(p)], saved)
        except Exception:
            self.state, self.param_groups = before
            raise
        self._banks, self._triples = {}, None

    def _restore_moments(self, p: torch.Tensor, group: dict, saved: dict) -> None:
        state = self.state[p]
        dtype = group["state_dtype"] or p.dtype
        for key, signed in _MOMENTS:
            value = saved.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            state.pop(key + "_scale", None)  # torch's loader copied it, cast to the parameter's dtype
            value = value.to(p.device)
            saved_scales = saved[key + "_scale"].to(p.device, torch.float32) if value.dtype == torch.uint8 else None
            if dtype == torch.uint8 and saved_scales is not None:  # 8-bit into 8-bit: the codes as saved
                state[key], state[key + "_scale"] = value, saved_scales
                continue
            if saved_scales is not None:
                value = dequantize(value, saved_scales, signed)
            if dtype == torch.uint8:
                state[key], state[key + "_scale"] = quantized_zeros(value)
                quantize_(value, state[key], state[key + "_scale"], signed)
            else:
                state[key] = value.to(dtype)

    # ---------------------------------------------------------------- per-group collection
    @staticmethod
    def _is_factor(p: torch.Tensor) -> bool:
        """Whether ``p`` is kept on the Stiefel manifold: a geoopt Stiefel tensor, or a factor that
        :func:`~stiefel_sct.distributed.shard_model` sharded (``fully_shard`` drops the subclass)."""
        return is_stiefel(p) or is_sharded_factor(p)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """``p``'s state, created on first use: moments in the group's ``state_dtype``
        (8-bit: codes and block scales), ``max_exp_avg_sq`` once the group uses ``amsgrad``."""
        state = self.state[p]
        amsgrad = group["amsgrad"]
        if state and (not amsgrad or "max_exp_avg_sq" in state):  # every step after the first
            return state
        dtype = group["state_dtype"] or p.dtype
        like = p.detach() if _is_dtensor(p) else plain(p)  # sharded moments for sharded parameters
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key, _ in _MOMENTS:
            if key in state or (key == "max_exp_avg_sq" and not amsgrad):
                continue
            if dtype == torch.uint8:
                state[key], state[key + "_scale"] = quantized_zeros(like)
            else:
                state[key] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _init_group(self, group: dict) -> tuple:
        """:meth:`_collect` over the whole group (once per step)."""
        return self._collect(group, group["params"])

    def _collect(self, group: dict, candidates: Iterable[torch.Tensor]) -> tuple:
        """The group's parameters that have a gradient, with their gradients, moments (and
        ``max_exp_avg_sq`` with ``amsgrad``), step counts, whether each is a Stiefel factor (decided
        here, once per step) and the 8-bit moments' block scales (``None`` if not 8-bit); creates
        missing state."""
        params, grads, exp_avgs, exp_avg_sqs, maxes, steps, factors = [], [], [], [], [], [], []
        quantized = group["state_dtype"] == torch.uint8
        scales: Tuple[list, list, list] = ([], [], [])
        for p in candidates:
            if p.grad is None:
                continue
            state = self._init_state(p, group)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            maxes.append(state["max_exp_avg_sq"] if group["amsgrad"] else None)
            steps.append(state["step"])
            factors.append(self._is_factor(p))
            if quantized:
                for seq, (key, _) in zip(scales, _MOMENTS):
                    seq.append(state.get(key + "_scale"))
        return params, grads, exp_avgs, exp_avg_sqs, maxes, steps, factors, (scales if quantized else None)

    @staticmethod
    def _impl(group: dict, tensors: TensorList) -> str:
        fused, foreach = group["fused"], group["foreach"]
        if fused:
            if not fused_supported(tensors):  # at step(), as torch: building on meta parameters works
                bad = next(t for t in tensors if not fused_supported([t]))
                kinds = sorted({f"{t.device.type}/{t.dtype}" for t in tensors})
                # torch's words first (torch.optim.Adam raises them at the same moment)
                raise RuntimeError(f"`fused=True` requires all the params to be floating point Tensors of supported "
                                   f"devices: {fused_devices()} but {bad.dtype} and {bad.device.type} (fused=True needs "
                                   f"floating-point parameters on a device with fused Adam kernels; got {kinds})")
            return "fused"
        if fused is None and foreach is None and fused_supported(tensors):
            return "fused"
        if foreach is False:
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
    def _check_gradients(self, process_group=None) -> None:
        """The step's one gradient check, before anything changes: sparse gradients are refused and
        (``check_finite``) a NaN/Inf raises ``FloatingPointError`` naming the parameter. With a
        ``process_group`` (sharded parameters) the processes agree first, so all raise or none."""
        where, grads = [], []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"SpectralAdam does not support sparse gradients: {self._param_name(gi, pi)}")
                where.append((gi, pi))
                grads.append(_local(p.grad))
        if not self.check_finite:
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
                f"SpectralAdam.step(): non-finite gradient (NaN or Inf) in {self._param_name(*where[bad])}; "
                "no parameter or optimizer state was changed"
            )

    # ---------------------------------------------------------------- factor banks
    def _banks_of(self, gi: int, group: dict) -> List[FactorBank]:
        """The factor banks of group ``gi``, (re)built when missing or invalidated."""
        if group["mode"] != "sct" or not self.contiguous_factors or group["preserve_function"]:
            return []
        factors = [p for p in group["params"] if self._is_factor(p) and not _is_dtensor(p)]
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
    def _live_banks(banks: List[FactorBank], updated: TensorList) -> Tuple[List[FactorBank], Set[int]]:
        """The banks whose every factor is in ``updated``, and the ids of the factors they cover."""
        ids = {id(p) for p in updated}
        live = [bank for bank in banks if bank.ids <= ids]
        return live, set().union(*(bank.ids for bank in live))

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

    def _retract_triples(self, updated: Set[int]) -> None:
        retract_triples_([t for t in self._layer_triples() if id(t[0]) in updated or id(t[2]) in updated])

    # ---------------------------------------------------------------- step in backward
    def _register_hooks(self, only_group: Optional[int] = None) -> None:
        for gi, group in enumerate(self.param_groups):
            if only_group is not None and gi != only_group:
                continue
            for pi, p in enumerate(group["params"]):
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(gi, pi)))

    def _make_hook(self, gi: int, pi: int):
        def hook(p: torch.Tensor) -> None:
            self._update_in_backward(gi, pi, p)
        return hook

    def _update_in_backward(self, gi: int, pi: int, p: torch.Tensor) -> None:
        """A parameter's gradient has arrived: batch it; a batch of ``chunk_bytes_for(device)``
        gradient bytes (8 MB on CPU) is updated by one Adam call. The rest is updated when the
        backward pass ends (an engine callback), so no gradient outlives ``backward()``.

        Why batches: a hook that updated its own parameter cost ~0.7 ms, of which ~0.3 ms inside
        the Adam call (70B-shaped layers: 99 hooks per 4 layers took 66-71 ms, 26-34 ms of it in
        the update); a batch pays the per-call checks and launches once and holds at most one
        batch of gradients."""
        if p.grad is None:
            return
        if not self._flush_queued:  # the first gradient of this backward pass
            torch.autograd.Variable._execution_engine.queue_callback(self._flush_updates)
            self._flush_queued = True
        if self._batch and self._batch[0][0] != gi:  # one batch = one param group's settings
            self._flush_batch()
        self._batch.append((gi, pi, p))
        self._batch_bytes += p.grad.numel() * p.grad.element_size()
        if self._batch_bytes >= chunk_bytes_for(p.device):
            self._flush_batch()

    def _flush_updates(self) -> None:
        """End of a backward pass: update what is still batched."""
        self._flush_queued = False
        self._flush_batch()

    @torch.no_grad()
    def _flush_batch(self) -> None:
        """Adam on the batched parameters, after checking all their gradients: a NaN/Inf raises
        before any parameter of the batch changes (batches updated earlier stay updated)."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch:
            return
        gi = batch[0][0]
        group = self.param_groups[gi]
        live = [(pi, p, g) for _, pi, p in batch if (g := p.grad) is not None]  # a gradient freed meanwhile: skip
        if self.check_finite:
            bad = first_nonfinite([g for _, _, g in live])
            if bad is not None:
                self._flush_queued = False  # an error ends the backward pass: start clean next time
                raise FloatingPointError(
                    f"SpectralAdam (step_in_backward): non-finite gradient (NaN or Inf) in "
                    f"{self._param_name(gi, live[bad][0])}; no parameter of its batch was changed"
                )
        params, grads, m, v, mx, steps, factors, scales = self._collect(group, [p for _, p, _ in live])
        spectral_adam(params, grads, m, v, mx, steps, factors, **_group_hyperparameters(group), mode="sct",
                      impl=self._impl(group, params), moment_scales=scales, retract_factors=False)
        for p in params:
            p.grad = None
        self._pending[gi].extend(p for p, f in zip(params, factors) if f)

    def _retract_pending(self) -> None:
        self._flush_batch()  # normally empty: the end of backward() flushed it
        pending, self._pending = self._pending, defaultdict(list)
        preserved = {id(p) for gi, ps in pending.items() if self.param_groups[gi]["preserve_function"] for p in ps}
        if preserved:
            self._retract_triples(preserved)
        for gi, ps in pending.items():
            group = self.param_groups[gi]
            if group["preserve_function"]:
                continue
            live, covered = self._live_banks(self._banks_of(gi, group), ps)
            for bank in live:
                bank.retract_(group["retraction"])
            retract_([p for p in ps if id(p) not in covered], group["retraction"])

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
        # chosen here, before anything reads a value: fused=True on an unsupported device raises at step(), as in torch
        impls = [self._impl(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        self._check_gradients()
        preserved: Set[int] = set()
        for gi, group in enumerate(self.param_groups):
            banks = self._banks_of(gi, group)  # before the state exists, so it takes their layout
            lists = self._init_group(group)
            params, factors = lists[0], lists[6]
            if not params:
                continue
            hp = dict(_group_hyperparameters(group), mode=group["mode"], impl=impls[gi])
            live, covered = self._live_banks(banks, [p for p, f in zip(params, factors) if f])
            rest = [i for i, p in enumerate(params) if id(p) not in covered]
            self._adam(lists, rest, hp, retract_factors=not group["preserve_function"])
            position = {id(p): i for i, p in enumerate(params)}
            for bank in live:
                # chunk by chunk: the Adam update leaves the chunk in cache for the retraction's GEMMs
                for j, chunk in enumerate(bank.chunks):
                    self._adam(lists, [position[id(p)] for p in chunk], hp, retract_factors=False)
                    bank.retract_chunk_(j, group["retraction"])
            if group["preserve_function"]:
                preserved.update(id(p) for p, f in zip(params, factors) if f)
            if group["stabilize"] is not None:
                self._stabilize(group, lists)
        if preserved:  # after every group's update: a layer's s may sit in another group
            self._retract_triples(preserved)
        return loss

    @staticmethod
    def _adam(lists: tuple, idx: List[int], hp: dict, retract_factors: bool) -> None:
        """:func:`spectral_adam` on the entries ``idx`` of :meth:`_init_group`'s lists."""
        *seqs, scales = lists
        picked = [[seq[i] for i in idx] for seq in seqs]
        scales = None if scales is None else tuple([seq[i] for i in idx] for seq in scales)
        spectral_adam(*picked, moment_scales=scales, retract_factors=retract_factors, **hp)

    @staticmethod
    def _stabilize(group: dict, lists: tuple) -> None:
        """geoopt's ``stabilize``: when a factor's step count reaches a multiple of ``stabilize``,
        project the group's factors onto the manifold and their first moments onto the tangent space."""
        params, _, exp_avgs, _, _, steps, factors, _ = lists
        if not any(f and int(st) % group["stabilize"] == 0 for f, st in zip(factors, steps)):
            return
        for p, m, f in zip(params, exp_avgs, factors):
            if f:
                manifold = riemannian_manifold(p, group["retraction"])
                x = plain(p)
                x.copy_(manifold.projx(x))
                m.copy_(manifold.proju(x, m.to(x.dtype)))

    def _step_sharded(self) -> None:
        """FSDP2 (parameters are sharded ``DTensor``s, see :func:`~stiefel_sct.distributed.shard_model`):
        the Adam update runs on each process's shards (it is elementwise, so it is the unsharded
        update), then the factors are retracted by :func:`~stiefel_sct.distributed.sharded_retract_`
        (CholeskyQR2 with all-reduced Gram matrices; no factor is gathered)."""
        if self.step_in_backward or any(g["mode"] != "sct" or g["preserve_function"] or g["state_dtype"] == torch.uint8
                                        for g in self.param_groups):
            raise NotImplementedError("sharded (FSDP2) parameters support mode='sct' without preserve_function, "
                                      "step_in_backward or 8-bit state")
        mesh = next(p.device_mesh for g in self.param_groups for p in g["params"] if _is_dtensor(p))
        process_group = mesh.get_group()
        self._check_gradients(process_group)
        shards = []
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, maxes, steps, factors, _ = self._init_group(group)
            if not params:
                continue
            local = [_local(p) for p in params]
            spectral_adam(local, [_local(g) for g in grads], [_local(m) for m in exp_avgs],
                          [_local(v) for v in exp_avg_sqs], [None if m is None else _local(m) for m in maxes], steps,
                          factors, **_group_hyperparameters(group), mode="sct", impl=self._impl(group, local),
                          retract_factors=False)
            shards += [(x, tuple(p.shape)) for x, p, f in zip(local, params, factors) if f]
        sharded_retract_(shards, group=process_group)


class SpectralAdamW(SpectralAdam):
    """:class:`SpectralAdam` with ``torch.optim.AdamW``'s defaults: decoupled weight decay, 1e-2.

    A drop-in for ``torch.optim.AdamW``; every argument of :class:`SpectralAdam` is accepted."""

    def __init__(self, params: Iterable, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 decoupled_weight_decay: bool = True, **kwargs) -> None:
        if decoupled_weight_decay is not True:
            raise ValueError("SpectralAdamW always decouples weight decay; use SpectralAdam for Adam's L2 penalty")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs)
