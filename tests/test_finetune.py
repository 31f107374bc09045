"""experiments/finetune_smollm2.py: each method's code path, its parameter counts, the budget
arithmetic, and the smoke preset end to end into the report."""

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("galore_torch")

from test_checkpoint import tiny_llama  # noqa: E402

from experiments import finetune_smollm2 as ft  # noqa: E402
from stiefel_sct import SpectralLinear, match_module  # noqa: E402


def _cfg(**kw):
    return ft.Config(**{**ft.PRESETS["smoke"], "preset": "smoke", **kw})


def _linear(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and match_module(n, ft.LINEAR)]


def test_lora_rank_matches_the_target_parameters():
    model = tiny_llama()
    per_rank = sum(m.in_features + m.out_features for _, m in _linear(model))
    assert ft.lora_rank_matching(model, 7 * per_rank) == 7
    assert ft.lora_rank_matching(model, 1) == 1


# the token blob's training stream (whitened arms calibrate on it) and its general text past the
# evaluation windows (the knowledge-preserving arm calibrates on that)
DATA = {"train": torch.randint(0, 96, (400,)), "general_calib": torch.randint(0, 96, (400,))}


@pytest.mark.parametrize("method", ft.METHODS)
def test_each_method_builds_trains_and_counts_its_parameters(method):
    cfg = _cfg()
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    linear = ft.linear_params(model)
    per_rank = sum(m.in_features + m.out_features for _, m in _linear(model))
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model, opt, info = ft.build_method(method, model, cfg, 1e-3, data=DATA)
    trainable = ft.trainable(model)
    if method in ("dense", "galore"):
        assert trainable == total
    elif method == "lora_match":
        assert trainable == info["lora_r"] * per_rank and info["lora_r"] == ft.lora_rank_matching(tiny_llama(), linear // 2)
    elif method in ("lora_r16", "pissa_r16"):
        assert trainable == 16 * per_rank
    elif method in ("sct_b50", "sct_b25", "lowrank", "sct_adapt", "sct_fadapt", "sct_sadapt", "sct_w50", "sct_w25",
                    "sct_w50_kd", "sct_w25_kd", "sct_f50", "sct_f25"):
        fraction = cfg.adapt_start if method.endswith("adapt") else (0.25 if "25" in method else 0.5)
        assert sum(p.numel() for p in model.parameters()) <= total - linear + fraction * linear
        if method != "lowrank":
            assert any(isinstance(m, SpectralLinear) for m in model.modules())
    elif method in ("residual_r16", "residual_f16", "residual_k16", "residual_c16"):
        # a part alone trains, and the function is the pretrained one
        layers = [m for m in model.modules() if isinstance(m, SpectralLinear)]
        assert layers and all(m.residual is not None and m.rank == cfg.residual_r for m in layers)
        assert trainable == sum(m.rank * (m.in_features + m.out_features + 1) for m in layers)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-4)
    if method in ("pissa_r16",):  # PiSSA also starts at the pretrained function
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-4)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    ft.lm_loss(model, ids).backward()
    opt.step()
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("method", ["sct_adapt", "sct_fadapt", "sct_sadapt"])
def test_adaptive_arm_grows_its_ranks_within_the_budget(method):
    cfg = _cfg(adapt_events=2, adapt_grow=3)
    model = tiny_llama()
    budget = int(cfg.adapt_budget * ft.linear_params(model))
    model, opt, info = ft.build_method(method, model, cfg, 1e-3, data=DATA)
    assert info["rank_budget"] == budget
    assert ("calibration" in info) == (method != "sct_adapt")  # sct_fadapt, sct_sadapt: from the Fisher conversion
    sched = ft.adaptive_scheduler(method, opt, cfg, 6, info)
    assert info["every"] == 2 and sched.budget == budget
    before = ft.adaptive_summary(model, sched)
    for _ in range(6):
        opt.zero_grad()
        ft.lm_loss(model, torch.randint(0, 96, (2, 9))).backward()
        opt.step()
        sched.step()
    after = ft.adaptive_summary(model, sched)
    assert before["spectral_params_after"] < after["spectral_params_after"] <= budget
    # events that changed a rank (with newborn_rate a full budget and surviving newborns change none)
    assert [e["step"] for e in after["events"]][:1] == [2] and {e["step"] for e in after["events"]} <= {2, 4, 6}
    assert after["events"][0]["grown"] > 0
    if method == "sct_sadapt":  # the pretrained directions, at full strength: the budget fills at the first event
        assert info["growth"] == "source" and "_source" not in info and info["newborn_rate"] is None
        assert after["spectral_params_after"] > 0.9 * budget
        assert after["events"][0]["grown"] >= 0.9 * sum(e["grown"] for e in after["events"])
    else:
        assert info["growth"] == "gradient" and info["newborn_rate"] == 0.5
    assert set(after["ranks_by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("method", ["residual_adapt", "residual_sadapt"])
def test_residual_adaptive_arm_moves_rank_within_residual_r16s_budget_and_keeps_the_function(method):
    cfg = _cfg(adapt_events=2, residual_r=4, radapt_start=2, radapt_grow=2, radapt_tol=0.0, rsadapt_grow=3)
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 9))
    model, opt, info = ft.build_method(method, model, cfg, 1e-3, data=DATA)
    layers = [m for _, m in ft.spectral_layers(model)]
    assert all(m.rank == 2 for m in layers)
    assert info["rank_budget"] == sum(4 * (m.in_features + m.out_features + 1) for m in layers)
    sched = ft.adaptive_scheduler(method, opt, cfg, 6, info)
    assert sched.grace == cfg.radapt_grace and sched.budget == info["rank_budget"]
    assert (sched.growth, sched.grow) == (("source", 3) if method == "residual_sadapt" else ("factors", 2))
    for _ in range(6):
        opt.zero_grad()
        ft.lm_loss(model, ids).backward()
        opt.step()
        with torch.no_grad():
            before = model(input_ids=ids).logits
        sched.step()
        with torch.no_grad():  # a rank event moves directions, it does not change the function
            assert (model(input_ids=ids).logits - before).abs().max() <= 1e-5 * before.abs().max()
    after = ft.adaptive_summary(model, sched)
    assert after["spectral_params_after"] <= info["rank_budget"] and any(m.rank > 2 for m in layers)
    assert after["survival"] and after["survival"][0]["grown"] > 0


