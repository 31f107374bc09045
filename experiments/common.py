"""Shared plumbing for experiments and benchmarks: seeding, configuration from presets and the
command line, environment record, peak memory, atomic files and progress reporting.
Experiments use only the public stiefel_sct API.

Run every script as a module from the repository root (``python -m experiments.NAME``): the
``experiments`` package is then importable without any ``sys.path`` edit."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import random
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"

C = TypeVar("C")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ------------------------------------------------------------------------------ configuration
def add_preset_argument(ap: argparse.ArgumentParser, presets: Dict[str, dict], default: str = "quick") -> None:
    """``--preset`` with the experiment's presets as choices."""
    ap.add_argument("--preset", default=default, choices=sorted(presets),
                    help=f"named settings (default {default}): " + ", ".join(sorted(presets)))


def config_from_args(cls: Type[C], presets: Dict[str, dict], args: argparse.Namespace,
                     overrides: Sequence[str] = ()) -> C:
    """``cls`` (a dataclass with a ``preset`` field) from ``args.preset``'s preset, then every
    attribute of ``args`` named in ``overrides`` that was given (not ``None``) on the command line."""
    cfg = cls(preset=args.preset, **presets[args.preset])  # type: ignore[call-arg]
    for key in overrides:
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    return cfg


# ------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gib() -> Optional[float]:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def environment(device: Optional[torch.device] = None) -> dict:
    """What produced a result: versions, machine, threads, date."""
    import geoopt

    import stiefel_sct

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "geoopt": getattr(geoopt, "__version__", "unknown"),
        "stiefel_sct": stiefel_sct.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _total_memory_gib(),
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ------------------------------------------------------------------------------ peak memory
def reset_peak_rss() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux; elsewhere a no-op)."""
    try:  # writing 5 to clear_refs resets VmHWM
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# glibc keeps what is freed (no mmap'd blocks, no trimming), so a training step reuses its pages
# instead of page-faulting fresh ones every step; glibc reads these at process start.
CACHING_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}

# Transparent huge pages for a step's big short-lived tensors, two switches: glibc >= 2.35
# madvise(MADV_HUGEPAGE)s its mmap'd chunks and heap; PyTorch (THP_MEM_ALLOC_ENABLE) aligns CPU
# tensors of >= 2 MB to 2 MB and madvises them, so whole huge pages fit inside them. A fresh 15 MB
# activation then faults in a few huge pages instead of ~3,600 small ones. Both need THP
# "madvise" or "always" in /sys/kernel/mm/transparent_hugepage/enabled (elsewhere they do
# nothing) and are read when a process starts. Measured on memory_70b's ckpt2_sib step at 4
# layers (eager, two rounds): 689K minor faults and 1.36-1.44 s system time in a 1.54-1.57 s
# step; with both switches 223-229K faults, 0.70-1.10 s, 1.01-1.50 s.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def with_tunable(tunables: str, setting: str) -> str:
    """``GLIBC_TUNABLES`` with ``setting`` (``name=value``) added, or replacing that name's value."""
    name = setting.split("=", 1)[0]
    kept = [t for t in tunables.split(":") if t and t.split("=", 1)[0] != name]
    return ":".join(kept + [setting])


def huge_pages_env(env: Mapping[str, str]) -> Dict[str, str]:
    """The variables to add to ``env`` (a child process's environment) for huge pages; the
    user's other glibc tunables are kept."""
    return {"GLIBC_TUNABLES": with_tunable(env.get("GLIBC_TUNABLES", ""), HUGE_PAGES_TUNABLE),
            "THP_MEM_ALLOC_ENABLE": "1"}


def release_free_memory() -> bool:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so a
    following :func:`reset_peak_rss` measures from what is live, not from what setup (loading a
    dense model and converting it) freed but glibc kept. Returns whether ``malloc_trim`` ran."""
    import ctypes
    import gc

    gc.collect()
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim(0)
    return True


def peak_rss_mib() -> Optional[float]:
    """This process's peak resident set size (``VmHWM``) in MiB; ``None`` where /proc has none."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------ atomic files
