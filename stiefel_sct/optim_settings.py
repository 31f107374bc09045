"""SpectralAdam's settings: the keys a param group may hold, their checks, and the one table of
which modes combine (:data:`SUPPORTED`).

Every check raises on the first bad or unknown setting, naming it and its allowed values. Where
``torch.optim.Adam`` raises for the same argument, its type and words come first and ours follow
in parentheses, so code and tests written against torch's wording (torch's own optimizer suite)
match.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import geoopt
import torch

from .adam import fused_devices, fused_supported
from .checks import is_int, is_real
from .manifold import check_retraction, is_stiefel

__all__ = ["ADAM_KEYS", "GROUP_KEYS", "MODES", "OPTIONS", "SCT_KEYS", "SUPPORTED", "Rule", "check_float",
           "check_group", "check_options", "group_hyperparameters", "select_impl", "unsupported"]

MODES: Tuple[str, ...] = ("sct", "riemannian")

# Keys a param group may hold: torch.optim.Adam's (so Adam/AdamW state dicts load), ours, the ones
# torch's LR schedulers and SWA write into groups, and torch's own bookkeeping. Any other key is an
# error: a setting that does nothing must never pass silently.
ADAM_KEYS: Tuple[str, ...] = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                              "differentiable", "fused", "decoupled_weight_decay")
SCT_KEYS: Tuple[str, ...] = ("mode", "retraction", "preserve_function", "stabilize", "state_dtype")
_SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum", "swa_lr")
GROUP_KEYS = frozenset(ADAM_KEYS + SCT_KEYS + _SCHEDULER_KEYS + ("params", "param_names"))
OPTIONS: Tuple[str, ...] = ("check_finite", "contiguous_factors", "step_in_backward")  # optimizer-wide


class Rule(NamedTuple):
    """One row of :data:`SUPPORTED`: where ``applies(settings)`` holds, ``allowed(settings)`` must,
    else ``error(message)`` is raised. ``settings`` is a param group's dict, plus the optimizer-wide
    options and ``"sharded"`` (whether any parameter is an FSDP2 ``DTensor``)."""

    setting: str
    needs: str
    applies: Callable[[Mapping[str, Any]], bool]
    allowed: Callable[[Mapping[str, Any]], bool]
    message: str
    error: type = ValueError


def _sct(g: Mapping[str, Any]) -> bool:
    return g["mode"] == "sct"


# Which modes combine: the one table (quoted in SpectralAdam's docstring). Each row names why.
SUPPORTED: Tuple[Rule, ...] = (
    # the 8-bit codec stores one scale per block of a plain tensor; the Riemannian second moment
    # of a factor is one number per matrix, a different state
    Rule("state_dtype=torch.uint8", "mode='sct'", lambda g: g["state_dtype"] == torch.uint8, _sct,
         "state_dtype=torch.uint8 (8-bit moments) needs mode='sct'"),
    # the R factors folded into s are SCT's retraction; the Riemannian step has its own transport
    Rule("preserve_function=True", "mode='sct'", lambda g: bool(g["preserve_function"]), _sct,
         "preserve_function=True needs mode='sct'"),
    # geoopt's periodic projection; mode='sct' already retracts at every step
    Rule("stabilize=N", "mode='riemannian'", lambda g: g["stabilize"] is not None,
         lambda g: g["mode"] == "riemannian",
         "stabilize applies to mode='riemannian' (mode='sct' retracts at every step)"),
    # an update inside backward() is Adam then a deferred retraction: SCT's step
    Rule("step_in_backward=True", "mode='sct'", lambda g: bool(g.get("step_in_backward")), _sct,
         "step_in_backward supports mode='sct' only"),
    # the sharded retraction all-reduces Gram matrices of plain factors; the other modes read
    # whole factors (triples, Riemannian transport), 8-bit blocks would straddle shards
    Rule("FSDP2 (sharded) parameters", "mode='sct' without preserve_function, step_in_backward or 8-bit state",
         lambda g: bool(g.get("sharded")),
         lambda g: _sct(g) and not g["preserve_function"] and not g.get("step_in_backward")
         and g["state_dtype"] != torch.uint8,
         "sharded (FSDP2) parameters support mode='sct' without preserve_function, step_in_backward or 8-bit state",
         NotImplementedError),
)


def unsupported(settings: Mapping[str, Any]) -> Optional[Rule]:
    """The first row of :data:`SUPPORTED` that ``settings`` break, ``None`` if none."""
    return next((r for r in SUPPORTED if r.applies(settings) and not r.allowed(settings)), None)


def check_options(settings: Mapping[str, Any]) -> None:
    """Raise the error of the first row of :data:`SUPPORTED` that ``settings`` break."""
    rule = unsupported(settings)
    if rule is not None:
        raise rule.error(rule.message)


def check_float(value: Any, name: str, low: float, high: Optional[float] = None, *, high_open: bool = True,
                torch_says: Optional[str] = None) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` and its range. ``torch_says`` is the
    message ``torch.optim.Adam`` raises for the same argument: ours follows it (``torch_says (ours)``)."""
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


