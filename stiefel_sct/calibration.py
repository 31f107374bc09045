"""Data-aware truncation: factor a linear layer in the metric of its real inputs.

A layer ``y = x W^T`` that sees inputs ``X`` (``N x m``) passes an error ``||X (W - W')^T||_F`` to
the network, not ``||W - W'||_F``. With the input second moment ``C = X^T X / N`` and its
regularised Cholesky factor ``C + lambda I = L L^T``, ``||X A^T||_F^2 ~= N ||A L||_F^2``, so the
best rank-``k`` ``W'`` in that metric is ``W' = P_k Sigma_k Q_k^T L^-1`` from the SVD
``W L = P Sigma Q^T`` (SVD-LLM's activation-whitened truncation). Its whitened singular values
``Sigma`` are the output error (per token, root-mean-square) each dropped direction costs, so rank,
energy and budget policies read them instead of the weight's own spectrum.

Written back in spectral form: ``B = L^-T Q_k`` (``m x k``), ``B = Q_B R_B``, the ``k x k`` core
``Sigma_k R_B^T = A diag(s) D^T``; then ``V = P_k A``, ``U = Q_B D`` and ``s``: exactly orthonormal
factors with ``V diag(s) U^T = W'``, an ordinary spectral layer from then on.

``lambda`` (``damping``): ``damping * trace(C) / m``, a fraction of the mean input energy per
feature. It keeps ``L`` invertible where the calibration inputs do not span the input space (fewer
tokens than features, dead features) and there pulls the result toward plain truncated SVD.

**Fisher whitening** (``whitening="fisher"``) weighs the output side as well. What the network
pays for a weight error ``A`` is, to second order, ``1/2 vec(A)^T F vec(A)`` with ``F`` the
Fisher information of the weight; K-FAC's factorisation ``F ~= G (x) C`` (Martens & Grosse, 2015),
with ``G = E[g g^T]`` the second moment of the loss gradient ``g = dL/dy`` at the layer's output,
turns that into ``1/2 ||R^T A L||_F^2`` (``G + mu I = R R^T``). The best rank-``k`` weight in that
metric comes from the SVD ``R^T W L = P Sigma Q^T``: ``W' = R^-T P_k Sigma_k Q_k^T L^-1``, written
back as exact orthonormal factors by a QR of each side and the ``k x k`` core's SVD. ``Sigma_i^2``
is then an estimate of the *loss* each dropped direction costs, in the same units for every layer,
so a budget compares layers by it directly. FWSVD (Hsu et al., 2022) weighs the rows of ``W`` by a
diagonal Fisher; this is the two-sided, Kronecker-factored form. Calibration batches must then
yield a loss, and the pass runs a backward per batch (no parameter's ``.grad`` is written).
``mu`` (``grad_damping``) is ``grad_damping * trace(G) / n`` as for the inputs; gradient moments
from a few thousand tokens are noisier than input moments and want a larger ridge (see
:data:`DEFAULT_GRAD_DAMPING`).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .checks import check_bool, is_real

__all__ = ["DEFAULT_DAMPING", "DEFAULT_GRAD_DAMPING", "WHITENINGS", "FisherGrowth", "InputMoments", "WhitenedSVD",
           "check_damping", "check_whitening", "collect_input_moments", "contrast_factors", "fisher_growth",
           "whitened_factors", "whitened_spectrum", "whitened_svd"]

# 1e-3 of the mean diagonal of C. Measured on SmolLM2-135M (8,192 calibration tokens of the
# fine-tuning text, every decoder linear at 50% / 25% of its parameters, held-out loss right after
# conversion; pretrained 4.167): damping 1e-2 gives 6.112 / 9.234, 1e-3 6.056 / 8.787, 1e-4
# 6.045 / 8.877. Larger values pull toward the plain SVD (17.18 / 14.69), smaller ones trust the
# calibration text's weakest directions.
DEFAULT_DAMPING = 1e-3
# The output-gradient ridge of whitening="fisher", as a fraction of the mean diagonal of G.
# Measured on SmolLM2-135M as above (8,192 tokens, held-out loss right after conversion at 50% /
# 25%; pretrained 4.167, whitening="inputs" 6.048 / 8.610): grad_damping 1e-1 gives 4.753 / 5.731,
# 1e-2 4.761 / 5.652. Budget allocation alone, without the output side's metric in the truncation
# (each layer's inputs' spectrum times sqrt(E||g||^2)), reached 5.253 / 6.277: the two-sided
# metric is worth most of the gain.
DEFAULT_GRAD_DAMPING = 1e-2
WHITENINGS = ("inputs", "fisher")


def check_whitening(whitening: object) -> str:
    """Validate the calibrated metric's name: one of :data:`WHITENINGS`."""
    if whitening not in WHITENINGS:
        raise ValueError(f"whitening must be one of {', '.join(map(repr, WHITENINGS))}, got {whitening!r}")
    return str(whitening)


