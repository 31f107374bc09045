"""SpectralAdam's per-parameter state: created on first use, collected once per step into one
named container of parallel lists (:class:`GroupTensors`, torch's ``_init_group`` contract), and
restored from a saved state dict in the group's ``state_dtype``."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple, cast

import torch

from .distributed import is_sharded_factor
from .manifold import is_stiefel, plain
from .quant import dequantize, quantize_, quantized_zeros

__all__ = ["MOMENTS", "GroupTensors", "collect", "init_state", "is_dtensor", "is_factor", "local",
           "restore_moments"]

MOMENTS = (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False))  # (key, signed)


@functools.cache
def _dtensor_type() -> tuple:
    """``(DTensor,)``, or ``()`` for a torch without distributed; imported once, on first use."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return (DTensor,)


def is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor_type())


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor``; any other tensor as it is."""
    return cast(Any, t).to_local() if is_dtensor(t) else t  # a DTensor (torch's stubs type it as Tensor)


def is_factor(p: torch.Tensor) -> bool:
    """Whether ``p`` is kept on the Stiefel manifold: a geoopt Stiefel tensor, or a factor that
    :func:`~stiefel_sct.distributed.shard_model` sharded (``fully_shard`` drops the subclass)."""
    return is_stiefel(p) or is_sharded_factor(p)


@dataclass
class GroupTensors:
    """A param group's parameters that have a gradient, with parallel lists of their gradients,
    moments (``max_exp_avg_sqs`` entries ``None`` without ``amsgrad``), step counts, whether each
    is a Stiefel factor (decided once, here) and, for 8-bit moments, the block scales
    (``scales``: ``(exp_avg, exp_avg_sq, max_exp_avg_sq)`` lists, else ``None``)."""

    params: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)
    exp_avgs: List[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: List[torch.Tensor] = field(default_factory=list)
    max_exp_avg_sqs: List[Optional[torch.Tensor]] = field(default_factory=list)
    steps: List[torch.Tensor] = field(default_factory=list)
    factors: List[bool] = field(default_factory=list)
    scales: Optional[Tuple[list, list, list]] = None

    def take(self, indices: Sequence[int]) -> GroupTensors:
        """The entries at ``indices``, in that order."""
        def pick(seq: Sequence[Any]) -> List[Any]:
            return [seq[i] for i in indices]

        scales = None if self.scales is None else (pick(self.scales[0]), pick(self.scales[1]), pick(self.scales[2]))
        return GroupTensors(pick(self.params), pick(self.grads), pick(self.exp_avgs), pick(self.exp_avg_sqs),
                            pick(self.max_exp_avg_sqs), pick(self.steps), pick(self.factors), scales)

    def kernel_args(self) -> tuple:
        """The positional lists of an :mod:`stiefel_sct.adam` kernel."""
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.steps

    def localized(self) -> GroupTensors:
        """This process's shards of every tensor (FSDP2's ``DTensor`` parameters and state)."""
        opt = [None if m is None else local(m) for m in self.max_exp_avg_sqs]
        return GroupTensors([local(p) for p in self.params], [local(g) for g in self.grads],
                            [local(m) for m in self.exp_avgs], [local(v) for v in self.exp_avg_sqs], opt,
                            self.steps, self.factors, self.scales)


def init_state(state: MutableMapping[str, Any], p: torch.Tensor, group: Mapping[str, Any]) -> None:
    """Fill ``p``'s ``state`` where missing: a float32 ``step``, moments in the group's
    ``state_dtype`` (8-bit: codes and block scales), ``max_exp_avg_sq`` once the group uses ``amsgrad``."""
    amsgrad = group["amsgrad"]
    if state and (not amsgrad or "max_exp_avg_sq" in state):  # every step after the first
        return
    dtype = group["state_dtype"] or p.dtype
    like = p.detach() if is_dtensor(p) else plain(p)  # sharded moments for sharded parameters
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    for key, _ in MOMENTS:
        if key in state or (key == "max_exp_avg_sq" and not amsgrad):
            continue
        if dtype == torch.uint8:
            state[key], state[key + "_scale"] = quantized_zeros(like)
        else:
            state[key] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)


def collect(states: MutableMapping[torch.Tensor, Any], group: Mapping[str, Any],
            candidates: Iterable[torch.Tensor]) -> GroupTensors:
    """The :class:`GroupTensors` of ``candidates`` (parameters of ``group``) that have a gradient,
    creating missing state in ``states`` (the optimizer's ``state``)."""
    out = GroupTensors()
    amsgrad = group["amsgrad"]
    quantized = group["state_dtype"] == torch.uint8
    scales: Tuple[list, list, list] = ([], [], [])
    for p in candidates:
        if p.grad is None:
            continue
        state = states[p]
        init_state(state, p, group)
        out.params.append(p)
        out.grads.append(p.grad)
        out.exp_avgs.append(state["exp_avg"])
        out.exp_avg_sqs.append(state["exp_avg_sq"])
        out.max_exp_avg_sqs.append(state["max_exp_avg_sq"] if amsgrad else None)
        out.steps.append(state["step"])
        out.factors.append(is_factor(p))
        if quantized:
            for seq, (key, _) in zip(scales, MOMENTS):
                seq.append(state.get(key + "_scale"))
    out.scales = scales if quantized else None
    return out


def restore_moments(state: MutableMapping[str, Any], p: torch.Tensor, group: Mapping[str, Any],
                    saved: Mapping[str, Any]) -> None:
    """Put ``saved``'s moments into ``p``'s ``state`` in the group's ``state_dtype``, straight from
    the saved tensors (torch's loader casts moments to the parameter's dtype, which would undo a
    bf16 or 8-bit state): 8-bit into 8-bit keeps the codes, otherwise decode and re-encode."""
    dtype = group["state_dtype"] or p.dtype
    for key, signed in MOMENTS:
        value = saved.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        state.pop(key + "_scale", None)  # torch's loader copied it, cast to the parameter's dtype
        value = value.to(p.device)
        saved_scales = saved[key + "_scale"].to(p.device, torch.float32) if value.dtype == torch.uint8 else None
        if dtype == torch.uint8 and saved_scales is not None:
            state[key], state[key + "_scale"] = value, saved_scales
            continue
        if saved_scales is not None:
            value = dequantize(value, saved_scales, signed)
        if dtype == torch.uint8:
            state[key], state[key + "_scale"] = quantized_zeros(value)
            quantize_(value, state[key], state[key + "_scale"], signed)
        else:
            state[key] = value.to(dtype)
