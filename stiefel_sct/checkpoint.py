"""Spectral checkpoints: ``safetensors`` weights beside a small JSON that says which layers are
spectral and at which rank, so a model of the same architecture, dense or on ``meta``, can be
turned back into exactly the saved spectral model (the way PEFT keeps ``adapter_config.json``
beside its weights).

A checkpoint directory holds

* ``spectral_config.json``: format and version, the library version, one entry per spectral layer
  (kind, shapes, rank, bias / padding index, retraction backend, dtype), the name, shape and
  dtype of every saved tensor, which state-dict names are tied to which, and ``recipe``: the
  :class:`~stiefel_sct.SpectralConfig` the model was converted with, verbatim (``None`` without
  one); :func:`load_spectral` puts it back as ``model.spectral_config``;
* ``model.safetensors``: every tensor of ``model.state_dict()`` once (tied names are saved once),
  or with ``trained_only=True`` only the spectral layers' tensors and the trainable parameters: the
  rest comes back from the base model loaded into (the JSON keeps a SHA-256 of each such tensor
  and the load checks it);
* residual layers (:class:`~stiefel_sct.SpectralLinear` in residual mode) never save their
  model-sized residual: ``U0``, ``s0``, ``V0`` and the base weight's fingerprint are saved, and
  loading into the base model rebuilds the residual bit for bit;
* with an optimizer, ``optimizer.safetensors`` (its state tensors, keyed by parameter *name*)
  and an ``optimizer`` entry in the JSON (class, param groups by parameter name, scalar state).

No pickle anywhere. A directory is written whole or not at all: into a temporary sibling that
replaces the old directory only once every file is complete (a save killed midway leaves its
temporary behind; the next save of that directory removes it).

A checkpoint checks itself on load (:mod:`stiefel_sct.integrity`): the JSON's shape and ranges,
each weight file's size and checksum (recorded in the JSON at save), and every spectral layer's
values (finite, factors orthonormal: checked at save and recorded beside the checksum, probed again
on load only where that record is missing or says they failed). Anything wrong raises
:class:`CheckpointError` naming the file and what is wrong, before the model changes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import geoopt
import torch
from torch import nn

from .config import SpectralConfig
from .integrity import CheckpointError, ValueCheck, file_checksum, read_header, read_weights, validate_config, values_pass
from .kinds import LayerKind, dense_kind, kind_named, spectral_kind
from .layers import SpectralLinear, SpectralModule, weight_fingerprint

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "OPTIMIZER_NAME", "WEIGHTS_NAME", "AtomicDirectory", "CheckpointError",
           "load_optimizer_state", "load_spectral", "read_config", "read_recipe", "save_spectral"]

FORMAT = "stiefel-sct"
FORMAT_VERSION = 2  # 2: the JSON records each weight file's size and checksum ("files")
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "spectral_config.json"
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                                       torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                       torch.bool)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_entry(module: SpectralModule) -> Dict[str, Any]:
    kind = spectral_kind(module)
    if kind is None:
        raise TypeError(f"unknown spectral module {type(module).__name__}")
    entry = {"kind": kind.name, **kind.entry(module), "rank": module.rank,
             "retraction": module.manifold.retraction, "dtype": _dtype_name(module.U.dtype)}
    if kind.residual:
        assert isinstance(module, SpectralLinear)
        entry["residual"] = None
        if module.residual_dtype is not None:
            if module.residual is None or module.base_fingerprint is None:
                raise CheckpointError("cannot save a residual layer whose residual is not attached")
            entry["residual"] = {"dtype": _dtype_name(module.residual_dtype), "base_fingerprint": module.base_fingerprint,
                                 "blocks": list(module.residual_blocks)}
    return entry


def _unique_state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``model.state_dict()`` with each tensor once: ``(tensors, tied)`` where ``tied`` maps a
    dropped name to the kept name holding the same tensor (e.g. a tied LM head)."""
    tensors: Dict[str, torch.Tensor] = {}
    tied: Dict[str, str] = {}
    seen: Dict[Tuple[int, int, tuple, tuple], str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        if t.is_meta:
            raise CheckpointError(f"cannot save {name!r}: it is on the meta device (nothing to save)")
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) if t.numel() else (id(t), 0, (), ())
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    return tensors, tied