class InputMoments:
    """Per-layer input second moments ``C = X^T X / N`` (float64), shared between layers that read
    the same input tensor (``q``/``k``/``v`` of one attention block; ``gate``/``up`` of one MLP):
    ``moment(name)`` returns the same tensor object for all of them. Collected with
    ``gradients=True``, also each layer's output-gradient second moment ``G = E[g g^T]``
    (:meth:`gradient_moment`, never shared: layers that share an input have their own outputs)."""

    def __init__(self, sums: Dict[str, torch.Tensor], counts: Dict[str, int], leaders: Dict[str, str],
                 grad_sums: Optional[Dict[str, torch.Tensor]] = None, grad_counts: Optional[Dict[str, int]] = None) -> None:
        self._sums = sums
        self._counts = counts
        self.leaders = dict(leaders)  # layer name -> the layer whose accumulation it shares
        self._cache: Dict[str, torch.Tensor] = {}
        self._grad_sums = dict(grad_sums or {})
        self._grad_counts = dict(grad_counts or {})
        self._grad_cache: Dict[str, torch.Tensor] = {}  # a Fisher conversion reads each G twice

    @property
    def has_gradients(self) -> bool:
        """Whether output-gradient moments were collected (``collect_input_moments(gradients=True)``)."""
        return bool(self._grad_sums)

    def gradient_moment(self, name: str) -> torch.Tensor:
        """``G = E[g g^T]`` of layer ``name``'s output gradient ``g = dL/dy`` (float64, ``n x n``)."""
        if name not in self._grad_sums:
            raise ValueError(f"calibration: no output-gradient moment for layer {name!r}; collect them with "
                             "collect_input_moments(..., gradients=True) on batches that yield a loss")
        if name not in self._grad_cache:
            self._grad_cache[name] = self._grad_sums[name] / self._grad_counts[name]
        return self._grad_cache[name]

    def __contains__(self, name: object) -> bool:
        return name in self.leaders

    def tokens(self, name: str) -> int:
        """How many input rows (tokens) layer ``name``'s moment was built from."""
        return self._counts[self.leaders[name]]

    def moment(self, name: str) -> torch.Tensor:
        """``C = X^T X / N`` of layer ``name`` (float64, ``m x m``)."""
        leader = self.leaders[name]
        if leader not in self._cache:
            n = self._counts[leader]
            if n == 0:
                raise ValueError(f"calibration: layer {name!r} saw no input rows (an empty calibration batch?)")
            self._cache[leader] = self._sums[leader] / n
        return self._cache[leader]

    def shared_groups(self) -> List[List[str]]:
        """The layers grouped by the accumulation they share (groups of one included)."""
        groups: Dict[str, List[str]] = {}
        for name, leader in self.leaders.items():
            groups.setdefault(leader, []).append(name)
        return list(groups.values())


