"""Rebuild the paper-reproduction report (paper/README.md and paper/figures/) from results/*.json.

    python paper/build.py            # or: python -m paper.build
    python paper/build.py --results results --out paper

Never runs an experiment: it reads what the experiments wrote and fails with a clear message
naming any results file that is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
from typing import Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]

# the experiments whose results the report is built from (each one section)
REQUIRED = ("mlp_proofs",)


class MissingResults(FileNotFoundError):
    pass


def load(results_dir: pathlib.Path, name: str) -> Dict:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        raise MissingResults(
            f"missing results file {path}: run `python experiments/reproduce.py --only {name}` "
            f"(or `python experiments/{name}.py`) first"
        )
    with open(path) as fh:
        return json.load(fh)


def _fmt(value: Optional[float], kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "accuracy":
        return f"{100 * value:.1f}%"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def _provenance(res: Dict) -> str:
    env, cfg = res["environment"], res["config"]
    return (f"preset `{cfg.get('preset')}`, {cfg.get('seeds')} seeds, {cfg.get('steps')} steps; "
            f"{env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads), "
            f"torch {env.get('torch')}, geoopt {env.get('geoopt')}, stiefel_sct {env.get('stiefel_sct')}, "
            f"{env.get('date')}")


def mlp_section(res: Dict, figures: pathlib.Path, rel: str) -> List[str]:
    m = res["metrics"]
    summary, paper, sweep = m["summary"], m["paper"], m["sweep"]
    methods = [("dense", "Dense + AdamW"), ("sft_dfa", "SFT + DFA"), ("sct", "SCT")]
    lines = ["## MLP proofs: sine regression and XOR", "",
             f"How obtained: `experiments/mlp_proofs.py`, {_provenance(res)}. "
             "Ours = mean ± std over seeds of the final full-batch metric; ratio = ours / paper "
             "(for MSE lower is better; for accuracy, 1.00 = the same).", ""]
    for sched in res["config"]["schedules"]:
        lines += [f"**Learning rate {res['config']['lr']}, {sched} schedule** "
                  f"({'the reference setup' if sched == 'constant' else 'cosine decay to 0, the same for every method'})", "",
                  "| task | metric | " + " | ".join(f"{label}: paper | ours | ratio" for _, label in methods) + " |",
                  "| --- | --- |" + " --- | --- | --- |" * len(methods)]
        for task in ("sine", "xor"):
            if task not in summary:
                continue
            kind = paper[task]["metric"]
            cells = []
            for key, _ in methods:
                s = summary[task][sched][key]["metric"]
                ours = f"{_fmt(s['mean'], kind)} ± {_fmt(s['std'], kind)}"
                ratio = s["mean"] / paper[task][key] if paper[task][key] else float("nan")
                cells.append(f"{_fmt(paper[task][key], kind)} | {ours} | {ratio:.2f}")
            lines.append(f"| {task} | {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    # details: parameters, time, orthonormality, xor per-seed
    sched = res["config"]["schedules"][-1]
    lines += [f"Details ({sched} schedule):", "",
              "| task | method | parameters (dense MLP) | ranks | wall s / run | max orthonormality error | XOR 100% on every seed |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for task in ("sine", "xor"):
        for key, label in methods:
            s = summary[task][sched][key]
            ortho = "n/a" if s["orthonormality_error_max"] is None else f"{s['orthonormality_error_max']:.1e}"
            perfect = "" if s["all_perfect"] is None else ("yes" if s["all_perfect"] else "no")
            lines.append(f"| {task} | {label} | {s['params']:,} ({s['dense_params']:,}) | {s['ranks'] or '-'} | "
                         f"{s['wall_s']['mean']:.2f} | {ortho} | {perfect} |")
    lines += ["", f"Learning-rate sweep ({res['config']['sweep_schedule']} schedule, "
              f"{res['config']['sweep_seeds']} seeds per value; best = lowest mean final loss):", "",
              "| task | method | " + " | ".join(f"lr {lr}" for lr in res["config"]["sweep_lrs"]) + " | best lr |",
              "| --- | --- |" + " --- |" * (len(res["config"]["sweep_lrs"]) + 1)]
    for task in ("sine", "xor"):
        for key, label in methods:
            b = sweep[task][key]
            kind = paper[task]["metric"]
            cells = [_fmt(b["by_lr"][str(lr)]["metric"], kind) for lr in res["config"]["sweep_lrs"]]
            lines.append(f"| {task} | {label} | " + " | ".join(cells) + f" | {b['best_lr']} |")
    fig = plot_mlp_curves(res, figures)
    if fig:
        lines += ["", f"![loss curves]({rel}/{fig.name})", "",
                  "Training loss (mean over seeds, log scale) of the three methods on both tasks."]
    return lines + [""]


def plot_mlp_curves(res: Dict, figures: pathlib.Path) -> Optional[pathlib.Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: figures skipped", file=sys.stderr)
        return None
    import numpy as np

    runs = res["metrics"]["runs"]
    sched = res["config"]["schedules"][-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task in zip(axes, ("sine", "xor")):
        for method, color in (("dense", "C0"), ("sct", "C1"), ("sft_dfa", "C2")):
            curves = [r["curve"] for r in runs if r["task"] == task and r["method"] == method and r["schedule"] == sched]
            if not curves:
                continue
            steps = np.array([c[0] for c in curves[0]])
            losses = np.array([[c[1] for c in curve] for curve in curves])
            ax.semilogy(steps, losses.mean(0), color=color, label=method)
            ax.fill_between(steps, losses.min(0), losses.max(0), color=color, alpha=0.15)
        ax.set_title(f"{task} ({'MSE' if task == 'sine' else 'BCE'}, {sched} lr)")
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / "mlp_proofs_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build(results_dir: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    results = {name: load(results_dir, name) for name in REQUIRED}  # fail before writing anything
    lines = ["# stiefel-sct: the SCT paper, reproduced", "",
             "Generated by `python paper/build.py` from `results/*.json`; do not edit by hand. "
             "Rerun everything with `python experiments/reproduce.py --preset quick` (CPU, minutes) "
             "or `--preset paper`.", ""]
    lines += mlp_section(results["mlp_proofs"], out_dir / "figures", "figures")
    path = out_dir / "README.md"
    _atomic_write_text(path, "\n".join(lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--out", default=str(ROOT / "paper"))
    args = ap.parse_args(argv)
    try:
        path = build(pathlib.Path(args.results), pathlib.Path(args.out))
    except MissingResults as exc:
        print(f"paper/build.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
