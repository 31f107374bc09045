import copy
import io

import geoopt
import pytest
import torch
import torch.nn.functional as F
from conftest import fit, sine_mlp
from torch import nn

from stiefel_sct import (
    SpectralAdam,
    SpectralAdamW,
    SpectralLinear,
    Stiefel,
    orthonormality_error,
    qr_retraction,
    retract_all,
    spectralize,
)

IMPLS = [dict(fused=True), dict(foreach=True), dict(foreach=False)]
IMPL_IDS = ["fused", "foreach", "single"]


def _train(opt, params, steps, seed=1):
    """Feed the same random gradients to ``params`` for ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _euclidean_params(dtype=torch.float64):
    return [torch.randn(7, 5, dtype=dtype, requires_grad=True), torch.randn(11, dtype=dtype, requires_grad=True)]


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("decoupled", [True, False])
def test_euclidean_matches_torch_adam(impl, decoupled):
    ours = _euclidean_params()
    ref = [p.detach().clone().requires_grad_() for p in ours]
    hp = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    opt = SpectralAdam(ours, decoupled_weight_decay=decoupled, **hp, **impl)
    ref_opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(ref, **hp)
    _train(opt, ours, 20)
    _train(ref_opt, ref, 20)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= 1e-6
        assert torch.allclose(opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"], atol=1e-10)


def _factor_set(dtype=torch.float64):
    m = Stiefel()
    shapes = [(40, 6), (40, 6), (25, 6), (40, 3)]
    factors = [geoopt.ManifoldParameter(m.random(*s, dtype=dtype), manifold=m) for s in shapes]
    spectrum = torch.randn(6, dtype=dtype, requires_grad=True)
    return factors, spectrum


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_sct_mode_matches_adam_plus_per_matrix_qr(impl):
    factors, s = _factor_set()
    ref_factors = [p.detach().clone().requires_grad_() for p in factors]
    ref_s = s.detach().clone().requires_grad_()
    opt = SpectralAdamW(factors + [s], lr=1e-2, weight_decay=0.05, **impl)
    ref_opt = torch.optim.AdamW([{"params": ref_factors, "weight_decay": 0.0}, {"params": [ref_s]}], lr=1e-2, weight_decay=0.05)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(20):
        for p in factors + [s]:
            p.grad = torch.randn(p.shape, generator=gen_a, dtype=p.dtype)
        for p in ref_factors + [ref_s]:
            p.grad = torch.randn(p.shape, generator=gen_b, dtype=p.dtype)
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            for p in ref_factors:  # the reference recipe: one QR per matrix, sign fixed
                q, r = torch.linalg.qr(p)
                p.copy_(q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0))
    for a, b in zip(factors + [s], ref_factors + [ref_s]):
        assert (a - b).abs().max() <= 1e-5
    for p in factors:
        assert orthonormality_error(p) < 1e-12


@pytest.mark.parametrize("retraction", ["qr", "cholqr2"])
def test_riemannian_mode_matches_geoopt(retraction):
    factors, s = _factor_set()
    for p in factors:  # geoopt follows each parameter's manifold: give it the same backend
        p.manifold = Stiefel(retraction)
    ref_factors = [geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold) for p in factors]
    ref_s = s.detach().clone().requires_grad_()
    opt = SpectralAdam(factors + [s], lr=2e-2, mode="riemannian", retraction=retraction)
    ref_opt = geoopt.optim.RiemannianAdam(ref_factors + [ref_s], lr=2e-2)
    _train(opt, factors + [s], 20, seed=5)
    _train(ref_opt, ref_factors + [ref_s], 20, seed=5)
    for a, b in zip(factors + [s], ref_factors + [ref_s]):
        assert (a - b).abs().max() <= 1e-5
    for a, b in zip(factors, ref_factors):
        assert (opt.state[a]["exp_avg"] - ref_opt.state[b]["exp_avg"]).abs().max() <= 1e-5


@pytest.mark.parametrize("retraction", ["qr", "cholqr2"])
def test_long_run_stays_on_manifold_fp32(retraction):
    model = nn.Sequential(SpectralLinear(64, 48, 8), nn.Tanh(), SpectralLinear(48, 16, 8))
    opt = SpectralAdam(model.parameters(), lr=1e-2, retraction=retraction)
    x, y = torch.randn(32, 64), torch.randn(32, 16)
    for _ in range(1000):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        if isinstance(p, geoopt.ManifoldParameter):
            assert orthonormality_error(p) <= 1e-5


def test_nonfinite_gradient_raises_before_anything_changes():
    model = nn.Sequential(SpectralLinear(10, 8, 3), SpectralLinear(8, 4, 2))
    opt = SpectralAdam(model.named_parameters(), lr=1e-2)
    x = torch.randn(5, 10)
    model(x).sum().backward()
    opt.step()
    model(x).sum().backward()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    model[1].s.grad[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'1\.s'.*no parameter or optimizer state was changed"):
        opt.step()
    model[1].s.grad[1] = 0.0
    model[0].V.grad[2, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"'0\.V'"):
        opt.step()
    model[1].V.grad[0, 0] = -float("inf")  # two bad gradients: the first parameter is named, whatever order they are read in
    with pytest.raises(FloatingPointError, match=r"'0\.V'"):
        opt.step()
    model[1].V.grad[0, 0] = 0.0
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p, b)
    after = opt.state_dict()
    for k, v in state["state"].items():
        for name, t in v.items():
            assert torch.equal(after["state"][k][name], t)


def test_unnamed_parameter_error_message():
    p = torch.zeros(3, requires_grad=True)
    opt = SpectralAdam([p])
    p.grad = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(3,\)\)"):
        opt.step()


def _mlp(seed):
    torch.manual_seed(seed)
    return spectralize(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)), rank=4, convert_small=True)


@pytest.mark.parametrize("mode", ["sct", "riemannian"])
def test_state_dict_round_trip_continues_bitwise(mode):
    data = [(torch.randn(16, 32), torch.randn(16, 8)) for _ in range(10)]

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    model = _mlp(0)
    opt = SpectralAdam(model.parameters(), lr=1e-2, weight_decay=0.01, mode=mode)
    run(model, opt, data)

    model_a = _mlp(0)
    opt_a = SpectralAdam(model_a.parameters(), lr=1e-2, weight_decay=0.01, mode=mode)
    run(model_a, opt_a, data[:5])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = _mlp(123)
    opt_b = SpectralAdam(model_b.parameters(), lr=1e-2, weight_decay=0.01, mode=mode)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert all(isinstance(p, geoopt.ManifoldParameter) for n, p in model_b.named_parameters() if n.endswith(("U", "V")))
    run(model_b, opt_b, data[5:])
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_param_groups_scheduler_closure_zero_grad():
    model = _mlp(0)
    spectral = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("U", "V", "s")]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = SpectralAdam([{"params": spectral}, {"params": rest, "lr": 0.0, "weight_decay": 0.5}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = torch.randn(8, 32), torch.randn(8, 8)
    bias_before = [b.detach().clone() for b in rest]

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(4):
        losses.append(float(opt.step(closure).detach()))
        sched.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    # lr 0 with decoupled decay: bias untouched
    for b, before in zip(rest, bias_before):
        assert torch.equal(b, before)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_parameters_without_grad_are_skipped():
    model = _mlp(0)
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    frozen = model[2]
    before = [p.detach().clone() for p in frozen.parameters()]
    model[0](torch.randn(4, 32)).sum().backward()
    opt.step()
    for p, b in zip(frozen.parameters(), before):
        assert torch.equal(p, b)
        assert len(opt.state[p]) == 0


def test_bad_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"lr must be in \[0.0, inf\)"):
        SpectralAdam(p, lr=-1.0)
    with pytest.raises(ValueError, match=r"eps must be in \[0.0, inf\)"):
        SpectralAdam(p, eps=-1e-8)
    with pytest.raises(ValueError, match=r"weight_decay must be in"):
        SpectralAdam(p, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0.0, 1.0\)"):
        SpectralAdam(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0.0, 1.0\)"):
        SpectralAdam(p, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="mode must be one of"):
        SpectralAdam(p, mode="euclid")
    with pytest.raises(ValueError, match="retraction must be one of"):
        SpectralAdam(p, retraction="svd")
    with pytest.raises(ValueError, match="lr must be in"):
        SpectralAdam([{"params": p, "lr": -3.0}])
    sphere = geoopt.ManifoldParameter(torch.tensor([1.0, 0.0]), manifold=geoopt.Sphere())
    with pytest.raises(TypeError, match="Stiefel.*Sphere"):
        SpectralAdam([sphere])
    with pytest.raises(ValueError, match="fused and foreach"):
        SpectralAdam(p, fused=True, foreach=True)


def test_geoopt_stiefel_parameters_are_retracted_too():
    for manifold in (geoopt.EuclideanStiefel(), geoopt.CanonicalStiefel()):
        p = geoopt.ManifoldParameter(manifold.random(20, 4), manifold=manifold)
        opt = SpectralAdam([p], lr=0.1)
        p.grad = torch.randn(20, 4)
        opt.step()
        assert orthonormality_error(p) < 1e-5


def test_retract_all_module_and_iterable():
    model = _mlp(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s_before = model[0].s.detach().clone()
    u_before = model[0].U.detach().clone()
    assert retract_all(model) == 4
    assert torch.equal(model[0].s, s_before)
    assert torch.allclose(model[0].U, qr_retraction(u_before), atol=1e-6)
    for p in (model[0].U, model[0].V, model[2].U, model[2].V):
        assert orthonormality_error(p) < 1e-5
    assert retract_all([model[0].U, torch.zeros(3)], retraction="cholqr2") == 1
    with pytest.raises(ValueError, match="retraction must be one of"):
        retract_all(model, retraction="polar")
    with pytest.raises(TypeError, match="nn.Module or an iterable"):
        retract_all(3)


def _fit_sine(model, opt, steps, after_step=None):
    """Full-batch regression of sin on a fixed random batch; returns (first, last) loss."""
    x = torch.randn(64, 32)
    return fit(model, opt, x, torch.sin(x[:, :8]), steps, after_step)


def test_any_optimizer_plus_retract_all_trains():
    model = _mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first, last = _fit_sine(model, opt, 200, after_step=lambda: retract_all(model))
    assert last < 0.7 * first
    assert orthonormality_error(model[0].U) < 1e-5


def test_geoopt_riemannian_adam_trains_spectral_linear():
    model = _mlp(0)
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-2)
    first, last = _fit_sine(model, opt, 200)
    assert last < 0.5 * first
    assert orthonormality_error(model[0].U) < 1e-5


def test_tiny_mlp_learns_sine():
    model, x, y = sine_mlp()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    _, last = fit(model, opt, x, y, 1500)
    assert last < 1e-3  # a constant predictor scores ~0.5
    assert orthonormality_error(model[2].U) < 1e-5


def test_bf16_factors_train_without_nan():
    model = _mlp(0).to(torch.bfloat16)
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16)
    for _ in range(20):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert orthonormality_error(model[0].U) <= 1e-2


def test_fused_path_handles_params_and_grads_with_different_strides():
    # torch's fused CPU kernel pairs elements by storage offset; a column-major parameter with a
    # row-major gradient must still get the right update.
    base = torch.randn(6, 40, dtype=torch.float64)
    col_major = base.mT.clone(memory_format=torch.preserve_format).requires_grad_()
    assert not col_major.is_contiguous()
    row_major = base.mT.contiguous().requires_grad_()
    a = SpectralAdam([col_major], lr=1e-2, fused=True)
    b = SpectralAdam([row_major], lr=1e-2, foreach=True)
    _train(a, [col_major], 5)
    _train(b, [row_major], 5)
    assert torch.allclose(col_major, row_major, atol=1e-12)


@pytest.mark.parametrize("retraction", ["qr", "cholqr2"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_every_backend_and_layout_matches_householder_recipe(retraction, contiguous):
    factors, s = _factor_set(dtype=torch.float32)
    ref = [p.detach().clone() for p in factors]
    opt = SpectralAdam(factors + [s], lr=1e-2, retraction=retraction, contiguous_factors=contiguous)
    ref_opt = torch.optim.Adam([r.requires_grad_() for r in ref], lr=1e-2)
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(10):
        for p in factors:
            p.grad = torch.randn(p.shape, generator=gen_a)
        s.grad = torch.zeros_like(s)
        for r in ref:
            r.grad = torch.randn(r.shape, generator=gen_b)
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            for r in ref:
                r.copy_(qr_retraction(r))
    for p, r in zip(factors, ref):
        assert (p - r).abs().max() <= 1e-5
        assert orthonormality_error(p) <= 2e-6


def test_factor_bank_keeps_parameters_and_survives_rehoming():
    model = nn.Sequential(SpectralLinear(40, 40, 6), SpectralLinear(40, 40, 6), SpectralLinear(40, 40, 6))
    ids = [id(p) for p in model.parameters()]
    opt = SpectralAdam(model.parameters(), lr=1e-2, retraction="cholqr2")
    x = torch.randn(8, 40)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert [id(p) for p in model.parameters()] == ids
    assert all(isinstance(p, geoopt.ManifoldParameter) for n, p in model.named_parameters() if n[-1] in "UV")
    # all six factors share one buffer
    storages = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if n[-1] in "UV"}
    assert len(storages) == 1
    model.double()  # re-homes every parameter: the optimizer must notice and rebuild its banks
    for state in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            state[k] = state[k].double()
    x = x.double()
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float64
        if n[-1] in "UV":
            assert orthonormality_error(p) < 1e-12


@pytest.mark.parametrize("k", [6, 48])  # below and at the rank where one pass is a triangular solve (Intel CPUs)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_banks_batched_one_pass_equals_retracting_chunk_by_chunk(monkeypatch, k, dtype):
    """FactorBank.retract_ (the k x k work of every chunk at once) gives bitwise the factors of
    retract_chunk_ run chunk by chunk, certified chunks and a chunk that needs more passes alike."""
    from stiefel_sct import manifold
    from stiefel_sct.bank import FactorBank
    from stiefel_sct.manifold import one_pass_factors

    monkeypatch.setattr(manifold, "_intel_cpu", lambda: True)  # the triangular solve on any machine

    gen = torch.Generator().manual_seed(4)
    base = [qr_retraction(torch.randn(64, k, generator=gen, dtype=dtype)) for _ in range(7)]
    steps = [0.3 / k * torch.randn(64, k, generator=gen, dtype=dtype) for _ in base]  # about one step off
    steps[5] = steps[5] * 60  # far off the manifold: its chunk is not certified for one pass
    banks = []
    for _ in range(2):
        params = [(b + s).clone() for b, s in zip(base, steps)]
        banks.append((FactorBank(params, chunk_bytes=2 * params[0].numel() * params[0].element_size()), params))
    (batched, got), (loose, want) = banks
    assert batched.batches("cholqr2") and len(batched.chunks) == 4
    grams = torch.cat([batched.gram(j) for j in range(4)])
    assert one_pass_factors(grams).certified == [True] * 5 + [False] + [True]
    batched.retract_("cholqr2")
    for j in range(4):
        loose.retract_chunk_(j, "cholqr2")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert max(orthonormality_error(g) for g in got) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert not FactorBank([b.bfloat16() for b in base]).batches("cholqr2") and not batched.batches("qr")


def test_bank_with_a_factor_without_gradient():
    a, b, c = (SpectralLinear(30, 30, 4) for _ in range(3))
    opt = SpectralAdam(list(a.parameters()) + list(b.parameters()) + list(c.parameters()), lr=1e-2, retraction="cholqr2")
    x = torch.randn(5, 30)
    (a(x).sum() + b(x).sum() + c(x).sum()).backward()
    opt.step()
    frozen_u = c.U.detach().clone()
    opt.zero_grad()
    (a(x).sum() + b(x).sum()).backward()  # c gets no gradient this step
    opt.step()
    assert torch.equal(c.U, frozen_u)
    assert orthonormality_error(a.U) < 1e-5 and orthonormality_error(b.V) < 1e-5


@pytest.mark.parametrize("retraction", ["qr", "cholqr2"])
def test_step_in_backward_equals_a_normal_step(retraction):
    def make():
        torch.manual_seed(3)
        return nn.Sequential(SpectralLinear(24, 24, 4), nn.Tanh(), SpectralLinear(24, 24, 4), nn.Tanh(), nn.Linear(24, 3))

    data = [(torch.randn(8, 24), torch.randn(8, 3)) for _ in range(6)]
    a, b = make(), make()
    opt_a = SpectralAdam(a.parameters(), lr=1e-2, weight_decay=0.01, retraction=retraction)
    opt_b = SpectralAdam(b.parameters(), lr=1e-2, weight_decay=0.01, retraction=retraction, step_in_backward=True)
    for x, y in data:
        opt_a.zero_grad()
        F.mse_loss(a(x), y).backward()
        opt_a.step()
        F.mse_loss(b(x), y).backward()
        assert all(p.grad is None for p in b.parameters())  # updated and freed during backward
        opt_b.step()  # the batched retraction
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa - pb).abs().max() <= 1e-6
    assert orthonormality_error(b[2].V) < 1e-5


def test_step_in_backward_rejects_bad_gradients_and_modes():
    layer = SpectralLinear(6, 5, 2)
    _opt = SpectralAdam(layer.parameters(), step_in_backward=True)  # its hooks update during backward
    before = layer.s.detach().clone()
    layer.s.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(FloatingPointError, match="param_groups\\[0\\]\\['params'\\]\\[1\\]"):
        layer(torch.randn(3, 6)).sum().backward()
    assert torch.equal(layer.s, before)
    with pytest.raises(ValueError, match="step_in_backward supports mode='sct' only"):
        SpectralAdam(SpectralLinear(6, 5, 2).parameters(), mode="riemannian", step_in_backward=True)


def test_step_in_backward_updates_in_bounded_batches():
    """Gradients are batched up to the chunk size (one Adam call per batch), the last batch when
    backward() ends; a NaN anywhere in a batch leaves every parameter of that batch unchanged,
    and the next backward starts clean."""

    def make():
        torch.manual_seed(5)
        return nn.Sequential(*[SpectralLinear(16, 16, 4) for _ in range(4)])

    model, ref = make(), make()
    x = torch.randn(8, 16)
    calls = []
    limit = 2 * 16 * 4 * 4  # bytes of two U or V gradients
    opt = SpectralAdam(model.parameters(), lr=1e-2, step_in_backward=True)
    opt.backward.batch_bytes = limit
    opt.backward.on_update = lambda params: calls.append([p.numel() * 4 for p in params])
    n_params = len(list(model.parameters()))
    model(x).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())  # every batch flushed by the end of backward
    assert sum(map(len, calls)) == n_params and 1 < len(calls) < n_params  # batched
    assert all(sum(batch[:-1]) < limit for batch in calls)  # a batch is flushed once it reaches the limit
    opt.step()
    opt_ref = SpectralAdam(ref.parameters(), lr=1e-2)
    ref(x).square().mean().backward()
    opt_ref.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert (a - b).abs().max() <= 1e-6

    opt.backward.batch_bytes = 1 << 30  # one batch per backward
    before = [p.detach().clone() for p in model.parameters()]
    handle = model[2].s.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(FloatingPointError, match="no parameter of its batch was changed"):
        model(x).square().mean().backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    handle.remove()
    for p in model.parameters():
        p.grad = None
    calls.clear()
    model(x).square().mean().backward()  # the failed pass left nothing queued or batched behind
    assert len(calls) == 1 and len(calls[0]) == n_params and all(p.grad is None for p in model.parameters())
    opt.step()


def test_bf16_optimizer_state_halves_memory_and_trains():
    model = _mlp(0)
    opt = SpectralAdam(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    first, last = _fit_sine(model, opt, 150)
    assert last < 0.5 * first
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert orthonormality_error(model[0].U) < 1e-5
    with pytest.raises(TypeError, match="state_dtype"):
        SpectralAdam(model.parameters(), state_dtype=torch.int8)
