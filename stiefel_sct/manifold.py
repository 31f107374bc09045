"""The Stiefel manifold ``St(n, k) = {X in R^{n x k} : X^T X = I_k}`` and its retractions.

Everything here works on the last two dimensions and broadcasts over leading ones, so one call
retracts a whole stack of same-shape factors with one batched factorization.

Two retraction backends give the same point (the thin QR factorization with ``diag(R) > 0`` is
unique for a full-rank input):

* ``"qr"``: Householder QR (LAPACK / cuSOLVER), then a sign fix so that ``diag(R) >= 0``. The sign
  of a zero diagonal entry is taken as ``+1``: ``torch.sign(0) == 0`` would zero a column and leave
  the point off the manifold.
* ``"cholqr2"``: adaptive CholeskyQR2. ``L = chol(X^T X)``, ``X <- X L^-T``: only GEMMs and
  ``k x k`` work, so it runs at GEMM speed on thin matrices, and its Gram matrix is a sum over row
  blocks (what a sharded retraction needs). Its loss of orthogonality is ``~ eps * kappa(X^T X)``,
  so one pass suffices where the Gram matrix is well conditioned (right after an optimizer step),
  a second pass is taken where it is not, and rank-deficient or badly conditioned matrices fall
  back to Householder QR: the result is always orthonormal.

Low-precision factors (bf16/fp16) are factorized in fp32 and cast back.
"""

from __future__ import annotations

import functools
import platform
import warnings
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import geoopt
import torch

from .checks import renamed_argument
from .triples import spectral_triples

__all__ = [
    "RETRACTIONS",
    "Stiefel",
    "check_retraction",
    "cholqr2_retraction",
    "cholqr_into",
    "compute_dtype",
    "is_stiefel",
    "orthonormality_error",
    "plain",
    "preserving_retraction",
    "qr_retraction",
    "retract",
    "retract_",
    "retract_all",
    "retract_into",
    "retract_triples_",
    "stiefel_manifold",
]

RETRACTIONS: Tuple[str, ...] = ("qr", "cholqr2")

def check_retraction(retraction: object) -> str:
    """``retraction`` if it names a backend; ``ValueError`` naming the argument otherwise."""
    if retraction not in RETRACTIONS:
        raise ValueError(f"retraction must be one of {RETRACTIONS}, got {retraction!r}")
    return retraction


