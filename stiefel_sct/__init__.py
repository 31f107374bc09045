"""stiefel-sct: Spectral Compact Training for PyTorch.

Weights are stored as ``W = V diag(s) U^T`` with ``U``, ``V`` on the Stiefel manifold and are
never built densely; :class:`SpectralAdam` trains them and retracts the factors after each step.
"""

from .calibration import InputMoments, collect_input_moments
from .checkpoint import load_optimizer_state, load_spectral, save_spectral
from .config import SpectralConfig
from .convert import ConversionReport, LayerConversion, budget_ranks, densify, match_module, spectralize
from .export import export_peft_lora
from .hook import RetractionHandle, stiefel_retraction
from .layers import SpectralConv1D, SpectralEmbedding, SpectralLinear, spectral_linear
from .manifold import (
    RETRACTIONS,
    Stiefel,
    cholqr2_retraction,
    is_stiefel,
    orthonormality_error,
    preserving_retraction,
    qr_retraction,
    retract,
    retract_,
    retract_all,
)
from .optim import SpectralAdam, SpectralAdamW, spectral_adam
from .rank import kept_energy, select_rank, spectral_params
from .rank_scheduler import RankScheduler

__version__ = "0.2.0"

__all__ = [
    "ConversionReport",
    "InputMoments",
    "LayerConversion",
    "RETRACTIONS",
    "RankScheduler",
    "RetractionHandle",
    "SpectralAdam",
    "SpectralAdamW",
    "SpectralConfig",
    "SpectralConv1D",
    "SpectralEmbedding",
    "SpectralLinear",
    "Stiefel",
    "__version__",
    "budget_ranks",
    "cholqr2_retraction",
    "collect_input_moments",
    "densify",
    "export_peft_lora",
    "is_stiefel",
    "kept_energy",
    "load_optimizer_state",
    "load_spectral",
    "match_module",
    "orthonormality_error",
    "preserving_retraction",
    "qr_retraction",
    "retract",
    "retract_",
    "retract_all",
    "save_spectral",
    "select_rank",
    "spectral_adam",
    "spectral_linear",
    "spectral_params",
    "spectralize",
    "stiefel_retraction",
]
