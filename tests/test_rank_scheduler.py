"""RankScheduler: growth keeps the function, shrinking removes exactly the dropped singular values,
the optimizer state follows the parameters, and nothing keeps the old tensors alive."""

import copy
import gc
import weakref

import pytest
import torch
from conftest import fit
from torch import nn

from stiefel_sct import (
    RankScheduler,
    SpectralAdam,
    SpectralEmbedding,
    SpectralLinear,
    load_optimizer_state,
    load_spectral,
    orthonormality_error,
    save_spectral,
    spectralize,
    stiefel_retraction,
)
from stiefel_sct.calibration import fisher_growth


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(SpectralLinear(12, 16, 3, dtype=dtype), nn.Tanh(), SpectralLinear(16, 6, 2, dtype=dtype))


def _data(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 12, generator=gen, dtype=dtype)
    return x, torch.sin(x[:, :6])


def _backward(model, x, y):
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_growth_keeps_the_layers_output(dtype, tol):
    model = _model(dtype)
    x, y = _data(dtype)
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    sched = RankScheduler(opt, every=1, tol=0.0, grow=2)
    _backward(model, x, y)
    opt.step()
    before = model(x).detach()
    sched.step()
    assert [m.rank for m in (model[0], model[2])] == [5, 4]
    assert (model(x).detach() - before).abs().max() <= tol * before.abs().max()
    for layer in (model[0], model[2]):
        assert layer.U.shape[1] == layer.V.shape[1] == layer.s.shape[0] == layer.rank
        assert max(orthonormality_error(layer.U), orthonormality_error(layer.V)) <= 1e-6
        assert torch.equal(layer.s[-2:], torch.zeros(2, dtype=dtype))
    assert [h["grown"] for h in sched.history] == [2, 2]


def test_shrink_removes_exactly_the_dropped_singular_values():
    model = _model(torch.float64)
    layer = model[0]
    with torch.no_grad():
        layer.s.copy_(torch.tensor([3.0, 1e-3, -2.0], dtype=torch.float64))
    before = layer.dense_weight().detach()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    sched = RankScheduler(opt, every=1, tol=0.01, grow=0)
    sched.step()
    assert layer.rank == 2 and layer.s.tolist() == [3.0, -2.0]
    change = float((layer.dense_weight().detach() - before).norm())
    assert abs(change - 1e-3) <= 1e-6 * 1e-3
    assert model[2].rank == 2  # its constant spectrum keeps every direction
    assert orthonormality_error(layer.U) <= 1e-6


def test_min_and_max_rank_and_budget_bound_the_ranks():
    model = _model()
    x, y = _data()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([1.0, 1e-9, 1e-9]))
    sched = RankScheduler(opt, every=1, tol=0.5, grow=0, min_rank=2)
    sched.step()
    assert model[0].rank == 2
    model = _model()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    cost = [12 + 16 + 1, 16 + 6 + 1]
    budget = 3 * cost[0] + 2 * cost[1] + cost[0]  # room for one more column of the first layer only
    sched = RankScheduler(opt, every=1, tol=0.0, grow=3, max_rank=4, budget=budget)
    _backward(model, x, y)
    opt.step()
    sched.step()
    total = sum(m.rank * c for m, c in zip((model[0], model[2]), cost))
    assert total <= budget and max(model[0].rank, model[2].rank) <= 4
    assert model[0].rank + model[2].rank == 6


@pytest.mark.parametrize("mode, state_dtype", [("sct", None), ("riemannian", None), ("sct", torch.uint8)],
                         ids=["sct", "riemannian", "sct-8bit"])
def test_state_surgery_equals_a_model_built_with_the_new_factors(mode, state_dtype):
    """After a change, training on equals training a fresh model holding the new factors with the
    carried state, bitwise; kept columns keep their moments, new ones start at zero."""
    model = _model()
    x, y = _data()
    opt = SpectralAdam(model.parameters(), lr=1e-2, mode=mode, state_dtype=state_dtype)
    sched = RankScheduler(opt, every=3, tol=0.05, grow=2)
    for _ in range(3):
        _backward(model, x, y)
        opt.step()
        old_m = opt.state[model[0].U]["exp_avg"].clone()
        sched.step()
    layer = model[0]
    if state_dtype is None:
        m = opt.state[layer.U]["exp_avg"]
        assert torch.equal(m[:, :3], old_m) and torch.equal(m[:, 3:], torch.zeros_like(m[:, 3:]))
    twin = copy.deepcopy(model)
    twin_opt = SpectralAdam(twin.parameters(), lr=1e-2, mode=mode, state_dtype=state_dtype)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        for mdl, o in ((model, opt), (twin, twin_opt)):
            _backward(mdl, x, y)
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_no_reference_to_the_old_tensors_survives():
    model = _model()
    x, y = _data()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    sched = RankScheduler(opt, every=1, tol=0.0, grow=1)
    _backward(model, x, y)
    opt.step()  # builds the factor banks
    refs = [weakref.ref(getattr(layer, name)) for layer in (model[0], model[2]) for name in ("U", "s", "V")]
    sched.step()
    _backward(model, x, y)
    opt.step()  # the next backward works on the new leaves
    gc.collect()
    assert all(r() is None for r in refs)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()} and set(map(id, opt.state)) == ids


def test_step_in_backward_hooks_follow_the_new_parameters():
    model = _model()
    x, y = _data()
    opt = SpectralAdam(model.parameters(), lr=1e-2, step_in_backward=True)
    with pytest.raises(ValueError, match="step_in_backward"):
        RankScheduler(opt, grow=1)
    sched = RankScheduler(opt, every=1, tol=0.5, grow=0)
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([1.0, 1e-4, 1.0]))
    sched.step()
    nn.functional.mse_loss(model(x), y).backward()
    assert model[0].U.grad is None and int(opt.state[model[0].U]["step"]) == 1  # updated in backward
    opt.step()
    assert orthonormality_error(model[0].U) <= 1e-6