def test_resume_keeps_runs_when_only_methods_or_new_settings_differ():
    old = {"steps": 100, "methods": ["dense"], "lrs": {"dense": [1e-4]}, "budgets": {"sct_b50": 0.5}}
    new = {"steps": 100, "methods": ["dense", "sct_adapt"], "lrs": {"dense": [1e-4], "sct_adapt": [1e-3]},
           "budgets": {"sct_b50": 0.5}, "adapt_grow": 24}
    assert ft.resumable(old, new)
    assert not ft.resumable({**old, "steps": 99}, new)
    assert not ft.resumable({**old, "budgets": {"sct_b50": 0.4}}, new)
    assert ft.resumable({**old, "lrs": {"dense": [3e-5, 1e-4]}}, new)  # sweep runs are kept by their lr


def test_reference_arm_keeps_the_reference_truncation_even_when_larger():
    model = tiny_llama()
    model, opt, info = ft.reference_arm("sct", model, 5e-4)
    assert info["mlp_compression"] > 0 and info["ranks_min"] >= 1
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("embed_tokens" in n for n in frozen) and any("self_attn" in n for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "norm" in n or ".mlp." in n)
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_reference_samples_use_the_alpaca_template():
    docs = [("hamlet", "\n".join(f"line number {i} of the play, long enough" for i in range(40)))]
    samples = ft.reference_samples(docs, 3)
    assert len(samples) == 3 and all("### Instruction:\nContinue the passage from hamlet." in s for s in samples)