def _contiguous_copies(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Own, contiguous CPU memory for each tensor. ``safetensors`` refuses tensors that share
    storage, and after a ``SpectralAdam`` step the factors are views into its factor banks."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class AtomicDirectory:
    """A temporary sibling of ``target`` to write into; :meth:`commit` puts it in ``target``'s place.

    The temporary is named ``.NAME.PID.XXXX.tmp``. A writer killed before its commit leaves it
    behind; the next :class:`AtomicDirectory` for the same target removes every such sibling whose
    process is gone (and those of older versions, which carry no process id)."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale(target)
        self.path = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                                  dir=target.parent))

    @staticmethod
    def remove_stale(target: pathlib.Path) -> List[pathlib.Path]:
        """Remove the temporaries of killed writers of ``target`` (and the ``.NAME.old`` of a commit
        killed while deleting it, once ``target`` exists); returns what was removed."""
        pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)\.)?[^.]+\.tmp$")
        removed = []
        for sibling in target.parent.iterdir():
            match = pattern.match(sibling.name)
            if match and sibling.is_dir() and not (match.group(1) and _alive(int(match.group(1)))):
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
        old = target.with_name(f".{target.name}.old")
        if old.is_dir() and target.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        return removed

    def commit(self) -> None:
        old = None
        if self.target.exists():
            if not self.target.is_dir():
                raise NotADirectoryError(f"directory {self.target} exists and is not a directory")
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _param_names(model: nn.Module) -> Dict[int, str]:
    """``id(parameter) -> name`` (the first name of a shared parameter)."""
    names: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _jsonable(value: Any, what: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise CheckpointError(f"{what}: a tensor of shape {tuple(value.shape)} cannot go in the JSON")
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, what) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    raise CheckpointError(f"{what}: cannot save a {type(value).__name__} in the JSON")


def _optimizer_payload(optimizer: torch.optim.Optimizer, model: nn.Module):
    names = _param_names(model)
    groups: List[Dict[str, Any]] = []
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for gi, group in enumerate(optimizer.param_groups):
        entry: Dict[str, Any] = {}
        for key, value in group.items():
            if key == "params":
                missing = [i for i, p in enumerate(value) if id(p) not in names]
                if missing:
                    raise CheckpointError(f"optimizer param_groups[{gi}]['params'][{missing[0]}] is not a parameter of the model")
                entry["params"] = [names[id(p)] for p in value]
            elif key != "param_names":
                entry[key] = _jsonable(value, f"optimizer param_groups[{gi}][{key!r}]")
        groups.append(entry)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[id(p)]}::{key}"] = value
                else:
                    scalars.setdefault(names[id(p)], {})[key] = _jsonable(value, f"optimizer state {key!r}")
    return {"class": type(optimizer).__name__, "param_groups": groups, "scalar_state": scalars}, tensors


def _trained_names(model: nn.Module, layers: Dict[str, Any]) -> set:
    """State-dict names a ``trained_only`` checkpoint keeps: everything of a spectral layer and
    every parameter that requires a gradient."""
    prefixes = tuple(f"{name}." if name else "" for name in layers)
    keep = {name for name in model.state_dict(keep_vars=True) if prefixes and name.startswith(prefixes)}
    keep |= {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return keep


def _split_base(tensors: Dict[str, torch.Tensor], tied: Dict[str, str], keep: set) -> Dict[str, Dict[str, Any]]:
    """Move every tensor not in ``keep`` out of ``tensors`` (and ``tied``) into the base record:
    name -> shape, dtype and SHA-256, which the base model must match on load."""
    base: Dict[str, Dict[str, Any]] = {}
    for name in [n for n in tensors if n not in keep]:
        t = tensors.pop(name)
        base[name] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "sha256": weight_fingerprint(t)}
    for alias, source in list(tied.items()):
        if source in base:  # tied to a base tensor (e.g. an LM head tied to a frozen embedding): base too
            base[alias] = base[source]
            del tied[alias]
    return base


@torch.no_grad()
def save_spectral(model: nn.Module, directory: os.PathLike | str,
                  optimizer: Optional[torch.optim.Optimizer] = None, *, trained_only: bool = False) -> pathlib.Path:
    """Save a (spectral) model, and optionally its optimizer, to ``directory``.

    Args:
        model: any module; its :class:`~stiefel_sct.SpectralLinear` / :class:`~stiefel_sct.SpectralEmbedding`
            layers are recorded with their ranks so :func:`load_spectral` can rebuild them.
        directory: created if missing, replaced whole if it exists (written into a temporary
            sibling first, so a failure leaves the old checkpoint as it was).
        optimizer: also save its param groups (by parameter name) and state
            (:func:`load_optimizer_state` restores them into a new optimizer).
        trained_only: save only the spectral layers and the parameters that require gradients
            (what training changed); every other tensor is recorded by name, shape and SHA-256
            and must come from the base model :func:`load_spectral` loads into. For a residual
            model whose factors alone train, this is a few MB instead of the model's size.

    Returns the directory's path.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(trained_only, bool):
        raise TypeError(f"trained_only must be a bool, got {type(trained_only).__name__}")
    layers = {name: _layer_entry(m) for name, m in model.named_modules() if isinstance(m, SpectralModule)}
    tensors, tied = _unique_state(model)
    base = _split_base(tensors, tied, _trained_names(model, layers)) if trained_only else {}
    config: Dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
        "model_class": type(model).__name__, "layers": layers, "tied": tied,
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
        "base_tensors": base, "optimizer": None, "files": {},
        # the recipe spectralize was given (SpectralConfig, verbatim), beside the ranks it resolved to
        "recipe": recipe.to_dict() if isinstance(recipe := getattr(model, "spectral_config", None), SpectralConfig)
        else None,
    }
    opt_tensors: Dict[str, torch.Tensor] = {}
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        config["optimizer"], opt_tensors = _optimizer_payload(optimizer, model)
    json.dumps(config)  # fails here, before anything is written, if not serialisable
    out = AtomicDirectory(pathlib.Path(directory))
    try:
        files = {WEIGHTS_NAME: tensors} if optimizer is None else {WEIGHTS_NAME: tensors, OPTIMIZER_NAME: opt_tensors}
        for file_name, contents in files.items():
            path = out.path / file_name
            copies = _contiguous_copies(contents)
            save_file(copies, str(path), metadata={"format": "pt"})
            config["files"][file_name] = {"bytes": path.stat().st_size, "checksum": file_checksum(path)}
            if file_name == WEIGHTS_NAME:  # the certificate load_spectral trusts once the checksum matches
                config["files"][file_name]["values_passed"] = values_pass(copies, layers, path)
        (out.path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        out.commit()
    except BaseException:
        out.discard()
        raise
    return pathlib.Path(directory)


def _library_version() -> str:
    from . import __version__

    return __version__


def read_config(directory: os.PathLike | str) -> Dict[str, Any]:
    """The checkpoint's ``spectral_config.json``, checked for format, version and shape (every
    layer, tensor and file entry with values in range); :class:`CheckpointError` naming the file
    and the entry otherwise."""
    path = pathlib.Path(directory) / CONFIG_NAME
    if not path.is_file():
        old = pathlib.Path(directory).with_name(f".{pathlib.Path(directory).name}.old")
        if not pathlib.Path(directory).exists() and (old / CONFIG_NAME).is_file():  # killed between two renames
            raise CheckpointError(f"{directory} not found: a save was killed while replacing it; the previous "
                                  f"checkpoint is {old}")
        raise CheckpointError(f"{path} not found: {directory} is not a spectral checkpoint (save_spectral writes one)")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (a damaged file?): {exc}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or damaged?): {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not the object save_spectral writes")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r} is not {FORMAT!r}")
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this library reads "
                              f"{READABLE_VERSIONS})")
    return validate_config(path, config, _DTYPES, (WEIGHTS_NAME, OPTIMIZER_NAME))


