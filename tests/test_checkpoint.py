"""save_spectral / load_spectral: a spectral model (and its optimizer) saved, then rebuilt in a
dense or meta-device model of the same architecture, in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import geoopt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stiefel_sct import (
    SpectralAdam,
    SpectralEmbedding,
    SpectralLinear,
    Stiefel,
    load_optimizer_state,
    load_spectral,
    orthonormality_error,
    save_spectral,
    spectralize,
)
from stiefel_sct.checkpoint import CONFIG_NAME, CheckpointError

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama_config(bias=False, tied=False, hidden=32):
    return transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, attention_bias=bias, mlp_bias=bias,
                                    tie_word_embeddings=tied)


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config(**kw))
    return model.eval()


def _train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 96, (2, 12), generator=gen)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


IDS = torch.arange(24).view(2, 12) % 96

CASES = {
    "rank": dict(policy=dict(rank=4), embeddings=False, bias=False, tied=False),
    "energy-emb-bias": dict(policy=dict(energy=0.8), embeddings=True, bias=True, tied=False),
    "budget-emb": dict(policy="budget", embeddings=True, bias=False, tied=False),
    "rank-tied": dict(policy=dict(rank=4), embeddings=False, bias=True, tied=True),
}

RELOAD = textwrap.dedent("""
    import json, sys, torch, transformers
    from accelerate import init_empty_weights
    sys.path.insert(0, {tests!r})
    from test_checkpoint import tiny_llama_config, IDS
    from stiefel_sct import load_spectral, is_stiefel
    out = {{}}
    for name, case in json.loads({cases!r}).items():
        with init_empty_weights():  # parameters on meta, buffers (rotary frequencies) real
            model = transformers.LlamaForCausalLM(tiny_llama_config(bias=case["bias"], tied=case["tied"]))
        assert all(p.is_meta for p in model.parameters())
        model = load_spectral(model, {root!r} + "/" + name).eval()
        with torch.no_grad():
            torch.save(model(input_ids=IDS).logits, {root!r} + "/" + name + ".logits.pt")
        out[name] = dict(factors=sum(is_stiefel(p) for p in model.parameters()),
                         tied=getattr(model.lm_head, "weight", None) is getattr(model.model.embed_tokens, "weight", 0))
    print(json.dumps(out))
