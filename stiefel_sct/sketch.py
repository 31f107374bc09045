"""A spectral linear layer's weight gradient outside its bases, sketched from its activations.

A :class:`~stiefel_sct.SpectralLinear` never forms ``G = dL/dW`` (``n x m``): its factor gradients
hold only ``G U`` and ``G^T V``, each scaled by ``s``, i.e. the gradient's blocks that touch the
current bases. A new direction pair ``(p, q)`` outside the bases needs the remaining block,
``N = (I - V V^T) G (I - U U^T)``: its top singular pairs are the directions along which a step
``W - eta p q^T`` lowers the loss the most, and their singular value ``p^T G q`` is what the new
``s`` would see as its gradient. This is the block ``V_new^T G U_new`` of DLRT's and GeoLoRA's
augmented core.

``G = dY^T X`` (``X``, ``dY``: the layer's inputs and output gradients, one row per token), so
``G w = dY^T (X w)`` costs two thin GEMMs over the activations autograd already holds. A
:class:`GradientSketch` registers a forward hook on the layer and a gradient hook on its output
and accumulates, over every backward until it is read (gradient accumulation sums, as ``.grad``
does),

- the range sketch ``Y = G Omega`` (``n x p``), ``Omega`` Gaussian and orthogonal to ``U``, and
- the co-range sketch ``Z = G^T Psi`` (``m x l``), ``Psi`` Gaussian and orthogonal to ``V``,

both linear in ``G``. :meth:`GradientSketch.directions` rebuilds ``N``'s leading singular triplets
from them with the single-pass reconstruction of Tropp, Yurtsever, Udell and Cevher (SIAM J. Matrix
Anal. Appl. 2017, ``l = 2 p + 1``): ``N ~ Qy (Psi^T Qy)^+ (Psi^T N)``, ``Qy`` an orthonormal basis
of ``Y``. One pass, because the activations are gone after the backward; ``p = r + 8`` probes.
Under ``torch.distributed`` the sketches are summed over the processes before they are read, and
``Omega``, ``Psi`` come from a seed every process shares, so every process grows the same
directions.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
import torch.distributed as torch_dist

from .checks import check_int
from .manifold import compute_dtype

if TYPE_CHECKING:
    from .layers import SpectralLinear

__all__ = ["GradientSketch", "LayerMoments"]


def _distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def _all_reduce(*tensors: torch.Tensor) -> List[torch.Tensor]:
    """The tensors summed over the processes (under ``torch.distributed``; one all-reduce, in the
    dtype they promote to), else themselves."""
    if not _distributed():
        return list(tensors)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    torch_dist.all_reduce(flat)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view_as(t).to(t.dtype))
        at += t.numel()
    return out


def outside_basis(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with its part in ``basis``'s span removed, twice (orthogonal to rounding); also the
    residual growth's projection (:mod:`stiefel_sct.rank_scheduler`)."""
    for _ in range(2):
        x = x - basis @ (basis.mT @ x)
    return x


