"""Spectral layers: weights kept as ``W = V diag(s) U^T`` and never built densely."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List, Optional, Tuple

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from .checks import is_int
from .manifold import Stiefel, compute_dtype, is_stiefel, retract, stiefel_manifold
from .rank import select_rank, spectral_params
from .triples import register_factors

__all__ = ["RESIDUAL_DTYPES", "SpectralConv1D", "SpectralEmbedding", "SpectralLinear", "SpectralModule", "check_rank",
           "conv1d_as_linear", "spectral_linear",
           "weight_fingerprint"]

# dtypes a frozen residual may be stored in (bf16 halves its memory; it is never trained)
RESIDUAL_DTYPES: Tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def weight_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: identifies the base weight a residual was cut from."""
    t = weight.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_residual_dtype(dtype: object) -> torch.dtype:
    """Validate the storage dtype of a frozen residual."""
    if dtype not in RESIDUAL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in RESIDUAL_DTYPES)
        raise ValueError(f"residual_dtype must be one of {names}, got {dtype!r}")
    assert isinstance(dtype, torch.dtype)
    return dtype

def check_rank(rank: object, in_features: int, out_features: int) -> int:
    """Validate ``rank`` for an ``in_features -> out_features`` layer and return it as an int."""
    if not is_int(rank):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    limit = min(in_features, out_features)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be in [1, min(in_features, out_features)] = [1, {limit}], got {rank}"
        )
    return rank


def _check_features(value: object, name: str) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class _SpectralLinearFunction(torch.autograd.Function):
    """``((x @ U) * s) @ V^T + bias`` with a backward that reads the output gradient twice, not three times.

    Plain autograd reads ``g`` (batch x out, the largest tensor of the step) three times: for
    ``g @ V``, for ``g^T @ (h s)`` and for the bias gradient. Here the last two are one GEMM,
    ``[h s | 1]^T @ g``, whose extra row is the bias gradient; the weight-gradient GEMMs are also
    oriented to produce ``(k, out)``/``(k, in)`` results, which MKL runs faster than the transposed
    forms. Exact: same gradients as autograd through the three-matmul graph.
    """

    @staticmethod
    def forward(ctx, x, U, s, V, bias):
        h = x @ U
        hs = h * s
        if bias is None:
            y = F.linear(hs, V)
        else:
            # [h s | 1] @ [V | bias]^T: the bias rides in the GEMM, so the (batch x out) output
            # is written once (addmm would first fill it with the bias, then read it back)
            hs = torch.cat([hs, hs.new_ones(hs.shape[:-1] + (1,))], dim=-1)
            y = hs @ torch.cat([V, bias.unsqueeze(1)], dim=1).mT
        ctx.save_for_backward(x, U, s, V, h, hs)
        return y

    @staticmethod
    def backward(ctx, g):
        x, U, s, V, h, hs = ctx.saved_tensors
        need_x, need_u, need_s, need_v, need_b = ctx.needs_input_grad
        k, n = V.shape[1], V.shape[0]
        g2 = g.reshape(-1, n)
        hs2 = hs.reshape(-1, hs.shape[-1])  # (batch, k), or (batch, k + 1) with the ones column
        grad_x = grad_u = grad_s = grad_v = grad_b = None
        if need_v or need_b:
            # [hs | 1]^T @ g: dV^T and the bias gradient from one pass over g
            t = (hs2 if need_b else hs2[:, :k]).mT @ g2
            if need_v:
                grad_v = t[:k].mT
            if need_b:
                grad_b = t[k]
        if need_x or need_u or need_s:
            grad_hs = g2 @ V
            if need_s:
                grad_s = (grad_hs * h.reshape(-1, k)).sum(0)
            grad_h = grad_hs * s
            if need_x:
                grad_x = (grad_h @ U.mT).reshape(x.shape)
            if need_u:
                grad_u = (grad_h.mT @ x.reshape(-1, x.shape[-1])).mT
        return grad_x, grad_u, grad_s, grad_v, grad_b