def test_with_any_optimizer_and_the_retraction_hook():
    model = _model()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stiefel_retraction(opt)
    sched = RankScheduler(opt, every=5, tol=0.01, grow=1, max_rank=5)
    first, last = fit(model, opt, x, y, 40, after_step=sched.step)
    assert last < first and model[0].rank > 3
    assert orthonormality_error(model[0].U) <= 1e-5
    opt = torch.optim.Adafactor(model.parameters())
    with pytest.raises(NotImplementedError, match="row_var|col_var"):
        sched = RankScheduler(opt, every=1, tol=0.0, grow=1)
        _backward(model, x, y)
        opt.step()
        sched.step()


def test_embeddings_grow_too():
    torch.manual_seed(0)
    emb = SpectralEmbedding(30, 8, 2)
    opt = SpectralAdam(emb.parameters(), lr=1e-2)
    sched = RankScheduler(opt, every=1, tol=0.0, grow=2)
    idx = torch.randint(0, 30, (16,))
    emb(idx).pow(2).sum().backward()
    opt.step()
    before = emb(idx).detach()
    sched.step()
    assert emb.rank == 4 and (emb(idx).detach() - before).abs().max() <= 1e-6


def _twin(tmp_path, state):
    """The checkpoint ``tmp_path / "ck"`` rebuilt in a fresh dense model, its optimizer state
    loaded, and a scheduler given ``state``: (model, optimizer, scheduler)."""
    twin = load_spectral(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6)), tmp_path / "ck")
    twin_opt = SpectralAdam(twin.parameters(), lr=1e-2)
    load_optimizer_state(twin_opt, twin, tmp_path / "ck")
    twin_sched = RankScheduler(twin_opt, every=99, tol=0.9, grow=0)
    twin_sched.load_state_dict(state)
    return twin, twin_opt, twin_sched


def _train_both_equal(runs, twin_runs, steps, x, y):
    """Train both (model, optimizer, scheduler) triples ``steps`` steps; they end bitwise equal."""
    for _ in range(steps):
        for mdl, o, s in (runs, twin_runs):
            _backward(mdl, x, y)
            o.step()
            s.step()
    for a, b in zip(runs[0].parameters(), twin_runs[0].parameters()):
        assert torch.equal(a, b)
    assert twin_runs[2].history == runs[2].history


def test_checkpoint_and_scheduler_state_resume_bitwise(tmp_path):
    model = _model()
    x, y = _data()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    sched = RankScheduler(opt, every=2, tol=0.05, grow=1)
    for _ in range(4):
        _backward(model, x, y)
        opt.step()
        sched.step()
    ranks = [model[0].rank, model[2].rank]
    assert ranks != [3, 2]
    save_spectral(model, tmp_path / "ck", optimizer=opt)
    sched_state = copy.deepcopy(sched.state_dict())
    twin, twin_opt, twin_sched = _twin(tmp_path, sched_state)
    assert [twin[0].rank, twin[2].rank] == ranks
    assert twin_sched.every == 2 and twin_sched.last_step == 4
    _train_both_equal((model, opt, sched), (twin, twin_opt, twin_sched), 4, x, y)


@pytest.mark.parametrize("kwargs, match", [
    (dict(every=0), "every must be"), (dict(tol=1.0), "tol must be"), (dict(grow=-1), "grow must be"),
    (dict(min_rank=0), "min_rank must be"), (dict(min_rank=3, max_rank=2), "max_rank must be"),
    (dict(budget=0), "budget must be"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    opt = SpectralAdam(_model().parameters())
    with pytest.raises(ValueError, match=match):
        RankScheduler(opt, **kwargs)
    with pytest.raises(ValueError, match="no spectral layer"):
        RankScheduler(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be"):
        RankScheduler(_model())


def test_sharded_parameters_are_refused_clearly():
    model = _model()
    opt = SpectralAdam(model.parameters())

    class FakeShard(torch.Tensor):  # what fully_shard leaves: a tensor with a device mesh
        device_mesh = None

    opt.param_groups[0]["params"][0] = model[0].U.as_subclass(FakeShard)
    with pytest.raises(NotImplementedError, match="FSDP2"):
        RankScheduler(opt)


def test_a_full_rank_layer_does_not_drop_a_direction_and_grow_it_back():
    """Issue 27: a 6-input layer at rank 6 used to drop its smallest direction and re-grow exactly
    that direction with s = 0 and fresh moments. The only directions growth may take are
    orthogonal to every column the layer had at the event."""
    torch.manual_seed(0)
    model = nn.Sequential(SpectralLinear(6, 8, 6, dtype=torch.float64))
    layer = model[0]
    with torch.no_grad():
        layer.s.copy_(torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 1e-4], dtype=torch.float64))
    x = torch.randn(32, 6, dtype=torch.float64)
    opt = SpectralAdam(model.parameters(), lr=1e-3)
    sched = RankScheduler(opt, every=1, tol=1e-2, grow=2)
    model.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    dropped_u = layer.U.detach()[:, -1].clone()
    kept_s = layer.s.detach()[:-1].clone()
    sched.step()
    assert layer.rank == 5 and torch.equal(layer.s.detach(), kept_s)  # the drop stands, nothing grew back
    assert sched.history[-1]["grown"] == 0
    assert float((layer.U.detach().mT @ dropped_u).abs().max()) < 1e-12

    # a layer below full rank whose gradient points only at the direction it drops grows nothing either
    torch.manual_seed(1)
    model = nn.Sequential(SpectralLinear(6, 8, 3, dtype=torch.float64))
    layer = model[0]
    with torch.no_grad():
        layer.s.copy_(torch.tensor([3.0, 2.0, 1e-4], dtype=torch.float64))
    opt = SpectralAdam(model.parameters(), lr=1e-3)
    sched = RankScheduler(opt, every=1, tol=1e-2, grow=1)
    dropped_u, dropped_v = layer.U.detach()[:, 2].clone(), layer.V.detach()[:, 2].clone()
    layer.U.grad = torch.outer(dropped_u, torch.ones(3, dtype=torch.float64))
    layer.V.grad = torch.outer(dropped_v, torch.ones(3, dtype=torch.float64))
    layer.s.grad = torch.zeros(3, dtype=torch.float64)
    sched.step()
    assert layer.rank == 2 and sched.history[-1]["grown"] == 0


# ------------------------------------------------------------------------------ residual mode (issue 27)
def _residual(dtype=torch.float32, rank=3):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 12)).to(dtype)
    model = spectralize(copy.deepcopy(base), rank=rank, residual_dtype=dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("U", "s", "V"))
    return base, model


