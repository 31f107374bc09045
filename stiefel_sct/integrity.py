"""What a spectral checkpoint must satisfy before it touches a model: a well-formed
``spectral_config.json``, weight files whose checksums match the ones recorded at save time, and
spectral tensors that are finite with orthonormal factors.

Each check raises :class:`CheckpointError` naming the file (and the layer or tensor) and what is
wrong; :func:`~stiefel_sct.load_spectral` runs them all before it changes anything.

The file checksum is a position-weighted 64-bit sum of the file's 64-bit words (:func:`file_checksum`),
not a cryptographic hash: it guards against damage (any single flipped bit, truncation, a garbage
tail), not against tampering. Measured on SmolLM2-135M at 50% (a 326 MB ``model.safetensors``, AMD
EPYC, 2 cores): 11-18 ms, where SHA-256 takes 270 ms and CRC-32 210 ms. The orthonormality check
is a sketch for the same reason: ``Y = U z`` for a fixed random ``z`` and
``| ||Y||^2 - ||z||^2 | <= tol ||z||^2``, one matrix-vector product per factor (27-45 ms for that
model's 420 factors, where the ``k x k`` Gram matrices take 200 ms); a non-finite factor makes ``Y``
non-finite. :func:`read_weights` runs both on the memory-mapped file as it hands out the tensors.

The values are checked once, at save: :func:`~stiefel_sct.save_spectral` runs the value checks on
the tensors it writes and records the outcome beside the file's checksum (``values_passed`` in
``spectral_config.json``). A load whose checksum matches reads exactly those bytes, so where the
record says they passed the probes are not run again; a checkpoint without the record (saved by
an older version) or with values that failed is probed on load, which names the layer. The
checksum guards the record as it guards the values: against damage, not against someone who
rewrites the weights and the JSON together.
"""

from __future__ import annotations

import json
import math
import mmap
import pathlib
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from .checks import is_int
from .kinds import KINDS
from .manifold import RETRACTIONS

__all__ = ["CheckpointError", "TensorRecord", "ValueCheck", "check_spectral_tensors", "file_checksum", "read_header",
           "read_weights", "validate_config", "values_pass"]

CHECKSUM_ALGORITHM = "sum64-chunked"
_CHUNK_WORDS = 8192  # 64 KiB chunks: each chunk's sum is weighted by its position (odd weights)
_CHUNK_BYTES = 8 * _CHUNK_WORDS
# a weight file is read (and checksummed, and its factors probed) 2 MiB at a time, so each block is
# still in cache when it is summed: measured in benchmarks/bench_checkpoint.py (see read_weights)
_BLOCK_BYTES = 32 * _CHUNK_BYTES

# |Y^T Y - z^T z| / |z|^2 a saved factor may show, by dtype: ~1000x what a factor retracted in that
# dtype shows (fp32 ~1e-6, bf16 ~4e-4 measured as max |U^T U - I|), far below what damage does
ORTHONORMALITY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


class CheckpointError(ValueError):
    """A checkpoint directory that does not fit the model, is damaged, or is not a spectral checkpoint."""


class _Checksum:
    """The running state of :func:`file_checksum` over a file read front to back in blocks whose
    lengths are whole chunks (only the last block may be shorter), so a reader can checksum each
    block while it is still in cache."""

    def __init__(self) -> None:
        self._sums: List[torch.Tensor] = []
        self._done = False

    def block(self, data: torch.Tensor) -> None:
        """Add the next ``data`` (uint8) of the file; a block that is not whole chunks ends the file."""
        if self._done:
            raise RuntimeError("_Checksum.block after the file's last block")
        n = data.numel()
        whole = n - n % 8
        words = data[:whole].view(torch.int64)
        full = words.numel() - words.numel() % _CHUNK_WORDS
        if full:
            self._sums.append(words[:full].view(-1, _CHUNK_WORDS).sum(dim=1))
        if full < words.numel():
            self._sums.append(words[full:].sum().view(1))
        if whole < n:  # the file's last bytes, zero-padded to one more word
            tail = bytes(data[whole:].tolist()).ljust(8, b"\0")
            self._sums.append(torch.tensor([int.from_bytes(tail, "little", signed=True)], dtype=torch.int64))
        self._done = n % _CHUNK_BYTES != 0

    def hexdigest(self) -> str:
        if not self._sums:
            return f"{CHECKSUM_ALGORITHM}:{0:016x}"
        chunk_sums = torch.cat(self._sums)
        weights = torch.arange(1, 2 * chunk_sums.numel(), 2, dtype=torch.int64)
        value = int((chunk_sums * weights).sum()) & (2**64 - 1)
        return f"{CHECKSUM_ALGORITHM}:{value:016x}"


