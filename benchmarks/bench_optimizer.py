"""One optimizer step on the spectral parameter set of LLaMA-70B-shaped layers.

Per layer (the SCT paper's shape, every linear of a decoder layer spectral at rank K): 11 factors
of (8192, K) (q, k, v, o: U and V; gate, up: U; down: V), 3 of (28672, K) (gate, up: V; down: U)
and 7 spectra ``s`` of (K,). ``--layers 80`` is the full 451M-parameter set.

Methods, timed in one run and interleaved round by round (medians reported):

  (a) torch.optim.Adam(fused=True), no retraction: the floor any Adam step must pay;
  (b) the reference recipe: torch.optim.AdamW (the faster of fused/foreach, picked in warm-up)
      then a per-matrix torch.linalg.qr + sign fix;
  (c) geoopt.optim.RiemannianAdam on geoopt.EuclideanStiefel parameters;
  (d) SpectralAdam with each retraction backend, and with cholqr2 and ``check_finite=False`` (the
      pre-step read of every gradient left out: its share of the step).

Also timed each round: the **floor**, (a) plus the least GEMM work any retraction must do, one
Gram pass ``X^T X`` and one ``X M`` pass (``M`` a ``k x k`` matrix) of every factor, batched by
shape (``torch.bmm`` on stacks of up to 64 factors) at this machine's GEMM rate. SpectralAdam's
ratio to the floor is the figure that travels between machines: the ratio to (a) moves with how
fast the CPU's GEMMs run relative to its memory (2.5-2.7x on an Intel Xeon, 4.2x on an AMD EPYC of
the same size, both 2 cores), the ratio to the floor much less.

All methods update the same parameter tensors (so the set exists once in memory) and share the
Adam moment buffers (timing does not depend on their values). Each round draws a fresh random
gradient and sets the moments to their steady state for it (m = g, v = g^2, step 10,000), and
every method's timed step starts from the same orthonormal snapshot of the parameters: each takes
the same well-warmed Adam step (lr per element) and retracts factors that are exactly one step off
the manifold, as in training. The error column of (a) is that one-step drift.

    python -m benchmarks.bench_optimizer --layers 8 --rank 32
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time

import geoopt
import torch
from torch.utils import benchmark

from experiments.common import atomic_write_json, environment, parse_dtype
from stiefel_sct import RETRACTIONS, SpectralAdam, orthonormality_error, retract_

ROOT = pathlib.Path(__file__).resolve().parents[1]
UNCHECKED = "(d) SpectralAdam cholqr2, check_finite=False"
ADAM = "(a) Adam fused, no retraction"

D_MODEL, D_FFN = 8192, 28672


def build_parameter_set(layers: int, rank: int, dtype: torch.dtype, device: torch.device):
    """Factors (geoopt EuclideanStiefel ManifoldParameters) and spectra of ``layers`` layers."""
    manifold = geoopt.EuclideanStiefel()
    shapes = [(D_MODEL, rank)] * 11 + [(D_FFN, rank)] * 3
    factors = []
    for _ in range(layers):
        for shape in shapes:
            x = torch.randn(shape, dtype=dtype, device=device)
            factors.append(geoopt.ManifoldParameter(x, manifold=manifold))
    retract_(factors)
    spectra = [torch.nn.Parameter(torch.rand(rank, dtype=dtype, device=device) + 0.5) for _ in range(7 * layers)]
    gen = torch.Generator(device=device).manual_seed(0)
    for p in factors + spectra:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype, device=device) * 1e-2
    return factors, spectra


WARM_STEP = 10_000


def share_state(opt, shared, step_as_tensor: bool) -> None:
    """Point ``opt``'s Adam moments at ``shared`` (one pair of buffers for all optimizers).

    The moments start at their steady state for the fixed gradient (``m = g``, ``v = g^2``) and
    every optimizer's step count at 10,000 (bias corrections ~1), so each method takes the same
    well-warmed Adam step (``lr`` per element) whatever the others did before it.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            m, v = shared[p]
            step = torch.tensor(float(WARM_STEP), device=p.device) if step_as_tensor else WARM_STEP
            opt.state[p] = {"step": step, "exp_avg": m, "exp_avg_sq": v}


def qr_loop(factors) -> None:
    """The reference recipe's retraction: one Householder QR per matrix, then the sign fix."""
    with torch.no_grad():
        for p in factors:
            q, r = torch.linalg.qr(p if p.dtype in (torch.float32, torch.float64) else p.float())
            p.copy_(q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype))


FLOOR_CHUNK = 64  # factors per batched GEMM: big enough to run at the GEMM rate, small enough to fit


