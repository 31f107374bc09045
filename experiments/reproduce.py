"""Reproduce the paper's tables: run every registered experiment, then rebuild the report in paper/.

    python -m experiments.reproduce --preset fast           # first contact: every table, ~20 min on 2 cores
    python -m experiments.reproduce --preset quick          # the full CPU-scale tables, ~30 min
    python -m experiments.reproduce --preset paper          # the paper's settings (a big machine or a GPU)
    python -m experiments.reproduce --only mlp_proofs       # a subset

Each experiment runs in its own process (a clean interpreter, as when run alone) and writes
results/<name>.json; the report is then rebuilt from those files by paper/build.py. The list of
experiments is :data:`experiments.EXPERIMENTS`, the one the report is built from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from experiments import EXPERIMENTS
from experiments.common import ROOT

PRESETS = ("fast", "quick", "paper")


def main(argv=None) -> int:
    names = [e.name for e in EXPERIMENTS]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=PRESETS,
                    help="fast: every table with smaller runs (~20 min here); quick: the full CPU-scale "
                         "tables (~30 min); paper: the paper's settings")
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                    help=f"run only these experiments (of {', '.join(names)})")
    ap.add_argument("--no-report", action="store_true", help="skip rebuilding paper/")
    args = ap.parse_args(argv)
    chosen = args.only or names
    t_all = time.time()
    for i, name in enumerate(chosen, 1):
        print(f"== [{i}/{len(chosen)}] {name} (preset {args.preset})", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--preset", args.preset], cwd=ROOT)
        if proc.returncode != 0:
            print(f"reproduce: {name} failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
        print(f"== [{i}/{len(chosen)}] {name} done in {time.time() - t0:.0f} s "
              f"({time.time() - t_all:.0f} s so far)", flush=True)
    if not args.no_report:
        proc = subprocess.run([sys.executable, "-m", "paper.build"], cwd=ROOT)
        if proc.returncode != 0:
            return proc.returncode
        print("report: paper/README.md (figures in paper/figures/)")
    print(f"reproduce: {len(chosen)} experiment(s) in {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
