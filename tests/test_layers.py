import math

import geoopt
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from stiefel_sct import SpectralAdam, SpectralLinear, Stiefel, kept_energy, orthonormality_error


def test_parameters_are_manifold_factors_and_plain_spectrum():
    layer = SpectralLinear(20, 12, 4)
    assert isinstance(layer.U, geoopt.ManifoldParameter) and isinstance(layer.U.manifold, Stiefel)
    assert isinstance(layer.V, geoopt.ManifoldParameter) and isinstance(layer.V.manifold, Stiefel)
    assert type(layer.s) is nn.Parameter and type(layer.bias) is nn.Parameter
    assert layer.U.shape == (20, 4) and layer.V.shape == (12, 4) and layer.s.shape == (4,)
    assert orthonormality_error(layer.U) < 1e-6 and orthonormality_error(layer.V) < 1e-6
    assert [n for n, _ in layer.named_parameters()] == ["U", "s", "V", "bias"]
    assert list(layer.children()) == []
    assert SpectralLinear(20, 12, 4, bias=False).bias is None


def _explicit_weight(layer):
    return layer.V @ torch.diag(layer.s) @ layer.U.mT


def test_forward_matches_dense_weight_float64():
    layer = SpectralLinear(37, 23, 5, dtype=torch.float64)
    x = torch.randn(3, 4, 37, dtype=torch.float64)
    y = layer(x)
    ref = F.linear(x, layer.dense_weight(), layer.bias)
    assert y.shape == (3, 4, 23)
    assert ((y - ref).abs().max() / ref.abs().max()) < 1e-12


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_autograd_through_dense_weight(bias):
    layer = SpectralLinear(31, 17, 6, bias=bias, dtype=torch.float64)
    x = torch.randn(9, 31, dtype=torch.float64)
    target = torch.randn(9, 17, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]

    F.mse_loss(layer(x), target).backward()
    ours = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    F.mse_loss(F.linear(x, _explicit_weight(layer), layer.bias), target).backward()
    ref = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for n in names:
        assert torch.allclose(ours[n], ref[n], rtol=1e-10, atol=1e-12), n


def test_initial_output_scale_matches_nn_linear():
    m, n, k = 512, 256, 16
    x = torch.randn(4096, m)
    with torch.no_grad():
        dense = torch.stack([nn.Linear(m, n, bias=False)(x).var() for _ in range(3)]).mean()
        spectral = torch.stack([SpectralLinear(m, n, k, bias=False)(x).var() for _ in range(3)]).mean()
    assert float(dense) == pytest.approx(1 / 3, rel=0.1)
    assert float(spectral) == pytest.approx(float(dense), rel=0.15)
    layer = SpectralLinear(m, n, k)
    assert torch.allclose(layer.s, torch.full((k,), math.sqrt(n / (3 * k))))
    assert layer.bias.abs().max() <= 1 / math.sqrt(m)