""")


def _spectral(case):
    model = tiny_llama(bias=case["bias"], tied=case["tied"])
    policy = case["policy"]
    if policy == "budget":
        dense = sum(p.numel() for p in model.parameters())
        policy = dict(budget=int(0.7 * dense))
    spectralize(model, embeddings=case["embeddings"], convert_small=False, **policy)
    return model


def test_reload_in_a_fresh_process_on_meta_gives_bitwise_equal_logits(tmp_path):
    pytest.importorskip("accelerate")
    expected = {}
    for name, case in CASES.items():
        model = _spectral(case)
        opt = SpectralAdam(model.parameters(), lr=1e-2)
        _train(model, opt, 2)  # after a step the factors are views into the optimizer's factor banks
        save_spectral(model, tmp_path / name)
        with torch.no_grad():
            expected[name] = model(input_ids=IDS).logits
        config = json.loads((tmp_path / name / CONFIG_NAME).read_text())
        assert config["layers"] and all(e["rank"] >= 1 for e in config["layers"].values())
        if case["embeddings"]:
            assert config["layers"]["model.embed_tokens"]["kind"] == "embedding"
        if case["tied"]:
            assert config["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    script = RELOAD.format(tests=os.path.join(ROOT, "tests"), root=str(tmp_path), cases=json.dumps(CASES))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, case in CASES.items():
        got = torch.load(tmp_path / f"{name}.logits.pt", weights_only=True)
        assert torch.equal(got, expected[name]), name
        assert info[name]["factors"] > 0
        assert info[name]["tied"] == case["tied"]


def test_round_trip_into_a_dense_model_keeps_manifold_factors_and_ranks(tmp_path):
    model = _spectral(CASES["energy-emb-bias"])
    save_spectral(model, tmp_path / "ck")
    fresh = load_spectral(tiny_llama(seed=5, bias=True), tmp_path / "ck")
    for (na, a), (nb, b) in zip(model.named_modules(), fresh.named_modules()):
        assert na == nb and type(a) is type(b)
        if isinstance(a, (SpectralLinear, SpectralEmbedding)):
            assert a.rank == b.rank
            for p in (b.U, b.V):
                assert isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, Stiefel)
                assert orthonormality_error(p) < 1e-5
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_optimizer_state_round_trip_resumes_bitwise(tmp_path):
    model = _spectral(CASES["rank"])
    opt = SpectralAdam(model.parameters(), lr=1e-2, weight_decay=0.01)
    _train(model, opt, 3)
    save_spectral(model, tmp_path / "ck", optimizer=opt)
    _train(model, opt, 3, seed=2)  # the uninterrupted run

    fresh = load_spectral(tiny_llama(seed=9), tmp_path / "ck")
    params = list(fresh.parameters())
    new_opt = SpectralAdam(params[::-1], lr=1.0)  # another order and lr: both come from the checkpoint
    load_optimizer_state(new_opt, fresh, tmp_path / "ck")
    assert new_opt.param_groups[0]["lr"] == 1e-2 and new_opt.param_groups[0]["weight_decay"] == 0.01
    for state in new_opt.state.values():  # each state tensor in its own memory, not a view into the file
        for t in state.values():
            if torch.is_tensor(t) and t.numel():
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    _train(fresh, new_opt, 3, seed=2)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    modules, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_a_checkpoint_that_does_not_fit_is_rejected_and_the_model_untouched(tmp_path):
    save_spectral(_spectral(CASES["rank"]), tmp_path / "ck")
    wider = tiny_llama(hidden=48)
    snap = _snapshot(wider)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj.*32 -> 32.*48 -> 48"):
        load_spectral(wider, tmp_path / "ck")
    _assert_untouched(wider, snap)

    biased = tiny_llama(bias=True)
    snap = _snapshot(biased)
    with pytest.raises(CheckpointError, match="bias=False in the checkpoint, bias=True in the model"):
        load_spectral(biased, tmp_path / "ck")
    _assert_untouched(biased, snap)

    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(CheckpointError, match="does not exist in this Sequential"):
        load_spectral(other, tmp_path / "ck")

    config_path = tmp_path / "ck" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    model = tiny_llama()
    snap = _snapshot(model)
    bad = dict(config, format_version=99)
    config_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_spectral(model, tmp_path / "ck")
    listed = dict(config, tensors={k: v for k, v in config["tensors"].items() if k != "model.norm.weight"})
    config_path.write_text(json.dumps(listed))
    with pytest.raises(CheckpointError, match="does not hold the tensors"):
        load_spectral(model, tmp_path / "ck")
    shape = json.loads(json.dumps(config))
    shape["tensors"]["model.norm.weight"]["shape"] = [31]
    config_path.write_text(json.dumps(shape))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight': shape \(31,\) in the checkpoint, \(32,\) in the model"):
        load_spectral(model, tmp_path / "ck")
    _assert_untouched(model, snap)
    with pytest.raises(CheckpointError, match="not a spectral checkpoint"):
        load_spectral(model, tmp_path / "nothing")


def test_save_replaces_a_directory_whole_or_not_at_all(tmp_path, monkeypatch):
    model = _spectral(CASES["rank"])
    save_spectral(model, tmp_path / "ck")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    weights = (tmp_path / "ck" / "model.safetensors").read_bytes()

    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_spectral(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left


def test_optimizer_state_mismatch_is_rejected(tmp_path):
    model = _spectral(CASES["rank"])
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    _train(model, opt, 1)
    save_spectral(model, tmp_path / "ck", optimizer=opt)
    fresh = load_spectral(tiny_llama(), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="holds a SpectralAdam state, the optimizer is a SGD"):
        load_optimizer_state(torch.optim.SGD(fresh.parameters(), lr=0.1), fresh, tmp_path / "ck")
    half = list(fresh.parameters())[:3]
    with pytest.raises(CheckpointError, match="param group 0"):
        load_optimizer_state(SpectralAdam(half), fresh, tmp_path / "ck")
    save_spectral(model, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_optimizer_state(SpectralAdam(fresh.parameters()), fresh, tmp_path / "plain")


def test_plain_modules_round_trip(tmp_path):
    model = nn.Sequential(SpectralLinear(10, 8, 3), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 10)
    save_spectral(model, tmp_path / "ck")
    fresh = load_spectral(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 2)), tmp_path / "ck")
    assert isinstance(fresh[0], SpectralLinear) and fresh[0].rank == 3
    assert torch.equal(fresh(x), model(x))
    F.mse_loss(fresh(x), torch.zeros(4, 2)).backward()  # trains
    assert fresh[0].U.grad is not None


EXPORTED = textwrap.dedent("""
    import json, sys, torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained({path!r}).eval()
    out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, do_sample=False)
    print(json.dumps({{"tokens": out[0].tolist(), "stiefel_sct": "stiefel_sct" in sys.modules,
                       "classes": sorted({{type(m).__name__ for m in model.modules()}})}}))