def _steps(model, opt, sched, n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 12, generator=gen, dtype=dtype)
    for _ in range(n):
        opt.zero_grad()
        (model(x) - x).square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return x


def _normal_part(layer, u, v):
    R = layer.residual.double()
    pu = torch.eye(u.shape[0], dtype=torch.float64) - u.double() @ u.double().mT
    pv = torch.eye(v.shape[0], dtype=torch.float64) - v.double() @ v.double().mT
    return pv @ R @ pu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_rank_moves_between_the_residual_and_the_factors_keep_the_function(dtype, tol):
    """A grown direction arrives from the residual with its singular value (the largest of the
    residual's part outside the bases), a dropped one goes back into the residual: the function
    does not change (1e-6 fp32, 1e-12 fp64, relative to the output)."""
    _, model = _residual(dtype)
    opt = SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = _steps(model, opt, None, 3, dtype)
    layer = model[0]
    u, v, s = layer.U.detach().clone(), layer.V.detach().clone(), layer.s.detach().clone()
    want = torch.linalg.svdvals(_normal_part(layer, u, v))[:2]
    sched = RankScheduler(opt, every=1, tol=0.0, grow=2)
    before = model(x).detach()
    _steps(model, opt, None, 0)
    sched.step()
    assert [m.rank for m in (model[0], model[2])] == [5, 5]
    assert (model(x).detach() - before).abs().max() <= tol * before.abs().max()
    assert torch.equal(layer.s.detach()[:3], s)  # kept as they were, then the residual's values
    torch.testing.assert_close(layer.s.detach()[3:].double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                               atol=0)
    assert max(orthonormality_error(layer.U), orthonormality_error(layer.V)) <= 1e-6 if dtype == torch.float32 else 1e-12
    assert layer.residual_blocks == [3, 2]
    # a shrink gives directions back to the residual, the function again unchanged
    shrink = RankScheduler(opt, every=1, tol=0.5, grow=0)
    kept_before = model(x).detach()
    shrink.step()
    assert layer.rank < 5 and layer.residual_blocks[-1] == 5 - layer.rank
    assert (model(x).detach() - kept_before).abs().max() <= tol * kept_before.abs().max()
    assert float(layer.s0[-1]) < 0  # logged as a negative piece: the direction went back


def test_a_residual_layer_does_not_grow_back_what_it_just_gave_back():
    """Growth in the same event takes only directions outside every column the layer had, so a
    dropped direction (now in the residual) is not grown back."""
    _, model = _residual(torch.float64)
    opt = SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _steps(model, opt, None, 2, torch.float64)
    layer = model[0]
    with torch.no_grad():
        layer.s[2] = 1e-9  # will be dropped
    dropped_u = layer.U.detach()[:, 2].clone()
    RankScheduler(opt, every=1, tol=1e-3, grow=1).step()
    assert layer.rank == 3 and float((layer.U.detach().mT @ dropped_u).abs().max()) < 1e-10


