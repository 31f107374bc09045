"""Data-aware (whitened) conversion and residual mode: optimality against a brute reference,
function preservation, checkpoints that rebuild the residual from the base, the PEFT LoRA export."""

import copy
import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from stiefel_sct import (
    SpectralAdam,
    SpectralConfig,
    SpectralLinear,
    densify,
    load_spectral,
    orthonormality_error,
    save_spectral,
    spectralize,
    stiefel_retraction,
)
from stiefel_sct.calibration import collect_input_moments, fisher_growth, whitened_spectrum, whitened_svd
from stiefel_sct.checkpoint import CheckpointError
from stiefel_sct.convert import budget_ranks


def _inputs(n, m, seed=0, dtype=torch.float64):
    """Correlated inputs (a random mixing of Gaussian features with decaying scales)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, m, dtype=dtype)
    return (torch.randn(n, m, generator=g, dtype=dtype) * scales) @ torch.randn(m, m, generator=g, dtype=dtype)


def _best_in_input_metric(W, X, k):
    """Brute reference for ``argmin_{rank W' <= k} ||X (W - W')^T||_F`` with ``X`` of full column rank:
    ``X = Q R``, so the problem is the plain truncated SVD of ``R W^T`` (no Cholesky, no whitening)."""
    _, R = torch.linalg.qr(X)
    P, S, Qh = torch.linalg.svd(R @ W.mT)
    return torch.linalg.solve(R, P[:, :k] * S[:k] @ Qh[:k]).mT


@pytest.mark.parametrize("k", [1, 3, 6])
def test_calibrated_conversion_minimises_the_output_error(k):
    torch.manual_seed(0)
    lin = nn.Linear(10, 7).double()
    X = _inputs(300, 10)
    layer = spectralize(copy.deepcopy(lin), rank=k, calibration=[X], damping=0.0, convert_small=True)
    W = lin.weight.detach()
    ref = _best_in_input_metric(W, X, k)
    err = lambda A: float(torch.linalg.norm(X @ (W - A).mT))
    assert err(layer.dense_weight()) == pytest.approx(err(ref), rel=1e-10)
    assert torch.allclose(layer.dense_weight(), ref, atol=1e-9)
    # ... and it beats the plain truncated SVD in that metric
    plain = SpectralLinear.from_linear(lin, rank=k).dense_weight()
    assert err(layer.dense_weight()) <= err(plain) + 1e-12
    assert orthonormality_error(layer.U) < 1e-12 and orthonormality_error(layer.V) < 1e-12
    assert torch.equal(layer.bias, lin.bias)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4))
def test_no_rank_k_matrix_beats_the_calibrated_one(seed, k):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(8, 6).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 8, generator=g, dtype=torch.float64))
    X = _inputs(100, 8, seed=seed)
    W = lin.weight.detach()
    best = spectralize(copy.deepcopy(lin), rank=k, calibration=[X], damping=0.0, convert_small=True).dense_weight()
    err = lambda A: float(torch.linalg.norm(X @ (W - A).mT))
    for _ in range(5):  # random rank-k perturbations of the optimum never do better
        d = torch.randn(6, k, generator=g, dtype=torch.float64) @ torch.randn(k, 8, generator=g, dtype=torch.float64)
        cand = best + 1e-2 * d
        P, S, Qh = torch.linalg.svd(cand)
        cand = P[:, :k] * S[:k] @ Qh[:k]
        assert err(best) <= err(cand) + 1e-9


def test_fp32_factors_orthonormal_and_whitened_energy_and_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    batches = [torch.randn(64, 32) for _ in range(3)]
    fixed = sum(p.numel() for p in model.parameters()) - 2 * 32 * 48
    m2, report = spectralize(copy.deepcopy(model), budget=fixed + 32 * 48, calibration=batches, report=True)
    for r in report:
        assert r.converted and 0 < r.kept_energy <= 1
    for layer in m2.modules():
        if isinstance(layer, SpectralLinear):
            assert orthonormality_error(layer.U) < 1e-6 and orthonormality_error(layer.V) < 1e-6
    assert sum(p.numel() for p in m2.parameters()) <= fixed + 32 * 48
    # energy reads the whitened spectrum: the kept fraction is the whitened one
    m3, rep3 = spectralize(copy.deepcopy(model), energy=0.7, calibration=batches, report=True)
    moments = collect_input_moments(model, {"0": model[0]}, batches)
    S = whitened_svd(model[0].weight, moments.moment("0"))[1]
    frac = torch.cumsum(S.square(), 0) / S.square().sum()
    assert rep3[0].rank == int((frac < 0.7).sum()) + 1


def test_layers_reading_one_input_share_one_moment():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x))

    block = Block()
    moments = collect_input_moments(block, dict(block.named_children()), [torch.randn(5, 8) for _ in range(3)])
    assert moments.moment("q") is moments.moment("k")
    assert moments.moment("o") is not moments.moment("q")
    assert moments.tokens("q") == 15
    assert sorted(map(sorted, moments.shared_groups())) == [["k", "q"], ["o"]]


def test_bad_calibration_input_is_a_clear_error_never_nan():
    lin = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="no batch"):
        spectralize(copy.deepcopy(lin), rank=2, calibration=[])
    with pytest.raises(ValueError, match="all zero"):
        spectralize(copy.deepcopy(lin), rank=2, calibration=[torch.zeros(10, 6)])
    with pytest.raises(ValueError, match="non-finite"):
        spectralize(copy.deepcopy(lin), rank=2, calibration=[torch.full((3, 6), float("nan"))])
    with pytest.raises(ValueError, match="singular"):  # 2 tokens for 6 features, no damping
        spectralize(copy.deepcopy(lin), rank=2, calibration=[torch.randn(2, 6)], damping=0.0)
    with pytest.raises(ValueError, match="damping must be"):
        spectralize(copy.deepcopy(lin), rank=2, calibration=[torch.randn(2, 6)], damping=-1.0)
    with pytest.raises(ValueError, match="calibration_forward needs"):
        spectralize(copy.deepcopy(lin), rank=2, calibration_forward=lambda m, b: m(b))
    # rank-deficient data with the default damping: the documented regularised result, finite
    layer = spectralize(copy.deepcopy(lin), rank=2, calibration=[torch.randn(2, 6)])
    assert all(torch.isfinite(t).all() for t in (layer.U, layer.s, layer.V))
    assert orthonormality_error(layer.U) < 1e-6


def test_a_layer_the_calibration_never_reaches_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="never called"):
        spectralize(model, rank=1, calibration=[torch.randn(3, 4)], calibration_forward=lambda m, b: m[0](b))


def _sqrtm(A):
    w, Q = torch.linalg.eigh(A)
    return (Q * w.clamp_min(0).sqrt()) @ Q.mT


def _regression(seed=0, n=400, m=9, out=6):
    """A linear layer, correlated inputs and a loss whose output gradients are correlated too
    (``loss = ||(y - t) M||^2``: ``g`` lives in ``M M^T``'s metric)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(m, out).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, m, generator=g, dtype=torch.float64))
    X = _inputs(n, m, seed=seed)
    T = torch.randn(n, out, generator=g, dtype=torch.float64)
    M = torch.randn(out, out, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, out, dtype=torch.float64)
    batches = [(X[i:i + 100], T[i:i + 100]) for i in range(0, n, 100)]
    forward = lambda model, b: ((model(b[0]) - b[1]) @ M).square().sum()
    return lin, X, batches, forward


def _fisher_metric(lin, batches, forward):
    """``(C, G)`` computed directly: the inputs' and the output gradients' second moments."""
    xs, gs = [], []
    for x, t in batches:
        y = lin(x).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(forward(lambda _, y=y: y, (x, t)), y)  # the loss as a function of y
        xs.append(x)
        gs.append(g)
    X, Gr = torch.cat(xs), torch.cat(gs)
    return X.mT @ X / len(X), Gr.mT @ Gr / len(Gr)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fisher_conversion_minimises_the_kfac_loss_estimate(k):
    lin, X, batches, forward = _regression()
    C, G = _fisher_metric(lin, batches, forward)
    layer = spectralize(copy.deepcopy(lin), rank=k, calibration=batches, calibration_forward=forward,
                        whitening="fisher", damping=0.0, grad_damping=0.0, convert_small=True)
    # brute reference with symmetric square roots (no Cholesky): truncate G^1/2 W C^1/2
    Gh, Ch = _sqrtm(G), _sqrtm(C)
    W = lin.weight.detach()
    P, S, Qh = torch.linalg.svd(Gh @ W @ Ch)
    ref = torch.linalg.solve(Gh, P[:, :k] * S[:k] @ Qh[:k]) @ torch.linalg.inv(Ch)
    err = lambda A: float(torch.linalg.norm(Gh @ (W - A) @ Ch))
    assert err(layer.dense_weight()) == pytest.approx(err(ref), rel=1e-9)
    assert torch.allclose(layer.dense_weight(), ref, atol=1e-8)
    # ... and beats the inputs-only truncation in that metric
    inputs_only = spectralize(copy.deepcopy(lin), rank=k, calibration=[X], damping=0.0, convert_small=True)
    assert err(layer.dense_weight()) <= err(inputs_only.dense_weight()) + 1e-12
    assert orthonormality_error(layer.U) < 1e-12 and orthonormality_error(layer.V) < 1e-12


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4))
def test_no_rank_k_matrix_beats_the_fisher_one(seed, k):
    lin, X, batches, forward = _regression(seed)
    C, G = _fisher_metric(lin, batches, forward)
    # an undamped metric needs an invertible G: some draws of the loss's mixing matrix make it
    # singular to rounding (seed 4926: cond 4e16), where the conversion rightly refuses
    # grad_damping=0 (or not: its Cholesky then depends on the GEMMs' last bits)
    assume(float(torch.linalg.cond(G)) < 1e12)
    Gh, Ch, W = _sqrtm(G), _sqrtm(C), lin.weight.detach()
    best = spectralize(copy.deepcopy(lin), rank=k, calibration=batches, calibration_forward=forward,
                       whitening="fisher", damping=0.0, grad_damping=0.0, convert_small=True).dense_weight()
    err = lambda A: float(torch.linalg.norm(Gh @ (W - A) @ Ch))
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(5):
        d = torch.randn(6, k, generator=g, dtype=torch.float64) @ torch.randn(k, 9, generator=g, dtype=torch.float64)
        P, S, Qh = torch.linalg.svd(best + 1e-2 * d)
        assert err(best) <= err(P[:, :k] * S[:k] @ Qh[:k]) + 1e-9