""")


def test_dense_export_loads_and_generates_without_the_library(tmp_path):
    from stiefel_sct import densify

    model = _spectral(CASES["energy-emb-bias"])
    with torch.no_grad():
        spectral_tokens = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, do_sample=False)[0].tolist()
    densify(model).save_pretrained(tmp_path / "dense")
    proc = subprocess.run([sys.executable, "-c", EXPORTED.format(path=str(tmp_path / "dense"))],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["stiefel_sct"] and not any("Spectral" in c for c in got["classes"])
    assert got["tokens"] == spectral_tokens


# ------------------------------------------------------------------------------ damaged checkpoints
def _edit_config(path, edit):
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _flip_bit(path, offset, bit=3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _damage(kind, ck):
    """Damage the checkpoint directory ``ck`` one way; returns the file the error must name."""
    config, weights = ck / CONFIG_NAME, ck / "model.safetensors"
    if kind == "config truncated":
        config.write_bytes(config.read_bytes()[: config.stat().st_size // 2])
        return config, "not valid JSON"
    if kind == "config not text":
        config.write_bytes(b"\xff\xfe\x00garbage" + config.read_bytes())
        return config, "not UTF-8"
    if kind == "config a list":
        config.write_text("[1, 2, 3]")
        return config, "holds a JSON list"
    if kind == "negative rank":
        _edit_config(config, lambda c: c["layers"]["model.layers.0.self_attn.q_proj"].update(rank=-3))
        return config, r"layers\['model.layers.0.self_attn.q_proj'\].rank must be an int \[1, 32\], got -3"
    if kind == "unknown retraction":
        _edit_config(config, lambda c: c["layers"]["model.layers.0.mlp.up_proj"].update(retraction="svd"))
        return config, r"\.retraction must be one of"
    if kind == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return weights, "bytes, spectral_config.json says"
    if kind == "weights garbage":
        weights.write_bytes(os.urandom(weights.stat().st_size))
        return weights, "checksum mismatch"
    if kind == "flipped bit":  # one bit, deep in the tensor data
        _flip_bit(weights, weights.stat().st_size // 2)
        return weights, "checksum mismatch"
    if kind == "garbage with its checksum":  # what a checksum cannot catch: safetensors' own parser does
        weights.write_bytes(b"\x00" * 8 + os.urandom(weights.stat().st_size - 8))
        from stiefel_sct.integrity import file_checksum

        _edit_config(config, lambda c: c["files"]["model.safetensors"].update(checksum=file_checksum(weights)))
        return weights, "cannot be read as safetensors"
    raise AssertionError(kind)


DAMAGE = ["config truncated", "config not text", "config a list", "negative rank", "unknown retraction",
          "weights truncated", "weights garbage", "flipped bit", "garbage with its checksum"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_model_untouched(tmp_path, kind):
    save_spectral(_spectral(CASES["rank"]), tmp_path / "ck")
    path, words = _damage(kind, tmp_path / "ck")
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match=words) as info:
        load_spectral(model, tmp_path / "ck")
    assert str(path) in str(info.value)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("what", ["nan singular value", "inf in a factor", "factor off the manifold"])
def test_bad_values_with_a_valid_checksum_are_refused(tmp_path, what):
    """Values saved as they are (the checksum is right) that no spectral layer may hold."""
    spectral = _spectral(CASES["rank"])
    layer = spectral.model.layers[1].mlp.down_proj
    with torch.no_grad():
        if what == "nan singular value":
            layer.s[2] = float("nan")
        elif what == "inf in a factor":
            layer.V[5, 1] = float("inf")
        else:
            layer.U.mul_(1.1)
    save_spectral(spectral, tmp_path / "ck")
    model = tiny_llama()
    snap = _snapshot(model)
    words = {"nan singular value": r"model\.layers\.1\.mlp\.down_proj\.s .*non-finite singular values",
             "inf in a factor": r"model\.layers\.1\.mlp\.down_proj\.V .*non-finite values",
             "factor off the manifold": r"model\.layers\.1\.mlp\.down_proj\.U .*orthonormal.*verify=False"}[what]
    with pytest.raises(CheckpointError, match=words):
        load_spectral(model, tmp_path / "ck")
    _assert_untouched(model, snap)
    if what == "factor off the manifold":  # the escape hatch for factors trained off the manifold on purpose
        loaded = load_spectral(model, tmp_path / "ck", verify=False)
        assert torch.equal(loaded.model.layers[1].mlp.down_proj.U, layer.U)


def test_a_damaged_optimizer_file_is_refused(tmp_path):
    model = _spectral(CASES["rank"])
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    _train(model, opt, 1)
    save_spectral(model, tmp_path / "ck", optimizer=opt)
    _flip_bit(tmp_path / "ck" / "optimizer.safetensors", (tmp_path / "ck" / "optimizer.safetensors").stat().st_size - 5)
    fresh = load_spectral(tiny_llama(), tmp_path / "ck")
    new = SpectralAdam(fresh.parameters(), lr=1e-2)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: checksum mismatch"):
        load_optimizer_state(new, fresh, tmp_path / "ck")
    assert not new.state


def test_a_format_1_checkpoint_without_checksums_still_loads(tmp_path):
    spectral = _spectral(CASES["rank"])
    save_spectral(spectral, tmp_path / "ck")

    def as_version_1(c):
        c["format_version"] = 1
        del c["files"]

    _edit_config(tmp_path / "ck" / CONFIG_NAME, as_version_1)
    loaded = load_spectral(tiny_llama(), tmp_path / "ck").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, spectral.eval()(input_ids=IDS).logits, rtol=0, atol=0)


def test_checksum_sees_every_single_bit_and_moved_chunks(tmp_path):
    from stiefel_sct.integrity import file_checksum

    data = bytearray(os.urandom(3 * 65536 + 13))  # three whole chunks, a partial word at the end
    path = tmp_path / "f"
    path.write_bytes(bytes(data))
    ref = file_checksum(path)
    for offset in (0, 7, 65536, len(data) - 1):  # first byte, within a word, a chunk boundary, the tail
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            assert file_checksum(path) != ref, (offset, bit)
    swapped = data[65536:131072] + data[:65536] + data[131072:]  # two chunks trade places: same words
    path.write_bytes(bytes(swapped))
    assert file_checksum(path) != ref
    path.write_bytes(bytes(data))
    assert file_checksum(path) == ref


def _checksum_reference(data: bytes) -> str:
    """The documented algorithm in one shot, written apart from the library's blockwise reader."""
    import numpy as np

    whole = len(data) - len(data) % 8
    words = np.frombuffer(data[:whole], dtype="<u8")
    sums = [int(words[i:i + 8192].sum(dtype=np.uint64)) for i in range(0, len(words), 8192)]
    if whole < len(data):
        sums.append(int.from_bytes(data[whole:].ljust(8, b"\0"), "little"))
    return f"sum64-chunked:{sum((2 * i + 1) * c for i, c in enumerate(sums)) % 2**64:016x}"


