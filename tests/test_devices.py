"""The library's core paths on every device: each test takes ``device`` and runs on the CPU here
and on CUDA where there is one (``-m cuda``; ``benchmarks/gpu.sh``). Each checks against a
reference computed on the same device (float64 where the device has it), not against the CPU."""

import copy

import pytest
import torch
from conftest import fit
from torch import nn

from stiefel_sct import (
    RankScheduler,
    SpectralAdam,
    SpectralEmbedding,
    SpectralLinear,
    is_stiefel,
    load_spectral,
    orthonormality_error,
    retract_,
    save_spectral,
    spectralize,
    stiefel_retraction,
)

pytestmark = pytest.mark.cuda


def _ortho(model) -> float:
    return max(orthonormality_error(p) for p in model.parameters() if is_stiefel(p))


def test_spectral_linear_forward_backward_match_the_dense_weight(device):
    layer = SpectralLinear(48, 40, 12, device=device, dtype=torch.float64)
    x = torch.randn(7, 48, device=device, dtype=torch.float64, requires_grad=True)
    w = (layer.V * layer.s) @ layer.U.mT  # the dense weight, for the reference only
    ref = x @ w.mT + layer.bias
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.U, layer.s, layer.V], gy)
    want = torch.autograd.grad(ref, [x, layer.U, layer.s, layer.V], gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_spectral_layers_under_bf16_autocast(device):
    layer = SpectralLinear(64, 32, 8, device=device)
    x = torch.randn(5, 64, device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), rtol=3e-2, atol=3e-2)
    emb = SpectralEmbedding(100, 16, 4, device=device)
    ids = torch.randint(0, 100, (3, 9), device=device)
    torch.testing.assert_close(emb(ids), ((emb.U * emb.s) @ emb.V.mT)[ids])


@pytest.mark.parametrize("method", ["qr", "cholqr2"])
def test_retraction_gives_the_sign_fixed_qr_factor(device, method):
    x = torch.randn(6, 200, 24, device=device, dtype=torch.float64)
    q, r = torch.linalg.qr(x)
    want = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    params = [nn.Parameter(t.clone()) for t in x]
    retract_(params, retraction=method)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_spectral_adam_is_torch_adam_on_plain_parameters(device, impl):
    if impl.get("fused") and torch.device(device).type == "cpu" and not hasattr(torch, "_fused_adam_"):
        pytest.skip("no fused CPU Adam in this torch")
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(33, 17, device=device)), nn.Parameter(torch.randn(17, device=device))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True, **impl)
    a, b = SpectralAdam(ours, **kw), torch.optim.Adam(theirs, **kw)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [dict(), dict(mode="riemannian"), dict(state_dtype=torch.bfloat16),
                                     dict(state_dtype=torch.uint8), dict(step_in_backward=True)])
def test_spectral_adam_trains_and_keeps_the_factors_orthonormal(device, options):
    torch.manual_seed(0)
    model = spectralize(nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)),
                        rank=6).to(device)
    opt = SpectralAdam(model.parameters(), lr=1e-2, **options)
    x = torch.linspace(-2, 2, 128, device=device).unsqueeze(1).repeat(1, 8)
    y = torch.sin(2 * x[:, :1])
    first, last = fit(model, opt, x, y, 60)
    assert last < 0.5 * first, (first, last)
    assert _ortho(model) < 1e-5


def test_step_in_backward_equals_the_plain_step(device):
    torch.manual_seed(0)
    model = spectralize(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)), rank=4).to(device)
    twin = copy.deepcopy(model)
    a = SpectralAdam(model.parameters(), lr=1e-2)
    b = SpectralAdam(twin.parameters(), lr=1e-2, step_in_backward=True)
    x = torch.randn(32, 16, device=device)
    for _ in range(3):
        for m, opt in ((model, a), (twin, b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_any_optimizer_with_the_retraction_hook(device):
    torch.manual_seed(0)
    model = spectralize(nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)),
                        rank=4).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = stiefel_retraction(opt)
    x = torch.randn(64, 4, device=device)
    for _ in range(20):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert _ortho(model) < 1e-5
    handle.remove()


def test_rank_growth_keeps_the_output(device):
    torch.manual_seed(0)
    model = nn.Sequential(SpectralLinear(24, 24, 4, device=device, dtype=torch.float64))
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    sched = RankScheduler(opt, every=1, tol=0.0, grow=3)
    x = torch.randn(16, 24, device=device, dtype=torch.float64)
    model(x).pow(3).sum().backward()
    opt.step()
    before = model(x).detach()
    sched.step()
    assert model[0].rank == 7
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert _ortho(model) < 1e-12


def test_checkpoint_round_trip(device, tmp_path):
    torch.manual_seed(0)
    model = spectralize(nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3)), rank=5).to(device)
    save_spectral(model, tmp_path / "ckpt")
    x = torch.randn(4, 12, device=device)
    # a real model on the device: the converted layer is built where the dense one was
    fresh = load_spectral(nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3)).to(device), tmp_path / "ckpt")
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # a meta model: everything is materialised on `device`
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
    fresh = load_spectral(skeleton, tmp_path / "ckpt", device=device)
    assert {p.device.type for p in fresh.parameters()} == {torch.device(device).type}
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_factor_bank_chunk_size_follows_the_device(device):
    from stiefel_sct.bank import CHUNK_BYTES, DEVICE_CHUNK_BYTES, FactorBank, chunk_bytes_for

    expected = DEVICE_CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES)
    assert chunk_bytes_for(torch.device(device)) == expected
    assert chunk_bytes_for(torch.device("cuda")) == 64 << 20 and chunk_bytes_for(torch.device("cpu")) == 8 << 20
    params = [nn.Parameter(torch.linalg.qr(torch.randn(1024, 8, device=device))[0]) for _ in range(300)]
    bank = FactorBank(params)  # 32 KB matrices: 256 per 8 MB chunk, all 300 in one 64 MB chunk
    assert [len(c) for c in bank.chunks] == ([256, 44] if expected == 8 << 20 else [300])
    assert bank.intact()
