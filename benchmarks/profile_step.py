"""Where a training step's time goes: ``torch.profiler`` over one step of each workload, ops grouped
into categories, GEMM throughput against this machine's dense GEMM rate measured in the same run,
user vs system CPU time and page faults (what the allocator costs).

Workloads:
  ``smollm2:<method>``  one SmolLM2-135M fine-tuning step (``bench_finetune``'s step and methods:
                        dense, lora_r16, sct_b50, sct_b25, sct_b50_factors, sct_b25_factors);
  ``70b:<config>``      one step of ``memory_70b``'s LLaMA-70B-shaped spectral model (``--layers``,
                        e.g. ckpt2_sib). Allocator settings are read at process start, so they are
                        this process's environment's: for ckpt2_sib_thp / ckpt2_sib_compiled set
                        ``experiments.common.huge_pages_env``'s two variables yourself;
  ``optimizer``         one ``SpectralAdam`` step on ``bench_optimizer``'s parameter set (``--layers``).

    python -m benchmarks.profile_step smollm2:sct_b25 smollm2:dense 70b:ckpt2_sib optimizer --layers 4
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Callable, Dict, List, Tuple

import torch

CATEGORIES = [  # (category, op-name fragments), first match wins
    ("GEMM", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("LM head loss (log_softmax, nll)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("Adam kernels", ("_fused_adam", "_foreach_", "adam")),
    ("retraction k x k (cholesky, solve, inverse)", ("cholesky", "triangular", "linalg_inv", "linalg_solve")),
    ("copies, fills, casts", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::to", "aten::cat", "aten::clone",
                              "aten::index", "aten::embedding")),
    ("elementwise, norms, SwiGLU", ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt",
                                    "aten::neg", "aten::div", "aten::sum", "aten::sub", "aten::tanh", "aten::where",
                                    "aten::norm", "vector_norm", "aten::sqrt", "aten::maximum", "aten::lerp",
                                    "aten::addcmul", "aten::addcdiv", "aten::clamp", "aten::sigmoid", "aten::exp")),
]


def category(name: str) -> str:
    for cat, frags in CATEGORIES:
        if any(f in name for f in frags):
            return cat
    return "other ops"


def dense_gemm_gflops(size: int = 2048, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9


def workload(spec: str, layers: int) -> Callable[[], None]:
    """A closure running one step of ``spec`` (already warmed up by one step)."""
    kind, _, arg = spec.partition(":")
    if kind == "smollm2":
        from benchmarks import bench_finetune as bf

        model, opt = bf.build(arg or "sct_b25", "random", torch.device("cpu"))
        step = bf.make_step(model, opt, 4, 128, torch.device("cpu"))
    elif kind == "70b":
        from experiments import memory_70b as m

        model, config, opt, loss_of = m.build_run(layers, arg or "ckpt2_sib", rank=32, lr=1e-4)
        gen = torch.Generator().manual_seed(1)

        def step() -> None:
            loss_of(torch.randint(0, config.vocab_size, (1, 128), generator=gen)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif kind == "optimizer":
        from benchmarks.bench_optimizer import build_parameter_set
        from stiefel_sct import SpectralAdam

        factors, spectra = build_parameter_set(layers, 32, torch.float32, torch.device("cpu"))
        opt = SpectralAdam(factors + spectra, lr=1e-3)

        def step() -> None:
            opt.step()
    else:
        raise ValueError(f"workload must be smollm2:<method>, 70b:<config> or optimizer, got {spec!r}")
    step()
    step()  # a second warm-up: compiled workloads compile their backward in the first
    return step


def profile(step: Callable[[], None], gemm_peak: float) -> Tuple[str, Dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        step()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    events = prof.key_averages(group_by_input_shape=True)
    by_cat: Dict[str, float] = {}
    gemm_us, gemm_flops = 0.0, 0.0
    shapes: List[Tuple[float, str, str, int]] = []
    others: Dict[str, List[float]] = {}  # op -> [self us, calls]: what "other ops" is made of
    for e in events:
        cat = category(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + e.self_cpu_time_total
        if cat == "other ops":
            entry = others.setdefault(e.key, [0.0, 0])
            entry[0] += e.self_cpu_time_total
            entry[1] += e.count
        if cat == "GEMM":
            gemm_us += e.self_cpu_time_total
            gemm_flops += e.flops or 0
            shapes.append((e.self_cpu_time_total, e.key, str(e.input_shapes)[:70], e.count))
    total = sum(by_cat.values())
    lines = [f"wall {wall:.3f} s (profiled); profiled op time {total / 1e6:.3f} s; CPU user "
             f"{after.ru_utime - before.ru_utime:.2f} s, system {after.ru_stime - before.ru_stime:.2f} s; minor page "
             f"faults {after.ru_minflt - before.ru_minflt:,}", "", "| category | ms | share |", "| --- | ---: | ---: |"]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {us / 1e3:.1f} | {us / total:.0%} |")
    rate = gemm_flops / (gemm_us / 1e6) / 1e9 if gemm_us else 0.0
    lines += ["", f"GEMM: {gemm_flops / 1e9:.1f} GFLOP in {gemm_us / 1e3:.1f} ms = {rate:.0f} GFLOP/s "
                  f"({rate / gemm_peak:.0%} of the 2048^3 GEMM's {gemm_peak:.0f} GFLOP/s measured in this run)", "",
              "| GEMM op | input shapes | calls | ms |", "| --- | --- | ---: | ---: |"]
    for us, key, shape, count in sorted(shapes, reverse=True)[:10]:
        lines.append(f"| {key} | {shape} | {count} | {us / 1e3:.1f} |")
    lines += ["", "| op in \"other ops\" | calls | ms |", "| --- | ---: | ---: |"]
    for key, (us, count) in sorted(others.items(), key=lambda kv: -kv[1][0])[:8]:
        lines.append(f"| {key} | {count} | {us / 1e3:.1f} |")
    figures = {"wall_s": wall, "categories_ms": {k: v / 1e3 for k, v in by_cat.items()}, "gemm_gflops": rate,
               "gemm_peak_gflops": gemm_peak, "minor_faults": after.ru_minflt - before.ru_minflt,
               "sys_s": after.ru_stime - before.ru_stime, "user_s": after.ru_utime - before.ru_utime}
    return "\n".join(lines), figures


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="+")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 70b and optimizer workloads")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    peak = dense_gemm_gflops()
    out = {}
    for spec in args.workloads:
        step = workload(spec, args.layers)
        text, figures = profile(step, peak)
        print(f"\n### {spec}" + (f" ({args.layers} layers)" if not spec.startswith("smollm2") else "") + f"\n\n{text}",
              flush=True)
        out[spec] = figures
        del step
    return out


if __name__ == "__main__":
    main()