@pytest.mark.parametrize("size", [0, 1, 7, 8, 65536, 65536 + 3, 2 * 2**20, 2 * 2**20 + 5, 4 * 2**20 + 65536 + 8])
def test_blockwise_checksum_equals_the_one_shot_algorithm_at_every_boundary(tmp_path, size):
    """Sizes at the word, 64 KiB chunk and 2 MiB block boundaries: what save_spectral recorded
    before the reader went blockwise must still verify."""
    from stiefel_sct.integrity import file_checksum

    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(tmp_path / "f") == _checksum_reference(data)


@pytest.mark.parametrize("own", ["none", "some", "all"])
def test_read_weights_equals_safetensors_own_reader(tmp_path, own):
    """Every dtype and shape a model state holds (bf16 of odd length, so later tensors sit at odd
    offsets; bool; 0-d; empty; one tensor over several 2 MiB blocks), bitwise, with the checksum
    fused into the read, whether each tensor is copied out (``own``) or handed out as a view."""
    from safetensors.torch import load_file, save_file

    from stiefel_sct.integrity import file_checksum, read_weights

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g, dtype=torch.float64), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randn(3, 333, 1000, generator=g), "d": torch.tensor([True, False, True]),
               "e": torch.arange(5, dtype=torch.int64), "f": torch.tensor(2.5), "g": torch.empty(0, 4),
               "h": torch.randn(11, generator=g).half()}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    files = {path.name: {"bytes": path.stat().st_size, "checksum": file_checksum(path)}}
    owned = {"none": set(), "some": {"b", "c", "f", "g"}, "all": set(tensors)}[own]
    got = read_weights(path, files, own=owned)
    want = load_file(str(path))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
        if name in owned:  # its own memory, not a view into the file's mapping
            assert got[name].untyped_storage().nbytes() == t.numel() * t.element_size(), name
        elif t.numel():
            assert got[name].untyped_storage().nbytes() >= path.stat().st_size - 8, name
    _flip_bit(path, path.stat().st_size - 3)
    with pytest.raises(CheckpointError, match="w.safetensors: checksum mismatch"):
        read_weights(path, files, own=owned)