def _growth_problem(seed=0, n=9, m=7, k=2):
    """A weight error, orthonormal bases and SPD input / output-gradient moments (float64)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    E = torch.randn(n, m, generator=g, dtype=f64)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=f64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=f64)).Q
    X, D = torch.randn(40, m, generator=g, dtype=f64), torch.randn(40, n, generator=g, dtype=f64)
    return E, U, V, X.mT @ X / 40, D.mT @ D / 40


def test_fisher_growth_is_the_best_addition_outside_the_bases():
    """fisher_growth: P, Q orthonormal and orthogonal to V, U; the Fisher-metric error left after
    the rank-r addition is the error before minus the top r gains squared (Eckart-Young in the
    whitened complement), the full-room addition is the weighted least-squares solution over every
    X (a Kronecker-vectorised reference), and no other rank-r addition outside the bases does better."""
    E, U, V, C, G = _growth_problem()
    grown = fisher_growth(E, U, V, C, G, damping=0.0, grad_damping=0.0)
    assert grown.gains.numel() == 5  # min(9, 7) - 2 directions outside the bases
    Gh, Ch = _sqrtm(G), _sqrtm(C)  # the metric with symmetric square roots: no Cholesky in the reference
    err = lambda A: float(torch.linalg.norm(Gh @ (E - A) @ Ch)) ** 2
    Pv = torch.linalg.qr(V, mode="complete").Q[:, 2:]
    Pu = torch.linalg.qr(U, mode="complete").Q[:, 2:]
    for r in range(1, 6):
        P, sigma, Q = grown.factors(r)
        add = P * sigma @ Q.mT
        assert float((P.mT @ V).abs().max()) < 1e-12 and float((Q.mT @ U).abs().max()) < 1e-12
        assert float((P.mT @ P - torch.eye(r, dtype=P.dtype)).abs().max()) < 1e-12
        assert float((Q.mT @ Q - torch.eye(r, dtype=Q.dtype)).abs().max()) < 1e-12
        assert bool((sigma > 0).all())
        assert err(add) == pytest.approx(err(0 * E) - float((grown.gains[:r] ** 2).sum()), rel=1e-9)
        gen = torch.Generator().manual_seed(r)
        for _ in range(5):  # any other rank-r addition Pv Y Pu^T does worse
            other = add + 1e-2 * Pv @ (torch.randn(7, r, generator=gen, dtype=E.dtype)
                                       @ torch.randn(r, 5, generator=gen, dtype=E.dtype)) @ Pu.mT
            Po, So, Qoh = torch.linalg.svd(other)
            assert err(add) <= err(Po[:, :r] * So[:r] @ Qoh[:r]) + 1e-9
    A = torch.kron((Ch @ Pu).contiguous(), (Gh @ Pv).contiguous())  # vec(Gh Pv X Pu^T Ch), column-major
    X = torch.linalg.lstsq(A, (Gh @ E @ Ch).mT.reshape(-1)).solution.reshape(5, 7).mT
    P, sigma, Q = grown.factors(5)
    torch.testing.assert_close(P * sigma @ Q.mT, Pv @ X @ Pu.mT, rtol=0, atol=1e-10)


def test_fisher_growth_with_plain_metrics_is_the_svd_outside_the_bases_and_checks_its_input():
    """With identity moments the growth is the top-r SVD of (I - V V^T) E (I - U U^T) (what a
    residual layer grows); an error inside the bases needs nothing; shapes are checked."""
    E, U, V, _, _ = _growth_problem(seed=3)
    outside = E - V @ (V.mT @ E)
    outside = outside - outside @ U @ U.mT
    P0, S0, Q0h = torch.linalg.svd(outside)
    P, sigma, Q = fisher_growth(E, U, V, torch.eye(7, dtype=E.dtype), r=3).factors(3)
    torch.testing.assert_close(P * sigma @ Q.mT, P0[:, :3] * S0[:3] @ Q0h[:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, S0[:3], rtol=1e-12, atol=0)
    inside = V @ torch.randn(2, 7, dtype=E.dtype) + torch.randn(9, 2, dtype=E.dtype) @ U.mT
    assert fisher_growth(inside, U, V, torch.eye(7, dtype=E.dtype)).gains.numel() == 0
    with pytest.raises(ValueError, match="error of shape"):
        fisher_growth(E, U[:6], V, torch.eye(7, dtype=E.dtype))
    with pytest.raises(ValueError, match="input moment of shape"):
        fisher_growth(E, U, V, torch.eye(6, dtype=E.dtype))
    with pytest.raises(ValueError, match="output-gradient moment of shape"):
        fisher_growth(E, U, V, torch.eye(7, dtype=E.dtype), torch.eye(8, dtype=E.dtype))


def test_gradient_moments_leave_the_model_as_it_was_and_match_autograd():
    lin, X, batches, forward = _regression()
    C, G = _fisher_metric(lin, batches, forward)
    lin.weight.requires_grad_(False)
    moments = collect_input_moments(lin, {"": lin}, batches, forward=forward, gradients=True)
    assert torch.allclose(moments.moment(""), C, rtol=1e-10) and torch.allclose(moments.gradient_moment(""), G, rtol=1e-10)
    assert not lin.weight.requires_grad and lin.bias.requires_grad
    assert lin.weight.grad is None and lin.bias.grad is None
    # the inputs-only collection has none, and says how to get them
    plain = collect_input_moments(lin, {"": lin}, [X])
    assert not plain.has_gradients
    with pytest.raises(ValueError, match="gradients=True"):
        plain.gradient_moment("")


def test_fisher_budget_compares_layers_by_their_loss_and_ignores_its_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12)).double()
    X, T = torch.randn(200, 12, dtype=torch.float64), torch.randn(200, 12, dtype=torch.float64)
    batches = [(X[i:i + 50], T[i:i + 50]) for i in range(0, 200, 50)]
    dense = 2 * 12 * 16

    def ranks(scale):
        forward = lambda m, b: scale * (m(b[0]) - b[1]).square().mean()
        out = spectralize(copy.deepcopy(model), budget_fraction=0.5, calibration=batches, calibration_forward=forward,
                          whitening="fisher", convert_small=True)
        assert sum(r.params - r.shape[0] if r.converted else 0 for r in out.spectral_report) <= dense // 2
        return [r.rank for r in out.spectral_report]

    base = ranks(1.0)
    assert ranks(1e4) == base  # a loss in other units: the same ranks
    # the ranks are budget_ranks on the Fisher spectra themselves (not shares of each layer's own)
    layers = {"0": model[0], "2": model[2]}
    forward = lambda m, b: (m(b[0]) - b[1]).square().mean()
    moments = collect_input_moments(model, layers, batches, forward=forward, gradients=True)
    spectra = {n: whitened_spectrum(layers[n].weight, moments.moment(n), grad_moment=moments.gradient_moment(n))
               for n in layers}
    assert base == list(budget_ranks(spectra, {n: tuple(layers[n].weight.shape) for n in layers}, dense // 2,
                                     relative=False).values())


def test_fisher_whitening_errors_name_what_is_missing():
    lin, X, batches, forward = _regression()
    with pytest.raises(TypeError, match="scalar loss"):  # the forward returns outputs, not a loss
        spectralize(copy.deepcopy(lin), rank=2, calibration=[X], whitening="fisher")
    with pytest.raises(ValueError, match="needs calibration data"):
        spectralize(copy.deepcopy(lin), rank=2, whitening="fisher")
    with pytest.raises(ValueError, match="output-gradient moments"):
        spectralize(copy.deepcopy(lin), rank=2, whitening="fisher",
                    calibration=collect_input_moments(lin, {"": lin}, [X]))
    with pytest.raises(ValueError, match="whitening must be one of"):
        spectralize(copy.deepcopy(lin), rank=2, calibration=[X], whitening="outputs")
    with pytest.raises(ValueError, match="grad_damping must be"):
        spectralize(copy.deepcopy(lin), rank=2, calibration=batches, calibration_forward=forward, whitening="fisher",
                    grad_damping=-1.0)
    with pytest.raises(ValueError, match="embeddings"):
        SpectralConfig(rank=2, whitening="fisher", embeddings=True)
    with pytest.raises(ValueError, match="singular.*grad_damping"):  # one output direction only, no ridge
        spectralize(copy.deepcopy(lin), rank=2, calibration=batches, whitening="fisher", grad_damping=0.0,
                    calibration_forward=lambda m, b: m(b[0])[:, 0].sum())
    model = nn.Sequential(nn.Linear(9, 6), nn.Linear(9, 6)).double()
    with pytest.raises(ValueError, match="does not reach the loss"):
        spectralize(model, rank=1, whitening="fisher", calibration=[X[:10]], include=["0", "1"],
                    calibration_forward=lambda m, b: m[0](b).sum() + 0 * m[1](b).detach().sum())
    with pytest.raises(ValueError, match="never called"):  # no selected layer runs: named, not autograd's error
        spectralize(copy.deepcopy(model), rank=1, whitening="fisher", calibration=[X[:10]], include=["1"],
                    calibration_forward=lambda m, b: m[0](b).sum())
    # the recipe round-trips, and a recipe saved before the field existed reads as "inputs"
    cfg = SpectralConfig(budget_fraction=0.5, whitening="fisher", grad_damping=0.05)
    assert SpectralConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    del old["whitening"], old["grad_damping"]
    assert SpectralConfig.from_dict(old).whitening == "inputs"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_residual_mode_keeps_the_function_and_densify_merges(dtype, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)).to(dtype)
    x = torch.randn(7, 16, dtype=dtype)
    ref = model(x)
    res = spectralize(copy.deepcopy(model), rank=3, residual_dtype=dtype)
    assert all(isinstance(m, SpectralLinear) and m.residual is not None for m in (res[0], res[2]))
    assert torch.allclose(res(x), ref, atol=tol, rtol=0)
    assert "residual" not in res[0].state_dict()  # the model-sized part is never in a state dict
    merged = densify(copy.deepcopy(res))
    assert isinstance(merged[0], nn.Linear)
    assert torch.allclose(merged(x), ref, atol=tol, rtol=0)
    # calibrated + residual: still the same function
    cal = spectralize(copy.deepcopy(model), rank=3, residual_dtype=dtype, calibration=[torch.randn(50, 16, dtype=dtype)])
    assert torch.allclose(cal(x), ref, atol=tol, rtol=0)


def test_residual_in_bf16_and_argument_errors():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = spectralize(copy.deepcopy(lin), rank=2, residual_dtype=torch.bfloat16)
    assert layer.residual.dtype == torch.bfloat16
    x = torch.randn(4, 16)
    assert (layer(x) - lin(x)).abs().max() < 3e-2  # the residual rounded to bf16
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        spectralize(copy.deepcopy(lin), rank=2, residual_dtype=torch.int8)
    with pytest.raises(ValueError, match="embeddings"):
        spectralize(nn.Sequential(nn.Embedding(10, 4)), rank=2, residual_dtype=torch.float32, embeddings=True)
    empty = SpectralLinear(16, 8, 2, residual_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no residual yet"):
        empty(x)


@pytest.mark.parametrize("calibrated", [False, True])
def test_minor_directions_train_the_weakest_part_and_keep_the_function(calibrated):
    """``directions="minor"``: the trained part is the weight's ``k`` weakest singular directions
    (plain SVD, MiLoRA) or the ``k`` weakest in the metric of the calibration inputs (CorDA's
    knowledge-preserved mode), checked against the closed forms; the function is unchanged."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 7).double()
    X = _inputs(300, 10)
    k = 2
    layer = spectralize(copy.deepcopy(lin), rank=k, residual_dtype=torch.float64, directions="minor",
                        calibration=[X] if calibrated else None, damping=0.0)
    W = lin.weight.detach()
    if calibrated:  # the whitened metric is X's: X = Q R, so W' = (the bottom-k SVD of R W^T) mapped back
        _, R = torch.linalg.qr(X)
        P, S, Qh = torch.linalg.svd(R @ W.mT)
        ref = torch.linalg.solve(R, P[:, 7 - k:7] * S[7 - k:] @ Qh[7 - k:]).mT
    else:
        P, S, Qh = torch.linalg.svd(W, full_matrices=False)
        ref = P[:, -k:] * S[-k:] @ Qh[-k:]
        assert torch.allclose(layer.s.detach(), S[-k:], atol=1e-12)
    trained = (layer.V * layer.s) @ layer.U.mT
    assert torch.allclose(trained.detach(), ref, atol=1e-9)
    assert orthonormality_error(layer.U) < 1e-12 and orthonormality_error(layer.V) < 1e-12
    assert torch.allclose(layer(X), lin(X), atol=1e-12, rtol=0)
    # the principal default trains the strongest part: the two modes split the weight differently
    principal = spectralize(copy.deepcopy(lin), rank=k, residual_dtype=torch.float64,
                            calibration=[X] if calibrated else None, damping=0.0)
    metric = X if calibrated else torch.eye(10, dtype=X.dtype)  # what the part carries, in the metric used
    err = lambda m: float(torch.linalg.norm(metric @ ((m.V * m.s) @ m.U.mT).detach().mT))
    assert err(principal) > err(layer)
    cfg = SpectralConfig(rank=k, residual_dtype="float32", directions="minor")
    assert SpectralConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    del old["directions"]
    assert SpectralConfig.from_dict(old).directions == "principal"  # a checkpoint from before the option