def _run(model: nn.Module, batch: Any, forward: Optional[Callable[[nn.Module, Any], Any]]) -> Any:
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss_of(output: Any) -> torch.Tensor:
    """The scalar loss a calibration batch's forward returned: the tensor itself, or ``.loss`` /
    ``["loss"]`` of a model output (a ``transformers`` model given ``labels``)."""
    loss = output
    if not isinstance(output, torch.Tensor):
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("calibration: whitening='fisher' needs a scalar loss from every calibration batch: "
                        "calibration_forward(model, batch) returning it, or a model output with .loss (a "
                        f"transformers model given labels=...); got {type(output).__name__}")
    if not bool(torch.isfinite(loss.detach())):
        raise ValueError(f"calibration: a calibration batch's loss is not finite ({float(loss)})")
    return loss.reshape(())


def collect_input_moments(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Any],
                          forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                          gradients: bool = False) -> InputMoments:
    """Run ``model`` on ``batches`` and accumulate every layer's input second moment.

    Args:
        model: the model the layers belong to.
        layers: ``{qualified name: module}`` of the layers to calibrate (each takes its input as the
            first positional argument, as ``nn.Linear`` does).
        batches: an iterable of model inputs; each is passed as ``model(**batch)`` (a dict),
            ``model(*batch)`` (a tuple or list) or ``model(batch)``, unless ``forward`` is given.
        forward: ``forward(model, batch)`` to call instead (e.g. to pass an attention mask).
        gradients: also accumulate each layer's output-gradient second moment ``G = E[g g^T]``
            (for ``whitening="fisher"``): every batch's forward must then return a scalar loss (or
            an output with ``.loss``), and a backward runs per batch. Only the layers' outputs are
            differentiated (``torch.autograd.grad``): no parameter's ``.grad`` is written, and the
            layers' ``requires_grad`` flags are as they were afterwards.

    Streaming: one batch's activations are alive at a time; each layer keeps a float64 ``m x m``
    sum (each batch's ``X^T X`` is formed in fp32, or fp64 for fp64 inputs, and added in
    float64). Layers whose input is the same tensor (checked on every batch) share one sum.
    """
    if not layers:
        raise ValueError("calibration: no layer to calibrate")
    check_bool(gradients, "gradients")
    collector = _Collector()
    outputs = _GradientCollector() if gradients else None
    handles = [module.register_forward_pre_hook(collector.hook(name)) for name, module in layers.items()]
    if outputs is not None:
        handles += [module.register_forward_hook(outputs.hook(name)) for name, module in layers.items()]
    flags = {p: p.requires_grad for module in layers.values() for p in module.parameters(recurse=False)}
    was_training = model.training
    model.eval()
    try:
        n_batches = _calibration_pass(model, batches, forward, collector, outputs, list(flags))
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration: the calibration data yielded no batch")
    missing = [name for name in layers if name not in collector.leaders]
    if missing:
        raise ValueError(f"calibration: layer {missing[0]!r} was never called by the model on the calibration "
                         f"batches ({len(missing)} layer(s) in all)")
    if outputs is None:
        return InputMoments(collector.sums, collector.counts, collector.leaders)
    return InputMoments(collector.sums, collector.counts, collector.leaders, outputs.sums, outputs.counts)


def _calibration_pass(model: nn.Module, batches: Iterable[Any], forward: Optional[Callable[[nn.Module, Any], Any]],
                      collector: _Collector, outputs: Optional[_GradientCollector], weights: List[nn.Parameter]) -> int:
    """Run every batch through the hooked model (a backward per batch with ``outputs``); returns
    how many batches there were."""
    n_batches = 0
    with torch.set_grad_enabled(outputs is not None):
        if outputs is not None:  # each layer's output joins the graph, whatever the model froze
            for p in weights:
                p.requires_grad_(True)
        for batch in batches:
            collector.start_batch()
            result = _run(model, batch, forward)
            if outputs is not None:
                outputs.backward(_loss_of(result))
            collector.first = False
            n_batches += 1
    return n_batches


