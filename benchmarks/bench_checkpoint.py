"""What a spectral checkpoint's integrity check costs: ``load_spectral`` of SmolLM2-135M-Instruct
(real weights, every decoder linear spectral at 50% of its parameters, plain SVD) with
``verify=True`` against ``verify=False``, interleaved round by round; the figure is the median of
the per-round differences over the median ``verify=True`` load.

The checksum runs fused into the file's one read (``integrity.read_weights``: each 2 MiB block is
checksummed, then the tensors that ``load_spectral`` materialises are copied out of it while it is
in cache), and the value probes run only for a checkpoint without the certificate that
``save_spectral`` records (the values passed at save; the matching checksum says these are those
bytes). A third variant times such a checkpoint (the certificate deleted from its JSON), so the
probes' own cost is on record; two more load into the model built on ``meta`` (every tensor then
copied once, fused with the checksum). Each round loads into a fresh model (from the fp32 cache,
not timed; the variants take turns to go first), so every variant reads the same warm page cache.
The target (issue 26): the checks cost < 5% of ``load_spectral``.

    python -m benchmarks.bench_checkpoint --rounds 11
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

from experiments.common import atomic_write_json, convert, environment
from stiefel_sct import load_spectral, save_spectral
from stiefel_sct.checkpoint import CONFIG_NAME, WEIGHTS_NAME

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODER = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def empty_smollm2():
    """SmolLM2-135M's architecture with its parameters on ``meta`` (``accelerate.init_empty_weights``),
    the way a user loads a checkpoint without materialising the dense weights first."""
    import transformers
    from accelerate import init_empty_weights

    from experiments.smollm2 import _fp32_dir

    config = transformers.AutoConfig.from_pretrained(_fp32_dir(None))
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


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
        ck, probed = pathlib.Path(tmp) / "ck", pathlib.Path(tmp) / "probed"
        save_spectral(model, ck)
        del model
        shutil.copytree(ck, probed)  # the same checkpoint without its certificate: load probes the values
        config = json.loads((probed / CONFIG_NAME).read_text())
        assert config["files"][WEIGHTS_NAME].pop("values_passed") is True
        (probed / CONFIG_NAME).write_text(json.dumps(config))
        size = (ck / WEIGHTS_NAME).stat().st_size
        variants = {"verify=True": (ck, True, False), "verify=False": (ck, False, False),
                    "verify=True, probed": (probed, True, False),
                    "meta, verify=True": (ck, True, True), "meta, verify=False": (ck, False, True)}
        times: dict = {name: [] for name in variants}
        for r in range(args.rounds):
            names = list(variants)
            for name in names[r % len(names):] + names[:r % len(names)]:  # each variant leads in turn
                directory, verify, meta = variants[name]
                fresh = empty_smollm2() if meta else load_smollm2()[0]
                gc.collect()  # the last round's model is freed before the clock starts, not during the load
                t0 = time.perf_counter()
                load_spectral(fresh, directory, verify=verify)
                times[name].append(time.perf_counter() - t0)
                del fresh
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(c - p for c, p in zip(times[k], times[base]))
              for k, base in (("verify=True", "verify=False"), ("verify=True, probed", "verify=False"),
                              ("meta, verify=True", "meta, verify=False"))}
    summary = {"file_mb": size / 1e6, "load_verify_ms": med["verify=True"] * 1e3,
               "load_no_verify_ms": med["verify=False"] * 1e3, "load_probed_ms": med["verify=True, probed"] * 1e3,
               "checks_ms": paired["verify=True"] * 1e3,
               "checks_share_of_load": paired["verify=True"] / med["verify=True"],
               "probed_checks_ms": paired["verify=True, probed"] * 1e3,
               "probed_checks_share_of_load": paired["verify=True, probed"] / med["verify=True, probed"],
               "meta_load_verify_ms": med["meta, verify=True"] * 1e3,
               "meta_load_no_verify_ms": med["meta, verify=False"] * 1e3,
               "meta_checks_ms": paired["meta, verify=True"] * 1e3,
               "meta_checks_share_of_load": paired["meta, verify=True"] / med["meta, verify=True"]}
    print(f"\nmodel.safetensors {size / 1e6:.0f} MB; medians of {args.rounds} rounds; {environment(torch.device('cpu'))['cpu']}")
    print(f"load_spectral verify=True {summary['load_verify_ms']:.0f} ms, verify=False {summary['load_no_verify_ms']:.0f} ms: "
          f"the checks cost {summary['checks_ms']:.1f} ms = {100 * summary['checks_share_of_load']:.1f}% of the load "
          "(median per-round difference; target < 5%)")
    print(f"without the certificate (values probed on load): {summary['load_probed_ms']:.0f} ms, the checks "
          f"{summary['probed_checks_ms']:.1f} ms = {100 * summary['probed_checks_share_of_load']:.1f}%")
    print(f"into a model on meta (every tensor copied once, fused with the checksum): verify=True "
          f"{summary['meta_load_verify_ms']:.0f} ms, verify=False {summary['meta_load_no_verify_ms']:.0f} ms, the checks "
          f"{summary['meta_checks_ms']:.1f} ms = {100 * summary['meta_checks_share_of_load']:.1f}%")
    payload = {"benchmark": "bench_checkpoint", "config": vars(args), "environment": environment(torch.device("cpu")),
               "conversion": report, "times_s": times, "summary": summary}
    atomic_write_json(pathlib.Path(args.out), payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
