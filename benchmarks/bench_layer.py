"""Forward + backward of SpectralLinear vs nn.Linear at LLaMA shapes.

For each shape (in, out), rank and token count: the median time of one forward+backward (input
gradient and all parameter gradients), the speed-up over nn.Linear, the FLOP ratio
``m n / (k (m + n))``, the achieved GFLOP/s of each, the machine's dense-GEMM GFLOP/s measured in
the same run, and the peak of live tensor memory during the step (parameters, input, output
gradient and every tensor created during it; gradients included). Also: two spectral layers that read the same
input (gate/up of an MLP) computed separately vs through one shared ``x @ [U_1 U_2]`` product.

    python -m benchmarks.bench_layer                     # all shapes, ranks 32/128, 256/2048 tokens
    python -m benchmarks.bench_layer --shapes 2048x8192 --tokens 256
    python -m benchmarks.bench_layer --malloc system     # glibc's defaults, see below

On CPU the allocator matters: glibc hands every large block (> 32 MB) back to the kernel when it
is freed, so each new activation of a (tokens x out) layer page-faults fresh memory; at 2048 x
28672 that costs ~70 ms, 4x the GEMM that fills it. ``--malloc caching`` (the default) re-runs the
benchmark with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^40`` (glibc keeps freed memory for
reuse), the setting a CPU training job should use too; both the dense and the spectral layer
benefit.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import weakref

import geoopt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.common import CACHING_MALLOC_ENV, atomic_write_json, environment, parse_dtype
from stiefel_sct import SpectralLinear

ROOT = pathlib.Path(__file__).resolve().parents[1]


class LiveMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode, on top of ``baseline``."""

    def __init__(self, baseline: int = 0):
        super().__init__()
        self.live = baseline
        self.peak = baseline
        self._seen = set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self._seen or st.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, st.nbytes())
        return out


