"""SpectralAdam: Adam(W) for spectral factors, fused with a batched Stiefel retraction.

Layout follows ``torch/optim/adam.py``: the Adam arithmetic lives in :mod:`stiefel_sct.adam`
(fused, foreach, single-tensor and Riemannian kernels, one signature); :func:`spectral_adam` is
the functional step over parallel tensor lists; :class:`SpectralAdam` owns the param groups and
the state, collects each group once per step (:func:`~stiefel_sct.optim_state.collect`) and runs
its cached plan (:mod:`stiefel_sct.step_plan`). Around it, one concern per module:

* :mod:`stiefel_sct.optim_settings`: the keys a group may hold, their checks, the table of which
  modes combine, the Adam implementation's choice;
* :mod:`stiefel_sct.optim_state`: per-parameter state, its collection and its restoration on load;
* :mod:`stiefel_sct.step_plan`: a group's step as units (bank chunks, loose Euclidean parameters,
  loose factors) and the one loop that runs them;
* :mod:`stiefel_sct.grad_checks`: the step's one gradient check;
* :mod:`stiefel_sct.backward_step`: ``step_in_backward``'s hooks and batches;
* :mod:`stiefel_sct.bank`, :mod:`stiefel_sct.triples`, :mod:`stiefel_sct.distributed`: factor banks,
  ``(U, s, V)`` triples, FSDP2's sharded retraction.

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

from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import torch
from torch.optim import Optimizer

from .backward_step import BackwardStepper
from .bank import FactorBank, GroupBanks
from .checks import check_bool
from .distributed import sharded_retract_
from .grad_checks import check_gradients, first_nonfinite, param_name
from .manifold import retract_
from .optim_settings import (
    ADAM_KEYS,
    MODES,
    OPTIONS,
    SCT_KEYS,
    check_group,
    check_options,
    group_hyperparameters,
    select_impl,
)
from .optim_state import GroupTensors, collect, is_dtensor, is_factor, restore_moments
from .step_plan import PreservedTriples, StepPlan, plan_for, riemannian_manifold, run_plan, stabilize_

__all__ = ["ADAM_KEYS", "MODES", "SCT_KEYS", "SpectralAdam", "SpectralAdamW", "first_nonfinite",
           "riemannian_manifold", "spectral_adam"]

TensorList = List[torch.Tensor]


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
    metric (:func:`riemannian_manifold`). The optimizer's step runs the same loop
    (:func:`~stiefel_sct.step_plan.run_plan`) over its cached plan.
    """
    t = GroupTensors(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                     list(max_exp_avg_sqs) if amsgrad else [None] * len(params), list(steps), list(stiefel),
                     moment_scales)
    hp = dict(amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              decoupled=decoupled_weight_decay, maximize=maximize)

    def retract(idx: List[int]) -> None:
        if retract_factors:
            retract_([t.params[i] for i in idx], retraction)

    run_plan(plan_for(t, ()), t, hp, mode=mode, retraction=retraction, impl=impl, retract=retract)