def test_residual_rank_moves_checkpoint_resume_and_export_bitwise(tmp_path):
    """After moves, a trained-only checkpoint rebuilds the residual by replaying the logged moves:
    the reloaded model's outputs are bitwise equal, training resumes bitwise, and the PEFT export
    still gives the trained model."""
    base, model = _residual()
    opt = SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = RankScheduler(opt, every=2, tol=0.3, grow=2)
    x = _steps(model, opt, sched, 6)
    assert len(model[0].residual_blocks) > 2  # grew and gave back
    save_spectral(model, tmp_path / "ck", optimizer=opt, trained_only=True)
    state = copy.deepcopy(sched.state_dict())
    twin = load_spectral(copy.deepcopy(base), tmp_path / "ck")
    assert twin[0].residual_blocks == model[0].residual_blocks
    assert torch.equal(twin[0].residual, model[0].residual) and torch.equal(twin(x), model(x))
    for name, p in twin.named_parameters():  # as the model was trained (requires_grad is not saved)
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("U", "s", "V"))
    twin_opt = SpectralAdam([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    load_optimizer_state(twin_opt, twin, tmp_path / "ck")
    twin_sched = RankScheduler(twin_opt)
    twin_sched.load_state_dict(state)
    _steps(model, opt, sched, 4)
    _steps(twin, twin_opt, twin_sched, 4)
    assert torch.equal(twin(x), model(x)) and twin_sched.history == sched.history
    peft = pytest.importorskip("peft")
    from stiefel_sct.export import export_peft_lora

    class Net(nn.Module):  # PEFT wants named modules
        def __init__(self, seq):
            super().__init__()
            self.up, self.act, self.down = seq[0], seq[1], seq[2]

        def forward(self, inp):
            return self.down(self.act(self.up(inp)))

    export_peft_lora(Net(model), tmp_path / "adapter")
    lora = peft.PeftModel.from_pretrained(Net(copy.deepcopy(base)), str(tmp_path / "adapter"))
    assert (lora(x) - model(x)).abs().max() < 1e-5


def test_grace_window_keeps_newborn_directions_and_survival_counts_them():
    """A direction grown at an event (s = 0) is not dropped at the next ``grace`` events; survival()
    counts, per growing event, how many the first event allowed to drop them dropped."""
    model = _model()
    x, y = _data()

    def run(grace):
        m = copy.deepcopy(model)
        opt = SpectralAdam(m.parameters(), lr=1e-4)  # too small for a newborn's s to reach tol * ||s||
        sched = RankScheduler(opt, every=1, tol=0.05, grow=1, grace=grace)
        for _ in range(4):
            _backward(m, x, y)
            opt.step()
            sched.step()
        return sched

    eager = run(0)
    assert [h["dropped_born"] for h in eager.history if h["step"] == 2] == [[1], [1]]  # the newborns, at once
    assert eager.survival()[0] == {"step": 1, "grown": 2, "dropped_next": 2}
    patient = run(2)
    assert all(h["dropped_born"] == [] for h in patient.history if h["step"] <= 3)  # protected for two events
    assert patient.survival()[0] == {"step": 1, "grown": 2, "dropped_next": 2}  # then judged, and dropped
    assert patient.survival()[-1]["dropped_next"] is None  # grown at step 4: not judged yet
    assert patient.state_dict()["grace"] == 2 and patient.state_dict()["born"] == patient.born
    with pytest.raises(ValueError, match="grace must be"):
        RankScheduler(SpectralAdam(_model().parameters()), grace=-1)


def test_newborn_rate_judges_a_grown_direction_by_its_own_growth():
    """With newborn_rate, a grown direction whose |s| kept up with rho x (the lrs since its birth)
    stays although it is far below tol * ||s||; one that stalled is dropped."""
    model = _model()
    x, y = _data()

    def run(rate, stall=False):
        m = copy.deepcopy(model)
        opt = SpectralAdam(m.parameters(), lr=1e-2)
        sched = RankScheduler(opt, every=2, tol=0.5, grow=1, newborn_rate=rate)
        for step in range(1, 5):
            _backward(m, x, y)
            opt.step()
            if stall and step == 4:
                with torch.no_grad():
                    m[0].s[-1] = 0.0  # the direction grown at step 2 did not move
            sched.step()
        return sched, m

    judged_by_tol, _ = run(None)
    assert [h["dropped_born"] for h in judged_by_tol.history if h["step"] == 4 and h["layer"] == "layer0"] == [[2]]
    growing, m = run(0.25)
    assert not any(h["dropped_born"] for h in growing.history if h["step"] == 4)
    s = m[0].s.detach()
    assert 0.25 * 2 * 1e-2 <= float(s[-2].abs()) < 0.5 * float(s.norm())  # kept on its growth alone
    stalled, _ = run(0.25, stall=True)
    assert [h["dropped_born"] for h in stalled.history if h["step"] == 4 and h["layer"] == "layer0"] == [[2]]
    state = growing.state_dict()
    assert state["newborn_rate"] == 0.25 and set(state["lr_at"]) == {2, 4}
    with pytest.raises(ValueError, match="newborn_rate must be"):
        RankScheduler(SpectralAdam(_model().parameters()), newborn_rate=0.0)


# ------------------------------------------------------------------------------ growth="gradient" (issue 27)
def _dense_gradient(layer, x, y):
    """dL/dW of the layer's dense weight for the loss of ``_backward`` on a one-layer model."""
    w = layer.dense_weight().detach().clone().requires_grad_(True)
    bias = layer.bias.detach() if layer.bias is not None else None
    nn.functional.mse_loss(nn.functional.linear(x, w, bias), y).backward()
    return w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gradient_growth_takes_a_descent_step_on_the_new_block(dtype):
    """growth="gradient": the new directions are the top singular pairs of the gradient outside the
    bases (P^T G Q diagonal), born with s > 0 along -P Q^T; the function moves by exactly
    V_new diag(s_new) U_new^T, whose length is one dense Adam step, lr sqrt(m n); the loss falls;
    each newborn's s then sees a negative gradient (the step it was chosen for continues)."""
    torch.manual_seed(0)
    layer = SpectralLinear(12, 10, 3, dtype=dtype)
    model = nn.Sequential(layer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=gen, dtype=dtype)
    y = x @ torch.randn(12, 10, generator=gen, dtype=dtype)
    lr = 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # never stepped: the event sees the sketched bases
    sched = RankScheduler(opt, every=1, tol=0.0, grow=2, growth="gradient")
    assert len(layer._forward_hooks) == 1  # armed: the next step is an event
    _backward(model, x, y)
    g = _dense_gradient(layer, x, y)
    with torch.no_grad():
        w_before, loss_before = layer.dense_weight().clone(), float(nn.functional.mse_loss(model(x), y))
    u_old, v_old = layer.U.detach().clone(), layer.V.detach().clone()
    sched.step()
    assert layer.rank == 5 and [h["grown"] for h in sched.history] == [2]
    u_new, s_new, v_new = layer.U.detach()[:, 3:], layer.s.detach()[3:], layer.V.detach()[:, 3:]
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    assert bool((s_new > 0).all())
    assert abs(float(s_new.norm()) - lr * (12 * 10) ** 0.5) <= eps * lr * 11
    change = layer.dense_weight().detach() - w_before
    torch.testing.assert_close(change, v_new @ torch.diag(s_new) @ u_new.mT, rtol=0, atol=eps * 10)
    block = v_new.mT @ g @ u_new  # -diag(sigma): the new block of the gradient is diagonal, negative
    assert bool((torch.diagonal(block) < 0).all())
    assert float((block - torch.diag(torch.diagonal(block))).abs().max()) <= 1e-3 * float(block.abs().max())
    outside = g - v_old @ (v_old.mT @ g)
    outside = outside - (outside @ u_old) @ u_old.mT
    top = torch.linalg.svdvals(outside)[:2]
    torch.testing.assert_close(-torch.diagonal(block), top, rtol=1e-3 if dtype == torch.float32 else 1e-8, atol=0)
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(x), y)) < loss_before
    assert max(orthonormality_error(layer.U), orthonormality_error(layer.V)) <= 10 * eps
    _backward(model, x, y)
    assert bool((layer.s.grad[3:] < 0).all())
    assert len(layer._forward_hooks) == 1  # every=1: armed again for the next event


