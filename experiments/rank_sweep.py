"""The SmolLM2 rank sweep, done with held-out evaluation: dense vs spectral at several ranks, from scratch.

The paper fine-tuned SmolLM2-1.7B on Alpaca with only the MLP spectral and reported *training*
loss: every rank reached the same floor (~4.2-4.5), so "the schedule, not the rank, is the
bottleneck". Here every method trains the same SmolLM2-shaped Hugging Face ``LlamaForCausalLM`` from
scratch on the same tokens (Shakespeare, offline: ``experiments/data.py``) and is judged by its
loss on held-out plays. Read top to bottom:

1. data: documents -> fixed train/validation split (whole plays held out) -> a BPE tokenizer trained
   here on the training plays -> token streams;
2. model: a SmolLM2 shape (``SHAPES``; the ``tiny`` preset is the 135M shape at reduced depth), dense
   or ``spectralize``-d at rank ``k`` (``--targets``: which linear layers become spectral);
3. one training run (``train_run``): SpectralAdam (exact AdamW on dense parameters), a learning-rate
   schedule (constant / cosine / warmup-stable-decay, all with warm-up), optional per-component
   learning rate for ``s`` and the function-preserving retraction; validation loss every
   ``eval_every`` steps; an atomic checkpoint every ``ckpt_every`` steps (``--resume`` continues);
4. the sweep (``main``): stage ``lr`` (a short learning-rate sweep per method; each method then uses
   its own best), stage ``main`` (every method at its best lr), stage ``schedule`` (the schedules
   compared at one rank and dense), stage ``ablation`` (function-preserving retraction; a 10x
   learning rate for ``s``), stage ``adaptive`` (a :class:`~stiefel_sct.RankScheduler` arm: every
   layer starts at rank ``adaptive_start`` and grows and shrinks under a parameter budget equal to
   rank ``adaptive_budget_rank``'s, at that rank's best lr; and a pruning arm: every layer starts at
   rank ``prune_start`` and is pruned to the same budget by ``prune_by`` of the steps, AdaLoRA's
   schedule, ``RankScheduler(budget_by=...)``; the per-layer-type ranks are logged at every
   evaluation). Each finished run is appended atomically to ``results/rank_sweep.json``.

    python -m experiments.rank_sweep --preset quick            # tiny model, CPU, ~10 min
    python -m experiments.rank_sweep --preset paper            # SmolLM2-1.7B, ranks 32-256 (a GPU)
    python -m experiments.rank_sweep --preset quick --resume   # pick up where a killed run stopped
    torchrun --nproc-per-node 2 experiments/rank_sweep.py ...  # data-parallel (gloo on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from experiments import data as data_lib
from experiments.common import (
    RESULTS_DIR,
    add_preset_argument,
    atomic_torch_save,
    config_from_args,
    peak_rss_mib,
    progress,
    reset_peak_rss,
    seed_everything,
    write_results,
)
from stiefel_sct.rank import spectral_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

# SmolLM2 shapes, from the published config.json of each model (vocabulary replaced by the local tokenizer's)
SHAPES = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, rope_theta=100000.0),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, head_dim=64, rope_theta=100000.0),
    "1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=64, rope_theta=130000.0),
}
COMMON = dict(rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True, initializer_range=0.02)
TARGETS = {
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
SCHEDULES = ("constant", "cosine", "wsd")
PAPER = {  # SmolLM2-1.7B, Alpaca fine-tuning, MLP only, training loss (trailing 50-step mean), A100
    "dense": dict(params_m=1711, loss=1.291, ppl=3.64, step_s=1.174),
    "r256": dict(params_m=692, loss=4.325, ppl=75.6, step_s=1.047),
    "r128": dict(params_m=598, loss=4.183, ppl=65.6, step_s=0.740),
    "r64": dict(params_m=551, loss=4.339, ppl=76.7, step_s=0.616),
    "r32": dict(params_m=527, loss=4.465, ppl=86.9, step_s=0.562),
}
CKPT_FORMAT = 2  # 2: Run.adaptive, the rank scheduler's state and per-layer ranks


@dataclass
class Config:
    preset: str = "quick"
    shape: str = "135M"
    layers: Optional[int] = 2          # None: the shape's own depth
    targets: str = "all"
    ranks: List[int] = field(default_factory=lambda: [32, 64, 128])
    steps: int = 300
    batch: int = 8
    seq: int = 64
    vocab: int = 4096
    dataset: str = "shakespeare"
    schedule: str = "cosine"
    warmup: int = 30
    lr_sweep: List[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    sweep_steps: int = 120
    schedule_rank: int = 128           # the rank the schedule comparison and ablations use
    s_lr_mult: float = 10.0            # the per-component ablation: lr of s = this x lr of U, V
    stages: List[str] = field(default_factory=lambda: ["lr", "main", "schedule", "ablation", "adaptive"])
    adaptive_start: int = 8            # the adaptive arm's starting rank (every layer)
    adaptive_budget_rank: int = 64     # its parameter budget: what every layer at this rank costs
    # RankScheduler(every=..., grow=..., tol=..., grace=..., growth=..., sketch_steps=...). Quick preset,
    # AMD EPYC, val loss at 300 steps (rank 64: 5.287, rank 8: 5.691, rank 64 with every direction
    # past the 8th starting at s = 0: 5.538):
    #   growth="factors", every 25, grow 16, grace 1: 5.633 (28% of newborns survive the next event)
    #   growth="gradient", sketch over the window, every 25, grow 16: 5.590; grow 56: 5.621
    #   growth="gradient", sketch over the window, every 10, grow 56: 5.575 (these settings, run alone;
    #   5.703 as the last run of the whole quick sweep: one direction more survived its second event,
    #   rounding the rank events amplify; the factors arm gave 5.633 both ways). Re-run alone on
    #   2026-12-07 with no event after the last step: 5.549. The 5.703 run's last event had changed
    #   no rank, so 5.549-5.703 is this arm's spread from rounding, not the fix's effect
    #   New directions born at a fixed rank-64 layer's spectrum scale (prototypes, Intel Xeon,
    #   2026-12-07): the sketch's directions 5.450 and 5.480 (two runs: the spread again), random
    #   directions outside the bases 5.553; rank 64's head start is its 64 directions trained from
    #   step 0, and the sketch's directions with values gain ~0.1 at most within this spread
    #   Where the 0.26 goes (Intel Xeon, 2026-12-07, afternoon): with tol 0, so that nothing is ever
    #   dropped, the arm still ends at 5.568: the shrink rule costs nothing; the rank-8 start and
    #   the late, weak newborns cost it all (born at a rank-64 layer's scale, above, ~0.17 remain).
    #   Started at rank 64 instead, no direction falls below even tol 0.1 (every 25 or 50 steps,
    #   grow 8): the spectra trained from a flat start stay flat, no event fires and the arm is
    #   rank 64 (5.2874); a magnitude test finds nothing to move between layers here
    #   Is there a better allocation to find? The ranks this arm ended with (per layer type q 121,
    #   k 73, v 46, o 45, gate 39, up 32, down 102: 1,296,916 spectral parameters against rank 64's
    #   1,303,424), fixed and trained from step 0 at full strength: 5.302 (Intel Xeon, 2026-12-07
    #   evening), no better than uniform rank 64: the allocation the growth found buys nothing
    #   here; the 0.26 is the late start and the weak newborns, not where the rank went
    adaptive_every: int = 10
    adaptive_grow: int = 56            # rank 8 -> 64 at the first event
    # 0.02 (and 0.005) dropped every grown direction at the next event (new s start at 0 and move
    # ~lr per step): the ranks stayed at 16, val 5.686 (5.659); at 1e-3 they grow (quick preset)
    adaptive_tol: float = 1e-3
    # a direction grown at an event is safe at the next one (RankScheduler(grace=...)): at grace 0
    # and grow 8 it reached 5.665 against rank 64's 5.287 (quick preset, Intel Xeon)
    adaptive_grace: int = 1
    adaptive_growth: str = "gradient"  # RankScheduler(growth=...): sketch dL/dW outside the bases
    adaptive_newborn_rate: Optional[float] = None  # RankScheduler(newborn_rate=...)
    adaptive_sketch_steps: int = 10    # RankScheduler(sketch_steps=...): the whole window
    # the pruning arm (RankScheduler(budget_by=...)): every layer at this rank, pruned to the adaptive
    # arm's budget by this fraction of the steps, lowest |s_i| / (||s|| (m + n + 1)) first, at rank
    # adaptive_budget_rank's lr. Prototypes (quick preset, AMD EPYC, 2026-12-07; the schedule from
    # the size at step 10): from 128 by step 150: 5.245; by 100: 5.251; by 200: 5.257; from 96 by
    # step 150: 5.256; without the per-parameter cost in the score 5.263; Optimal Brain Damage's
    # s_i^2 v_i (Adam's second moment of s as the Fisher diagonal) 5.281; against rank 64's 5.287
    # and rank 128's 5.247. The committed run (these settings, schedule from construction): 5.245.
    # Seed 1 (--seed 1 --lr 3e-3, stages main and adaptive, AMD EPYC): this arm 5.267, rank 64
    # 5.269, rank 128 5.236, the growing arm 5.611: at or below rank 64 both times (by 0.042, 0.002)
    # Its final per-layer ranks (k, v 128; q 115, o 119; gate 27.5, up 26.5, down 33.5 on average),
    # fixed and trained from step 0 at rank 64's lr: 5.317 (a probe, AMD EPYC): the allocation alone
    # is worse than uniform; what the arm keeps is what the early steps at rank 128 learned
    prune_start: int = 128
    prune_by: float = 0.5
    eval_every: int = 50
    eval_batches: int = 16
    ckpt_every: int = 100
    seed: int = 0
    dtype: str = "fp32"


PRESETS = {
    "quick": {},
    # first contact (the README's main command): a sixth of the steps, two learning rates picked in
    # 10-step runs, the schedule comparison and ablations at rank 64 (100 steps with 20-step sweeps
    # took 411 s on a 2-core EPYC once the adaptive arm and the ablations had joined; this about half)
    "fast": dict(steps=50, warmup=5, lr_sweep=[1e-3, 3e-3], sweep_steps=10, schedule_rank=64, eval_every=25,
                 eval_batches=8, ckpt_every=25),
    "paper": dict(shape="1.7B", layers=None, ranks=[32, 64, 128, 256], steps=2000, batch=16, seq=512,
                  vocab=49152, warmup=100, sweep_steps=400, lr_sweep=[3e-4, 1e-3, 3e-3], schedule_rank=128,
                  eval_every=200, eval_batches=32, ckpt_every=200),
    "smoke": dict(layers=1, ranks=[8], steps=3, batch=2, seq=16, vocab=300, warmup=1, lr_sweep=[1e-3],
                  sweep_steps=2, schedule_rank=8, stages=["main"], eval_every=2, eval_batches=2, ckpt_every=2),
}


@dataclass
class Run:
    """One training run: which model and how it is trained."""

    name: str
    stage: str
    rank: Optional[int]                # None: dense
    lr: float
    steps: int
    schedule: str
    s_lr_mult: float = 1.0
    preserve_function: bool = False
    adaptive: bool = False             # rank: the starting rank of a RankScheduler arm
    budget_by: Optional[int] = None    # adaptive: the pruning arm, RankScheduler(budget_by=...)


# ------------------------------------------------------------------------------------- the model
def build_model(cfg: Config, vocab_size: int, rank: Optional[int]):
    """A SmolLM2-shaped ``LlamaForCausalLM`` (HF init), dense or spectral at ``rank``; the report of
    which layers became spectral, and the dense-equivalent size of those layers."""
    import transformers

    from stiefel_sct import SpectralLinear, spectralize

    shape = dict(SHAPES[cfg.shape])
    if cfg.layers is not None:
        shape["num_hidden_layers"] = cfg.layers
    config = transformers.LlamaConfig(vocab_size=vocab_size, **shape, **COMMON)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    converted = {"layers": 0, "dense_params": 0, "spectral_params": 0}
    if rank is not None:
        spectralize(model, rank=rank, include=TARGETS[cfg.targets], retraction="cholqr2")
        for m in model.modules():
            if isinstance(m, SpectralLinear):
                # from scratch: the SVD of the random init keeps its k largest singular values and so
                # far less than its Frobenius norm, which starts the network near the identity (the
                # tied embedding then predicts the input token: initial loss above uniform). Scale s
                # so that E|Wx|^2 matches the dense init: ||W||_F^2 = k s^2 = std^2 m n.
                with torch.no_grad():
                    m.s.fill_(COMMON["initializer_range"] * math.sqrt(m.in_features * m.out_features / rank))
                converted["layers"] += 1
                converted["dense_params"] += m.in_features * m.out_features
                converted["spectral_params"] += sum(p.numel() for p in (m.U, m.s, m.V))
    return model, converted


def spectral_layers(model):
    """``(name, layer)`` of the model's spectral linear layers."""
    from stiefel_sct import SpectralLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, SpectralLinear)]