def test_minor_directions_checkpoint_keeps_the_recipe_and_rebuilds_the_residual(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 12))
    model = spectralize(copy.deepcopy(base), rank=3, residual_dtype=torch.float32, directions="minor")
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("U", "s", "V"))
    x = _train(model)
    save_spectral(model, tmp_path / "ck", trained_only=True)
    back = load_spectral(copy.deepcopy(base), tmp_path / "ck")
    assert torch.equal(back(x), model(x))
    assert back.spectral_config.directions == "minor"


@pytest.mark.parametrize("k", [1, 3])
def test_contrast_directions_are_the_top_generalized_eigenvectors_and_keep_the_function(k):
    """``directions="contrast"``: the trained part is ``W U U^T`` with ``span(U)`` the top-``k``
    generalized eigenvectors of (task moment, kept moment), against an eigen-decomposition of
    ``C_keep^-1 C_task`` computed another way; the kept text's outputs barely see it."""
    torch.manual_seed(0)
    m, n = 10, 7
    lin = nn.Linear(m, n).double()
    g = torch.Generator().manual_seed(1)
    task = torch.randn(400, m, generator=g, dtype=torch.float64) * torch.linspace(1.0, 0.1, m, dtype=torch.float64)
    keep = torch.randn(400, m, generator=g, dtype=torch.float64) * torch.linspace(0.1, 1.0, m, dtype=torch.float64)
    layer = spectralize(copy.deepcopy(lin), rank=k, residual_dtype=torch.float64, directions="contrast",
                        calibration=[task], preserve=[keep], damping=0.0)
    c_task, c_keep = task.mT @ task / 400, keep.mT @ keep / 400
    vals, vecs = torch.linalg.eig(torch.linalg.solve(c_keep, c_task))  # non-symmetric route to the same pencil
    top = vecs.real[:, vals.real.argsort(descending=True)[:k]]
    Q, _ = torch.linalg.qr(top)
    assert torch.allclose(layer.U @ layer.U.mT, Q @ Q.mT, atol=1e-9)
    W = lin.weight.detach()
    assert torch.allclose(((layer.V * layer.s) @ layer.U.mT).detach(), W @ Q @ Q.mT, atol=1e-9)
    assert orthonormality_error(layer.U) < 1e-12 and orthonormality_error(layer.V) < 1e-12
    assert torch.allclose(layer(task), lin(task), atol=1e-12, rtol=0)
    # per unit of output it moves on the task's inputs, the part moves the kept text's outputs
    # less than the principal part does
    part = lambda mod: ((mod.V * mod.s) @ mod.U.mT).detach()
    principal = spectralize(copy.deepcopy(lin), rank=k, residual_dtype=torch.float64)
    ratio = lambda A: float(torch.linalg.norm(keep @ A.mT) / torch.linalg.norm(task @ A.mT))
    assert ratio(part(layer)) < ratio(part(principal))
    moments = collect_input_moments(lin, {"": lin}, [keep])
    again = spectralize(copy.deepcopy(lin), rank=k, residual_dtype=torch.float64, directions="contrast",
                        calibration=[task], preserve=moments, damping=0.0)
    assert torch.equal(again.U, layer.U)