@pytest.mark.parametrize("before", [6, 5], ids=["between-windows", "inside-a-window"])
def test_gradient_growth_hooks_only_in_the_sketch_window_and_resume_bitwise(tmp_path, before):
    """sketch_steps=N: the hooks are on the layers only for the N steps before each event; the
    scheduler's state carries growth, sketch_steps and a window's sums so far, and a run resumed
    from a checkpoint (between windows, or inside one) equals the uninterrupted one bitwise."""
    model = _model()
    x, y = _data()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    sched = RankScheduler(opt, every=3, tol=0.05, grow=2, growth="gradient", sketch_steps=2, newborn_rate=0.1)
    armed = []
    for _ in range(before):
        armed.append(bool(model[0]._forward_hooks))
        _backward(model, x, y)
        opt.step()
        sched.step()
    assert armed == [False, True, True, False, True, True][:before]
    assert sum(h["grown"] for h in sched.history) > 0
    save_spectral(model, tmp_path / "ck", optimizer=opt)
    state = copy.deepcopy(sched.state_dict())
    assert state["growth"] == "gradient" and state["sketch_steps"] == 2
    assert (state["sketches"]["layer0"]["backwards"] if before == 5 else state["sketches"]) == (1 if before == 5 else {})
    twin_runs = _twin(tmp_path, state)
    _train_both_equal((model, opt, sched), twin_runs, 6, x, y)
    twin = twin_runs[0]
    hooks = [len(m._forward_hooks) for m in (model[0], twin[0])]
    assert hooks == ([0, 0] if before == 6 else [1, 1])  # after 12 (11) steps: next event 3 (1) steps away


def test_gradient_growth_arguments_are_checked():
    opt = SpectralAdam(_model().parameters())
    with pytest.raises(ValueError, match="growth must be one of 'factors', 'gradient'"):
        RankScheduler(opt, growth="augmented")
    with pytest.raises(ValueError, match=r"sketch_steps must be in \[1, every=4\]"):
        RankScheduler(opt, every=4, growth="gradient", sketch_steps=5)
    with pytest.raises(ValueError, match="sketch_steps must be"):
        RankScheduler(opt, growth="gradient", sketch_steps=0)
    emb = nn.Sequential(SpectralEmbedding(10, 8, 3))
    with pytest.raises(NotImplementedError, match="SpectralEmbedding"):
        RankScheduler(SpectralAdam(emb.parameters()), growth="gradient")
    RankScheduler(SpectralAdam(emb.parameters()), growth="gradient", grow=0)  # shrink only: nothing to sketch


# ------------------------------------------------------------------------------ growth="source" (issue 27)
def _teacher_and_student(rank=2, seed=0, dtype=torch.float32):
    """A dense teacher (12 -> 16 -> 6) and its spectral copy at ``rank`` (plain SVD)."""
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6)).to(dtype)
    return dense, spectralize(copy.deepcopy(dense), rank=rank, convert_small=True)


def _weights(dense):
    return {name: m.weight.detach().clone() for name, m in dense.named_children() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_source_growth_brings_back_the_pretrained_directions_in_the_windows_fisher_metric(dtype):
    """growth="source": hooks sum each layer's input and output-gradient moments over the window;
    at the event the layer gains fisher_growth's directions toward its pretrained weight with their
    singular values (the function moves by exactly V_new diag(s_new) U_new^T, bases stay
    orthonormal), and the student moves toward the teacher: the loss falls."""
    dense, model = _teacher_and_student(dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=gen, dtype=dtype)
    y = dense(x).detach()
    opt = SpectralAdam(model.named_parameters(), lr=1e-3)
    sched = RankScheduler(opt, every=1, tol=0.0, grow=3, growth="source", source=_weights(dense))
    layer = model[2]
    assert [len(model[i]._forward_hooks) for i in (0, 2)] == [1, 1]  # armed: the next step is an event
    # the reference moments of the last layer: its input and dL/d(output), by autograd
    with torch.no_grad():
        h = model[1](model[0](x))
        before, w_before = float(nn.functional.mse_loss(model(x), y)), layer.dense_weight().clone()
    out = layer(h).requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.mse_loss(out, y), out)
    C, G = (h.mT @ h / 64).double(), (g.mT @ g / 64).double()
    u_old, v_old = layer.U.detach().clone(), layer.V.detach().clone()
    _backward(model, x, y)
    window = list(sched._sketches.values())
    sched.step()
    assert [model[0].rank, model[2].rank] == [5, 5] and [hh["grown"] for hh in sched.history] == [3, 3]
    assert all(m.inputs.numel() == 0 and m.grads.numel() == 0 for m in window)  # each freed once read
    u_new, s_new, v_new = layer.U.detach()[:, 2:], layer.s.detach()[2:], layer.V.detach()[:, 2:]
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    change = layer.dense_weight().detach() - w_before
    torch.testing.assert_close(change, v_new @ torch.diag(s_new) @ u_new.mT, rtol=0, atol=eps * 10)
    P, sigma, Q = fisher_growth(_weights(dense)["2"] - w_before, u_old, v_old, C, G, r=3).factors(3)
    torch.testing.assert_close(change.double(), P * sigma @ Q.mT, rtol=0, atol=eps * 100)
    assert bool((s_new > 0).all())
    assert max(orthonormality_error(p) for p in (model[0].U, model[0].V, layer.U, layer.V)) <= 10 * eps
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(x), y)) < 0.5 * before


