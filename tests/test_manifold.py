import geoopt
import pytest
import torch

from stiefel_sct import (
    Stiefel,
    cholqr2_retraction,
    orthonormality_error,
    qr_retraction,
    retract,
    retract_,
)

METHODS = ["qr", "cholqr2"]


def _near_orthonormal(n, k, noise=1e-2, dtype=torch.float64):
    q = torch.linalg.qr(torch.randn(n, k, dtype=dtype))[0]
    return q + noise * torch.randn(n, k, dtype=dtype)


def test_is_a_geoopt_euclidean_stiefel():
    m = Stiefel()
    assert isinstance(m, geoopt.EuclideanStiefel)
    x = m.random(20, 4, dtype=torch.float64)
    assert orthonormality_error(x) < 1e-12
    u = torch.randn(20, 4, dtype=torch.float64)
    v = m.proju(x, u)
    sym = x.mT @ v + v.mT @ x  # tangent: X^T V skew
    assert sym.abs().max() < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_retraction_gives_q_with_positive_r_diagonal(method):
    x = torch.randn(50, 7, dtype=torch.float64)
    q = retract(x, method)
    assert orthonormality_error(q) < 1e-13
    r = q.mT @ x  # x = q r  ->  r upper triangular with positive diagonal
    assert torch.allclose(torch.tril(r, -1), torch.zeros_like(r), atol=1e-12)
    assert (torch.diagonal(r) > 0).all()
    assert torch.allclose(q @ r, x, atol=1e-12)