def _check_lr(group: dict) -> None:
    lr = group["lr"]
    # a tensor lr stays a tensor: changing it in place changes the step
    check_float(lr, "lr", 0.0, torch_says=f"Invalid learning rate: {lr}")
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
        check_float(b, f"betas[{i}]", 0.0, 1.0, torch_says=f"Invalid beta parameter at index {i}: {b}")
        if tensors[i] and group["foreach"] and not group["capturable"]:
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
    group["betas"] = tuple(b.squeeze() if isinstance(b, torch.Tensor) else float(b) for b in betas)


def _check_state_dtype(group: dict) -> None:
    dtype = group["state_dtype"]
    if dtype is not None and (not isinstance(dtype, torch.dtype)
                              or not (dtype.is_floating_point or dtype == torch.uint8)):
        raise TypeError(f"state_dtype must be None, a floating-point torch.dtype or torch.uint8 (8-bit moments), "
                        f"got {dtype!r}")


def _check_flags(group: dict) -> None:
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


def _check_params(group: dict) -> None:
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


def check_group(group: dict, options: Optional[Mapping[str, Any]] = None) -> None:
    """Validate one param group in place (normalising ``betas`` to a tuple); raise on the first
    bad or unknown setting, naming it and its allowed values. ``options``: the optimizer-wide
    settings the :data:`SUPPORTED` rules read beside the group's."""
    unknown = sorted(set(group) - GROUP_KEYS)
    if unknown:
        raise ValueError(f"unknown param-group key(s) {unknown}; SpectralAdam's keys are "
                         f"{sorted(ADAM_KEYS + SCT_KEYS)} (plus 'params', 'param_names' and LR-scheduler keys)")
    _check_flags(group)
    _check_lr(group)
    _check_betas(group)
    check_float(group["eps"], "eps", 0.0, torch_says=f"Invalid epsilon value: {group['eps']}")
    check_float(group["weight_decay"], "weight_decay", 0.0,
                torch_says=f"Invalid weight_decay value: {group['weight_decay']}")
    if group["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {group['mode']!r}")
    check_retraction(group["retraction"])
    stabilize = group["stabilize"]
    if stabilize is not None and (not is_int(stabilize) or stabilize < 1):
        raise ValueError(f"stabilize must be None or an int >= 1, got {stabilize!r}")
    _check_state_dtype(group)
    check_options({**group, **(options or {})})
    _check_params(group)


def group_hyperparameters(group: Mapping[str, Any]) -> Dict[str, Any]:
    """A param group's Adam settings as keywords of the :mod:`stiefel_sct.adam` kernels (with
    ``decoupled``), plus ``weight_decay`` for Euclidean parameters. A tensor ``lr`` or ``betas`` is
    read here, at every step, so changing it in place takes effect."""
    beta1, beta2 = (float(b) for b in group["betas"])
    return dict(amsgrad=group["amsgrad"], lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                maximize=group["maximize"])


def select_impl(group: Mapping[str, Any], tensors: List[torch.Tensor]) -> str:
    """The Adam implementation a group's step uses on ``tensors``: ``"fused"``, ``"foreach"`` or
    ``"single"``. Decided at ``step()``, as torch does (so an optimizer can be built on ``meta``
    parameters): ``fused=True`` where torch has no fused kernel raises torch's ``RuntimeError``."""
    fused, foreach = group["fused"], group["foreach"]
    if fused:
        if not fused_supported(tensors):
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