def test_source_growth_under_a_budget_refits_and_resumes_bitwise_inside_a_window(tmp_path):
    """A scheduler saved inside a moments window (its sums in the state) resumes bitwise in a model
    rebuilt from the checkpoint, given the same source; the newborns survive the next event; once
    the budget is full, no window hooks the layers (nothing could grow)."""
    dense, model = _teacher_and_student(rank=1)
    source = _weights(dense)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 12, generator=gen)
    y = dense(x).detach()
    opt = SpectralAdam(model.named_parameters(), lr=1e-2)
    budget = 4 * (12 + 16 + 1) + 4 * (16 + 6 + 1)  # rank 4 each: 2 directions each at step 3, 1 at step 6
    settings = dict(every=3, tol=1e-3, grow=2, budget=budget, growth="source", sketch_steps=2, source=source)
    sched = RankScheduler(opt, **settings)
    for _ in range(5):
        _backward(model, x, y)
        opt.step()
        sched.step()
    assert [model[0].rank, model[2].rank] == [3, 3] and sched.survival()[0]["grown"] == 4
    save_spectral(model, tmp_path / "ck", optimizer=opt)
    state = copy.deepcopy(sched.state_dict())
    assert state["growth"] == "source" and state["sketches"]["0"]["backwards"] == 1 and "source" not in state
    twin = load_spectral(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6)), tmp_path / "ck")
    twin_opt = SpectralAdam(twin.named_parameters(), lr=1e-2)
    load_optimizer_state(twin_opt, twin, tmp_path / "ck")
    twin_sched = RankScheduler(twin_opt, every=99, tol=0.9, grow=0, growth="source", source=source)
    twin_sched.load_state_dict(state)
    _train_both_equal((model, opt, sched), (twin, twin_opt, twin_sched), 1, x, y)  # step 6: the second event
    assert [model[0].rank, model[2].rank] == [4, 4] and sched.survival()[0]["dropped_next"] == 0
    hooked = []
    for _ in range(6):  # steps 7-12: the budget is full, the windows before steps 9 and 12 hook nothing
        _train_both_equal((model, opt, sched), (twin, twin_opt, twin_sched), 1, x, y)
        hooked.append(len(model[0]._forward_hooks) + len(twin[0]._forward_hooks))
    assert hooked == [0] * 6 and [model[0].rank, model[2].rank] == [4, 4]


def test_source_growth_arguments_are_checked():
    dense, model = _teacher_and_student()
    named = lambda: SpectralAdam(model.named_parameters())
    with pytest.raises(ValueError, match="growth=.source. grows each compact layer from its pretrained weight: pass source="):
        RankScheduler(named(), growth="source")
    with pytest.raises(ValueError, match="source is read only by growth='source'"):
        RankScheduler(named(), growth="gradient", source=_weights(dense))
    with pytest.raises(TypeError, match="source must be a mapping or a callable"):
        RankScheduler(named(), growth="source", source=[1, 2])
    with pytest.raises(ValueError, match=r"build the optimizer from model.named_parameters\(\)"):
        RankScheduler(SpectralAdam(model.parameters()), growth="source", source=_weights(dense))
    RankScheduler(named(), growth="source", grow=0)  # shrink only: no source needed
    x, y = _data()
    for source, error in (({"0": dense[0].weight}, "source has no weight for layer '2'"),
                          ({"0": dense[0].weight, "2": dense[2].weight.mT}, r"layer '2' must be a tensor of shape \(6, 16\)")):
        opt = named()
        sched = RankScheduler(opt, every=1, grow=1, growth="source", source=source)
        _backward(model, x, y)
        with pytest.raises(ValueError, match=error):
            sched.step()
    # a callable that returns None leaves that layer as it is
    sched = RankScheduler(named(), every=1, grow=1, tol=0.0, growth="source",
                          source=lambda name: dense[0].weight.detach() if name == "0" else None)
    _backward(model, x, y)
    sched.step()
    assert [model[0].rank, model[2].rank] == [3, 2]