def _gram_into(sums: Dict[str, torch.Tensor], counts: Dict[str, int], name: str, x: torch.Tensor) -> None:
    """Add the rows of ``x`` (``... x d``) to ``name``'s float64 sum of ``x^T x`` and its row count.
    One batch's Gram matrix in fp32 (a float64 GEMM is ~4x slower here: 80 s for SmolLM2's 8,192
    tokens), summed across batches in float64."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    if name not in sums:
        sums[name] = flat.new_zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
        counts[name] = 0
    sums[name] += flat.mT @ flat
    counts[name] += flat.shape[0]


class _GradientCollector:
    """Forward hooks keep each layer's outputs of the batch; ``backward(loss)`` differentiates the
    loss with respect to them alone and adds each gradient's Gram matrix to the layer's sum."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}
        self._outputs: List[Tuple[str, torch.Tensor]] = []

    def hook(self, name: str) -> Callable[[nn.Module, Tuple, Any], None]:
        def hook(module: nn.Module, args: Tuple, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"calibration: layer {name!r} returned a {type(output).__name__}, not a tensor")
            self._outputs.append((name, output))

        return hook

    def backward(self, loss: torch.Tensor) -> None:
        names, outs = [n for n, _ in self._outputs], [o for _, o in self._outputs]
        self._outputs = []
        if not outs:  # no selected layer ran on this batch: nothing to differentiate (the pass names them)
            return
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
        for name, g in zip(names, grads):
            if g is None:
                raise ValueError(f"calibration: the output of layer {name!r} does not reach the loss")
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"calibration: layer {name!r} received a non-finite output gradient")
            _gram_into(self.sums, self.counts, name, g)


class _Collector:
    """The hooks' shared state: per leader a float64 sum of ``X^T X`` and a row count; per layer
    its leader (the first layer that read the same input tensor in the first batch).

    "The same input" means the same tensor object, unmodified: a weak reference proves identity
    (a data pointer does not: a freed activation's memory is reused by the next one)."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}
        self.leaders: Dict[str, str] = {}
        self.first = True
        self._seen: Dict[str, Tuple[weakref.ref, int]] = {}   # this batch: layer -> its input
        self._readers: List[Tuple[weakref.ref, int, str]] = []  # this batch: input -> the first layer that read it

    def start_batch(self) -> None:
        self._seen.clear()
        self._readers.clear()

    @staticmethod
    def _same(entry: Optional[Tuple[weakref.ref, int]], x: torch.Tensor) -> bool:
        return entry is not None and entry[0]() is x and entry[1] == x._version

    def hook(self, name: str) -> Callable[[nn.Module, Tuple], None]:
        def hook(module: nn.Module, args: Tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"calibration: layer {name!r} was called without a tensor input")
            self.read(name, args[0])

        return hook

    def read(self, name: str, x: torch.Tensor) -> None:
        """Layer ``name`` reads ``x``: add ``x``'s Gram matrix to its sum, unless it shares its leader's."""
        if self.first and name not in self.leaders:
            self.leaders[name] = next((who for ref, version, who in self._readers if self._same((ref, version), x)),
                                      name)
        leader = self.leaders[name]
        self._seen[name] = (weakref.ref(x), x._version)
        if leader != name:
            if not self._same(self._seen.get(leader), x):
                raise RuntimeError(f"calibration: layers {leader!r} and {name!r} read the same input in the "
                                   "first batch but not in a later one")
            return
        if not bool(torch.isfinite(x.detach()).all()):
            raise ValueError(f"calibration: layer {name!r} received a non-finite input")
        _gram_into(self.sums, self.counts, name, x)
        self._readers.append((weakref.ref(x), x._version, name))


def check_damping(damping: object, name: str = "damping") -> float:
    """Validate a whitening ridge (argument ``name``): a real number ``>= 0``."""
    if not is_real(damping) or not 0.0 <= damping < math.inf:
        raise ValueError(f"{name} must be a float >= 0, got {damping!r}")
    return float(damping)


def _cholesky(moment: torch.Tensor, damping: float, name: str, what: str = "inputs") -> torch.Tensor:
    """The lower Cholesky factor of ``moment + damping * trace(moment) / m * I`` (float64)."""
    argument = "grad_damping" if what == "output gradients" else "damping"
    damping = check_damping(damping, argument)
    m = moment.shape[0]
    scale = float(torch.diagonal(moment).sum()) / m
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"calibration: the {what} of layer {name!r} are all zero (no direction to weigh by)")
    reg = moment + (damping * scale) * torch.eye(m, dtype=moment.dtype, device=moment.device)
    try:
        return torch.linalg.cholesky(reg)
    except torch.linalg.LinAlgError:
        raise ValueError(f"calibration: the second moment of the {what} of layer {name!r} is singular "
                         f"(rank-deficient calibration data); use a {argument} > 0 (got {damping})") from None


class WhitenedSVD(NamedTuple):
    """:func:`whitened_svd`'s result: ``R^T W L = P diag(S) Qh`` and the two Cholesky factors
    (``out_chol`` is ``R``, or ``None`` where only the inputs weigh: ``R = I``)."""

    P: torch.Tensor
    S: torch.Tensor
    Qh: torch.Tensor
    chol: torch.Tensor
    out_chol: Optional[torch.Tensor]


def _whitened(weight: torch.Tensor, moment: torch.Tensor, damping: float, name: str,
              grad_moment: Optional[torch.Tensor], grad_damping: float
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(R^T W L, L, R)`` in float64 (``R``: ``None`` without a gradient moment)."""
    if weight.dim() != 2 or moment.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"calibration: layer {name!r} has weight {tuple(weight.shape)} but an input moment of "
                         f"shape {tuple(moment.shape)}")
    chol = _cholesky(moment.to(weight.device, torch.float64), damping, name)
    metric = weight.detach().to(torch.float64) @ chol
    if grad_moment is None:
        return metric, chol, None
    if grad_moment.shape != (weight.shape[0], weight.shape[0]):
        raise ValueError(f"calibration: layer {name!r} has weight {tuple(weight.shape)} but an output-gradient "
                         f"moment of shape {tuple(grad_moment.shape)}")
    out_chol = _cholesky(grad_moment.to(weight.device, torch.float64), grad_damping, name, "output gradients")
    return out_chol.mT @ metric, chol, out_chol


