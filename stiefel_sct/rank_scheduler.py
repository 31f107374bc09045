"""RankScheduler: each spectral layer's rank grows and shrinks while it trains.

In the notation of ``DESIGN.md`` a layer holds ``W = V diag(s) U^T`` (``n x m``), ``U`` (``m x k``)
and ``V`` (``n x k``) orthonormal. With ``G = dL/dW`` the factor gradients autograd already holds
are ``dL/dU = G^T V diag(s)`` and ``dL/dV = G U diag(s)``: the directions outside the current
bases that the loss asks for are their parts orthogonal to the bases,
``D_U = (I - U U^T) dL/dU`` and ``D_V = (I - V V^T) dL/dV``, and ``G`` is never formed.

Every ``every`` calls of :meth:`RankScheduler.step` (after ``optimizer.step()``, before
``zero_grad``), each layer

1. **shrinks**: drops the directions whose ``|s_i| < tol * ||s||`` (never below ``min_rank``;
   the largest ``|s_i|`` are kept). ``U``, ``V`` are orthonormal and ``s`` is the diagonal of the
   core, so the ``|s_i|`` are the singular values of ``W`` and the weight moves by exactly the
   dropped ones: ``||W - W'||_F = sqrt(sum of dropped s_i^2)``;
2. **grows**: appends ``r`` new orthonormal columns to ``U`` (the top ``r`` left singular vectors of
   ``D_U``, orthogonalised again against ``U``; ``U`` here is every column the layer had at the
   event, so a direction the shrink just dropped is never grown back) and ``r`` to ``V`` (from
   ``D_V``), with new
   singular values ``0``: the layer's function is unchanged at the moment of growth, and the
   next steps decide whether the new directions earn a singular value (those that do not are
   dropped by the next shrink). ``r`` is ``grow``, capped by ``max_rank``, ``min(m, n)``, the
   numerical rank of ``D_U`` and ``D_V``, and the parameter ``budget``: with a budget, layers
   are served in the order of ``(||D_U||^2 + ||D_V||^2) / (m + n + 1)`` (gradient energy per
   parameter a column costs), the greedy idea of :func:`~stiefel_sct.convert.budget_ranks`.

**Judging newborns.** A compact layer's new direction starts at ``s = 0`` (its ``u``, ``v`` get no
gradient until ``s`` moves) and Adam moves ``s`` about one lr per step, so the plain test
``|s_i| < tol ||s||`` drops it at the next event whenever ``||s||`` is a pretrained spectrum
(every one of 5,040 grown directions in ``finetune_smollm2``'s adaptive arm). Two rules judge it by
its own history instead: ``grace`` (GeoLoRA waits ~50 steps without rank changes; DLRT truncates
only after a full integrator step) keeps it for a number of events, and ``newborn_rate`` keeps it
while ``|s_j|`` keeps up with a fraction of the distance the optimizer could have moved it, the sum
of the learning rates since its birth (our rule: a test relative to its change, not to the
spectrum; AdaLoRA's sensitivity ``|s_j dL/ds_j|`` is another such score).

**Growth with values** (``growth="gradient"``). The factor gradients only hold the blocks of ``G``
that touch the bases (``G U``, ``G^T V``), and the default growth pairs the top column of ``D_U``
with the top column of ``D_V`` from two separate SVDs, so ``v_j^T G u_j``, the gradient the
newborn's ``s_j`` then sees, can be anything. DLRT's and GeoLoRA's augmented-core step gives the
new directions values through the core block ``V_new^T G U_new``; we take its leading singular
triplets directly: a :class:`~stiefel_sct.sketch.GradientSketch` on each compact
:class:`~stiefel_sct.SpectralLinear`, filled by hooks during the ``sketch_steps`` backwards before
an event (``G = dY^T X``, sketched from the activations, ``G`` still never formed), yields
``N = (I - V V^T) G (I - U U^T) ~ P diag(sigma) Q^T``, and the layer grows ``U <- [U, Q]``,
``V <- [V, -P]``, ``s <- [s, c sigma]``: a steepest-descent step on the new block (GeoLoRA's
``-lr V_new^T G U_new``, diagonal because ``P``, ``Q`` are its singular vectors), scaled so that its
length ``||c sigma||`` is that of one dense Adam step, ``lr sqrt(m n)`` (Adam moves every weight by
about ``lr``). The function moves by that step, not by zero; each newborn's ``s_j`` then sees the
gradient ``-sigma_j`` it was chosen for. Where we depart: no K/L integrator steps and no SVD of the
whole augmented core (the off-diagonal blocks ``V^T G Q``, ``P^T G U`` would rotate the kept
directions, whose Adam moments are per column); one sketch, summed over ``sketch_steps``
backwards, instead of the exact gradient of the last batch.

**Growth from the pretrained weights** (``growth="source"``). A compact layer converted from a
pretrained weight ``W0`` lost the directions its conversion cut, and a gradient sketch cannot give
them back (newborns at one step's length stay weak; in ``finetune_smollm2`` they added nothing in
100 steps). With ``source`` naming each layer's ``W0`` (read at an event, one layer at a time: the
compact model never holds it), growth adds the rank-``r`` part ``P diag(sigma) Q^T`` outside the
bases that removes the most of the error ``W0 - V diag(s) U^T`` in the Fisher metric of the
training batches seen in the window (hooks sum the layer's input moment ``C`` and output-gradient
moment ``G``, :class:`~stiefel_sct.sketch.LayerMoments`; the constrained truncation is
:func:`~stiefel_sct.calibration.fisher_growth`): ``U <- [U, Q]``, ``s <- [s, sigma]``,
``V <- [V, P]``. New directions arrive at full strength, and the weight moves toward the
pretrained one where the task's loss is most sensitive. The metric matters: on SmolLM2-135M
converted at 25% in the Fisher metric (held-out 5.633), growing back to 50% took it to 6.291 in
the plain metric, 6.133 in the inputs' metric, 5.144 in the Fisher metric (prototypes, Intel
Xeon). Its budget score is the metric's error removed, ``sum gains^2`` per parameter, so layers
are compared in loss units; a budget-truncated layer is refitted at the rank it gets. The window's
moments hold ``m^2 + n^2`` numbers per layer, so none is summed while the budget is full (nothing
could grow; room a shrink frees is refilled at the event after the next). Peers: the
same whitened truncation as the conversion (SVD-LLM, FWSVD; :mod:`stiefel_sct.calibration`),
applied to what the bases lack; no rank-adaptive method we know of grows back pretrained
directions.

**Residual-mode layers** (``spectralize(..., residual_dtype=...)``, ``W = V diag(s) U^T + R`` with
``R`` frozen) move rank instead of creating and destroying it, and their function never changes
(to ``R``'s rounding: exactly in float64, ~1e-7 relative in float32):

- a dropped direction goes back into the residual, ``R <- R + s_i v_i u_i^T``: nothing is lost;
- growth takes the leading singular triplets of the residual's part outside every column the
  layer had at the event, ``(I - V V^T) R (I - U U^T)``, *with their singular values*:
  ``R <- R - P diag(sigma) Q^T``, ``U <- [U, Q]``, ``s <- [s, sigma]``, ``V <- [V, P]``. A direction
  arrives at full strength, so it is compared with the trained spectrum on equal terms (a new
  direction of a compact layer starts at ``s = 0``). Only directions with ``sigma >= tol ||s||``
  arrive: a weaker one would go back at the next event. With a budget, residual layers are served by
  ``sum sigma^2 / (m + n + 1)``; a budget over residual and compact layers together is refused (the
  two scores are not comparable);
- with ``growth="source"`` a residual layer takes instead the rank-``r`` part outside its bases
  that removes the most of ``R`` in the Fisher metric of the window's batches
  (:func:`~stiefel_sct.calibration.fisher_growth` with the error ``R``, refitted at the rank the
  budget gives it): ``R <- R - P diag(sigma) Q^T`` as above. Any part moved out of ``R`` keeps the
  function; this one puts into training the directions the task's loss is most sensitive to, not
  the ones with the most weight. Its budget score is the loss removed per parameter, as for a
  compact layer's source growth, and only as many arrive as keep every value ``>= tol ||s||``.
  In ``finetune_smollm2`` (SmolLM2-135M, every decoder linear from rank 8 of the Fisher split to
  rank 16's parameters at step 10, ``residual_sadapt``) it ends at 3.693 held-out, the fixed rank
  16 of that split at 3.694 (``residual_adapt``, the plain split grown by singular values at step
  20: 3.711); the budget went unevenly (``v_proj`` 23.6 directions on average, ``q_proj`` 9.1) but
  an even spread did as well, so the gain over ``residual_adapt`` is the metric and the earlier
  event, not the allocation.

**Pruning to a budget from above** (``budget_by``, AdaLoRA's schedule). Layers built above
``budget`` (e.g. every layer at twice the rank the budget pays for) are pruned to it: the size
the events allow falls from the layers' size when the scheduler was built, ``P0``, to ``budget``
at step ``T = budget_by`` along AdaLoRA's cubic, ``budget + (P0 - budget) (1 - t / T)^3``, and
each event drops the directions with the smallest ``|s_i| / (||s|| (m + n + 1))`` across all
layers until the layers fit: the shrink's own relative magnitude, per parameter a direction
costs (never below ``min_rank``, never a newborn in its grace window; a residual layer's
direction goes back into ``R``). Measured in ``rank_sweep`` (quick preset, from scratch, every
layer from rank 128 to rank 64's parameters by step 150 of 300, AMD EPYC): held-out 5.245,
against 5.287 for rank 64 trained at that size from step 0 and 5.247 for rank 128 (with a
second seed 5.267 against 5.269 and 5.236: a tie with rank 64 there). The budget
went to attention (``k``, ``v`` kept all 128 directions, ``q``, ``o`` 115-119, the MLP's 27-34),
but that allocation trained from step 0 reaches only 5.317: the gain is the early training at
the larger rank, which the pruning keeps. Optimal Brain Damage's saliency ``s_i^2 v_i`` (Adam's
second moment of ``s`` as the Fisher diagonal) pruned to 5.281, the score without the
per-parameter cost to 5.263 (prototypes). Where we depart from AdaLoRA (Zhang et al., ICLR
2023): its factors are only pushed toward orthogonality by a penalty and its score is a smoothed
sensitivity ``|s_i dL/ds_i|``; ours are orthonormal, so ``|s_i|`` is exactly what the weight
loses (``||W - W'||_F``), and no per-step statistics are kept. The layers hold more than
``budget`` until ``T``: the budget is the trained model's size, not the training's. On a
pretrained model converted in the Fisher metric (MiniLM, 70% pruned to 50% while healing) any
such column selection ended below the one-shot 50% conversion (cosine 0.840-0.846 against
0.909): dropping columns of a basis orthonormal in the plain metric does not refit the kept
part in the Fisher metric; convert at the budget there.

Each move is logged as a column block of the layer's frozen ``U0``, ``s0``, ``V0``
(:meth:`~stiefel_sct.SpectralLinear.move_residual`), so a checkpoint rebuilds ``R`` from the base
weight by replaying the moves bit for bit, and the PEFT export's change is still
``V diag(s) U^T - V0 diag(s0) U0^T``. This is rank adaptivity no peer we know of offers: PiSSA and
StelLA fix the split at conversion; DLRT, GeoLoRA and AdaLoRA have no residual to draw from.

Where this departs from DLRT's rank-adaptive integrator (Schotthoefer et al., NeurIPS 2022): the
new directions come from the gradients of the factors (scaled by ``s``, so a direction
``i`` with ``s_i == 0`` contributes none) rather than from separate K- and L-steps, and the
core is not re-diagonalised here: SCT keeps it diagonal by construction (``s`` is a vector), so
truncation is a selection of columns.

Optimizer state follows the parameters: kept columns keep their moments (and every kept
parameter its step count), new columns start at zero moments, dropped columns leave nothing.
For ``SpectralAdam`` in ``mode="riemannian"`` the second moment of a factor is one number per
matrix broadcast over it, so new columns take that number. The parameter objects are replaced
wherever they are held (the layer, the optimizer's groups and state, the factor registry);
autograd remembers a leaf's shape, so resizing ``p.data`` would break the next backward.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union, cast

import geoopt
import torch

from .calibration import fisher_growth
from .checks import check_int, is_real
from .layers import SpectralLinear
from .manifold import compute_dtype
from .quant import dequantize, quantize_, quantized_zeros
from .rank import spectral_params
from .sketch import GradientSketch, LayerMoments, outside_basis
from .triples import owner_of, spectral_triples

__all__ = ["RankScheduler"]

_GROWTH = ("factors", "gradient", "source")
Source = Union[Mapping[str, torch.Tensor], Callable[[str], Optional[torch.Tensor]]]


def _new_directions(basis: torch.Tensor, grad: Optional[torch.Tensor], r: int) -> torch.Tensor:
    """Up to ``r`` orthonormal columns orthogonal to ``basis``, the top left singular vectors of the
    gradient's component outside it (numerically zero directions are not taken)."""
    empty = basis.new_zeros(basis.shape[0], 0)
    if grad is None or r == 0:
        return empty
    work = basis.to(torch.float64)
    d = grad.to(torch.float64)
    scale = float(torch.linalg.matrix_norm(d, ord=2)) if d.numel() else 0.0
    d = d - work @ (work.mT @ d)
    if not bool(torch.isfinite(d).all()):
        return empty
    p, sv, _ = torch.linalg.svd(d, full_matrices=False)
    # what is left of a gradient inside the basis is rounding (~sqrt(eps) of it, from the basis's
    # own orthonormality): relative to the gradient, not to that rounding, or a full basis "grows"
    floor = max(float(sv[0]) * 1e-6, scale * torch.finfo(basis.dtype).eps ** 0.5) if sv.numel() else 0.0
    if sv.numel() == 0 or float(sv[0]) <= floor:
        return empty
    take = int((sv > floor).sum().clamp(max=r))
    q = p[:, :take]
    for _ in range(2):  # orthogonal to the basis to rounding (Gram-Schmidt twice), then orthonormal
        q = q - work @ (work.mT @ q)
        q, _ = torch.linalg.qr(q)
    return q.to(basis.dtype)


