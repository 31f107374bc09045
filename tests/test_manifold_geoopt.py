"""Our Stiefel held to what geoopt's users rely on (the properties geoopt's own Stiefel tests check,
written here from the definitions): construction, projection onto the manifold and onto the tangent
space, retraction and transport, random points, ``ProductManifold``, ``proj_``, geoopt's optimizers,
and SpectralAdam's Riemannian mode against geoopt's ``RiemannianAdam`` for both metrics."""

import geoopt
import pytest
import torch

from stiefel_sct import SpectralAdam, Stiefel, orthonormality_error

METHODS = ["qr", "cholqr2"]


def _point(n=9, k=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=dtype, generator=gen))
    return q


@pytest.mark.parametrize("method", METHODS)
def test_keyword_and_positional_construction_and_a_true_name(method):
    for m in (Stiefel(retraction=method), Stiefel(method)):
        assert isinstance(m, Stiefel) and isinstance(m, geoopt.EuclideanStiefel)
        assert m.retraction == method and m.name == f"Stiefel(euclidean, {method})"
        assert repr(m) == f"Stiefel(euclidean, {method}) manifold"
    assert Stiefel(retraction=method, canonical=False).retraction == method
    with pytest.raises(ValueError, match="canonical"):
        Stiefel(retraction=method, canonical=True)
    with pytest.raises(ValueError, match="retraction must be one of"):
        Stiefel(retraction="svd")



def test_the_old_name_method_still_works_with_a_deprecation_warning():
    """Issue 28: the retraction backend is ``retraction=`` everywhere; ``method=`` (the manifold
    functions' old name) keeps working, warns, and is refused beside the new name."""
    import torch

    from stiefel_sct import retract, retract_, retract_all, stiefel_retraction
    from stiefel_sct.manifold import retract_into, stiefel_manifold

    x = torch.randn(6, 3)
    with pytest.warns(DeprecationWarning, match=r"Stiefel.__init__\(method=...\) is deprecated: use retraction="):
        m = Stiefel(method="cholqr2")
    assert m.retraction == "cholqr2"
    with pytest.warns(DeprecationWarning, match="Stiefel.method is deprecated"):
        assert m.method == "cholqr2"
    with pytest.warns(DeprecationWarning, match="use retraction="):
        assert torch.equal(retract(x, method="cholqr2"), retract(x, retraction="cholqr2"))
    with pytest.warns(DeprecationWarning, match="use retraction="):
        out = retract_into(x[None], torch.empty(1, 6, 3), method="qr")
    assert torch.equal(out[0], retract(x, "qr"))
    y = x.clone()
    with pytest.warns(DeprecationWarning, match="use retraction="):
        retract_([y], method="qr")
    assert torch.equal(y, retract(x, "qr"))
    with pytest.warns(DeprecationWarning, match="use retraction="):
        assert stiefel_manifold(method="cholqr2") is stiefel_manifold("cholqr2")
    p = geoopt.ManifoldParameter(retract(x), manifold=Stiefel())
    with pytest.warns(DeprecationWarning, match="use retraction="):
        assert retract_all([p], method="qr") == 1
    with pytest.warns(DeprecationWarning, match="use retraction="):
        handle = stiefel_retraction(torch.optim.SGD([p], lr=0.1), method="qr")
    assert handle.retraction == "qr"
    with pytest.raises(TypeError, match="got both retraction= and its old name method="):
        retract(x, retraction="qr", method="qr")


@pytest.mark.parametrize("method", METHODS)
def test_projx_is_the_closest_point(method):
    """``projx`` is the polar factor: on the manifold, a fixed point on the manifold, and nearer to
    ``x`` than the QR factor or random points (Frobenius)."""
    m = Stiefel(retraction=method)
    x = torch.randn(3, 12, 5, dtype=torch.float64)
    p = m.projx(x)
    assert p.is_contiguous() and p.shape == x.shape
    m.assert_check_point_on_manifold(p)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(p, u @ vh, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.projx(p), p, rtol=0, atol=1e-12)
    dist = (p - x).flatten(1).norm(dim=1)
    qr = torch.linalg.qr(x)[0]
    assert bool((dist <= (qr - x).flatten(1).norm(dim=1) + 1e-12).all())
    for _ in range(5):
        other = m.random(3, 12, 5, dtype=torch.float64)
        assert bool((dist <= (other - x).flatten(1).norm(dim=1)).all())


@pytest.mark.parametrize("method", METHODS)
def test_proju_gives_tangent_vectors_and_is_a_projection(method):
    m = Stiefel(retraction=method)
    x = _point()
    u = torch.randn_like(x)
    t = m.proju(x, u)
    m.assert_check_vector_on_tangent(x, t)
    torch.testing.assert_close(m.proju(x, t), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.egrad2rgrad(x, u), t)
    # orthogonal projection: the removed part is orthogonal to every tangent vector
    other = m.proju(x, torch.randn_like(x))
    assert abs(float(((u - t) * other).sum())) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_retraction_and_transport(method):
    m = Stiefel(retraction=method)
    x = _point()
    u = m.proju(x, torch.randn_like(x)) * 0.3
    y = m.retr(x, u)
    assert y.is_contiguous()
    m.assert_check_point_on_manifold(y)
    torch.testing.assert_close(m.retr(x, torch.zeros_like(x)), x, rtol=0, atol=1e-12)
    # first order: retr(x, t u) = x + t u + O(t^2)
    for t in (1e-3, 1e-4):
        assert float((m.retr(x, t * u) - x - t * u).norm()) < 10 * t * t * float(u.norm()) ** 2
    y2, v = m.retr_transp(x, u, u)
    torch.testing.assert_close(y2, y)
    m.assert_check_vector_on_tangent(y, v)
    torch.testing.assert_close(m.transp(x, y, u), v)