def whitened_svd(weight: torch.Tensor, moment: torch.Tensor, damping: float = DEFAULT_DAMPING,
                 name: str = "layer", grad_moment: Optional[torch.Tensor] = None,
                 grad_damping: float = DEFAULT_GRAD_DAMPING) -> WhitenedSVD:
    """The SVD ``W L = P diag(Sigma) Qh`` (float64) with ``L`` the Cholesky factor of
    ``moment + lambda I``; with ``grad_moment`` (Fisher whitening) the SVD of ``R^T W L``,
    ``R`` the Cholesky factor of ``grad_moment + mu I``. ``Sigma`` is the whitened spectrum:
    dropping direction ``i`` costs ``Sigma_i^2`` of mean squared output error per token (of loss,
    to second order and up to a common factor, with ``grad_moment``)."""
    metric, chol, out_chol = _whitened(weight, moment, damping, name, grad_moment, grad_damping)
    P, S, Qh = torch.linalg.svd(metric, full_matrices=False)
    return WhitenedSVD(P, S, Qh, chol, out_chol)


def whitened_spectrum(weight: torch.Tensor, moment: torch.Tensor, damping: float = DEFAULT_DAMPING,
                      name: str = "layer", grad_moment: Optional[torch.Tensor] = None,
                      grad_damping: float = DEFAULT_GRAD_DAMPING) -> torch.Tensor:
    """``Sigma`` of :func:`whitened_svd` alone (singular values only, ~3x cheaper than the full SVD)."""
    return torch.linalg.svdvals(_whitened(weight, moment, damping, name, grad_moment, grad_damping)[0])