def _weight_file(path: pathlib.Path, config: Dict[str, Any], verify: bool = True) -> Optional[Dict[str, Any]]:
    """``path`` exists; the config's record of its size and checksum to check it against, where
    ``verify`` asks for it and the checkpoint has one (format 2), else ``None``."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    return config["files"] if verify and config["format_version"] >= 2 else None


def _expected_shapes(entry: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    kind = kind_named(entry["kind"])
    k, (rows_u, rows_v) = entry["rank"], (entry[key] for key in kind.dims)
    shapes: Dict[str, Tuple[int, ...]] = {"U": (rows_u, k), "s": (k,), "V": (rows_v, k)}
    if entry.get("bias"):
        shapes["bias"] = (rows_v,)
    if kind.residual and entry.get("residual"):
        k0 = sum(entry["residual"].get("blocks") or [k])  # the conversion's rank plus every move's columns
        shapes.update(U0=(rows_u, k0), s0=(k0,), V0=(rows_v, k0))
    return shapes


def _found_kind(module: nn.Module) -> Optional[LayerKind]:
    """The kind of ``module``, dense or spectral; ``None`` for any other module."""
    return dense_kind(module) or spectral_kind(module)


def _plan(model: nn.Module, config: Dict[str, Any]) -> Dict[str, nn.Module]:
    """Check every saved layer against ``model`` before anything changes; the modules to replace."""
    modules = dict(model.named_modules())
    plan: Dict[str, nn.Module] = {}
    for name, entry in config["layers"].items():
        if name not in modules:
            raise CheckpointError(f"layer {name!r} of the checkpoint does not exist in this {type(model).__name__} "
                                  "(a checkpoint of another architecture?)")
        module = modules[name]
        kind = _found_kind(module)
        if kind is None or kind.name != entry["kind"]:
            raise CheckpointError(f"layer {name!r}: the checkpoint has a spectral {entry['kind']}, the model a "
                                  f"{type(module).__name__}")
        found, saved = kind.sizes(module), tuple(entry[key] for key in kind.dims)
        if found != saved:
            raise CheckpointError(f"layer {name!r}: the checkpoint's {entry['kind']} is {saved[0]} -> {saved[1]}, "
                                  f"the model's {found[0]} -> {found[1]}")
        if "bias" in entry and (getattr(module, "bias", None) is not None) != entry["bias"]:
            raise CheckpointError(f"layer {name!r}: bias={entry['bias']} in the checkpoint, "
                                  f"bias={not entry['bias']} in the model")
        if entry.get("residual"):
            _check_residual_base(name, module, kind, entry["residual"])
        plan[name] = module
    return plan


def _check_residual_base(name: str, module: nn.Module, kind: LayerKind, residual: Dict[str, Any]) -> None:
    """A residual layer is rebuilt from the base weight it was cut from: ``module`` must be that
    dense layer, with real values equal (SHA-256) to the ones at conversion."""
    if not kind.is_dense(module):
        raise CheckpointError(f"layer {name!r} is a residual layer: load the checkpoint into the base model, whose "
                              f"dense weight rebuilds its residual (found a {type(module).__name__})")
    weight = kind.matrix(module)
    if weight.is_meta:
        raise CheckpointError(f"layer {name!r} is a residual layer: its base weight must be loaded (it is on the "
                              "meta device)")
    if weight_fingerprint(weight) != residual["base_fingerprint"]:
        raise CheckpointError(f"layer {name!r}: the model's weight is not the base weight this residual checkpoint "
                              "was converted from (SHA-256 differs)")


def _build(entry: Dict[str, Any]) -> SpectralModule:
    """The checkpoint entry's layer, on ``meta``."""
    residual = entry.get("residual")
    layer = kind_named(entry["kind"]).build(entry, device="meta", dtype=_DTYPES[entry["dtype"]],
                                            retraction=entry["retraction"],
                                            residual_dtype=_DTYPES[residual["dtype"]] if residual else None)
    if residual and residual.get("blocks"):
        assert isinstance(layer, SpectralLinear)
        layer.set_residual_blocks(residual["blocks"])
    return layer


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _named_tensors(model: nn.Module) -> Iterator[Tuple[nn.Module, str, str, torch.Tensor, bool]]:
    """``(module, local name, qualified name, tensor, is_parameter)`` of every parameter and buffer,
    shared ones included (so a tied parameter shows up under each name)."""
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for key, p in module._parameters.items():
            if p is not None:
                yield module, key, prefix + key, p, True
        for key, b in module._buffers.items():
            if b is not None:
                yield module, key, prefix + key, b, False


