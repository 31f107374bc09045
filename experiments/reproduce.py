"""Reproduce the paper's tables: run every registered experiment, then rebuild the report in paper/.

    python -m experiments.reproduce --preset fast           # first contact: every table, ~20 min on 2 cores
    python -m experiments.reproduce --preset quick          # the full CPU-scale tables, ~30 min
    python -m experiments.reproduce --preset paper          # the paper's settings (a big machine or a GPU)
    python -m experiments.reproduce --only mlp_proofs       # a subset
    python -m experiments.reproduce --preset quick --out .  # refresh the committed results/ and paper/

Each experiment runs in its own process (a clean interpreter, as when run alone) and writes
OUT/results/<name>.json; the report is then rebuilt from those files by paper/build.py into
OUT/paper/. OUT is runs/reproduce/<preset>/ unless ``--out`` says otherwise: a run never overwrites
the committed tables in results/ and paper/ by default (``runs/`` is ignored by git), and it ends by
printing its key figures beside the committed ones, which its report also shows. The list of
experiments is :data:`experiments.EXPERIMENTS`, the one the report is built from.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
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
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="write DIR/results/*.json and the report DIR/paper/ (default: runs/reproduce/<preset>, "
                         "ignored by git; `--out .` replaces the committed results/ and paper/)")
    ap.add_argument("--no-report", action="store_true", help="skip rebuilding the report")
    args = ap.parse_args(argv)
    chosen = args.only or names
    out = pathlib.Path(args.out).resolve() if args.out else ROOT / "runs" / "reproduce" / args.preset
    results_dir, report_dir = out / "results", out / "paper"
    if args.only and out != ROOT.resolve():
        # the report needs every experiment's results: the others come from the committed ones
        _seed_from_committed(results_dir, chosen)
    print(f"reproduce: preset {args.preset}, results in {results_dir}, report in {report_dir}", flush=True)
    t_all = time.time()
    for i, name in enumerate(chosen, 1):
        print(f"== [{i}/{len(chosen)}] {name} (preset {args.preset})", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--preset", args.preset,
                               "--results-dir", str(results_dir)], cwd=ROOT)
        if proc.returncode != 0:
            print(f"reproduce: {name} failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
        print(f"== [{i}/{len(chosen)}] {name} done in {time.time() - t0:.0f} s "
              f"({time.time() - t_all:.0f} s so far)", flush=True)
    if not args.no_report:
        # the report, with the side-by-side of this run's key figures and the committed ones (printed too)
        proc = subprocess.run([sys.executable, "-m", "paper.build", "--results", str(results_dir),
                               "--out", str(report_dir), "--compare", str(ROOT / "results")], cwd=ROOT)
        if proc.returncode != 0:
            return proc.returncode
        print(f"report: {report_dir / 'README.md'} (figures in {report_dir / 'figures'})")
    print(f"reproduce: {len(chosen)} experiment(s) in {time.time() - t_all:.0f} s")
    return 0


def _seed_from_committed(results_dir: pathlib.Path, chosen) -> None:
    """Copy the committed results of the experiments not run into ``results_dir`` (when absent), so a
    partial run still builds a whole report; its provenance lines say which runs are whose."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for experiment in EXPERIMENTS:
        if experiment.name in chosen:
            continue
        for name in experiment.results:
            src, dst = ROOT / "results" / f"{name}.json", results_dir / f"{name}.json"
            if src.is_file() and not dst.exists():
                shutil.copyfile(src, dst)


if __name__ == "__main__":
    sys.exit(main())