def whitened_factors(P: torch.Tensor, S: torch.Tensor, Qh: torch.Tensor, chol: torch.Tensor,
                     rank: int, out_chol: Optional[torch.Tensor] = None, minor: bool = False,
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, V)`` (float64) with orthonormal ``U`` (``m x k``), ``V`` (``n x k``) and
    ``V diag(s) U^T = R^-T P_k Sigma_k Q_k^T L^-1``, the best rank-``k`` weight in the metric of
    ``L`` (and ``R = out_chol``; ``None``: the identity). ``minor``: the ``k`` *weakest* whitened
    directions instead (the part whose removal the metric notices least; what a residual layer
    with ``directions="minor"`` trains)."""
    k = rank
    take = slice(S.numel() - k, None) if minor else slice(0, k)
    B = torch.linalg.solve_triangular(chol.mT, Qh[take].mT, upper=True)  # L^-T Q_k, (m, k)
    QB, RB = torch.linalg.qr(B)
    core = S[take, None] * RB.mT                                         # Sigma_k R_B^T, (k, k)
    left = P[:, take]
    if out_chol is not None:
        left, RA = torch.linalg.qr(torch.linalg.solve_triangular(out_chol.mT, left, upper=True))  # R^-T P_k
        core = RA @ core
    A, s, Dh = torch.linalg.svd(core)
    return QB @ Dh.mT, s, left @ A


def contrast_factors(weight: torch.Tensor, moment: torch.Tensor, keep_moment: torch.Tensor, rank: int,
                     damping: float = DEFAULT_DAMPING, name: str = "layer",
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, V)`` (float64, ``U``: ``m x k`` and ``V``: ``n x k`` orthonormal) of the part of
    ``W`` on the ``k`` input directions the calibration inputs use most *relative to* the inputs
    of text whose behaviour should be kept: ``span(U)`` is spanned by the top ``k`` generalized
    eigenvectors of ``C u = lambda (C_keep + mu I) u`` (``C = moment``, ``C_keep = keep_moment``,
    ``mu = damping * trace(C_keep) / m``), which maximise ``u^T C u / u^T C_keep u``; then
    ``V diag(s) U^T = W U U^T`` (an SVD of the ``n x k`` matrix ``W U``), so the rest of ``W``,
    ``W (I - U U^T)``, is what those directions do not carry. What a residual layer with
    ``directions="contrast"`` trains: directions the task's text excites and the kept text
    barely does, so moving them moves the kept text's outputs least."""
    m = weight.shape[1]
    if moment.shape != (m, m) or keep_moment.shape != (m, m):
        raise ValueError(f"calibration: layer {name!r} has weight {tuple(weight.shape)} but input moments of shapes "
                         f"{tuple(moment.shape)} and {tuple(keep_moment.shape)}")
    w = weight.detach().to(torch.float64)
    chol = _cholesky(keep_moment.to(w.device, torch.float64), damping, name, "inputs of the text to keep")
    c = moment.to(w.device, torch.float64)
    half = torch.linalg.solve_triangular(chol, c, upper=False)                # L^-1 C
    core = torch.linalg.solve_triangular(chol, half.mT, upper=False)           # L^-1 C L^-T
    _, vectors = torch.linalg.eigh((core + core.mT) / 2)                       # ascending
    basis = torch.linalg.solve_triangular(chol.mT, vectors[:, m - rank:].flip(-1), upper=True)  # L^-T y
    U, _ = torch.linalg.qr(basis)
    P, S, Qh = torch.linalg.svd(w @ U, full_matrices=False)
    return U @ Qh.mT, S, P