def _mapped(path: pathlib.Path) -> torch.Tensor:
    """The file as a uint8 tensor over a private (copy-on-write) memory map: no copy is made, the
    page cache is read in place, and writing into the tensor never reaches the file. The tensor
    (and every view of it) keeps the mapping alive."""
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8)


def file_checksum(path: pathlib.Path) -> str:
    """The 64-bit checksum :func:`~stiefel_sct.save_spectral` records for each weight file: the file
    read as little-endian 64-bit words (the tail zero-padded), summed per 64 KiB chunk with
    wrap-around, the chunk sums weighted by ``1, 3, 5, ...`` and summed again. An odd weight times
    ``2^b`` is never ``0 mod 2^64``, so any single flipped bit changes it; the weights make it see
    chunks that moved. One pass over the memory-mapped file at memory speed, on torch's threads."""
    checksum = _Checksum()
    if pathlib.Path(path).stat().st_size:
        data = _mapped(path)
        for at in range(0, data.numel(), _BLOCK_BYTES):
            checksum.block(data[at:at + _BLOCK_BYTES])
    return checksum.hexdigest()


def _compare(path: pathlib.Path, got: str, entry: Mapping[str, Any]) -> None:
    if got != entry["checksum"]:
        raise CheckpointError(f"{path}: checksum mismatch, the file is damaged (flipped bits or overwritten bytes); "
                              "save the checkpoint again")


