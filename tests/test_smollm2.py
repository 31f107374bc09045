"""The SmolLM2 loader's refusals: missing packages are named, a wheel with the wrong hash is refused.

The real model (load offline, spectralize at half the linear budget, learn, reload, export) is
exercised end to end by ``tests/test_examples.py::test_finetune_smollm2_example_runs_end_to_end``:
one load of the ~25 s model serves every assertion."""

import pytest


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
