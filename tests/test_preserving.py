"""The function-preserving retraction: U, V back on the manifold, the layer's weight unchanged."""

import copy

import geoopt
import pytest
import torch
from torch import nn

from stiefel_sct import (
    SpectralAdam,
    SpectralEmbedding,
    SpectralLinear,
    Stiefel,
    orthonormality_error,
    preserving_retraction,
    retract,
    retract_all,
)


def _off_manifold(shape_u, shape_v, batch=(), scale=1e-2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = shape_u[-1]
    u = retract(torch.randn(*batch, *shape_u, generator=gen, dtype=dtype))
    v = retract(torch.randn(*batch, *shape_v, generator=gen, dtype=dtype))
    s = torch.randn(*batch, k, generator=gen, dtype=dtype)
    u = u + scale * torch.randn(u.shape, generator=gen, dtype=dtype)
    v = v + scale * torch.randn(v.shape, generator=gen, dtype=dtype)
    return u, s, v


def _weight(u, s, v):
    return (u * s.unsqueeze(-2)) @ v.mT


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_keeps_the_weight_and_restores_orthonormality(dtype, tol):
    u, s, v = _off_manifold((50, 8), (30, 8), batch=(3,), scale=5e-2, dtype=dtype)
    u2, s2, v2 = preserving_retraction(u, s, v)
    w, w2 = _weight(u, s, v), _weight(u2, s2, v2)
    assert (w2 - w).abs().max() <= tol * w.abs().max()
    assert orthonormality_error(u2) <= tol and orthonormality_error(v2) <= tol
    assert orthonormality_error(u) > 1e-2  # the input was really off the manifold


def test_near_the_manifold_it_is_a_small_change_keeping_order_and_signs():
    u, s, v = _off_manifold((60, 6), (40, 6), scale=1e-4)
    s = torch.tensor([3.0, -2.0, 1.5, -0.7, 0.4, 0.1], dtype=torch.float64)
    u2, s2, v2 = preserving_retraction(u, s, v)
    assert (s2 - s).abs().max() < 1e-2  # no sorting, no sign flips: the raw SVD would give |s| sorted
    assert (u2 - u).abs().max() < 1e-2 and (v2 - v).abs().max() < 1e-2


def test_on_the_manifold_with_a_diagonal_spectrum_it_is_the_identity():
    u = retract(torch.randn(20, 4, dtype=torch.float64))
    v = retract(torch.randn(10, 4, dtype=torch.float64))
    s = torch.tensor([4.0, 3.0, -2.0, 1.0], dtype=torch.float64)
    u2, s2, v2 = preserving_retraction(u, s, v)
    assert torch.allclose(u2, u, atol=1e-12) and torch.allclose(v2, v, atol=1e-12) and torch.allclose(s2, s, atol=1e-12)


def test_rank_deficient_spectrum_and_shape_errors():
    u, s, v = _off_manifold((12, 4), (9, 4))
    s = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    u2, s2, v2 = preserving_retraction(u, s, v)
    assert torch.isfinite(u2).all() and orthonormality_error(u2) < 1e-12 and orthonormality_error(v2) < 1e-12
    assert (_weight(u2, s2, v2) - _weight(u, s, v)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="must agree"):
        preserving_retraction(u, s[:3], v)
    with pytest.raises(ValueError, match="tall"):
        preserving_retraction(u.mT, s, v)


def _perturb(model, scale=1e-2):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_retract_all_preserves_every_layer_and_retracts_loose_factors():
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(
        a=SpectralLinear(20, 30, 5, dtype=torch.float64), b=SpectralLinear(20, 30, 5, dtype=torch.float64),
        c=SpectralLinear(30, 7, 3, dtype=torch.float64), e=SpectralEmbedding(50, 20, 4, dtype=torch.float64),
    ))
    m = Stiefel()
    model.loose = geoopt.ManifoldParameter(m.random(15, 3, dtype=torch.float64), manifold=m)
    _perturb(model)
    before = {n: m.dense_weight().clone() for n, m in model.items() if hasattr(m, "dense_weight")}
    assert retract_all(model, preserve_function=True) == 9
    for name, w in before.items():
        layer = model[name]
        assert (layer.dense_weight() - w).abs().max() < 1e-12
        assert orthonormality_error(layer.U) < 1e-12 and orthonormality_error(layer.V) < 1e-12
    assert orthonormality_error(model.loose) < 1e-12
    with pytest.raises(TypeError, match="nn.Module"):
        retract_all(list(model.parameters()), preserve_function=True)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(SpectralLinear(12, 16, 4), nn.Tanh(), SpectralLinear(16, 5, 3))


def test_spectral_adam_step_keeps_the_weight_the_adam_update_produced():
    model = _net()
    x = torch.randn(32, 12)
    opt = SpectralAdam(model.parameters(), lr=1e-2, preserve_function=True)
    plain = copy.deepcopy(model)  # the same Adam update with no retraction at all
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for _ in range(5):
        for m, o in ((model, opt), (plain, plain_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        opt.step()
        plain_opt.step()
        for a, b in zip(model[::2], plain[::2]):
            # one step from the same point: equal weights, equal to fp32 rounding
            assert (a.dense_weight() - b.dense_weight()).abs().max() <= 1e-5
            assert orthonormality_error(a.U) <= 1e-5 and orthonormality_error(a.V) <= 1e-5
        plain.load_state_dict(model.state_dict())  # restart the reference from our point


def test_preserving_option_trains_in_groups_and_in_backward():
    x = torch.randn(64, 12)
    results = []
    for kwargs in (dict(), dict(step_in_backward=True)):
        model = _net()
        # a layer's s in another group than its factors: the retraction runs after every group
        factors = [p for n, p in model.named_parameters() if n.endswith(("U", "V"))]
        rest = [p for n, p in model.named_parameters() if not n.endswith(("U", "V"))]
        opt = SpectralAdam([{"params": factors}, {"params": rest, "lr": 5e-3}], lr=1e-2, preserve_function=True, **kwargs)
        for _ in range(30):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert loss.item() < 0.5 * _net()(x).pow(2).mean().item()
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_preserving_option_errors():
    m = Stiefel()
    loose = geoopt.ManifoldParameter(m.random(10, 3), manifold=m)
    with pytest.raises(ValueError, match="not the U or V of a spectral layer"):
        SpectralAdam([loose], preserve_function=True)
    layer = SpectralLinear(8, 6, 2)
    with pytest.raises(ValueError, match="not the U or V"):  # s not given: the weight cannot be kept
        SpectralAdam([layer.U, layer.V], preserve_function=True)
    with pytest.raises(ValueError, match="mode='sct'"):
        SpectralAdam(layer.parameters(), mode="riemannian", preserve_function=True)
    with pytest.raises(TypeError, match="preserve_function must be a bool"):
        SpectralAdam(layer.parameters(), preserve_function=1)


def test_copies_own_their_factors():
    layer = SpectralLinear(8, 6, 2)
    clone = copy.deepcopy(layer)
    opt = SpectralAdam(clone.parameters(), preserve_function=True)  # would raise if clone's factors had no owner
    clone(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert orthonormality_error(clone.U) < 1e-5