def _complement(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (``d x (d - k)``) of the orthogonal complement of ``basis``'s columns."""
    return torch.linalg.qr(basis, mode="complete").Q[:, basis.shape[1]:]


class FisherGrowth(NamedTuple):
    """:func:`fisher_growth`'s result: the gains (singular values of the error in whitened
    coordinates of the space outside the bases, ``F = Py diag(gains) Qy^T`` below) and the two
    bases :meth:`factors` writes back, ``left = Pv Ra^-1 Py`` (``n x r``) and ``right = Pu Rb^-1 Qy``
    (``m x r``). ``gains[i]^2`` is the metric's error (the loss, to second order, with a gradient
    moment) that direction ``i`` removes."""

    gains: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def factors(self, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, sigma, Q)`` (float64): ``P`` (``n x r``) orthonormal and orthogonal to ``V``,
        ``Q`` (``m x r``) orthonormal and orthogonal to ``U``, ``P diag(sigma) Q^T`` the best
        rank-``r`` addition outside the bases (``r <= gains.numel()``): ``left_r diag(gains_r)
        right_r^T`` written as orthonormal factors (a QR of each side, the ``r x r`` core's SVD)."""
        left, RL = torch.linalg.qr(self.left[:, :r])
        right, RR = torch.linalg.qr(self.right[:, :r])
        a, sigma, bh = torch.linalg.svd(RL @ (self.gains[:r, None] * RR.mT))
        return left @ a, sigma, right @ bh.mT


@torch.no_grad()
def fisher_growth(error: torch.Tensor, u: torch.Tensor, v: torch.Tensor, moment: torch.Tensor,
                  grad_moment: Optional[torch.Tensor] = None, r: Optional[int] = None, damping: float = DEFAULT_DAMPING,
                  grad_damping: float = DEFAULT_GRAD_DAMPING, name: str = "layer") -> FisherGrowth:
    """The directions outside a spectral layer's bases that remove the most of a weight error in
    the Fisher (or input) metric: what growth from the pretrained weights adds.

    ``error`` (``n x m``) is what the layer lacks, e.g. ``W0 - V diag(s) U^T`` for its pretrained
    weight ``W0``; ``u`` (``m x k``), ``v`` (``n x k``) its orthonormal bases. New directions must
    stay orthogonal to them, so the addition is ``Pv X Pu^T`` with ``Pv``, ``Pu`` orthonormal bases
    of the complements, and the best rank-``r`` ``X`` minimises ``||R^T (E - Pv X Pu^T) L||_F``
    (``L``, ``R``: the Cholesky factors of ``moment + lambda I`` and ``grad_moment + mu I`` as in
    :func:`whitened_svd`; ``R = I`` without a gradient moment). With ``R^T Pv = Qa Ra`` and
    ``L^T Pu = Qb Rb`` (QR), ``||R^T (E - Pv X Pu^T) L||^2 = ||F - Ra X Rb^T||^2 + const`` for
    ``F = Qa^T R^T E L Qb``, so ``Ra X Rb^T`` is ``F``'s truncated SVD (Eckart-Young) and
    ``X = Ra^-1 [F]_r Rb^-T``. A direction that removes less than ``sqrt(eps)`` of the whole
    error (rounding) is left out; ``r`` (``None``: all) caps how many are kept."""
    n, m = error.shape
    if u.shape[0] != m or v.shape[0] != n or u.shape[1] != v.shape[1]:
        raise ValueError(f"calibration: layer {name!r} has an error of shape {(n, m)} but bases of shapes "
                         f"{tuple(u.shape)} and {tuple(v.shape)}")
    f64 = torch.float64
    U, V, E = u.detach().to(f64), v.detach().to(f64), error.detach().to(f64)
    metric, chol, out_chol = _whitened(E, moment, damping, name, grad_moment, grad_damping)  # R^T E L
    Pv, Pu = _complement(V), _complement(U)
    Qa, Ra = torch.linalg.qr(Pv if out_chol is None else out_chol.mT @ Pv)
    Qb, Rb = torch.linalg.qr(chol.mT @ Pu)
    core = Qa.mT @ metric @ Qb
    Py, gains, Qyh = torch.linalg.svd(core, full_matrices=False)
    # a direction that removes less than sqrt(eps) of the whole error is rounding (an error inside
    # the bases leaves gains at ~eps of it)
    floor = float(torch.linalg.matrix_norm(metric)) * torch.finfo(error.dtype).eps ** 0.5
    keep = int((gains > floor).sum())
    if r is not None:
        keep = min(keep, int(r))
    left = Pv @ torch.linalg.solve_triangular(Ra, Py[:, :keep], upper=True)
    right = Pu @ torch.linalg.solve_triangular(Rb, Qyh[:keep].mT, upper=True)
    return FisherGrowth(gains[:keep], left, right)