def test_backends_agree_on_well_conditioned_input():
    for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
        x = _near_orthonormal(300, 16, noise=0.05, dtype=dtype)
        stack = torch.stack([x, 2.0 * x, _near_orthonormal(300, 16, dtype=dtype)])
        a, b = qr_retraction(stack), cholqr2_retraction(stack)
        assert (a - b).abs().max() <= tol


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_input_gives_orthonormal_output(method, dtype):
    x = torch.randn(40, 6, dtype=dtype)
    x_zero = x.clone()
    x_zero[:, 0] = 0.0  # diag(R)[0] == 0: sign(0) must not zero the column
    x_dup = x.clone()
    x_dup[:, 3] = x_dup[:, 1]
    x_allzero = torch.zeros(40, 6, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for bad in (x_zero, x_dup, x_allzero):
        q = retract(bad, method)
        assert torch.isfinite(q).all()
        assert orthonormality_error(q) <= tol
        assert (q.norm(dim=0) > 0.5).all()  # no column zeroed


def test_cholqr2_falls_back_only_for_the_bad_matrices_of_a_batch():
    good = torch.randn(30, 5, dtype=torch.float64)
    bad = good.clone()
    bad[:, 2] = bad[:, 0]
    out = cholqr2_retraction(torch.stack([good, bad, good]))
    for q in out:
        assert orthonormality_error(q) < 1e-12
    assert torch.allclose(out[0], qr_retraction(good), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factors_are_factorized_in_fp32(method, dtype):
    x = torch.randn(128, 8).to(dtype)
    q = retract(x, method)
    assert q.dtype == dtype
    assert orthonormality_error(q) <= 1e-2
    ref = qr_retraction(x.float()).to(dtype)
    assert (q.float() - ref.float()).abs().max() <= 1e-2


def test_retract_inplace_batches_mixed_shapes_and_keeps_identity():
    shapes = [(30, 4), (30, 4), (12, 3), (30, 4), (12, 3)]
    ts = [torch.randn(s, dtype=torch.float64) for s in shapes]
    before = [t.clone() for t in ts]
    ids = [id(t) for t in ts]
    ptrs = [t.data_ptr() for t in ts]
    retract_(ts)
    assert [id(t) for t in ts] == ids and [t.data_ptr() for t in ts] == ptrs
    for t, b in zip(ts, before):
        assert torch.allclose(t, qr_retraction(b), atol=1e-13)


def test_retract_preserves_span_and_orientation():
    x = torch.randn(25, 5, dtype=torch.float64)
    q = retract(x)
    proj = q @ (q.mT @ x)  # x lies in span(q)
    assert torch.allclose(proj, x, atol=1e-12)


def test_orthonormality_error_value():
    x = torch.eye(4, 2, dtype=torch.float64)
    assert orthonormality_error(x) == 0.0
    x[0, 0] = 2.0
    assert orthonormality_error(x) == pytest.approx(3.0)
    x = torch.eye(4, 2, dtype=torch.float64)
    x[2, 0] = 0.5  # off-diagonal of the Gram matrix stays 0, diagonal +0.25
    assert orthonormality_error(x) == pytest.approx(0.25)


def test_bad_input():
    with pytest.raises(ValueError, match="retraction must be one of"):
        retract(torch.randn(4, 2), "svd")
    with pytest.raises(ValueError, match="retraction must be one of"):
        Stiefel("householder")
    with pytest.raises(ValueError, match="tall"):
        retract(torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        orthonormality_error(torch.randn(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        retract([[1.0]])


def test_geoopt_retr_uses_our_backend():
    m = Stiefel("cholqr2")
    x = m.random(16, 4, dtype=torch.float64)
    u = 0.1 * torch.randn(16, 4, dtype=torch.float64)
    y = m.retr(x, u)
    assert torch.allclose(y, qr_retraction(x + u), atol=1e-12)
    y2, v2 = m.retr_transp(x, u, u)
    assert torch.allclose(y2, y, atol=1e-12)
    assert (y2.mT @ v2 + v2.mT @ y2).abs().max() < 1e-12


@pytest.mark.parametrize("intel", [False, True])
@pytest.mark.parametrize("k", [1, 16, 17, 33, 64, 200])
def test_inverse_of_a_cholesky_factor_by_halves_equals_the_solve(monkeypatch, intel, k):
    """L^-1 by halves (CPUs whose trsm is slow, above _INVERSE_LEAF) or by one triangular solve:
    lower triangular, L L^-1 = I, and the solve's values to 1e-12 (fp64), at odd orders too."""
    from stiefel_sct import manifold

    monkeypatch.setattr(manifold, "_intel_cpu", lambda: intel)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3, 2 * k + 1, k, dtype=torch.float64, generator=gen)
    chol = torch.linalg.cholesky(x.mT @ x)
    inv = manifold._inverse_lower(chol)
    eye = torch.eye(k, dtype=torch.float64).expand_as(chol)
    want = torch.linalg.solve_triangular(chol, eye, upper=False)
    assert torch.equal(inv, inv.tril())
    assert (chol @ inv - eye).abs().max() <= 1e-12
    assert (inv - want).abs().max() <= 1e-12 * want.abs().max()


@pytest.mark.parametrize("k,intel", [(8, True), (64, False), (64, True)])  # inverse + GEMM twice, then trsm
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_certified_one_pass_skips_the_exact_condition_number(monkeypatch, k, intel, dtype, tol):
    """Right after a step ||G - I||_1 is small: the pass is taken without forming G^-1, and the
    result is the exact path's; a well-conditioned but far-from-orthonormal batch (2 Q: G = 4 I)
    is not certified and goes through the exact condition number, still one pass. Both products
    (trsm on an Intel CPU from _TRSM_MIN_RANK on, inverse + GEMM elsewhere) on any machine."""
    from stiefel_sct import manifold

    monkeypatch.setattr(manifold, "_intel_cpu", lambda: intel)
    assert manifold._trsm_pays(torch.eye(k)) == (intel and k >= manifold._TRSM_MIN_RANK)
    n = 3 * k
    gen = torch.Generator().manual_seed(k)
    q = torch.linalg.qr(torch.randn(4, n, k, generator=gen, dtype=dtype))[0]
    near = q + 1e-4 * torch.randn(4, n, k, generator=gen, dtype=dtype)
    gram = near.mT @ near
    chol = torch.linalg.cholesky(gram)
    exact = near @ torch.linalg.inv(chol).mT  # one CholeskyQR pass, by the book
    calls = []
    real = manifold._gram_factors
    monkeypatch.setattr(manifold, "_gram_factors", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = manifold.cholqr_into(near, torch.empty_like(near))
    assert not calls  # certified: no k x k inverse, no exact kappa
    assert (out - exact).abs().max() <= 10 * tol
    assert max(orthonormality_error(m) for m in out) <= tol
    out2 = manifold.cholqr_into(2 * q, torch.empty_like(q))
    assert calls  # ||4 I - I||_1 = 3: not certified, decided by the exact kappa (= 1)
    assert (out2 - q).abs().max() <= 10 * tol


def test_cholqr_takes_one_pass_two_passes_or_householder_as_needed():
    from stiefel_sct.manifold import cholqr_into

    n, k = 200, 8
    q = torch.linalg.qr(torch.randn(n, k, dtype=torch.float32))[0]
    near = q + 1e-3 * torch.randn(n, k)  # one pass
    scale = torch.logspace(0, 2, k)  # kappa(X^T X) = 1e4: second pass needed
    skewed = (q * scale) @ torch.linalg.qr(torch.randn(k, k))[0]
    deficient = near.clone()
    deficient[:, 5] = deficient[:, 2]  # Cholesky fails: Householder
    x = torch.stack([near, skewed, deficient])
    out = torch.empty_like(x)
    before = x.clone()
    cholqr_into(x, out)
    assert torch.equal(x, before)  # input untouched
    ref = qr_retraction(x)
    for i in range(3):
        assert orthonormality_error(out[i]) < 2e-6, i
    assert (out[0] - ref[0]).abs().max() < 1e-5
    assert (out[1] - ref[1]).abs().max() < 1e-4