def spectral_linear(x: torch.Tensor, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Functional form of :class:`SpectralLinear`: ``((x @ U) * s) @ V^T + bias``.

    Uses a hand-written backward (one pass fewer over the output gradient, built from
    differentiable ops, so double backward works too); under autocast or ``torch.compile``
    tracing it uses the plain three-op graph, which autograd and the compiler handle natively.
    """
    if (torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling()):
        return _SpectralLinearFunction.apply(x, U, s, V, bias)
    return F.linear((x @ U) * s, V, bias)


def _truncated_svd(weight: torch.Tensor, rank: Optional[int], energy: Optional[float], what: str):
    """``(P, S, Qh, k)`` of a dense weight, ``k`` from ``rank`` or retained ``energy`` (exactly one)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if weight.is_meta:
        raise ValueError(f"{what} needs a materialised weight; the module is on the meta device")
    P, S, Qh = torch.linalg.svd(weight.detach().to(compute_dtype(weight.dtype)), full_matrices=False)
    rows, cols = weight.shape
    if rank is not None:
        k = check_rank(rank, rows, cols)
    else:
        assert energy is not None  # exactly one of them, checked above
        k = select_rank(S, energy)
    return P, S, Qh, k


class SpectralModule(nn.Module):
    """Base of the spectral layers: holds ``U``, ``s``, ``V``, keeps ``U`` and ``V`` geoopt Stiefel
    parameters through ``_apply`` and registers the triple (:mod:`stiefel_sct.triples`)."""

    _retraction: str = "qr"
    U: geoopt.ManifoldParameter  # on Stiefel(m, k)
    s: nn.Parameter
    V: geoopt.ManifoldParameter  # on Stiefel(n, k)
    rank: int

    @property
    def manifold(self) -> Stiefel:
        """The Stiefel manifold ``U`` and ``V`` live on (shared, not a submodule)."""
        return self.U.manifold

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        super().register_parameter(name, param)
        if param is not None and name in ("U", "s", "V"):
            self.register_factors()

    def __setstate__(self, state) -> None:  # copy.deepcopy / pickle: the copy owns its factors
        super().__setstate__(state)
        self.register_factors()

    def register_factors(self) -> None:
        """Record this layer as the owner of its current ``U``, ``s``, ``V``
        (:mod:`stiefel_sct.triples`); call after rebinding them outside ``nn.Module``'s own paths."""
        register_factors(self)

    def _make_factors(self, u_rows: int, v_rows: int, rank: int, retraction: str, factory: dict) -> None:
        self._retraction = retraction
        manifold = stiefel_manifold(retraction)
        self.U = geoopt.ManifoldParameter(torch.empty(u_rows, rank, **factory), manifold=manifold)
        self.s = nn.Parameter(torch.empty(rank, **factory))
        self.V = geoopt.ManifoldParameter(torch.empty(v_rows, rank, **factory), manifold=manifold)

    @torch.no_grad()
    def _init_factors(self, s_value: float) -> bool:
        """Haar-random orthonormal ``U``, ``V`` and a constant spectrum; False on ``meta``."""
        if self.U.is_meta:
            return False
        for p in (self.U, self.V):
            p.copy_(retract(torch.randn(p.shape, device=p.device, dtype=compute_dtype(p.dtype))))
        self.s.fill_(s_value)
        return True

    def _apply(self, fn, recurse=True):
        # Module._apply replaces a parameter by a plain nn.Parameter when it cannot reuse its
        # storage (e.g. ``to_empty`` from meta): put the factors back on the manifold.
        out = super()._apply(fn, recurse)
        for name in ("U", "V"):
            p = self._parameters[name]
            if p is not None and not is_stiefel(p):
                self._parameters[name] = geoopt.ManifoldParameter(
                    p.data, manifold=stiefel_manifold(self._retraction), requires_grad=p.requires_grad
                )
        self.register_factors()
        return out


class SpectralLinear(SpectralModule):
    r"""Drop-in for :class:`torch.nn.Linear` whose weight is stored in spectral form.

    ``W = V diag(s) U^T`` (shape ``(out_features, in_features)``) with

    * ``U``: ``(in_features, rank)``, a :class:`geoopt.ManifoldParameter` on :class:`Stiefel`
      (input-space basis, orthonormal columns),
    * ``s``: ``(rank,)``, a plain parameter (the spectrum),
    * ``V``: ``(out_features, rank)``, a :class:`geoopt.ManifoldParameter` on :class:`Stiefel`
      (output-space basis),
    * ``bias``: ``(out_features,)`` or ``None``.

    ``forward(x) = ((x @ U) * s) @ V^T + bias`` for any leading batch dimensions: it costs
    ``O(b k (m + n))`` and neither ``W`` nor its gradient ever exists. Parameters:
    ``k (m + n + 1) (+ n)`` instead of ``m n (+ n)``.

    Initialisation: ``U`` and ``V`` are Haar-random orthonormal; every ``s_i`` equals
    ``sqrt(out_features / (3 rank))``; ``bias`` is uniform in ``(-1/sqrt(in), 1/sqrt(in))`` as in
    ``nn.Linear``. Why: ``nn.Linear`` draws ``W_ij ~ U(-1/sqrt(m), 1/sqrt(m))``, so
    ``E||W||_F^2 = n/3`` and an isotropic unit-variance input gives outputs of variance ``1/3``.
    With orthonormal ``U``, ``V`` that are random, ``||W||_F^2 = sum s_i^2`` and an output's
    variance is ``sum s_i^2 / n``; equal ``s_i^2 = n / (3k)`` reproduces both, so a converted
    network starts with the activation scales the dense recipe was tuned for.

    Args:
        in_features: size of each input sample ``m``.
        out_features: size of each output sample ``n``.
        rank: number of singular triplets ``k``, ``1 <= k <= min(m, n)``.
        bias: learn an additive bias (default ``True``).
        device, dtype: factory arguments, as for ``nn.Linear``. On the ``meta`` device nothing is
            initialised; call ``to_empty(device=...)`` then :meth:`reset_parameters`.
        retraction: backend of the factors' manifold, ``"qr"`` or ``"cholqr2"``.
        residual_dtype: ``None`` (default), or make this a **residual** layer whose frozen
            residual buffer is stored in this dtype (see below).

    **Residual mode** (PiSSA's split, on the manifold): ``W = V diag(s) U^T + R`` with ``R`` a
    frozen, non-persistent buffer ``W_base - V0 diag(s0) U0^T`` and ``U0``, ``s0``, ``V0`` the
    factors at conversion (persistent buffers, ``k (m + n + 1)`` numbers). Made by
    :meth:`from_linear` / :func:`~stiefel_sct.spectralize` with ``residual_dtype=...``: the function
    is the dense layer's at conversion and only the principal part trains. ``forward`` adds
    ``x @ R^T`` (computed in ``R``'s dtype); no dense trainable weight is ever built. ``R`` is never
    saved: checkpoints store ``U0``, ``s0``, ``V0`` and a fingerprint of ``W_base``, and
    :func:`~stiefel_sct.load_spectral` rebuilds ``R`` from the base model the user loads into.
    """

    __constants__ = ["in_features", "out_features", "rank"]
    residual: Optional[torch.Tensor]
    U0: torch.Tensor  # residual mode: the principal part at conversion
    s0: torch.Tensor
    V0: torch.Tensor
    base_fingerprint: Optional[str] = None
    _residual_work: torch.dtype = torch.float32  # set by attach_residual

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        retraction: str = "qr",
        residual_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        self.rank = check_rank(rank, in_features, out_features)
        factory: Dict[str, Any] = {"device": device, "dtype": dtype}
        self._make_factors(in_features, out_features, rank, retraction, factory)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.residual_dtype = None if residual_dtype is None else check_residual_dtype(residual_dtype)
        self.register_buffer("residual", None, persistent=False)
        if self.residual_dtype is not None:
            # the principal part at conversion: what the residual was cut against (and the LoRA
            # export's starting point); empty until attach_residual fills them
            self.register_buffer("U0", torch.empty(in_features, rank, **factory))
            self.register_buffer("s0", torch.empty(rank, **factory))
            self.register_buffer("V0", torch.empty(out_features, rank, **factory))
        # the column blocks of U0/s0/V0: the conversion's, then one per move (see move_residual)
        self.residual_blocks: List[int] = [rank] if self.residual_dtype is not None else []
        self.reset_parameters()

    # ------------------------------------------------------------------ init and conversion
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random orthonormal ``U``, ``V``; ``s`` and ``bias`` matching ``nn.Linear``'s scale."""
        if not self._init_factors(math.sqrt(self.out_features / (3.0 * self.rank))):
            return
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias.uniform_(-bound, bound)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: Optional[int] = None,
        energy: Optional[float] = None,
        retraction: str = "qr",
        residual_dtype: Optional[torch.dtype] = None,
    ) -> SpectralLinear:
        """Factor a (trained) dense layer by truncated SVD.

        Give exactly one of ``rank`` (number of singular values kept) or ``energy`` (fraction of
        ``sum sigma_i^2`` to keep, in ``(0, 1]``; the smallest rank that reaches it is used).
        The bias is copied. The SVD runs in float64 for fp64 weights, else in float32.
        ``residual_dtype``: keep the rest of the weight as a frozen residual in this dtype
        (residual mode, see the class docstring): the layer's function is unchanged.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        P, S, Qh, k = _truncated_svd(linear.weight, rank, energy, "from_linear")
        return cls.from_factors(linear, Qh[:k].mT, S[:k], P[:, :k], retraction=retraction,
                                residual_dtype=residual_dtype)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, linear: nn.Linear, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor,
                     retraction: str = "qr", residual_dtype: Optional[torch.dtype] = None) -> SpectralLinear:
        """A spectral layer standing for the dense ``linear`` with the given factors (orthonormal
        ``U``: ``(in, k)``, ``V``: ``(out, k)``; ``s``: ``(k,)``), in ``linear``'s dtype and device,
        its bias copied. With ``residual_dtype`` the rest of ``linear``'s weight becomes the frozen
        residual, so the layer computes exactly what ``linear`` did."""
        weight = linear.weight
        n, m = weight.shape
        k = s.shape[0]
        if U.shape != (m, k) or V.shape != (n, k):
            raise ValueError(f"from_factors: U must be ({m}, {k}) and V ({n}, {k}) for a {m} -> {n} layer of rank {k}, "
                             f"got {tuple(U.shape)} and {tuple(V.shape)}")
        layer = cls(m, n, k, bias=linear.bias is not None, device="meta", dtype=weight.dtype, retraction=retraction,
                    residual_dtype=residual_dtype)
        layer.to_empty(device=weight.device)
        layer.U.copy_(U)
        layer.s.copy_(s)
        layer.V.copy_(V)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        if residual_dtype is not None:
            layer.attach_residual(weight, reset_principal=True)
        return layer

    @torch.no_grad()
    def attach_residual(self, base_weight: torch.Tensor, reset_principal: bool = False) -> None:
        """Set the frozen residual ``R = base_weight - V0 diag(s0) U0^T`` (in ``residual_dtype``).

        ``reset_principal=True`` first takes ``U0``, ``s0``, ``V0`` from the current factors (at
        conversion); otherwise they are the loaded ones (a checkpoint rebuilding its residual from
        the base weights). The subtraction runs in float64 for fp64 weights, else float32, so the
        same base and factors give the same ``R`` bit for bit."""
        if self.residual_dtype is None:
            raise ValueError("attach_residual: this layer was built without residual_dtype (not a residual layer)")
        if tuple(base_weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"base_weight must have shape ({self.out_features}, {self.in_features}), "
                             f"got {tuple(base_weight.shape)}")
        if base_weight.is_meta:
            raise ValueError("attach_residual needs the base weight's values; it is on the meta device")
        if reset_principal:
            for key, factor in (("U0", self.U), ("s0", self.s), ("V0", self.V)):
                setattr(self, key, factor.detach().clone())
            self.residual_blocks = [self.rank]
        work = compute_dtype(base_weight.dtype)
        w = base_weight.detach().to(self.U0.device, work)
        self._residual_work = work  # the arithmetic every later move_residual repeats
        residual = (w - self._block_product(0, work)).to(self.residual_dtype)
        for b in range(1, len(self.residual_blocks)):  # the moves since conversion, replayed as they ran
            residual = (residual.to(work) - self._block_product(b, work)).to(self.residual_dtype)
        self.residual = residual
        self.base_fingerprint = weight_fingerprint(base_weight)

    def _block_product(self, b: int, work: torch.dtype) -> torch.Tensor:
        """``V0_b diag(s0_b) U0_b^T`` of column block ``b`` of the frozen factors, in ``work``."""
        start = sum(self.residual_blocks[:b])
        cols = slice(start, start + self.residual_blocks[b])
        return (self.V0[:, cols].to(work) * self.s0[cols].to(work)) @ self.U0[:, cols].to(work).mT

    def set_residual_blocks(self, blocks: List[int]) -> None:
        """Size ``U0``, ``s0``, ``V0`` for a residual that saw moves (``blocks``: the conversion's rank,
        then each move's column count, as :func:`~stiefel_sct.load_spectral` reads them from a
        checkpoint). Their values are left empty, to be loaded; then :meth:`attach_residual`."""
        if self.residual_dtype is None:
            raise ValueError("set_residual_blocks: not a residual layer")
        if not blocks or any(not is_int(b) or b < 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty list of ints >= 1, got {blocks!r}")
        total = sum(blocks)
        self.U0 = self.U0.new_empty(self.in_features, total)
        self.s0 = self.s0.new_empty(total)
        self.V0 = self.V0.new_empty(self.out_features, total)
        self.residual_blocks = list(blocks)

    @torch.no_grad()
    def move_residual(self, V: torch.Tensor, s: torch.Tensor, U: torch.Tensor) -> None:
        """Take ``V diag(s) U^T`` out of the frozen residual: ``R <- R - V diag(s) U^T``.

        The caller adds the same piece to the trained factors (growth: the residual's directions
        move into ``U``, ``s``, ``V``) or has just taken it out of them (``s`` negated: a dropped
        direction goes back into ``R``), so the layer's function changes only by ``R``'s rounding
        (exactly nothing in float64; ``R``'s storage dtype bounds it: ~1e-7 relative in float32, ~4e-3
        in bfloat16). The piece is logged as a new column block of ``U0``, ``s0``, ``V0``, and
        :meth:`attach_residual` replays the log in the same order and arithmetic, so a checkpoint
        rebuilds this ``R`` bit for bit from the base weight; the PEFT export's change
        ``V diag(s) U^T - V0 diag(s0) U0^T`` stays the trained change."""
        if self.residual is None:
            raise RuntimeError("move_residual: this residual layer has no residual yet (attach_residual)")
        g = s.shape[0]
        if g == 0:
            return
        if U.shape != (self.in_features, g) or V.shape != (self.out_features, g) or s.dim() != 1:
            raise ValueError(f"move_residual: U must be ({self.in_features}, {g}), V ({self.out_features}, {g}), "
                             f"s ({g},); got {tuple(U.shape)}, {tuple(V.shape)}, {tuple(s.shape)}")
        dtype, work = self.U0.dtype, self._residual_work
        self.U0 = torch.cat([self.U0, U.to(dtype)], dim=1)
        self.s0 = torch.cat([self.s0, s.to(dtype)])
        self.V0 = torch.cat([self.V0, V.to(dtype)], dim=1)
        self.residual_blocks = self.residual_blocks + [g]
        self.residual = (self.residual.to(work) - self._block_product(len(self.residual_blocks) - 1, work)
                         ).to(self.residual_dtype)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``W = V diag(s) U^T`` (``+ R`` in residual mode) as a dense ``(out_features, in_features)``
        tensor. Export only."""
        w = (self.V * self.s) @ self.U.mT
        if self.residual is not None:
            w = w + self.residual.to(w.dtype)
        elif self.residual_dtype is not None:
            raise RuntimeError("this residual layer has no residual yet (attach_residual, or load_spectral "
                               "into the base model)")
        return w

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An equivalent ``nn.Linear`` (dense weight materialised). Export only."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.U.device, dtype=self.U.dtype,
        )
        linear.weight.copy_(self.dense_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = spectral_linear(x, self.U, self.s, self.V, self.bias)
        if self.residual_dtype is None:
            return y
        r = self.residual
        if r is None:
            raise RuntimeError("this residual layer has no residual yet (attach_residual, or load_spectral "
                               "into the base model)")
        return y + F.linear(x.to(r.dtype), r).to(y.dtype)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def compression(self) -> float:
        """Dense weight elements over spectral factor elements, ``m n / (k (m + n + 1))``."""
        m, n, k = self.in_features, self.out_features, self.rank
        return m * n / spectral_params(m, n, k)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, U={tuple(self.U.shape)}, V={tuple(self.V.shape)}, "
            + (f"residual={str(self.residual_dtype).removeprefix('torch.')}" if self.residual_dtype is not None
               else f"compression={self.compression:.1f}x")
        )


