"""SpectralConfig: the recipe of a conversion, as one checked object that a checkpoint keeps.

Like PEFT's ``LoraConfig``: a dataclass whose fields are checked once, in ``__post_init__``,
that :func:`~stiefel_sct.spectralize` takes whole (``spectralize(model, config)``; its keywords
build one), that the converted model carries as ``model.spectral_config`` and that
:func:`~stiefel_sct.save_spectral` writes verbatim into ``spectral_config.json`` beside the
per-layer ranks it resolved to (:meth:`SpectralConfig.from_dict` reads it back). The calibration
*data* is not part of the recipe (it is not JSON); whether the conversion was calibrated is
recorded beside it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

from .calibration import DEFAULT_DAMPING, DEFAULT_GRAD_DAMPING, check_damping, check_whitening
from .checks import check_bool, check_int, is_real
from .layers import RESIDUAL_DTYPES, check_residual_dtype
from .manifold import check_retraction
from .rank import check_energy

__all__ = ["DIRECTIONS", "SpectralConfig"]

# which directions a residual layer trains (SpectralConfig.directions)
DIRECTIONS = ("principal", "minor", "contrast")

Selector = Union[str, List[str], None]
_RESIDUAL_NAMES = {str(d).removeprefix("torch."): d for d in RESIDUAL_DTYPES}


def _selector(value: object, name: str) -> Selector:
    """A regex string (checked to compile) or a list of module names; tuples become lists."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{name} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, Iterable):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(s, str) for s in items):
            raise TypeError(f"{name} must be a regex string or a list of module names (str)")
        return items
    raise TypeError(f"{name} must be None, a regex string or a list of module names, got {type(value).__name__}")