def rank_budget(model, rank: int) -> int:
    """Spectral parameters of the model's spectral layers, each at ``rank`` (capped by its shape)."""
    return sum(spectral_params(m.in_features, m.out_features, min(rank, m.in_features, m.out_features))
               for _, m in spectral_layers(model))


def ranks_by_type(model) -> Dict[str, float]:
    """Mean rank of each layer type (``q_proj``, ``gate_proj``, ...) over the model's layers."""
    by: Dict[str, List[int]] = {}
    for n, m in spectral_layers(model):
        by.setdefault(n.rsplit(".", 1)[-1], []).append(m.rank)
    return {t: sum(ks) / len(ks) for t, ks in sorted(by.items())}


@torch.no_grad()
def resize_to(model, state_dict: Dict[str, torch.Tensor]) -> None:
    """Give every spectral layer the rank its saved ``s`` has (a checkpoint of an adaptive run),
    with fresh parameters of the saved shapes; ``load_state_dict`` then fills them."""
    import geoopt

    for n, m in spectral_layers(model):
        k = state_dict[f"{n}.s"].shape[0]
        if k != m.rank:
            for name in ("U", "V"):
                old = getattr(m, name)
                setattr(m, name, geoopt.ManifoldParameter(old.new_empty(old.shape[0], k), manifold=old.manifold))
            m.s = torch.nn.Parameter(m.s.new_empty(k))
            m.rank = k


def lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then constant, cosine to 10%,
    or warmup-stable-decay (constant, then linear to 0 over the last 20% of the steps)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if schedule == "wsd":
        decay_start = int(0.8 * steps)
        return 1.0 if step < decay_start else max(0.0, (steps - step) / max(1, steps - decay_start))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def make_optimizer(model, run: Run):
    """SpectralAdam (AdamW on dense parameters) with ``s`` in its own group when its lr differs."""
    from stiefel_sct import SpectralAdam

    spectra = [p for n, p in model.named_parameters() if n.endswith(".s")]
    rest = [p for n, p in model.named_parameters() if not n.endswith(".s")]
    groups = [{"params": rest}]
    if spectra:
        groups.append({"params": spectra, "lr": run.lr * run.s_lr_mult})
    opt = SpectralAdam(groups, lr=run.lr, betas=(0.9, 0.95), weight_decay=0.0,
                       preserve_function=run.preserve_function)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


# ------------------------------------------------------------------------------- measurement
def lm_loss(model, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of windows of ``seq + 1`` tokens: every position predicts the next."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model, batches: List[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over the fixed validation windows."""
    was_training = model.training
    model.eval()
    total = sum(float(lm_loss(model, b, reduction="sum")) for b in batches)
    model.train(was_training)
    return total / sum(b[:, 1:].numel() for b in batches)


def orthonormality(model) -> Optional[float]:
    from stiefel_sct import is_stiefel, orthonormality_error

    errs = [orthonormality_error(p) for p in model.parameters() if is_stiefel(p)]
    return max(errs) if errs else None  # a dense model has no factors


# ------------------------------------------------------------------------------- more than one process
def _world():
    """``(rank, world_size, dist)`` of an initialised process group, else ``(0, 1, None)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def init_distributed() -> None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): gloo on CPU, nccl on GPUs."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


# --------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: pathlib.Path, run: Run) -> Optional[dict]:
    if not path.exists():
        return None
    blob = torch.load(path, weights_only=True)
    if blob.get("format") != CKPT_FORMAT:
        raise RuntimeError(f"{path}: checkpoint format {blob.get('format')!r}, this code reads format {CKPT_FORMAT}")
    if blob["run"] != json.loads(json.dumps(dataclasses.asdict(run))):
        raise RuntimeError(f"{path} belongs to another run ({blob['run']}); delete it or drop --resume")
    return blob


# -------------------------------------------------------------------------------- one training run
def train_run(run: Run, cfg: Config, data: data_lib.TokenData, ckpt_dir: pathlib.Path,
              resume: bool = False, stop_after: Optional[int] = None) -> Dict:
    """Train one model; returns its record (curves and final metrics). ``stop_after`` ends the
    run early after that many steps, leaving its checkpoint (what a killed run leaves)."""
    from experiments.common import parse_dtype

    rank, world, dist = _world()
    if cfg.batch % world:
        raise ValueError(f"batch {cfg.batch} must be divisible by the number of processes ({world})")
    seed_everything(cfg.seed)
    model, converted = build_model(cfg, data.vocab_size, run.rank)
    model.to(parse_dtype(cfg.dtype)).train()
    net = model  # what the steps run: the model, or its DDP wrapper (same parameters)
    if dist is not None and run.adaptive:
        raise NotImplementedError("the adaptive arm replaces parameters, which a DDP wrapper holds: run it in one process")
    if dist is not None:
        net = torch.nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every method
    val = data.val_batches(cfg.batch, cfg.seq, cfg.eval_batches)
    history: Dict[str, list] = {"eval_step": [], "val_loss": [], "train_loss": [], "step_s": [], "ranks": []}
    start = 0
    ckpt = ckpt_dir / f"{run.name}.pt"
    blob = load_checkpoint(ckpt, run) if resume else None
    if blob is not None:
        resize_to(model, blob["model"])  # an adaptive run's layers have moved away from run.rank
    opt = make_optimizer(model, run)
    sched = None
    if run.adaptive:
        from stiefel_sct import RankScheduler

        budget = rank_budget(model, cfg.adaptive_budget_rank)
        if run.budget_by is not None:  # prune from above to the budget, nothing grows
            sched = RankScheduler(opt, every=cfg.adaptive_every, tol=0.0, grow=0, budget=budget,
                                  budget_by=run.budget_by)
        else:
            sched = RankScheduler(opt, every=cfg.adaptive_every, tol=cfg.adaptive_tol, grow=cfg.adaptive_grow,
                                  budget=budget, grace=cfg.adaptive_grace, newborn_rate=cfg.adaptive_newborn_rate,
                                  growth=cfg.adaptive_growth, sketch_steps=min(cfg.adaptive_sketch_steps,
                                                                               cfg.adaptive_every))
    if blob is not None:
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        if sched is not None:
            sched.load_state_dict(blob["scheduler"])
        gen.set_state(blob["generator"])
        history, start = blob["history"], blob["step"]
    if start == 0:  # the untrained model: where every curve starts
        history["eval_step"].append(0)
        history["val_loss"].append(evaluate(model, val))
        history["train_loss"].append(None)
        history["ranks"].append(ranks_by_type(model))
    reset_peak_rss()
    window: List[float] = []
    bar = progress(range(start, run.steps), desc=run.name, initial=start, total=run.steps, leave=False,
                   lines_every=cfg.eval_every)
    per = cfg.batch // world
    for step in bar:
        # every process draws the same global batch and trains on its rows: DDP's averaged
        # gradient is then the single-process gradient of the whole batch
        batch = data.batch(cfg.batch, cfg.seq, gen)[rank * per:(rank + 1) * per]
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, run.steps, run.schedule, cfg.warmup)
        t = time.perf_counter()
        loss = lm_loss(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None and step < run.steps - 1:  # no event after the last update: nothing would train it
            sched.step()  # after the update, while the factors' gradients are still there
        history["step_s"].append(time.perf_counter() - t)
        logged = loss.detach()
        if dist is not None:
            dist.all_reduce(logged)
            logged = logged / world
        window.append(logged.item())
        done = step + 1
        if done % cfg.eval_every == 0 or done == run.steps:
            history["eval_step"].append(done)
            history["val_loss"].append(evaluate(model, val))
            history["train_loss"].append(sum(window) / len(window))
            history["ranks"].append(ranks_by_type(model))
            window = []
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(val=f"{history['val_loss'][-1]:.3f}")
        if done % cfg.ckpt_every == 0 or done == run.steps or done == stop_after:
            if rank == 0:  # every process holds the same state: one writes it
                atomic_torch_save(ckpt, {"format": CKPT_FORMAT, "run": dataclasses.asdict(run), "step": done,
                                       "model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict() if sched is not None else None,
                                       "generator": gen.get_state(), "history": history})
            if dist is not None:
                dist.barrier()
        if stop_after is not None and done >= stop_after and done < run.steps:
            return {}
    n_params = sum(p.numel() for p in model.parameters())
    if converted["layers"]:  # an adaptive run ends at other ranks than it started
        converted["spectral_params"] = sum(spectral_params(m.in_features, m.out_features, m.rank)
                                           for _, m in spectral_layers(model))
    step_s = statistics.median(history["step_s"][-max(1, len(history["step_s"]) // 2):])
    return {
        **dataclasses.asdict(run),
        "val_loss": history["val_loss"][-1], "val_ppl": math.exp(history["val_loss"][-1]),
        "train_loss": history["train_loss"][-1], "params": n_params,
        "converted": converted,
        "compression": converted["dense_params"] / converted["spectral_params"] if converted["layers"] else 1.0,
        "step_s": step_s, "tokens_per_s": cfg.batch * cfg.seq / step_s,
        "peak_rss_mb": peak_rss_mib(), "orthonormality_error": orthonormality(model),
        "curve": {k: history[k] for k in ("eval_step", "val_loss", "train_loss", "ranks")},
        "rank_changes": sched.history if sched is not None else [],
        "survival": sched.survival() if sched is not None else [],
        "wall_s": sum(history["step_s"]),
    }


# ------------------------------------------------------------------------------------ the sweep
def method_name(rank: Optional[int]) -> str:
    return "dense" if rank is None else f"r{rank}"


def plan_stage(stage: str, cfg: Config, best_lr: Dict[str, float]) -> List[Run]:
    methods = [None] + list(cfg.ranks)
    if stage == "lr":
        return [Run(f"lr-{method_name(r)}-{lr:g}", "lr", r, lr, cfg.sweep_steps, cfg.schedule)
                for r in methods for lr in cfg.lr_sweep]
    if stage == "main":
        return [Run(f"main-{method_name(r)}", "main", r, best_lr[method_name(r)], cfg.steps, cfg.schedule)
                for r in methods]
    k = cfg.schedule_rank
    if stage == "schedule":
        return [Run(f"schedule-{method_name(r)}-{s}", "schedule", r, best_lr[method_name(r)], cfg.steps, s)
                for r in (None, k) for s in SCHEDULES if s != cfg.schedule]
    if stage == "ablation":
        lr = best_lr[method_name(k)]
        return [Run(f"ablation-r{k}-preserve", "ablation", k, lr, cfg.steps, cfg.schedule, preserve_function=True),
                Run(f"ablation-r{k}-s{cfg.s_lr_mult:g}x", "ablation", k, lr, cfg.steps, cfg.schedule,
                    s_lr_mult=cfg.s_lr_mult)]
    if stage == "adaptive":
        lr = best_lr.get(method_name(cfg.adaptive_budget_rank), cfg.lr_sweep[0])
        return [Run(f"adaptive-r{cfg.adaptive_start}-budget-r{cfg.adaptive_budget_rank}", "adaptive",
                    cfg.adaptive_start, lr, cfg.steps, cfg.schedule, adaptive=True),
                Run(f"prune-r{cfg.prune_start}-budget-r{cfg.adaptive_budget_rank}", "adaptive", cfg.prune_start, lr,
                    cfg.steps, cfg.schedule, adaptive=True, budget_by=max(1, round(cfg.prune_by * cfg.steps)))]
    raise ValueError(f"unknown stage {stage!r}")


def _loss_at_time(rec: Dict, t: float) -> float:
    """Validation loss of a run after ``t`` seconds of training steps (linear between evaluations;
    the curve starts with the untrained model's loss at step 0)."""
    per_step = rec["wall_s"] / rec["steps"]
    times = [s * per_step for s in rec["curve"]["eval_step"]]
    losses = rec["curve"]["val_loss"]
    if t >= times[-1]:
        return losses[-1]
    for (t0, l0), (t1, l1) in zip(zip(times, losses), zip(times[1:], losses[1:])):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / max(t1 - t0, 1e-12)
    return losses[0]


def summarise(runs: Dict[str, Dict], cfg: Config) -> Dict:
    """The sweep table (main stage), each rank's gap to dense at equal steps and at equal wall-clock
    (both compared after the shorter of the two runs' training time)."""
    main = {r["name"][len("main-"):]: r for r in runs.values() if r["stage"] == "main"}
    main.update({r["name"]: r for r in runs.values() if r["stage"] == "adaptive"})
    dense = main.get("dense")
    table = {}
    for m, r in main.items():
        row = {k: r[k] for k in ("lr", "val_loss", "val_ppl", "train_loss", "params", "compression",
                                 "step_s", "tokens_per_s", "peak_rss_mb", "orthonormality_error")}
        if dense is not None:
            row["gap_equal_steps"] = r["val_loss"] / dense["val_loss"] - 1
            t = min(r["wall_s"], dense["wall_s"])
            row["equal_time_s"] = t
            row["gap_equal_time"] = _loss_at_time(r, t) / _loss_at_time(dense, t) - 1
        table[m] = row
    return table


def load_results(path: pathlib.Path, cfg: Config, resume: bool) -> Dict[str, Dict]:
    """Finished runs already in the results file (kept only with ``--resume`` and the same config)."""
    if not resume or not path.exists():
        return {}
    with open(path) as fh:
        old = json.load(fh)
    if old.get("config") != json.loads(json.dumps(dataclasses.asdict(cfg))):
        raise RuntimeError(f"{path} was written with another configuration; drop --resume to start over")
    return old["metrics"]["runs"]


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(ap, PRESETS)
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="depth (default: the preset's; 0 = the shape's own)")
    ap.add_argument("--targets", choices=sorted(TARGETS), help="which linear layers become spectral")
    ap.add_argument("--ranks", type=int, nargs="+")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--vocab", type=int, help="tokenizer vocabulary size")
    ap.add_argument("--schedule", choices=SCHEDULES)
    ap.add_argument("--stages", nargs="+", choices=["lr", "main", "schedule", "ablation", "adaptive"])
    ap.add_argument("--lr", type=float, help="skip the lr stage: every method uses this lr")
    ap.add_argument("--dataset", help="'shakespeare' (offline default) or a datasets name, e.g. 'text'")
    ap.add_argument("--data-files", help="files for --dataset text (or other file-based loaders)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"])
    ap.add_argument("--seed", type=int)
    ap.add_argument("--resume", action="store_true", help="keep finished runs, continue from checkpoints")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--ckpt-dir", default=None, help="default: <results-dir>/../runs/rank_sweep")
    args = ap.parse_args(argv)

    cfg = config_from_args(Config, PRESETS, args, ("shape", "targets", "ranks", "steps", "batch", "seq", "vocab",
                                                   "schedule", "stages", "dataset", "dtype", "seed"))
    if args.layers is not None:
        cfg.layers = args.layers or None
    if args.lr is not None:
        cfg.lr_sweep, cfg.stages = [args.lr], [s for s in cfg.stages if s != "lr"]
    if min(cfg.steps, cfg.batch, cfg.seq, *(cfg.ranks or [1])) < 1:
        ap.error("--steps, --batch, --seq and --ranks must be >= 1")
    results_dir = pathlib.Path(args.results_dir or RESULTS_DIR)
    ckpt_dir = pathlib.Path(args.ckpt_dir) if args.ckpt_dir else results_dir.parent / "runs" / "rank_sweep"
    out_path = results_dir / "rank_sweep.json"
    # processes on one machine share its cores (oversubscribed OpenMP threads spin and crawl)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    init_distributed()
    rank, world, dist = _world()
    t0 = time.time()
    load_kwargs = {"data_files": args.data_files} if args.data_files else {}
    if rank != 0:  # rank 0 fills the caches (download, tokenizer, tokens) first
        dist.barrier()
    data = data_lib.prepare(cfg.dataset, cfg.vocab, **load_kwargs)
    if rank == 0 and dist is not None:
        dist.barrier()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"rank_sweep: {world} process(es), preset {cfg.preset}, SmolLM2-{cfg.shape} shape at {cfg.layers or 'full'} layers, "
          f"targets {cfg.targets}, ranks {cfg.ranks}, {cfg.steps} steps of {cfg.batch}x{cfg.seq} tokens; "
          f"data {data.info['train_tokens']:,} train / {data.info['val_tokens']:,} validation tokens")
    runs = load_results(out_path, cfg, args.resume)
    best_lr: Dict[str, float] = {method_name(r): cfg.lr_sweep[0] for r in [None] + list(cfg.ranks)}
    sweep: Dict[str, Dict[str, float]] = {}
    for stage in cfg.stages:
        for run in plan_stage(stage, cfg, best_lr):
            if run.name not in runs:
                runs[run.name] = train_run(run, cfg, data, ckpt_dir, resume=args.resume)
                if rank == 0:
                    write(out_path, cfg, runs, data, best_lr, sweep, t0)  # after every run: nothing lost
            r = runs[run.name]
            say(f"  {run.name:28s} lr {run.lr:.0e}  val {r['val_loss']:.4f}  ppl {r['val_ppl']:8.2f}  "
                  f"{r['tokens_per_s']:8.0f} tok/s  params {r['params'] / 1e6:.2f}M")
        if stage == "lr":
            for m in best_lr:
                by_lr = {str(r["lr"]): r["val_loss"] for r in runs.values()
                         if r["stage"] == "lr" and method_name(r["rank"]) == m}
                sweep[m] = by_lr
                best_lr[m] = float(min(by_lr, key=by_lr.get))
    metrics = {"runs": runs, "table": summarise(runs, cfg), "best_lr": best_lr}
    if rank == 0:
        metrics = write(out_path, cfg, runs, data, best_lr, sweep, t0)
        print(f"wrote {out_path} ({time.time() - t0:.0f} s)")
    if dist is not None:
        dist.barrier()
    return metrics


def write(path: pathlib.Path, cfg: Config, runs: Dict[str, Dict], data: data_lib.TokenData,
          best_lr: Dict[str, float], sweep: Dict, t0: float) -> Dict:
    metrics = {"runs": runs, "table": summarise(runs, cfg), "best_lr": best_lr, "lr_sweep": sweep,
               "data": data.info, "paper": PAPER, "total_wall_s": time.time() - t0}
    write_results("rank_sweep", dataclasses.asdict(cfg), metrics, results_dir=path.parent)
    return metrics


if __name__ == "__main__":
    main()
