"""Property tests (hypothesis): the retractions and the layer on random shapes, scales and conditioning."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stiefel_sct import SpectralLinear, orthonormality_error, preserving_retraction, retract  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def tall_matrices(draw):
    """A batch of tall matrices: random shape (k <= n), scale 1e-6..1e6, and a conditioning kind."""
    n = draw(st.integers(1, 48))
    k = draw(st.integers(1, n))
    batch = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = 10.0 ** draw(st.integers(-6, 6))
    kind = draw(st.sampled_from(["gaussian", "ill_conditioned", "rank_deficient", "zero_column"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, k, generator=gen, dtype=torch.float64)
    if kind == "ill_conditioned" and k > 1:
        x = x * torch.logspace(0, -draw(st.integers(3, 12)), k, dtype=torch.float64)  # column scales
    elif kind == "rank_deficient" and k > 1:
        x[..., -1] = x[..., 0] * 2.0  # a repeated direction
    elif kind == "zero_column":
        x[..., 0] = 0.0
    return (x * scale).to(dtype), kind


@SETTINGS
@given(tall_matrices(), st.sampled_from(["qr", "cholqr2"]))
def test_retraction_is_orthonormal_finite_and_keeps_the_span(case, method):
    x, kind = case
    q = retract(x, method)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert torch.isfinite(q).all()
    assert orthonormality_error(q) <= TOL[x.dtype] * max(1, x.shape[-1])
    if kind == "gaussian":  # full rank: the column space is unchanged (projector onto span(q) fixes x)
        x64, q64 = x.double(), q.double()
        resid = x64 - q64 @ (q64.mT @ x64)
        assert resid.abs().max() <= 1e3 * TOL[x.dtype] * x64.abs().max()


@SETTINGS
@given(tall_matrices())
def test_backends_agree_where_the_input_is_well_conditioned(case):
    x, kind = case
    if kind != "gaussian":
        return
    k = x.shape[-1]
    sv = torch.linalg.svdvals(x.double())
    if float(sv[..., 0].max() / sv[..., -1].min()) > 1e3:  # a random Gaussian can still be badly conditioned
        return
    assert (retract(x, "qr") - retract(x, "cholqr2")).abs().max() <= 100 * TOL[x.dtype] * max(1, k)


@SETTINGS
@given(st.integers(1, 24), st.integers(1, 24), st.data())
def test_preserving_retraction_keeps_the_weight(m, n, data):
    k = data.draw(st.integers(1, min(m, n)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(m, k, generator=gen, dtype=torch.float64)
    v = torch.randn(n, k, generator=gen, dtype=torch.float64)
    s = torch.randn(k, generator=gen, dtype=torch.float64) * 10.0 ** data.draw(st.integers(-3, 3))
    u2, s2, v2 = preserving_retraction(u, s, v)
    w, w2 = (u * s) @ v.T, (u2 * s2) @ v2.T
    assert (w2 - w).abs().max() <= 1e-10 * max(1.0, float(w.abs().max()))
    assert orthonormality_error(u2) <= 1e-12 and orthonormality_error(v2) <= 1e-12


@SETTINGS
@given(st.integers(1, 20), st.integers(1, 20), st.data())
def test_layer_matches_its_dense_weight(m, n, data):
    k = data.draw(st.integers(1, min(m, n)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    scale = 10.0 ** data.draw(st.integers(-6, 6))
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    layer = SpectralLinear(m, n, k, dtype=dtype)
    x = torch.randn(3, m, dtype=dtype) * scale
    with torch.no_grad():
        y = layer(x)
        ref = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    assert torch.isfinite(y).all()
    assert (y - ref).abs().max() <= 100 * TOL[dtype] * max(float(ref.abs().max()), 1e-30) + 1e-30


@st.composite
def near_identity_grams(draw):
    """Symmetric ``G = I + E`` with ``||E||_1 < 1``, random size, sign pattern and spread."""
    k = draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    e = torch.randn(k, k, generator=gen, dtype=torch.float64)
    e = e + e.mT
    size = draw(st.floats(1e-6, 0.999))
    return torch.eye(k, dtype=torch.float64) + size * e / e.abs().sum(0).max()


@given(near_identity_grams())
@SETTINGS
def test_neumann_bound_is_an_upper_bound_of_the_condition_number(gram):
    """The certified one-pass rule's bound: ||G - I||_1 = d < 1 gives kappa_1(G) <= (1 + d) / (1 - d)."""
    d = float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().sum(0).max())
    kappa = float(torch.linalg.cond(gram, p=1))
    assert kappa <= (1 + d) / (1 - d) * (1 + 1e-9)
