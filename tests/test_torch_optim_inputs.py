"""SpectralAdam held to torch's own optimizer inputs: the ``Adam`` entry of
``torch.testing._internal.common_optimizers`` (its inputs and its error inputs, verbatim), run
through our versions of the categories of torch's ``test/test_optim.py`` (which the wheel does not
ship): going the right direction, for-loop vs foreach vs fused, LR schedulers, tensor ``lr``, no-op
steps, state-dict round trips (deterministic, ``weights_only``, non-tensor steps, named params,
Adam/AdamW dicts), deepcopy, hooks, param-group settings, printing, errors.

Each test runs on plain parameters (where SpectralAdam must *be* torch's Adam) and, where it
applies, on Stiefel factors (where it must be Adam followed by the QR retraction).
"""

import copy
import io
import math
import pickle

import geoopt
import pytest
import torch

from stiefel_sct import SpectralAdam, SpectralAdamW, Stiefel, orthonormality_error, qr_retraction

try:  # torch's internal test database: an internal API that needs ``expecttest``; guarded
    from torch.testing._internal import common_optimizers as _torch_db
except Exception:  # pragma: no cover - depends on the torch build and test extras
    _torch_db = None

# The Adam entry's inputs as torch 2.13 lists them for CPU; used when the database is not
# importable, and checked against it when it is (test_our_input_list_is_torchs).
_OWN_INPUTS = [
    ({}, "default"),
    ({"lr": 0.01}, "non-default lr"),
    ({"weight_decay": 0.1}, "nonzero weight_decay"),
    ({"weight_decay": 0.1, "maximize": True}, "maximize"),
    ({"weight_decay": 0.1, "amsgrad": True}, "amsgrad"),
]
_CLIQUEY = ("foreach", "differentiable", "fused")  # torch adds each flag to every input, one at a time


def _adam_info():
    return next(o for o in _torch_db.optim_db if o.optim_cls is torch.optim.Adam)


def _torch_inputs():
    """Every CPU input torch's suite runs Adam with, including the global flags, as (kwargs, desc)."""
    if _torch_db is None:
        out = []
        for kwargs, desc in _OWN_INPUTS:
            base = dict(kwargs, **{f: False for f in _CLIQUEY})
            out.append((base, desc))
            out += [(dict(base, **{f: True}), f"{desc} & {f}") for f in _CLIQUEY]
        return out
    inputs = _torch_db._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, _adam_info())
    return [(i.kwargs, i.desc) for i in inputs]


INPUTS = _torch_inputs()
IDS = [desc for _, desc in INPUTS]
RUNNABLE = [(k, d) for k, d in INPUTS if not k.get("differentiable") and not k.get("capturable")]
RUNNABLE_IDS = [d for _, d in RUNNABLE]


def _params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, dtype=dtype, generator=gen).requires_grad_(),
            torch.randn(11, dtype=dtype, generator=gen).requires_grad_()]


def _factors(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = Stiefel()
    return [geoopt.ManifoldParameter(m.random(n, k, dtype=dtype), manifold=m) for n, k in ((30, 4), (30, 4), (20, 3))]


def _grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def _sign_fixed_qr_(params):
    with torch.no_grad():
        for p in params:
            p.copy_(qr_retraction(p))


def test_our_input_list_is_torchs():
    if _torch_db is None:
        pytest.skip("torch.testing._internal.common_optimizers is not importable here")
    theirs = [(i.kwargs, i.desc) for i in _adam_info().optim_inputs_func(device="cpu")]
    assert theirs == _OWN_INPUTS
    assert set(_adam_info().supported_impls) == set(_CLIQUEY)


# ------------------------------------------------------------------------------------------ errors
def _error_inputs():
    if _torch_db is None:
        return []
    return list(_adam_info().optim_error_inputs_func(device="cpu", dtype=torch.float32))


@pytest.mark.skipif(_torch_db is None, reason="torch's optimizer database is not importable")
@pytest.mark.parametrize("index", range(len(_error_inputs())))
def test_torch_error_inputs_raise_torchs_error(index):
    """torch's error inputs for Adam, verbatim: the same exception type at the same time
    (construction or step), matching torch's own regex (torch's ``test_errors`` uses
    ``assertRaisesRegex``); where our message says more, it follows torch's."""
    err = _error_inputs()[index]
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.randn(3, requires_grad=True)]
    if err.error_on == _torch_db.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                SpectralAdam(params, **inp.kwargs)
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                SpectralAdam(params, **inp.kwargs)
    else:
        opt = SpectralAdam(params, **inp.kwargs)
        with pytest.raises(err.error_type, match=err.error_regex):
            opt.step()


