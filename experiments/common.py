"""Shared plumbing for experiments and benchmarks: seeding, device choice, environment record,
atomic results files and a progress bar. Experiments use only the public stiefel_sct API."""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
from typing import Any, Iterable, Optional

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: Optional[str] = None) -> torch.device:
    """``name`` if given, else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _cpu_model() -> str:
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
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _total_memory_gib(),
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def atomic_write_json(path: os.PathLike, payload: Any) -> pathlib.Path:
    """Write ``payload`` as JSON to ``path`` via a temporary file and a rename.

    Either the new file is complete or the old one is untouched (serialisation happens before
    anything is written; the rename is atomic on POSIX).
    """
    path = pathlib.Path(path)
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_results(name: str, config: dict, metrics: dict, device: Optional[torch.device] = None,
                  results_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """``results/<name>.json`` with the config, metrics and environment, written atomically."""
    payload = {"experiment": name, "config": config, "environment": environment(device), "metrics": metrics}
    return atomic_write_json(pathlib.Path(results_dir or RESULTS_DIR) / f"{name}.json", payload)


def progress(iterable: Iterable, **kwargs):
    """A tqdm progress bar on stderr (disabled when stderr is not a terminal unless forced)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", None if sys.stderr.isatty() else True)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
