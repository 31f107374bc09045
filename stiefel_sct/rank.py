"""Choosing a rank from a spectrum."""

from __future__ import annotations

import torch

from .checks import is_real

__all__ = ["check_energy", "kept_energy", "select_rank", "spectral_params"]


def spectral_params(m: int, n: int, k: int = 1) -> int:
    """Parameters of a rank-``k`` spectral ``n x m`` weight: ``U`` (``m k``), ``s`` (``k``), ``V``
    (``n k``), i.e. ``k (m + n + 1)`` (the one place this formula is written)."""
    return k * (m + n + 1)


def check_energy(energy: object) -> float:
    """Validate a retained-energy fraction: a real number in ``(0, 1]``."""
    if not is_real(energy):
        raise TypeError(f"energy must be a float in (0, 1], got {type(energy).__name__}")
    energy = float(energy)
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    return energy


def kept_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of ``sum sigma_i^2`` kept by ranks ``1..len(sigma)`` (float64)."""
    sq = singular_values.detach().to(torch.float64).square()
    cum = torch.cumsum(sq, 0)
    total = cum[-1]
    if total <= 0:  # zero matrix: any rank keeps "everything"
        return torch.ones_like(cum)
    return cum / total


def select_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` with ``sum_{i<k} sigma_i^2 >= energy * sum_i sigma_i^2``.

    ``singular_values`` must be sorted in non-increasing order (as ``torch.linalg.svd`` returns
    them). ``energy=1.0`` keeps every non-zero singular value.
    """
    energy = check_energy(energy)
    if singular_values.dim() != 1 or singular_values.numel() == 0:
        raise ValueError(f"singular_values must be a non-empty 1-D tensor, got shape {tuple(singular_values.shape)}")
    frac = kept_energy(singular_values)
    reached = (frac >= energy).nonzero()
    k = int(reached[0]) + 1 if reached.numel() else frac.numel()
    return k