# ------------------------------------------------------------------------------ the JSON's shape
def _fail(path: pathlib.Path, where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {where} {what} (a damaged or hand-edited {path.name}?)")


def _need(path: pathlib.Path, obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _fail(path, where, f"has no {key!r}")
    return obj[key]


def _int(path: pathlib.Path, value: Any, where: str, low: int, high: Optional[int] = None) -> int:
    if not is_int(value) or value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise _fail(path, where, f"must be an int {allowed}, got {value!r}")
    return value


def _dict(path: pathlib.Path, value: Any, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, where, f"must be a JSON object, got {type(value).__name__}")
    return value


def _layer(path: pathlib.Path, layer: str, entry: Any, dtypes: Mapping[str, torch.dtype]) -> None:
    where = f"layers[{layer!r}]"
    entry = _dict(path, entry, where)
    name = _need(path, entry, "kind", where)
    kind = next((k for k in KINDS if k.name == name), None)
    if kind is None:
        raise _fail(path, f"{where}.kind", f"must be one of {tuple(k.name for k in KINDS)}, got {name!r}")
    m, n = (_int(path, _need(path, entry, key, where), f"{where}.{key}", 1) for key in kind.dims)
    _int(path, _need(path, entry, "rank", where), f"{where}.rank", 1, min(m, n))
    if _need(path, entry, "retraction", where) not in RETRACTIONS:
        raise _fail(path, f"{where}.retraction", f"must be one of {RETRACTIONS}, got {entry['retraction']!r}")
    if _need(path, entry, "dtype", where) not in dtypes or not dtypes[entry["dtype"]].is_floating_point:
        raise _fail(path, f"{where}.dtype", f"must be a floating dtype name, got {entry['dtype']!r}")
    if kind.linear:
        if not isinstance(_need(path, entry, "bias", where), bool):
            raise _fail(path, f"{where}.bias", f"must be true or false, got {entry['bias']!r}")
    else:
        pad = _need(path, entry, "padding_idx", where)
        if pad is not None:
            _int(path, pad, f"{where}.padding_idx", -m, m - 1)
    if kind.residual and entry.get("residual") is not None:
        _residual(path, f"{where}.residual", entry["residual"], min(m, n), dtypes)


def _residual(path: pathlib.Path, where: str, residual: Any, max_rank: int, dtypes: Mapping[str, torch.dtype]) -> None:
    residual = _dict(path, residual, where)
    if _need(path, residual, "dtype", where) not in dtypes:
        raise _fail(path, f"{where}.dtype", f"must be a dtype name, got {residual['dtype']!r}")
    if not isinstance(_need(path, residual, "base_fingerprint", where), str):
        raise _fail(path, f"{where}.base_fingerprint", "must be a string")
    blocks = residual.get("blocks")
    if blocks is not None:
        if not isinstance(blocks, list) or not blocks:
            raise _fail(path, f"{where}.blocks", f"must be a non-empty list of ints, got {blocks!r}")
        for i, b in enumerate(blocks):
            _int(path, b, f"{where}.blocks[{i}]", 1, max_rank)


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
        if not isinstance(entry.get("values_passed", False), bool):
            raise _fail(path, f"files[{name!r}].values_passed", f"must be true or false, got {entry['values_passed']!r}")
        checksum = _need(path, entry, "checksum", f"files[{name!r}]")
        if not (isinstance(checksum, str) and checksum.startswith(f"{CHECKSUM_ALGORITHM}:")):
            raise _fail(path, f"files[{name!r}].checksum", f"must be a {CHECKSUM_ALGORITHM} checksum, got {checksum!r}")
    return config


def _record(path: pathlib.Path, files: Mapping[str, Any], config_name: str) -> Mapping[str, Any]:
    """``path``'s entry in the config's ``files``, its size checked against the file's."""
    entry = files.get(path.name)
    if entry is None:
        raise CheckpointError(f"{path}: {config_name} records no checksum for it (a damaged {config_name}?)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{path} is {size} bytes, {config_name} says {entry['bytes']}: the file is damaged "
                              "(truncated or overwritten); save the checkpoint again")
    return entry


# ------------------------------------------------------------------------------ the safetensors file
# The header's dtype names (https://github.com/huggingface/safetensors, format.md): those this torch has
_SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
        "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
        "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}.items() if hasattr(torch, attr)}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound


class TensorRecord(NamedTuple):
    """One tensor of a safetensors header: its dtype, shape and byte range in the data section."""
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int


def _unreadable(path: pathlib.Path, what: str, files: Optional[Mapping[str, Any]], config_name: str) -> CheckpointError:
    if files is not None:  # a file whose bytes changed is reported as that, whatever its header now says
        _compare(path, file_checksum(path), _record(path, files, config_name))
    return CheckpointError(f"{path} cannot be read as safetensors (a damaged file?): {what}")


def read_header(path: pathlib.Path, files: Optional[Mapping[str, Any]] = None,
                config_name: str = "spectral_config.json") -> Tuple[Dict[str, TensorRecord], int]:
    """The tensors a safetensors file holds, by name, and where its data section starts; every
    entry checked (a known dtype, a shape of ints, a byte range inside the file that fits the
    shape). ``files`` (the config's record of the checkpoint's files) makes a file that fails these
    checks report a checksum mismatch instead, where its bytes changed since it was saved."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(_MAX_HEADER_BYTES, size - 8):
            raise _unreadable(path, f"a header of {n} bytes in a file of {size}", files, config_name)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unreadable(path, f"its header is not JSON ({exc})", files, config_name) from None
    if not isinstance(header, dict):
        raise _unreadable(path, f"its header is a JSON {type(header).__name__}, not an object", files, config_name)
    start, records = 8 + n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            ok = (all(is_int(d) and d >= 0 for d in shape) and all(is_int(b) for b in (begin, end))
                  and 0 <= begin <= end <= size - start
                  and end - begin == math.prod(shape) * dtype.itemsize)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _unreadable(path, f"its header's entry {name!r} is malformed: {entry!r}", files, config_name)
        records[name] = TensorRecord(dtype, shape, begin, end)
    return records, start


def read_weights(path: pathlib.Path, files: Optional[Mapping[str, Any]] = None,
                 values: Optional[ValueCheck] = None, config_name: str = "spectral_config.json",
                 own: Union[bool, Collection[str]] = ()) -> Dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, read in one pass and checked on the way.

    The file is memory-mapped (copy-on-write) and read 2 MiB block by block. With ``files`` (the
    config's record of the checkpoint's files) the file's size is checked first and each block is
    checksummed; the tensors named in ``own`` (``True``: every tensor) are then copied out of that block into fresh memory
    while it is still in cache, and returned as those fresh tensors (``load_spectral`` hands them
    to the parameters it materialises, so that copy is the only one). Every other tensor is
    returned as a view into the mapping (no copy; the caller's ``load_state_dict`` copies it).
    With ``values``, each tensor it checks is probed as soon as its last byte was read.

    Why the copy is fused into the read: ``load_spectral`` must check the whole file before the
    model changes, and a checksum that reads the file on its own is a second pass over 326 MB
    (SmolLM2-135M at 50%): 44 ms of a 176 ms load (AMD EPYC, 2 cores, ``bench_checkpoint``),
    mostly that pass and the probes (one ``torch.mv`` per factor at 7 GB/s from memory). Copying
    each block right after its checksum reads it from cache instead; the probes are skipped where
    the checkpoint carries a certificate that the same bytes passed them at save
    (``load_spectral``). The checks now add 7.6 ms to a 136 ms load (3.7 ms into a model on
    ``meta``, whose every tensor is copied here); figures in ``benchmarks/README.md``.

    A mismatch raises :class:`CheckpointError` naming the file, after the whole file was read and
    before anything is returned.
    """
    path = pathlib.Path(path)
    entry = _record(path, files, config_name) if files is not None else None
    records, start = read_header(path, files, config_name)
    data = _mapped(path)
    checksum = _Checksum() if entry is not None else None
    reader = _BlockReader(data, records, start, own)
    for at in range(0, data.numel(), _BLOCK_BYTES):
        done = min(at + _BLOCK_BYTES, data.numel())
        if checksum is not None:
            checksum.block(data[at:done])
        for name in reader.feed(at, done):
            if values is not None:
                values.add(name, reader.tensors[name])
    for name in reader.rest():
        if values is not None:
            values.add(name, reader.tensors[name])
    if checksum is not None and entry is not None:
        _compare(path, checksum.hexdigest(), entry)
    if values is not None:
        values.finish()
    return {name: reader.tensors[name] for name in reader.order}


class _BlockReader:
    """The tensors of a mapped safetensors file (``data``; ``records`` from :func:`read_header`,
    whose data section starts at ``start``), handed over as the file's blocks are read in order:
    those named in ``own`` copied piece by piece into fresh memory, the others as views."""

    def __init__(self, data: torch.Tensor, records: Mapping[str, TensorRecord], start: int,
                 own: Union[bool, Collection[str]]) -> None:
        self.data, self.records, self.start = data, records, start
        self.own: Collection[str] = set(records) if own is True else () if own is False else own
        self.order = sorted(records, key=lambda name: (records[name].begin, records[name].end))
        self.tensors: Dict[str, torch.Tensor] = {}
        self._bytes: Dict[str, torch.Tensor] = {}  # the owned tensors being filled, as flat bytes
        self._first = 0  # self.order[:self._first] are complete

    def feed(self, at: int, done: int) -> List[str]:
        """Take the file's bytes ``[at, done)``: copy the owned tensors' pieces in them; the names
        of the tensors now complete (in file order)."""
        complete, i = [], self._first
        while i < len(self.order) and self.start + self.records[self.order[i]].begin < done:
            name, rec = self.order[i], self.records[self.order[i]]
            begin, end = self.start + rec.begin, self.start + rec.end
            if name in self.own:
                if name not in self._bytes:
                    self.tensors[name] = torch.empty(rec.shape, dtype=rec.dtype)
                    self._bytes[name] = self.tensors[name].view(-1).view(torch.uint8) if end > begin else self.tensors[name]
                lo, hi = max(begin, at), min(end, done)
                if lo < hi:
                    self._bytes[name][lo - begin:hi - begin].copy_(self.data[lo:hi])
            if end > done:
                break
            if name not in self.own:
                self.tensors[name] = self._view(rec)
            complete.append(name)
            i += 1
        self._first = i
        return complete

    def rest(self) -> List[str]:
        """The tensors no block reached (zero-size ones at the file's end), now complete."""
        names = self.order[self._first:]
        for name in names:
            rec = self.records[name]
            self.tensors[name] = torch.empty(rec.shape, dtype=rec.dtype) if name in self.own else self._view(rec)
        self._first = len(self.order)
        return names

    def _view(self, rec: TensorRecord) -> torch.Tensor:
        raw = self.data[self.start + rec.begin:self.start + rec.end]
        if (self.start + rec.begin) % rec.dtype.itemsize:  # an unaligned tensor (never written by safetensors)
            raw = raw.clone()
        return raw.view(rec.dtype).view(rec.shape)


# ------------------------------------------------------------------------------ the values
class ValueCheck:
    """Every spectral layer's ``s`` finite and its ``U`` and ``V`` finite with orthonormal columns
    (the sketch above), fed one tensor at a time (:meth:`add`) and judged at the end
    (:meth:`finish`, which raises :class:`CheckpointError` for the first layer, in ``layers``'
    order, that fails). A residual layer's frozen ``U0``, ``s0``, ``V0`` are checked alike.
    Tensors a check does not name are ignored; names it lists but never gets are a base model's
    (their SHA-256 is checked elsewhere)."""

    def __init__(self, layers: Mapping[str, Mapping[str, Any]], weights: pathlib.Path) -> None:
        self.weights = weights
        self._targets: Dict[str, Tuple[int, str]] = {}  # tensor name -> (order, layer name)
        self._blocks: Dict[str, List[int]] = {}  # U0/V0 of a residual that saw moves: orthonormal per block
        for name, entry in layers.items():
            prefix = f"{name}." if name else ""
            residual = entry.get("residual")
            for keys in [("U", "s", "V")] + ([("U0", "s0", "V0")] if residual else []):
                for key in keys:
                    self._targets[prefix + key] = (len(self._targets), name)
            if residual and len(residual.get("blocks") or []) > 1:
                self._blocks[prefix + "U0"] = self._blocks[prefix + "V0"] = residual["blocks"]
        self._probes: Dict[tuple, torch.Tensor] = {}
        self._spectra: List[Tuple[str, torch.Tensor]] = []
        self._factors: List[Tuple[str, torch.Tensor, torch.Tensor, torch.dtype]] = []  # name, U z, z, dtype

    @torch.no_grad()
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._targets:
            return
        if name.rpartition(".")[2].startswith("s"):
            self._spectra.append((name, tensor))
            return
        work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
        start = 0
        for k in self._blocks.get(name, [work.shape[1]]):
            z = self._probes.get((k, work.dtype))
            if z is None:
                z = self._probes[(k, work.dtype)] = torch.randn(k, generator=torch.Generator().manual_seed(k),
                                                                dtype=work.dtype)
            self._factors.append((name, torch.mv(work[:, start:start + k], z), z, tensor.dtype))
            start += k

    @torch.no_grad()
    def finish(self) -> None:
        """One batched norm over all the probes (a per-factor norm and comparison cost as much again)."""
        failures: List[Tuple[int, str]] = []  # (order, message)
        if self._spectra:
            norms = torch.stack([n.float() for n in torch._foreach_norm([t for _, t in self._spectra])])
            for i in (~torch.isfinite(norms)).nonzero().flatten().tolist():
                key = self._spectra[i][0]
                order, layer = self._targets[key]
                failures.append((order, f"{self.weights}: {key} (layer {layer!r}) holds non-finite singular values"))
        if self._factors:
            got = torch.stack([n.double() for n in torch._foreach_norm([y for _, y, _, _ in self._factors])]) ** 2
            want = torch.stack([n.double() for n in torch._foreach_norm([z for _, _, z, _ in self._factors])]) ** 2
            err = (got - want).abs() / want
            tol = torch.tensor([ORTHONORMALITY_TOLERANCE.get(d, 5e-2) for _, _, _, d in self._factors],
                               dtype=torch.float64)
            for i in (~(err <= tol)).nonzero().flatten().tolist():  # NaN compares False: non-finite fails too
                key, _, _, dtype = self._factors[i]
                order, layer = self._targets[key]
                e = float(err[i])
                if not math.isfinite(e):
                    failures.append((order, f"{self.weights}: {key} (layer {layer!r}) holds non-finite values"))
                    continue
                failures.append((order, (
                    f"{self.weights}: {key} (layer {layer!r}) does not have orthonormal columns (sketch error "
                    f"{e:.2e} > {float(tol[i]):.0e} for {str(dtype).removeprefix('torch.')}): the file is damaged, "
                    "or the model was trained without a retraction (SpectralAdam and stiefel_retraction keep factors "
                    "on the manifold); load_spectral(..., verify=False) loads it anyway")))
        if failures:
            raise CheckpointError(min(failures)[1])


def values_pass(state: Mapping[str, torch.Tensor], layers: Mapping[str, Mapping[str, Any]],
                weights: pathlib.Path) -> bool:
    """Whether :func:`check_spectral_tensors` accepts ``state``: the certificate
    :func:`~stiefel_sct.save_spectral` records beside the weight file's checksum."""
    try:
        check_spectral_tensors(state, layers, weights)
    except CheckpointError:
        return False
    return True


def check_spectral_tensors(state: Mapping[str, torch.Tensor], layers: Mapping[str, Mapping[str, Any]],
                           weights: pathlib.Path) -> None:
    """:class:`ValueCheck` over a state dict already in memory (``load_spectral`` runs it fused
    into :func:`read_weights` instead)."""
    check = ValueCheck(layers, weights)
    for name, tensor in state.items():
        check.add(name, tensor)
    check.finish()