@torch.no_grad()
def load_spectral(model: nn.Module, directory: os.PathLike | str,
                  device: Optional[torch.device | str] = None, *, verify: bool = True) -> nn.Module:
    """Rebuild the checkpoint's spectral model inside ``model`` and load every tensor; returns ``model``.

    ``model`` has the checkpoint's architecture in its dense form (or already spectral at the
    saved ranks), with real parameters or on the ``meta`` device (e.g. built under
    ``accelerate.init_empty_weights()``; real buffers such as rotary frequencies are left as they
    are). Exactly the saved layers are converted, at exactly the saved ranks; parameters on
    ``meta`` are materialised on ``device`` (default: CPU), a layer converted from real parameters
    is built on their device (real parameters never move), and every tensor of the checkpoint is
    loaded. Everything is checked first (the format, every layer, every tensor's name and shape):
    a checkpoint that does not fit raises :class:`CheckpointError` naming the layer or tensor and
    both shapes, and leaves ``model`` untouched.

    With ``verify=True`` (the default) the checkpoint also checks itself first
    (:mod:`stiefel_sct.integrity`): the weight file's size and checksum against the ones recorded
    at save time, every spectral ``s`` finite, every factor finite with orthonormal columns (those
    value checks ran at save; a matching checksum proves the file holds the bytes they passed, and
    they run again here only for a checkpoint that does not record that they passed). A damaged
    file raises :class:`CheckpointError` naming it, with ``model`` untouched. ``verify=False``
    skips those checks (e.g. for factors deliberately trained off the manifold); the structural
    checks always run.

    The file is read once: each block is checksummed and then copied, while in cache, into the
    tensors that the layers rebuilt on the CPU take as their parameters (no second copy); the
    other tensors are copied into the model's existing ones after every check passed. On
    SmolLM2-135M at 50% this load takes ~130 ms and the checks add 5-10 ms
    (``benchmarks/bench_checkpoint.py``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
    directory = pathlib.Path(directory)
    config = read_config(directory)
    recipe = read_recipe(directory, config)
    target = torch.device(device) if device is not None else torch.device("cpu")
    plan, state, fresh = _verify(model, directory, config, verify, target)
    bases = {name: kind_named(entry["kind"]).matrix(plan[name]).detach()  # _plan made sure each is dense
             for name, entry in config["layers"].items() if entry.get("residual")}
    # everything fits: convert, materialise (on the tensors read_weights copied out for it), load
    result, homes = _convert_layers(model, config, plan, target)
    adopt = {qname: state[source] for qname, source in ({k: k for k in fresh} | config["tied"]).items()
             if source in fresh}
    _materialise(result, homes, target, adopt)
    _load(result, config, state, bases)
    if recipe is not None:
        setattr(result, "spectral_config", recipe)  # noqa: B010 (nn.Module types attributes as Tensor | Module)
    return result


def _verify(model: nn.Module, directory: pathlib.Path, config: Dict[str, Any], verify: bool,
            target: torch.device) -> Tuple[Dict[str, nn.Module], Dict[str, torch.Tensor], set]:
    """Every check before ``model`` changes: each saved layer against the model, each tensor's name,
    shape and dtype against the model and the file, and (``verify``) the file's checksum and the
    spectral values. Returns the modules to replace, the file's tensors (fresh CPU tensors for
    those that will be materialised on the CPU, else views into the file) and the names of the
    fresh ones (``_materialise`` adopts them)."""
    weights = directory / WEIGHTS_NAME
    files = _weight_file(weights, config, verify)
    plan = _plan(model, config)
    stored, _ = read_header(weights, files, CONFIG_NAME)
    listed = set(config["tensors"])
    if set(stored) != listed:
        diff = sorted(listed ^ set(stored))
        raise CheckpointError(f"{weights} does not hold the tensors {CONFIG_NAME} lists (e.g. {diff[0]!r})")
    _check_shapes(model, config, plan, weights)
    for qname, record in stored.items():
        entry = config["tensors"][qname]
        if list(record.shape) != entry["shape"] or record.dtype != _DTYPES[entry["dtype"]]:
            raise CheckpointError(f"{weights}: tensor {qname!r} is {_dtype_name(record.dtype)} {list(record.shape)}, "
                                  f"{CONFIG_NAME} says {entry['dtype']} {entry['shape']} (a damaged or hand-edited checkpoint?)")
    # The values were checked at save (the certificate) where the file says so; a matching checksum
    # proves these are those bytes, so the probes run only on a checkpoint without one (saved by
    # an older version, or with values that failed then: the probes name the layer).
    certified = files is not None and files[WEIGHTS_NAME].get("values_passed") is True
    values = ValueCheck(config["layers"], weights) if verify and not certified else None
    # one pass over the file, checksummed (and probed) block by block while each block is in cache
    fresh = _fresh_on_cpu(model, config, plan, target)
    return plan, read_weights(weights, files, values, CONFIG_NAME, fresh), fresh


def _rebuilt_home(module: nn.Module, entry: Dict[str, Any], target: torch.device) -> Optional[torch.device]:
    """Where the saved layer ``entry`` replacing ``module`` is built: the device of ``module``'s real
    parameters (they never move), else ``target``; ``None`` where ``module`` is already spectral at
    the saved rank (it stays as it is and is loaded by copy)."""
    if isinstance(module, SpectralModule) and module.rank == entry["rank"]:
        return None
    old = next(iter(module.parameters()), None)
    return old.device if old is not None and not old.is_meta else target


def _fresh_on_cpu(model: nn.Module, config: Dict[str, Any], plan: Dict[str, nn.Module],
                  target: torch.device) -> set:
    """The file's tensors whose place in the loaded model is a tensor ``_materialise`` creates on
    the CPU: those of the layers it rebuilds there and of ``meta`` tensors when ``target`` is the
    CPU. ``read_weights`` copies them into fresh memory that ``_materialise`` adopts."""
    fresh: set = set()
    for name, entry in config["layers"].items():
        home = _rebuilt_home(plan[name], entry, target)
        if home is not None and home.type == "cpu":
            prefix = f"{name}." if name else ""
            fresh.update(prefix + key for key in _expected_shapes(entry))
    if target.type == "cpu":
        fresh.update(qname for qname, t in model.state_dict(keep_vars=True).items() if t.is_meta)
    return {config["tied"].get(qname, qname) for qname in fresh} & set(config["tensors"])


def _check_shapes(model: nn.Module, config: Dict[str, Any], plan: Dict[str, nn.Module], weights: pathlib.Path) -> None:
    """The state-dict names and shapes the converted model will have, checked against the file's."""
    current = model.state_dict(keep_vars=True)
    expected = {qname: tuple(t.shape) for qname, t in current.items()
                if qname.rpartition(".")[0] not in plan}  # a replaced layer's tensors: its spectral ones below
    for name, entry in config["layers"].items():
        prefix = f"{name}." if name else ""
        expected.update((prefix + key, shape) for key, shape in _expected_shapes(entry).items())
    base = config.get("base_tensors") or {}
    for qname, shape in expected.items():
        source = config["tied"].get(qname, qname)
        if source not in config["tensors"] and qname in base:
            _check_base_tensor(qname, current.get(qname), base[qname], shape)
            continue
        if source not in config["tensors"]:
            raise CheckpointError(f"tensor {qname!r} of the model is missing from {weights}")
        saved = tuple(config["tensors"][source]["shape"])
        if saved != shape:
            raise CheckpointError(f"tensor {qname!r}: shape {saved} in the checkpoint, {shape} in the model")
    for qname in list(config["tensors"]) + list(config["tied"]) + list(base):
        if qname not in expected:
            raise CheckpointError(f"tensor {qname!r} of the checkpoint has no place in this {type(model).__name__}")


