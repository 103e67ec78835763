"""Checkpoints that survive a crash at any instant: atomic files and a SHA-256 manifest written last.

A run folder holds one folder per saved step::

    out/step-00000300/  model.safetensors  training_state.pt  config.json  tokenizer.json ...
                        manifest.json      {"format": 1, "step": 300, "files": {name: {"sha256", "size"}}}

A checkpoint exists only if its ``manifest.json`` parses, lists the weights and the training
state, names only files of its folder, and every file it lists has the listed size and SHA-256
(:func:`verify_checkpoint`); :func:`latest_checkpoint` returns the newest such
folder. :func:`save_checkpoint` keeps that true whenever the process dies (SIGKILL, power loss):

1. A leftover folder of the same step without a valid manifest (an interrupted save) is removed;
   the new folder is created and the run folder fsynced.
2. Each file is written to a temporary file in the same folder, flushed and fsynced, renamed onto
   its name with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the rename is durable.
3. ``manifest.json`` is written the same way, last: before it lands, the step has no checkpoint
   and the previous one is the latest.
4. Only then are older checkpoints beyond ``keep_last`` removed, manifest first, so a half-removed
   folder is simply not a checkpoint.

Weights are stored with safetensors (``safe_open`` / memory-mapped loading; tied weights stored
once); the training state (optimizer, scheduler, RNG, data position) with ``torch.save`` and read
back with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
``safetensors`` is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import re
import shutil
import warnings
from typing import Callable, Mapping, Optional, Union

import torch

import apt_hal
from apt_hal.atomic import atomic_write, atomic_write_bytes, fsync_dir
from apt_hal.errors import AptHalError

__all__ = [
    "CheckpointError", "save_checkpoint", "verify_checkpoint", "latest_checkpoint", "resolve_checkpoint",
    "model_weights_writer", "load_model_weights", "load_training_state", "rng_state", "set_rng_state",
    "make_model", "load_trained_model",
]

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
MODEL_CONFIG_FILE = "config.json"  # ModelConfig.to_json
RUN_FILE = "run.json"  # how the model was built beyond its config: {"mxfp4": null | [include patterns]}
REQUIRED_FILES = (MODEL_FILE, STATE_FILE)  # a manifest without them is no checkpoint
FORMAT = 1

PathLike = Union[str, pathlib.Path]
# What a checkpoint file holds: its bytes, or a function writing it at the (temporary) path given.
FileContent = Union[bytes, Callable[[pathlib.Path], None]]

_STEP_FOLDER = re.compile(r"step-(\d+)")
_HASH_CHUNK = 1 << 20


class CheckpointError(AptHalError, IOError):
    """A folder is not a complete, intact checkpoint, or a checkpoint does not fit what loads it."""


def _plain_name(name: str) -> bool:
    """A file name that stays in its folder: no separator, no '..', not hidden."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _step_path(root: PathLike, step: int) -> pathlib.Path:
    return pathlib.Path(root) / f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _sha256_and_size(path: pathlib.Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _write_atomic(folder: pathlib.Path, name: str, content: FileContent) -> dict:
    """Write ``folder/name`` atomically and durably; returns its manifest entry."""
    if isinstance(content, bytes):
        atomic_write_bytes(folder / name, content)
    else:
        atomic_write(folder / name, content)
    sha256, size = _sha256_and_size(folder / name)
    return {"sha256": sha256, "size": size}


def _remove_checkpoint(folder: pathlib.Path) -> None:
    """Remove a step folder, manifest first: if this is interrupted, what is left is no checkpoint."""
    manifest = folder / MANIFEST
    if manifest.exists():
        manifest.unlink()
        fsync_dir(folder)
    shutil.rmtree(folder)


def _step_folders(root: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """Every ``step-N`` folder under ``root``, complete or not, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_FOLDER.fullmatch(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(root: PathLike, step: int, files: Mapping[str, FileContent],
                    keep_last: Optional[int] = None) -> pathlib.Path:
    """Save ``files`` (name -> bytes or writer) as the checkpoint of ``step`` under ``root``.

    Follows the protocol of the module docstring. ``keep_last``: how many checkpoints to keep,
    this one included (``None``: all); folders of earlier steps without a manifest (interrupted
    saves) are removed too. Saving a step that already has a valid checkpoint is an error.
    Returns the checkpoint folder.
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    for name in files:
        if not _plain_name(name) or name == MANIFEST:
            raise ValueError(f"save_checkpoint: file name {name!r} must be a plain name other than {MANIFEST!r} "
                             "and not start with '.'")
    absent = [name for name in REQUIRED_FILES if name not in files]
    if absent:
        raise ValueError(f"save_checkpoint: a checkpoint needs {', '.join(absent)}")
    root = pathlib.Path(root)
    folder = _step_path(root, step)
    root.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        try:
            verify_checkpoint(folder)
        except CheckpointError:
            _remove_checkpoint(folder)  # the remains of an interrupted save of this step
        else:
            raise CheckpointError(f"save_checkpoint: {folder} already holds a valid checkpoint of step {step}")
    folder.mkdir()
    fsync_dir(root)

    entries = {name: _write_atomic(folder, name, content) for name, content in files.items()}
    manifest = {"format": FORMAT, "step": step, "files": entries}
    _write_atomic(folder, MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))

    kept = 1
    for other_step, other in _step_folders(root):
        if other_step >= step:
            continue
        if (other / MANIFEST).exists() and (keep_last is None or kept < keep_last):
            kept += 1
        else:
            _remove_checkpoint(other)
    return folder


# ---------------------------------------------------------------------------------------------
# Finding and verifying
# ---------------------------------------------------------------------------------------------


def verify_checkpoint(folder: PathLike) -> dict:
    """Check ``folder``'s manifest and the size and SHA-256 of every file it lists; return the manifest.

    Raises :class:`CheckpointError` naming the first problem: no manifest (an interrupted save),
    an unreadable manifest, a manifest that does not list the :data:`REQUIRED_FILES`, a name that
    leaves the folder (a path, '..', or a symbolic link pointing out), a missing file, or a file
    whose size or hash differs.
    """
    folder = pathlib.Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {FORMAT}")
        entries = {name: (entry["sha256"], int(entry["size"])) for name, entry in manifest["files"].items()}
        int(manifest["step"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_path} is not a valid manifest: {e}") from e
    absent = [name for name in REQUIRED_FILES if name not in entries]
    if absent:
        raise CheckpointError(f"{manifest_path} does not list {', '.join(absent)}: not a complete checkpoint")
    inside = folder.resolve()
    for name, (sha256, size) in entries.items():
        path = folder / name
        if not _plain_name(name) or name == MANIFEST or path.resolve().parent != inside:
            raise CheckpointError(f"{manifest_path} lists {name!r}, which is not a file of the checkpoint folder")
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is listed in the manifest but missing")
        actual_sha256, actual_size = _sha256_and_size(path)
        if actual_size != size or actual_sha256 != sha256:
            raise CheckpointError(f"{folder}: {name} is corrupt: {actual_size} bytes with SHA-256 {actual_sha256}, "
                                  f"the manifest says {size} bytes with SHA-256 {sha256}")
    return manifest


def latest_checkpoint(root: PathLike) -> Optional[pathlib.Path]:
    """The newest checkpoint under ``root`` that verifies, or ``None``.

    Folders without a manifest (an interrupted save) are passed over silently; a folder whose
    manifest does not match its files (corruption after the save) is passed over with a warning.
    """
    for _, folder in _step_folders(pathlib.Path(root)):
        if not (folder / MANIFEST).exists():
            continue
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}", RuntimeWarning, stacklevel=2)
            continue
        return folder
    return None


def resolve_checkpoint(path: PathLike) -> pathlib.Path:
    """``path`` if it is a checkpoint folder (verified), else the latest checkpoint of the run folder
    ``path``; :class:`CheckpointError` if there is none."""
    path = pathlib.Path(path)
    if (path / MANIFEST).exists():
        verify_checkpoint(path)
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: no such folder")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path} (looked for step-*/{MANIFEST})")
    return found