@pytest.mark.parametrize("kwargs, theirs, ours", [
    (dict(lr=-0.5), "Invalid learning rate: -0.5", "lr must be in [0.0, inf), got -0.5"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08", "eps must be in [0.0, inf), got -1e-08"),
    (dict(betas=(1.0, 0.5)), "Invalid beta parameter at index 0: 1.0", "betas[0] must be in [0.0, 1.0), got 1.0"),
    (dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5", "betas[1] must be in [0.0, 1.0), got 1.5"),
    (dict(weight_decay=-1), "Invalid weight_decay value: -1", "weight_decay must be in [0.0, inf), got -1.0"),
])
def test_range_errors_say_torchs_words_then_ours(kwargs, theirs, ours):
    with pytest.raises(ValueError) as torch_info:
        torch.optim.Adam(_params(), **kwargs)
    assert str(torch_info.value) == theirs  # the wording we promise to keep is torch's own
    with pytest.raises(ValueError) as info:
        SpectralAdam(_params(), **kwargs)
    assert str(info.value) == f"{theirs} ({ours})"


def test_fused_on_meta_parameters_raises_at_step_in_torchs_words():
    """torch's ``test_fused_error_on_params_on_meta``: building on meta parameters works, the step
    raises torch's message; once the model is materialised, the same optimizer steps."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    opt = SpectralAdam(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be in"),
        (dict(betas=(1.0, 0.5)), r"betas\[0\] must be in"),
        (dict(betas=(0.9, torch.tensor(0.99))), "both floats or both Tensors"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
        (dict(lr=torch.tensor(1e-3), foreach=True), "lr as a Tensor is not supported"),
        (dict(eps=-1e-8), "eps must be in"),
        (dict(weight_decay=-1), "weight_decay must be in"),
        (dict(stabilize=10), "stabilize applies to mode='riemannian'"),
        (dict(mode="riemannian", stabilize=0), "stabilize must be None or an int"),
        (dict(foreach=True, fused=True), "fused and foreach"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralAdam(_params(), **kwargs)


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_unsupported_flags_raise_not_implemented_with_the_reason(flag):
    with pytest.raises(NotImplementedError, match=flag):
        SpectralAdam(_params(), **{flag: True})
    SpectralAdam(_params(), **{flag: False})  # Adam's default value is accepted verbatim


def test_unknown_group_keys_raise_and_leave_the_optimizer_unchanged():
    params = _params()
    with pytest.raises(ValueError, match="unknown param-group key.*momentum"):
        SpectralAdam([{"params": params, "momentum": 0.9}])
    opt = SpectralAdam(params[:1])
    with pytest.raises(ValueError, match="nesterov"):
        opt.add_param_group({"params": params[1:], "nesterov": True})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:], "initial_lr": 1e-3})  # what LR schedulers write is fine


def test_complex_parameters_are_refused_with_the_workaround():
    with pytest.raises(TypeError, match="complex.*view_as_real"):
        SpectralAdam([torch.randn(3, dtype=torch.complex64, requires_grad=True)])


# ------------------------------------------------------------------------------ the step itself
@pytest.mark.parametrize("kwargs, desc", INPUTS, ids=IDS)
def test_every_adam_input_verbatim_equals_torch_adam_on_plain_parameters(kwargs, desc):
    ours, ref = _params(), _params()
    if kwargs.get("differentiable") or kwargs.get("capturable"):
        with pytest.raises(NotImplementedError):
            SpectralAdam(ours, **kwargs)
        return
    opt, ref_opt = SpectralAdam(ours, **kwargs), torch.optim.Adam(ref, **kwargs)
    grads = _grads(ours, 12)
    _run(opt, ours, grads)
    _run(ref_opt, ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for key, value in ref_opt.state[b].items():
            torch.testing.assert_close(opt.state[a][key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, desc", RUNNABLE, ids=RUNNABLE_IDS)
def test_every_adam_input_on_factors_is_adam_then_qr(kwargs, desc):
    """Factors: the same Adam update (maximize, amsgrad included, no weight decay), then the
    retraction; the reference is torch's Adam plus one sign-fixed QR per matrix."""
    ours, ref = _factors(), [p.detach().clone().requires_grad_() for p in _factors()]
    opt = SpectralAdam(ours, **kwargs)
    ref_opt = torch.optim.Adam(ref, **dict(kwargs, weight_decay=0.0))
    for gs in _grads(ours, 10):
        for p, q, g in zip(ours, ref, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        _sign_fixed_qr_(ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-10)
        assert orthonormality_error(a) < 1e-12


@pytest.mark.parametrize("kwargs, desc", RUNNABLE, ids=RUNNABLE_IDS)
def test_forloop_goes_right_direction(kwargs, desc):
    """torch's test: a convex function decreases (with ``maximize``, its negation is what the
    gradient comes from, so it decreases too)."""
    torch.manual_seed(0)
    weight = torch.randn(10, 5, requires_grad=True)
    bias = torch.randn(10, requires_grad=True)
    x = torch.randn(5)
    opt = SpectralAdam([weight, bias], **dict(kwargs, lr=kwargs.get("lr", 1e-3)))
    sign = -1.0 if kwargs.get("maximize") else 1.0

    def convex():
        return (weight.mv(x) + bias).pow(2).sum()

    first = float(convex().detach())
    for _ in range(5):
        opt.zero_grad()
        (sign * convex()).backward()
        opt.step()
    assert float(convex().detach()) < first


@pytest.mark.parametrize("impl", [dict(foreach=True), dict(fused=True)], ids=["foreach", "fused"])
@pytest.mark.parametrize("kwargs, desc", _OWN_INPUTS, ids=[d for _, d in _OWN_INPUTS])
def test_foreach_and_fused_match_forloop(impl, kwargs, desc):
    params = [_params(torch.float32) + _factors(torch.float32) for _ in range(2)]
    opts = [SpectralAdam(params[0], foreach=False, **kwargs), SpectralAdam(params[1], **impl, **kwargs)]
    grads = _grads(params[0], 8)
    for opt, ps in zip(opts, params):
        _run(opt, ps, grads)
    for a, b in zip(*params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_param_group_with_lrscheduler_goes_right_direction():
    torch.manual_seed(0)
    weight, bias = torch.randn(10, 5, requires_grad=True), torch.randn(10, requires_grad=True)
    factor = _factors(torch.float32)[0]
    x = torch.randn(5)
    opt = SpectralAdam([{"params": [weight]}, {"params": [bias, factor], "lr": 1e-2}], lr=1e-2)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5),
                  torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1)]
    first = float((weight.mv(x) + bias).pow(2).sum().detach())
    for _ in range(6):
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum() + (factor[:5, :1].squeeze() * x).sum()
        loss.backward()
        opt.step()
        schedulers[0].step()
        schedulers[1].step(float(loss.detach()))
    assert float((weight.mv(x) + bias).pow(2).sum().detach()) < first
    assert opt.param_groups[0]["lr"] < 1e-2 and "initial_lr" in opt.param_groups[0]
    assert orthonormality_error(factor) < 1e-5


def test_tensor_lr_is_kept_and_read_at_every_step():
    ours, ref = _params(), _params()
    lr = torch.tensor(0.01)
    opt, ref_opt = SpectralAdam(ours, lr=lr, fused=True), torch.optim.Adam(ref, lr=torch.tensor(0.01), fused=True)
    assert opt.param_groups[0]["lr"] is lr
    grads = _grads(ours, 6)
    _run(opt, ours, grads[:3])
    _run(ref_opt, ref, grads[:3])
    lr.fill_(0.05)  # changing the tensor in place changes the step, as in torch
    ref_opt.param_groups[0]["lr"].fill_(0.05)
    _run(opt, ours, grads[3:])
    _run(ref_opt, ref, grads[3:])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_step_is_noop_when_params_have_no_grad_and_for_zero_grads():
    params = _params() + _factors()
    before = [p.detach().clone() for p in params]
    opt = SpectralAdam(params, lr=0.1)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and len(opt.state) == 0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for a, b in zip(params, before):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-14)  # factors: retraction of an orthonormal matrix