def atomic_write(path: os.PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    Either the new file is complete or the old one is untouched (the rename is atomic on POSIX);
    a failed ``write`` leaves no temporary file behind. Every file the experiments and the
    report write goes through here.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one fixed name per target (each file has one writer): a process killed mid-write leaves
    # ``.NAME.tmp`` beside an intact ``NAME``, and the next write simply replaces it
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: os.PathLike, text: str) -> pathlib.Path:
    """``text`` to ``path``, atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: os.PathLike, payload: Any) -> pathlib.Path:
    """``payload`` as JSON to ``path``, atomically; serialised before anything is written."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, allow_nan=True) + "\n")


def atomic_torch_save(path: os.PathLike, payload: Any) -> pathlib.Path:
    """``torch.save(payload)`` to ``path``, atomically: a checkpoint is complete or absent."""
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def write_results(name: str, config: dict, metrics: dict, device: Optional[torch.device] = None,
                  results_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """``results/<name>.json`` with the config, metrics and environment, written atomically."""
    payload = {"experiment": name, "config": config, "environment": environment(device), "metrics": metrics}
    return atomic_write_json(pathlib.Path(results_dir or RESULTS_DIR) / f"{name}.json", payload)


# ------------------------------------------------------------------------------ progress
def _progress_lines(iterable: Iterable, desc: str = "", total: Optional[int] = None, initial: int = 0,
                    every: Optional[int] = None) -> Iterator:
    """Yield from ``iterable``, printing ``desc: i/total done, elapsed, eta`` to stderr after each
    item (or each ``every`` items): what a log file shows instead of a progress bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    t0, done = time.time(), initial
    for item in iterable:
        yield item
        done += 1
        if every is None or done % every == 0 or done == total:
            elapsed = time.time() - t0
            eta = elapsed / (done - initial) * (total - done) if total else None
            of = f"/{total}" if total else ""
            tail = f", ~{eta:.0f} s left" if eta is not None else ""
            print(f"{desc}: {done}{of} done, {elapsed:.0f} s{tail}", file=sys.stderr, flush=True)


def progress(iterable: Iterable, desc: str = "", lines_every: Optional[int] = None, **kwargs):
    """A tqdm progress bar when stderr is a terminal; otherwise a line per finished item (or per
    ``lines_every`` items) on stderr, so a run piped to a log file still shows its progress."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, desc=desc, **kwargs)
    return _progress_lines(iterable, desc=desc, total=kwargs.get("total"), initial=kwargs.get("initial", 0),
                           every=lines_every)




# ------------------------------------------------------------------------------ language-model training
def lm_loss(model, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM (``model(input_ids=...).logits``); ``mask`` marks
    the tokens that count (the SCT reference masks padding)."""
    logits = model(input_ids=ids[:, :-1]).logits.float()
    targets = ids[:, 1:].clone()
    if mask is not None:
        targets[~mask[:, 1:]] = -100
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term: ``T^2 KL(softmax(teacher / T) || softmax(student / T))``, mean
    over tokens (the ``T^2`` keeps its gradient's scale independent of ``T``)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = temperature
    s = torch.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)
    q = torch.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)
    return torch.nn.functional.kl_div(s, q, log_target=True, reduction="batchmean") * t * t


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ------------------------------------------------------------------------------ conversions
class LowRankLinear(torch.nn.Module):
    """``y = x A^T B^T + b``: an unconstrained rank-``k`` factorization (the baseline SCT is compared with)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = torch.nn.Parameter(torch.empty(rank, in_features))
        self.B = torch.nn.Parameter(torch.empty(out_features, rank))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, rank: int) -> LowRankLinear:
        """Truncated SVD ``W ~ P S Q^T`` split evenly: ``B = P sqrt(S)``, ``A = sqrt(S) Q^T``."""
        P, S, Qh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        root = S[:rank].sqrt()
        layer.A.copy_(root[:, None] * Qh[:rank])
        layer.B.copy_(P[:, :rank] * root)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.A), self.B, self.bias)