def _convert_layers(model: nn.Module, config: Dict[str, Any], plan: Dict[str, nn.Module],
                    target: torch.device) -> Tuple[nn.Module, Dict[int, torch.device]]:
    """Every saved layer rebuilt on ``meta`` (one already spectral at the saved rank is kept) and the
    saved ties restored. Returns the model (a new layer if ``model`` itself was the saved layer) and
    the device each new layer is materialised on (:func:`_rebuilt_home`)."""
    result = model
    homes: Dict[int, torch.device] = {}
    for name, entry in config["layers"].items():
        module = plan[name]
        home = _rebuilt_home(module, entry, target)
        if home is None:
            continue
        new = _build(entry)
        homes[id(new)] = home
        if name == "":
            result = new
        else:
            _set_submodule(model, name, new)
    # the saved ties come back (a model built under init_empty_weights is not tied yet)
    params = dict(result.named_parameters(remove_duplicate=False))
    for alias, source in config["tied"].items():
        if alias in params and source in params and params[alias] is not params[source]:
            owner, _, key = alias.rpartition(".")
            result.get_submodule(owner)._parameters[key] = params[source]
    return result, homes


def _materialise(model: nn.Module, homes: Dict[int, torch.device], target: torch.device,
                 adopt: Dict[str, torch.Tensor]) -> None:
    """Every ``meta`` parameter and buffer of ``model`` as a real tensor of the same kind (on its
    layer's home, else ``target``): the tensor ``adopt`` holds under its name where that one is
    already there with the shape and dtype (the loaded values, so loading them is not a second
    copy), else an empty one. A tied parameter stays one tensor."""
    fresh: Dict[int, Any] = {}  # Parameter, ManifoldParameter or buffer, by the meta tensor's id
    for module, key, qname, t, is_param in list(_named_tensors(model)):
        if not t.is_meta:
            continue
        if not is_param and key in getattr(module, "_non_persistent_buffers_set", ()):
            raise CheckpointError(f"buffer {qname!r} is on the meta device and is not saved in checkpoints: "
                                  "build the model with real buffers (init_empty_weights(include_buffers=False))")
        if id(t) not in fresh:
            home, data = homes.get(id(module), target), adopt.get(qname)
            if data is None or data.device != home or data.shape != t.shape or data.dtype != t.dtype:
                data = torch.empty(t.shape, dtype=t.dtype, device=home)
            if isinstance(t, geoopt.ManifoldParameter):
                fresh[id(t)] = geoopt.ManifoldParameter(data, manifold=t.manifold, requires_grad=t.requires_grad)
            elif isinstance(t, nn.Parameter):
                fresh[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad)
            else:
                fresh[id(t)] = data
        (module._parameters if is_param else module._buffers)[key] = fresh[id(t)]
    for module in model.modules():
        if isinstance(module, SpectralModule):
            module.register_factors()


