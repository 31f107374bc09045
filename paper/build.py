"""Rebuild the paper-reproduction report (paper/README.md and paper/figures/) from results/*.json.

    python -m paper.build
    python -m paper.build --results results --out paper
    python -m paper.build --results runs/reproduce/fast/results --out runs/reproduce/fast/paper --compare results

Never runs an experiment: it reads what the experiments wrote and fails with a clear message
naming any results file that is missing. With ``--compare DIR`` the report opens with each
experiment's key figures beside those of DIR (the committed results), and prints that table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

# the report has one section per experiment of the registry that experiments/reproduce.py runs,
# so the two cannot disagree
from experiments import EXPERIMENTS
from experiments.common import ROOT, atomic_write, atomic_write_text

MEMORY_TITLES = {
    "memory_70b": "Memory: a full training step of a LLaMA-3-70B-shaped network",
    "memory_70b_paper": "Memory, full depth (`results/memory_70b_paper.json`)",
}


class MissingResults(FileNotFoundError):
    pass


def load(results_dir: pathlib.Path, name: str) -> Dict:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        raise MissingResults(
            f"missing results file {path}: run `python -m experiments.reproduce --only {name}` "
            f"(or `python -m experiments.{name}`) first"
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
    seeds = f"{cfg['seeds']} seeds, " if "seeds" in cfg else ""
    steps = f"{cfg['steps']} steps; " if "steps" in cfg else ""
    return (f"preset `{cfg.get('preset')}`, {seeds}{steps}"
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


def memory_section(res: Dict, figures: pathlib.Path, rel: str, title: str) -> List[str]:
    m, cfg = res["metrics"], res["config"]
    paper = m["paper"]
    lines = [f"## {title}", "",
             f"How obtained: `experiments/memory_70b.py`, {_provenance(res)}; LLaMA-3-70B shapes "
             f"(GQA 64/8 heads, vocabulary 128,256), every linear layer, the embedding and the LM head "
             f"spectral at rank {cfg['rank']}; seq {cfg['seq']}, batch {cfg['batch']}, {cfg['steps']} steps; "
             "peak = `VmHWM` of a fresh process per configuration"
             + (f"; glibc `{' '.join(f'{k}={v}' for k, v in m['malloc_env'].items())}`" if m.get("malloc_env") else "")
             + ".", ""]
    rows = m["summary"]
    extrapolated = any(r["extrapolated"] for r in rows.values())
    if extrapolated:
        first = next(iter(rows.values()))
        lines += [f"**Extrapolated**: measured at {first['measured_layers']} layers, every figure fitted "
                  f"linearly in depth and evaluated at {first['layers']} layers (the quick preset; "
                  "`--preset paper` measures all 80).", ""]
    lines += ["| configuration | layers | peak GiB | peak GB | vs reference | parameters (dense, real GQA) | "
              "params MiB | grads held MiB | Adam state MiB | activations + runtime MiB | fwd / bwd / opt s | orthonormality |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        t = r["step_time_s"]
        lines.append(f"| {name} | {r['layers']} | {r['peak_mb'] / 1024:.2f} | {r['peak_mb'] * 2**20 / 1e9:.2f} | "
                     f"{r.get('peak_vs_reference', float('nan')):.2f} | "
                     f"{r['params'] / 1e6:.1f}M ({r['dense_params'] / 1e9:.2f}B) | {r['param_mb']:.0f} | "
                     f"{r['grad_mb_held']:.0f} | {r['state_mb']:.0f} | {r['activations_mb']:.0f} | "
                     f"{t['forward_s']:.2f} / {t['backward_s']:.2f} / {t['step_s']:.2f} | {r['orthonormality_error']:.1e} |")
    if m.get("descriptions"):
        lines += [""] + [f"- `{n}`: {d}" for n, d in m["descriptions"].items()]
    any_row = next(iter(rows.values()))
    conv = any_row.get("paper_convention_params", float("nan"))
    lines += ["", f"Ours: {any_row['params'] / 1e6:.1f}M spectral parameters (embedding and LM head included) for "
              f"{any_row['dense_params'] / 1e9:.2f}B dense parameters with the real GQA shapes "
              f"({conv / 1e9:.1f}B in the paper's counting convention)."]
    lines += [f"Paper: {paper['spectral_params'] / 1e6:.0f}M spectral parameters standing for "
              f"{paper['dense_params_convention'] / 1e9:.1f}B (4 square attention matrices + MLP per layer, no "
              f"embedding or head), peak {paper['peak_mb_steam_deck']:,} MB (Steam Deck) / "
              f"{paper['peak_mb_m4_pro']:,} MB (M4 Pro) computed as parameters x 16 bytes, not measured; dense "
              f"fp32 + Adam {paper['dense_fp32_adam_gb']:,} GB.", ""]
    if "compression" in m:
        lines += ["Per-layer memory at rank 32 (parameter + gradient + two Adam moments, fp32, MB = 1e6 bytes):", "",
                  "| shape | paper MB | ours MB (formula) | ours MB (measured) | dense MB | paper ratio | ours ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in m["compression"]:
            lines.append(f"| {r['shape']} | {r['paper_mb']} | {r['sct_mb']:.2f} | {r['measured_mb']:.2f} | "
                         f"{r['dense_mb']:,.0f} | {r['paper_ratio']}x | {r['ratio']:.1f}x |")
        lines.append("")
    eff = m.get("state_dtype_effect_sine_mse") or m.get("bf16_state_effect_sine_mse")  # older results: bf16 only
    if eff:
        labels = {"fp32": "fp32", "bf16": "bf16", "8bit": "blockwise 8-bit"}
        parts = [f"{eff[k]['mse_mean']:.2e} with {labels[k]} moments" for k in labels if k in eff]
        steps = f"{eff['fp32']['steps']:,} steps, " if "steps" in eff["fp32"] else ""  # older results: 2,000
        lines += [f"Loss effect of low-precision Adam moments (SCT on the sine MLP proof, cosine lr, "
                  f"{steps}{len(eff['fp32']['mse'])} seeds): final MSE " + ", ".join(parts) + ".", ""]
    fig = plot_memory(rows, figures, f"{res['experiment']}.png")
    if fig:
        lines += [f"![peak memory by configuration]({rel}/{fig.name})", ""]
    return lines


def _ortho(row: Dict) -> str:
    """Orthonormality error of a run's factors; n/a for a dense model (no factors; older results say 0)."""
    err = row.get("orthonormality_error")
    return "n/a" if err is None or (err == 0.0 and row.get("compression") == 1.0) else f"{err:.1e}"