def _range(basis: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """An orthonormal basis of the numerical range of ``x``'s part outside ``basis``. Not a QR: a
    sketch of a gradient of low rank has columns that are rounding, and QR would turn them into
    arbitrary directions, some inside ``basis`` (the reconstruction assumes they are outside).
    ``eps``: the unit rounding ``x`` was accumulated in."""
    left, sv, _ = torch.linalg.svd(outside_basis(basis, x), full_matrices=False)
    keep = int((sv > sv[0] * eps ** 0.5).sum()) if sv.numel() and sv[0] > 0 else 0
    return outside_basis(basis, left[:, :keep])


class _BackwardHooks:
    """A forward hook on a layer that hands each forward autograd will differentiate (its input
    and output) to :meth:`_on_forward`, which registers the output's gradient hook; the hook stays
    until :meth:`remove`. Forwards without autograd (``torch.no_grad``, inference) are not seen."""

    _handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def _attach(self, layer: SpectralLinear) -> None:
        self._handle = layer.register_forward_hook(self._forward)

    def _forward(self, module, inputs, output) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            self._on_forward(inputs[0], output)

    def _on_forward(self, x: torch.Tensor, output: torch.Tensor) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class GradientSketch(_BackwardHooks):
    """Accumulate a two-sided sketch of a :class:`~stiefel_sct.SpectralLinear`'s weight gradient
    outside its current bases, from hooks on the layer; read its leading singular triplets.

    Args:
        layer: the spectral linear layer (not in residual mode: a residual layer grows from its
            residual). Its ``U``, ``V`` at construction define "outside"; read the triplets with
            the bases the layer has then (they are projected out again).
        r: the most triplets :meth:`directions` will be asked for (``>= 1``).
        seed: seeds ``Omega`` and ``Psi`` (the same in every process).

    The hooks stay until :meth:`remove`; forwards without autograd (``torch.no_grad``, inference)
    are not seen.
    """

    def __init__(self, layer: SpectralLinear, r: int, seed: int) -> None:
        r = int(check_int(r, "r", 1))  # type: ignore[arg-type]
        u, v = layer.U.detach(), layer.V.detach()
        m, n = u.shape[0], v.shape[0]
        self.work = compute_dtype(u.dtype)
        room = min(m - u.shape[1], n - v.shape[1])  # 0: a full-rank layer has nowhere to grow
        self.probes = max(0, min(r + 8, room))
        gen = torch.Generator().manual_seed(seed)
        uw, vw = u.to(self.work), v.to(self.work)
        self.omega = outside_basis(uw, torch.randn(m, self.probes, generator=gen, dtype=self.work).to(u.device))
        self.psi = outside_basis(vw, torch.randn(n, min(2 * self.probes + 1, n), generator=gen, dtype=self.work).to(u.device))
        self.y = torch.zeros(n, self.probes, dtype=self.work, device=u.device)
        self.z = torch.zeros(m, self.psi.shape[1], dtype=self.work, device=u.device)
        self.backwards = 0  # how many backward passes the sketch has seen
        # sum over backwards of ||dY||_F ||X||_F >= ||G||_F: the scale of the sketches' rounding, kept
        # on the layer's device (float64, as a Python float would be) so a backward never waits on the host
        self.mass = torch.zeros((), dtype=torch.float64, device=u.device)
        if self.probes:
            self._attach(layer)

    def _on_forward(self, x: torch.Tensor, output: torch.Tensor) -> None:
        # X Omega now (a thin tensor); X itself is the tensor autograd saved for the layer's own
        # backward, so holding it until then costs no memory
        x_omega = x.reshape(-1, self.omega.shape[0]).to(self.work) @ self.omega
        output.register_hook(lambda g: self._backward(x, x_omega, g))

    @torch.no_grad()
    def _backward(self, x: torch.Tensor, x_omega: torch.Tensor, g: torch.Tensor) -> None:
        g2 = g.reshape(-1, self.y.shape[0]).to(self.work)
        self.y += g2.mT @ x_omega                                              # G Omega
        self.z += x.reshape(-1, self.z.shape[0]).to(self.work).mT @ (g2 @ self.psi)  # G^T Psi
        self.backwards += 1
        self.mass += torch.linalg.vector_norm(g2).double() * torch.linalg.vector_norm(x).double()

    def state_dict(self) -> dict:
        """The probes and the sums so far (a scheduler saved inside a sketch window resumes bitwise)."""
        return {"omega": self.omega.clone(), "psi": self.psi.clone(), "y": self.y.clone(), "z": self.z.clone(),
                "backwards": self.backwards, "mass": float(self.mass)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of a sketch of the same layer shape; ``ValueError`` otherwise."""
        for key in ("omega", "psi", "y", "z"):
            if tuple(state[key].shape) != tuple(getattr(self, key).shape):
                raise ValueError(f"sketch state {key!r} has shape {tuple(state[key].shape)}, this sketch "
                                 f"{tuple(getattr(self, key).shape)}: saved for another layer or rank")
        for key in ("omega", "psi", "y", "z"):
            getattr(self, key).copy_(state[key])
        self.backwards = int(state["backwards"])
        self.mass.fill_(float(state["mass"]))

    @torch.no_grad()
    def directions(self, u: torch.Tensor, v: torch.Tensor, r: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, sigma, Q)``: up to ``r`` leading singular triplets of the sketched
        ``N = (I - V V^T) G (I - U U^T)``, ``P`` (``n x r'``) orthonormal and orthogonal to ``v``,
        ``Q`` (``m x r'``) orthonormal and orthogonal to ``u``, ``P^T G Q ~ diag(sigma)``,
        ``sigma`` descending. Triplets at rounding level of the sketch are not returned; nothing
        is returned when no backward was seen."""
        empty = (v.new_zeros(v.shape[0], 0), v.new_zeros(0), u.new_zeros(u.shape[0], 0))
        y, z, seen, mass = self.y, self.z, float(self.backwards), float(self.mass)
        if _distributed():
            y, z, tail = _all_reduce(y, z, y.new_tensor([seen, mass]))
            seen, mass = float(tail[0]), float(tail[1])
        if r <= 0 or seen == 0 or not self.probes:
            return empty
        # the small factorisations in float64: float32 LAPACK on identical inputs gave different
        # bits for a model and its resumed twin (its kernels follow memory alignment): no bitwise resume
        f64 = torch.float64
        uw, vw, y, z, psi = u.to(f64), v.to(f64), y.to(f64), z.to(f64), self.psi.to(f64)
        eps = torch.finfo(self.work).eps
        qy, qz = _range(vw, y, eps), _range(uw, z, eps)
        if not (qy.shape[1] and qz.shape[1]):
            return empty
        # N ~ qy C qz^T with (Psi^T qy) C = Psi^T N qz = Z^T qz: a small least-squares problem
        core = torch.linalg.lstsq(psi.mT @ qy, z.mT @ qz).solution
        a, sigma, bt = torch.linalg.svd(core)
        if not bool(torch.isfinite(sigma).all()):
            return empty
        # what a sketch of a gradient with nothing outside the bases holds is rounding, ~eps of
        # the products summed into it (mass bounds ||G||_F); a real direction stands far above it
        floor = max(float(sigma[0]) * 1e-6, mass * eps * 64)
        take = int((sigma > floor).sum().clamp(max=r))
        if take == 0:
            return empty
        p = outside_basis(vw, qy @ a[:, :take])
        q = outside_basis(uw, qz @ bt[:take].mT)
        return p.to(v.dtype), sigma[:take].to(v.dtype), q.to(u.dtype)


class LayerMoments(_BackwardHooks):
    """The second moments of a :class:`~stiefel_sct.SpectralLinear`'s inputs, ``C = X^T X / N``
    (``m x m``), and of the loss gradients at its output, ``G = dY^T dY / N`` (``n x n``), summed
    from hooks over every backward until they are read: the Fisher metric of the training batches
    (K-FAC's factors, :mod:`stiefel_sct.calibration`) that ``RankScheduler(growth="source")``
    grows in. Each batch's Gram matrices are formed and summed in the layer's compute dtype
    (float32 for float32 and half-precision layers), so a window holds ``m^2 + n^2`` numbers per
    layer; forwards without autograd are not seen, as for :class:`GradientSketch`. Under
    ``torch.distributed`` the sums are summed over the processes when read."""

    def __init__(self, layer: SpectralLinear) -> None:
        m, n = layer.U.shape[0], layer.V.shape[0]
        self.work = compute_dtype(layer.U.dtype)
        device = layer.U.device
        self.inputs = torch.zeros(m, m, dtype=self.work, device=device)
        self.grads = torch.zeros(n, n, dtype=self.work, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)  # rows seen, on the device (no sync)
        self.backwards = 0
        self._attach(layer)

    def _on_forward(self, x: torch.Tensor, output: torch.Tensor) -> None:
        output.register_hook(lambda g: self._backward(x, g))

    @torch.no_grad()
    def _backward(self, x: torch.Tensor, g: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, self.inputs.shape[0]).to(self.work)
        g2 = g.reshape(-1, self.grads.shape[0]).to(self.work)
        self.inputs += x2.mT @ x2
        self.grads += g2.mT @ g2
        self.tokens += x2.shape[0]
        self.backwards += 1

    def read(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(C, G)`` (float64), the means over every row seen (all processes); ``None`` when no
        backward was seen."""
        inputs, grads, tokens = _all_reduce(self.inputs, self.grads, self.tokens)
        count = float(tokens)
        if count == 0:
            return None
        return inputs.to(torch.float64) / count, grads.to(torch.float64) / count

    def release(self) -> None:
        """Remove the hook and free the sums (read them first): an event reads each layer's moments
        once, and freeing them as it goes lets the window's sums shrink while its offers grow."""
        self.remove()
        self.inputs = self.inputs.new_zeros(0, 0)
        self.grads = self.grads.new_zeros(0, 0)

    def state_dict(self) -> dict:
        """The sums so far (a scheduler saved inside a window resumes bitwise)."""
        return {"inputs": self.inputs.clone(), "grads": self.grads.clone(), "tokens": float(self.tokens),
                "backwards": self.backwards}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of the same layer shape; ``ValueError`` otherwise."""
        for key in ("inputs", "grads"):
            if tuple(state[key].shape) != tuple(getattr(self, key).shape):
                raise ValueError(f"moment state {key!r} has shape {tuple(state[key].shape)}, this layer's "
                                 f"{tuple(getattr(self, key).shape)}: saved for another layer")
        self.inputs.copy_(state["inputs"])
        self.grads.copy_(state["grads"])
        self.tokens.fill_(float(state["tokens"]))
        self.backwards = int(state["backwards"])
