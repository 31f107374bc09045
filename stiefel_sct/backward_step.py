"""SpectralAdam's ``step_in_backward``: each parameter's Adam update inside ``backward()``, as soon
as its gradient is accumulated, in bounded batches; the factors' retraction waits for ``step()``."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from .bank import chunk_bytes_for, live_banks
from .grad_checks import first_nonfinite, param_name
from .manifold import retract_
from .optim_settings import group_hyperparameters, select_impl
from .optim_state import collect
from .step_plan import plan_for, run_plan

__all__ = ["BackwardStepper"]


class BackwardStepper:
    """The hooks, batches and pending factors of a :class:`~stiefel_sct.SpectralAdam` built with
    ``step_in_backward=True``.

    A parameter's gradient arrives (``register_post_accumulate_grad_hook``) and joins the batch; a
    batch of ``batch_bytes`` gradient bytes (``None``: the factor-bank chunk size of the device,
    8 MB on CPU) is updated by one Adam call and its gradients freed; what is still batched is
    updated when the backward pass ends (an engine callback), so no gradient outlives
    ``backward()``. The updated factors wait in ``pending`` for :meth:`finish` (``step()``),
    which retracts them batched.

    Why batches: a hook that updated its own parameter cost ~0.7 ms, of which ~0.3 ms inside the
    Adam call (70B-shaped layers: 99 hooks per 4 layers took 66-71 ms, 26-34 ms of it in the
    update); a batch pays the per-call checks and launches once and holds at most one batch of
    gradients.

    Public seams: ``batch_bytes`` (settable) and ``on_update``, called with each batch's
    parameters after their update (logging, tests counting Adam calls).
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.batch_bytes: Optional[int] = None
        self.on_update: Optional[Callable[[List[torch.Tensor]], None]] = None
        self._hooks: list = []
        self.reset()

    def reset(self) -> None:
        """Forget the batch and the pending factors (a copy or a reload starts clean)."""
        self.pending: Dict[int, List[torch.Tensor]] = defaultdict(list)
        self._batch: List[Tuple[int, int, torch.Tensor]] = []
        self._bytes = 0
        self._queued = False

    def busy(self) -> bool:
        """Whether updates are batched or factors await their retraction."""
        return bool(self.pending or self._batch)

    def register(self, only_group: Optional[int] = None) -> None:
        """Hook every trainable parameter (of group ``only_group``, or of all groups)."""
        for gi, group in enumerate(self.optimizer.param_groups):
            if only_group is not None and gi != only_group:
                continue
            for pi, p in enumerate(group["params"]):
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(gi, pi)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def hooked(self) -> bool:
        return bool(self._hooks)

    def _hook(self, gi: int, pi: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self._arrived(gi, pi, p)
        return hook

    def _arrived(self, gi: int, pi: int, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if not self._queued:  # the first gradient of this backward pass
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued = True
        if self._batch and self._batch[0][0] != gi:  # one batch = one param group's settings
            self.flush()
        self._batch.append((gi, pi, p))
        self._bytes += p.grad.numel() * p.grad.element_size()
        if self._bytes >= (chunk_bytes_for(p.device) if self.batch_bytes is None else self.batch_bytes):
            self.flush()

    def _end_of_backward(self) -> None:
        self._queued = False
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Adam on the batched parameters, after checking all their gradients: a NaN/Inf raises
        before any parameter of the batch changes (batches updated earlier stay updated)."""
        batch, self._batch, self._bytes = self._batch, [], 0
        if not batch:
            return
        opt = self.optimizer
        gi = batch[0][0]
        group = opt.param_groups[gi]
        live = [(pi, p, g) for _, pi, p in batch if (g := p.grad) is not None]  # a gradient freed meanwhile: skip
        if opt.check_finite:
            bad = first_nonfinite([g for _, _, g in live])
            if bad is not None:
                self._queued = False  # an error ends the backward pass: start clean next time
                raise FloatingPointError(
                    f"SpectralAdam (step_in_backward): non-finite gradient (NaN or Inf) in "
                    f"{param_name(opt.param_groups, gi, live[bad][0])}; no parameter of its batch was changed"
                )
        t = collect(opt.state, group, [p for _, p, _ in live])
        pending = self.pending[gi]
        run_plan(plan_for(t, ()), t, group_hyperparameters(group), mode="sct", retraction=group["retraction"],
                 impl=select_impl(group, t.params), retract=lambda idx: pending.extend(t.params[i] for i in idx))
        for p in t.params:
            p.grad = None
        if self.on_update is not None:
            self.on_update(t.params)

    def finish(self, retract_triples: Callable[[Set[int]], None]) -> None:
        """``step()``: retract every factor updated since the last call, batched (through the
        group's factor banks where a bank's every factor is pending; ``preserve_function`` groups'
        layers through ``retract_triples``)."""
        self.flush()  # normally empty: the end of backward() flushed it
        pending, self.pending = self.pending, defaultdict(list)
        groups = self.optimizer.param_groups
        preserved = {id(p) for gi, ps in pending.items() if groups[gi]["preserve_function"] for p in ps}
        if preserved:
            retract_triples(preserved)
        for gi, ps in pending.items():
            group = groups[gi]
            if group["preserve_function"]:
                continue
            live, covered = live_banks(self.optimizer.banks_of(gi), {id(p) for p in ps})
            for bank in live:
                bank.retract_(group["retraction"])
            retract_([p for p in ps if id(p) not in covered], group["retraction"])