def convert(model: torch.nn.Module, method: str, include: str, *, energy: Optional[float] = None,
            budget_fraction: Optional[float] = None, calibration: Any = None, whitening: str = "inputs",
            rank: Optional[int] = None, residual_dtype: Optional[str] = None,
            calibration_forward: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
            directions: str = "principal", preserve: Any = None, allow_dense: bool = False) -> Dict:
    """Convert ``model`` in place: ``"sct"`` with ``spectralize`` (energy, or a budget given as a
    fraction of the selected layers' dense size; ``calibration``: data-aware truncation on those
    batches, in the ``whitening`` metric); ``"lowrank"`` with :class:`LowRankLinear` at the ranks
    SCT would choose (or, for ``"sct"``, one ``rank`` for every layer; ``residual_dtype``: residual
    mode; ``calibration_forward``: ``spectralize``'s, how a calibration batch runs; ``directions``:
    which directions residual layers train, and ``preserve``, ``directions="contrast"``'s text to
    keep; ``allow_dense``: a budget may keep a layer whole: ``spectralize``'s). Returns the
    conversion report as a dict (with the seconds it took)."""
    import copy

    from stiefel_sct import SpectralConfig, match_module, spectralize

    t0 = time.perf_counter()
    selected = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and match_module(n, include)]
    dense = sum(m.weight.numel() for _, m in selected)
    recipe = SpectralConfig(rank=rank, energy=energy, budget_fraction=budget_fraction, include=include,
                            retraction="cholqr2", whitening=whitening, residual_dtype=residual_dtype,
                            directions=directions, allow_dense=allow_dense)
    probe = copy.deepcopy(model) if method == "lowrank" else model
    report = spectralize(probe, recipe, calibration=calibration, calibration_forward=calibration_forward,
                         preserve=preserve).spectral_report
    if method == "lowrank":
        modules = dict(model.named_modules())
        for r in report:
            if r.converted:
                parent, _, child = r.name.rpartition(".")
                setattr(modules[parent], child, LowRankLinear.from_linear(modules[r.name], r.rank))
    return {"converted_layers": sum(r.converted for r in report), "layers": len(report),
            "selected_dense_params": dense, "params_after": sum(p.numel() for p in model.parameters()),
            "selected_params_after": sum(r.params - (r.dense_params - r.shape[0] * r.shape[1]) for r in report),
            "mean_rank": sum(r.rank or min(r.shape) for r in report) / max(1, len(report)),
            "mean_kept_energy": (sum(r.kept_energy for r in report if r.kept_energy is not None)
                                 / sum(r.kept_energy is not None for r in report)
                                 if any(r.kept_energy is not None for r in report) else None),
            "ranks_by_type": ranks_of_report(report), "convert_s": time.perf_counter() - t0,
            "ranks_by_name": {r.name: r.rank for r in report}}


def ranks_of_report(report) -> Dict[str, float]:
    """Mean rank of each layer type (the last part of the name) in a conversion report."""
    by: Dict[str, List[int]] = {}
    for r in report:
        by.setdefault(r.name.rsplit(".", 1)[-1], []).append(r.rank or 0)
    return {t: sum(ks) / len(ks) for t, ks in sorted(by.items())}


def spectral_layers(model) -> List[Tuple[str, Any]]:
    """``(name, layer)`` of the model's spectral linear layers."""
    from stiefel_sct import SpectralLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, SpectralLinear)]


def ranks_by_type(model) -> Dict[str, float]:
    """Mean rank of each layer type (``q_proj``, ``gate_proj``, ...) over the model's spectral layers."""
    by: Dict[str, List[int]] = {}
    for n, m in spectral_layers(model):
        by.setdefault(n.rsplit(".", 1)[-1], []).append(m.rank)
    return {t: sum(ks) / len(ks) for t, ks in sorted(by.items())}
