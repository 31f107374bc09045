"""One fine-tuning step of SmolLM2-135M: dense AdamW, PEFT LoRA r=16, PEFT PiSSA r=16, SCT's residual
mode at r=16, and SCT at 50% and 25% of the linear parameters, time and peak memory, interleaved in
one run.

Why a benchmark beside the comparison's own figures: ``transformers`` maps the real weights from
their safetensors file, so a method that reads every weight to convert it (residual mode, PiSSA)
leaves ~0.4 GB of clean file pages resident that LoRA never touches before training (measured:
RssFile 522 vs 124 MiB right after conversion, the live tensors 513 MiB in both); the default
random weights live in process memory, so every method's peak is its own.

The SCT arms ``sct_b50`` / ``sct_b25`` train every parameter, the embedding (tied to the LM head)
and the norms by dense Adam as in the fine-tuning comparison; ``sct_b50_factors`` /
``sct_b25_factors`` train only the spectral factors and leave the rest frozen, as LoRA leaves
everything but its adapters (no embedding gradient, no head weight-gradient GEMM, no dense Adam
state).

Each measurement is a fresh process (so its peak is its own): build the model, convert it for the
method (``experiments.finetune_smollm2.build_method``, the comparison's own code), take one
warm-up step, reset the peak, then time ``--steps`` steps of ``--batch`` x ``--seq`` random tokens
(zero_grad, forward, loss, backward, grad-norm clip 1.0, optimizer step: the comparison's step).
Rounds interleave the methods (round 1: every method, round 2: every method, ...), and each
method's figure is the median over its rounds of the per-process median step.

Peak memory is the process's ``VmHWM`` over the timed steps, reset after the warm-up step and after
``malloc_trim`` hands back what setup freed (CPU), or ``torch.cuda.max_memory_allocated`` (CUDA).
Weights: ``--weights random`` (default) builds the SmolLM2-135M architecture from its config with
random weights (speed does not depend on the values; SCT's budget then spreads rank by random
spectra); ``--weights real`` loads the real Q4_1 GGUF weights dequantised to fp32
(``experiments/smollm2.py``, CPU machine with the cache).

    python -m benchmarks.bench_finetune                          # 3 rounds, 4 timed steps each
    python -m benchmarks.bench_finetune --device cuda --rounds 3

Where the step's time goes: ``python -m benchmarks.profile_step smollm2:sct_b25`` (same step).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

from experiments.common import (
    CACHING_MALLOC_ENV,
    ROOT,
    atomic_write_json,
    environment,
    huge_pages_env,
    peak_rss_mib,
    release_free_memory,
    reset_peak_rss,
)

METHODS = ("dense", "lora_r16", "pissa_r16", "residual_r16", "sct_b50", "sct_b25", "sct_b50_factors", "sct_b25_factors")
SCT_ARMS = tuple(m for m in METHODS if m.startswith("sct_"))
COMPARED = SCT_ARMS + ("residual_r16", "pissa_r16")  # arms with ratios to dense and LoRA
MALLOC_MODES = ("system", "caching", "thp")
# SmolLM2-135M(-Instruct)'s architecture (its config.json)
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")


def build_model(weights: str, device: torch.device):
    """SmolLM2-135M as a ``LlamaForCausalLM`` in fp32 on ``device``, random or real weights."""
    if weights == "real":
        from experiments.smollm2 import load_smollm2

        model, _ = load_smollm2()
    else:
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SMOLLM2_CONFIG)
        model = transformers.LlamaForCausalLM(config)
    return model.to(device).train()


def build(method: str, weights: str, device: torch.device, lr: float = 3e-4, compile_layers: bool = False):
    """``(model, optimizer)`` for ``method`` through the fine-tuning comparison's ``build_method``;
    ``compile_layers``: every decoder layer through ``torch.compile(dynamic=True)`` (dynamic: the
    spectral layers' ranks differ from layer to layer, and static shapes recompile past torch's
    limit of 8 and fall back to eager)."""
    from experiments import finetune_smollm2 as ft

    model = build_model(weights, device)
    model, opt, _ = ft.build_method(method, model, ft.Config(), lr)
    if compile_layers:
        for layer in [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
            layer.compile(dynamic=True)
    return model, opt


def make_step(model, opt, batch: int, seq: int, device: torch.device, autocast: str = "none"):
    """One training step closure; ``autocast="bf16"`` runs forward and loss under bf16 autocast
    (parameters, gradients and optimizer state stay fp32)."""
    import contextlib

    from experiments.common import lm_loss

    gen = torch.Generator().manual_seed(1)
    vocab = SMOLLM2_CONFIG["vocab_size"]
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast == "bf16"
               else contextlib.nullcontext())
        with ctx:
            loss = lm_loss(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(method: str, weights: str, device: torch.device, batch: int, seq: int, steps: int,
           autocast: str = "none", compile_layers: bool = False) -> Dict:
    """One process's measurement: build, one warm-up step, reset the peak, ``steps`` timed steps."""
    t0 = time.perf_counter()
    model, opt = build(method, weights, device, compile_layers=compile_layers)
    step = make_step(model, opt, batch, seq, device, autocast)
    step()  # warm-up: optimizer state, allocator, lazily built kernels (and the compilation)
    _sync(device)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trimmed = release_free_memory()  # every method: setup's freed pages (the dense model a conversion replaced) go back
    reset_peak_rss()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib())
    return {"method": method, "step_s": times, "step_s_median": statistics.median(times), "peak_mib": peak,
            "setup_s": setup_s, "malloc_trim": trimmed, "params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_fresh(method: str, malloc: str, args) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_finetune", "--worker", method, "--weights", args.weights,
           "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--autocast", args.autocast] + (["--compile"] if args.compile else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_ARENA_MAX="2", **(CACHING_MALLOC_ENV if malloc == "caching" else {}))
    if malloc == "thp":
        env.update(huge_pages_env(env))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_finetune worker {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: List[Dict], methods: List[str]) -> Dict:
    """Per variant (``method``, or ``method+<malloc>`` for the other allocator settings): medians
    over rounds; ratios of the SCT arms (and residual mode, PiSSA) to dense and LoRA within each
    allocator setting."""
    table = {}
    for m in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == m]
        table[m] = {"step_s_median": statistics.median(r["step_s_median"] for r in mine),
                    "step_s_rounds": [r["step_s_median"] for r in mine],
                    "peak_mib_median": statistics.median(r["peak_mib"] for r in mine),
                    "params_total": mine[0]["params_total"], "params_trainable": mine[0]["params_trainable"]}
    ratios = {}
    for suffix in ["" if mode == "system" else f"+{mode}" for mode in MALLOC_MODES]:
        for sct in COMPARED:
            if sct + suffix not in table:
                continue
            for other in ("dense", "lora_r16"):
                if other + suffix in table:
                    a, b = table[other + suffix], table[sct + suffix]
                    ratios[f"{other}_over_{sct}_time{suffix}"] = a["step_s_median"] / b["step_s_median"]
                    ratios[f"{sct}_over_{other}_peak{suffix}"] = b["peak_mib_median"] / a["peak_mib_median"]
    for m in methods:
        for mode in MALLOC_MODES[1:]:
            if m in table and f"{m}+{mode}" in table:
                ratios[f"{m}_system_over_{mode}_time"] = table[m]["step_s_median"] / table[f"{m}+{mode}"]["step_s_median"]
    return {"table": table, "ratios": ratios}


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per method, interleaved")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--weights", default="random", choices=["random", "real"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--malloc", nargs="+", default=["system"], choices=MALLOC_MODES,
                    help="allocator settings of the workers: system (glibc's defaults: blocks over 32 MB are "
                         "mmap'd and returned when freed), caching (MALLOC_MMAP_MAX_=0, no trim: pages reused), "
                         "thp (system + transparent huge pages: experiments.common.huge_pages_env); several "
                         "interleave every method under each")
    ap.add_argument("--autocast", default="none", choices=["none", "bf16"],
                    help="bf16: forward and loss under torch.autocast (weights, gradients and state stay fp32)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile(dynamic=True) every decoder layer (the warm-up step compiles)")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_finetune_<device>.json)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("rounds", "steps", "batch", "seq"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, device, args.batch, args.seq, args.steps, args.autocast,
                                args.compile)))
        return {}
    print(f"bench_finetune: SmolLM2-135M ({args.weights} weights), {args.batch}x{args.seq} tokens, device {device}, "
          f"methods {args.methods}, malloc {args.malloc}, {args.rounds} rounds x {args.steps} steps, a fresh process "
          "each", flush=True)
    runs = []
    t0 = time.time()
    variants = [(m, mode) for mode in dict.fromkeys(args.malloc) for m in args.methods]
    for r in range(args.rounds):
        for m, mode in variants:
            res = run_fresh(m, mode, args)
            name = m if mode == "system" else f"{m}+{mode}"
            runs.append({**res, "round": r, "malloc": mode, "variant": name})
            print(f"  round {r + 1}/{args.rounds} {name:17s} step {res['step_s_median']:.3f} s (median of {args.steps})  "
                  f"peak {res['peak_mib']:.0f} MiB  [{time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    summary = summarise(runs, args.methods)
    print("\n| method | params | trainable | step s (median of rounds) | peak MiB |\n| --- | ---: | ---: | ---: | ---: |")
    for m, row in summary["table"].items():
        print(f"| {m} | {row['params_total'] / 1e6:.1f}M | {row['params_trainable'] / 1e6:.2f}M | "
              f"{row['step_s_median']:.3f} | {row['peak_mib_median']:.0f} |")
    for k, v in summary["ratios"].items():
        print(f"{k}: {v:.2f}")
    out = pathlib.Path(args.out or ROOT / "results" / f"bench_finetune_{device.type}.json")
    payload = {"benchmark": "bench_finetune", "config": {k: v for k, v in vars(args).items() if k != "worker"},
               "environment": environment(device), "runs": runs, **summary}
    atomic_write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
