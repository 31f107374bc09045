"""Blockwise 8-bit storage of Adam moments (``SpectralAdam(state_dtype=torch.uint8)``).

A moment of ``N`` elements is kept as ``N`` uint8 codes plus one fp32 scale per block of
:data:`BLOCK` consecutive elements (the block's largest magnitude): 1.016 bytes per element
instead of 4 (fp32) or 2 (bf16). Codes are **logarithmic** relative to the block's scale, because
Adam's moments span many orders of magnitude within a block and a linear code would round every
small entry of the second moment to zero (and its update ``m / (sqrt(v) + eps)`` to ``m / eps``):

* signed moments (``exp_avg``): bit 7 is the sign, the low 7 bits a level ``l`` in ``0..127``;
  ``x = sign * scale * 2^((l - 127) / 8)`` (8 levels per octave: <= 4.4% relative rounding error,
  down to ``2^-15.75 ~ 1.8e-5`` of the block's largest entry), ``l = 0`` is exactly 0;
* non-negative moments (``exp_avg_sq``, ``max_exp_avg_sq``) store ``sqrt(v)``: ``l`` in ``0..255``,
  ``sqrt(v) = scale * 2^((l - 255) / 16)`` (16 levels per octave: <= 2.2% on ``sqrt(v)``, down to
  ``2^-15.9`` of the block's largest ``sqrt(v)``, i.e. ``v`` down to ~3e-10 of its largest entry).

Rounding is to nearest in the log domain (as the bf16 moments round to nearest). Everything is
plain elementwise torch, so it runs on any device. The whole tensor is one block sequence over
its flattened elements (the last block may be short).
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["BLOCK", "dequantize", "n_blocks", "quantize_", "quantized_zeros"]

BLOCK = 256
_SIGNED = (8.0, 127)  # (levels per octave, top level)
_UNSIGNED = (16.0, 255)


def n_blocks(numel: int) -> int:
    """Number of scale entries for a moment of ``numel`` elements."""
    return -(-numel // BLOCK)


def quantized_zeros(like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of an all-zero moment shaped like ``like`` (codes keep its shape)."""
    codes = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    scales = torch.zeros(n_blocks(like.numel()), dtype=torch.float32, device=like.device)
    return codes, scales


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened into ``(n_blocks, BLOCK)``, zero-padded at the end."""
    flat = x.reshape(-1)
    pad = n_blocks(flat.numel()) * BLOCK - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, signed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The moment held by ``(codes, scales)``, shaped like ``codes``, in ``dtype``.

    ``signed=False`` returns ``v`` (the code holds ``sqrt(v)``)."""
    per_octave, top = _SIGNED if signed else _UNSIGNED
    c = _blocks(codes).to(torch.int16)
    level = (c & 127) if signed else c
    mag = torch.exp2((level.to(dtype) - top) / per_octave) * scales.to(dtype).unsqueeze(-1)
    mag = torch.where(level == 0, torch.zeros((), dtype=dtype, device=mag.device), mag)
    if signed:
        mag = torch.where(c >= 128, -mag, mag)
    else:
        mag = mag.square()
    return mag.view(-1)[: codes.numel()].view(codes.shape)


@torch.no_grad()
def quantize_(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> None:
    """Store ``x`` (any float dtype, shaped like ``codes``) into ``(codes, scales)`` in place.

    ``signed=False``: ``x`` is a non-negative second moment ``v``; ``sqrt(v)`` is coded."""
    per_octave, top = _SIGNED if signed else _UNSIGNED
    b = _blocks(x.float())
    mag = b.abs() if signed else b.clamp_min(0).sqrt()
    scale = mag.amax(dim=-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    level = torch.log2(mag / safe).mul_(per_octave).add_(top).round_().clamp_(0, top)
    level = torch.where(mag > 0, level, torch.zeros_like(level))
    if signed:
        level = torch.where(b < 0, level + 128, level)
    codes.view(-1).copy_(level.view(-1)[: codes.numel()].to(torch.uint8))
    scales.copy_(scale)