# ---------------------------------------------------------------------------------------------
# What goes into a checkpoint
# ---------------------------------------------------------------------------------------------


def model_weights_writer(model: torch.nn.Module) -> Callable[[pathlib.Path], None]:
    """A writer of ``model``'s state (parameters and persistent buffers) in safetensors format.

    Tensors sharing storage (tied embeddings) are stored once, as safetensors requires."""
    from safetensors.torch import save_model

    return lambda path: save_model(model, str(path), metadata={"format": "pt"})


def load_model_weights(model: torch.nn.Module, folder: PathLike) -> None:
    """Load the weights of checkpoint ``folder`` into ``model`` (every tensor must fit, none left over)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = pathlib.Path(folder) / MODEL_FILE
    try:
        load_model(model, str(path), strict=True)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from None
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: the weights do not fit this model: {e}") from e


def load_training_state(folder: PathLike) -> dict:
    """The training state saved in checkpoint ``folder`` (tensors on the CPU)."""
    path = pathlib.Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises whatever its unpickler meets in a damaged file (IndexError...)
        raise CheckpointError(f"{path}: unreadable training state: {_first_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the training state is a {type(state).__name__}, not a dict")
    return state


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def rng_state(device: torch.device) -> dict:
    """Every random generator training draws from: Python's, torch's CPU generator and, for an
    accelerator ``device``, that device type's generators. (numpy's is not used, so not saved.)"""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type != "cpu":
        state[device.type] = apt_hal.device.get_rng_state(device.type)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type in state and device.type != "cpu":
        apt_hal.device.set_rng_state(state[device.type], device.type)
    elif device.type != "cpu":
        warnings.warn(f"the checkpoint holds no {device.type} random state (it was saved on another device type): "
                      "training continues, but not exactly as an uninterrupted run would", RuntimeWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------
# Models from checkpoints
# ---------------------------------------------------------------------------------------------


def make_model(config, mxfp4: Optional[list] = None) -> torch.nn.Module:
    """``build_model(config)``, with its Linear layers converted to MXFP4 when ``mxfp4`` is a list
    (empty: every one but lm_head; else the include patterns of ``convert_model_to_mxfp4``)."""
    from apt_hal.models import build_model
    from apt_hal.nn import MXFP4Linear, convert_model_to_mxfp4

    model = build_model(config)
    if mxfp4 is not None:
        convert_model_to_mxfp4(model, include=list(mxfp4) or None)
        if not any(isinstance(m, MXFP4Linear) for m in model.modules()):
            linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            raise ValueError(f"mxfp4 patterns {list(mxfp4)} convert no Linear layer of this model; its Linear layers: "
                             f"{', '.join(linears)}")
    return model


def load_trained_model(path: PathLike, device=None):
    """``(model in eval mode on device, tokenizer, checkpoint folder)`` from ``path``: a checkpoint
    folder or a run folder (its latest checkpoint), verified against its manifest first."""
    from apt_hal import device as hal_device
    from apt_hal.models import ModelConfig
    from apt_hal.models.tokenizer import Tokenizer

    folder = resolve_checkpoint(path)
    config = ModelConfig.from_json(folder / MODEL_CONFIG_FILE)
    model = make_model(config, json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))["mxfp4"])
    load_model_weights(model, folder)
    return model.to(device or hal_device.get_device()).eval(), Tokenizer.load(folder), folder
