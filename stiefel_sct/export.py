"""Export a trained residual-mode model as a plain PEFT LoRA adapter on the untouched base model.

A residual layer computes ``W_base + (V diag(s) U^T - V0 diag(s0) U0^T)``: the trained change is
``[V diag(s), -V0 diag(s0)] [U, U0]^T``, of rank at most ``2k``. That is exactly a LoRA update
``B A`` with ``B = [V diag(s), -V0 diag(s0)]`` (``n x 2k``) and ``A = [U, U0]^T`` (``2k x m``) at
scaling 1 (``lora_alpha = r``), so ``PeftModel.from_pretrained(base, directory)`` reproduces the
trained model with no ``stiefel_sct`` installed. Written here without importing PEFT: its
``adapter_config.json`` and ``adapter_model.safetensors`` layout.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, Optional

import torch
from torch import nn

from .checkpoint import AtomicDirectory
from .layers import SpectralConv1D, SpectralLinear, SpectralModule

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "export_peft_lora", "lora_factors"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


@torch.no_grad()
def lora_factors(layer: SpectralLinear) -> tuple:
    """``(A, B)`` of the residual layer's trained change ``B @ A = V diag(s) U^T - V0 diag(s0) U0^T``:
    ``A`` is ``(k + k0, in_features)``, ``B`` is ``(out_features, k + k0)``, in the layer's dtype
    (``k0``, the columns of ``U0``, is ``k`` until a :class:`~stiefel_sct.RankScheduler` moves rank)."""
    if not isinstance(layer, SpectralLinear) or layer.residual_dtype is None:
        raise ValueError("lora_factors needs a residual-mode SpectralLinear (spectralize(..., residual_dtype=...))")
    A = torch.cat([layer.U.detach(), layer.U0], dim=1).mT
    B = torch.cat([layer.V.detach() * layer.s.detach(), -(layer.V0 * layer.s0)], dim=1)
    return A.contiguous(), B.contiguous()


def _residual_layers(model: nn.Module) -> Dict[str, SpectralLinear]:
    """``model``'s residual layers by name, after checking that they are all it trained and that
    they are of one kind (PEFT's ``fan_in_fan_out`` is one setting per adapter)."""
    layers: Dict[str, SpectralLinear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SpectralModule):
            continue
        if not isinstance(module, SpectralLinear) or module.residual_dtype is None:
            raise ValueError(f"export_peft_lora: layer {name!r} is a spectral layer without a residual; only a "
                             "residual-mode model (spectralize(..., residual_dtype=...)) is a LoRA on its base")
        if module.bias is not None and module.bias.requires_grad:
            raise ValueError(f"export_peft_lora: layer {name!r} has a trainable bias, which a LoRA adapter does not "
                             "carry; freeze it (bias.requires_grad_(False)) before training")
        layers[name] = module
    if not layers or "" in layers:
        raise ValueError("export_peft_lora: model has no residual layer inside it to export")
    conv = [n for n, m in layers.items() if isinstance(m, SpectralConv1D)]
    if conv and len(conv) != len(layers):
        linear = next(n for n in layers if n not in conv)
        raise ValueError(f"export_peft_lora: the model mixes GPT-2 Conv1D layers ({conv[0]!r}) and nn.Linear layers "
                         f"({linear!r}); PEFT's fan_in_fan_out is one setting per adapter: convert one kind only "
                         "(spectralize(..., include=...))")
    factor_ids = {id(p) for m in layers.values() for p in (m.U, m.s, m.V)}
    trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in factor_ids]
    if trained:
        raise ValueError(f"export_peft_lora: parameter {trained[0]!r} is trainable but not part of a residual layer's "
                         f"factors ({len(trained)} in all); a LoRA adapter cannot carry it: freeze it before training")
    return layers


def export_peft_lora(model: nn.Module, directory: os.PathLike | str,
                     base_model_name_or_path: Optional[str] = None) -> pathlib.Path:
    """Write ``model``'s residual layers as a PEFT LoRA adapter in ``directory``.

    Every spectral layer of ``model`` must be a residual-mode :class:`SpectralLinear`, and nothing
    else in ``model`` may have been trained: an adapter carries only the residual layers' change, so
    every other parameter must have ``requires_grad=False`` (a trainable bias of a residual layer
    is refused too: PEFT's LoRA adds no bias). Per layer the adapter's rank is ``2k`` (``k + k0``
    after rank moves), with
    ``lora_alpha = r`` (scaling 1); ranks that differ go in ``rank_pattern``/``alpha_pattern``.

    Load it on the untouched base model: ``PeftModel.from_pretrained(base, directory)``.
    Returns the directory's path.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = _residual_layers(model)
    conv = sorted(n for n, m in layers.items() if isinstance(m, SpectralConv1D))  # GPT-2's (in, out) storage
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    for name, layer in layers.items():
        A, B = lora_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to("cpu", copy=True)
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to("cpu", copy=True)
        ranks[name] = A.shape[0]
    r = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank; the rest by pattern
    pattern = {name: k for name, k in ranks.items() if k != r}
    config: Dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": bool(conv),
        "target_modules": sorted(layers), "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "inference_mode": True,
    }
    out = pathlib.Path(directory)
    tmp = AtomicDirectory(out)  # written whole or not at all, as spectral checkpoints are
    try:
        save_file(tensors, str(tmp.path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp.path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    return out