@dataclass
class SpectralConfig:
    """How :func:`~stiefel_sct.spectralize` converts a model: exactly one of ``rank``,
    ``energy``, ``budget`` or ``budget_fraction``, and the options below (their meaning is
    :func:`~stiefel_sct.spectralize`'s).

    Args:
        rank: singular triplets kept per layer (``>= 1``).
        energy: per layer, the smallest rank holding this fraction of ``sum sigma^2``, in ``(0, 1]``.
        budget: the model's parameter count after conversion, a count (``>= 1``).
        budget_fraction: the converted layers' parameters as a fraction of their dense parameters,
            in ``(0, 1]``; everything left as it is counts in full. ``0.5`` halves the selected
            layers. (The experiments' "SCT at 50%".)
        include, exclude: which modules to convert / leave dense: a regex or a list of names.
        embeddings: also convert ``nn.Embedding``.
        convert_small: also convert layers the spectral form would not make smaller.
        retraction: the factors' retraction backend, ``"qr"`` or ``"cholqr2"``.
        damping: the calibrated whitening's ridge (used only with calibration data), ``>= 0``.
        whitening: the calibrated metric: ``"inputs"`` (the layer's output error on its inputs) or
            ``"fisher"`` (that error weighed by the loss gradient at the output too; the
            calibration batches must yield a loss). Only with calibration data.
        grad_damping: ``whitening="fisher"``'s ridge on the output-gradient moment, ``>= 0``.
        residual_dtype: residual mode's storage dtype (``"float32"``, ``"bfloat16"`` or the
            ``torch.dtype``; kept as its name), or ``None`` for compact layers.
        directions: which ``rank`` directions a residual layer trains: ``"principal"`` (the
            strongest, the default), ``"minor"`` (the weakest) or ``"contrast"`` (those the
            calibration text uses most relative to a text to keep); the last two in residual mode
            and with ``rank`` only.
        allow_dense: with ``budget`` or ``budget_fraction``, a layer whose every profitable
            direction the budget took may stay dense instead, for the few parameters more that its
            whole weight costs (:func:`~stiefel_sct.budget_ranks`); not with ``convert_small`` or
            residual mode.

    ``to_dict()`` / ``from_dict()`` round-trip through JSON; ``from_dict`` refuses unknown keys
    by name, so a recipe saved by a later version is not half-read.
    """

    rank: Optional[int] = None
    energy: Optional[float] = None
    budget: Optional[int] = None
    budget_fraction: Optional[float] = None
    include: Selector = None
    exclude: Selector = None
    embeddings: bool = False
    convert_small: bool = False
    retraction: str = "qr"
    damping: float = DEFAULT_DAMPING
    whitening: str = "inputs"
    grad_damping: float = DEFAULT_GRAD_DAMPING
    residual_dtype: Optional[str] = None
    directions: str = "principal"
    allow_dense: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "energy", "budget", "budget_fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of rank, energy, budget or budget_fraction"
                             + (f", got {', '.join(given)}" if given else ""))
        self.rank = check_int(self.rank, "rank", 1, optional=True)
        if self.energy is not None:
            self.energy = check_energy(self.energy)
        self.budget = check_int(self.budget, "budget", 1, optional=True)
        if self.budget_fraction is not None:
            if not is_real(self.budget_fraction) or not 0.0 < self.budget_fraction <= 1.0:
                raise ValueError(f"budget_fraction must be a float in (0, 1], got {self.budget_fraction!r}")
            self.budget_fraction = float(self.budget_fraction)
        self.include = _selector(self.include, "include")
        self.exclude = _selector(self.exclude, "exclude")
        for flag in ("embeddings", "convert_small", "allow_dense"):
            check_bool(getattr(self, flag), flag)
        self.retraction = check_retraction(self.retraction)
        self.damping = check_damping(self.damping)
        self.whitening = check_whitening(self.whitening)
        self.grad_damping = check_damping(self.grad_damping, "grad_damping")
        if self.whitening == "fisher" and self.embeddings:
            raise ValueError("whitening='fisher' weighs linear layers by their loss gradients; embeddings have no "
                             "such metric: use embeddings=False")
        if self.residual_dtype is not None:
            dtype = _RESIDUAL_NAMES.get(self.residual_dtype, self.residual_dtype) \
                if isinstance(self.residual_dtype, str) else self.residual_dtype
            self.residual_dtype = str(check_residual_dtype(dtype)).removeprefix("torch.")
            if self.embeddings:
                raise ValueError("residual_dtype: residual mode converts linear layers only; use embeddings=False")
        self._check_directions()
        self._check_allow_dense()

    def _check_allow_dense(self) -> None:
        """``allow_dense`` comes with a budget, and neither with ``convert_small`` nor residual mode."""
        if not self.allow_dense:
            return
        if self.budget is None and self.budget_fraction is None:
            raise ValueError("allow_dense lets a budget keep a layer whole: give budget or budget_fraction")
        if self.residual_dtype is not None:
            raise ValueError("allow_dense would leave a layer dense and wholly trainable; residual mode keeps every "
                             "layer's weight already (frozen) and trains its factors: use one of them")
        if self.convert_small:
            raise ValueError("allow_dense keeps layers dense that convert_small would convert at full rank: "
                             "use one of them")

    def _check_directions(self) -> None:
        """``directions`` is known; ``"minor"`` and ``"contrast"`` come with residual mode and a ``rank``."""
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {', '.join(map(repr, DIRECTIONS))}, got {self.directions!r}")
        if self.directions != "principal":
            # such a part alone cannot stand for a layer: the rest of the weight must stay, frozen
            if self.residual_dtype is None:
                raise ValueError(f"directions={self.directions!r} trains part of each layer and keeps the rest as a "
                                 "frozen residual: it needs residual mode (residual_dtype=...)")
            if self.rank is None:
                raise ValueError(f"directions={self.directions!r} needs rank=...: energy and budgets rank directions "
                                 "from the strongest down")
        if self.directions == "contrast" and self.whitening != "inputs":
            raise ValueError("directions='contrast' compares two texts' inputs (whitening='inputs'); "
                             f"got whitening={self.whitening!r}")

    @property
    def residual_torch_dtype(self) -> Optional[torch.dtype]:
        """``residual_dtype`` as a ``torch.dtype`` (``None`` for compact layers)."""
        return None if self.residual_dtype is None else _RESIDUAL_NAMES[self.residual_dtype]

    def to_dict(self) -> Dict[str, Any]:
        """The recipe as JSON-ready values, every field present."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> SpectralConfig:
        """A config from :meth:`to_dict`'s output (checked as the constructor checks it)."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SpectralConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)