def test_optimizer_can_be_printed():
    text = repr(SpectralAdam(_params(), lr=0.01, amsgrad=True))
    assert "SpectralAdam" in text and "amsgrad: True" in text and "retraction: cholqr2" in text


# ---------------------------------------------------------------------------------- state dicts
def _two_runs(make, steps=4, more=4, through=None):
    """Train ``steps``, save, load into a fresh optimizer over copies, then ``more`` steps on both:
    the two must stay bitwise equal."""
    params = _params() + _factors()
    opt = make(params)
    grads = _grads(params, steps + more)
    _run(opt, params, grads[:steps])
    copies = [p.detach().clone().requires_grad_() if type(p) is torch.Tensor
              else geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold) for p in params]
    sd = copy.deepcopy(opt.state_dict())  # as torch's test: a state dict shares the live tensors
    if through is not None:
        sd = through(sd)
    opt2 = make(copies)
    opt2.load_state_dict(sd)
    _run(opt, params, grads[steps:])
    _run(opt2, copies, grads[steps:])
    for a, b in zip(params, copies):
        assert torch.equal(a.detach(), b.detach())
    return opt, opt2


@pytest.mark.parametrize("kwargs, desc", RUNNABLE, ids=RUNNABLE_IDS)
def test_state_dict_deterministic(kwargs, desc):
    _two_runs(lambda ps: SpectralAdam(ps, **kwargs))