@pytest.mark.slow
def test_smoke_preset_end_to_end_into_the_report(tmp_path):
    from paper import build as report

    # the dense, budgeted, whitened and adaptive arms through the driver and into the report (every
    # method builds and trains in test_each_method_builds_trains_and_counts_its_parameters): each
    # run is a fresh interpreter (~10 s here), so all sixteen would cost the suite two minutes more
    methods = ["dense", "sct_b50", "sct_w50", "sct_adapt"]
    metrics = ft.main(["--preset", "smoke", "--methods", *methods, "--results-dir", str(tmp_path / "results")])
    saved = json.loads((tmp_path / "results" / "finetune_smollm2.json").read_text())
    assert set(saved["metrics"]["table"]) == {"reference/dense/main", "reference/sct/main"} | {
        f"compare/{m}/main" for m in methods}
    for key, row in metrics["table"].items():
        assert row["train_peak_mb"] > 0 and row["val_loss_after"] > 0, key
        if key.startswith("compare/"):
            assert row["saved_bytes"] > 0 and row["tokens_per_s"] > 0
    lines = report.finetune_section(saved, tmp_path / "figures", "figures")
    text = "\n".join(lines)
    assert "Stage `reference`" in text and "| `sct_b50` |" in text and "| `sct_adapt` |" in text
    curve = saved["metrics"]["table"]["compare/sct_adapt/main"]["adaptive"]["ranks_by_type_curve"]
    assert curve[0]["step"] == 0 and "`sct_adapt`: mean rank of each layer type over training" in text
    assert (tmp_path / "figures" / "finetune_smollm2.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["sct_b25_factors", "sct_b50_factors"])
def test_factors_only_sct_arm_trains_exactly_the_spectral_factors(method):
    """The ``_factors`` arms: the SCT arm's conversion, then only U, s and V train (the embedding,
    tied to the head, and the norms stay frozen, as under LoRA)."""
    from stiefel_sct.layers import SpectralModule

    model, opt, info = ft.build_method(method, tiny_llama(), _cfg(), 1e-3, data=DATA)
    spectral = {id(p) for m in model.modules() if isinstance(m, SpectralModule) for p in m.parameters()}
    assert spectral and info["converted_layers"] > 0
    assert {id(p) for p in model.parameters() if p.requires_grad} == spectral
    assert {id(p) for g in opt.param_groups for p in g["params"]} == spectral
    emb = model.get_input_embeddings().weight.detach().clone()
    ft.lm_loss(model, torch.randint(0, 96, (2, 9))).backward()
    assert model.get_input_embeddings().weight.grad is None
    opt.step()
    assert torch.equal(model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize("method", ["sct_b10", "sct_b10_factors", "lora_r16_factors"])
def test_unknown_methods_are_rejected_by_name(method):
    with pytest.raises(ValueError, match="method must be one of"):
        ft.build_method(method, tiny_llama(), _cfg(), 1e-3)


def test_distillation_loss_and_the_healing_mix():
    from experiments.common import distill_loss

    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert float(distill_loss(a, a, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(a, b, 2.0)) > 0
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(a, b, 0.0)
    model, teacher = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 96, (2, 9))
    plain = float(ft.lm_loss(model, ids))
    assert float(ft.healing_loss(model, teacher, ids, _cfg(distill_alpha=0.0))) == pytest.approx(plain, rel=1e-6)
    # the student equal to its teacher: only the cross-entropy half remains
    assert float(ft.healing_loss(model, model, ids, _cfg(distill_alpha=0.5))) == pytest.approx(0.5 * plain, rel=1e-5)


def test_whitened_arms_calibrate_on_the_training_stream_and_convert_once(tmp_path):
    with pytest.raises(ValueError, match="calibration data"):
        ft.build_method("sct_w50", tiny_llama(), _cfg(), 1e-3)
    data = {**DATA, "cache_dir": str(tmp_path)}
    first, _, info = ft.build_method("sct_w50", tiny_llama(), _cfg(), 1e-3, data=data)
    again, _, cached = ft.build_method("sct_w50_kd", tiny_llama(), _cfg(), 1e-3, data=data)  # the same conversion
    assert "conversion_cached" not in info and cached["conversion_cached"] and cached["convert_s"] == info["convert_s"]
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, again(input_ids=ids).logits)
    assert len(ft.calibration_batches(_cfg(calib_tokens=64, seq=16), DATA)) == 1