def _seed(name: str, step: int) -> int:
    """A seed that is the same in every process (``hash`` of a str is not): resume is bitwise."""
    return (zlib.crc32(name.encode()) * 1_000_003 + step) % 2**63


@torch.no_grad()
def _residual_directions(residual: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: int,
                         seed: int, floor: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, sigma, Q)``: up to ``r`` leading singular triplets of the residual's part outside the
    layer's bases, ``N = (I - V V^T) R (I - U U^T)`` (``u``, ``v``: every column the layer had at
    the event), so ``[V, P]`` and ``[U, Q]`` stay orthonormal and ``P diag(sigma) Q^T = P P^T R Q Q^T``
    is exactly what leaves ``R``. A randomized range finder (Halko, Martinsson and Tropp, 2011:
    ``r + 8`` probes, two power iterations, seeded) keeps the cost at a few passes over ``R``; an
    inexact subspace only picks slightly worse directions, the function is kept either way.
    Directions with ``sigma`` at rounding level, or below ``floor``, are not taken."""
    work = compute_dtype(residual.dtype)
    R, U, V = residual.to(work), u.to(work), v.to(work)
    m, n = U.shape[0], V.shape[0]
    room = min(m - U.shape[1], n - V.shape[1])
    empty = (v.new_zeros(n, 0), v.new_zeros(0), u.new_zeros(m, 0))
    if r <= 0 or room <= 0:
        return empty

    probes = min(r + 8, room)
    gen = torch.Generator().manual_seed(seed)
    y = outside_basis(V, R @ outside_basis(U, torch.randn(m, probes, generator=gen, dtype=work).to(R.device)))
    for _ in range(2):
        y = torch.linalg.qr(y).Q
        y = outside_basis(V, R @ outside_basis(U, R.mT @ y))
    p = torch.linalg.qr(outside_basis(V, torch.linalg.qr(y).Q)).Q
    q = torch.linalg.qr(outside_basis(U, R.mT @ p)).Q
    a, sigma, bt = torch.linalg.svd(p.mT @ R @ q)
    scale = float(torch.linalg.matrix_norm(R, ord="fro")) if R.numel() else 0.0
    least = max(max(scale, 1e-300) * torch.finfo(residual.dtype).eps ** 0.5, floor)
    take = int((sigma > least).sum().clamp(max=r))
    if take == 0:
        return empty
    return ((p @ a[:, :take]).to(v.dtype), sigma[:take].to(v.dtype), (q @ bt[:take].mT).to(u.dtype))


class RankScheduler:
    """Grow and shrink the rank of every spectral layer an optimizer trains.

    Modelled on ``torch.optim.lr_scheduler``: build it on the optimizer, call :meth:`step` after
    each ``optimizer.step()`` (before ``zero_grad``: growth reads the factors' gradients), save
    :meth:`state_dict` with the rest. The math and where it departs from DLRT: the module
    docstring of :mod:`stiefel_sct.rank_scheduler`.

    Args:
        optimizer: a ``torch.optim.Optimizer`` holding the ``U``, ``s``, ``V`` of spectral layers
            (:class:`~stiefel_sct.SpectralAdam`, either mode, or any optimizer, e.g. with
            :func:`~stiefel_sct.stiefel_retraction`, whose per-parameter state tensors are shaped
            like their parameter). Layers whose ``U``, ``s``, ``V`` are not all in the optimizer
            are left alone.
        every: a rank event every ``every`` calls of :meth:`step` (``>= 1``).
        tol: shrink threshold, in ``[0, 1)``: directions with ``|s_i| < tol * ||s||`` are dropped.
        grow: columns added to each layer per event (``>= 0``; 0 = shrink only).
        min_rank: no layer goes below it (``>= 1``).
        max_rank: no layer goes above it (``None``: ``min(m, n)``).
        budget: ``None`` or the most spectral parameters (``sum k (m + n + 1)`` over the scheduled
            layers) growth may reach; shrinking is never blocked by it.
        grace: a direction grown at an event may not be dropped at the next ``grace`` events
            (``>= 0``; 0, the default, is the behaviour before this option). A compact layer's new
            direction starts at ``s = 0`` and its ``s`` moves about one lr per step, so at the next
            event it is compared with a spectrum it has had no time to reach; DLRT and GeoLoRA
            likewise leave new directions tens of steps before truncating.
        newborn_rate: ``None`` (default: a grown direction is judged by ``tol`` like every other),
            or ``rho`` in ``(0, 1]``: a grown direction is also kept while ``|s_j| >= rho * L``,
            ``L`` the sum of its parameter group's learning rates since it was grown, i.e. while the
            optimizer kept moving it away from 0 at ``rho`` of Adam's full speed (about one lr per
            step). This judges a newborn by its own change, never against a pretrained spectrum it
            cannot reach in a run's length; one that stalls falls behind ``rho * L`` and is dropped.
        growth: where a compact layer's new directions come from. ``"factors"`` (default): the
            factors' gradients ``D_U``, ``D_V`` (above), new ``s = 0``, the function unchanged at
            growth. ``"gradient"``: the leading singular pairs of the layer's weight gradient
            outside its bases, sketched by hooks from its activations, each born with a value (one
            dense-Adam-length descent step): the function moves by that step. ``"source"``: the
            directions outside the bases that bring the layer closest to its pretrained weight
            (``source``) in the Fisher metric of the batches seen in the sketch window, with
            their singular values (module docstring): the function moves toward the pretrained
            one. Compact layers must be :class:`~stiefel_sct.SpectralLinear`. Residual-mode
            layers grow from their residual: its leading singular directions, or with
            ``"source"`` the ones that matter most in that Fisher metric (no ``source`` needed).
        sketch_steps: ``growth="gradient"`` or ``"source"``: how many backwards before each event
            are summed into the sketch or the moments (``1 <= sketch_steps <= every``; 1, the
            default, reads the last batch, ``every`` the whole window). The hooks are only on the layers during those
            steps; a forward under ``torch.no_grad`` is not seen. :meth:`state_dict` inside a
            window carries the sums so far (tensors: save it with ``torch.save``), so a resume
            there is bitwise.
        budget_by: ``None`` (default) or the step (calls of :meth:`step`, ``>= 1``) by which
            layers that start above ``budget`` must fit it (``budget`` required): each event before
            it prunes them to AdaLoRA's cubic schedule from their size at construction, and every
            event from it on to ``budget`` (module docstring). Growth is still capped by
            ``budget``, so nothing grows while the layers are above it.
        source: ``growth="source"`` only (required there when a compact layer is scheduled,
            refused otherwise): each compact
            layer's pretrained dense weight (``out_features x in_features``), by the layer's name
            in the optimizer (build it from ``model.named_parameters()``): a mapping holding every
            scheduled layer's (e.g. a state dict), or a callable ``name -> weight or None``
            (``None``: that layer does not grow; e.g. ``safe_open(path).get_tensor`` on the
            pretrained checkpoint, so the weights are read from the file when needed). Read at events only,
            one layer at a time; never saved by :meth:`state_dict` (a resumed scheduler keeps
            its own).

    Attributes:
        history: one dict per layer and event that changed a rank: ``step``, ``layer``,
            ``old_rank``, ``new_rank``, ``dropped``, ``grown``, ``dropped_born`` (the events at
            which the dropped directions were grown; directions the layer had before any event
            are not listed). :meth:`survival` sums it per event.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int = 100, tol: float = 1e-2, grow: int = 4,
                 min_rank: int = 1, max_rank: Optional[int] = None, budget: Optional[int] = None,
                 grace: int = 0, newborn_rate: Optional[float] = None, growth: str = "factors",
                 sketch_steps: int = 1, source: Optional[Source] = None, budget_by: Optional[int] = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.every = cast(int, check_int(every, "every", 1))
        if not is_real(tol) or not 0.0 <= tol < 1.0:
            raise ValueError(f"tol must be a float in [0, 1), got {tol!r}")
        self.tol = float(tol)
        self.grow = cast(int, check_int(grow, "grow", 0))
        self.min_rank = cast(int, check_int(min_rank, "min_rank", 1))
        self.max_rank = check_int(max_rank, "max_rank", self.min_rank, optional=True)
        self.budget = check_int(budget, "budget", 1, optional=True)
        self.grace = cast(int, check_int(grace, "grace", 0))
        self.budget_by = check_int(budget_by, "budget_by", 1, optional=True)
        if self.budget_by is not None and self.budget is None:
            raise ValueError("budget_by is the step by which the layers must fit budget: pass budget= as well")
        if newborn_rate is not None and (not is_real(newborn_rate) or not 0.0 < newborn_rate <= 1.0):
            raise ValueError(f"newborn_rate must be None or a float in (0, 1], got {newborn_rate!r}")
        self.newborn_rate = None if newborn_rate is None else float(newborn_rate)
        if growth not in _GROWTH:
            raise ValueError(f"growth must be one of {', '.join(map(repr, _GROWTH))}, got {growth!r}")
        self.growth = growth
        self.sketch_steps = cast(int, check_int(sketch_steps, "sketch_steps", 1))
        if self.sketch_steps > self.every:
            raise ValueError(f"sketch_steps must be in [1, every={self.every}], got {self.sketch_steps}")
        if source is not None and not (isinstance(source, Mapping) or callable(source)):
            raise TypeError(f"source must be a mapping or a callable from layer names to weights, got "
                            f"{type(source).__name__}")
        if source is not None and growth != "source":
            raise ValueError(f"source is read only by growth='source' (got growth={growth!r}): drop it or grow from it")
        self.source = source
        if self.grow and getattr(optimizer, "step_in_backward", False):
            raise ValueError("grow > 0 reads the gradient after the optimizer's step (the factors' gradients, or the "
                             "layers' sketched ones), which step_in_backward=True steps and frees inside the backward; "
                             "use grow=0 (shrink only) or step_in_backward=False")
        if any(hasattr(p, "device_mesh") for g in optimizer.param_groups for p in g["params"]):
            raise NotImplementedError("RankScheduler does not support FSDP2-sharded (DTensor) parameters yet: a rank "
                                      "change would have to re-shard every resized factor")
        self.optimizer = optimizer
        self.last_step = 0
        self.history: List[Dict] = []
        # per layer, per column: the step of the event that grew it (None: there before any event)
        self.born: Dict[str, List[Optional[int]]] = {}
        # the running sum of each param group's lr over the steps, and its value at each event
        self.lr_sums: List[float] = [0.0] * len(optimizer.param_groups)
        self.lr_at: Dict[int, List[float]] = {}
        layers = self._layers()
        self._check_layers(layers)
        # budget_by: the size the pruning schedule starts from (the layers' size now)
        self.start_size = self._size((layer, layer.s.shape[0]) for _, layer in layers)
        # growth="gradient": per compact layer, the sketch the backwards before the next event fill;
        # "source": per layer (residual ones too), the moments
        self._sketches: Dict[str, Union[GradientSketch, LayerMoments]] = {}
        self._arm()

    def _check_layers(self, layers: List[Tuple[str, Any]]) -> None:
        """The layers this scheduler's settings can serve: at least one; one kind under a growing
        budget; linear layers for gradient growth."""
        if not layers:
            raise ValueError("the optimizer holds no spectral layer (U, s and V of one layer all in it)")
        kinds = {getattr(layer, "residual_dtype", None) is not None for _, layer in layers}
        if self.budget is not None and self.grow and len(kinds) == 2:
            raise NotImplementedError("a budget over residual-mode and compact spectral layers together: their growth "
                                      "scores (a residual's singular values, a compact layer's gradient energy) are "
                                      "not comparable; schedule the two kinds with two RankSchedulers")
        hooked = self.growth != "factors" and self.grow
        for name, layer in layers if hooked else ():
            if getattr(layer, "residual_dtype", None) is None and not isinstance(layer, SpectralLinear):
                raise NotImplementedError(f"growth={self.growth!r} reads a linear layer's inputs and output gradients "
                                          f"from hooks; {name} is a {type(layer).__name__}: use "
                                          "growth='factors', or a second RankScheduler without it")
        # a residual layer grows from its own residual (what it lacks is there); a compact one needs
        # its pretrained weight, found by its name
        compact = any(getattr(layer, "residual_dtype", None) is None for _, layer in layers)
        if hooked and self.growth == "source" and compact:
            if self.source is None:
                raise ValueError("growth='source' grows each compact layer from its pretrained weight: pass source=<a "
                                 "mapping or callable from layer names to the dense weights the layers were converted "
                                 "from>")
            if not all(len(g.get("param_names") or ()) for g in self.optimizer.param_groups):
                raise ValueError("growth='source' finds each layer's pretrained weight by the layer's name: build the "
                                 "optimizer from model.named_parameters()")
        elif hooked and self.growth == "source" and self.source is not None:
            raise ValueError("source is read only for compact layers, and every scheduled layer is in residual mode "
                             "(each grows from its own residual): drop source")

    # ------------------------------------------------------------------------------ discovery
    def _layers(self) -> List[Tuple[str, Any]]:
        """``(name, layer)`` of every spectral layer whose U, s, V the optimizer holds."""
        params, names = [], {}
        for group in self.optimizer.param_groups:
            params += group["params"]
            for p, n in zip(group["params"], group.get("param_names") or []):
                names[id(p)] = n
        triples, _ = spectral_triples(params)
        out = []
        for i, (u, _, _) in enumerate(triples):
            name = names.get(id(u))
            out.append((name[: -len(".U")] if name and name.endswith(".U") else f"layer{i}", owner_of(u)))
        return out

    def ranks(self) -> Dict[str, int]:
        """The current rank of every scheduled layer, by name."""
        return {name: layer.s.shape[0] for name, layer in self._layers()}

    @staticmethod
    def _cost(layer) -> int:
        return spectral_params(layer.U.shape[0], layer.V.shape[0])

    @classmethod
    def _size(cls, ranked: Iterable[Tuple[Any, int]]) -> int:
        """Spectral parameters of ``(layer, rank)`` pairs: what the budget counts."""
        return sum(k * cls._cost(layer) for layer, k in ranked)

    # ------------------------------------------------------------------------------ the event
    @torch.no_grad()
    def step(self) -> None:
        """Count one optimizer step; every ``every`` steps, shrink then grow every layer."""
        self.last_step += 1
        groups = self.optimizer.param_groups
        if len(self.lr_sums) != len(groups):
            self.lr_sums = self.lr_sums[:len(groups)] + [0.0] * (len(groups) - len(self.lr_sums))
        for i, group in enumerate(groups):
            self.lr_sums[i] += float(group["lr"])
        if self.last_step % self.every:
            self._arm()
            return
        try:
            self._event(groups)
        finally:
            self._disarm()
            self._arm()

    def _event(self, groups: List[Dict[str, Any]]) -> None:
        self.lr_at[self.last_step] = list(self.lr_sums)
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        layers = self._layers()
        plans, youngs = {}, {}
        for name, layer in layers:
            s = layer.s.detach()
            born = self._born(name, s.shape[0])
            young = [b is not None and self.last_step - b <= self.grace * self.every for b in born]
            if self.newborn_rate is not None:
                gi = group_of.get(id(layer.s), 0)
                reach = [None if b is None or b not in self.lr_at else self.lr_sums[gi] - self.lr_at[b][gi] for b in born]
                mags = s.abs().tolist()
                young = [y or (L is not None and mag >= self.newborn_rate * L) for y, L, mag in zip(young, reach, mags)]
            plans[name], youngs[name] = (layer, self._kept(s, young)), young
        if self.budget_by is not None:
            self._prune(plans, youngs)
        grown = self._growth(plans, {name: float(groups[group_of.get(id(layer.s), 0)]["lr"])
                                     for name, (layer, _) in plans.items()})
        replaced: Dict[int, Tuple[torch.Tensor, torch.Tensor, int, Optional[int]]] = {}
        for name, (layer, keep) in plans.items():
            k = layer.s.shape[0]
            new_u, new_v, new_s = grown.get(name, (None, None, None))
            r = 0 if new_u is None else new_u.shape[1]
            if len(keep) == k and r == 0:
                continue
            self._resize(layer, keep, new_u, new_v, new_s, replaced)
            born = self._born(name, k)
            kept = set(keep)
            self.history.append({"step": self.last_step, "layer": name, "old_rank": k, "new_rank": len(keep) + r,
                                 "dropped": k - len(keep), "grown": r,
                                 "dropped_born": [b for i, b in enumerate(born) if i not in kept and b is not None]})
            self.born[name] = [born[i] for i in keep] + [self.last_step] * r
        if replaced:
            self._update_optimizer(replaced)

    def _arm(self) -> None:
        """``growth="gradient"`` (``"source"``): hook every compact layer (every layer) while the next
        event is at most ``sketch_steps`` calls of :meth:`step` away, so the backwards before it are
        sketched (their moments summed; one sketch or moment pair per layer and event)."""
        if self.growth == "factors" or not self.grow:
            return
        to_event = self.every - self.last_step % self.every  # calls of step() until the next event
        if to_event > self.sketch_steps:
            self._disarm()
            return
        if self._sketches:
            return  # this window's sketches are filling
        layers = self._layers()
        ranked = [(layer, layer.s.shape[0]) for _, layer in layers]
        if self.growth == "source" and self._no_room(self._budget_left(ranked), [layer for layer, _ in ranked]):
            # nothing could grow at the next event unless its shrink frees room, and then the event
            # after it grows: a window of every layer's moments (1.2 GB for SmolLM2-135M) is not
            # worth holding for that. finetune_smollm2's sct_sadapt held them through its three
            # windows after the budget filled: with this (and the weights read without a memory
            # map) its peak fell from 6.76 to 4.81 GB and its median step from 4.91 to 3.11 s
            return
        for name, layer in layers:
            if self.growth == "source":  # residual layers too: their growth is weighed in the same metric
                self._sketches[name] = LayerMoments(layer)
            elif getattr(layer, "residual_dtype", None) is None:
                self._sketches[name] = GradientSketch(layer, self.grow, _seed(name, self.last_step + to_event))

    def _budget_left(self, ranked: List[Tuple[Any, int]]) -> Optional[int]:
        """The budget's parameters left with each layer at its rank (``(layer, rank)`` pairs);
        ``None`` without a budget."""
        return None if self.budget is None else self.budget - self._size(ranked)

    def _no_room(self, left: Optional[int], layers: List[Any]) -> bool:
        """Whether ``left`` (:meth:`_budget_left`) pays for no further column of any of ``layers``."""
        return left is not None and all(self._cost(layer) > left for layer in layers)

    def _disarm(self) -> None:
        for sketch in self._sketches.values():
            sketch.remove()
        self._sketches = {}

    def _born(self, name: str, k: int) -> List[Optional[int]]:
        born = self.born.get(name)
        return born if born is not None and len(born) == k else [None] * k

    def survival(self) -> List[Dict[str, Optional[int]]]:
        """Per event that grew directions: ``step``, ``grown``, and ``dropped_next``, how many of
        them the first event allowed to drop them (``grace + 1`` events later) dropped; ``None``
        where that event has not happened yet."""
        grown: Dict[int, int] = {}
        dropped: Dict[int, int] = {}
        for h in self.history:
            grown[h["step"]] = grown.get(h["step"], 0) + h["grown"]
            for b in h.get("dropped_born", []):
                if h["step"] - b == (self.grace + 1) * self.every:
                    dropped[b] = dropped.get(b, 0) + 1
        return [{"step": step, "grown": g, "dropped_next": (dropped.get(step, 0) if
                 step + (self.grace + 1) * self.every <= self.last_step else None)}
                for step, g in sorted(grown.items()) if g]

    def _kept(self, s: torch.Tensor, young: Optional[List[bool]] = None) -> List[int]:
        """Indices (in order) of the directions the shrink keeps (``young``: newborns kept whatever
        their ``s``: within the grace window, or still growing at ``newborn_rate``)."""
        mag = s.abs().to(torch.float64)
        k = mag.numel()
        keep = mag >= self.tol * float(mag.norm())
        if young is not None and any(young):
            keep |= torch.tensor(young, device=keep.device)
        floor = min(self.min_rank, k)
        if int(keep.sum()) < floor:
            keep = torch.zeros_like(keep)
            keep[torch.topk(mag, floor).indices] = True
        return keep.nonzero().flatten().tolist()

    def allowed_size(self, step: int) -> Optional[int]:
        """The most spectral parameters the layers may hold after the event at ``step`` under
        ``budget_by`` (AdaLoRA's cubic from the size at construction down to ``budget``); ``None``
        without ``budget_by``."""
        if self.budget_by is None or self.budget is None:
            return None
        above = max(0, self.start_size - self.budget)
        return self.budget + int(above * (1.0 - min(1.0, step / self.budget_by)) ** 3)

    def _prune(self, plans: Dict[str, Tuple[Any, List[int]]], youngs: Dict[str, List[bool]]) -> None:
        """Drop (from each plan's kept indices, in place) the directions with the smallest
        ``|s_i| / (||s|| (m + n + 1))`` across layers until the kept size fits :meth:`allowed_size`
        (a layer keeps ``min_rank``; newborns in their grace window are never pruned)."""
        allowed = cast(int, self.allowed_size(self.last_step))
        size = self._size((layer, len(keep)) for layer, keep in plans.values())
        if size <= allowed:
            return
        order = []  # (score, name, index)
        for name, (layer, keep) in plans.items():
            mag = layer.s.detach().abs().to(torch.float64)
            scale = max(float(mag.norm()), 1e-300) * self._cost(layer)
            order += [(float(mag[i]) / scale, name, i) for i in keep if not youngs[name][i]]
        order.sort()
        dropped: Dict[str, set] = {name: set() for name in plans}
        for _, name, i in order:
            if size <= allowed:
                break
            layer, keep = plans[name]
            if len(keep) - len(dropped[name]) <= self.min_rank:
                continue
            dropped[name].add(i)
            size -= self._cost(layer)
        for name, gone in dropped.items():
            if gone:
                layer, keep = plans[name]
                plans[name] = (layer, [i for i in keep if i not in gone])

    def _growth(self, plans: Dict[str, tuple],
                lrs: Dict[str, float]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """New ``U`` and ``V`` columns per layer (and their ``s``: ``None`` for zeros), within
        ``max_rank`` and the budget; ``lrs``: each layer's ``s`` group's lr (gradient growth's step)."""
        if not self.grow:
            return {}
        left = self._budget_left([(layer, len(keep)) for layer, keep in plans.values()])
        if self._no_room(left, [layer for layer, _ in plans.values()]):
            return {}  # a full budget: no direction fits, none is worth computing (source growth's take minutes)
        candidates = []  # (energy per parameter, name, most columns, take(r) -> (U cols, V cols, s or None), layer)
        gains: Dict[str, torch.Tensor] = {}  # growth="source": each direction's own score
        for name, (layer, keep) in plans.items():
            u = layer.U.detach()
            cap = min(u.shape[0], layer.V.shape[0], self.max_rank or u.shape[0])
            r = min(self.grow, cap - len(keep))
            found = self._candidate(name, layer, keep, r, lrs) if r > 0 else None
            if found is not None:
                energy, r, take, direction_gains = found
                candidates.append((energy / self._cost(layer), name, r, take, layer))
                if direction_gains is not None:
                    gains[name] = direction_gains
        if left is None:
            return {name: take(r) for _, name, r, take, _ in candidates}
        if candidates and len(gains) == len(candidates):
            return self._by_direction(candidates, gains, left)
        out = {}
        for _, name, most, take, layer in sorted(candidates, key=lambda c: -c[0]):
            r = min(most, max(0, left) // self._cost(layer))
            if r:
                out[name] = take(r)
                left -= r * self._cost(layer)
        return out

    def _by_direction(self, candidates: List[tuple], gains: Dict[str, torch.Tensor], left: int) -> Dict[str, tuple]:
        """The budget served direction by direction, in the order of each direction's own score per
        parameter (``growth="source"``: its gain squared is the loss it removes, comparable across
        layers), each layer taking a prefix of its directions; a layer is refitted at the rank it gets."""
        order = sorted(((float(g) ** 2 / self._cost(layer), name, j) for _, name, _, _, layer in candidates
                        for j, g in enumerate(gains[name].tolist())), key=lambda c: -c[0])
        layers = {name: layer for _, name, _, _, layer in candidates}
        counts: Dict[str, int] = {}
        for _, name, j in order:
            cost = self._cost(layers[name])
            if cost <= left and counts.get(name, 0) == j:
                counts[name] = j + 1
                left -= cost
        return {name: take(counts[name]) for _, name, _, take, _ in candidates if counts.get(name)}

    def _candidate(self, name: str, layer, keep: List[int], r: int, lrs: Dict[str, float]) -> Optional[tuple]:
        """``(energy, r', take, gains)``: up to ``r`` new directions of one layer, the energy that
        scores them for a budget, ``take(k)``, the best ``k <= r'`` of them as ``(U cols, V cols,
        s)`` (``s`` ``None`` for zeros), and each direction's own gain (source growth, served by
        :meth:`_by_direction`; ``None`` otherwise); ``None`` where the layer has nothing to grow."""
        u, v = layer.U.detach(), layer.V.detach()
        # new directions are orthogonal to every column the layer had at this event, the ones the
        # shrink just dropped included: a layer must not drop a direction and grow it back at
        # s = 0 with fresh moments (a full-rank layer did exactly that: the only direction
        # outside its kept basis was the one it dropped)
        new_s: Optional[torch.Tensor] = None
        residual = getattr(layer, "residual_dtype", None) is not None
        # a residual layer takes only directions the next shrink would keep: one weaker than
        # tol * ||s|| would go back at the next event and come out again at the one after, forever
        floor = self.tol * float(layer.s.detach()[keep].double().norm()) if residual and keep else 0.0
        if self.growth == "source":
            return self._source_candidate(name, layer, r, floor)
        if residual:
            new_v, new_s, new_u = _residual_directions(layer.residual, u, v, r, _seed(name, self.last_step), floor)
            energy = float((new_s.double() ** 2).sum())
        elif self.growth == "gradient":
            sketch = self._sketches.get(name)
            if not isinstance(sketch, GradientSketch):  # a layer the optimizer took on after the window began
                return None
            new_v, sigma, new_u = sketch.directions(u, v, r)
            # P^T G Q = diag(sigma) > 0, so W - P diag(s) Q^T with s ~ sigma is a steepest-descent
            # step on the new block (GeoLoRA's -lr V_new^T G U_new, diagonal here). Its length is
            # that of one dense Adam step, lr sqrt(m n) (every weight moves by ~lr): one lr on s,
            # Adam's step on a fresh coordinate, left newborns at ~1e-2 against a spectrum of 2 to
            # 7 in rank_sweep, dropped at the next event
            new_v = -new_v
            length = lrs[name] * (u.shape[0] * v.shape[0]) ** 0.5
            new_s = (sigma.double() * (length / max(float(sigma.double().norm()), 1e-300))).to(layer.s.dtype)
            energy = float((sigma.double() ** 2).sum())
        else:
            new_u = _new_directions(u, layer.U.grad, r)
            new_v = _new_directions(v, layer.V.grad, r)
            r = min(new_u.shape[1], new_v.shape[1])
            energy = sum(float(((g.double() - b.double() @ (b.double().mT @ g.double())) ** 2).sum())
                         for b, g in ((u, layer.U.grad), (v, layer.V.grad))) if r else 0.0
        r = min(r, new_u.shape[1], new_v.shape[1])
        if r == 0:
            return None
        return energy, r, lambda k: (new_u[:, :k], new_v[:, :k], None if new_s is None else new_s[:k]), None

    def _source_candidate(self, name: str, layer, r: int, floor: float = 0.0) -> Optional[tuple]:
        """growth="source": the best ``r`` directions outside the bases toward the layer's
        pretrained weight (a residual layer: out of its residual), in the Fisher metric of the
        window's batches (:func:`~stiefel_sct.calibration.fisher_growth`); ``take(k)`` refits them
        for ``k``. ``floor``: a residual layer takes only as many as keep every refitted value
        ``>= floor`` (the next shrink's threshold)."""
        moments = self._sketches.get(name)
        if not isinstance(moments, LayerMoments):
            return None  # a layer the optimizer took on after the window began, or no window (a full budget)
        seen = moments.read()
        moments.release()  # freed once read: the window's sums shrink as the event's offers grow
        if seen is None or min(float(m.diagonal().sum()) for m in seen) <= 0.0:
            return None  # nothing seen in the window, or only zero inputs / gradients
        u, s, v = layer.U.detach(), layer.s.detach(), layer.V.detach()
        if getattr(layer, "residual_dtype", None) is not None:
            # the part to move is the residual's own: its Fisher-heaviest rank-r part outside the
            # bases (moving any part of R keeps W = V diag(s) U^T + R); fisher_growth reads R in
            # its own dtype, so its rounding floor is the residual's
            error = layer.residual
        else:
            weight = self._source_weight(name, layer)
            if weight is None:
                return None
            f64 = torch.float64
            error = weight.to(u.device, f64) - (v.to(f64) * s.to(f64)) @ u.to(f64).mT
        grown = fisher_growth(error, u, v, seen[0], seen[1], r, name=name)
        count = grown.gains.numel()
        while count and floor > 0.0 and float(grown.factors(count)[1].min()) < floor:
            count -= 1  # a value below the shrink's threshold would go back at the next event
        if count == 0:
            return None
        gains = grown.gains[:count]

        def take(k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            p, sigma, q = grown.factors(k)
            return q.to(u.dtype), p.to(v.dtype), sigma.to(s.dtype)

        return float((gains ** 2).sum()), count, take, gains

    def _source_weight(self, name: str, layer) -> Optional[torch.Tensor]:
        """The layer's pretrained weight from ``source`` (``None``: a callable's "no source")."""
        weight: Optional[torch.Tensor]
        if isinstance(self.source, Mapping):
            if name not in self.source:
                raise ValueError(f"growth='source': source has no weight for layer {name!r} (give every scheduled "
                                 "layer's dense weight, or a callable that returns None for those that should not grow)")
            weight = self.source[name]
        else:
            weight = cast(Callable[[str], Optional[torch.Tensor]], self.source)(name)
        shape = (layer.V.shape[0], layer.U.shape[0])
        if weight is not None and (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"growth='source': the source weight of layer {name!r} must be a tensor of shape {shape} "
                             f"(out_features, in_features), got {got}")
        return weight

    @staticmethod
    def _resize(layer, keep: List[int], new_u: Optional[torch.Tensor], new_v: Optional[torch.Tensor],
                new_s: Optional[torch.Tensor], replaced: Dict[int, tuple]) -> None:
        """Replace the layer's U, s, V by new parameters; record (old, new, kept, grown) per id. A
        residual layer's dropped directions go back into its residual, and the grown ones (taken
        from it) leave it: its function does not change."""
        idx = torch.tensor(keep, dtype=torch.long, device=layer.s.device)
        r = 0 if new_u is None else new_u.shape[1]
        if getattr(layer, "residual_dtype", None) is not None:
            kept = set(keep)
            dropped = [i for i in range(layer.s.shape[0]) if i not in kept]
            if dropped:
                out = torch.tensor(dropped, dtype=torch.long, device=layer.s.device)
                layer.move_residual(layer.V.detach().index_select(-1, out), -layer.s.detach().index_select(-1, out),
                                    layer.U.detach().index_select(-1, out))
            if r:
                layer.move_residual(new_v, new_s, new_u)
        new_params = {}
        for name, extra in (("U", new_u), ("s", new_s), ("V", new_v)):
            old = getattr(layer, name)
            value = old.detach().index_select(-1, idx)
            if r:
                fill = value.new_zeros(r) if extra is None else extra.to(value.dtype)  # s: zeros unless given
                value = torch.cat([value, fill], dim=-1)
            if isinstance(old, geoopt.ManifoldParameter):
                new = geoopt.ManifoldParameter(value.contiguous(), manifold=old.manifold, requires_grad=old.requires_grad)
            else:
                new = torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
            replaced[id(old)] = (old, new, keep, r)
            new_params[name] = new
        for name, new in new_params.items():
            # nn.Module.__setattr__ registers the parameter; SpectralModule then re-registers the triple
            setattr(layer, name, new)
        layer.rank = len(keep) + r

    def _update_optimizer(self, replaced: Dict[int, tuple]) -> None:
        opt = self.optimizer
        for group in opt.param_groups:
            riemannian = group.get("mode") == "riemannian"
            for i, p in enumerate(group["params"]):
                if id(p) not in replaced:
                    continue
                old, new, keep, r = replaced[id(p)]
                state = opt.state.pop(old, None)
                if state:
                    opt.state[new] = _resize_state(state, old, keep, r, riemannian, type(opt).__name__)
                group["params"][i] = new
        refresh = getattr(opt, "parameters_replaced", None)
        if callable(refresh):
            refresh()

    # ------------------------------------------------------------------------------ state dicts
    def state_dict(self) -> Dict:
        """The scheduler's counters, settings and history (the ranks live in the model)."""
        return {"last_step": self.last_step, "history": [dict(h) for h in self.history],
                "born": {k: list(v) for k, v in self.born.items()}, "lr_sums": list(self.lr_sums),
                "lr_at": {k: list(v) for k, v in self.lr_at.items()}, "start_size": self.start_size,
                **{key: getattr(self, key) for key in _SETTINGS},
                # inside a sketch window: the sums so far (tensors; save it with torch.save)
                "sketches": {name: sketch.state_dict() for name, sketch in self._sketches.items()}}

    def load_state_dict(self, state_dict: Dict) -> None:
        """Restore :meth:`state_dict` (load the model at its saved ranks and the optimizer first).
        The settings are checked as the constructor checks them; on an error nothing changes."""
        settings: List[Any] = [state_dict[k] if k in state_dict else _DEFAULTS[k] for k in _SETTINGS]
        growth = settings[_SETTINGS.index("growth")]
        # checks the settings (hooks nothing yet); the source is the caller's weights, never saved:
        # this scheduler's serves the restored one
        staged = RankScheduler(self.optimizer, **dict(zip(_SETTINGS, settings)),
                               source=self.source if growth == "source" else None)
        staged._disarm()
        staged.last_step = int(state_dict["last_step"])
        staged.history = [dict(h) for h in state_dict["history"]]
        staged.born = {k: list(v) for k, v in (state_dict.get("born") or {}).items()}
        staged.lr_sums = list(state_dict.get("lr_sums") or [0.0] * len(self.optimizer.param_groups))
        staged.lr_at = {int(k): list(v) for k, v in (state_dict.get("lr_at") or {}).items()}
        staged.start_size = int(state_dict.get("start_size", staged.start_size))
        try:
            staged._arm()  # inside a sketch window: hook the layers, then restore the sums so far
            for name, state in (state_dict.get("sketches") or {}).items():
                if name in staged._sketches:
                    staged._sketches[name].load_state_dict(state)
        except BaseException:
            staged._disarm()
            raise
        self._disarm()
        for key in (*_SETTINGS, "source", "last_step", "history", "born", "lr_sums", "lr_at", "start_size", "_sketches"):
            setattr(self, key, getattr(staged, key))


_SETTINGS = ("every", "tol", "grow", "min_rank", "max_rank", "budget", "grace", "newborn_rate",
             "growth", "sketch_steps", "budget_by")  # constructor order
# settings a state dict saved before they existed may lack
_DEFAULTS = {"grace": 0, "newborn_rate": None, "growth": "factors", "sketch_steps": 1, "budget_by": None}


def _resize_state(state: Dict, old: torch.Tensor, keep: List[int], r: int, riemannian: bool, owner: str) -> Dict:
    """The optimizer state of ``old`` for its resized successor: per-column entries selected and
    zero-extended along the rank (last) dimension; scalars (step counts) kept."""
    idx = torch.tensor(keep, dtype=torch.long, device=old.device)
    moments = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}
    out = {}
    for key, value in state.items():
        if key.endswith("_scale"):
            continue  # rebuilt with its codes below
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
            continue
        quantized = value.dtype == torch.uint8 and key + "_scale" in state
        if value.shape != old.shape or not (value.is_floating_point() or quantized):
            raise NotImplementedError(
                f"RankScheduler cannot resize {owner}'s state entry {key!r} (shape {tuple(value.shape)}, "
                f"dtype {value.dtype}) of a parameter of shape {tuple(old.shape)}: only entries shaped like "
                "their parameter (Adam-type moments, momentum buffers, 8-bit SpectralAdam moments) are supported")
        signed = moments.get(key, True)
        full = dequantize(value, state[key + "_scale"], signed) if quantized else value
        kept = full.index_select(-1, idx)
        if r:
            fill = kept.new_zeros(*kept.shape[:-1], r)
            if riemannian and key in ("exp_avg_sq", "max_exp_avg_sq") and old.dim() == 2 and full.numel():
                fill += full.reshape(-1)[0]  # one number per matrix, broadcast over it (geoopt's <g, g>)
            kept = torch.cat([kept, fill], dim=-1)
        kept = kept.contiguous()
        if quantized:
            out[key], out[key + "_scale"] = quantized_zeros(kept)
            quantize_(kept, out[key], out[key + "_scale"], signed)
        else:
            out[key] = kept
    return out
