"""SpectralConfig: one checked recipe for spectralize, equal to its keywords, saved verbatim in a
checkpoint and read back; bad recipes are refused by name."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from stiefel_sct import SpectralConfig, load_spectral, save_spectral, spectralize
from stiefel_sct.checkpoint import CONFIG_NAME, CheckpointError, read_recipe


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


@pytest.mark.parametrize("recipe", [
    dict(rank=4), dict(energy=0.9, include=["0", "2"]), dict(budget=1500, retraction="cholqr2"),
    dict(budget_fraction=0.5, exclude="4"), dict(rank=3, residual_dtype=torch.float32),
])
def test_a_config_and_its_keywords_convert_alike(recipe):
    by_keywords = spectralize(_model(), **recipe)
    config = SpectralConfig(**recipe)
    for by_config in (spectralize(_model(), config), spectralize(_model(), config=config)):
        assert by_config.spectral_config == by_keywords.spectral_config == config
        assert [r.rank for r in by_config.spectral_report] == [r.rank for r in by_keywords.spectral_report]
        for a, b in zip(by_config.state_dict().values(), by_keywords.state_dict().values()):
            assert torch.equal(a, b)


def test_budget_fraction_is_the_budget_of_that_fraction_of_the_selected_layers():
    model = _model()
    selected = [model[0], model[2]]
    dense = sum(m.weight.numel() for m in selected)
    budget = sum(p.numel() for p in model.parameters()) - dense + int(0.4 * dense)
    by_count = spectralize(_model(), budget=budget, include=["0", "2"])
    by_fraction = spectralize(_model(), budget_fraction=0.4, include=["0", "2"])
    assert [r.rank for r in by_fraction.spectral_report] == [r.rank for r in by_count.spectral_report]
    assert sum(p.numel() for p in by_fraction.parameters()) <= budget


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "give exactly one of rank, energy, budget or budget_fraction"),
    (dict(rank=2, energy=0.5), ValueError, "got rank, energy"),
    (dict(rank=0), ValueError, "rank must be an int >= 1"),
    (dict(rank=True), ValueError, "rank must be an int >= 1"),
    (dict(energy=1.5), ValueError, "energy"),
    (dict(budget=0), ValueError, "budget must be an int >= 1"),
    (dict(budget_fraction=0.0), ValueError, r"budget_fraction must be a float in \(0, 1\]"),
    (dict(rank=2, include="("), ValueError, "include is not a valid regular expression"),
    (dict(rank=2, exclude=[1]), TypeError, "exclude must be a regex string or a list"),
    (dict(rank=2, embeddings=1), TypeError, "embeddings must be a bool"),
    (dict(rank=2, retraction="svd"), ValueError, "retraction must be one of"),
    (dict(rank=2, damping=-1.0), ValueError, "damping"),
    (dict(rank=2, residual_dtype="int8"), ValueError, "residual_dtype must be one of"),
    (dict(rank=2, residual_dtype="float32", embeddings=True), ValueError, "residual mode converts linear layers only"),
    (dict(rank=2, allow_dense=True), ValueError, "allow_dense lets a budget keep a layer whole: give budget"),
    (dict(budget_fraction=0.5, allow_dense=1), TypeError, "allow_dense must be a bool"),
    (dict(budget_fraction=0.5, allow_dense=True, residual_dtype="float32"), ValueError,
     "allow_dense would leave a layer dense and wholly trainable"),
    (dict(budget=10**6, allow_dense=True, convert_small=True), ValueError, "allow_dense keeps layers dense that "
                                                                           "convert_small would convert"),
])
def test_bad_recipes_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpectralConfig(**kwargs)


def test_json_round_trip_and_normalised_fields():
    config = SpectralConfig(rank=3, include=("q_proj", "v_proj"), residual_dtype=torch.bfloat16)
    assert config.include == ["q_proj", "v_proj"] and config.residual_dtype == "bfloat16"
    assert config.residual_torch_dtype is torch.bfloat16
    again = SpectralConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown SpectralConfig field"):
        SpectralConfig.from_dict({**config.to_dict(), "lora_alpha": 16})
    with pytest.raises(TypeError, match="data must be a dict"):
        SpectralConfig.from_dict([("rank", 3)])
    # a recipe saved before allow_dense existed reads back without it
    old = SpectralConfig(budget_fraction=0.5).to_dict()
    del old["allow_dense"]
    assert SpectralConfig.from_dict(old).allow_dense is False
    assert SpectralConfig.from_dict(SpectralConfig(budget_fraction=0.5, allow_dense=True).to_dict()).allow_dense


def test_a_config_with_recipe_keywords_is_refused():
    config = SpectralConfig(rank=2)
    with pytest.raises(TypeError, match="got a config and the recipe keyword.s. energy, convert_small"):
        spectralize(_model(), config, energy=0.5, convert_small=True)
    with pytest.raises(TypeError, match="two configs"):
        spectralize(_model(), config, config=config)
    with pytest.raises(TypeError, match="config must be a SpectralConfig"):
        spectralize(_model(), config={"rank": 2})
    model = spectralize(_model(), dataclasses.replace(config, rank=5))
    assert model.spectral_config.rank == 5


def test_report_true_still_returns_the_report_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="spectral_report"):
        model, report = spectralize(_model(), rank=4, report=True)
    assert report is model.spectral_report and [r.rank for r in report] == [4, 4, 4]


def test_the_recipe_is_saved_verbatim_and_read_back(tmp_path):
    model = spectralize(_model(), budget_fraction=0.5, include=["0", "2"], retraction="cholqr2")
    save_spectral(model, tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    assert saved["recipe"] == model.spectral_config.to_dict()
    assert read_recipe(tmp_path / "ck") == model.spectral_config
    loaded = load_spectral(_model(seed=1), tmp_path / "ck")
    assert loaded.spectral_config == model.spectral_config
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    # a model whose layers were built by hand has no recipe: saved as null, nothing put back
    save_spectral(_model(), tmp_path / "dense")
    assert read_recipe(tmp_path / "dense") is None


def test_a_damaged_recipe_is_refused_naming_the_file_and_the_model_is_untouched(tmp_path):
    save_spectral(spectralize(_model(), rank=4), tmp_path / "ck")
    path = tmp_path / "ck" / CONFIG_NAME
    saved = json.loads(path.read_text())
    saved["recipe"]["rank"] = -1
    path.write_text(json.dumps(saved))
    target = _model(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"spectral_config.json: recipe is not a valid SpectralConfig: rank must"):
        load_spectral(target, tmp_path / "ck")
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in target)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])


def test_one_parameter_formula_behind_compression_budgets_and_the_scheduler():
    from stiefel_sct import RankScheduler, SpectralAdam, SpectralLinear, spectral_params

    layer = SpectralLinear(24, 10, 3)
    assert spectral_params(24, 10, 3) == sum(p.numel() for p in (layer.U, layer.s, layer.V)) == 3 * 35
    assert layer.compression == 24 * 10 / spectral_params(24, 10, 3)
    sched = RankScheduler(SpectralAdam(nn.Sequential(layer).parameters()), grow=0)
    assert sched._cost(layer) == spectral_params(24, 10)