def step_fn(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    """One forward + backward; ``gy`` (the output gradient) is made once, outside the timing."""
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(gy)
    return run


def peak_bytes(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> int:
    base = sum(t.numel() * t.element_size() for t in [*layer.parameters(), x, gy])
    run = step_fn(layer, x, gy)
    with LiveMemory(base) as mem:
        run()
    layer.zero_grad(set_to_none=True)
    return mem.peak


def time_it(fn, min_run_time: float) -> float:
    t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median


def dense_gemm_gflops(dtype, device, size=2048, min_run_time=1.0) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    t = time_it(lambda: torch.mm(a, b), min_run_time)
    return 2 * size**3 / t / 1e9


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["2048x8192", "4096x11008", "8192x28672"],
                    help="in x out shapes")
    ap.add_argument("--ranks", nargs="*", type=int, default=[32, 128])
    ap.add_argument("--tokens", nargs="*", type=int, default=[256, 2048])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange")
    ap.add_argument("--malloc", default="caching", choices=["caching", "system"],
                    help="caching (default): glibc keeps freed memory (MALLOC_MMAP_MAX_=0, no trim), so a "
                         "new activation reuses pages instead of page-faulting fresh ones; system: glibc defaults")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.malloc == "caching" and os.environ.get("MALLOC_MMAP_MAX_") != "0" and argv is None:
        env = dict(os.environ, **CACHING_MALLOC_ENV)
        # glibc reads these at start-up: run this module again in a fresh process image
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_layer", *sys.argv[1:]], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    print(f"torch {torch.__version__}, geoopt {geoopt.__version__}, threads {torch.get_num_threads()}, "
          f"device {device}, dtype {args.dtype}, malloc {args.malloc} "
          f"(MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')})")
    gemm = dense_gemm_gflops(dtype, device, min_run_time=args.min_run_time)
    print(f"dense GEMM (2048^3): {gemm:.0f} GFLOP/s")

    rows = []
    header = (f"{'in x out':>12} {'k':>4} {'tokens':>6} {'dense ms':>9} {'sct ms':>8} {'speedup':>8} "
              f"{'flop ratio':>10} {'sp/ratio':>8} {'dense GF/s':>10} {'sct GF/s':>8} {'dense MiB':>9} {'sct MiB':>8}")
    print(header)
    for shape in args.shapes:
        m, n = (int(v) for v in shape.lower().split("x"))
        dense = nn.Linear(m, n, device=device, dtype=dtype)
        for b in args.tokens:
            x = torch.randn(b, m, device=device, dtype=dtype, requires_grad=True)
            gy = torch.randn(b, n, device=device, dtype=dtype)
            t_dense = time_it(step_fn(dense, x, gy), args.min_run_time)
            mem_dense = peak_bytes(dense, x, gy)
            flop_dense = 3 * 2 * b * m * n
            for k in args.ranks:
                sl = SpectralLinear(m, n, k, device=device, dtype=dtype)
                t_sct = time_it(step_fn(sl, x, gy), args.min_run_time)
                mem_sct = peak_bytes(sl, x, gy)
                flop_sct = 3 * 2 * b * k * (m + n)
                ratio = m * n / (k * (m + n))
                row = dict(in_features=m, out_features=n, rank=k, tokens=b, dense_ms=t_dense * 1e3,
                           sct_ms=t_sct * 1e3, speedup=t_dense / t_sct, flop_ratio=ratio,
                           speedup_over_flop_ratio=t_dense / t_sct / ratio,
                           dense_gflops=flop_dense / t_dense / 1e9, sct_gflops=flop_sct / t_sct / 1e9,
                           dense_peak_mib=mem_dense / 2**20, sct_peak_mib=mem_sct / 2**20)
                rows.append(row)
                print(f"{shape:>12} {k:>4} {b:>6} {row['dense_ms']:>9.1f} {row['sct_ms']:>8.2f} {row['speedup']:>8.1f} "
                      f"{ratio:>10.1f} {row['speedup_over_flop_ratio']:>8.2f} {row['dense_gflops']:>10.0f} "
                      f"{row['sct_gflops']:>8.0f} {row['dense_peak_mib']:>9.0f} {row['sct_peak_mib']:>8.1f}")
            del x, gy
        del dense

    # layers sharing an input: gate/up of a LLaMA-70B MLP
    shared = []
    m, n = 8192, 28672
    for k in args.ranks:
        for b in args.tokens:
            gate, up = (SpectralLinear(m, n, k, bias=False, device=device, dtype=dtype) for _ in range(2))
            x = torch.randn(b, m, device=device, dtype=dtype, requires_grad=True)

            def separate():
                return F.silu(gate(x)) * up(x)

            def fused():
                h = x @ torch.cat([gate.U, up.U], dim=1)  # x read once
                hg, hu = h.split(k, dim=1)
                return F.silu(F.linear(hg * gate.s, gate.V)) * F.linear(hu * up.s, up.V)

            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2  # bf16: 8 mantissa bits
            assert torch.allclose(separate(), fused(), rtol=tol, atol=tol)
            times = {}
            gy = torch.randn(b, n, device=device, dtype=dtype)
            for name, fn in (("separate", separate), ("shared x@[U1 U2]", fused)):
                def run(fn=fn):
                    x.grad = None
                    fn().backward(gy)
                times[name] = time_it(run, args.min_run_time)
            shared.append(dict(rank=k, tokens=b, separate_ms=times["separate"] * 1e3,
                               shared_ms=times["shared x@[U1 U2]"] * 1e3,
                               speedup=times["separate"] / times["shared x@[U1 U2]"]))
            print(f"gate/up {m}x{n} k={k} b={b}: separate {times['separate'] * 1e3:.2f} ms, "
                  f"shared input product {times['shared x@[U1 U2]'] * 1e3:.2f} ms "
                  f"({shared[-1]['speedup']:.2f}x)")

    worst = min(r["speedup_over_flop_ratio"] for r in rows if r["tokens"] == max(args.tokens))
    print(f"\nworst speed-up / FLOP ratio at {max(args.tokens)} tokens: {worst:.2f}")
    out = pathlib.Path(args.out) if args.out else ROOT / "results" / f"bench_layer_{args.dtype}_{args.malloc}.json"
    payload = {"benchmark": "bench_layer", "config": vars(args), "environment": environment(device),
               "dense_gemm_gflops": gemm, "rows": rows, "shared_input": shared,
               "worst_speedup_over_flop_ratio": worst}
    atomic_write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
