"""The layer kinds the library converts, one table (:data:`KINDS`): each kind knows its dense
module, its spectral module, its dense shape, how to convert from dense and back, its checkpoint
entry and how to rebuild from one. :mod:`stiefel_sct.convert` and :mod:`stiefel_sct.checkpoint`
loop over the table; a new kind is one more entry.

=============  ================================  ===========================  ========
kind           dense module                      spectral module              residual
=============  ================================  ===========================  ========
``linear``     ``nn.Linear``                     :class:`SpectralLinear`      yes
``embedding``  ``nn.Embedding``                  :class:`SpectralEmbedding`   no
``conv1d``     GPT-2 ``Conv1D`` (transformers)   :class:`SpectralConv1D`      yes
=============  ================================  ===========================  ========

The ``linear`` and ``conv1d`` kinds compute ``y = x W^T (+ bias)`` (:attr:`LayerKind.linear`):
calibrated conversion applies to them. Residual mode (:attr:`LayerKind.residual`) applies to the
same two today; the flags are separate because they answer separate questions.

Dense modules are matched by exact type: subclasses (quantized, LoRA-wrapped, ...) are not ours
to touch.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .layers import SpectralConv1D, SpectralEmbedding, SpectralLinear, SpectralModule, conv1d_as_linear

__all__ = ["KINDS", "LayerKind", "dense_kind", "kind_named", "spectral_kind"]


def _weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight")  # noqa: B009 (nn.Module types attributes as Tensor | Module)
    assert isinstance(weight, torch.Tensor)
    return weight


class LayerKind:
    """One layer kind. ``dims``: the checkpoint entry's two size keys, ``U``'s rows first."""

    name: str
    spectral: type
    dims: Tuple[str, str]
    residual: bool = False  # whether residual mode (a frozen rest of the weight) applies
    linear: bool = False  # whether the layer is y = x W^T (+ bias): calibration applies, the entry has "bias"

    def dense_type(self) -> Optional[type]:
        raise NotImplementedError

    def is_dense(self, module: nn.Module) -> bool:
        return type(module) is self.dense_type()

    def sizes(self, module: nn.Module) -> Tuple[int, int]:
        """``(U's rows, V's rows)`` of ``module``, dense or spectral."""
        if isinstance(module, SpectralModule):
            return int(getattr(module, self.dims[0])), int(getattr(module, self.dims[1]))
        return self.dense_sizes(module)

    def dense_sizes(self, module: nn.Module) -> Tuple[int, int]:
        raise NotImplementedError

    def matrix(self, module: nn.Module) -> torch.Tensor:
        """A dense module's weight as the spectral form's ``V diag(s) U^T`` shape, ``(V rows, U rows)``."""
        raise NotImplementedError

    def extra(self, module: nn.Module) -> Dict[str, Any]:
        """The spectral constructor's keywords beyond the sizes and the rank, read from a dense module."""
        return {}

    def from_dense(self, module: nn.Module, *, rank: Optional[int], energy: Optional[float], retraction: str,
                   residual_dtype: Optional[torch.dtype]) -> SpectralModule:
        raise NotImplementedError

    def from_factors(self, module: nn.Module, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, *, retraction: str,
                     residual_dtype: Optional[torch.dtype]) -> SpectralModule:
        """The spectral layer standing for ``module`` with the given factors (calibrated conversion)."""
        raise ValueError(f"a {self.name} layer has no conversion from given factors (calibration converts "
                         "the linear kinds)")

    def to_dense(self, module: SpectralModule) -> nn.Module:
        raise NotImplementedError

    def entry(self, module: SpectralModule) -> Dict[str, Any]:
        """The checkpoint entry's kind-specific fields."""
        sizes = self.sizes(module)
        return {self.dims[0]: sizes[0], self.dims[1]: sizes[1]}

    def build(self, entry: Dict[str, Any], **factory: Any) -> SpectralModule:
        """The layer of a checkpoint entry (``factory``: device, dtype, retraction, ...)."""
        raise NotImplementedError