def _load(model: nn.Module, config: Dict[str, Any], state: Dict[str, torch.Tensor],
          bases: Dict[str, torch.Tensor]) -> None:
    """The checkpoint's tensors into ``model`` (tied names included); residual layers rebuild their
    residual from their base weight (``bases``, by layer name)."""
    for alias, source in config["tied"].items():
        state[alias] = state[source]
    base = config.get("base_tensors") or {}
    missing, _ = model.load_state_dict(state, strict=not base)
    if set(missing) - set(base):  # checked above; a partial load leaves exactly the base tensors as they are
        raise CheckpointError(f"tensor {sorted(set(missing) - set(base))[0]!r} was not loaded")
    modules = dict(model.named_modules())
    for name, weight in bases.items():
        layer = modules[name]
        assert isinstance(layer, SpectralLinear)
        layer.attach_residual(weight)


def read_recipe(directory: os.PathLike | str, config: Optional[Dict[str, Any]] = None) -> Optional[SpectralConfig]:
    """The :class:`~stiefel_sct.SpectralConfig` a checkpoint's model was converted with (``None``
    where it was saved without one, e.g. before recipes were saved, or from layers built by hand);
    :class:`CheckpointError` naming the file if the recorded recipe is not a valid config."""
    path = pathlib.Path(directory) / CONFIG_NAME
    config = read_config(directory) if config is None else config
    recipe = config.get("recipe")
    if recipe is None:
        return None
    try:
        return SpectralConfig.from_dict(recipe)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: recipe is not a valid SpectralConfig: {exc}") from None


