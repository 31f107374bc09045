"""A full training step of a LLaMA-3-70B-shaped network with every weight spectral, measured.

The model is Hugging Face ``transformers``' ``LlamaForCausalLM`` with LLaMA-3-70B's shapes (80
layers, d=8192, ffn=28672, 64 query heads, 8 KV heads of dim 128, RoPE, RMSNorm, SwiGLU, causal
softmax attention, vocabulary 128,256), built on the ``meta`` device and ``spectralize``-d at rank
32 (q, k, v, o, gate, up, down, the token embedding and the LM head), so no dense weight ever
exists. A step is forward, next-token cross-entropy on random token ids, backward, SpectralAdam
(exact fp32 Adam unless said) and the retraction.

Each configuration runs in a fresh subprocess, which reports its peak resident memory
(``VmHWM`` from ``/proc/self/status``) after every phase, the time of each phase and an account
of what holds memory (parameters, gradients, optimizer state; activations are the rest):

  reference   gradients held, no checkpointing (the paper's recipe, on the full architecture)
  ckpt        + activation checkpointing per decoder layer, and the LM head + cross-entropy
              computed in checkpointed chunks of 32 positions (the 128,256-way logits of the whole
              sequence, 66 MB, and their gradient never exist at once)
  ckpt_sib    + step in backward (each update applied as its gradient arrives, gradient freed)
  ckpt2_sib   + nested checkpointing: the layers run in ~sqrt(L) checkpointed segments, each layer
              checkpointed inside its segment, so only the segment inputs and one segment's layer
              inputs are kept (18 hidden states at 80 layers instead of 80: -250 MB) for one more
              forward pass of compute
  ckpt2_sib_bf16  + Adam moments stored in bf16
  ckpt2_sib_8bit  + Adam moments stored as blockwise 8-bit codes (SpectralAdam(state_dtype=torch.uint8))
  ckpt2_sib_thp   ckpt2_sib with the large tensors on transparent huge pages (``GLIBC_TUNABLES=
              glibc.malloc.hugetlb=1 THP_MEM_ALLOC_ENABLE=1``): under the tuned settings each large
              short-lived tensor is a fresh ``mmap``, and first touching it 4 KB page by page is
              most of the eager step's time (system time and minor faults, see
              ``experiments.common.HUGE_PAGES_TUNABLE``)
  ckpt2_sib_compiled  ckpt2_sib_thp + every decoder layer through ``torch.compile`` (inductor):
              RMSNorm, RoPE, SwiGLU and the residual adds fused, in the forward and both recomputes

Every configuration runs with glibc told to keep few arenas and to return freed memory
(``MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=131072``; ``--malloc system`` for the defaults):
without it a step-in-backward run keeps ~4-5 GB of freed but fragmented arena memory.

The quick preset runs 4 and 8 layers and extrapolates each figure linearly to 80 layers (saying
so in the results; measured here, the fit falls ~0.2-0.25 GiB short of the 80-layer measurement
for every configuration); the paper preset runs all 80 layers and writes
``results/memory_70b_paper.json``.

    python -m experiments.memory_70b --preset quick
    python -m experiments.memory_70b --layers 2 --configs reference ckpt_sib     # a custom run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from experiments.common import (
    add_preset_argument,
    config_from_args,
    huge_pages_env,
    peak_rss_mib,
    progress,
    seed_everything,
    write_results,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIGS = {  # checkpointing: None, "layer" (each decoder layer) or "nested" (layers inside segments)
    "reference": dict(checkpointing=None, step_in_backward=False, state_dtype=None),
    "ckpt": dict(checkpointing="layer", step_in_backward=False, state_dtype=None),
    "ckpt_sib": dict(checkpointing="layer", step_in_backward=True, state_dtype=None),
    "ckpt2_sib": dict(checkpointing="nested", step_in_backward=True, state_dtype=None),
    "ckpt2_sib_bf16": dict(checkpointing="nested", step_in_backward=True, state_dtype="bf16"),
    "ckpt2_sib_8bit": dict(checkpointing="nested", step_in_backward=True, state_dtype="8bit"),
    "ckpt2_sib_thp": dict(checkpointing="nested", step_in_backward=True, state_dtype=None, huge_pages=True),
    "ckpt2_sib_compiled": dict(checkpointing="nested", step_in_backward=True, state_dtype=None, huge_pages=True,
                               compile=True),
}
STATE_DTYPES = {None: None, "bf16": torch.bfloat16, "8bit": torch.uint8}  # SpectralAdam(state_dtype=...)
DESCRIPTIONS = {
    "reference": "gradients held, no checkpointing (the paper's recipe)",
    "ckpt": "+ activation checkpointing per decoder layer, LM head + loss in checkpointed chunks",
    "ckpt_sib": "+ step in backward (no gradient held)",
    "ckpt2_sib": "+ nested checkpointing (layers in ~sqrt(L) checkpointed segments)",
    "ckpt2_sib_bf16": "+ Adam moments in bf16",
    "ckpt2_sib_8bit": "+ Adam moments as blockwise 8-bit codes (instead of bf16)",
    "ckpt2_sib_thp": "ckpt2_sib + large tensors on transparent huge pages (fewer page faults)",
    "ckpt2_sib_compiled": "ckpt2_sib_thp + decoder layers compiled by torch.compile (inductor)",
}
LOSS_CHUNK = 32  # positions per cross-entropy chunk where checkpointing is on
LLAMA3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=8192, tie_word_embeddings=False)
PAPER = {
    "peak_mb_steam_deck": 7235, "peak_mb_m4_pro": 7938, "dense_fp32_adam_gb": 1245,
    "spectral_params": 452e6, "dense_params_convention": 77.8e9,
    "compression": {  # shape -> (MB for param + grad + Adam at k=32, ratio)
        "576x1536": (1.1, 13), "2048x8192": (5.2, 51), "4096x11008": (7.7, 93),
        "4096x17408": (11.0, 104), "8192x28672": (18.9, 199),
    },
}
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclass
class Config:
    preset: str = "quick"
    layers: List[int] = field(default_factory=lambda: [4, 8])
    extrapolate_to: Optional[int] = 80
    rank: int = 32
    seq: int = 128
    batch: int = 1
    steps: int = 3
    lr: float = 1e-4
    configs: List[str] = field(default_factory=lambda: list(CONFIGS))
    malloc: str = "tuned"
    dtype: str = "fp32"  # parameter dtype: fp32 or bf16
    effect_steps: Optional[int] = None  # the moment-dtype paragraph's sine runs (None: the proof's 2,000)


PRESETS = {
    "quick": dict(layers=[4, 8], extrapolate_to=80),
    # first contact: the levers that stack (the extra allocator and torch.compile variants, plain
    # per-layer checkpointing and checkpointing + step-in-backward without the two-level split are
    # left to quick: together they took ~185 s of 382 on a 2-core EPYC); depths 2 and 4 and 500-step
    # sine runs (4 and 8 layers with 2,000 steps: 262 s there)
    "fast": dict(layers=[2, 4], extrapolate_to=80, effect_steps=500,
                 configs=["reference", "ckpt2_sib", "ckpt2_sib_bf16", "ckpt2_sib_8bit"]),
    "paper": dict(layers=[80], extrapolate_to=None),
    "smoke": dict(layers=[1, 2], extrapolate_to=None, steps=3, seq=16, effect_steps=30),
}


# ------------------------------------------------------------------------------------- the model
def build_model(layers: int, rank: int):
    """LLaMA-3-70B-shaped ``LlamaForCausalLM`` with ``layers`` layers, all weights spectral, on CPU."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from stiefel_sct import spectralize

    config = transformers.LlamaConfig(num_hidden_layers=layers, **LLAMA3_70B)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    spectralize(model, rank=rank, embeddings=True, device="cpu")
    # what is left on meta: RMSNorm weights (init 1) and the RoPE buffers (recomputed on CPU)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if "Norm" not in type(module).__name__:
                    raise RuntimeError(f"unexpected dense parameter left on meta: {type(module).__name__}.{name}")
                module._parameters[name] = torch.nn.Parameter(torch.ones(p.shape))
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model, config