def test_minor_directions_argument_errors():
    with pytest.raises(ValueError, match="directions must be one of 'principal', 'minor', 'contrast', got 'weak'"):
        SpectralConfig(rank=2, residual_dtype="float32", directions="weak")
    for directions in ("minor", "contrast"):
        with pytest.raises(ValueError, match=rf"directions='{directions}' .* needs residual mode \(residual_dtype=...\)"):
            spectralize(nn.Linear(16, 8), rank=2, directions=directions)
        for recipe in (dict(energy=0.9), dict(budget_fraction=0.5)):
            with pytest.raises(ValueError, match=f"directions='{directions}' needs rank="):
                spectralize(nn.Linear(16, 8), residual_dtype=torch.float32, directions=directions, **recipe)
    with pytest.raises(ValueError, match="directions='contrast' compares two texts' inputs"):
        SpectralConfig(rank=2, residual_dtype="float32", directions="contrast", whitening="fisher")
    x = [torch.randn(30, 16)]
    with pytest.raises(ValueError, match="directions='contrast' needs preserve="):
        spectralize(nn.Linear(16, 8), rank=2, residual_dtype=torch.float32, directions="contrast", calibration=x)
    with pytest.raises(ValueError, match="needs calibration= .* as well as preserve="):
        spectralize(nn.Linear(16, 8), rank=2, residual_dtype=torch.float32, directions="contrast", preserve=x)
    with pytest.raises(ValueError, match="preserve= .* is used only with directions='contrast'"):
        spectralize(nn.Linear(16, 8), rank=2, residual_dtype=torch.float32, calibration=x, preserve=x)


