"""Reproduce the paper's tables: run the experiments, then rebuild the report in paper/.

    python experiments/reproduce.py --preset quick          # CPU scale, minutes
    python experiments/reproduce.py --preset paper          # the paper's settings
    python experiments/reproduce.py --only mlp_proofs       # a subset

Each experiment runs in its own process (a clean interpreter, as when run alone) and writes
results/<name>.json; the report is then rebuilt from those files by paper/build.py.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> script; later experiments register here
EXPERIMENTS = {
    "mlp_proofs": "experiments/mlp_proofs.py",
    "memory_70b": "experiments/memory_70b.py",
    "rank_sweep": "experiments/rank_sweep.py",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=["quick", "paper"],
                    help="quick: CPU scale, minutes; paper: the paper's settings")
    ap.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), metavar="NAME",
                    help=f"run only these experiments (of {', '.join(EXPERIMENTS)})")
    ap.add_argument("--no-report", action="store_true", help="skip rebuilding paper/")
    args = ap.parse_args(argv)
    names = args.only or list(EXPERIMENTS)
    t_all = time.time()
    for name in names:
        print(f"== {name} (preset {args.preset})", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / EXPERIMENTS[name]), "--preset", args.preset], cwd=ROOT)
        if proc.returncode != 0:
            print(f"reproduce: {name} failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
        print(f"== {name} done in {time.time() - t0:.0f} s", flush=True)
    if not args.no_report:
        proc = subprocess.run([sys.executable, str(ROOT / "paper" / "build.py")], cwd=ROOT)
        if proc.returncode != 0:
            return proc.returncode
        print("report: paper/README.md (figures in paper/figures/)")
    print(f"reproduce: {len(names)} experiment(s) in {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
