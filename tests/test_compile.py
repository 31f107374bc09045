"""torch.compile and mixed precision with spectral layers."""

import torch
from conftest import fit
from torch import nn

from stiefel_sct import SpectralAdam, SpectralLinear, is_stiefel, orthonormality_error


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(SpectralLinear(24, 32, 6, dtype=dtype), nn.GELU(), SpectralLinear(32, 8, 4, dtype=dtype))


def test_compiled_model_has_no_graph_break_and_matches_eager():
    model = _model()
    x = torch.randn(5, 24)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    y = compiled(x)
    assert torch.allclose(y, model(x), atol=1e-6)
    y.square().sum().backward()
    ref = _model()
    ref(x).square().sum().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_compiled_model_trains_with_spectral_adam():
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 24), torch.randn(32, 8)
    first, last = fit(compiled, opt, x, y, 30)
    assert last < 0.7 * first
    assert max(orthonormality_error(p) for p in model.parameters() if is_stiefel(p)) < 1e-5


def test_bf16_parameters_and_autocast_train_without_nan():
    model = _model(torch.bfloat16)
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 24), torch.randn(32, 8)
    for _ in range(50):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x.bfloat16()).float(), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        if is_stiefel(p):  # factorized in fp32, rounded back to bf16
            assert orthonormality_error(p) <= 1e-2