def _check_matrix(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., n, k), got shape {tuple(x.shape)}")
    if x.shape[-1] > x.shape[-2]:
        raise ValueError(
            f"{name} must be tall (k <= n for shape (..., n, k)), got shape {tuple(x.shape)}"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factorizations run in fp32 at least: LAPACK has no bf16/fp16 kernels and they would be too inexact."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def plain(x: torch.Tensor) -> torch.Tensor:
    """A plain-tensor view of ``x`` (drops ManifoldParameter/ManifoldTensor subclasses)."""
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def _thin_qr(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a stack with ``diag(R) >= 0`` (zero diagonal entries keep ``+1``)."""
    q, r = torch.linalg.qr(x)
    sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(x.dtype)
    return q.mul_(sign.unsqueeze(-2)), r.mul_(sign.unsqueeze(-1))  # fresh from qr: in place is safe


def qr_retraction(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor ``Q`` of the thin QR factorization of ``x``, with ``diag(R) >= 0``.

    Batched over leading dimensions. A zero diagonal entry of ``R`` (rank-deficient input) keeps
    its column's sign (``+1``), so every column of the result has unit norm.
    """
    _check_matrix(x)
    x = plain(x)
    return _thin_qr(x.to(compute_dtype(x.dtype)))[0].to(x.dtype)


def _inverse_lower(chol: torch.Tensor) -> torch.Tensor:
    """``L^-1`` of a batch of lower-triangular matrices: a triangular solve against the identity,
    or, where that solve is slow (:func:`_trsm_slow`) and the order exceeds
    ``_INVERSE_LEAF``, by halves: ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``,
    two batched GEMMs per level (the blocked inversion LAPACK's ``trtri`` does; same accuracy:
    measured ~6e-8 relative in fp32 against an fp64 solve, as the solve)."""
    k = chol.shape[-1]
    if k <= _INVERSE_LEAF or not _trsm_slow(chol):
        eye = torch.eye(k, dtype=chol.dtype, device=chol.device).expand_as(chol)
        return torch.linalg.solve_triangular(chol, eye, upper=False)
    h = k // 2
    a_inv, d_inv = _inverse_lower(chol[..., :h, :h]), _inverse_lower(chol[..., h:, h:])
    out = torch.zeros_like(chol)
    out[..., :h, :h] = a_inv
    out[..., h:, h:] = d_inv
    out[..., h:, :h] = -(d_inv @ (chol[..., h:, :h] @ a_inv))
    return out


def _gram_factors(gram: torch.Tensor, chol: Optional[torch.Tensor] = None,
                  info: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L^-T, kappa_1(X^T X), ok)`` from a batch of Gram matrices ``X^T X``: one CholeskyQR pass
    is ``X @ L^-T``; ``ok`` is False where the Cholesky failed or produced non-finite values.
    ``chol, info``: the Gram matrices' ``cholesky_ex`` where the caller has it already."""
    if chol is None or info is None:
        chol, info = torch.linalg.cholesky_ex(gram)
    inv = _inverse_lower(chol)  # L^-1; (X^T X)^-1 = L^-T L^-1
    gram_inv = inv.mT @ inv
    # 1-norm condition number of the Gram matrix (= kappa_2(X)^2 up to a factor <= k)
    kappa = gram.abs().sum(-2).amax(-1) * gram_inv.abs().sum(-2).amax(-1)
    ok = (info == 0) & torch.isfinite(kappa)
    return inv.mT, kappa, ok


# CholeskyQR's loss of orthogonality is ~ eps * kappa(X^T X): one pass is at working precision
# (measured: 2-3e-7 in fp32, below Householder's 4e-7) while kappa_1 <= 64; a second pass
# repairs anything up to kappa ~ 1/eps; beyond that Householder QR takes over.
_ONE_PASS_KAPPA = 64.0
# ||G - I||_1 = d < 1 bounds kappa_1(G) <= (1 + d) / (1 - d) (Neumann series for G^-1), so
# d <= 63/65 certifies the one-pass rule above without forming G^-1: right after an optimizer
# step d is small, and the k x k inverse, its product and the exact kappa are skipped. Where the
# bound is not met the exact kappa decides, as before.
_ONE_PASS_DELTA = (_ONE_PASS_KAPPA - 1.0) / (_ONE_PASS_KAPPA + 1.0)
# From this rank on, X L^-T is a triangular solve (trsm, n k^2 flops) instead of L^-1 and a GEMM
# (k^3/3 + 2 n k^2), but only on an Intel CPU (and, unmeasured, on other devices, as before).
# Measured on a 2-core Intel Xeon, 8 MB batches, medians of 21: trsm / (inverse + GEMM) 0.81 /
# 0.71 / 0.64 at n = 576, k = 64 / 96 / 128; 0.84 / 0.80 at n = 1536, k = 64 / 128; 0.94 / 0.76
# at n = 8192, k = 64 / 128; but 0.88-1.09 at k = 32 (run to run) and 1.34 at n = 8192, k = 16,
# where the GEMM path stays. On a 2-core AMD EPYC (same build of torch, MKL; 2026-12-07, 2
# threads) the same ratio is 3.00 / 1.67 at n = 576, k = 64 / 128; 4.51 / 2.36 at n = 1536;
# 5.68 / 2.91 / 2.11 at n = 8192, k = 64 / 128 / 256; 1.01 at n = 2048, k = 512: MKL's trsm is
# tuned for Intel's CPUs only, so every other CPU keeps the GEMM path at every rank.
_TRSM_MIN_RANK = 48
# Where trsm is slow, L^-1 itself is formed by halves down to this order (then one solve). On the
# AMD EPYC, fp32, against one batched solve (medians, 2 threads): 0.44 / 0.50 / 0.44 / 0.41 of its
# time at k = 200 (40 matrices) / 64 (100) / 128 (28) / 512 (10) with leaves of 16; 0.89 at k = 32
# (88 matrices) and 0.67 at k = 32 (880). Leaves of 8 were faster only at 880 matrices of k = 32
# (0.54), of 32 only at k = 512 (0.39). SpectralAdam's step on SmolLM2-135M's SCT factors (random
# weights, interleaved, 20 rounds): 0.938 of the step with the solve at 25% of the parameters
# (288.9 -> 277.4 ms), 0.898 at 50% (541.6 -> 492.0 ms).
_INVERSE_LEAF = 16


@functools.cache
def _intel_cpu() -> bool:
    """Whether this machine's CPU is Intel's (``vendor_id`` in ``/proc/cpuinfo``, else the platform's
    processor string)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


def _trsm_slow(t: torch.Tensor) -> bool:
    """Whether BLAS's triangular solve is slow next to its GEMM on ``t``'s device: a CPU not Intel's."""
    return t.device.type == "cpu" and not _intel_cpu()


def _trsm_pays(chol: torch.Tensor) -> bool:
    """Whether the one-pass product ``X L^-T`` is a triangular solve for these Cholesky factors."""
    return chol.shape[-1] >= _TRSM_MIN_RANK and not _trsm_slow(chol)


def _certified_one_pass(gram: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """Per matrix: the Cholesky succeeded and ``||G - I||_1`` certifies one pass (NaN/Inf: False)."""
    defect = gram.clone()
    defect.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return (info == 0) & (defect.abs_().sum(-2).amax(-1) <= _ONE_PASS_DELTA)


def _one_pass_right(chol: torch.Tensor) -> Optional[torch.Tensor]:
    """``L^-T`` where one pass ``X L^-T`` is a GEMM, ``None`` where it is a triangular solve."""
    return None if _trsm_pays(chol) else _inverse_lower(chol).mT


def _apply_one_pass(x: torch.Tensor, chol: torch.Tensor, right: Optional[torch.Tensor],
                    out: torch.Tensor) -> torch.Tensor:
    if right is None:
        return torch.linalg.solve_triangular(chol.mT, x, upper=True, left=False, out=out)
    return torch.matmul(x, right, out=out)


def _one_pass_into(x: torch.Tensor, chol: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = X L^-T`` for lower-triangular ``L`` (the Cholesky factor of ``X^T X``)."""
    return _apply_one_pass(x, chol, _one_pass_right(chol), out)


class OnePass(NamedTuple):
    """:func:`one_pass_factors`' result for a stack of Gram matrices: the Cholesky factors, ``L^-T``
    (``None`` where the pass is a triangular solve) and, per matrix, whether one pass is certified."""

    chol: torch.Tensor
    right: Optional[torch.Tensor]
    certified: List[bool]


def one_pass_factors(grams: torch.Tensor) -> OnePass:
    """The ``k x k`` work of one CholeskyQR pass for a stack of Gram matrices ``X^T X`` at once: one
    batched Cholesky, one certificate, one host sync, one triangular inverse. For callers that form
    the Gram matrices chunk by chunk (the factor banks: each right after its chunk's update) and then
    retract each chunk with :func:`one_pass_into`. Each matrix's factors are the ones
    :func:`cholqr_into` computes for it alone (the batched kernels factorize matrix by matrix)."""
    chol, info = torch.linalg.cholesky_ex(grams)
    return OnePass(chol, _one_pass_right(chol), _certified_one_pass(grams, info).tolist())


def one_pass_into(x: torch.Tensor, passes: OnePass, start: int, out: torch.Tensor) -> bool:
    """``out = X L^-T`` for the chunk ``x`` (B, n, k) whose Gram matrices are entries ``start`` to
    ``start + B`` of ``passes``, when one pass is certified for each of them (returns True); False,
    with ``out`` untouched, otherwise (the caller then runs :func:`cholqr_into`'s adaptive passes)."""
    end = start + x.shape[0]
    if not all(passes.certified[start:end]):
        return False
    _apply_one_pass(x, passes.chol[start:end], None if passes.right is None else passes.right[start:end], out)
    return True


GramSum = Callable[[torch.Tensor], torch.Tensor]
Householder = Callable[[torch.Tensor], torch.Tensor]


def _local_gram(gram: torch.Tensor) -> torch.Tensor:
    return gram


@torch.no_grad()
def cholqr_into(x: torch.Tensor, out: torch.Tensor, sum_gram: Optional[GramSum] = None,
                householder: Optional[Householder] = None) -> torch.Tensor:
    """Adaptive CholeskyQR of a batch ``x`` (B, n, k) of fp32/fp64 matrices, written to ``out``.

    The one CholeskyQR driver of the library (the factor banks, :func:`retract_` and the sharded
    retraction all come here). One pass (``Q = X L^-T``, ``L = chol(X^T X)``) where the Gram
    matrix is well conditioned, which it is right after an optimizer step; a second pass where it
    is not; Householder QR (sign-fixed) where the Cholesky fails or the matrix is too
    ill-conditioned. ``x`` is left unchanged; ``out`` must not overlap it. Returns ``out``.

    Args:
        sum_gram: how a batch of local ``k x k`` Gram matrices becomes the Gram matrices of the
            whole factors (default: they already are). For row-sharded factors it is an
            all-reduce: every process then takes the same pass decisions from the same numbers.
        householder: Householder QR of the rows ``x[bad]`` of the matrices that need it
            (default: :func:`qr_retraction`). A row-sharded caller gathers, factorizes and
            returns its own rows. Called at most once, only if some matrix needs it.
    """
    sum_gram = sum_gram or _local_gram
    householder = householder or qr_retraction
    gram = sum_gram(x.mT @ x)
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool(_certified_one_pass(gram, info).all()):  # the usual case, right after an optimizer step
        return _one_pass_into(x, chol, out)
    lit, kappa, ok = _gram_factors(gram, chol, info)
    one = ok & (kappa <= _ONE_PASS_KAPPA)
    two = ok & ~one & (kappa <= 1e-2 / torch.finfo(x.dtype).eps)
    bad = ~(one | two)
    torch.matmul(x, lit, out=out)
    if bool(two.any()):
        y = out[two]
        lit2, _, ok2 = _gram_factors(sum_gram(y.mT @ y))
        out[two] = y @ lit2
        bad[two] = ~ok2
    if bool(bad.any()):
        out[bad] = householder(x[bad])
    return out


def cholqr2_retraction(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal ``Q`` of the thin QR of ``x`` by adaptive CholeskyQR (see :func:`cholqr_into`).

    Same result as :func:`qr_retraction` on full-rank input, up to rounding; rank-deficient or
    badly conditioned matrices are handled by Householder QR.
    """
    _check_matrix(x)
    x = plain(x)
    work = x.to(compute_dtype(x.dtype)).reshape(-1, *x.shape[-2:])
    return cholqr_into(work, torch.empty_like(work)).view(x.shape).to(x.dtype)


_BACKENDS = {"qr": qr_retraction, "cholqr2": cholqr2_retraction}


@renamed_argument("method", "retraction")
def retract(x: torch.Tensor, retraction: str = "qr") -> torch.Tensor:
    """Out-of-place retraction of ``x`` (any tall matrix or stack of them) onto the Stiefel manifold."""
    return _BACKENDS[check_retraction(retraction)](x)


def _group_by_layout(tensors: Sequence[torch.Tensor]) -> Dict[tuple, List[torch.Tensor]]:
    groups: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(tuple(t.shape), t.dtype, t.device)].append(t)
    return groups


def retract_stack_into(x: torch.Tensor, out: torch.Tensor, retraction: str,
                       workspace: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """:func:`retract_into` without its wrappers, for callers already under ``torch.no_grad`` that
    pass ``retraction`` by position (the optimizer's banks: once per chunk per step)."""
    if x.dtype in (torch.float32, torch.float64):
        work, dst = x, out
    elif workspace is not None:
        work = workspace[0].view(-1)[: x.numel()].view(x.shape).copy_(x)
        dst = workspace[1].view(-1)[: x.numel()].view(x.shape)
    else:
        work = x.float()
        dst = torch.empty_like(work)
    if retraction == "cholqr2":
        cholqr_into(work, dst)
    else:
        dst = qr_retraction(work)
    if dst is not out:
        out.copy_(dst)
    return out


@torch.no_grad()
@renamed_argument("method", "retraction")
def retract_into(x: torch.Tensor, out: torch.Tensor, retraction: str = "qr",
                 workspace: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Retraction of a stack ``x`` (B, n, k) written to ``out`` (same shape, no overlap).

    Low-precision stacks are factorized in fp32; ``workspace``, two fp32 buffers of at least
    ``x``'s size, saves allocating them on every call. ``x`` is left unchanged. Returns ``out``.
    """
    return retract_stack_into(x, out, retraction, workspace)


@torch.no_grad()
@renamed_argument("method", "retraction")
def retract_(tensors: Iterable[torch.Tensor], retraction: str = "qr") -> None:
    """Retract every tensor in ``tensors`` onto the Stiefel manifold, in place.

    Tensors are grouped by (shape, dtype, device); each group is factorized by one batched call,
    so the cost is one factorization per distinct shape, not one Python-level call per matrix.
    """
    check_retraction(retraction)
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        _check_matrix(t, name=f"tensors[{i}]")
    for group in _group_by_layout(tensors).values():
        views = [plain(t) for t in group]
        stack = torch.stack(views)
        q = retract_into(stack, torch.empty_like(stack), retraction)
        torch._foreach_copy_(views, list(q.unbind(0)))


def _align_to_identity(p: torch.Tensor, s: torch.Tensor, q: torch.Tensor):
    """Reorder and re-sign an SVD ``C = P diag(S) Q^T`` (a stack of ``k x k``) so that ``P`` and
    ``Q`` are as close to the identity as the decomposition allows: component ``i`` is the one
    whose left vector points mostly along axis ``i`` (where that matching is a permutation),
    ``diag(Q) >= 0`` and ``diag(P) >= 0`` (the sign moves into ``S``). ``C`` is unchanged.

    Near the manifold ``C`` is ``diag(s)`` plus a small term, so the aligned ``P``, ``Q`` are a
    small rotation: every coordinate of ``U``, ``s``, ``V`` (and of their Adam moments) keeps its
    meaning, where a raw SVD would sort and flip components.
    """
    k = p.shape[-1]
    rows = p.abs().argmax(dim=-2)  # (B, k): the axis each component points along
    is_perm = (torch.sort(rows, dim=-1).values == torch.arange(k, device=p.device)).all(-1, keepdim=True)
    order = torch.where(is_perm, torch.argsort(rows, dim=-1), torch.arange(k, device=p.device).expand_as(rows))
    idx = order.unsqueeze(-2).expand_as(p)
    p, q, s = p.gather(-1, idx), q.gather(-1, idx), s.gather(-1, order)
    d = torch.where(torch.diagonal(q, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(p.dtype)
    p, q = p * d.unsqueeze(-2), q * d.unsqueeze(-2)
    e = torch.where(torch.diagonal(p, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(p.dtype)
    return p * e.unsqueeze(-2), s * e, q


@torch.no_grad()
def preserving_retraction(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor):
    """Function-preserving retraction of factor stacks: ``(U', s', V')`` with ``U'``, ``V'``
    orthonormal and ``U' diag(s') V'^T = U diag(s) V^T`` up to rounding.

    ``U = Q_U R_U``, ``V = Q_V R_V`` (thin QR); the small core ``R_U diag(s) R_V^T = P S Q^T``
    (a ``k x k`` SVD, in fp64) is re-diagonalised and ``U' = Q_U P``, ``V' = Q_V Q``, ``s' = S``.
    The plain retraction keeps ``Q_U``, ``Q_V`` and drops ``R_U``, ``R_V``, which moves the
    layer's function at every step; this one does not. ``P``, ``Q`` are aligned to the identity
    (see :func:`_align_to_identity`), so ``s'`` keeps the order and signs of ``s``.

    Shapes: ``u`` (..., m, k), ``s`` (..., k), ``v`` (..., n, k); low precision is computed in fp32.
    Which of ``U``, ``V`` is the "input" side does not matter: the construction is symmetric.
    """
    _check_matrix(u, "u")
    _check_matrix(v, "v")
    k = u.shape[-1]
    if v.shape[-1] != k or s.shape[-1] != k or u.shape[:-2] != v.shape[:-2] or s.shape[:-1] != u.shape[:-2]:
        raise ValueError(f"u (..., m, k), s (..., k) and v (..., n, k) must agree; got "
                         f"{tuple(u.shape)}, {tuple(s.shape)}, {tuple(v.shape)}")
    dtype = compute_dtype(u.dtype)
    qu, ru = _thin_qr(plain(u).to(dtype))
    qv, rv = _thin_qr(plain(v).to(dtype))
    core = (ru.double() * s.double().unsqueeze(-2)) @ rv.double().mT
    p, sv, qh = torch.linalg.svd(core)
    p, sv, q = _align_to_identity(p, sv, qh.mT)
    return ((qu @ p.to(dtype)).to(u.dtype), sv.to(s.dtype), (qv @ q.to(dtype)).to(v.dtype))


@torch.no_grad()
def retract_triples_(triples: Iterable[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """:func:`preserving_retraction` of each ``(U, s, V)`` triple, in place, batched over
    triples of the same shapes (one factorization call per distinct layer shape)."""
    groups: Dict[tuple, List[tuple]] = defaultdict(list)
    for u, s, v in triples:
        groups[(tuple(u.shape), tuple(v.shape), u.dtype, u.device)].append((u, s, v))
    for group in groups.values():
        views = [[plain(t) for t in member] for member in zip(*group)]
        new = preserving_retraction(*(torch.stack(ts) for ts in views))
        for ts, values in zip(views, new):
            torch._foreach_copy_(ts, list(values.unbind(0)))


@torch.no_grad()
@renamed_argument("method", "retraction")
def retract_all(module_or_params, retraction: str = "cholqr2", preserve_function: bool = False) -> int:
    """Retract every geoopt Stiefel factor of a module (or an iterable of tensors) in place.

    For users who keep their own optimizer: call it after ``optimizer.step()``. Factors are
    batched by shape, one factorization call per shape. Returns the number of factors retracted.

    ``preserve_function=True`` (a module only): each spectral layer's ``(U, s, V)`` is retracted
    together so that its weight does not change (:func:`preserving_retraction`: the ``R`` factors
    of the QRs are folded into a re-diagonalised ``s``); Stiefel factors outside spectral layers
    get the plain retraction.
    """
    tensors: List[torch.Tensor]
    if isinstance(module_or_params, torch.nn.Module):
        tensors = list(module_or_params.parameters())
    elif preserve_function:
        raise TypeError("preserve_function=True needs an nn.Module (to find each layer's U, s, V), "
                        f"got {type(module_or_params).__name__}")
    elif isinstance(module_or_params, torch.Tensor):
        tensors = [module_or_params]
    else:
        try:
            tensors = list(module_or_params)
        except TypeError:
            raise TypeError(
                f"module_or_params must be an nn.Module or an iterable of tensors, got {type(module_or_params).__name__}"
            ) from None
    factors = [t for t in tensors if isinstance(t, torch.Tensor) and is_stiefel(t)]
    if preserve_function:
        triples, rest = spectral_triples(tensors)
        retract_triples_(triples)
        left = {id(t) for t in rest}
        retract_([p for p in factors if id(p) in left], retraction)
    else:
        retract_(factors, retraction)
    return len(factors)


@torch.no_grad()
def orthonormality_error(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """``max |X^T X - I|`` over all entries (and all matrices of a stack), computed in ``dtype``."""
    _check_matrix(x)
    xd = plain(x).to(dtype)
    gram = xd.mT @ xd
    gram.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return float(gram.abs().max())


def is_stiefel(p: torch.Tensor) -> bool:
    """Whether ``p`` is a geoopt manifold tensor/parameter on any geoopt Stiefel manifold."""
    return isinstance(p, geoopt.ManifoldTensor) and isinstance(p.manifold, geoopt.Stiefel)


class Stiefel(geoopt.EuclideanStiefel):
    """Stiefel manifold with the Euclidean metric and a QR (or CholeskyQR2) retraction.

    A drop-in for :class:`geoopt.EuclideanStiefel` (``geoopt.Stiefel(canonical=False)``):
    ``proju``/``egrad2rgrad`` project onto the tangent space ``G - X sym(X^T G)``, ``transp``
    projects onto the new tangent space, ``projx`` is the closest point (the polar factor
    ``U V^T`` of the SVD ``X = U S V^T``, as geoopt's), and ``retr(x, u)`` is the Q factor of
    ``x + u`` with a sign fix that never zeroes a column. Every result is a contiguous tensor.
    geoopt's optimizers (``RiemannianAdam``, ``RiemannianSGD``) and ``ProductManifold`` work on it
    unchanged.

    Args:
        retraction: the backend, ``"qr"`` (Householder) or ``"cholqr2"`` (CholeskyQR2);
            positional or keyword (``method=``, its old name, still works with a
            ``DeprecationWarning``; so does reading ``.method``).
        canonical: accepted for geoopt's ``Stiefel(canonical=...)`` signature; only ``False`` (the
            Euclidean metric) is this class. For the canonical metric use ``geoopt.Stiefel()``,
            which :class:`~stiefel_sct.SpectralAdam` also handles (``mode="riemannian"`` follows
            the tensor's own metric and Cayley retraction).
    """

    # geoopt's Stiefel.__new__(cls, canonical=True) picks a subclass and takes no other argument;
    # this one accepts ours (checked by __init__), so Stiefel(retraction="cholqr2") works as documented.
    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    @renamed_argument("method", "retraction")
    def __init__(self, retraction: str = "qr", canonical: bool = False) -> None:
        if canonical is not False:
            raise ValueError("canonical must be False: stiefel_sct.Stiefel has the Euclidean metric; "
                             "use geoopt.Stiefel(canonical=True) for the canonical one")
        super().__init__()
        self.retraction = check_retraction(retraction)

    @property
    def method(self) -> str:
        """The old name of :attr:`retraction` (deprecated)."""
        warnings.warn("Stiefel.method is deprecated: use Stiefel.retraction", DeprecationWarning, stacklevel=2)
        return self.retraction

    @property
    def name(self) -> str:  # geoopt reads ``manifold.name`` in reprs and error messages
        return f"Stiefel(euclidean, {self.retraction})"

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return retract(x + u, self.retraction).contiguous()

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """The closest point of the manifold to ``x`` in the Frobenius norm: ``U V^T`` of the thin
        SVD (computed in fp32 at least). Unlike the retraction it does not depend on the column
        order, which is what ``proj_()`` of a pretrained matrix should give."""
        _check_matrix(x)
        work = plain(x).to(compute_dtype(x.dtype))
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        return (u @ vh).to(x.dtype).contiguous()

    def random_naive(self, *size, dtype=None, device=None) -> geoopt.ManifoldTensor:
        """A random point: QR retraction of a standard Gaussian matrix (Haar-distributed)."""
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        self._assert_check_shape(tuple(shape), "x")
        x = torch.randn(*shape, dtype=dtype, device=device)
        return geoopt.ManifoldTensor(retract(x, self.retraction).contiguous(), manifold=self)

    random = random_naive

    def extra_repr(self) -> str:
        return ""  # the name already says the backend: "Stiefel(euclidean, cholqr2) manifold"


_SHARED: Dict[str, Stiefel] = {}


@renamed_argument("method", "retraction")
def stiefel_manifold(retraction: str = "qr") -> Stiefel:
    """The shared :class:`Stiefel` instance for a retraction backend (layers reuse one object)."""
    if check_retraction(retraction) not in _SHARED:
        _SHARED[retraction] = Stiefel(retraction)
    return _SHARED[retraction]