# ---------------------------------------------------------------------------------------------
# Optimizer class
# ---------------------------------------------------------------------------------------------
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

    Which settings combine (:data:`~stiefel_sct.optim_settings.SUPPORTED`, checked as each group is
    added, FSDP2 shards included, and at ``step()`` for parameters sharded after construction):

    ==============================  ===========================================================
    setting                         needs
    ==============================  ===========================================================
    ``state_dtype=torch.uint8``     ``mode="sct"``
    ``preserve_function=True``      ``mode="sct"``
    ``stabilize=N``                 ``mode="riemannian"``
    ``step_in_backward=True``       ``mode="sct"``
    FSDP2 (sharded) parameters      ``mode="sct"`` without ``preserve_function``,
                                    ``step_in_backward`` or 8-bit state
    ==============================  ===========================================================

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
        options = dict(check_finite=check_finite, contiguous_factors=contiguous_factors,
                       step_in_backward=step_in_backward)
        for name, value in options.items():
            check_bool(value, name)
        check_group(dict(defaults, params=[]), options)
        self.check_finite = check_finite
        self.contiguous_factors = contiguous_factors
        self.step_in_backward = step_in_backward
        self.backward = BackwardStepper(self)
        self.sharded_stats: Optional[Dict[str, int]] = None  # the last FSDP2 step's retraction counters
        self._reset_transient()
        super().__init__(params, defaults)
        self._check_triples()
        self._ready = True
        if self.step_in_backward:
            self.backward.register()

    def _options(self, group: Optional[dict] = None) -> Dict[str, Any]:
        """The optimizer-wide settings (and whether ``group`` holds FSDP2 shards) the SUPPORTED rules read."""
        options: Dict[str, Any] = {k: getattr(self, k) for k in OPTIONS}
        return options if group is None else dict(options, sharded=any(is_dtensor(p) for p in group["params"]))

    def _reset_transient(self) -> None:
        """Caches that a copy, a reload or new parameters must rebuild, not inherit."""
        self.backward.reset()
        self._banks: Dict[int, GroupBanks] = {}
        self._plans: Dict[int, StepPlan] = {}
        self._triples = PreservedTriples()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1], self._options(self.param_groups[-1]))
            if getattr(self, "_ready", False):  # __init__ checks once, after every group is in
                self._check_triples()
                if self.step_in_backward:
                    self.backward.register(len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()  # nothing half-added
            self._triples.forget()
            raise

    def parameters_replaced(self) -> None:
        """Call after replacing parameter objects in ``param_groups`` (and their entries in
        ``state``), as :class:`~stiefel_sct.RankScheduler` does: the factor banks, the plans and
        the layer triples are rebuilt at the next step and step-in-backward hooks move to the new
        tensors, so nothing here refers to a replaced tensor."""
        if self.backward.busy():
            raise RuntimeError("parameters_replaced() between backward() and step(): retract first")
        hooked = self.backward.hooked
        self.backward.remove()
        self._reset_transient()
        self._check_triples()
        if hooked:
            self.backward.register()

    def remove_hooks(self) -> None:
        """Detach the step-in-backward hooks (the optimizer then needs ``step_in_backward=False`` use)."""
        self.backward.remove()
        self.step_in_backward = False

    # ---------------------------------------------------------------- copy, pickle, state dicts
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_options"] = self._options()
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
            self.backward = BackwardStepper(self)
            self._reset_transient()
            self._ready = True
            if self.step_in_backward:
                self.backward.register()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer, or of ``torch.optim.Adam``/``AdamW``.

        Saved settings win (as in torch); settings a saved group lacks take this optimizer's
        defaults. Every moment is restored in the group's ``state_dtype`` straight from the saved
        tensor (:func:`~stiefel_sct.optim_state.restore_moments`). On any error nothing changes."""
        saved_groups = state_dict["param_groups"]
        id_map = {pid: p for sg, g in zip(saved_groups, self.param_groups) for pid, p in zip(sg["params"], g["params"])}
        before = (self.state, self.param_groups)
        super().load_state_dict(state_dict)
        try:
            for group in self.param_groups:
                check_group(group, self._options(group))
            owner = {id(p): g for g in self.param_groups for p in g["params"]}
            for pid, saved in state_dict["state"].items():
                if pid in id_map:
                    p = id_map[pid]
                    restore_moments(self.state[p], p, owner[id(p)], saved)
        except Exception:
            self.state, self.param_groups = before
            raise
        self._banks, self._plans, self._triples = {}, {}, PreservedTriples()

    # ---------------------------------------------------------------- factor banks, triples
    def banks_of(self, gi: int) -> List[FactorBank]:
        """The factor banks of group ``gi`` (``"sct"`` groups with ``contiguous_factors``)."""
        group = self.param_groups[gi]
        if group["mode"] != "sct" or not self.contiguous_factors or group["preserve_function"]:
            return []
        factors = [p for p in group["params"] if is_factor(p) and not is_dtensor(p)]
        return self._banks.setdefault(gi, GroupBanks()).of(factors)

    def _check_triples(self) -> None:
        self._triples.check(self.param_groups, lambda gi, pi: param_name(self.param_groups, gi, pi))

    def _retract_triples(self, updated: Set[int]) -> None:
        self._triples.retract(self.param_groups, updated)

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Per group: collect the tensors once, run the group's cached plan (bank chunks updated and
        retracted in turn, loose parameters updated); then the deferred work (function-preserving
        triples, whose ``s`` may sit in another group; FSDP2's sharded retraction)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mesh = next((p.device_mesh for g in self.param_groups for p in g["params"] if is_dtensor(p)), None)
        for group in self.param_groups if mesh is not None else ():  # sharded since construction
            check_options({**group, **self._options(group)})
        if self.step_in_backward:
            self.backward.finish(self._retract_triples)
            return loss
        process_group = None if mesh is None else mesh.get_group()
        # chosen here, before anything reads a value: fused=True on an unsupported device raises at step(), as in torch
        impls = [select_impl(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        check_gradients(self.param_groups, self.check_finite, process_group)
        preserved: Set[int] = set()
        shards: List[Tuple[torch.Tensor, tuple]] = []
        for gi, group in enumerate(self.param_groups):
            banks = self.banks_of(gi)  # before the state exists, so it takes their layout
            t = collect(self.state, group, group["params"])
            if not t.params:
                continue
            plan = self._plans[gi] = plan_for(t, banks, self._plans.get(gi))
            work = t if mesh is None else t.localized()
            run_plan(plan, work, group_hyperparameters(group), mode=group["mode"], retraction=group["retraction"],
                     impl=impls[gi], retract=self._deferral(group, t, work, preserved, shards, mesh is not None))
            if group["stabilize"] is not None:
                stabilize_(t, group["stabilize"], group["retraction"])
        if preserved:  # after every group's update: a layer's s may sit in another group
            self._retract_triples(preserved)
        if process_group is not None:  # every process joins, whether or not it holds factors
            self.sharded_stats = sharded_retract_(shards, group=process_group)
        return loss

    @staticmethod
    def _deferral(group: dict, t: GroupTensors, work: GroupTensors, preserved: Set[int],
                  shards: List[Tuple[torch.Tensor, tuple]], sharded: bool) -> Callable[[List[int]], None]:
        """What becomes of a group's updated loose factors: FSDP2 shards wait for the sharded
        retraction, ``preserve_function`` factors for their layer's triple, the rest are retracted now."""
        if sharded:
            return lambda idx: shards.extend((work.params[i], tuple(t.params[i].shape)) for i in idx)
        if group["preserve_function"]:
            return lambda idx: preserved.update(id(t.params[i]) for i in idx)
        return lambda idx: retract_([t.params[i] for i in idx], group["retraction"])


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
