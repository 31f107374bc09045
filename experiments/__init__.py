"""Paper-reproduction experiments; each module runs alone (``python -m experiments.NAME``, from the
repository root).

:data:`EXPERIMENTS` is the one registry: ``experiments/reproduce.py`` runs what it lists and
``paper/build.py`` builds one report section per entry, so neither can forget an experiment.
This module imports nothing heavy (the report builder reads it without torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

__all__ = ["EXPERIMENTS", "Experiment"]


@dataclass(frozen=True)
class Experiment:
    """One experiment: its module ``experiments.<name>``, the results files it may write
    (``results/<file>.json``; the report needs at least one of them), and ``section``, the key of
    its renderer in ``paper/build.py``'s ``SECTIONS`` (building the report fails naming an
    experiment whose section does not exist, so a new experiment cannot be run and never shown)."""

    name: str
    results: Tuple[str, ...]
    what: str
    section: str


EXPERIMENTS: Tuple[Experiment, ...] = (
    Experiment("mlp_proofs", ("mlp_proofs",), "sine regression and XOR: dense vs SCT vs SFT+DFA", "mlp"),
    Experiment("memory_70b", ("memory_70b", "memory_70b_paper"),
               "a full training step of a LLaMA-3-70B-shaped network: peak memory per lever", "memory"),
    Experiment("rank_sweep", ("rank_sweep",), "SmolLM2-shaped LMs from scratch, dense vs ranks", "rank_sweep"),
    Experiment("compress_pretrained", ("compress_pretrained",),
               "pretrained MiniLM and an LM trained here, compressed and healed", "compress"),
    Experiment("finetune_smollm2", ("finetune_smollm2",),
               "SmolLM2-135M fine-tuned: the reference recipe, then SCT vs dense, LoRA, GaLore, low rank", "finetune"),
)
