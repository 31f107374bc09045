"""What a spectral checkpoint's integrity check costs: ``load_spectral`` of SmolLM2-135M-Instruct
(real weights, every decoder linear spectral at 50% of its parameters, plain SVD) with
``verify=True`` against ``verify=False``, interleaved round by round (medians reported), plus the
two checks alone: the weight file's checksum and the spectral values (finite, orthonormal factors).

Each round loads into a fresh dense model (from the fp32 cache, not timed), so both variants read
the same warm page cache. The target (issue 26): the checks cost < 5% of ``load_spectral``.

    python -m benchmarks.bench_checkpoint --rounds 7
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import torch

from experiments.common import atomic_write_json, convert, environment
from stiefel_sct import load_spectral, save_spectral
from stiefel_sct.checkpoint import WEIGHTS_NAME, read_config
from stiefel_sct.integrity import check_spectral_tensors, file_checksum

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODER = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (one load of each variant each)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_checkpoint.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    from experiments.smollm2 import load_smollm2

    model, _ = load_smollm2()
    report = convert(model, "sct", DECODER, budget_fraction=0.5)
    print(f"SmolLM2-135M: {report['converted_layers']} decoder linears spectral at 50% of their parameters "
          f"({report['convert_s']:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ck = pathlib.Path(tmp) / "ck"
        save_spectral(model, ck)
        del model
        weights = ck / WEIGHTS_NAME
        size = weights.stat().st_size
        config = read_config(ck)
        times = {"verify=True": [], "verify=False": [], "checksum": [], "values": []}
        for r in range(args.rounds):
            for verify in (True, False):
                fresh, _ = load_smollm2()
                t0 = time.perf_counter()
                load_spectral(fresh, ck, verify=verify)
                times[f"verify={verify}"].append(time.perf_counter() - t0)
                del fresh
            t0 = time.perf_counter()
            file_checksum(weights)
            times["checksum"].append(time.perf_counter() - t0)
            from safetensors.torch import load_file

            state = load_file(str(weights))
            t0 = time.perf_counter()
            check_spectral_tensors(state, config["layers"], weights)
            times["values"].append(time.perf_counter() - t0)
            del state
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    checks = med["checksum"] + med["values"]
    summary = {"file_mb": size / 1e6, "load_verify_ms": med["verify=True"] * 1e3,
               "load_no_verify_ms": med["verify=False"] * 1e3, "checksum_ms": med["checksum"] * 1e3,
               "values_ms": med["values"] * 1e3, "checks_share_of_load": checks / med["verify=True"],
               "difference_share": (med["verify=True"] - med["verify=False"]) / med["verify=True"]}
    print(f"\nmodel.safetensors {size / 1e6:.0f} MB; medians of {args.rounds} rounds")
    print(f"load_spectral verify=True {summary['load_verify_ms']:.0f} ms, verify=False {summary['load_no_verify_ms']:.0f} ms")
    print(f"checks alone: checksum {summary['checksum_ms']:.1f} ms + values {summary['values_ms']:.1f} ms = "
          f"{100 * summary['checks_share_of_load']:.1f}% of load_spectral (target < 5%); "
          f"difference of the two loads: {100 * summary['difference_share']:.1f}%")
    payload = {"benchmark": "bench_checkpoint", "config": vars(args), "environment": environment(torch.device("cpu")),
               "conversion": report, "times_s": times, "summary": summary}
    atomic_write_json(pathlib.Path(args.out), payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
