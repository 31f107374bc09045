"""Conversion policies: global parameter budget, per-layer energy, never growing a layer, the report."""

import pytest
import torch
from torch import nn

from stiefel_sct import SpectralLinear, budget_ranks, kept_energy, spectralize


def _layer(m, n, decay, seed, bias=True):
    """A linear layer whose singular values decay like ``decay ** i``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    p, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    sv = decay ** torch.arange(k, dtype=torch.float32)
    layer = nn.Linear(m, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_((p * sv) @ q.T)
    return layer


def _model():
    return nn.Sequential(_layer(64, 96, 0.9, 0), nn.ReLU(), _layer(96, 48, 0.7, 1), nn.ReLU(),
                         _layer(48, 80, 0.97, 2), nn.ReLU(), _layer(80, 10, 0.5, 3))


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.8])
def test_budget_is_respected_and_filled(fraction):
    model = _model()
    dense = _n_params(model)
    budget = int(fraction * dense)
    model, report = spectralize(model, budget=budget, report=True)
    total = _n_params(model)
    assert total <= budget and report.params == total
    left = budget - total
    for r in report:
        assert r.converted and r.params < r.dense_params  # no layer grows
        m, n = r.shape[1], r.shape[0]
        below_cap = (r.rank + 1) * (m + n + 1) < m * n and r.rank < min(m, n)
        if below_cap:
            assert m + n + 1 > left  # not even one more singular triplet would have fitted


def test_budget_ranks_follow_relative_energy_per_parameter():
    # two layers of the same shape: the one with the flatter spectrum needs more rank for the same energy
    spectra = {"flat": 0.95 ** torch.arange(40.0), "steep": 0.5 ** torch.arange(40.0)}
    shapes = {"flat": (40, 60), "steep": (40, 60)}
    ranks = budget_ranks(spectra, shapes, 20 * 101)
    assert sum(k * 101 for k in ranks.values()) <= 20 * 101
    assert ranks["flat"] > ranks["steep"] >= 1
    with pytest.raises(ValueError, match="budget must be >= 202"):
        budget_ranks(spectra, shapes, 201)
    with pytest.raises(TypeError, match="budget must be an int"):
        budget_ranks(spectra, shapes, 2.5e3)


def _budget_cost(ranks, shapes):
    """Parameters of a budget_ranks outcome: a layer at min(m, n) stays dense."""
    return sum(m * n if k == min(m, n) else k * (m + n + 1) for (m, n), k in ((shapes[x], ranks[x]) for x in ranks))


def test_allow_dense_keeps_whole_a_layer_the_cap_would_cut_in_half():
    # "flat" wants every direction; at its cap (19 of 40 for 40 x 40) keeping it dense costs 21 parameters more
    spectra = {"flat": torch.ones(40), "steep": 0.6 ** torch.arange(40.0), "mid": 0.9 ** torch.arange(40.0)}
    shapes = {"flat": (40, 40), "steep": (40, 40), "mid": (40, 40)}
    budget = 1600 + 30 * 81
    capped = budget_ranks(spectra, shapes, budget)
    assert capped["flat"] == 19 and 19 * 81 < 1600 <= 20 * 81  # the largest rank that still shrinks it
    ranks = budget_ranks(spectra, shapes, budget, allow_dense=True)
    assert ranks["flat"] == 40 and _budget_cost(ranks, shapes) <= budget
    assert ranks["mid"] > capped["mid"] - 1 and ranks["steep"] >= 1  # the rest of the budget still spent greedily
    # no room for the 21 more: the layer stays at its cap
    tight = 19 * 81 + 2 * 81
    assert budget_ranks(spectra, shapes, tight, allow_dense=True)["flat"] <= 19
    with pytest.raises(TypeError, match="allow_dense must be a bool"):
        budget_ranks(spectra, shapes, budget, allow_dense=1)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_allow_dense_in_spectralize_leaves_such_layers_dense_within_the_budget(fraction):
    def model():
        return nn.Sequential(_layer(48, 48, 1.0, 0), nn.ReLU(), _layer(48, 48, 0.5, 1), nn.ReLU(),
                             _layer(48, 48, 0.8, 2))

    x = torch.randn(5, 48)
    with torch.no_grad():
        want = model()(x)
    linear = sum(m.weight.numel() for m in model() if isinstance(m, nn.Linear))
    budget = _n_params(model()) - linear + int(fraction * linear)
    plain = spectralize(model(), budget_fraction=fraction)
    kept = spectralize(model(), budget_fraction=fraction, allow_dense=True)
    assert _n_params(kept) <= budget and _n_params(plain) <= budget
    whole = [r for r in kept.spectral_report if not r.converted]
    for r in whole:
        assert r.params == r.dense_params and "the budget keeps it whole (allow_dense)" in r.note
    assert kept.spectral_config.allow_dense and not plain.spectral_config.allow_dense
    if fraction >= 0.5:  # the flat layer (every direction alike) is worth keeping whole at these budgets
        assert "0" in [r.name for r in whole] and isinstance(kept[0], nn.Linear)
        assert torch.equal(kept[0].weight, model()[0].weight)
        with torch.no_grad():  # and the whole model is closer to the original for it
            assert float((kept(x) - want).norm()) < float((plain(x) - want).norm())
    else:  # too tight to pay for it: the same ranks as without the option
        assert [r.rank for r in kept.spectral_report] == [r.rank for r in plain.spectral_report]


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_energy_threshold_is_exact_per_layer(energy):
    model = _model()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model, report = spectralize(model, energy=energy, report=True)
    for r in report:
        frac = kept_energy(torch.linalg.svdvals(weights[r.name]))
        if r.converted:
            assert frac[r.rank - 1] >= energy - 1e-6 and r.kept_energy == pytest.approx(float(frac[r.rank - 1]))
            assert r.rank == 1 or frac[r.rank - 2] < energy
        else:  # the rank that energy needs would not shrink the layer
            k = int((frac >= energy - 1e-6).nonzero()[0]) + 1
            m, n = r.shape[1], r.shape[0]
            assert k * (m + n + 1) >= m * n and r.params == r.dense_params


def test_no_layer_grows_and_full_energy_does_not_crash():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    model, report = spectralize(model, energy=1.0, report=True)
    assert all(not r.converted and "would not shrink" in r.note for r in report)
    assert all(type(m) is nn.Linear for m in model)
    text = str(report)
    assert "0 of 2 candidate layers converted" in text


def test_biases_are_kept_and_full_rank_reproduces_the_layer():
    layer = _layer(12, 9, 0.8, 5)
    x = torch.randn(4, 12)
    model, report = spectralize(nn.Sequential(layer), rank=9, convert_small=True, report=True)
    assert isinstance(model[0], SpectralLinear) and model[0].bias is not None
    assert torch.allclose(model[0](x), layer(x), atol=1e-5)
    assert report[0].kept_energy == pytest.approx(1.0)


def test_report_names_tied_and_budget_errors():
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, mid=_layer(16, 16, 0.5, 0), head=head))
    with pytest.warns(UserWarning, match="tied"):
        _, report = spectralize(model, rank=2, report=True)
    notes = {r.name: r.note for r in report}
    assert notes["head"].endswith("tied to another module") and notes["mid"] == "converted"
    with pytest.raises(ValueError, match="exactly one of rank, energy or budget"):
        spectralize(_model(), rank=4, budget=1000)
    with pytest.raises(ValueError, match="budget must exceed"):
        spectralize(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(1000)), budget=500)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="meta"):
        spectralize(meta, budget=1000)


def _close(a, b, tol):
    return (a - b).abs().max() <= tol * b.abs().max()


def test_tiny_bert_and_tiny_llama_full_rank_conversion_keeps_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64)).eval()
    ids = torch.randint(0, 100, (2, 12))
    ref = bert(input_ids=ids).last_hidden_state
    spectralize(bert, rank=32, convert_small=True)
    assert sum(isinstance(m, SpectralLinear) for m in bert.modules()) == 2 * 6 + 1  # 6 per layer + pooler
    assert _close(bert(input_ids=ids).last_hidden_state, ref, 1e-4)  # biases kept
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    ref = llama(input_ids=ids).logits
    spectralize(llama, rank=32, convert_small=True, exclude=["lm_head"])
    assert _close(llama(input_ids=ids).logits, ref, 1e-4)