def test_save_certifies_the_values_and_load_trusts_the_certificate_only_with_the_checksum(tmp_path):
    """save_spectral records whether the saved values pass the value checks; a load whose checksum
    matches skips the probes only where that certificate says they passed. A checkpoint without
    one (saved before it existed) is probed as before."""
    good, bad = _spectral(CASES["rank"]), _spectral(CASES["rank"])
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.s[2] = float("nan")
    save_spectral(good, tmp_path / "good")
    save_spectral(bad, tmp_path / "bad")
    read = lambda d: json.loads((tmp_path / d / CONFIG_NAME).read_text())["files"]["model.safetensors"]
    assert read("good")["values_passed"] is True and read("bad")["values_passed"] is False
    _edit_config(tmp_path / "bad" / CONFIG_NAME, lambda c: c["files"]["model.safetensors"].pop("values_passed"))
    with pytest.raises(CheckpointError, match=r"down_proj\.s .*non-finite singular values"):
        load_spectral(tiny_llama(), tmp_path / "bad")
    _edit_config(tmp_path / "good" / CONFIG_NAME, lambda c: c["files"]["model.safetensors"].update(values_passed=1))
    with pytest.raises(CheckpointError, match=r"values_passed must be true or false, got 1"):
        load_spectral(tiny_llama(), tmp_path / "good")


