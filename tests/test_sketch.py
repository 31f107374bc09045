"""GradientSketch: the two-sided sketch of a spectral linear layer's weight gradient, gathered by
hooks, against the gradient of the dense weight computed by autograd."""

import pytest
import torch
from torch import nn

from stiefel_sct import SpectralLinear
from stiefel_sct.sketch import GradientSketch


def _layer(m=24, n=18, k=4, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return SpectralLinear(m, n, k, dtype=dtype)


def _target(layer, g_rank, seed=1, dtype=torch.float64):
    """Inputs and a loss whose weight gradient outside the layer's bases has rank ``g_rank``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, layer.in_features, generator=gen, dtype=dtype)
    shift = torch.randn(layer.out_features, g_rank, generator=gen, dtype=dtype) @ \
        torch.randn(g_rank, layer.in_features, generator=gen, dtype=dtype)
    return x, lambda out: ((out - x @ shift.mT) ** 2).sum() / 2


def _dense_gradient(layer, x, loss):
    w = layer.dense_weight().detach().clone().requires_grad_(True)
    bias = layer.bias.detach() if layer.bias is not None else None
    loss(nn.functional.linear(x, w, bias)).backward()
    return w.grad


def _outside(layer, g):
    u, v = layer.U.detach(), layer.V.detach()
    return (g - v @ (v.mT @ g)) - ((g - v @ (v.mT @ g)) @ u) @ u.mT


@pytest.mark.parametrize("g_rank", [1, 3, 6])
def test_a_low_rank_gradient_is_recovered_exactly(g_rank):
    """While N = (I - V V^T) G (I - U U^T) has rank <= the probes, the single-pass reconstruction is
    exact: its singular values, and P^T N Q = diag(sigma), to fp64 rounding."""
    layer = _layer()
    x, loss = _target(layer, g_rank)
    sketch = GradientSketch(layer, 4, seed=3)
    loss(layer(x)).backward()
    n_true = _outside(layer, _dense_gradient(layer, x, loss))
    sv = torch.linalg.svdvals(n_true)
    p, sigma, q = sketch.directions(layer.U.detach(), layer.V.detach(), 4)
    assert sigma.numel() == min(4, int((sv > 1e-8 * sv[0]).sum()))
    torch.testing.assert_close(sigma, sv[:sigma.numel()], rtol=1e-9, atol=0)
    torch.testing.assert_close(p.mT @ n_true @ q, torch.diag(sigma), rtol=0, atol=1e-9 * float(sv[0]))
    for basis, new in ((layer.V.detach(), p), (layer.U.detach(), q)):
        assert float((basis.mT @ new).abs().max()) < 1e-12
        torch.testing.assert_close(new.mT @ new, torch.eye(new.shape[1], dtype=new.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_a_full_rank_gradient_gives_orthonormal_directions_near_the_top(seed):
    """Property: for any gradient the directions are orthonormal and outside the bases, and the
    sketch's top singular value is within the true spectrum's range (a sketch never overshoots
    the top by more than rounding, and finds most of it)."""
    torch.manual_seed(seed)
    m, n, k = (int(v) for v in torch.randint(8, 30, (3,)))
    k = min(k, m - 2, n - 2)
    layer = SpectralLinear(m, n, k, dtype=torch.float64)
    x = torch.randn(50, m, dtype=torch.float64)
    target = torch.randn(50, n, dtype=torch.float64)
    loss = lambda out: ((out - target) ** 2).sum()
    sketch = GradientSketch(layer, 3, seed=seed)
    loss(layer(x)).backward()
    sv = torch.linalg.svdvals(_outside(layer, _dense_gradient(layer, x, loss)))
    p, sigma, q = sketch.directions(layer.U.detach(), layer.V.detach(), 3)
    assert 1 <= sigma.numel() <= 3 and bool((sigma[:-1] >= sigma[1:]).all())
    assert 0.5 * float(sv[0]) <= float(sigma[0]) <= float(sv[0]) * (1 + 1e-9)
    assert float((layer.V.detach().mT @ p).abs().max()) < 1e-12 and float((layer.U.detach().mT @ q).abs().max()) < 1e-12


def test_micro_batches_sum_like_grad_and_hooks_come_off():
    """The sketch is linear in G: two backwards over halves equal one over the whole batch, as
    .grad accumulates. Forwards without autograd are not seen; remove() takes the hook off."""
    layer = _layer()
    x, _ = _target(layer, 2)
    target = torch.randn(40, layer.out_features, dtype=x.dtype)
    whole = GradientSketch(layer, 2, seed=5)
    ((layer(x) - target) ** 2).sum().backward()
    whole.remove()
    halves = GradientSketch(layer, 2, seed=5)
    for xs, ts in zip(x.chunk(2), target.chunk(2)):
        ((layer(xs) - ts) ** 2).sum().backward()
    assert (whole.backwards, halves.backwards) == (1, 2)
    torch.testing.assert_close(halves.y, whole.y, rtol=1e-12, atol=1e-12 * float(whole.y.abs().max()))
    torch.testing.assert_close(halves.z, whole.z, rtol=1e-12, atol=1e-12 * float(whole.z.abs().max()))
    with torch.no_grad():
        layer(x)
    halves.remove()
    assert not layer._forward_hooks
    layer(x).sum().backward()
    assert halves.backwards == 2


def test_no_backward_or_no_room_gives_nothing():
    layer = _layer()
    sketch = GradientSketch(layer, 3, seed=0)
    p, sigma, q = sketch.directions(layer.U.detach(), layer.V.detach(), 3)
    assert sigma.numel() == 0 and p.shape == (18, 0) and q.shape == (24, 0)
    full = SpectralLinear(6, 8, 6, dtype=torch.float64)  # rank min(m, n): nowhere to grow
    sketch = GradientSketch(full, 2, seed=0)
    assert not full._forward_hooks
    full(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    assert sketch.directions(full.U.detach(), full.V.detach(), 2)[1].numel() == 0
    with pytest.raises(ValueError, match="r must be"):
        GradientSketch(layer, 0, seed=0)