def _check_base_tensor(qname: str, tensor: Optional[torch.Tensor], saved: Dict[str, Any], shape: Tuple[int, ...]) -> None:
    """A tensor a ``trained_only`` checkpoint left to the base model: present, real, the same values."""
    if tensor is None or tuple(saved["shape"]) != shape:
        raise CheckpointError(f"tensor {qname!r}: shape {tuple(saved['shape'])} in the checkpoint's base, "
                              f"{shape} in the model")
    if tensor.is_meta:
        raise CheckpointError(f"tensor {qname!r} is not in this trained-only checkpoint and is on the meta device: "
                              "load the base model's weights first, then load_spectral")
    if weight_fingerprint(tensor) != saved["sha256"]:
        raise CheckpointError(f"tensor {qname!r} differs from the base model this trained-only checkpoint was saved "
                              "on (SHA-256): load the same base weights")


@torch.no_grad()
def _optimizer_index(optimizer: torch.optim.Optimizer, saved: Dict[str, Any], names: Dict[int, str]) -> Dict[str, int]:
    """Each parameter's name -> its index in the state dict to load, after checking that the
    optimizer's groups hold exactly the saved groups' parameters (by name, in any order)."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint has {len(saved['param_groups'])} param groups, "
                              f"the optimizer {len(optimizer.param_groups)}")
    index: Dict[str, int] = {}
    for gi, (group, entry) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        mine = []
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError(f"optimizer param_groups[{gi}] holds a tensor that is not a parameter of the model")
            mine.append(names[id(p)])
        if sorted(mine) != sorted(entry["params"]):
            raise CheckpointError(f"param group {gi}: the checkpoint's parameters {sorted(set(entry['params']) ^ set(mine))[:3]} "
                                  "do not match the optimizer's")
        for name in mine:
            index[name] = len(index)
    return index


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, directory: os.PathLike | str) -> None:
    """Restore the optimizer saved by ``save_spectral(model, directory, optimizer)`` into
    ``optimizer``, a new optimizer of the same class over the loaded ``model``'s parameters in
    the same groups. Parameters are matched by name, so the order in which the new optimizer was
    given them does not matter. Checked first: a mismatch raises :class:`CheckpointError` and
    leaves the optimizer untouched. The optimizer file's size and checksum are checked too."""
    config = read_config(directory)
    saved = config.get("optimizer")
    if not saved:
        raise CheckpointError(f"{directory} holds no optimizer state (save_spectral(..., optimizer=...) writes it)")
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(f"the checkpoint holds a {saved['class']} state, the optimizer is a {type(optimizer).__name__}")
    names = _param_names(model)
    index = _optimizer_index(optimizer, saved, names)
    opt_file = pathlib.Path(directory) / OPTIMIZER_NAME
    tensors: Dict[str, torch.Tensor] = {}
    if opt_file.is_file():
        # every tensor copied out of the file as it is read (views into the mapping would each drag
        # the whole file along, e.g. into torch.save of the optimizer's state)
        tensors = read_weights(opt_file, _weight_file(opt_file, config), None, CONFIG_NAME, own=True)
    unknown = sorted(k for k in tensors if k.rpartition("::")[0] not in index)
    if unknown:
        raise CheckpointError(f"{opt_file} holds state for {unknown[0]!r}, which is not a parameter of the optimizer")
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        state.setdefault(index[name], {})[field] = value
    for name, fields in saved["scalar_state"].items():
        state.setdefault(index[name], {}).update(fields)
    groups = []
    for group, entry in zip(optimizer.param_groups, saved["param_groups"]):
        g = {k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.items() if k != "params"}
        g = {k: (_DTYPES[v["dtype"]] if isinstance(v, dict) and "dtype" in v else v) for k, v in g.items()}
        g["params"] = [index[names[id(p)]] for p in group["params"]]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