def test_save_load_equality_with_weights_only():
    def roundtrip(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    _two_runs(lambda ps: SpectralAdam(ps, lr=0.01, amsgrad=True, state_dtype=torch.bfloat16), through=roundtrip)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "8bit"])
def test_low_precision_state_survives_save_and_load(state_dtype):
    opt, opt2 = _two_runs(lambda ps: SpectralAdam(ps, lr=0.01, state_dtype=state_dtype))
    for state in opt2.state.values():
        assert state["exp_avg"].dtype == state_dtype and state["exp_avg_sq"].dtype == state_dtype
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_nontensor_step():
    def plain_steps(sd):
        for st in sd["state"].values():
            st["step"] = int(st["step"])
        return sd

    _, opt2 = _two_runs(lambda ps: SpectralAdam(ps, lr=0.01), through=plain_steps)
    assert all(torch.is_tensor(s["step"]) for s in opt2.state.values())


@pytest.mark.parametrize("torch_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_resume_from_a_torch_adam_checkpoint(torch_cls):
    """The first thing a user switching optimizers mid-run does: load Adam/AdamW's state dict.
    Its settings are kept (AdamW's decoupled decay), ours take this optimizer's defaults, and the
    next steps equal torch's on the Euclidean parameters."""
    params, ref = _params(), _params()
    torch_opt = torch_cls(params, lr=0.01, weight_decay=0.1)
    grads = _grads(params, 8)
    _run(torch_opt, params, grads[:4])
    ref = [p.detach().clone().requires_grad_() for p in params]  # torch's own run continues on copies
    ref_opt = torch_cls(ref, lr=0.01, weight_decay=0.1)
    ref_opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    opt = SpectralAdam(params, state_dtype=None, retraction="qr")
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    group = opt.param_groups[0]
    assert group["decoupled_weight_decay"] is (torch_cls is torch.optim.AdamW)
    assert group["mode"] == "sct" and group["retraction"] == "qr"
    _run(opt, params, grads[4:])
    _run(ref_opt, ref, grads[4:])
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_bad_state_dict_changes_nothing():
    params = _params()
    opt = SpectralAdam(params, lr=0.01)
    _run(opt, params, _grads(params, 2))
    before = copy.deepcopy(opt.state_dict())
    bad = torch.optim.SGD(params, lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], before["state"][i][k]) for i in before["state"] for k in before["state"][i])