def rank_sweep_section(res: Dict, figures: pathlib.Path, rel: str) -> List[str]:
    m, cfg = res["metrics"], res["config"]
    depth = cfg["layers"] or "full"
    lines = ["## Rank sweep: SmolLM2-shaped language models, dense vs spectral, held-out loss", "",
             f"How obtained: `experiments/rank_sweep.py`, {_provenance(res)}; SmolLM2-{cfg['shape']} shape at "
             f"{depth} layers, `{cfg['targets']}` linear layers spectral, trained from scratch on "
             f"{m['data']['train_tokens']:,} tokens of Shakespeare ({m['data']['dataset']}, "
             f"{len(m['data'].get('train_documents', []))} texts; BPE vocabulary {m['data']['vocab_size']:,} trained here), "
             f"batch {cfg['batch']} x {cfg['seq']} tokens, {cfg['schedule']} schedule with {cfg['warmup']} warm-up steps. "
             f"**Validation** loss on {len(m['data'].get('val_documents', []))} held-out texts "
             f"({m['data']['val_tokens']:,} tokens; {cfg['eval_batches']} x {cfg['batch']} windows). "
             "Each method at its own best learning rate from the sweep below.", "",
             "| method | lr | val loss | val PPL | train loss | params | compression of converted layers | "
             "vs dense, equal steps | vs dense, equal time | step s | tokens/s | peak RSS MiB | orthonormality |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:+.1f}%"
    for name, r in m["table"].items():
        lines.append(f"| {name} | {r['lr']:g} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} | {r['train_loss']:.3f} | "
                     f"{r['params'] / 1e6:.2f}M | {r['compression']:.2f}x | {pct(r.get('gap_equal_steps'))} | "
                     f"{pct(r.get('gap_equal_time'))} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_rss_mb'] or float('nan'):.0f} | {_ortho(r)} |")
    lines += ["", "Paper (SmolLM2-1.7B fine-tuned on Alpaca, MLP only, *training* loss, dense fp32 at lr 2e-5 vs "
              "SCT bf16 at 5e-4, A100):", "", "| method | params | loss | PPL | step s |", "| --- | --- | --- | --- | --- |"]
    for name, r in m["paper"].items():
        lines.append(f"| {name} | {r['params_m']:,}M | {r['loss']} | {r['ppl']} | {r['step_s']} |")
    if m.get("lr_sweep"):
        lrs = sorted({float(lr) for by in m["lr_sweep"].values() for lr in by})
        lines += ["", f"Learning-rate sweep ({cfg['sweep_steps']} steps each, validation loss; best in bold):", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "| --- |" + " --- |" * len(lrs)]
        for name, by in m["lr_sweep"].items():
            best = min(by.values())
            cells = [("**{:.3f}**" if by.get(str(lr)) == best else "{:.3f}").format(by[str(lr)]) if str(lr) in by
                     else "n/a" for lr in lrs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    others = [r for r in m["runs"].values() if r["stage"] in ("schedule", "ablation")]
    if others:
        main = {r["name"]: r for r in m["runs"].values() if r["stage"] == "main"}
        lines += ["", "Schedules and ablations (same steps, validation loss; the main-stage run of the same method "
                  "for comparison):", "", "| run | schedule | s lr x | function-preserving | val loss | main-stage val loss |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in others:
            ref = main.get("main-" + ("dense" if r["rank"] is None else f"r{r['rank']}"))
            lines.append(f"| {r['name']} | {r['schedule']} | {r['s_lr_mult']:g} | {r['preserve_function']} | "
                         f"{r['val_loss']:.3f} | {ref['val_loss']:.3f} |" if ref else "| n/a |")
    lines += adaptive_paragraph(m, cfg)
    for fig in plot_rank_sweep(m, cfg, figures):
        lines += ["", f"![{fig.stem}]({rel}/{fig.name})"]
    return lines + [""]


def adaptive_paragraph(m: Dict, cfg: Dict) -> List[str]:
    """What the RankScheduler arm shows, computed from the runs: its held-out loss against the fixed
    ranks at the same parameter budget, and where the rank went."""
    adaptive = [r for r in m["runs"].values() if r["stage"] == "adaptive" and not r.get("budget_by")]
    fixed = {r["rank"]: r for r in m["runs"].values() if r["stage"] == "main" and r["rank"] is not None}
    if not fixed:
        return []
    pruned = [r for r in m["runs"].values() if r["stage"] == "adaptive" and r.get("budget_by")]
    return (_growing_paragraph(adaptive[0], fixed, cfg) if adaptive else []) + \
        (_pruning_paragraph(pruned[0], fixed, cfg) if pruned else [])


def _verdicts(a: Dict, fixed: Dict, cfg: Dict) -> Tuple[Dict, Optional[Dict], str]:
    """The best fixed rank's run, the fixed run at the arm's budget rank, and the text comparing
    ``a``'s held-out loss with both."""
    best_k = min(fixed, key=lambda k: fixed[k]["val_loss"])
    best = fixed[best_k]
    ref = fixed.get(cfg["adaptive_budget_rank"])
    text = (f"validation loss **{a['val_loss']:.3f}** with {a['converted']['spectral_params']:,} spectral parameters "
            f"at the end, against rank {best_k} (the best fixed rank) {best['val_loss']:.3f}"
            + (f" and rank {cfg['adaptive_budget_rank']} (the same budget) {ref['val_loss']:.3f} with "
               f"{ref['converted']['spectral_params']:,}" if ref else ""))
    return best, ref, text


def _final_ranks_text(a: Dict) -> str:
    final = a["curve"]["ranks"][-1]
    order = sorted(final, key=final.get, reverse=True)
    return ("final mean rank per layer type: " + ", ".join(f"{t} {final[t]:.1f}" for t in order)
            + f" (most rank went to `{order[0]}`, least to `{order[-1]}`).")


def _pruning_paragraph(a: Dict, fixed: Dict, cfg: Dict) -> List[str]:
    """The pruning arm (``RankScheduler(budget_by=...)``) against the fixed ranks."""
    best, ref, text = _verdicts(a, fixed, cfg)
    versus = (f"{'at or below' if a['val_loss'] <= ref['val_loss'] else 'above'} rank {cfg['adaptive_budget_rank']}'s "
              f"({a['val_loss'] - ref['val_loss']:+.3f}) and {'at or below' if a['val_loss'] <= best['val_loss'] else 'above'} "
              f"the best fixed rank's ({a['val_loss'] - best['val_loss']:+.3f})") if ref else ""
    return ["", f"**Pruning to the budget from above** (`RankScheduler(budget_by={a['budget_by']})`, AdaLoRA's cubic "
            f"schedule, every {cfg['adaptive_every']} steps, lowest `|s_i| / (||s|| (m + n + 1))` first, nothing grows): "
            f"every layer starts at rank {a['rank']} and fits rank {cfg['adaptive_budget_rank']}'s spectral parameters "
            f"from step {a['budget_by']} of {a['steps']}, at that rank's lr {a['lr']:g}: {text}; {versus}. It trains "
            f"above the budget until step {a['budget_by']} (the budget is the trained model's size, as in AdaLoRA). "
            f"{len(a['rank_changes'])} rank changes; " + _final_ranks_text(a)]


def _growing_paragraph(a: Dict, fixed: Dict, cfg: Dict) -> List[str]:
    """The growing arm (from a low rank up to the budget) against the fixed ranks."""
    best, ref, text = _verdicts(a, fixed, cfg)
    verdict = "reaches" if a["val_loss"] <= best["val_loss"] else "does not reach"
    grace = cfg.get("adaptive_grace", 0)
    lines = ["", f"**Adaptive rank** (`RankScheduler`, every {cfg['adaptive_every']} steps: drop "
             f"`|s_i| < {cfg['adaptive_tol']:g} ||s||`"
             + (f" (a direction is safe for {grace} event{'s' if grace > 1 else ''} after it is grown)" if grace else "")
             + f", grow up to {cfg['adaptive_grow']} directions per layer ("
             + _growth_text(cfg.get("adaptive_growth", "factors"), min(cfg.get("adaptive_sketch_steps", 1),
                                                                       cfg["adaptive_every"]),
                            cfg.get("adaptive_newborn_rate"))
             + "); every layer "
             f"starts at rank {a['rank']}, budget = rank {cfg['adaptive_budget_rank']}'s spectral parameters, at that "
             f"rank's lr {a['lr']:g}): {text}: the adaptive arm {verdict} the best fixed rank's held-out loss "
             f"({a['val_loss'] - best['val_loss']:+.3f}). {len(a['rank_changes'])} rank changes; "
             + _final_ranks_text(a) + _survival_text(a.get("survival") or [])]
    return lines


def plot_rank_sweep(m: Dict, cfg: Dict, figures: pathlib.Path) -> List[pathlib.Path]:
    plt = _pyplot()
    if plt is None:
        return []
    out = []
    main = [r for r in m["runs"].values() if r["stage"] == "main"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in main:
        label = "dense" if r["rank"] is None else f"rank {r['rank']}"
        ax.plot(r["curve"]["eval_step"], r["curve"]["val_loss"], marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel="validation loss", title="validation loss vs step (each at its best lr)")
    ax.grid(alpha=0.3)
    ax.legend()
    out.append(_save(fig, figures, "rank_sweep_curves.png"))

    spectral = sorted((r for r in main if r["rank"] is not None), key=lambda r: r["rank"])
    dense = next((r for r in main if r["rank"] is None), None)
    if spectral:
        fig, ax = plt.subplots(figsize=(7, 4))
        ranks = [r["rank"] for r in spectral]
        ax.plot(ranks, [r["val_loss"] for r in spectral], "o-", color="C1", label="spectral: val loss")
        if dense:
            ax.axhline(dense["val_loss"], color="C0", ls="--", label="dense: val loss")
        ax.set(xscale="log", xlabel="rank", ylabel="final validation loss")
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.minorticks_off()
        ax2 = ax.twinx()
        ax2.plot(ranks, [r["params"] / 1e6 for r in spectral], "s:", color="C2", label="params (M)")
        ax2.plot(ranks, [r["step_s"] * 1e3 for r in spectral], "^:", color="C3", label="step (ms)")
        if dense:
            ax2.axhline(dense["params"] / 1e6, color="C2", ls=":", alpha=0.5)
        ax2.set_ylabel("params (M) / step time (ms)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
        ax.set_title("final loss, parameters and step time vs rank")
        out.append(_save(fig, figures, "rank_sweep_tradeoff.png"))

    adaptive = [r for r in m["runs"].values() if r["stage"] == "adaptive" and r["curve"].get("ranks")]
    if adaptive:
        fig, axes = plt.subplots(1, len(adaptive), figsize=(7 * len(adaptive), 4), squeeze=False)
        for ax, a in zip(axes[0], adaptive):
            for t in a["curve"]["ranks"][-1]:
                ax.plot(a["curve"]["eval_step"], [ranks.get(t, float("nan")) for ranks in a["curve"]["ranks"]],
                        marker="o", ms=3, label=t)
            ax.set(xlabel="step", ylabel="mean rank over layers", title=f"{a['name']}: rank of each layer type")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        out.append(_save(fig, figures, "rank_sweep_adaptive_ranks.png"))

    sched = [r for r in m["runs"].values() if r["stage"] == "schedule"]
    if sched:
        k = cfg["schedule_rank"]
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in sched + [r for r in main if r["rank"] in (None, k)]:
            label = f"{'dense' if r['rank'] is None else f'rank {k}'}, {r['schedule']}"
            ax.plot(r["curve"]["eval_step"], r["curve"]["val_loss"], ls="--" if r["rank"] is None else "-", label=label)
        ax.set(xlabel="step", ylabel="validation loss", title="learning-rate schedules")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append(_save(fig, figures, "rank_sweep_schedules.png"))
    return out


def compress_section(res: Dict, figures: pathlib.Path, rel: str,
                     title: str = "Compressing pretrained models: conversion, then healing", brief: bool = False) -> List[str]:
    m, cfg = res["metrics"], res["config"]
    lines = [f"## {title}", "",
             f"How obtained: `experiments/compress_pretrained.py`, {_provenance(res)}. Budgets are fractions of the "
             "converted layers' dense size; `sct` = `spectralize` + `SpectralAdam`, `sct_whitened` = the same with the "
             "calibrated (activation-whitened) conversion on "
             + (f"the first {cfg['calib_sentences']:,} training lines" if cfg.get("calib_sentences") else "training lines")
             + ", `sct_fisher` = calibrated in the "
             "Fisher metric (`whitening=\"fisher\"`, the output side weighed by the distillation loss's Gauss-Newton "
             "curvature, probed by a random projection of the embeddings; its budget may keep a layer dense, `allow_dense=True`, so fewer layers are converted), `lowrank` = the same ranks as an "
             "unconstrained `W = B A` (same truncated SVD start) + AdamW; equal steps, each method at its best lr "
             "(`sct_whitened` at sct's).", ""]
    mini = m.get("minilm")
    if mini:
        lines += [f"**all-MiniLM-L6-v2** ({mini['params'] / 1e6:.1f}M parameters; {mini['model']}): mean cosine "
                  f"similarity of sentence embeddings to the original on {mini['eval_sentences']} held-out lines, "
                  f"before and after {cfg['heal_steps']} distillation steps on {mini['train_sentences']} training lines "
                  "(heal lr: " + ", ".join(f"{k} {v:g}" for k, v in mini["heal_lr"].items()) + ").", "",
                  "| policy | method | model params | converted layers | mean rank | kept energy | cosine after conversion | cosine after healing |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in mini["rows"]:
            lines.append(f"| {r['policy']} {r['value']:g} | {r['method']} | {r['params_after'] / 1e6:.2f}M | "
                         f"{r['converted_layers']}/{r['layers']} | {r['mean_rank']:.0f} | "
                         f"{'n/a' if r['mean_kept_energy'] is None else format(r['mean_kept_energy'], '.3f')} | "
                         f"{r['cosine_before']:.4f} | {r['cosine_after']:.4f} |")
        if brief:
            return lines + [""]
        lines += ["", "One layer type at a time, energy 0.95 (MiniLM: cosine; a layer stays dense where that energy "
                  "needs a rank that would not shrink it):", "", "| layer type | converted | mean rank | cosine |",
                  "| --- | --- | --- | --- |"]
        for name, r in mini["per_type_energy_0.95"].items():
            lines.append(f"| {name} | {r['converted_layers']}/{r['layers']} | {r['mean_rank']:.0f} | {r['cosine']:.4f} |")
    lm = m.get("lm")
    if lm:
        lines += ["", f"**Causal LM trained here** (the rank sweep's tiny SmolLM2 shape, {lm['params'] / 1e6:.2f}M parameters, "
                  f"{lm['pretrain_steps']} dense steps: held-out loss {lm['pretrained_val_loss']:.3f}); "
                  f"{cfg['lm_heal_steps']} fine-tuning steps on the same batches for every method:", "",
                  "| policy | method | lr | params | val loss after conversion | val loss after fine-tuning |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in lm["rows"]:
            pol = "none" if r["value"] is None else f"{r['policy']} {r['value']:g}"
            lines.append(f"| {pol} | {r['method']} | {r['lr']:g} | {r['params_after'] / 1e6:.2f}M | "
                         f"{r['loss_before']:.3f} | {r['loss_after']:.3f} |")
        lines += ["", "| layer type (energy 0.95 alone) | converted | mean rank | val loss |", "| --- | --- | --- | --- |"]
        for name, r in lm["per_type_energy_0.95"].items():
            lines.append(f"| {name} | {r['converted_layers']}/{r['layers']} | {r['mean_rank']:.0f} | {r['val_loss']:.3f} |")
    fig = plot_compress(m, figures)
    if fig:
        lines += ["", f"![quality vs parameters]({rel}/{fig.name})"]
    return lines + [""]


def plot_compress(m: Dict, figures: pathlib.Path) -> Optional[pathlib.Path]:
    plt = _pyplot()
    if plt is None:
        return None
    parts = [(k, m[k]) for k in ("minilm", "lm") if m.get(k)]
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, (key, part) in zip(axes[0], parts):
        before, after = ("cosine_before", "cosine_after") if key == "minilm" else ("loss_before", "loss_after")
        for method, color in (("sct", "C1"), ("sct_whitened", "C0"), ("sct_fisher", "C3"), ("lowrank", "C2")):
            rows = sorted((r for r in part["rows"] if r["method"] == method), key=lambda r: r["params_after"])
            if not rows:
                continue
            if key == "lm":  # best lr per policy
                best = {}
                for r in rows:
                    k = (r["policy"], r["value"])
                    if k not in best or r[after] < best[k][after]:
                        best[k] = r
                rows = sorted(best.values(), key=lambda r: r["params_after"])
            xs = [r["params_after"] / 1e6 for r in rows]
            ax.plot(xs, [r[before] for r in rows], "o:", color=color, alpha=0.6, label=f"{method}, converted")
            ax.plot(xs, [r[after] for r in rows], "o-", color=color, label=f"{method}, healed")
        if key == "lm":
            dense = [r for r in part["rows"] if r["method"] == "dense_continued"]
            if dense:
                ax.axhline(min(r["loss_after"] for r in dense), color="C0", ls="--", label="dense, continued")
        ax.set(xlabel="model parameters (M)", ylabel="cosine to original" if key == "minilm" else "validation loss",
               title="all-MiniLM-L6-v2" if key == "minilm" else "causal LM trained here")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, figures, "compress_pretrained.png")


def finetune_section(res: Dict, figures: pathlib.Path, rel: str) -> List[str]:
    m, cfg = res["metrics"], res["config"]
    table, ref = m["table"], m["reference"]
    weights = ("SmolLM2-135M-Instruct, **Q4_1 (4-bit) GGUF weights dequantised to fp32**" if cfg["model"] == "smollm2"
               else "a random tiny Llama (smoke)")
    lines = ["## Fine-tuning SmolLM2-135M: SCT against dense, LoRA, GaLore and plain low rank", "",
             f"How obtained: `experiments/finetune_smollm2.py`, {_provenance(res)}; {weights}; every run in a fresh "
             "process, peak = `VmHWM` of training alone (reset after loading and converting; that transient is the "
             "next column).", ""]
    d, s = table.get("reference/dense/main"), table.get("reference/sct/main")
    if d and s:
        info = s["info"]
        lines += [f"**Stage `reference`** (the reference's `sct_smollm2.py --energy 0.95` recipe, {cfg['ref_steps']} "
                  f"steps of batch {cfg['batch']}; Alpaca is not reachable offline: {m['data']['reference_samples']} "
                  "Shakespeare passages in the Alpaca template stand in, same padding mask and schedule):", "",
                  "| metric | ours: dense | ours: SCT | reference: dense | reference: SCT | SCT ours / reference |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| first-step training loss | {d['first_loss']:.3f} | {s['first_loss']:.3f} | "
                  f"{ref['dense_first_loss']} | {ref['sct_first_loss']} | {s['first_loss'] / ref['sct_first_loss']:.2f} |",
                  f"| training loss, mean of the last 20 steps | {d['train_loss_last20']:.3f} | "
                  f"{s['train_loss_last20']:.3f} | n/a | n/a | n/a |",
                  f"| MLP ranks (energy 0.95) | - | {info['ranks_min']}-{info['ranks_max']} | - | "
                  f"{ref['ranks'][0]}-{ref['ranks'][1]} | {info['ranks_max'] / ref['ranks'][1]:.2f} |",
                  f"| MLP \"compression\" (dense / spectral parameters) | - | {info['mlp_compression']:.2f}x | - | "
                  f"{ref['mlp_compression']}x | {info['mlp_compression'] / ref['mlp_compression']:.2f} |",
                  f"| trainable parameters | {d['params_trainable']:,} | {s['params_trainable']:,} | | | |",
                  f"| held-out loss before -> after (never reported by the reference) | {d['val_loss_before']:.3f} -> "
                  f"{d['val_loss_after']:.3f} | {s['val_loss_before']:.3f} -> {s['val_loss_after']:.3f} | n/a | n/a | n/a |",
                  f"| conversion's loss jump (held-out, before any step) | - | {s['val_loss_pretrained']:.3f} -> "
                  f"{s['val_loss_before']:.3f} | - | (8.95 vs 2.15 first-step) | |",
                  f"| training wall time | {d['train_wall_s']:.0f} s | {s['train_wall_s']:.0f} s | {ref['dense_time_s']} s "
                  f"(400 steps) | {ref['sct_time_s']} s (400 steps) | |", ""]
    rows = [(k.split("/")[1], r) for k, r in table.items() if k.startswith("compare/")]
    if rows:
        lines += [f"**Stage `compare`** (domain adaptation to held-out Shakespeare plays; {cfg['steps']} steps of "
                  f"{cfg['batch']}x{cfg['seq']} tokens, warm-up then cosine, grad clip 1.0, "
                  + (f"each method at the best lr of a {cfg['sweep_steps']}-step sweep over its grid):" if cfg["sweep_steps"]
                     else "each method at the first lr of its grid: this preset runs no sweep):"), "",
                  "| method | lr | total params | trainable | held-out loss: pretrained -> converted -> trained | "
                  "second text: pretrained -> trained (rise) | "
                  "ppl after | train peak MiB | load+convert peak MiB | step s | tokens/s | saved MB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in rows:
            saved = "n/a" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 1e6:.1f}"
            general = (f"{r['general_loss_pretrained']:.3f} -> {r['general_loss_after']:.3f} "
                       f"({r['general_loss_after'] - r['general_loss_pretrained']:+.3f})"
                       if r.get("general_loss_after") is not None else "not measured (run before it existed)")
            mark = " (earlier run)" if r.get("measured_on") else ""
            lines.append(f"| `{name}`{mark} | {r['lr']:g} | {r['params_total'] / 1e6:.1f}M | {r['params_trainable'] / 1e6:.2f}M | "
                         f"{r['val_loss_pretrained']:.3f} -> {r['val_loss_before']:.3f} -> **{r['val_loss_after']:.3f}** | "
                         f"{general} | "
                         f"{r['val_ppl_after']:.1f} | {r['train_peak_mb']:.0f} | {r['load_convert_peak_mb']:.0f} | "
                         f"{r['step_s_median']:.2f} | {r['tokens_per_s']:.0f} | {saved} |")
        lines += [""] + [f"- `{n}`: {m['descriptions'][n]}" for n, _ in rows]
        earlier = [(n, r) for n, r in rows if r.get("measured_on")]
        if earlier:
            lines += ["", "(earlier run): " + "; ".join(f"`{n}` was measured on {r['measured_on']}" for n, r in earlier)
                      + ", in the previous run of this preset (same code path for its loss; its step time and peak "
                      "are that machine's, not comparable with the rest of this table)."]
        cpus: Dict[str, List[str]] = {}
        for n, r in rows:
            cpus.setdefault(r.get("cpu") or "an unrecorded CPU", []).append(n)
        if len(cpus) > 1:  # a --resume added arms on another machine: times and peaks compare within one
            lines += ["", "Machines: " + "; ".join(f"{', '.join(f'`{n}`' for n in names)} on {cpu}"
                                                   for cpu, names in sorted(cpus.items(), key=lambda c: -len(c[1])))
                      + ". Losses compare across them; step times and peaks only within one machine."]
        trip = next((r["roundtrip"] for n, r in rows if r.get("roundtrip")), None)
        if trip:
            lines += ["", f"The residual arm's trained model, saved with `save_spectral(..., trained_only=True)` "
                      f"({trip['trained_only_bytes'] / 1e6:.1f} MB) and loaded into a fresh base model: largest logit "
                      f"difference {trip['reload_max_abs_logit_diff']:.3g}; exported with `export_peft_lora` "
                      f"({trip['peft_adapter_bytes'] / 1e6:.1f} MB) and loaded by PEFT alone on a fresh base: "
                      f"{trip['peft_lora_max_abs_logit_diff']:.3g} (logits up to {trip['logit_scale']:.1f})."]
        if m["data"].get("general_text"):
            lines += ["", f"The second held-out text is {m['data']['general_text']} (SHA-256 prefix "
                      f"{m['data']['general_text_sha256']}); a method must not buy the new domain by erasing what the "
                      "model knew. The whitened arms calibrate on "
                      f"{cfg.get('calib_tokens', 0):,} tokens of the training plays (the new domain)"
                      + ("; `residual_k16` on as many tokens of the general text, taken past the windows it is "
                         "evaluated on (the text whose knowledge it keeps), and `residual_c16` on the training plays "
                         "against those" if any(n in ("residual_k16", "residual_c16") for n, _ in rows) else "") + "."]
        lines += conversion_jump_table(table, m["runs"])
        lines += finetune_verdict(rows)
        lines += finetune_adaptive_paragraph(table, cfg)
        lines += residual_adaptive_paragraph(table, cfg)
        lines += adaptive_rank_tables(table)
        gens = [(k.split("/")[1], r) for k, r in m["runs"].items() if k.startswith("compare/") and k.endswith("/main")
                and r.get("generations_after")]
        if gens:
            lines += ["", "Greedy continuations of the fixed prompts (before: the pretrained model; after: each method):", "",
                      "| prompt | pretrained | " + " | ".join(f"`{n}`" for n, _ in gens) + " |",
                      "| --- | --- | " + " | ".join("---" for _ in gens) + " |"]
            clean = lambda t: t.replace("\n", " / ").replace("|", "\\|")[:60]
            for i, prompt in enumerate(m["prompts"]):
                lines.append(f"| {clean(prompt)} | {clean(gens[0][1]['generations_before'][i])} | "
                             + " | ".join(clean(r["generations_after"][i]) for _, r in gens) + " |")
        fig = plot_finetune(rows, figures)
        if fig:
            lines += ["", f"![held-out loss against peak training memory and saved size]({rel}/{fig.name})"]
    return lines + [""]


def conversion_jump_table(table: Dict, runs: Dict) -> List[str]:
    """Held-out loss right after conversion at each budget: plain truncated SVD, the calibrated
    conversion whitened by the inputs, and by the inputs and the loss's output gradients (Fisher),
    with what each conversion cost (time and peak of the run that converted: the other runs of a
    sweep load its cached result), computed from the runs."""
    arms = (("plain SVD", "sct_b"), ("whitened by the inputs", "sct_w"), ("Fisher-whitened", "sct_f"))
    rows = [(f"{b}%", [table.get(f"compare/{prefix}{b}/main") for _, prefix in arms]) for b in (50, 25)]
    rows = [r for r in rows if any(r[1])]
    if not rows:
        return []
    cell = lambda r: f"{r['val_loss_before']:.3f}" if r else "not run"

    def cost(r) -> str:
        if not r or not (r.get("info") or {}).get("convert_s"):
            return "n/a"
        peak = next((x["load_convert_peak_mb"] for x in runs.values() if (x.get("info") or {}).get("convert_s")
                     == r["info"]["convert_s"] and not x["info"].get("conversion_cached")), None)
        return f"{r['info']['convert_s']:.0f} s" + (f", {peak:.0f} MiB" if peak is not None else "")
    pre = next(r["val_loss_pretrained"] for _, rs in rows for r in rs if r)
    lines = ["", f"**The conversion's loss jump** (held-out loss before any training step; pretrained {pre:.3f}):", "",
             "| linear parameters kept | " + " | ".join(label for label, _ in arms) + " | "
             + " | ".join(f"conversion: {label}" for label, _ in arms) + " |",
             "| --- " * (1 + 2 * len(arms)) + "|"]
    for label, rs in rows:
        done = [r["val_loss_before"] for r in rs if r]
        best = min(done) if done else None
        losses = [f"**{cell(r)}**" if r and r["val_loss_before"] == best else cell(r) for r in rs]
        lines.append(f"| {label} | " + " | ".join(losses) + " | " + " | ".join(cost(r) for r in rs) + " |")
    lines.append("")
    lines.append("Conversion time is `spectralize` alone (calibration forward passes, the Fisher arm's backward "
                 "passes, and both SVD passes included); the peak is the whole load-and-convert process's `VmHWM`.")
    return lines


def _adaptive_run(table: Dict, method: str) -> Optional[Tuple[Dict, Dict, Dict, List[str], int, int]]:
    """An adaptive arm's main run, its end state and settings, its layer types by final rank (most
    first) and the directions it grew and dropped over all events; ``None`` without such a run."""
    a = table.get(f"compare/{method}/main")
    if not a or not a.get("adaptive"):
        return None
    end = a["adaptive"]
    order = sorted(end["ranks_by_type"], key=end["ranks_by_type"].get, reverse=True)
    return (a, end, a["info"], order, sum(e["grown"] for e in end["events"]),
            sum(e["dropped"] for e in end["events"]))


# the compact adaptive arms: (arm, its conversion in words, the fixed arm at its start, the fixed arm at its budget)
COMPACT_ADAPTIVE = (("sct_adapt", "plain SVD", "sct_b25", "sct_b50"),
                    ("sct_fadapt", "the Fisher-whitened conversion", "sct_f25", "sct_f50"),
                    ("sct_sadapt", "the Fisher-whitened conversion", "sct_f25", "sct_f50"))


def finetune_adaptive_paragraph(table: Dict, cfg: Dict) -> List[str]:
    """Each compact adaptive arm against the fixed-rank SCT arms of its conversion at its start and
    at its budget, computed from the runs: held-out loss, the spectral parameters it ended with, and
    where the rank went."""
    return _each_arm(table, cfg, COMPACT_ADAPTIVE, _compact_adaptive_paragraph)


def _count(n: int, noun: str) -> str:
    """'1 event', '3 events'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _each_arm(table: Dict, cfg: Dict, arms: Tuple[Tuple[str, ...], ...],
              paragraph: Callable[..., List[str]]) -> List[str]:
    """``paragraph(table, cfg, *arm)`` for each arm of a table of adaptive arms, concatenated."""
    return [line for arm in arms for line in paragraph(table, cfg, *arm)]


def _compact_adaptive_paragraph(table: Dict, cfg: Dict, method: str, conversion: str, start_arm: str,
                                budget_arm: str) -> List[str]:
    run = _adaptive_run(table, method)
    if run is None:
        return []
    a, end, info, order, grown, dropped = run
    start, at_budget = table.get(f"compare/{start_arm}/main"), table.get(f"compare/{budget_arm}/main")
    text = (f"**Adaptive rank** (`{method}`: starts at {cfg['adapt_start']:.0%} of the linear parameters, "
            f"converted by {conversion}, a "
            f"`RankScheduler` every {info['every']} steps drops `|s_i| < {info['tol']:g} ||s||` and grows up to "
            f"{info['grow']} directions per layer within {cfg['adapt_budget']:.0%} of them; "
            + _growth_text(info.get("growth", "factors"), info.get("sketch_steps", 1), info.get("newborn_rate"))
            + ", "
            f"{end['budget']:,} spectral parameters): held-out loss **{a['val_loss_after']:.3f}**, ending with "
            f"{end['spectral_params_after']:,} spectral parameters ({end['spectral_params_after'] / end['budget']:.0%} "
            f"of the budget; {grown:,} directions grown, {dropped:,} dropped over {_count(len(end['events']), 'event')})")
    for name, r in ((start_arm, start), (budget_arm, at_budget)):
        if r:
            text += f"; `{name}` {r['val_loss_after']:.3f} ({a['val_loss_after'] - r['val_loss_after']:+.3f})"
    if at_budget:
        verdict = "reaches" if a["val_loss_after"] <= at_budget["val_loss_after"] + 0.02 else "does not reach"
        text += f". It {verdict} the best budgeted fixed-rank arm's held-out loss (a tie is within 0.02 nats)"
    text += (". Mean rank per layer type at the end: "
             + ", ".join(f"`{t}` {end['ranks_by_type'][t]:.0f}" for t in order) + ".")
    if end["spectral_params_after"] < end["budget"] and all(e["grown"] == e["layers"] * info["grow"] for e in end["events"]):
        text += (f" The budget never bound and every layer grew {info['grow']} directions per event, so these are the "
                 f"{cfg['adapt_start']:.0%} conversion's allocation plus the last "
                 "event's growth: no layer type took more rank than another.")
    per_event = "; ".join(f"step {e['step']}: +{e['grown']:,} -{e['dropped']:,} in {e['layers']} layers"
                          for e in end["events"])
    text += f" Rank events: {per_event}." + _survival_text(end.get("survival") or [])
    survived = grown - dropped
    if len(end["events"]) > 1 and all(e["dropped"] == prev["grown"] for prev, e in zip(end["events"], end["events"][1:])):
        text += (f" Every direction grown at one event was dropped at the next: a new direction starts at `s = 0` "
                 f"and Adam moves it by about one learning rate ({a['lr']:g}) per step, so after {info['every']} "
                 f"steps it is still below `{info['tol']:g} ||s||` of a pretrained spectrum; only the last event's "
                 f"{survived:,} directions remain, near `s = 0`. Growth from zero adds the gradient's directions, "
                 "not the pretrained spectrum a 25% truncation discarded, and cannot rebuild it at this length.")
    return ["", text]


def _growth_text(growth: str, sketch_steps: int, newborn_rate: Optional[float]) -> str:
    """How the scheduler's compact layers grow, in words."""
    if growth == "source":
        return (f"new directions are the pretrained weight's directions outside each layer's bases that remove the "
                f"most of its error in the Fisher metric of the {sketch_steps} training batch"
                f"{'es' if sketch_steps > 1 else ''} before the event (`growth=\"source\"`, the weights read from "
                "their file at the event), born with their singular values; the budget takes them direction by "
                "direction by the loss each removes per parameter")
    if growth == "gradient":
        text = (f"new directions are the leading singular pairs of each layer's weight gradient outside its bases, "
                f"sketched from the activations of the {sketch_steps} backward{'s' if sketch_steps > 1 else ''} before "
                "the event, born with values (a descent step of one dense Adam step's length)")
    else:
        text = "new directions come from the factors' gradients, born at `s = 0`"
    if newborn_rate is not None:
        text += f"; a newborn is kept while its `|s|` stays above {newborn_rate:g} x the lrs summed since its birth"
    return text


def adaptive_rank_tables(table: Dict) -> List[str]:
    """Each adaptive arm's mean rank per layer type over training: at the start and after each
    event that changed a rank (results written before the curve was recorded have none)."""
    lines: List[str] = []
    for method, *_ in COMPACT_ADAPTIVE + RESIDUAL_ADAPTIVE:
        run = table.get(f"compare/{method}/main") or {}
        curve = (run.get("adaptive") or {}).get("ranks_by_type_curve")
        if not curve:
            continue
        types = [t for t in curve[-1] if t != "step"]
        lines += ["", f"`{method}`: mean rank of each layer type over training (step 0: the conversion):", "",
                  "| step | " + " | ".join(f"`{t}`" for t in types) + " |", "| ---: | " + " | ".join("---:" for _ in types) + " |"]
        lines += [f"| {row['step']} | " + " | ".join(f"{row.get(t, 0):.1f}" for t in types) + " |" for row in curve]
    return lines


def _survival_text(survival: List[Dict]) -> str:
    """'of the directions grown at step t, a of g survived the first event allowed to drop them; ...'"""
    judged = [e for e in survival if e.get("dropped_next") is not None]
    if not judged:
        return ""
    grown = sum(e["grown"] for e in judged)
    kept = grown - sum(e["dropped_next"] for e in judged)
    per = "; ".join(f"step {e['step']}: {e['grown'] - e['dropped_next']:,} of {e['grown']:,}" for e in judged)
    return (f" Of the directions grown at an event, {kept:,} of {grown:,} ({kept / max(grown, 1):.0%}) survived the "
            f"first event allowed to drop them ({per}).")


# the residual adaptive arms: (arm, its split, which of the residual's directions it takes, the fixed arm of its split)
RESIDUAL_ADAPTIVE = (("residual_adapt", "the residual split", "the residual's strongest directions", "residual_r16"),
                     ("residual_sadapt", "the Fisher residual split", "the residual's directions the window's batches' "
                      "Fisher metric weighs most (`growth=\"source\"`)", "residual_f16"))


def residual_adaptive_paragraph(table: Dict, cfg: Dict) -> List[str]:
    """Each residual adaptive arm against the fixed-rank residual arm of its split at its budget."""
    return _each_arm(table, cfg, RESIDUAL_ADAPTIVE, _residual_adaptive_paragraph)


def _residual_adaptive_paragraph(table: Dict, cfg: Dict, method: str, split: str, taken: str,
                                 fixed_arm: str) -> List[str]:
    run = _adaptive_run(table, method)
    if run is None:
        return []
    a, end, info, order, grown, dropped = run
    fixed = table.get(f"compare/{fixed_arm}/main")
    text = (f"**Adaptive rank in residual mode** (`{method}`: every decoder linear starts at rank "
            f"{cfg['radapt_start']} of {split}; a `RankScheduler` every {info['every']} steps gives "
            f"directions with `|s_i| < {info['tol']:g} ||s||` back to the frozen residual and takes up to {info['grow']} "
            f"of {taken} per layer, with their values, within `residual_r16`'s "
            f"{end['budget']:,} spectral parameters; a newborn is safe for {info['grace']} event; the function never "
            f"changes at an event): held-out loss **{a['val_loss_after']:.3f}** at lr {a['lr']:g}, "
            f"{end['spectral_params_after']:,} spectral parameters at the end "
            f"({end['spectral_params_after'] / end['budget']:.0%} of the budget), {grown:,} directions taken from "
            f"the residual and {dropped:,} given back over {_count(len(end['events']), 'event')}")
    if fixed:
        diff = a["val_loss_after"] - fixed["val_loss_after"]
        verdict = "better than" if diff < -0.02 else ("tied with" if diff <= 0.02 else "worse than")
        text += (f"; `{fixed_arm}` {fixed['val_loss_after']:.3f} ({diff:+.3f}): {verdict} the fixed rank 16 of its "
                 "split at equal parameters (a tie is within 0.02 nats)")
        if "general_loss_after" in a and "general_loss_after" in fixed:
            text += (f"; general text {a['general_loss_after']:.3f} vs {fixed['general_loss_after']:.3f}")
    text += (". Mean rank per layer type at the end: "
             + ", ".join(f"`{t}` {end['ranks_by_type'][t]:.1f}" for t in order) + ".")
    if len(set(end["ranks_by_type"].values())) == 1 and not dropped:
        text += (" Every layer type ended at the same mean rank and no direction went back: the budget was spent evenly, "
                 "so this run measures the moves and a delayed start, not a reallocation of rank between layers.")
    text += _survival_text(end.get("survival") or [])
    trip = a.get("roundtrip")
    if trip:
        text += (f" After the moves, the trained-only checkpoint reloads with a largest logit difference of "
                 f"{trip['reload_max_abs_logit_diff']:.1e} and the PEFT LoRA export of "
                 f"{trip['peft_lora_max_abs_logit_diff']:.1e} (logits up to {trip['logit_scale']:.1f}).")
    return ["", text]


def finetune_verdict(rows) -> List[str]:
    """Where each SCT arm wins, ties or loses against each other method: held-out loss (a tie is
    within 0.02 nats), peak training memory and saved size, as measured in this run."""
    sct = [(n, r) for n, r in rows if n.startswith(("sct", "residual"))]
    others = [(n, r) for n, r in rows if not n.startswith(("sct", "residual"))]
    if not sct or not others:
        return []
    lines = ["", "Where SCT wins, ties and loses (held-out loss after fine-tuning; a tie is within 0.02 nats; a LoRA "
             "checkpoint is its adapters alone, the base model is needed beside them):", ""]
    for name, r in sct:
        parts = []
        for other, o in others:
            diff = r["val_loss_after"] - o["val_loss_after"]
            verdict = "ties" if abs(diff) <= 0.02 else ("wins" if diff < 0 else "loses")
            mem = (r["train_peak_mb"] - o["train_peak_mb"]) / o["train_peak_mb"]
            size = o["saved_bytes"] / r["saved_bytes"] if r.get("saved_bytes") and o.get("saved_bytes") else None
            parts.append(f"{verdict} against `{other}` ({diff:+.3f} nats; peak memory {mem:+.0%}"
                         + (f"; saved size {1 / size:.2f}x theirs" if size else "") + ")")
        lines.append(f"- `{name}` " + "; ".join(parts) + ".")
    return lines


def plot_finetune(rows, figures: pathlib.Path) -> Optional[pathlib.Path]:
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "train_peak_mb", "peak training memory (MiB, VmHWM)"),
                           (axes[1], "saved_bytes", "saved model (MB; LoRA: adapters only)")):
        for name, r in rows:
            x = r[key] / (1e6 if key == "saved_bytes" else 1)
            ax.scatter(x, r["val_loss_after"], s=40, marker="o" if name.startswith(("sct", "residual")) else "s")
            ax.annotate(name, (x, r["val_loss_after"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss after fine-tuning")
        ax.grid(True, alpha=0.3)
    axes[0].set_title("the memory / quality trade-off")
    axes[1].set_title("the size / quality trade-off")
    return _save(fig, figures, "finetune_smollm2.png")


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (figures skipped) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: figures skipped", file=sys.stderr)
        return None
    return plt


def _save(fig, figures: pathlib.Path, name: str) -> pathlib.Path:
    fig.tight_layout()
    path = atomic_write(figures / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_memory(rows: Dict, figures: pathlib.Path, name: str) -> Optional[pathlib.Path]:
    plt = _pyplot()
    if plt is None:
        return None
    names = list(rows)
    parts = [("param_mb", "parameters"), ("grad_mb_held", "gradients held"), ("state_mb", "Adam state"),
             ("activations_mb", "activations + runtime")]
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(names)
    for key, label in parts:
        vals = [rows[n][key] / 1024 for n in names]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("GiB (peak RSS, split by what holds it)")
    ax.tick_params(axis="x", labelrotation=30)  # eight configuration names side by side
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.set_title(f"one training step, {next(iter(rows.values()))['layers']} layers, LLaMA-3-70B shapes, rank 32")
    ax.legend()
    return _save(fig, figures, name)


def plot_mlp_curves(res: Dict, figures: pathlib.Path) -> Optional[pathlib.Path]:
    plt = _pyplot()
    if plt is None:
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
    return _save(fig, figures, "mlp_proofs_curves.png")


# ------------------------------------------------------------------------------ key figures
# What a newcomer compares first: one or a few numbers per experiment, read from its results file
# (None where the run did not produce that arm). ``side_by_side`` puts a run's beside the committed.
# (label, value, kind: "loss" | "accuracy" | "ratio" | "cosine", the CPU of the run behind the value
# where the results file records one per run: a --resume may add runs on another machine)
Figure = Tuple[str, Optional[float], str, Optional[str]]


def _dig(obj, *keys):
    for key in keys:
        if not isinstance(obj, (dict, list)):
            return None
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _mlp_figures(res: Dict) -> List[Figure]:
    summary, sched = _dig(res, "metrics", "summary"), _dig(res, "config", "schedules", 0)
    return [("sine MSE, SCT (mean over seeds)", _dig(summary, "sine", sched, "sct", "metric", "mean"), "loss", None),
            ("XOR accuracy, SCT", _dig(summary, "xor", sched, "sct", "metric", "mean"), "accuracy", None)]


def _memory_figures(res: Dict) -> List[Figure]:
    summary = _dig(res, "metrics", "summary") or {}
    best = min((r["peak_vs_reference"] for r in summary.values() if "peak_vs_reference" in r), default=None)
    return [("70B step: best lever's peak / no lever's", best, "ratio", None),
            ("8192x28672 at rank 32: compression", _dig(res, "metrics", "compression", -1, "ratio"), "ratio", None)]


def _rank_sweep_figures(res: Dict) -> List[Figure]:
    table = _dig(res, "metrics", "table") or {}
    ranks = [v["val_loss"] for k, v in table.items() if k.startswith("r") and k[1:].isdigit()]
    pruned = next((r for r in (_dig(res, "metrics", "runs") or {}).values()
                   if r.get("stage") == "adaptive" and r.get("budget_by")), None)
    return [("from scratch: dense held-out loss", _dig(table, "dense", "val_loss"), "loss", None),
            ("from scratch: best fixed-rank SCT held-out loss", min(ranks, default=None), "loss", None),
            ("from scratch: SCT pruned to rank 64's budget (RankScheduler budget_by) held-out loss",
             pruned["val_loss"] if pruned else None, "loss", None)]


def _compress_figures(res: Dict) -> List[Figure]:
    rows = _dig(res, "metrics", "minilm", "rows") or []

    def cosine(method):
        return next((r["cosine_after"] for r in rows
                     if r["policy"] == "budget" and r["value"] == 0.5 and r["method"] == method), None)

    return [("MiniLM at 50%, SCT healed: cosine", cosine("sct"), "cosine", None),
            ("MiniLM at 50%, calibrated SCT healed: cosine", cosine("sct_whitened"), "cosine", None),
            ("MiniLM at 50%, Fisher-calibrated SCT healed: cosine", cosine("sct_fisher"), "cosine", None)]


def _finetune_figures(res: Dict) -> List[Figure]:
    table = _dig(res, "metrics", "table")
    arms = (("dense", "dense AdamW"), ("residual_r16", "SCT residual r=16"), ("sct_w50", "SCT calibrated 50%"),
            ("sct_f50", "SCT Fisher-calibrated 50%"), ("sct_b50", "SCT plain SVD 50%"))
    return [(f"SmolLM2 held-out after training: {label}", _dig(table, f"compare/{arm}/main", "val_loss_after"), "loss",
             _dig(table, f"compare/{arm}/main", "cpu")) for arm, label in arms]


KEY_FIGURES: Dict[str, Callable[[Dict], List[Figure]]] = {
    "mlp_proofs": _mlp_figures, "memory_70b": _memory_figures, "rank_sweep": _rank_sweep_figures,
    "compress_pretrained": _compress_figures, "finetune_smollm2": _finetune_figures,
}


def _fmt_figure(value: Optional[float], kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "accuracy":
        return f"{100 * value:.1f}%"
    if kind == "ratio":
        return f"{value:.3g}x"
    return f"{value:.4g}"


def _where(res: Dict) -> str:
    return f" ({_dig(res, 'config', 'preset')}, {_dig(res, 'environment', 'cpu')})"


def _cell(figure: Figure, res: Optional[Dict]) -> str:
    """A figure's value, with the CPU of its run where that differs from the results file's."""
    _, value, kind, cpu = figure
    other = cpu is not None and value is not None and cpu != _dig(res, "environment", "cpu")
    return _fmt_figure(value, kind) + (f" (on {cpu})" if other else "")


def side_by_side(mine: Dict[str, Dict], committed_dir: pathlib.Path) -> List[str]:
    """A markdown table: each experiment's key figures in ``mine`` beside those of the results files in
    ``committed_dir`` (each column headed by its preset and CPU, a value measured on another CPU
    than its file's names it); experiments with no committed file show "n/a" there."""
    lines = ["| experiment | figure | this run | committed |", "| --- | --- | --- | --- |"]
    for name, figures in KEY_FIGURES.items():
        if name not in mine:
            continue
        path = committed_dir / f"{name}.json"
        theirs = json.loads(path.read_text()) if path.is_file() else None
        ours = figures(mine[name])
        others = figures(theirs) if theirs else [(label, None, kind, None) for label, _, kind, _ in ours]
        for i, (figure, other) in enumerate(zip(ours, others)):
            head = f"`{name}`" + (_where(mine[name]) if i == 0 else "")
            tail = _where(theirs) if theirs and i == 0 else ""
            lines.append(f"| {head} | {figure[0]} | {_cell(figure, mine[name])} | {_cell(other, theirs)}{tail} |")
    return lines


def _load_required(results_dir: pathlib.Path) -> Dict[str, Dict]:
    """Every required result (for alternatives: those present); raises before anything is written."""
    results = {}
    for experiment in EXPERIMENTS:
        names = experiment.results  # alternatives: at least one must exist
        present = [n for n in names if (results_dir / f"{n}.json").is_file()]
        for name in present or names[:1]:  # none present: load() names the first one missing
            results[name] = load(results_dir, name)
    return results


def _shown(path: pathlib.Path) -> str:
    """``path`` relative to the repository when inside it (the report never names a home directory)."""
    try:
        return str(path.resolve().relative_to(ROOT.resolve())) or "."
    except ValueError:
        return str(path)


def _memory_sections(results: Dict, figures: pathlib.Path, rel: str, results_dir: pathlib.Path) -> List[str]:
    lines: List[str] = []
    for name, title in MEMORY_TITLES.items():
        if name in results:
            results[name]["experiment"] = name
            lines += memory_section(results[name], figures, rel, title)
    return lines


def _compress_sections(results: Dict, figures: pathlib.Path, rel: str, results_dir: pathlib.Path) -> List[str]:
    lines = compress_section(results["compress_pretrained"], figures, rel)
    long_run = results_dir / "compress_pretrained_long.json"
    if long_run.is_file():  # optional: a longer healing run of the MiniLM budgets
        with open(long_run) as fh:
            extra = json.load(fh)
        lines += compress_section(extra, figures, rel, brief=True,
                                  title=f"Longer healing of MiniLM ({extra['config']['heal_steps']} steps, "
                                        "`results/compress_pretrained_long.json`)")
    return lines


# each registered experiment's report section (experiments.Experiment.section names its key):
# f(results by file name, figures folder, its path relative to the report, the results folder)
Section = Callable[[Dict, pathlib.Path, str, pathlib.Path], List[str]]
SECTIONS: Dict[str, Section] = {
    "mlp": lambda res, fig, rel, _: mlp_section(res["mlp_proofs"], fig, rel),
    "memory": _memory_sections,
    "rank_sweep": lambda res, fig, rel, _: rank_sweep_section(res["rank_sweep"], fig, rel),
    "compress": _compress_sections,
    "finetune": lambda res, fig, rel, _: finetune_section(res["finetune_smollm2"], fig, rel),
}


def check_sections(experiments=None) -> None:
    """Every registered experiment has a report section; ``LookupError`` naming the first that
    has none."""
    for experiment in EXPERIMENTS if experiments is None else experiments:
        if experiment.section not in SECTIONS:
            raise LookupError(f"experiment {experiment.name!r} names report section {experiment.section!r}, which "
                              f"paper/build.py does not have (SECTIONS: {', '.join(sorted(SECTIONS))}): add its "
                              "renderer to SECTIONS")


def build(results_dir: pathlib.Path, out_dir: pathlib.Path,
          compare: Optional[pathlib.Path] = None) -> pathlib.Path:
    """Write ``out_dir/README.md`` (and its figures) from ``results_dir``; with ``compare``, open it with
    the side-by-side of the key figures and those of ``compare`` (skipped when it is ``results_dir``)."""
    check_sections()  # fail before writing anything: no registered experiment goes unrendered
    results = _load_required(results_dir)
    lines = ["# stiefel-sct: the SCT paper, reproduced", "",
             f"Generated by `python -m paper.build` from `{_shown(results_dir)}/*.json`; do not edit by hand. "
             "Rerun everything with `python -m experiments.reproduce --preset quick` (the CPU-scale tables, "
             "~30 min on 2 cores), `--preset fast` (every table from smaller runs, ~20 min) or `--preset paper`; "
             "each writes `runs/reproduce/<preset>/` unless given `--out`.", ""]
    if compare is not None and compare.resolve() != results_dir.resolve():
        lines += ["## This run beside the committed one", "",
                  f"Key figures of this run (`{_shown(results_dir)}`) and of the committed results "
                  f"(`{_shown(compare)}`), each headed by its preset and CPU. A smaller preset gives "
                  "noisier figures (fewer seeds, steps or learning rates); the sections below say how "
                  "each of this run's figures was obtained.", ""]
        lines += side_by_side(results, compare) + [""]
    fast = sorted(name for name, res in results.items() if res["config"].get("preset") == "fast")
    if fast:
        lines += [f"**Smaller runs**: {', '.join(f'`{n}`' for n in fast)} below come from the `fast` preset "
                  "(fewer seeds, steps or learning rates than `quick`; each section's provenance line says "
                  "which). Their numbers are noisier than the committed `quick` tables.", ""]
    for experiment in EXPERIMENTS:
        lines += SECTIONS[experiment.section](results, out_dir / "figures", "figures", results_dir)
    path = out_dir / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--out", default=str(ROOT / "paper"))
    ap.add_argument("--compare", default=None, metavar="DIR",
                    help="open the report with the key figures beside those of DIR/*.json (and print them)")
    args = ap.parse_args(argv)
    compare = pathlib.Path(args.compare) if args.compare else None
    try:
        path = build(pathlib.Path(args.results), pathlib.Path(args.out), compare)
    except (MissingResults, LookupError) as exc:
        print(f"paper/build.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    if compare is not None and compare.resolve() != pathlib.Path(args.results).resolve():
        results = _load_required(pathlib.Path(args.results))
        print("\n".join(["", f"key figures: this run ({_shown(pathlib.Path(args.results))}) beside the committed "
                          f"results ({_shown(compare)})"] + side_by_side(results, compare)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
