"""What a spectral checkpoint must satisfy before it touches a model: a well-formed
``spectral_config.json``, weight files whose checksums match the ones recorded at save time, and
spectral tensors that are finite with orthonormal factors.

Each check raises :class:`CheckpointError` naming the file (and the layer or tensor) and what is
wrong; :func:`~stiefel_sct.load_spectral` runs them all before it changes anything.

The file checksum is a position-weighted 64-bit sum of the file's 64-bit words (:func:`file_checksum`),
not a cryptographic hash: it guards against damage (any single flipped bit, truncation, a garbage
tail), not against tampering. Measured on SmolLM2-135M at 50% (a 326 MB ``model.safetensors``, AMD
EPYC, 2 cores): 11 ms, where SHA-256 takes 270 ms and CRC-32 210 ms, against 230-660 ms for the
whole ``load_spectral``. The orthonormality check is a sketch for the same reason: ``Y = U z`` for a
fixed random ``z`` and ``| ||Y||^2 - ||z||^2 | <= tol ||z||^2``, one matrix-vector product per factor
(27 ms for that model's 420 factors, where the ``k x k`` Gram matrices take 200 ms); a non-finite
factor makes ``Y`` non-finite.
"""

from __future__ import annotations

import math
import mmap
import pathlib
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .manifold import RETRACTIONS

__all__ = ["CheckpointError", "check_spectral_tensors", "file_checksum", "validate_config"]

CHECKSUM_ALGORITHM = "sum64-chunked"
_CHUNK_WORDS = 8192  # 64 KiB chunks: each chunk's sum is weighted by its position (odd weights)

# |Y^T Y - z^T z| / |z|^2 a saved factor may show, by dtype: ~1000x what a factor retracted in that
# dtype shows (fp32 ~1e-6, bf16 ~4e-4 measured as max |U^T U - I|), far below what damage does
ORTHONORMALITY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


class CheckpointError(ValueError):
    """A checkpoint directory that does not fit the model, is damaged, or is not a spectral checkpoint."""