class SpectralEmbedding(SpectralModule):
    r"""Drop-in for :class:`torch.nn.Embedding` whose table is stored as ``W = U diag(s) V^T``.

    ``U``: ``(num_embeddings, rank)`` and ``V``: ``(embedding_dim, rank)`` are
    :class:`geoopt.ManifoldParameter`\ s on :class:`Stiefel`; ``s``: ``(rank,)``. A lookup takes
    rows of ``U``, scales them by ``s`` and maps them through ``V^T``:
    ``forward(idx) = (U[idx] * s) @ V^T``. The ``num_embeddings x embedding_dim`` table never
    exists (for a 128,256-token vocabulary at d=8192 and rank 32: 4.4M parameters instead of 1.05B).

    Initialisation: random orthonormal ``U``, ``V`` and all ``s_i = sqrt(num_embeddings *
    embedding_dim / rank)``, so ``E||W||_F^2`` equals ``nn.Embedding``'s ``N(0, 1)`` table's and an
    average row has norm ``sqrt(embedding_dim)`` as there.

    ``padding_idx``: lookups of that index return zeros (and so pass no gradient), as in
    ``nn.Embedding``; the factors themselves are not constrained.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        retraction: str = "qr",
    ) -> None:
        super().__init__()
        self.num_embeddings = _check_features(num_embeddings, "num_embeddings")
        self.embedding_dim = _check_features(embedding_dim, "embedding_dim")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self.rank = check_rank(rank, num_embeddings, embedding_dim)
        self._make_factors(num_embeddings, embedding_dim, rank, retraction, {"device": device, "dtype": dtype})
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random orthonormal ``U``, ``V``; ``s`` matching ``nn.Embedding``'s table norm."""
        self._init_factors(math.sqrt(self.num_embeddings * self.embedding_dim / self.rank))

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, rank: Optional[int] = None,
                       energy: Optional[float] = None, retraction: str = "qr") -> SpectralEmbedding:
        """Factor a (trained) ``nn.Embedding`` by truncated SVD (exactly one of rank/energy)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        w = embedding.weight
        vocab, d = w.shape
        P, S, Qh, k = _truncated_svd(w, rank, energy, "from_embedding")
        layer = cls(vocab, d, k, padding_idx=embedding.padding_idx, device="meta", dtype=w.dtype, retraction=retraction)
        layer.to_empty(device=w.device)
        layer.U.copy_(P[:, :k])
        layer.s.copy_(S[:k])
        layer.V.copy_(Qh[:k].mT)
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = (F.embedding(idx, self.U) * self.s) @ self.V.mT
        if self.padding_idx is not None:
            out = out.masked_fill((idx == self.padding_idx).unsqueeze(-1), 0.0)
        return out

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The ``(num_embeddings, embedding_dim)`` table ``U diag(s) V^T``. Export only."""
        return (self.U * self.s) @ self.V.mT

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=self.U.device, dtype=self.U.dtype)
        emb.weight.copy_(self.dense_weight())
        return emb

    @property
    def compression(self) -> float:
        m, n, k = self.num_embeddings, self.embedding_dim, self.rank
        return m * n / spectral_params(m, n, k)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + f", compression={self.compression:.1f}x")



def conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` over GPT-2 ``Conv1D`` ``conv``'s own storage (its weight ``(in, out)``
    seen transposed, its bias shared; nothing copied, nothing trainable): what the linear
    conversions read."""
    weight, bias = getattr(conv, "weight"), getattr(conv, "bias", None)  # noqa: B009 (typed Tensor | Module)
    assert isinstance(weight, torch.Tensor)
    nx, nf = weight.shape
    linear = nn.Linear(nx, nf, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().t(), requires_grad=False)
    if isinstance(bias, torch.Tensor):
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


class SpectralConv1D(SpectralLinear):
    """GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W``
    stored ``(in, out)``) in spectral form.

    The same layer as :class:`SpectralLinear` of ``W^T`` (``V``: ``(out, k)``, ``U``: ``(in, k)``,
    residual mode included); what differs is its dense form: it converts from a ``Conv1D``
    (:meth:`from_conv1d`) and densifies back to one (:meth:`to_conv1d`), so a densified GPT-2 has
    the original architecture's modules and state-dict shapes, and a checkpoint records it as its
    own layer kind."""

    @classmethod
    @torch.no_grad()
    def from_conv1d(cls, conv: nn.Module, rank: Optional[int] = None, energy: Optional[float] = None,
                    retraction: str = "qr", residual_dtype: Optional[torch.dtype] = None) -> SpectralConv1D:
        """Factor a (trained) ``Conv1D`` by truncated SVD of ``W^T`` (as :meth:`SpectralLinear.from_linear`)."""
        layer = cls.from_linear(conv1d_as_linear(conv), rank, energy, retraction, residual_dtype)
        assert isinstance(layer, SpectralConv1D)
        return layer

    @torch.no_grad()
    def to_conv1d(self) -> nn.Module:
        """An equivalent ``Conv1D`` (dense weight materialised, stored ``(in, out)``). Export only."""
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features).to(device=self.U.device, dtype=self.U.dtype)
        conv.weight.copy_(self.dense_weight().mT)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        else:
            conv.bias.zero_()
        return conv