class _NoHugeTensors(TorchDispatchMode):
    """Fails if any op produces a tensor with ``limit`` or more elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    raise AssertionError(f"{func} allocated a tensor of {t.numel()} elements")
        return out


def test_no_dense_sized_tensor_in_forward_backward_and_step():
    m, n, k = 8192, 28672, 32
    layer = SpectralLinear(m, n, k)
    opt = SpectralAdam(layer.parameters(), lr=1e-3)
    x = torch.randn(4, m)
    guard = _NoHugeTensors(limit=m * n)
    with guard:
        for _ in range(2):
            loss = layer(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert 0 < guard.largest < m * n / 100  # the largest tensor is a factor, ~1/200 of W
    assert orthonormality_error(layer.V) < 1e-5


def test_from_linear_full_rank_reproduces_layer():
    lin = nn.Linear(40, 24)
    sl = SpectralLinear.from_linear(lin, rank=24)
    x = torch.randn(10, 40)
    assert torch.allclose(sl(x), lin(x), atol=1e-5)
    assert torch.allclose(sl.dense_weight(), lin.weight, atol=1e-5)
    assert torch.equal(sl.bias, lin.bias)
    assert orthonormality_error(sl.U) < 1e-5 and orthonormality_error(sl.V) < 1e-5


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.8, 0.95, 0.999, 1.0])
def test_from_linear_energy_is_the_smallest_rank_reaching_it(energy):
    lin = nn.Linear(64, 48, bias=False)
    with torch.no_grad():  # a decaying spectrum, so the rank varies with energy
        lin.weight.mul_(torch.logspace(0, -2, 64))
    sl = SpectralLinear.from_linear(lin, energy=energy)
    frac = kept_energy(torch.linalg.svdvals(lin.weight.double()))
    assert frac[sl.rank - 1] >= energy - 1e-9
    if sl.rank > 1:
        assert frac[sl.rank - 2] < energy


def test_to_linear_round_trip_and_repr():
    layer = SpectralLinear(64, 32, 8)
    lin = layer.to_linear()
    x = torch.randn(5, 64)
    assert torch.allclose(lin(x), layer(x), atol=1e-5)
    text = repr(layer)
    assert "rank=8" in text and "U=(64, 8)" in text and "compression=" in text
    assert f"{64 * 32 / (8 * 97):.1f}x" in text


def test_meta_device_then_to_empty_keeps_manifold():
    layer = SpectralLinear(300, 200, 10, device="meta")
    assert layer.U.is_meta
    layer.to_empty(device="cpu")
    assert isinstance(layer.U, geoopt.ManifoldParameter) and isinstance(layer.V.manifold, Stiefel)
    layer.reset_parameters()
    assert orthonormality_error(layer.U) < 1e-5
    layer.double()
    assert isinstance(layer.U, geoopt.ManifoldParameter) and layer.U.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(rank=0), ValueError, r"rank must be in \[1, min\(in_features, out_features\)\] = \[1, 8\]"),
        (dict(rank=9), ValueError, r"rank must be in \[1"),
        (dict(rank=2.0), TypeError, "rank must be an int"),
        (dict(rank=2, retraction="svd"), ValueError, "retraction must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        SpectralLinear(8, 16, **kwargs)
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        SpectralLinear(0, 16, 1)


def test_from_linear_bad_arguments():
    lin = nn.Linear(10, 6)
    with pytest.raises(ValueError, match="exactly one of rank or energy"):
        SpectralLinear.from_linear(lin)
    with pytest.raises(ValueError, match="exactly one of rank or energy"):
        SpectralLinear.from_linear(lin, rank=2, energy=0.9)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
            SpectralLinear.from_linear(lin, energy=bad)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        SpectralLinear.from_linear(lin, rank=7)
    with pytest.raises(TypeError, match="nn.Linear"):
        SpectralLinear.from_linear(nn.Conv1d(2, 2, 1), rank=1)


@pytest.mark.parametrize("bias", [True, False])
def test_input_gradient_with_leading_dims_and_double_backward(bias):
    layer = SpectralLinear(13, 9, 4, bias=bias, dtype=torch.float64)
    x = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(layer.parameters()), g, create_graph=True)
    x2 = x.detach().clone().requires_grad_()
    y2 = F.linear(x2, _explicit_weight(layer), layer.bias)
    ref = torch.autograd.grad(y2, [x2] + list(layer.parameters()), g, create_graph=True)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # second order: d/dU of <grad_x, grad_x>
    (gg,) = torch.autograd.grad(grads[0].square().sum(), layer.U)
    (gg_ref,) = torch.autograd.grad(ref[0].square().sum(), layer.U)
    assert torch.allclose(gg, gg_ref, rtol=1e-9, atol=1e-11)


def test_spectral_embedding_matches_dense_table_and_gradients():
    from stiefel_sct import SpectralEmbedding

    emb = SpectralEmbedding(50, 12, 5, dtype=torch.float64)
    idx = torch.randint(0, 50, (3, 7))
    out = emb(idx)
    table = (emb.U * emb.s) @ emb.V.mT  # built explicitly, differentiably
    ref = F.embedding(idx, table)
    assert out.shape == (3, 7, 12) and torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, [emb.U, emb.s, emb.V], g)
    theirs = torch.autograd.grad(ref, [emb.U, emb.s, emb.V], g)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert orthonormality_error(emb.U) < 1e-12
    assert "compression=" in repr(emb)


def test_spectral_embedding_from_embedding_padding_and_back():
    from stiefel_sct import SpectralEmbedding, densify

    dense = nn.Embedding(40, 16, padding_idx=0)
    full = SpectralEmbedding.from_embedding(dense, rank=16)
    idx = torch.tensor([[0, 3, 39], [5, 0, 1]])
    assert torch.allclose(full(idx), dense(idx), atol=1e-5)
    assert (full(idx)[idx == 0] == 0).all()
    back = densify(full)
    assert isinstance(back, nn.Embedding) and torch.allclose(back(idx), dense(idx), atol=1e-5)
    with pytest.raises(ValueError, match="padding_idx"):
        SpectralEmbedding(10, 4, 2, padding_idx=10)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min"):
        SpectralEmbedding(10, 4, 5)
    # init scale: E||W||_F^2 as nn.Embedding's N(0, 1) table
    big = SpectralEmbedding(1000, 64, 8)
    assert float(big.dense_weight().square().sum()) == pytest.approx(1000 * 64, rel=1e-4)


def test_autocast_bf16_forward_backward():
    layer = SpectralLinear(32, 16, 4)
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32
