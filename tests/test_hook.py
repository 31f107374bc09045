"""stiefel_retraction: any torch optimizer keeps the Stiefel factors on the manifold."""

import copy
import warnings

import pytest
import torch
from conftest import fit, sine_mlp
from torch import nn

from stiefel_sct import SpectralAdam, orthonormality_error, retract_all, stiefel_retraction


def _mlp(seed=0):
    return sine_mlp(seed)[0]


def _fit_sine(model, opt, steps):
    _, x, y = sine_mlp()
    return fit(model, opt, x, y, steps)


def _bnb_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    return lambda params: bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01, min_8bit_size=0)


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2, weight_decay=0.01),
    "bnb-adamw8bit": None,  # resolved in the test: bitsandbytes is an extra
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_any_optimizer_trains_the_sine_mlp_on_the_manifold(name):
    make = OPTIMIZERS[name] or _bnb_adamw8bit()
    model = _mlp()
    opt = make(model.parameters())
    handle = stiefel_retraction(opt)
    assert {id(p) for p in handle.factors} == {id(model[2].U), id(model[2].V)}
    first, last = _fit_sine(model, opt, 1000)
    assert last < 0.05 * first
    assert max(orthonormality_error(model[2].U), orthonormality_error(model[2].V)) <= 1e-5
    if name == "bnb-adamw8bit":  # the 8-bit state really is 8-bit
        assert opt.state[model[2].U]["state1"].dtype == torch.uint8


def test_factors_leave_weight_decay_and_keep_their_state():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _fit_sine(model, opt, 2)
    state_u = opt.state[model[2].U]["exp_avg"]
    handle = stiefel_retraction(opt)
    assert handle.split_groups == 1 and len(opt.param_groups) == 2
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(model[2].U), id(model[2].V)]
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["lr"] == 1e-2
    assert opt.state[model[2].U]["exp_avg"] is state_u


def test_the_result_equals_the_optimizer_plus_retract_all():
    a, b = _mlp(), _mlp()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9), torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    stiefel_retraction(opt_a)
    x = torch.randn(16, 1)
    for _ in range(5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        retract_all(b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_remove_stops_the_retraction():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = stiefel_retraction(opt)
    handle.remove()
    model(torch.randn(8, 1)).pow(2).mean().backward()
    opt.step()
    assert orthonormality_error(model[2].U) > 1e-3


def test_a_scheduler_already_attached_warns_and_leaves_the_groups():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 10)
    with pytest.warns(UserWarning, match="scheduler"):
        stiefel_retraction(opt)
    assert len(opt.param_groups) == 1


def test_factor_only_groups_get_zero_decay_in_place():
    model = _mlp()
    factors = [model[2].U, model[2].V]
    rest = [p for p in model.parameters() if all(p is not f for f in factors)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": factors}], weight_decay=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stiefel_retraction(opt).split_groups == 0
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match="SpectralAdam retracts"):
        stiefel_retraction(SpectralAdam(model.parameters()))
    with pytest.raises(ValueError, match="retraction must be one of"):
        stiefel_retraction(torch.optim.SGD(model.parameters(), lr=0.1), retraction="svd")
    with pytest.raises(TypeError, match="optimizer must be"):
        stiefel_retraction(model)
    with pytest.warns(UserWarning, match="no geoopt Stiefel factor"):
        stiefel_retraction(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="exclude_from_weight_decay"):
        stiefel_retraction(torch.optim.SGD(model.parameters(), lr=0.1), exclude_from_weight_decay=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stiefel_retraction(opt)
    assert copy.deepcopy(opt)._optimizer_step_post_hooks == {}  # documented: hooks do not copy