def test_source_growth_budget_takes_the_directions_that_remove_the_most_loss_per_parameter():
    """Under a budget that fits only some new directions, source growth takes them one by one in the
    order of gain^2 / (m + n + 1) across layers (each layer a prefix of its own), not layer by layer."""
    dense, model = _teacher_and_student()
    source = _weights(dense)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 12, generator=gen)
    y = dense(x).detach()
    opt = SpectralAdam(model.named_parameters(), lr=1e-3)
    cost = {"0": 12 + 16 + 1, "2": 16 + 6 + 1}
    budget = 2 * cost["0"] + 2 * cost["2"] + 100  # room for 3 to 4 more directions
    sched = RankScheduler(opt, every=1, tol=0.0, grow=4, budget=budget, growth="source", source=source)
    _backward(model, x, y)
    scores = []
    for name in ("0", "2"):
        layer = model[int(name)]
        C, G = sched._sketches[name].read()
        gains = fisher_growth(source[name] - layer.dense_weight().detach(), layer.U.detach(), layer.V.detach(),
                              C, G, r=4).gains
        scores += [(float(g) ** 2 / cost[name], name, j) for j, g in enumerate(gains.tolist())]
    left, want = 100, {"0": 0, "2": 0}
    for _, name, j in sorted(scores, reverse=True):
        if cost[name] <= left and want[name] == j:
            want[name] += 1
            left -= cost[name]
    sched.step()
    assert {"0": model[0].rank - 2, "2": model[2].rank - 2} == want
    assert sum(want.values()) >= 3 and all(want.values())  # both layers served: not one layer's block first


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_residual_source_growth_moves_the_fisher_best_part_of_the_residual_keeping_the_function(dtype, tol):
    """growth="source" on residual layers (no source: the residual is what they lack): the part that
    leaves the residual for the factors is fisher_growth's best addition for the error R in the
    window's moments, with its values; the function does not change (1e-6 fp32, 1e-12 fp64)."""
    _, model = _residual(dtype)
    opt = SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = _steps(model, opt, None, 3, dtype)
    sched = RankScheduler(opt, every=1, tol=0.0, grow=2, growth="source")
    layer = model[2]
    assert [len(model[i]._forward_hooks) for i in (0, 2)] == [1, 1]  # both residual layers are in the window
    with torch.no_grad():
        h = model[1](model[0](x))
    out = layer(h).detach().requires_grad_(True)
    (g,) = torch.autograd.grad((out - x).square().mean(), out)
    C, G = (h.mT @ h / 16).double(), (g.mT @ g / 16).double()
    u_old, v_old, s_old, r_old = (t.detach().clone() for t in (layer.U, layer.V, layer.s, layer.residual))
    before = model(x).detach()
    opt.zero_grad()
    (model(x) - x).square().mean().backward()
    sched.step()
    assert [model[0].rank, model[2].rank] == [5, 5] and layer.residual_blocks == [3, 2]
    assert (model(x).detach() - before).abs().max() <= tol * before.abs().max()
    P, sigma, Q = fisher_growth(r_old, u_old, v_old, C, G, r=2).factors(2)
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close((r_old - layer.residual.detach()).double(), P * sigma @ Q.mT, rtol=0, atol=100 * eps)
    torch.testing.assert_close(layer.s.detach()[3:].double(), sigma, rtol=100 * eps, atol=0)
    assert torch.equal(layer.s.detach()[:3], s_old)
    assert max(orthonormality_error(p) for p in (layer.U, layer.V)) <= 10 * eps


def test_residual_source_growth_takes_only_values_the_next_shrink_keeps():
    """A residual layer grows only as many Fisher directions as keep every refitted value at or above
    tol * ||s|| (a weaker one would go back to the residual at the next event)."""
    _, model = _residual(torch.float64)
    opt = SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = _steps(model, opt, None, 3, torch.float64)
    layer = model[0]
    tol = 0.3
    s_old = layer.s.detach().clone()
    u_old, v_old, r_old = layer.U.detach().clone(), layer.V.detach().clone(), layer.residual.detach().clone()
    sched = RankScheduler(opt, every=1, tol=tol, grow=4, growth="source")
    opt.zero_grad()
    (model(x) - x).square().mean().backward()
    C, G = sched._sketches["layer0"].read()
    grown = fisher_growth(r_old, u_old, v_old, C, G, r=4)
    floor = tol * float(s_old[s_old.abs() >= tol * s_old.norm()].norm())
    want = max([k for k in range(grown.gains.numel() + 1) if k == 0 or float(grown.factors(k)[1].min()) >= floor])
    assert 0 < want < 4  # the floor binds here: the test would not see it otherwise
    sched.step()
    new = layer.s.detach()[layer.rank - want:]
    assert layer.residual_blocks[-1] == want and bool((new >= floor).all())


def test_residual_source_growth_arguments():
    """Residual layers need no source under growth="source" and a source no layer reads is refused;
    a compact layer still needs one."""
    _, model = _residual()
    trained = [p for p in model.parameters() if p.requires_grad]
    RankScheduler(SpectralAdam(trained), growth="source")
    with pytest.raises(ValueError, match="every scheduled layer is in residual mode .* drop source"):
        RankScheduler(SpectralAdam(trained), growth="source", source={"0": torch.zeros(20, 12)})
    _, compact = _teacher_and_student()
    with pytest.raises(ValueError, match="grows each compact layer from its pretrained weight: pass source="):
        RankScheduler(SpectralAdam(compact.named_parameters()), growth="source")


def _spread_model(dtype=torch.float64):
    """Two layers at rank 5 with known spectra: layer 0 (12 -> 16, 29 parameters a direction) and
    layer 2 (16 -> 6, 23 a direction)."""
    torch.manual_seed(0)
    model = nn.Sequential(SpectralLinear(12, 16, 5, dtype=dtype), nn.Tanh(), SpectralLinear(16, 6, 5, dtype=dtype))
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([5.0, 4.0, 3.0, 0.2, 0.1], dtype=dtype))
        model[2].s.copy_(torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6], dtype=dtype))
    return model