def _residual_model(seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 12), nn.LayerNorm(12))
    model = spectralize(copy.deepcopy(base), rank=3, residual_dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("U", "s", "V"))
    return base, model


def _train(model, steps=5, optimizer=None):
    torch.manual_seed(1)
    x = torch.randn(16, 12)
    opt = optimizer or SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - x).square().mean().backward()
        opt.step()
    return x


def test_residual_training_stays_on_the_manifold_and_moves_only_the_factors():
    base, model = _residual_model()
    r0 = model[0].residual.clone()
    x = _train(model)
    assert not torch.allclose(model(x), base(x))
    assert torch.equal(model[0].residual, r0)
    assert orthonormality_error(model[0].U) < 1e-5
    # any optimizer, through the retraction hook
    _, other = _residual_model()
    opt = torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=0.1)
    handle = stiefel_retraction(opt)
    _train(other, optimizer=opt)
    handle.remove()
    assert orthonormality_error(other[2].V) < 1e-5


def test_trained_only_checkpoint_rebuilds_the_residual_from_the_base(tmp_path):
    base, model = _residual_model()
    x = _train(model)
    save_spectral(model, tmp_path / "ck", trained_only=True)
    config = json.loads((tmp_path / "ck" / "spectral_config.json").read_text())
    assert set(config["base_tensors"]) == {"3.weight", "3.bias"}  # the frozen norm comes from the base
    assert config["layers"]["0"]["residual"]["dtype"] == "float32"
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    fresh = copy.deepcopy(base)
    load_spectral(fresh, tmp_path / "ck")
    assert torch.equal(fresh(x), model(x))  # bitwise: the same base and factors give the same residual
    assert not {"3.weight", "3.bias"} & set(config["tensors"]) and size > 0
    # a full checkpoint of a residual model saves U0, s0, V0 but never the residual
    save_spectral(model, tmp_path / "full")
    assert "0.residual" not in json.loads((tmp_path / "full" / "spectral_config.json").read_text())["tensors"]
    again = copy.deepcopy(base)
    load_spectral(again, tmp_path / "full")
    assert torch.equal(again(x), model(x))


