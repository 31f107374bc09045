"""The layer-kind table: GPT-2's ``Conv1D`` is one entry, and a real GPT-2-architecture model from
``transformers`` (random weights) converts, trains, checkpoints, reloads and densifies back to its
own architecture."""

import json

import pytest
import torch
from torch import nn

from stiefel_sct import (
    SpectralAdam,
    SpectralConv1D,
    SpectralEmbedding,
    SpectralLinear,
    densify,
    export_peft_lora,
    load_spectral,
    save_spectral,
    spectralize,
)
from stiefel_sct.checkpoint import CONFIG_NAME
from stiefel_sct.kinds import KINDS, dense_kind, kind_named, spectral_kind

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def test_the_table_names_each_kind_once_and_matches_by_exact_type():
    assert [k.name for k in KINDS] == ["linear", "embedding", "conv1d"]
    assert dense_kind(nn.Linear(3, 2)).name == "linear" and dense_kind(Conv1D(2, 3)).name == "conv1d"
    assert dense_kind(nn.Embedding(5, 3)).name == "embedding"

    class MyLinear(nn.Linear):  # a subclass (quantized, LoRA-wrapped, ...) is not ours to touch
        pass

    assert dense_kind(MyLinear(3, 2)) is None
    assert spectral_kind(SpectralConv1D(3, 2, 1)).name == "conv1d"  # not "linear", its base class
    assert spectral_kind(SpectralLinear(3, 2, 1)).name == "linear"
    assert spectral_kind(SpectralEmbedding(5, 3, 1)).name == "embedding"
    with pytest.raises(ValueError, match="layer kind must be one of"):
        kind_named("conv2d")


def test_a_conv1d_converts_to_the_same_function_and_back():
    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 5, 4)
    full = SpectralConv1D.from_conv1d(conv, rank=4)
    assert (full.in_features, full.out_features, full.rank) == (4, 6, 4)
    assert torch.allclose(full(x), conv(x), atol=1e-5)
    back = full.to_conv1d()
    assert type(back) is Conv1D and back.weight.shape == conv.weight.shape
    assert torch.allclose(back.weight, conv.weight, atol=1e-5) and torch.equal(back.bias, conv.bias)
    residual = SpectralConv1D.from_conv1d(conv, rank=1, residual_dtype=torch.float32)  # the rest kept frozen
    assert torch.allclose(residual(x), conv(x), atol=1e-5)


def test_gpt2_spectralizes_trains_reloads_and_densifies_to_its_own_architecture(tmp_path):
    model = _gpt2()
    dense_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(IDS).logits
    spectralize(model, rank=8)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, SpectralConv1D)}
    assert len(convs) == 2 * 4  # c_attn, c_proj, c_fc and mlp.c_proj in each block
    assert not any(type(m) is Conv1D for m in model.modules())
    assert {r.kind for r in model.spectral_report if r.converted} == {"conv1d"}
    row = next(r for r in model.spectral_report if r.name == "transformer.h.0.attn.c_attn")
    assert row.shape == (96, 32)  # reported as the weight V diag(s) U^T: (out, in), as for nn.Linear

    opt = SpectralAdam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(IDS).logits
    assert not torch.allclose(trained, before)

    save_spectral(model, tmp_path / "ckpt")
    kinds = {e["kind"] for e in json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())["layers"].values()}
    assert kinds == {"conv1d"}
    fresh = load_spectral(_gpt2(seed=5), tmp_path / "ckpt")
    assert sum(isinstance(m, SpectralConv1D) for m in fresh.modules()) == len(convs)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, trained)

    dense = densify(fresh)
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == dense_keys
    assert sum(type(m) is Conv1D for m in dense.modules()) == len(convs)
    with torch.no_grad():
        assert torch.allclose(dense(IDS).logits, trained, atol=1e-4)


def test_gpt2_in_residual_mode_starts_at_its_function_and_reloads_into_the_base(tmp_path):
    base = _gpt2()
    with torch.no_grad():
        before = base(IDS).logits
    model = spectralize(_gpt2(), rank=2, residual_dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, before, atol=1e-4)
    for n, p in model.named_parameters():
        p.requires_grad_(n.rpartition(".")[2] in ("U", "s", "V"))
    opt = SpectralAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    save_spectral(model, tmp_path / "ckpt", trained_only=True)
    reloaded = load_spectral(_gpt2(), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    with pytest.raises(Exception, match="base weight"):  # another base: its residual would be wrong
        load_spectral(_gpt2(seed=3), tmp_path / "ckpt")
    export_peft_lora(model, tmp_path / "lora")
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] is True  # PEFT's setting for Conv1D's (in, out) storage


def test_gpt2_calibrated_conversion_beats_plain_truncation_on_its_own_inputs():
    plain = spectralize(_gpt2(), rank=4)
    calibrated = spectralize(_gpt2(), rank=4, calibration=[{"input_ids": IDS}])
    with torch.no_grad():
        target = _gpt2()(IDS).logits
        err_plain = (plain(IDS).logits - target).norm()
        err_cal = (calibrated(IDS).logits - target).norm()
    assert sum(isinstance(m, SpectralConv1D) for m in calibrated.modules()) == 8
    assert err_cal < err_plain
