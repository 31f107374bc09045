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


@pytest.mark.parametrize("method", ft.METHODS)
def test_each_method_builds_trains_and_counts_its_parameters(method):
    cfg = _cfg()
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    linear = ft.linear_params(model)
    per_rank = sum(m.in_features + m.out_features for _, m in _linear(model))
    model, opt, info = ft.build_method(method, model, cfg, 1e-3)
    trainable = ft.trainable(model)
    if method in ("dense", "galore"):
        assert trainable == total
    elif method == "lora_match":
        assert trainable == info["lora_r"] * per_rank and info["lora_r"] == ft.lora_rank_matching(tiny_llama(), linear // 2)
    elif method == "lora_r16":
        assert trainable == 16 * per_rank
    elif method in ("sct_b50", "sct_b25", "lowrank", "sct_adapt"):
        fraction = cfg.adapt_start if method == "sct_adapt" else cfg.budgets.get(method, 0.5)
        assert sum(p.numel() for p in model.parameters()) <= total - linear + fraction * linear
        if method != "lowrank":
            assert any(isinstance(m, SpectralLinear) for m in model.modules())
    ids = torch.randint(0, 96, (2, 9))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    ft.lm_loss(model, ids).backward()
    opt.step()
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_adaptive_arm_grows_its_ranks_within_the_budget():
    cfg = _cfg(adapt_events=2, adapt_grow=3)
    model = tiny_llama()
    budget = int(cfg.adapt_budget * ft.linear_params(model))
    model, opt, info = ft.build_method("sct_adapt", model, cfg, 1e-3)
    assert info["rank_budget"] == budget
    sched = ft.adaptive_scheduler(opt, cfg, 6, info)
    assert info["every"] == 2 and sched.budget == budget
    before = ft.adaptive_summary(model, sched)
    for _ in range(6):
        opt.zero_grad()
        ft.lm_loss(model, torch.randint(0, 96, (2, 9))).backward()
        opt.step()
        sched.step()
    after = ft.adaptive_summary(model, sched)
    assert before["spectral_params_after"] < after["spectral_params_after"] <= budget
    assert [e["step"] for e in after["events"]] == [2, 4, 6] and all(e["grown"] > 0 for e in after["events"][:1])
    assert set(after["ranks_by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_resume_keeps_runs_when_only_methods_or_new_settings_differ():
    old = {"steps": 100, "methods": ["dense"], "lrs": {"dense": [1e-4]}, "budgets": {"sct_b50": 0.5}}
    new = {"steps": 100, "methods": ["dense", "sct_adapt"], "lrs": {"dense": [1e-4], "sct_adapt": [1e-3]},
           "budgets": {"sct_b50": 0.5}, "adapt_grow": 24}
    assert ft.resumable(old, new)
    assert not ft.resumable({**old, "steps": 99}, new)
    assert not ft.resumable({**old, "lrs": {"dense": [3e-4]}}, new)


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

    metrics = ft.main(["--preset", "smoke", "--results-dir", str(tmp_path / "results")])
    saved = json.loads((tmp_path / "results" / "finetune_smollm2.json").read_text())
    assert set(saved["metrics"]["table"]) == {"reference/dense/main", "reference/sct/main"} | {
        f"compare/{m}/main" for m in ft.METHODS}
    for key, row in metrics["table"].items():
        assert row["train_peak_mb"] > 0 and row["val_loss_after"] > 0, key
        if key.startswith("compare/"):
            assert row["saved_bytes"] > 0 and row["tokens_per_s"] > 0
    lines = report.finetune_section(saved, tmp_path / "figures", "figures")
    text = "\n".join(lines)
    assert "Stage `reference`" in text and "| `sct_b50` |" in text and "| `galore` |" in text
    assert (tmp_path / "figures" / "finetune_smollm2.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["sct_b25_factors", "sct_b50_factors"])
def test_factors_only_sct_arm_trains_exactly_the_spectral_factors(method):
    """The ``_factors`` arms: the SCT arm's conversion, then only U, s and V train (the embedding,
    tied to the head, and the norms stay frozen, as under LoRA)."""
    from stiefel_sct.layers import SpectralModule

    model, opt, info = ft.build_method(method, tiny_llama(), _cfg(), 1e-3)
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