def test_residual_checkpoint_refuses_another_base_and_leaves_the_model_untouched(tmp_path):
    base, model = _residual_model()
    _train(model)
    save_spectral(model, tmp_path / "ck", trained_only=True)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="not the base weight"):
        load_spectral(other, tmp_path / "ck")
    assert isinstance(other[0], nn.Linear) and all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    norm_changed = copy.deepcopy(base)
    with torch.no_grad():
        norm_changed[3].weight += 1
    with pytest.raises(CheckpointError, match="3.weight"):
        load_spectral(norm_changed, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="residual layer"):
        load_spectral(copy.deepcopy(model), tmp_path / "ck")


def test_fsdp2_refuses_residual_layers():
    from stiefel_sct.distributed import shard_model

    _, model = _residual_model()
    with pytest.raises(NotImplementedError, match="residual"):
        shard_model(model)


def test_peft_lora_export_reproduces_the_trained_model(tmp_path):
    peft = pytest.importorskip("peft")
    from stiefel_sct.export import export_peft_lora

    class Net(nn.Module):  # PEFT wants named modules
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(12, 20), nn.Linear(20, 12)

        def forward(self, x):
            return self.down(torch.tanh(self.up(x)))

    torch.manual_seed(0)
    base = Net()
    model = spectralize(copy.deepcopy(base), rank=3, residual_dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("U", "s", "V"))
    x = _train(model, steps=10)
    export_peft_lora(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6  # rank 2k, scaling 1
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    assert (lora(x) - model(x)).abs().max() < 1e-5
    # what cannot be an adapter is refused by name
    with torch.no_grad():
        model.down.bias.requires_grad_(True)
    from stiefel_sct.export import export_peft_lora as export

    with pytest.raises(ValueError, match="trainable bias"):
        export(model, tmp_path / "bad")
    plain = spectralize(copy.deepcopy(base), rank=3)
    with pytest.raises(ValueError, match="without a residual"):
        export(plain, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_trained_only_checkpoint_of_a_tied_llm_with_residual_layers(tmp_path):
    pytest.importorskip("transformers")
    from test_checkpoint import tiny_llama

    base = tiny_llama()  # tied embeddings: lm_head.weight is the frozen embedding, a base tensor
    model = spectralize(copy.deepcopy(base), rank=2, exclude=["lm_head"], residual_dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("U", "s", "V"))
    ids = torch.randint(0, 96, (2, 9))
    opt = SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    save_spectral(model, tmp_path / "ck", trained_only=True)
    config = json.loads((tmp_path / "ck" / "spectral_config.json").read_text())
    assert "lm_head.weight" in config["base_tensors"] and "model.embed_tokens.weight" in config["base_tensors"]
    fresh = load_spectral(copy.deepcopy(base), tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