def dense_equivalent_params(config, layers: int) -> int:
    """Parameters of the dense model with the real GQA shapes."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d  # q, o; k, v; gate, up, down; 2 norms
    return layers * per_layer + 2 * v * d + d


def paper_convention_params(layers: int, d: int = 8192, f: int = 28672) -> int:
    """The paper's count: 4 square attention matrices and 3 MLP matrices per layer, nothing else."""
    return layers * (4 * d * d + 3 * d * f)


# --------------------------------------------------------------------------------------- worker
def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def enable_layer_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 5's
    ``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` before it)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_decoder_layers(model) -> None:
    """Every decoder layer through ``torch.compile`` (inductor, static shapes). The layers share
    their structure and shapes, so dynamo compiles one graph (forward and backward) for all of
    them; activation checkpointing wraps the compiled call, so the recomputes run it too."""
    for layer in model.model.layers:
        layer.compile(dynamic=False)


def nested_hidden_states(model, ids: torch.Tensor, segments: int) -> torch.Tensor:
    """The decoder's final hidden states with the layers run in ``segments`` checkpointed groups.

    The same computation as ``model.model(input_ids=ids)`` (the model's own modules, mask and
    rotary embeddings, in its order), with one more level of activation checkpointing around
    groups of layers; the layers keep their own per-layer checkpointing inside a group.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    mask = create_causal_mask(config=inner.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=positions)
    rope = inner.rotary_emb(hidden, position_ids=positions)

    def run(h, group):
        for layer in group:
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        return h

    layers = list(inner.layers)
    size = -(-len(layers) // max(1, segments))
    for i in range(0, len(layers), size):
        hidden = checkpoint(run, hidden, layers[i:i + size], use_reentrant=False)
    return inner.norm(hidden)


def chunked_causal_lm_loss(model, ids: torch.Tensor, chunk: int = LOSS_CHUNK,
                           segments: Optional[int] = None) -> torch.Tensor:
    """Next-token cross-entropy (mean over positions, as the model's own loss) with the LM head and
    the loss evaluated in checkpointed chunks: at most ``chunk x vocab`` logits live at a time.
    ``segments``: run the decoder layers as that many checkpointed groups (:func:`nested_hidden_states`)."""
    from torch.utils.checkpoint import checkpoint

    if segments is None:
        hidden = model.model(input_ids=ids).last_hidden_state
    else:
        hidden = nested_hidden_states(model, ids, segments)
    hidden = hidden[:, :-1].reshape(-1, model.config.hidden_size)
    labels = ids[:, 1:].reshape(-1)

    def piece(h, y):
        return torch.nn.functional.cross_entropy(model.lm_head(h).float(), y, reduction="sum")

    total = sum(checkpoint(piece, hidden[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
                for i in range(0, labels.numel(), chunk))
    return total / labels.numel()


def build_run(layers: int, name: str, rank: int, lr: float, dtype: str = "fp32"):
    """``(model, config, optimizer, loss_of)`` for configuration ``name``: the spectral model in
    training mode with the configuration's checkpointing and compilation, its ``SpectralAdam``, and
    ``loss_of(ids)``, the forward pass and loss the configuration takes (the worker and
    ``benchmarks/profile_step`` both step through this)."""
    from stiefel_sct import SpectralAdam

    opts = CONFIGS[name]
    model, config = build_model(layers, rank)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    model.train()
    if opts["checkpointing"]:
        enable_layer_checkpointing(model)
    if opts.get("compile"):
        compile_decoder_layers(model)
    # nested: ~sqrt(L) segments of ~sqrt(L) layers keep the fewest hidden states
    segments = max(1, round(math.sqrt(layers))) if opts["checkpointing"] == "nested" else None
    opt = SpectralAdam(model.parameters(), lr=lr, state_dtype=STATE_DTYPES[opts["state_dtype"]],
                       step_in_backward=opts["step_in_backward"])

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        if opts["checkpointing"]:
            return chunked_causal_lm_loss(model, ids, segments=segments)
        return model(input_ids=ids, labels=ids).loss

    return model, config, opt, loss_of


def worker(layers: int, name: str, cfg: Config) -> Dict:
    """One configuration in this (fresh) process; returns its measurements."""
    from stiefel_sct import is_stiefel, orthonormality_error

    seed_everything(0)
    t0 = time.perf_counter()
    model, config, opt, loss_of = build_run(layers, name, cfg.rank, cfg.lr, cfg.dtype)
    params = list(model.parameters())
    out = {"config": name, "layers": layers, "build_s": time.perf_counter() - t0,
           "params": sum(p.numel() for p in params), "param_bytes": _bytes(params),
           "dense_params": dense_equivalent_params(config, layers),
           "paper_convention_params": paper_convention_params(layers),
           "peak_mb_after": {"build": peak_rss_mib()}, "steps": []}
    gen = torch.Generator().manual_seed(1)
    for _ in range(cfg.steps):
        ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.seq), generator=gen)
        rec = {}
        t = time.perf_counter()
        loss = loss_of(ids)
        rec["forward_s"] = time.perf_counter() - t
        rec["peak_mb_forward"] = peak_rss_mib()
        t = time.perf_counter()
        loss.backward()
        rec["backward_s"] = time.perf_counter() - t
        rec["peak_mb_backward"] = peak_rss_mib()
        rec["grad_bytes"] = _bytes(p.grad for p in params if p.grad is not None)
        t = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec["step_s"] = time.perf_counter() - t
        rec["peak_mb_step"] = peak_rss_mib()
        rec["loss"] = float(loss.detach())
        out["steps"].append(rec)
    state = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    out["state_bytes"] = _bytes(state)
    out["grad_bytes_held"] = max(r["grad_bytes"] for r in out["steps"])
    out["peak_mb"] = peak_rss_mib()
    factors = [p for p in params if is_stiefel(p)]
    out["orthonormality_error"] = max(orthonormality_error(p) for p in factors[:: max(1, len(factors) // 64)])
    out["step_time_s"] = {k: out["steps"][-1][k] for k in ("forward_s", "backward_s", "step_s")}
    return out


def run_config(layers: int, name: str, cfg: Config) -> Dict:
    """``worker`` in a fresh subprocess (so its VmHWM is this configuration's alone)."""
    env = dict(os.environ)
    if cfg.malloc == "tuned":
        env.update(MALLOC_ENV)
    if CONFIGS[name].get("huge_pages"):
        env.update(huge_pages_env(env))
    cmd = [sys.executable, "-m", "experiments.memory_70b", "--worker", name, "--worker-layers", str(layers),
           "--config-json", json.dumps(dataclasses.asdict(cfg))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory_70b worker {name} (layers {layers}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(runs: List[Dict], key, target: int) -> float:
    """Linear fit of ``key`` (a field name, or a function of a run) over the measured depths,
    evaluated at ``target`` layers."""
    xs = [r["layers"] for r in runs]
    ys = [key(r) if callable(key) else r[key] for r in runs]
    if len(set(xs)) < 2:
        raise ValueError("extrapolation needs two depths")
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    return ys[0] + slope * (target - xs[0])


def compression_table(rank: int) -> List[Dict]:
    """Per-layer memory (param + grad + Adam, fp32) at ``rank``, by formula and measured."""
    from stiefel_sct import SpectralAdam, SpectralLinear

    rows = []
    for shape in PAPER["compression"]:
        m, n = (int(v) for v in shape.split("x"))
        layer = SpectralLinear(m, n, rank, bias=False)
        opt = SpectralAdam(layer.parameters(), lr=1e-4)
        layer(torch.randn(2, m)).sum().backward()
        opt.step()
        measured = _bytes(layer.parameters()) + _bytes(p.grad for p in layer.parameters()) + _bytes(
            t for s in opt.state.values() for k, t in s.items() if k != "step")
        formula = 16 * rank * (m + n + 1)
        paper_mb, paper_ratio = PAPER["compression"][shape]
        rows.append({"shape": shape, "rank": rank, "dense_mb": 16 * m * n / 1e6, "sct_mb": formula / 1e6,
                     "measured_mb": measured / 1e6, "ratio": m * n / (rank * (m + n + 1)),
                     "paper_mb": paper_mb, "paper_ratio": paper_ratio})
    return rows


def state_dtype_effect(seeds: int = 3, steps: Optional[int] = None) -> Dict:
    """What low-precision Adam moments cost in loss: SCT on the sine MLP proof (cosine lr), fp32
    vs bf16 vs blockwise 8-bit moments; ``steps``: the proof's own (2,000) unless given."""
    from experiments import mlp_proofs

    out = {}
    for name, dtype in (("fp32", None), ("bf16", "bf16"), ("8bit", "8bit")):
        cfg = mlp_proofs.Config(state_dtype=dtype)
        if steps is not None:
            cfg.steps = steps
        vals = [mlp_proofs.run_one("sine", "sct", s, cfg.lr, "cosine", cfg)["metric"] for s in range(seeds)]
        out[name] = {"mse_mean": sum(vals) / len(vals), "mse": vals, "steps": cfg.steps}
    return out


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_argument(ap, PRESETS)
    ap.add_argument("--layers", type=int, nargs="+", help="depths to run (overrides the preset)")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="configurations to run")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="parameter dtype")
    ap.add_argument("--malloc", choices=["tuned", "system"])
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cfg = Config(**json.loads(args.config_json))
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        print(json.dumps(worker(args.worker_layers, args.worker, cfg)))
        return {}

    cfg = config_from_args(Config, PRESETS, args, ("steps", "seq", "batch", "rank", "dtype", "malloc", "configs"))
    if args.layers:
        cfg.layers, cfg.extrapolate_to = args.layers, None
    if min(cfg.steps, cfg.seq, cfg.batch, cfg.rank, *cfg.layers) < 1:
        ap.error("--steps, --seq, --batch, --rank and --layers must be >= 1")
    jobs = [(n, c) for c in cfg.configs for n in cfg.layers]
    print(f"memory_70b: preset {cfg.preset}, depths {cfg.layers}, configurations {cfg.configs}, "
          f"{cfg.steps} steps of seq {cfg.seq}, one fresh process each")
    t0 = time.time()
    runs = [run_config(n, c, cfg) for n, c in progress(jobs, desc="memory_70b")]
    by_config = {c: [r for r in runs if r["config"] == c] for c in cfg.configs}
    summary = {}
    for c, rs in by_config.items():
        last = rs[-1]
        row = {"layers": last["layers"], "peak_mb": last["peak_mb"], "params": last["params"],
               "dense_params": last["dense_params"], "param_mb": last["param_bytes"] / 2**20,
               "grad_mb_held": last["grad_bytes_held"] / 2**20, "state_mb": last["state_bytes"] / 2**20,
               "step_time_s": last["step_time_s"], "orthonormality_error": last["orthonormality_error"],
               "extrapolated": False}
        if cfg.extrapolate_to and len(rs) > 1:
            target = cfg.extrapolate_to
            row.update(layers=target, extrapolated=True, measured_layers=[r["layers"] for r in rs],
                       peak_mb=extrapolate(rs, "peak_mb", target),
                       params=int(extrapolate(rs, "params", target)),
                       dense_params=round(extrapolate(rs, "dense_params", target)),  # exactly linear
                       param_mb=extrapolate(rs, "param_bytes", target) / 2**20,
                       grad_mb_held=extrapolate(rs, "grad_bytes_held", target) / 2**20,
                       state_mb=extrapolate(rs, "state_bytes", target) / 2**20,
                       step_time_s={k: extrapolate(rs, lambda r, k=k: r["step_time_s"][k], target)
                                    for k in rs[-1]["step_time_s"]})
        row["paper_convention_params"] = paper_convention_params(row["layers"])
        row["activations_mb"] = max(0.0, row["peak_mb"] - row["param_mb"] - row["grad_mb_held"] - row["state_mb"])
        summary[c] = row
    ref = summary.get("reference")
    if ref:
        for row in summary.values():
            row["peak_vs_reference"] = row["peak_mb"] / ref["peak_mb"]
    effect = state_dtype_effect(seeds=1 if cfg.preset in ("smoke", "fast") else 3, steps=cfg.effect_steps)
    metrics = {"summary": summary, "descriptions": {c: DESCRIPTIONS[c] for c in cfg.configs}, "runs": runs,
               "compression": compression_table(cfg.rank), "paper": PAPER,
               "state_dtype_effect_sine_mse": effect,
               "malloc_env": MALLOC_ENV if cfg.malloc == "tuned" else {},
               "huge_pages_env": {c: huge_pages_env({}) for c in cfg.configs if CONFIGS[c].get("huge_pages")},
               "total_wall_s": time.time() - t0}
    name = "memory_70b_paper" if cfg.preset == "paper" else "memory_70b"  # both feed the report
    path = write_results(name, dataclasses.asdict(cfg), metrics, results_dir=args.results_dir)
    for c, row in summary.items():
        tag = f"extrapolated from {row['measured_layers']} layers" if row["extrapolated"] else "measured"
        print(f"  {c:14s} {row['layers']} layers ({tag}): peak {row['peak_mb'] / 1024:.2f} GiB "
              f"({row['peak_mb'] * 2**20 / 1e9:.2f} GB), "
              f"params {row['params'] / 1e6:.0f}M for {row['dense_params'] / 1e9:.2f}B dense, "
              f"step fwd/bwd/opt {row['step_time_s']['forward_s']:.2f}/{row['step_time_s']['backward_s']:.2f}/"
              f"{row['step_time_s']['step_s']:.2f} s")
    print(f"wrote {path} ({metrics['total_wall_s']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
