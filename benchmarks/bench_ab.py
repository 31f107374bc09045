"""This checkout's SpectralAdam step against another checkout's, interleaved in one process.

Speed work needs a before and an after measured together: on a 2-core machine two runs minutes
apart differ by 20% (measured here, bench_optimizer's rounds), more than most changes. This script
loads the other checkout's package under another name (``--baseline DIR``, a directory holding a
``stiefel_sct/`` package, e.g. ``git worktree add /tmp/base HEAD~3``), builds twin parameter sets of
the 70B shape (bench_optimizer's: 14 factors and 7 spectra per layer), one per optimizer (a factor
bank re-homes its parameters, so two optimizers must not share them), and times the two steps
round by round, with this machine's floor (bench_optimizer's GEMM floor plus a fused Adam step on
a third set, left out with ``--no-adam`` where three sets do not fit in memory). It prints the
medians, the median of the per-round ratios (the figure to quote) and each step over the floor.

    python -m benchmarks.bench_ab --baseline /tmp/base --layers 8 --rounds 40
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, List

import geoopt
import torch

import stiefel_sct
from benchmarks.bench_optimizer import build_parameter_set, gemm_floor
from experiments.common import atomic_write_json, environment

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_baseline(directory: pathlib.Path):
    """The ``stiefel_sct`` package under ``directory``, imported as ``stiefel_sct_baseline``."""
    init = directory / "stiefel_sct" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: {init} not found (give a checkout's root, e.g. a git worktree)")
    spec = importlib.util.spec_from_file_location("stiefel_sct_baseline", init,
                                                  submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stiefel_sct_baseline"] = module
    spec.loader.exec_module(module)
    return module


def twin(factors: List[torch.Tensor], spectra: List[torch.Tensor]) -> List[torch.Tensor]:
    """A copy of the parameter set with the same values and gradients."""
    out = [geoopt.ManifoldParameter(f.detach().clone(), manifold=f.manifold) for f in factors]
    out += [torch.nn.Parameter(s.detach().clone()) for s in spectra]
    for src, dst in zip(factors + spectra, out):
        dst.grad = src.grad.clone()
    return out


def time_rounds(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int = 3) -> Dict[str, List[float]]:
    """Seconds per call of each step, round by round (every step once per round, in order)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def summarise(times: Dict[str, List[float]]) -> Dict:
    """Medians (ms), the median per-round ratio this/baseline, and each step over the floor."""
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    floor = med["gemm_floor"] + med.get("adam_fused", 0.0)
    out = {"median_ms": med, "floor_ms": floor, "adam_in_floor": "adam_fused" in med,
           "this_over_baseline": statistics.median(a / b for a, b in zip(times["this"], times["baseline"]))}
    out.update(this_over_floor=med["this"] / floor, baseline_over_floor=med["baseline"] / floor)
    # round by round as well: the machine's speed drifts within a run, which this mostly cancels
    floors = [g + a for g, a in zip(times["gemm_floor"], times.get("adam_fused", [0.0] * len(times["gemm_floor"])))]
    out.update({f"{k}_over_floor_per_round": statistics.median(t / f for t, f in zip(times[k], floors))
                for k in ("this", "baseline")})
    return out


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, type=pathlib.Path, help="root of the other checkout")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--no-adam", action="store_true", help="leave the fused Adam step out of the floor (memory)")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_ab_L{layers}_r{rank}.json)")
    args = ap.parse_args(argv)
    if min(args.layers, args.rank, args.rounds) < 1:
        ap.error("--layers, --rank and --rounds must be >= 1")
    base = load_baseline(args.baseline.resolve())
    torch.manual_seed(0)
    factors, spectra = build_parameter_set(args.layers, args.rank, torch.float32, torch.device("cpu"))
    steps: Dict[str, Callable[[], None]] = {
        "baseline": base.SpectralAdam(factors + spectra, lr=1e-3).step,
        "this": stiefel_sct.SpectralAdam(twin(factors, spectra), lr=1e-3).step,
    }
    if not args.no_adam:
        steps["adam_fused"] = torch.optim.Adam(twin(factors, spectra), lr=1e-3, fused=True).step
    steps["gemm_floor"] = gemm_floor(factors)[0]
    print(f"bench_ab: {args.layers} layers, rank {args.rank}, {args.rounds} rounds; baseline {args.baseline}",
          file=sys.stderr)
    summary = summarise(time_rounds(steps, args.rounds))
    med = summary["median_ms"]
    print(", ".join(f"{k} {v:.1f} ms" for k, v in med.items()) + f"; floor {summary['floor_ms']:.1f} ms"
          + ("" if summary["adam_in_floor"] else " (GEMM only: --no-adam)"))
    print(f"this/baseline (median of per-round ratios) {summary['this_over_baseline']:.3f}; "
          f"baseline/floor {summary['baseline_over_floor']:.3f}, this/floor {summary['this_over_floor']:.3f} "
          f"(per round: {summary['baseline_over_floor_per_round']:.3f}, {summary['this_over_floor_per_round']:.3f})")
    result = {"benchmark": "bench_ab", "config": {k: str(v) if isinstance(v, pathlib.Path) else v
                                                  for k, v in vars(args).items()},
              "environment": environment(), "summary": summary}
    out = pathlib.Path(args.out) if args.out else ROOT / "results" / f"bench_ab_L{args.layers}_r{args.rank}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