@pytest.mark.parametrize("method", METHODS)
def test_random_points(method):
    m = Stiefel(retraction=method)
    for size in ((10, 3), ((2, 10, 3),)):
        p = m.random(*size, dtype=torch.float64)
        assert isinstance(p, geoopt.ManifoldTensor) and p.manifold is m and p.is_contiguous()
        m.assert_check_point_on_manifold(p)
    assert m.random(7, 2).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError):
        m.random(3, 5)  # wide


@pytest.mark.parametrize("method", METHODS)
def test_product_manifold_of_our_stiefel(method):
    m = Stiefel(retraction=method)
    product = geoopt.ProductManifold((m, (8, 3)), (geoopt.Euclidean(), 5), (m, (6, 2)))
    x = product.random(4, 24 + 5 + 12, dtype=torch.float64)
    product.assert_check_point_on_manifold(x)
    projected = product.projx(torch.randn(4, 41, dtype=torch.float64))
    product.assert_check_point_on_manifold(projected)
    u = product.proju(x, torch.randn_like(x))
    product.assert_check_vector_on_tangent(x, u)
    product.assert_check_point_on_manifold(product.retr(x, 0.1 * u))
    p = geoopt.ManifoldParameter(x, manifold=product)
    opt = geoopt.optim.RiemannianAdam([p], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    product.assert_check_point_on_manifold(p.detach())


@pytest.mark.parametrize("method", METHODS)
def test_proj_of_a_pretrained_matrix_is_its_polar_factor(method):
    w = torch.randn(10, 4, dtype=torch.float64)
    p = geoopt.ManifoldParameter(w.clone(), manifold=Stiefel(retraction=method))
    with torch.no_grad():
        p.proj_()
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(p.detach(), u @ vh, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opt_cls, kwargs", [(geoopt.optim.RiemannianSGD, dict(lr=0.05, momentum=0.9, stabilize=3)),
                                             (geoopt.optim.RiemannianAdam, dict(lr=0.05, amsgrad=True, stabilize=3))],
                         ids=["rsgd", "radam"])
def test_geoopt_optimizers_keep_our_factors_on_the_manifold(method, opt_cls, kwargs):
    m = Stiefel(retraction=method)
    target = _point(seed=3).float()
    p = geoopt.ManifoldParameter(m.random(9, 4), manifold=m)
    opt = opt_cls([p], **kwargs)
    start = float(((p - target) ** 2).sum().detach())
    for _ in range(60):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()
    assert orthonormality_error(p) < 1e-5
    assert float(((p - target) ** 2).sum().detach()) < 0.5 * start


@pytest.mark.parametrize("manifold", ["ours-qr", "ours-cholqr2", "geoopt-euclidean", "geoopt-canonical"])
@pytest.mark.parametrize("amsgrad, stabilize", [(False, None), (True, 4)])
def test_riemannian_mode_equals_geoopt_riemannian_adam(manifold, amsgrad, stabilize):
    """SpectralAdam(mode="riemannian") follows each factor's own metric: the Euclidean one (ours
    or geoopt's EuclideanStiefel: our retraction) and the canonical one (geoopt.Stiefel(): its
    canonical gradient and Cayley retraction), with geoopt's amsgrad and stabilize."""
    kind, _, method = manifold.partition("-")
    if kind == "ours":
        m, retraction = Stiefel(retraction=method), method
    else:
        m, retraction = (geoopt.Stiefel(canonical=(method == "canonical"))), "qr"
    # the reference: geoopt's RiemannianAdam on a tensor of the same geometry
    ref_m = m if method == "canonical" else Stiefel(retraction=retraction)
    start = [_point(12, 3, seed=s) for s in range(3)]
    ours = [geoopt.ManifoldParameter(x.clone(), manifold=m) for x in start]
    ref = [geoopt.ManifoldParameter(x.clone(), manifold=ref_m) for x in start]
    opt = SpectralAdam(ours, lr=0.05, mode="riemannian", retraction=retraction, amsgrad=amsgrad, stabilize=stabilize)
    ref_opt = geoopt.optim.RiemannianAdam(ref, lr=0.05, amsgrad=amsgrad, stabilize=stabilize)
    gen = torch.Generator().manual_seed(5)
    for _ in range(9):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(opt.state[a]["exp_avg"], ref_opt.state[b]["exp_avg"], rtol=0, atol=1e-10)
        assert orthonormality_error(a) < 1e-12