def test_can_load_from_to_named_state_dict():
    named = [("w", _params()[0]), ("b", _params()[1])]
    opt = SpectralAdam(named, lr=0.01)
    _run(opt, [p for _, p in named], _grads([p for _, p in named], 2))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["w", "b"]
    SpectralAdam(named, lr=0.01).load_state_dict(sd)


# ------------------------------------------------------------------------------- copies, hooks
@pytest.mark.parametrize("options", [dict(), dict(state_dtype=torch.bfloat16, check_finite=False, foreach=False),
                                     dict(contiguous_factors=False, amsgrad=True)], ids=["default", "bf16", "loose"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_then_step_equals_the_original_step(options, how):
    params = _params() + _factors()
    opt = SpectralAdam(params, lr=0.01, **options)
    grads = _grads(params, 4)
    _run(opt, params, grads[:2])
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for key in ("check_finite", "contiguous_factors", "step_in_backward", "defaults"):
        assert getattr(twin, key) == getattr(opt, key)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(params, twin_params))
    _run(opt, params, grads[2:])
    _run(twin, twin_params, grads[2:])
    for a, b in zip(params, twin_params):
        assert torch.equal(a.detach(), b.detach())


def test_deepcopy_of_a_step_in_backward_optimizer_hooks_its_own_parameters():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = SpectralAdam(layer.parameters(), lr=0.01, step_in_backward=True)
    twin = copy.deepcopy(opt)
    w = twin.param_groups[0]["params"][0]
    (w.sum()).backward()
    assert w.grad is None and int(twin.state[w]["step"]) == 1  # updated inside backward, by the copy
    assert len(opt.state) == 0


def test_step_hooks_and_state_dict_hooks_run():
    params = _params()
    opt = SpectralAdam(params, lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    handle = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load") or sd)
    _run(opt, params, _grads(params, 1))
    handle.remove()
    _run(opt, params, _grads(params, 1))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "pre", "sd", "load"]


def test_param_groups_weight_decay_and_lr():
    ours, ref = _params(), _params()
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.3, "lr": 0.05}, {"params": ps[1:], "maximize": True}]
    opt, ref_opt = SpectralAdam(groups(ours), lr=0.01), torch.optim.Adam(groups(ref), lr=0.01)
    grads = _grads(ours, 5)
    _run(opt, ours, grads)
    _run(ref_opt, ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fused_on_meta_parameters_raises_at_step_not_construction():
    params = [torch.empty(4, 3, device="meta", requires_grad=True)]
    opt = SpectralAdam(params, fused=True)  # built before to_empty(), as torch allows
    params[0].grad = torch.empty(4, 3, device="meta")
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.step()


def test_spectral_adamw_is_adamw():
    ours, ref = _params(), _params()
    opt, ref_opt = SpectralAdamW(ours, lr=0.01), torch.optim.AdamW(ref, lr=0.01)
    grads = _grads(ours, 6)
    _run(opt, ours, grads)
    _run(ref_opt, ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="decouple"):
        SpectralAdamW(_params(), decoupled_weight_decay=False)


def test_torch_amsgrad_keeps_the_max_in_riemannian_mode_too():
    """geoopt's amsgrad: the running max of <g, g> normalises; it never decreases."""
    factors = _factors()
    opt = SpectralAdam(factors, lr=0.01, mode="riemannian", amsgrad=True)
    prev = None
    for gs in _grads(factors, 6):
        for p, g in zip(factors, gs):
            p.grad = g * (0.1 if prev is not None else 1.0)
        opt.step()
        cur = [opt.state[p]["max_exp_avg_sq"].clone() for p in factors]
        if prev is not None:
            assert all(bool((c >= q).all()) for c, q in zip(cur, prev))
        prev = cur
    assert max(orthonormality_error(p) for p in factors) < 1e-12
    assert math.isfinite(float(sum(p.detach().sum() for p in factors)))
