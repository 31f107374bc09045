import pytest
import torch
from torch import nn

from stiefel_sct import SpectralLinear, densify, match_module, orthonormality_error, spectralize


class Block(nn.Module):
    def __init__(self, d=64, ffn=128):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, ffn)
        self.down_proj = nn.Linear(ffn, d)
        self.tiny = nn.Linear(d, 2)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(self.q_proj(x) + self.k_proj(x)))) + self.tiny(x).sum(-1, keepdim=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, SpectralLinear))}


def test_match_module_peft_semantics():
    name = "model.layers.0.self_attn.q_proj"
    assert match_module(name, ["q_proj"])
    assert match_module(name, ["self_attn.q_proj"])
    assert match_module(name, [name])
    assert not match_module(name, ["proj"])  # suffix must start at a dot
    assert not match_module(name, ["attn.q"])
    assert match_module(name, r".*\.q_proj")
    assert not match_module(name, r"q_proj")  # a regex must match the whole name
    assert match_module(name, r"model\.layers\.\d+\.self_attn\.(q|k)_proj")


def test_default_converts_every_profitable_linear():
    model = Net()
    spectralize(model, rank=10)
    kinds = _kinds(model)
    assert kinds["layers.0.q_proj"] == "SpectralLinear"
    assert kinds["layers.1.down_proj"] == "SpectralLinear"
    assert kinds["layers.0.tiny"] == "Linear"  # rank 10 > min(64, 2)
    assert kinds["head"] == "Linear"  # 10 * (64 + 10 + 1) = 750 >= 64 * 10: would grow
    assert model.layers[0].up_proj.rank == 10
    model = spectralize(Net(), rank=8)
    assert isinstance(model.head, SpectralLinear)  # 8 * 75 = 600 < 640


def test_include_and_exclude():
    model = spectralize(Net(), rank=8, include=["q_proj", "up_proj"], exclude=["layers.1.up_proj"])
    kinds = _kinds(model)
    assert kinds["layers.0.q_proj"] == kinds["layers.1.q_proj"] == kinds["layers.0.up_proj"] == "SpectralLinear"
    assert kinds["layers.1.up_proj"] == kinds["layers.0.k_proj"] == kinds["layers.0.down_proj"] == "Linear"
    model = spectralize(Net(), rank=8, include=r"layers\.\d\.(k|down)_proj")
    kinds = _kinds(model)
    assert kinds["layers.0.k_proj"] == kinds["layers.1.down_proj"] == "SpectralLinear"
    assert kinds["layers.0.q_proj"] == "Linear"


def test_convert_small_clamps_rank():
    model = spectralize(Net(), rank=16, convert_small=True)
    assert isinstance(model.layers[0].tiny, SpectralLinear) and model.layers[0].tiny.rank == 2
    assert isinstance(model.head, SpectralLinear) and model.head.rank == 10


def test_full_rank_conversion_preserves_function_and_densify_inverts():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(5, 64)
    ref = model(x)
    spectralize(model, rank=64, convert_small=True)
    assert all(isinstance(m, SpectralLinear) for n, m in model.named_modules() if n.endswith("proj"))
    assert torch.allclose(model(x), ref, atol=1e-4)
    densify(model)
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    assert torch.allclose(model(x), ref, atol=1e-4)


def test_energy_conversion_and_bare_linear():
    lin = nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 4) @ torch.randn(4, 128))  # rank 4
    sl = spectralize(lin, energy=0.999)
    assert isinstance(sl, SpectralLinear) and sl.rank == 4
    assert torch.allclose(sl.dense_weight(), lin.weight, atol=1e-4)
    assert isinstance(densify(sl), nn.Linear)


def test_meta_model_converts_without_materialising():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8192, 28672), nn.SiLU(), nn.Linear(28672, 8192))
    spectralize(model, rank=32)
    assert model[0].U.is_meta
    model.to_empty(device="cpu")
    for m in (model[0], model[2]):
        m.reset_parameters()
        assert orthonormality_error(m.U) < 1e-5 and orthonormality_error(m.V) < 1e-5
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8192, 28672), nn.SiLU(), nn.Linear(28672, 8192))
    spectralize(model, rank=32, device="cpu")  # materialised straight away, only the factors
    assert model[0].U.device.type == "cpu" and orthonormality_error(model[2].V) < 1e-5
    assert sum(p.numel() for p in model.parameters()) == 2 * (32 * (8192 + 28672 + 1)) + 28672 + 8192
    with pytest.raises(ValueError, match="meta device"):
        with torch.device("meta"):
            spectralize(nn.Linear(64, 64), energy=0.9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of rank, energy or budget"):
        spectralize(Net())
    with pytest.raises(ValueError, match="exactly one of rank, energy or budget"):
        spectralize(Net(), rank=4, energy=0.5)
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        spectralize(Net(), energy=1.5)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        spectralize(Net(), rank=0)
    with pytest.raises(ValueError, match="include is not a valid regular expression"):
        spectralize(Net(), rank=4, include="(")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        spectralize("model", rank=4)


def test_tied_weights_left_dense_unless_included():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.emb.weight

    with pytest.warns(UserWarning, match="tied"):
        model = spectralize(Tied(), rank=4)
    assert isinstance(model.body, SpectralLinear) and type(model.head) is nn.Linear
    model = spectralize(Tied(), rank=4, include=["head"])
    assert isinstance(model.head, SpectralLinear)


def test_hugging_face_llama_forward_and_generate_after_conversion():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    spectralize(model, rank=64, convert_small=True, exclude=["lm_head"])
    names = [n for n, m in model.named_modules() if isinstance(m, SpectralLinear)]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-3)  # full rank: the same function

    spectralize(densify(model), rank=8, include=["gate_proj", "up_proj", "down_proj"])
    assert isinstance(model.model.layers[0].mlp.gate_proj, SpectralLinear)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    gen = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 9)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[1].mlp.down_proj.U.grad is not None


def test_spectralize_embeddings_on_meta_llama():
    transformers = pytest.importorskip("transformers")
    from stiefel_sct import SpectralEmbedding

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    spectralize(model, rank=8, embeddings=True, device="cpu")
    assert isinstance(model.model.embed_tokens, SpectralEmbedding)
    assert isinstance(model.lm_head, SpectralLinear)
    assert not any(p.is_meta for n, p in model.named_parameters() if "norm" not in n)
