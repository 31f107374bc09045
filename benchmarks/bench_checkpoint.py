"""What a spectral checkpoint's integrity check costs: ``load_spectral`` of SmolLM2-135M-Instruct
(real weights, every decoder linear spectral at 50% of its parameters, plain SVD) with
``verify=True`` against ``verify=False``, interleaved round by round (medians reported).

The checks run fused into the file's one read (``integrity.read_weights``: each 2 MiB block is
checksummed, and each factor probed, while it is in cache), so their cost is measured where it
is paid: ``read_weights`` with the checks against ``read_weights`` without them, the rest of
``load_spectral`` being the same. For the record the two checks are also timed as separate passes
over the loaded data (how they ran before). Each round loads into a fresh dense model (from the
fp32 cache, not timed), so every variant reads the same warm page cache. The target (issue 26):
the checks cost < 5% of ``load_spectral``.

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
from stiefel_sct.integrity import ValueCheck, check_spectral_tensors, file_checksum, read_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODER = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11, help="timed rounds (one load of each variant each)")
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
        times = {"verify=True": [], "verify=False": [], "read checked": [], "read plain": [],
                 "separate checksum": [], "separate values": []}
        for r in range(args.rounds):
            for verify in (True, False):
                fresh, _ = load_smollm2()
                t0 = time.perf_counter()
                load_spectral(fresh, ck, verify=verify)
                times[f"verify={verify}"].append(time.perf_counter() - t0)
                del fresh
            for checked in (True, False):
                t0 = time.perf_counter()
                state = read_weights(weights, config["files"] if checked else None,
                                     ValueCheck(config["layers"], weights) if checked else None)
                times["read checked" if checked else "read plain"].append(time.perf_counter() - t0)
                del state
            t0 = time.perf_counter()
            file_checksum(weights)
            times["separate checksum"].append(time.perf_counter() - t0)
            state = read_weights(weights)
            t0 = time.perf_counter()
            check_spectral_tensors(state, config["layers"], weights)
            times["separate values"].append(time.perf_counter() - t0)
            del state
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(c - p for c, p in zip(times["read checked"], times["read plain"]))
    summary = {"file_mb": size / 1e6, "load_verify_ms": med["verify=True"] * 1e3,
               "load_no_verify_ms": med["verify=False"] * 1e3, "read_checked_ms": med["read checked"] * 1e3,
               "read_plain_ms": med["read plain"] * 1e3, "checks_fused_ms": paired * 1e3,
               "checks_share_of_load": paired / med["verify=True"],
               "separate_checksum_ms": med["separate checksum"] * 1e3, "separate_values_ms": med["separate values"] * 1e3,
               "separate_share_of_load": (med["separate checksum"] + med["separate values"]) / med["verify=True"],
               "difference_share": (med["verify=True"] - med["verify=False"]) / med["verify=True"]}
    print(f"\nmodel.safetensors {size / 1e6:.0f} MB; medians of {args.rounds} rounds; {environment(torch.device('cpu'))['cpu']}")
    print(f"load_spectral verify=True {summary['load_verify_ms']:.0f} ms, verify=False {summary['load_no_verify_ms']:.0f} ms "
          f"(difference {100 * summary['difference_share']:.1f}%)")
    print(f"read_weights with the fused checks {summary['read_checked_ms']:.1f} ms, without {summary['read_plain_ms']:.1f} ms: "
          f"the checks cost {summary['checks_fused_ms']:.1f} ms = {100 * summary['checks_share_of_load']:.1f}% of "
          "load_spectral (target < 5%)")
    print(f"as separate passes they would cost {summary['separate_checksum_ms']:.1f} ms (checksum) + "
          f"{summary['separate_values_ms']:.1f} ms (values) = {100 * summary['separate_share_of_load']:.1f}%")
    payload = {"benchmark": "bench_checkpoint", "config": vars(args), "environment": environment(torch.device("cpu")),
               "conversion": report, "times_s": times, "summary": summary}
    atomic_write_json(pathlib.Path(args.out), payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
