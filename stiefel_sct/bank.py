"""FactorBank: same-shape Stiefel factors kept in contiguous chunk slots, so an optimizer
retracts each chunk with one batched factorization, straight into spare memory, with no copies."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

from .manifold import OnePass, one_pass_factors, one_pass_into, plain, retract_stack_into

__all__ = ["CHUNK_BYTES", "DEVICE_CHUNK_BYTES", "FactorBank", "GroupBanks", "chunk_bytes_for", "live_banks"]

# Bytes per chunk slot. Each bank keeps one spare slot, so this is also the bank's extra memory:
# 8 MB instead of 32 MB cut the spares of the 8-layer 70B-shaped set (rank 32) from 63.5 to
# 15.0 MB (at 80 layers ~113 -> ~39 MB) for a SpectralAdam step of 94.2 vs 90.4 ms (median of 12,
# interleaved; within this machine's run-to-run noise): 8 matrices of 8192 x 32 per batched
# factorization are already at GEMM speed.
CHUNK_BYTES = 8 << 20
# Per device type where the CPU's figure is wrong. On a GPU a chunk's Adam + factorization is a
# handful of kernel launches and a host sync whatever its size, so small chunks are launch-bound:
# measured on an H200 (70B-shaped set, rank 32, fp32, one process, medians of 6 steps), the
# SpectralAdam step at 8 / 64 / 512 MB chunks took 20.2 / 7.0 / 5.6 ms at 8 layers (fused Adam
# alone 0.9 ms) and 201 / 62 / 58 ms at 80 layers (fused Adam 12.5 ms). 64 MB takes most of the
# gain for a 64 MB spare per factor shape.
DEVICE_CHUNK_BYTES = {"cuda": 64 << 20}


def chunk_bytes_for(device: torch.device) -> int:
    """The chunk slot size a :class:`FactorBank` on ``device`` uses by default."""
    return DEVICE_CHUNK_BYTES.get(device.type, CHUNK_BYTES)


class FactorBank:
    """Same-shape Stiefel factors kept in contiguous chunk slots, retracted without copies.

    ``S = ceil(G / c) + 1`` slots of ``c`` matrices each (``c`` from ``chunk_bytes``): chunk ``j``
    of the factors lives in one slot, one slot is spare. The retraction of chunk ``j`` reads its
    slot and writes the result straight into the spare slot (one batched factorization,
    :func:`~stiefel_sct.manifold.retract_into`), the chunk's parameters are re-pointed there
    (``p.data``; values and identity unchanged) and the old slot becomes the spare. So the
    factorization runs on the parameters' own memory: no ``torch.stack``, no copy back, one chunk
    of extra memory. Slots are allocated one at a time when the bank is built, each right before
    its factors move in and free their old storage, so building never holds a second copy of
    the factors either.
    """

    def __init__(self, params: List[torch.Tensor], chunk_bytes: Optional[int] = None) -> None:
        first = params[0]
        chunk_bytes = chunk_bytes_for(first.device) if chunk_bytes is None else chunk_bytes
        per_matrix = first.numel() * first.element_size()
        c = max(1, min(len(params), chunk_bytes // per_matrix))
        n_chunks = -(-len(params) // c)
        self.params = params
        self.chunks = [params[j * c:(j + 1) * c] for j in range(n_chunks)]
        self.slots: List[torch.Tensor] = []
        with torch.no_grad():
            for chunk in self.chunks:
                slot = torch.empty((c,) + tuple(first.shape), dtype=first.dtype, device=first.device)
                views = slot[: len(chunk)].unbind(0)
                torch._foreach_copy_(list(views), [plain(p) for p in chunk])
                for p, v in zip(chunk, views):
                    p.data = v
                self.slots.append(slot)
        self.slots.append(torch.empty_like(self.slots[0]))  # the spare
        self.slot_of = list(range(n_chunks))
        self.spare = n_chunks
        self.ids = {id(p) for p in params}
        # each slot's matrices as views and their addresses, made once: re-pointing a chunk's
        # parameters is a lookup per factor, and where each factor should live follows from slot_of
        self._views = [slot.unbind(0) for slot in self.slots]
        self._view_ptrs = [[v.data_ptr() for v in views] for views in self._views]
        self._grams: Optional[torch.Tensor] = None  # (len(params), k, k), filled chunk by chunk by gram()
        self._workspace: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # fp32, low-precision banks

    def intact(self) -> bool:
        """False once something else re-homed a factor (``model.to(...)``, ``p.data = ...``)."""
        first, slot = self.params[0], self.slots[0]
        return (
            first.device == slot.device and first.dtype == slot.dtype
            and all(p.data_ptr() == ptr for chunk, home in zip(self.chunks, self.slot_of)
                    for p, ptr in zip(chunk, self._view_ptrs[home]))
        )

    def batches(self, retraction: str) -> bool:
        """Whether this bank's retraction takes its ``k x k`` work for all chunks at once
        (:meth:`gram`, :func:`~stiefel_sct.manifold.one_pass_factors`, then :meth:`retract_chunk_`
        with ``passes``): CholeskyQR on fp32/fp64 factors. Against a Cholesky, a certificate and a
        host sync per chunk (``benchmarks/bench_ab``, the 70B-shaped set at rank 32, 2-core Intel
        Xeon, 2026-12-07, median of the per-round ratios): 0.967 of the SpectralAdam step at 8 layers
        (40 rounds, 23 chunks) and 0.961 at 80 (15 rounds, 230 chunks). Low-precision banks keep the
        per-chunk path: their Gram matrices are formed from an fp32 copy of the chunk, which the
        retraction would have to make a second time."""
        return retraction == "cholqr2" and self.slots[0].dtype in (torch.float32, torch.float64)

    def _start(self, j: int) -> int:
        """Bank-order index of chunk ``j``'s first factor (every chunk but the last is full)."""
        return j * len(self.chunks[0])

    def gram(self, j: int) -> torch.Tensor:
        """``X^T X`` of chunk ``j``'s factors (B, k, k), formed while the chunk is in cache, into
        this bank's entries of :meth:`grams` (returned)."""
        b = len(self.chunks[j])
        x = self.slots[self.slot_of[j]][:b]
        if self._grams is None:
            k = x.shape[-1]
            self._grams = torch.empty((len(self.params), k, k), dtype=x.dtype, device=x.device)
        start = self._start(j)
        return torch.bmm(x.mT, x, out=self._grams[start:start + b])

    def grams(self) -> torch.Tensor:
        """Every factor's Gram matrix, in bank order, once :meth:`gram` ran for each chunk (this
        step's values: the buffer is reused)."""
        if self._grams is None:
            raise RuntimeError("FactorBank.grams(): call gram(j) for every chunk j first")
        return self._grams

    @torch.no_grad()
    def retract_chunk_(self, j: int, retraction: str, passes: Optional[OnePass] = None) -> None:
        """Retract chunk ``j`` into the spare slot and re-point its parameters there. ``passes``:
        :func:`~stiefel_sct.manifold.one_pass_factors` of every chunk's :meth:`gram` (in chunk
        order), used where one pass is certified for each of this chunk's factors."""
        chunk = self.chunks[j]
        b = len(chunk)
        dst = self.slots[self.spare][:b]
        x = self.slots[self.slot_of[j]][:b]
        start = self._start(j)
        if passes is None or not one_pass_into(x, passes, start, dst):
            if dst.dtype not in (torch.float32, torch.float64) and self._workspace is None:
                self._workspace = (torch.empty(self.slots[0].shape, dtype=torch.float32, device=dst.device),
                                   torch.empty(self.slots[0].shape, dtype=torch.float32, device=dst.device))
            retract_stack_into(x, dst, retraction, self._workspace)
        for p, v in zip(chunk, self._views[self.spare]):
            p.data = v
        self.slot_of[j], self.spare = self.spare, self.slot_of[j]

    def retract_(self, retraction: str) -> None:
        """Retract every factor of the bank."""
        n = len(self.chunks)
        passes = None
        if self.batches(retraction):
            for j in range(n):
                self.gram(j)
            passes = one_pass_factors(self.grams())
        for j in range(n):
            self.retract_chunk_(j, retraction, passes)


class GroupBanks:
    """The :class:`FactorBank` of each (shape, dtype, device) among one param group's factors
    (layouts with a single factor get none), rebuilt only when the factors change or a bank was
    re-homed by something else (:meth:`FactorBank.intact`)."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._banks: List[FactorBank] = []

    def of(self, factors: List[torch.Tensor]) -> List[FactorBank]:
        key = tuple(map(id, factors))
        if key != self._key or not all(b.intact() for b in self._banks):
            by_layout: Dict[tuple, List[torch.Tensor]] = {}
            for p in factors:
                by_layout.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            self._key, self._banks = key, [FactorBank(ps) for ps in by_layout.values() if len(ps) > 1]
        return self._banks


def live_banks(banks: Iterable[FactorBank], updated: Set[int]) -> Tuple[List[FactorBank], Set[int]]:
    """The banks whose every factor is in ``updated`` (ids), and the ids of the factors they cover: a
    bank's chunks are retracted whole, so the factors of any other bank are retracted loose."""
    live = [bank for bank in banks if bank.ids <= updated]
    return live, set().union(*(bank.ids for bank in live))