def test_budget_by_prunes_along_the_cubic_schedule_lowest_relative_magnitude_per_parameter_first():
    """From rank 5 each down to a budget of 3 + 2 directions' parameters by step 4: after each event
    the layers hold at most the schedule's size, the dropped directions are those with the smallest
    |s_i| / (||s|| (m + n + 1)) at that event (worked out by hand below), and each drop removes
    exactly its singular value from the weight."""
    model = _spread_model()
    cost = [12 + 16 + 1, 16 + 6 + 1]
    start = 5 * cost[0] + 5 * cost[1]  # 260
    budget = 3 * cost[0] + 2 * cost[1]  # 133
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves but the ranks
    sched = RankScheduler(opt, every=1, tol=0.0, grow=0, budget=budget, budget_by=4)
    assert sched.start_size == start
    want = [budget + int((start - budget) * (1 - min(t, 4) / 4) ** 3) for t in range(1, 6)]
    assert [sched.allowed_size(t) for t in range(1, 6)] == want == [186, 148, 134, 133, 133]
    # scores x 1e4 at step 1: layer 0 (||s|| 7.07): 5 -> 244, 4 -> 195, 3 -> 146, 0.2 -> 9.7, 0.1 -> 4.9;
    # layer 2 (||s|| 1.82): 1 -> 239, 0.9 -> 215, 0.8 -> 191, 0.7 -> 168, 0.6 -> 144. Step 1 drops
    # 0.1, 0.2, 0.6 (260 -> 179 <= 186); at step 2 layer 2's norm has fallen (0.7 -> 178) and 3 (146)
    # goes first, then 0.7 (150 -> 127 <= 148); then nothing is over the schedule
    expect = [([5.0, 4.0, 3.0], [1.0, 0.9, 0.8, 0.7]), ([5.0, 4.0], [1.0, 0.9, 0.8])] + [([5.0, 4.0], [1.0, 0.9, 0.8])] * 3
    for t in range(5):
        before = [(m.s.detach().clone(), m.dense_weight().detach()) for m in (model[0], model[2])]
        sched.step()
        assert [m.s.tolist() for m in (model[0], model[2])] == [pytest.approx(e) for e in expect[t]]
        assert model[0].rank * cost[0] + model[2].rank * cost[1] <= want[t]
        for (s_old, w_old), m in zip(before, (model[0], model[2])):
            gone = [v for v in s_old.tolist() if v not in m.s.tolist()]
            change = float((m.dense_weight().detach() - w_old).norm())
            assert abs(change - sum(v * v for v in gone) ** 0.5) <= 1e-12
            assert max(orthonormality_error(m.U), orthonormality_error(m.V)) <= 1e-12
    assert [h["dropped"] for h in sched.history] == [2, 1, 1, 1]


def test_budget_by_keeps_min_rank_and_newborns_and_gives_residual_directions_back():
    """The prune never takes a layer under min_rank; in residual mode the pruned directions go back
    into the residual and the function is unchanged (fp64, 1e-12)."""
    model = _spread_model()
    cost = [12 + 16 + 1, 16 + 6 + 1]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = RankScheduler(opt, every=1, tol=0.0, grow=0, min_rank=4, budget=cost[0] + cost[1], budget_by=1)
    sched.step()
    assert (model[0].rank, model[2].rank) == (4, 4)  # the budget is out of reach at min_rank: no lower
    _, res = _residual(torch.float64, rank=6)
    opt = SpectralAdam([p for p in res.parameters() if p.requires_grad], lr=1e-3)
    x = _steps(res, opt, None, 2, torch.float64)
    before = res(x).detach()
    per = [sum(res[i].U.shape) + 1 for i in (0, 2)]
    sched = RankScheduler(opt, every=1, tol=0.0, grow=0, budget=4 * per[0] + 4 * per[1], budget_by=1)
    sched.step()
    assert res[0].rank * per[0] + res[2].rank * per[1] <= 4 * per[0] + 4 * per[1]
    assert res[0].rank < 6 or res[2].rank < 6
    assert (res(x).detach() - before).abs().max() <= 1e-12 * before.abs().max()


def test_budget_by_resumes_bitwise_and_checks_its_arguments(tmp_path):
    model = _spread_model(torch.float32)
    x, y = _data()
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    budget = 3 * (12 + 16 + 1) + 3 * (16 + 6 + 1)
    sched = RankScheduler(opt, every=2, tol=0.0, grow=1, budget=budget, budget_by=6)
    for _ in range(2):
        _backward(model, x, y)
        opt.step()
        sched.step()
    save_spectral(model, tmp_path / "ck", optimizer=opt)
    twin = load_spectral(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6)), tmp_path / "ck")
    twin_opt = SpectralAdam(twin.parameters(), lr=1e-2)
    load_optimizer_state(twin_opt, twin, tmp_path / "ck")
    twin_sched = RankScheduler(twin_opt, every=99, tol=0.9, grow=0)
    twin_sched.load_state_dict(copy.deepcopy(sched.state_dict()))
    assert twin_sched.budget_by == 6 and twin_sched.start_size == sched.start_size == 5 * 29 + 5 * 23
    _train_both_equal((model, opt, sched), (twin, twin_opt, twin_sched), 6, x, y)
    assert model[0].rank * 29 + model[2].rank * 23 <= budget
    for kwargs, error, match in [(dict(budget_by=3), ValueError, "pass budget="),
                                 (dict(budget=100, budget_by=0), ValueError, "budget_by must be"),
                                 (dict(budget=100, budget_by=True), ValueError, "budget_by must be")]:
        with pytest.raises(error, match=match):
            RankScheduler(SpectralAdam(_model().parameters()), **kwargs)