class _Linear(LayerKind):
    name, spectral, dims, residual, linear = "linear", SpectralLinear, ("in_features", "out_features"), True, True

    def dense_type(self) -> Optional[type]:
        return nn.Linear

    def dense_sizes(self, module: nn.Module) -> Tuple[int, int]:
        linear = self.as_linear(module)
        return linear.in_features, linear.out_features

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return self.as_linear(module).weight

    def extra(self, module: nn.Module) -> Dict[str, Any]:
        return {"bias": module.bias is not None}

    def as_linear(self, module: nn.Module) -> nn.Linear:
        assert isinstance(module, nn.Linear)
        return module

    def from_dense(self, module: nn.Module, *, rank: Optional[int], energy: Optional[float], retraction: str,
                   residual_dtype: Optional[torch.dtype]) -> SpectralModule:
        return self.spectral.from_linear(self.as_linear(module), rank=rank, energy=energy, retraction=retraction,
                                         residual_dtype=residual_dtype)

    def from_factors(self, module: nn.Module, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, *, retraction: str,
                     residual_dtype: Optional[torch.dtype]) -> SpectralModule:
        return self.spectral.from_factors(self.as_linear(module), U, s, V, retraction=retraction,
                                          residual_dtype=residual_dtype)

    def to_dense(self, module: SpectralModule) -> nn.Module:
        assert isinstance(module, SpectralLinear)
        return module.to_linear()

    def entry(self, module: SpectralModule) -> Dict[str, Any]:
        return {**super().entry(module), "bias": getattr(module, "bias", None) is not None}

    def build(self, entry: Dict[str, Any], **factory: Any) -> SpectralModule:
        return self.spectral(entry[self.dims[0]], entry[self.dims[1]], entry["rank"], bias=entry["bias"], **factory)


class _Conv1D(_Linear):
    name, spectral = "conv1d", SpectralConv1D

    def dense_type(self) -> Optional[type]:
        # transformers is optional: without it already imported, no model holds a Conv1D
        utils = sys.modules.get("transformers.pytorch_utils")
        return getattr(utils, "Conv1D", None)

    def dense_sizes(self, module: nn.Module) -> Tuple[int, int]:
        nx, nf = _weight(module).shape
        return int(nx), int(nf)

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return _weight(module).t()

    def as_linear(self, module: nn.Module) -> nn.Linear:
        return conv1d_as_linear(module)

    def to_dense(self, module: SpectralModule) -> nn.Module:
        assert isinstance(module, SpectralConv1D)
        return module.to_conv1d()


class _Embedding(LayerKind):
    name, spectral, dims = "embedding", SpectralEmbedding, ("num_embeddings", "embedding_dim")

    def dense_type(self) -> Optional[type]:
        return nn.Embedding

    def dense_sizes(self, module: nn.Module) -> Tuple[int, int]:
        assert isinstance(module, nn.Embedding)
        return module.num_embeddings, module.embedding_dim

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return _weight(module)

    def extra(self, module: nn.Module) -> Dict[str, Any]:
        return {"padding_idx": module.padding_idx}

    def from_dense(self, module: nn.Module, *, rank: Optional[int], energy: Optional[float], retraction: str,
                   residual_dtype: Optional[torch.dtype]) -> SpectralModule:
        if residual_dtype is not None:
            raise ValueError("residual mode applies to linear layers; embeddings cannot be residual")
        assert isinstance(module, nn.Embedding)
        return SpectralEmbedding.from_embedding(module, rank=rank, energy=energy, retraction=retraction)

    def to_dense(self, module: SpectralModule) -> nn.Module:
        assert isinstance(module, SpectralEmbedding)
        return module.to_embedding()

    def entry(self, module: SpectralModule) -> Dict[str, Any]:
        return {**super().entry(module), "padding_idx": getattr(module, "padding_idx", None)}

    def build(self, entry: Dict[str, Any], **factory: Any) -> SpectralModule:
        factory.pop("residual_dtype", None)
        return SpectralEmbedding(entry[self.dims[0]], entry[self.dims[1]], entry["rank"],
                                 padding_idx=entry["padding_idx"], **factory)


KINDS: Tuple[LayerKind, ...] = (_Linear(), _Embedding(), _Conv1D())


def dense_kind(module: nn.Module) -> Optional[LayerKind]:
    """The kind whose dense module ``module`` is (exact type), ``None`` if none."""
    return next((k for k in KINDS if k.is_dense(module)), None)


def spectral_kind(module: nn.Module) -> Optional[LayerKind]:
    """The kind whose spectral module ``module`` is (the most derived: a subclass of
    :class:`SpectralConv1D` is a ``conv1d``, of :class:`SpectralLinear` a ``linear``), ``None`` if none."""
    found = [k for k in KINDS if isinstance(module, k.spectral)]
    return max(found, key=lambda k: len(k.spectral.__mro__), default=None)


def kind_named(name: str) -> LayerKind:
    """The kind a checkpoint entry names; ``ValueError`` naming the known ones otherwise."""
    for k in KINDS:
        if k.name == name:
            return k
    raise ValueError(f"layer kind must be one of {[k.name for k in KINDS]}, got {name!r}")