@pytest.mark.parametrize("meta", [False, True])
def test_loaded_tensors_own_their_memory(tmp_path, meta):
    """load_spectral hands the tensors it copied out of the file to the parameters it creates (no
    second copy): each must still be a tensor of its own, never a view into the file's mapping or
    into a shared buffer, and tied weights stay one tensor."""
    spectral = _spectral(CASES["rank-tied"])
    save_spectral(spectral, tmp_path / "ck")
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = transformers.LlamaForCausalLM(tiny_llama_config(bias=True, tied=True))
    else:
        model = tiny_llama(bias=True, tied=True)
    loaded = load_spectral(model, tmp_path / "ck")
    for name, t in loaded.state_dict(keep_vars=True).items():
        assert not t.is_meta, name
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, spectral.eval()(input_ids=IDS).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("edit", ["offsets past the end", "offsets that do not fit the shape", "unknown dtype",
                                  "header longer than the file"])
def test_a_malformed_safetensors_header_is_refused_by_name(tmp_path, edit):
    from safetensors.torch import save_file

    from stiefel_sct.integrity import read_weights

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(4, 4), "y": torch.ones(3)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if edit == "offsets past the end":
        header["y"]["data_offsets"] = [70, 82]  # 12 bytes as its shape wants, 6 of them past the end
    elif edit == "offsets that do not fit the shape":
        header["x"]["data_offsets"] = [0, 60]
    elif edit == "unknown dtype":
        header["x"]["dtype"] = "Q32"
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n  # the edited header still fits in the original's place, so only the edit is wrong
    size = n if edit != "header longer than the file" else 10**7
    path.write_bytes(size.to_bytes(8, "little") + raw.ljust(n) + data[8 + n:])
    why = "a header of" if edit == "header longer than the file" else "header's entry"
    with pytest.raises(CheckpointError, match=f"w.safetensors cannot be read as safetensors .*{why}"):
        read_weights(path)


KILLED_SAVER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    sys.path.insert(0, {root!r})
    from stiefel_sct import save_spectral, spectralize
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(12)])
    spectralize(model, rank=64)
    save_spectral(model, sys.argv[1])
    print("ready", flush=True)
    while True:
        save_spectral(model, sys.argv[1])
""")


def test_a_save_killed_at_random_moments_never_breaks_the_checkpoint(tmp_path):
    """SIGKILL a process that saves in a loop at random moments: the directory always loads, and
    the next save removes the temporaries the killed saves left."""
    import random
    import signal

    rng = random.Random(0)
    script = tmp_path / "saver.py"
    script.write_text(KILLED_SAVER.format(root=ROOT))
    ck = tmp_path / "ck"
    left = []
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(ck)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        left.append(sum(p.name.startswith(".ck.") for p in tmp_path.iterdir()))
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(12)])
        spectralize(model, rank=64)
        reference = [t.clone() for t in model.state_dict().values()]
        # killed between commit's two renames (a window of two syscalls), the previous checkpoint is .ck.old
        whole = ck if ck.exists() else tmp_path / ".ck.old"
        loaded = load_spectral(nn.Sequential(*[nn.Linear(256, 256) for _ in range(12)]), whole)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference))
    assert max(left) <= 2 and sum(left) > 0  # each saver removed its killed predecessor's temporary
    save_spectral(loaded, ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "saver.py"]


def test_a_save_removes_only_the_temporaries_of_dead_writers(tmp_path):
    save_spectral(nn.Sequential(SpectralLinear(8, 8, 2)), tmp_path / "ck")
    dead, legacy, live = (tmp_path / ".ck.999999999.ab12.tmp", tmp_path / ".ck.x7_q2a.tmp",
                          tmp_path / f".ck.{os.getpid()}.cd34.tmp")
    other = tmp_path / ".ckpt.999999999.ab12.tmp"  # another directory's temporary
    for d in (dead, legacy, live, other):
        d.mkdir()
    save_spectral(nn.Sequential(SpectralLinear(8, 8, 2)), tmp_path / "ck")
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and other.exists()