def gemm_floor(factors, chunk: int = FLOOR_CHUNK):
    """A callable doing one Gram pass (``X^T X``) and one ``X M`` pass of every factor, batched by
    shape in stacks of at most ``chunk`` (reusing one stack per shape: the work of the whole set, the
    memory of ``chunk`` factors per shape), and the FLOPs it does."""
    counts: dict = {}
    for f in factors:
        counts[tuple(f.shape)] = counts.get(tuple(f.shape), 0) + 1
    plans = []
    flops = 0
    for (n, k), count in counts.items():
        c = min(count, chunk)
        like = factors[0]
        x = torch.randn(c, n, k, dtype=like.dtype, device=like.device)
        m = torch.randn(c, k, k, dtype=like.dtype, device=like.device)
        gram, y = torch.empty(c, k, k, dtype=like.dtype, device=like.device), torch.empty_like(x)
        sizes = [c] * (count // c) + ([count % c] if count % c else [])
        plans.append((x, m, gram, y, sizes))
        flops += 2 * 2 * n * k * k * count  # two GEMMs of 2 n k^2 each per factor

    def run() -> None:
        for x, m, gram, y, sizes in plans:
            for size in sizes:
                torch.bmm(x[:size].mT, x[:size], out=gram[:size])
                torch.bmm(x[:size], m[:size], out=y[:size])

    return run, flops


def max_orthonormality_error(factors, sample: int) -> float:
    step = max(1, len(factors) // sample)
    return max(orthonormality_error(p.detach()) for p in factors[::step])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (80 = LLaMA-70B)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of every method each)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["reference", "geoopt"], help="methods to leave out")
    ap.add_argument("--ortho-sample", type=int, default=112, help="factors checked for orthonormality after each step")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_optimizer_L{layers}_r{rank}_{dtype}.json)")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.rank < 1 or args.rounds < 1:
        ap.error("--layers, --rank and --rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    print(f"torch {torch.__version__}, geoopt {geoopt.__version__}, threads {torch.get_num_threads()}, "
          f"device {device}, dtype {args.dtype}")

    factors, spectra = build_parameter_set(args.layers, args.rank, dtype, device)
    params = factors + spectra
    numel = sum(p.numel() for p in params)
    elsize = factors[0].element_size()
    print(f"{args.layers} layers, rank {args.rank}: {len(factors)} factors + {len(spectra)} spectra, "
          f"{numel / 1e6:.1f}M parameters ({numel * elsize / 2**30:.2f} GiB)")
    shared = {p: (p.grad.clone(), p.grad.square()) for p in params}
    snapshot = [p.detach().clone() for p in params]  # orthonormal factors, before any step

    methods = {}
    adam = torch.optim.Adam(params, lr=args.lr, fused=True)
    share_state(adam, shared, True)
    methods[ADAM] = adam.step

    if "reference" not in args.skip:
        ref_fused = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
        ref_foreach = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, foreach=True)
        share_state(ref_fused, shared, True)
        share_state(ref_foreach, shared, True)
        def once(o) -> float:
            return benchmark.Timer("o.step()", globals={"o": o}, num_threads=torch.get_num_threads()).timeit(1).median

        t_fused = min(once(ref_fused) for _ in range(2))
        t_foreach = min(once(ref_foreach) for _ in range(2))
        ref = ref_fused if t_fused <= t_foreach else ref_foreach
        ref_kind = "fused" if ref is ref_fused else "foreach"
        print(f"reference AdamW: fused {t_fused * 1e3:.0f} ms, foreach {t_foreach * 1e3:.0f} ms -> using {ref_kind}")
        del ref_fused, ref_foreach

        def reference_step(ref=ref):
            ref.step()
            qr_loop(factors)

        methods[f"(b) AdamW {ref_kind} + per-matrix QR"] = reference_step

    if "geoopt" not in args.skip and dtype not in (torch.float32, torch.float64):
        print("geoopt RiemannianAdam left out: its QR has no bf16 kernel on this device")
    elif "geoopt" not in args.skip:
        radam = geoopt.optim.RiemannianAdam(params, lr=args.lr)
        share_state(radam, shared, False)
        methods["(c) geoopt RiemannianAdam"] = radam.step

    spectral = SpectralAdam(params, lr=args.lr)
    share_state(spectral, shared, True)
    for backend in RETRACTIONS:
        def spectral_step(backend=backend):
            spectral.param_groups[0]["retraction"] = backend
            spectral.step()

        methods[f"(d) SpectralAdam {backend}"] = spectral_step
    # The default step reads every gradient once before it changes anything (check_finite): timed
    # without that read too, to show its share of the gap to the floor; never the "best" (d)
    unchecked = SpectralAdam(params, lr=args.lr, retraction="cholqr2", check_finite=False)
    share_state(unchecked, shared, True)
    methods[UNCHECKED] = unchecked.step

    def restore():
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], snapshot)
    floor_gemm, floor_flops = gemm_floor(factors)
    # warm-up (state, buffers, allocator); then interleaved timed rounds
    for fn in methods.values():
        fn()
    floor_gemm()
    times = {name: [] for name in methods}
    gemm_times = []
    ortho = {name: [] for name in methods}
    measurements = []
    t_start = time.time()
    for r in range(args.rounds):
        gen = torch.Generator(device=device).manual_seed(1000 + r)
        with torch.no_grad():
            for p in params:  # a fresh gradient per round, moments at their steady state for it
                torch.randn(p.shape, generator=gen, dtype=dtype, device=device, out=p.grad).mul_(1e-2)
                exp_avg, exp_avg_sq = shared[p]
                exp_avg.copy_(p.grad)
                torch.mul(p.grad, p.grad, out=exp_avg_sq)
        for name, fn in methods.items():
            # Timer.timeit runs `setup` before its two warm-up calls and again before the timed
            # call: every timed step starts from the same orthonormal point.
            meas = benchmark.Timer("fn()", setup="restore()", globals={"fn": fn, "restore": restore},
                                   label="optimizer step", num_threads=torch.get_num_threads(),
                                   sub_label=name, description=f"L{args.layers} r{args.rank}").timeit(1)
            measurements.append(meas)
            times[name].append(meas.median)
            ortho[name].append(max_orthonormality_error(factors, args.ortho_sample))
        gemm_times.append(benchmark.Timer("fn()", globals={"fn": floor_gemm},
                                          num_threads=torch.get_num_threads()).timeit(1).median)
        print(f"round {r + 1}/{args.rounds} done ({time.time() - t_start:.0f} s)", file=sys.stderr)
    gc.collect()

    benchmark.Compare(measurements).print()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    a = med[ADAM]
    state_bytes = 2 * numel * elsize
    moved = 7 * numel * elsize  # read p, g, m, v; write p, m, v
    rows = []
    width = max(len(name) for name in med)
    print(f"\n{'method':<{width}} {'median ms':>10} {'x (a)':>7} {'ortho err':>10} {'GB/s':>7}")
    for name, t in med.items():
        row = {"method": name, "median_ms": t * 1e3, "ratio_to_a": t / a,
               "orthonormality_error": max(ortho[name]), "effective_gb_s": moved / t / 1e9,
               "state_bytes": state_bytes, "times_ms": [x * 1e3 for x in times[name]]}
        rows.append(row)
        print(f"{name:<{width}} {t * 1e3:>10.1f} {t / a:>7.2f} {row['orthonormality_error']:>10.2e} "
              f"{row['effective_gb_s']:>7.1f}")
    summary = {}
    best = min((n for n in med if n.startswith("(d)") and n != UNCHECKED), key=med.get)
    summary["best_spectral"] = best
    summary["d_over_a"] = med[best] / a
    ref_name = next((n for n in med if n.startswith("(b)")), None)
    if ref_name:
        summary["b_over_d"] = med[ref_name] / med[best]
    if "(c) geoopt RiemannianAdam" in med:
        summary["c_over_d"] = med["(c) geoopt RiemannianAdam"] / med[best]
    gemm = statistics.median(gemm_times)
    floor = a + gemm
    summary.update(floor_ms=floor * 1e3, floor_gemm_ms=gemm * 1e3, gemm_gflop_s=floor_flops / gemm / 1e9,
                   d_over_floor=med[best] / floor, unchecked_over_floor=med[UNCHECKED] / floor)
    # the same ratios round by round (each step over the floor timed in its own round): the
    # machine's speed drifts by 10-40% within minutes (AMD EPYC, 2026-12-07: fused Adam at 80
    # layers 143-200 ms across runs), which moves medians taken method by method but mostly cancels
    # within a round
    per_round = {name: statistics.median(t / (ta + tg) for t, ta, tg in zip(times[name], times[ADAM], gemm_times))
                 for name in (best, UNCHECKED)}
    summary.update(d_over_floor_per_round=per_round[best], unchecked_over_floor_per_round=per_round[UNCHECKED])
    print(f"\nthis machine's floor: (a) {a * 1e3:.1f} ms + one Gram and one X M pass of every factor, batched, "
          f"{gemm * 1e3:.1f} ms ({floor_flops / gemm / 1e9:.0f} GFLOP/s) = {floor * 1e3:.1f} ms")
    print(f"best SpectralAdam: {best}")
    print("  (d)/(a) = {:.2f}   (d)/floor = {:.2f}".format(summary["d_over_a"], summary["d_over_floor"])
          + ("   (b)/(d) = {:.2f}".format(summary["b_over_d"]) if "b_over_d" in summary else "")
          + ("   (c)/(d) = {:.2f}".format(summary["c_over_d"]) if "c_over_d" in summary else ""))
    print(f"  without the pre-step finite check ({UNCHECKED[4:]}): (d)/floor = {summary['unchecked_over_floor']:.2f}")
    print(f"  median of the per-round ratios to the floor: (d) {per_round[best]:.3f}, "
          f"without the check {per_round[UNCHECKED]:.3f}")
    print(f"  optimizer state: {state_bytes / 2**20:.0f} MiB (exp_avg + exp_avg_sq, same as Adam) for every method")

    default = ROOT / "results" / f"bench_optimizer_L{args.layers}_r{args.rank}_{args.dtype}.json"
    out = pathlib.Path(args.out) if args.out else default
    payload = {"benchmark": "bench_optimizer", "config": vars(args), "environment": environment(device),
               "parameters": numel, "methods": rows, "summary": summary,
               "floor": {"gemm_times_ms": [t * 1e3 for t in gemm_times], "gemm_flops": floor_flops,
                         "chunk": FLOOR_CHUNK}}
    atomic_write_json(out, payload)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return payload


if __name__ == "__main__":
    main()