def file_checksum(path: pathlib.Path) -> str:
    """The 64-bit checksum :func:`~stiefel_sct.save_spectral` records for each weight file: the file
    read as little-endian 64-bit words (the tail zero-padded), summed per 64 KiB chunk with
    wrap-around, the chunk sums weighted by ``1, 3, 5, ...`` and summed again. An odd weight times
    ``2^b`` is never ``0 mod 2^64``, so any single flipped bit changes it; the weights make it see
    chunks that moved. One pass at memory speed, on torch's threads."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    if size == 0:
        return f"{CHECKSUM_ALGORITHM}:{0:016x}"
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with warnings.catch_warnings():  # read-only mapping: nothing here writes through it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mm, dtype=torch.uint8)
        whole = size - size % 8
        words = raw[:whole].view(torch.int64)
        full = words.numel() - words.numel() % _CHUNK_WORDS
        sums = [words[:full].view(-1, _CHUNK_WORDS).sum(dim=1)] if full else []
        if full < words.numel():
            sums.append(words[full:].sum().view(1))
        tail = bytes(raw[whole:].tolist()) if whole < size else b""
        del raw, words  # the mapping cannot close while a tensor points into it
    if tail:
        sums.append(torch.tensor([int.from_bytes(tail.ljust(8, b"\0"), "little", signed=True)], dtype=torch.int64))
    chunk_sums = torch.cat(sums) if sums else torch.zeros(1, dtype=torch.int64)
    weights = torch.arange(1, 2 * chunk_sums.numel(), 2, dtype=torch.int64)
    value = int((chunk_sums * weights).sum()) & (2**64 - 1)
    return f"{CHECKSUM_ALGORITHM}:{value:016x}"


# ------------------------------------------------------------------------------ the JSON's shape
def _fail(path: pathlib.Path, where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {where} {what} (a damaged or hand-edited {path.name}?)")


def _need(path: pathlib.Path, obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _fail(path, where, f"has no {key!r}")
    return obj[key]


def _int(path: pathlib.Path, value: Any, where: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise _fail(path, where, f"must be an int {allowed}, got {value!r}")
    return value


def _dict(path: pathlib.Path, value: Any, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, where, f"must be a JSON object, got {type(value).__name__}")
    return value


def _layer(path: pathlib.Path, name: str, entry: Any, dtypes: Mapping[str, torch.dtype]) -> None:
    where = f"layers[{name!r}]"
    entry = _dict(path, entry, where)
    kind = _need(path, entry, "kind", where)
    dims = {"linear": ("in_features", "out_features"), "embedding": ("num_embeddings", "embedding_dim")}
    if kind not in dims:
        raise _fail(path, f"{where}.kind", f"must be one of {tuple(dims)}, got {kind!r}")
    m, n = (_int(path, _need(path, entry, key, where), f"{where}.{key}", 1) for key in dims[kind])
    _int(path, _need(path, entry, "rank", where), f"{where}.rank", 1, min(m, n))
    if _need(path, entry, "retraction", where) not in RETRACTIONS:
        raise _fail(path, f"{where}.retraction", f"must be one of {RETRACTIONS}, got {entry['retraction']!r}")
    if _need(path, entry, "dtype", where) not in dtypes or not dtypes[entry["dtype"]].is_floating_point:
        raise _fail(path, f"{where}.dtype", f"must be a floating dtype name, got {entry['dtype']!r}")
    if kind == "linear":
        if not isinstance(_need(path, entry, "bias", where), bool):
            raise _fail(path, f"{where}.bias", f"must be true or false, got {entry['bias']!r}")
        residual = entry.get("residual")
        if residual is not None:
            residual = _dict(path, residual, f"{where}.residual")
            if _need(path, residual, "dtype", f"{where}.residual") not in dtypes:
                raise _fail(path, f"{where}.residual.dtype", f"must be a dtype name, got {residual['dtype']!r}")
            if not isinstance(_need(path, residual, "base_fingerprint", f"{where}.residual"), str):
                raise _fail(path, f"{where}.residual.base_fingerprint", "must be a string")
    else:
        pad = _need(path, entry, "padding_idx", where)
        if pad is not None:
            _int(path, pad, f"{where}.padding_idx", -m, m - 1)


def _tensor_entry(path: pathlib.Path, where: str, entry: Any, dtypes: Mapping[str, torch.dtype]) -> None:
    entry = _dict(path, entry, where)
    shape = _need(path, entry, "shape", where)
    if not isinstance(shape, list):
        raise _fail(path, f"{where}.shape", f"must be a list of ints, got {shape!r}")
    for i, d in enumerate(shape):
        _int(path, d, f"{where}.shape[{i}]", 0)
    if _need(path, entry, "dtype", where) not in dtypes:
        raise _fail(path, f"{where}.dtype", f"must be a dtype name, got {entry['dtype']!r}")


def validate_config(path: pathlib.Path, config: Any, dtypes: Mapping[str, torch.dtype],
                    weight_files: tuple) -> Dict[str, Any]:
    """``config`` (read from ``path``) checked for the shape :func:`~stiefel_sct.save_spectral`
    writes: every layer, tensor and file entry with values in range. Returns it; raises
    :class:`CheckpointError` naming the first entry that is wrong."""
    config = _dict(path, config, "the top level")
    for name, entry in _dict(path, _need(path, config, "layers", "the top level"), "layers").items():
        _layer(path, name, entry, dtypes)
    for key in ("tensors", "base_tensors"):
        for name, entry in _dict(path, config.get(key) or {}, key).items():
            _tensor_entry(path, f"{key}[{name!r}]", entry, dtypes)
            if key == "base_tensors" and not isinstance(_need(path, entry, "sha256", f"{key}[{name!r}]"), str):
                raise _fail(path, f"{key}[{name!r}].sha256", "must be a string")
    for alias, source in _dict(path, _need(path, config, "tied", "the top level"), "tied").items():
        if not isinstance(source, str):
            raise _fail(path, f"tied[{alias!r}]", f"must name a tensor, got {source!r}")
    if config.get("optimizer") is not None:
        _dict(path, config["optimizer"], "optimizer")
    for name, entry in _dict(path, config.get("files") or {}, "files").items():
        if name not in weight_files:
            raise _fail(path, f"files[{name!r}]", f"is not one of the checkpoint's files {weight_files}")
        entry = _dict(path, entry, f"files[{name!r}]")
        _int(path, _need(path, entry, "bytes", f"files[{name!r}]"), f"files[{name!r}].bytes", 0)
        checksum = _need(path, entry, "checksum", f"files[{name!r}]")
        if not (isinstance(checksum, str) and checksum.startswith(f"{CHECKSUM_ALGORITHM}:")):
            raise _fail(path, f"files[{name!r}].checksum", f"must be a {CHECKSUM_ALGORITHM} checksum, got {checksum!r}")
    return config


def check_file(path: pathlib.Path, entry: Optional[Mapping[str, Any]], config_name: str) -> None:
    """``path`` has the size and checksum ``entry`` (from the config's ``files``) recorded at save time."""
    if entry is None:
        raise CheckpointError(f"{path}: {config_name} records no checksum for it (a damaged {config_name}?)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{path} is {size} bytes, {config_name} says {entry['bytes']}: the file is damaged "
                              "(truncated or overwritten); save the checkpoint again")
    if file_checksum(path) != entry["checksum"]:
        raise CheckpointError(f"{path}: checksum mismatch, the file is damaged (flipped bits or overwritten bytes); "
                              "save the checkpoint again")


# ------------------------------------------------------------------------------ the values
@torch.no_grad()
def check_spectral_tensors(state: Mapping[str, torch.Tensor], layers: Mapping[str, Mapping[str, Any]],
                           weights: pathlib.Path) -> None:
    """Every spectral layer's ``s`` finite and its ``U`` and ``V`` finite with orthonormal columns
    (the sketch above), read from ``state`` before the model changes. A residual layer's frozen
    ``U0``, ``s0``, ``V0`` are checked alike. One matrix-vector product per factor, then one
    batched norm over all of them (a per-factor norm and comparison cost as much again)."""
    probes: Dict[tuple, torch.Tensor] = {}
    spectra: List[Tuple[str, str, torch.Tensor]] = []  # (tensor name, layer name, tensor)
    factors: List[Tuple[str, str, torch.Tensor]] = []
    for name, entry in layers.items():
        prefix = f"{name}." if name else ""
        for keys in [("U", "s", "V")] + ([("U0", "s0", "V0")] if entry.get("residual") else []):
            for key in keys:
                tensor = state.get(prefix + key)  # absent: a tensor the base model provides (SHA-256 checked)
                if tensor is not None:
                    (spectra if key.startswith("s") else factors).append((prefix + key, name, tensor))
    if spectra:
        norms = torch.stack([n.float() for n in torch._foreach_norm([t for _, _, t in spectra])])
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad:
            key, name, _ = spectra[bad[0]]
            raise CheckpointError(f"{weights}: {key} (layer {name!r}) holds non-finite singular values")
    if not factors:
        return
    outputs, expected = [], []
    for _, _, factor in factors:
        work = factor if factor.dtype in (torch.float32, torch.float64) else factor.float()
        k = work.shape[1]
        z = probes.get((k, work.dtype))
        if z is None:
            z = probes[(k, work.dtype)] = torch.randn(k, generator=torch.Generator().manual_seed(k), dtype=work.dtype)
        outputs.append(torch.mv(work, z))
        expected.append(z)
    got = torch.stack([n.double() for n in torch._foreach_norm(outputs)]) ** 2
    want = torch.stack([n.double() for n in torch._foreach_norm(expected)]) ** 2
    err = (got - want).abs() / want
    tol = torch.tensor([ORTHONORMALITY_TOLERANCE.get(f.dtype, 5e-2) for _, _, f in factors], dtype=torch.float64)
    failing = (~(err <= tol)).nonzero().flatten().tolist()  # NaN compares False: non-finite fails too
    if not failing:
        return
    i = failing[0]
    key, name, factor = factors[i]
    if not math.isfinite(float(err[i])):
        raise CheckpointError(f"{weights}: {key} (layer {name!r}) holds non-finite values")
    raise CheckpointError(
        f"{weights}: {key} (layer {name!r}) does not have orthonormal columns (sketch error {float(err[i]):.2e} > "
        f"{float(tol[i]):.0e} for {str(factor.dtype).removeprefix('torch.')}): the file is damaged, or the model was "
        "trained without a retraction (SpectralAdam and stiefel_retraction keep factors on the manifold); "
        "load_spectral(..., verify=False) loads it anyway")
