"""Reading original-format checkpoints (``.pth``) safely, with errors that name the manifest field.

``torch.load(..., weights_only=True)`` only: a pickle that holds anything but tensors and plain
containers is refused, never executed. Every failure is a :class:`ModelUnavailableError` (CLI
exit 2) whose message starts with the field (``segment.model: ...``) and says what is wrong and
what the field expects.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from stages.models import ModelUnavailableError


class CheckpointError(ModelUnavailableError):
    """An original checkpoint named in the manifest is missing, unreadable, unsafe or of the wrong model."""


def checkpoint_error(field: str, path: str | Path, why: str, expects: str) -> CheckpointError:
    return CheckpointError(f"{field}: {path}: {why}. {expects}")


def checkpoint_path(name: str, field: str, expects: str) -> Path:
    """The checkpoint file ``name`` points to (it must exist and be a file)."""
    path = Path(os.path.expanduser(str(name or "")))
    if not str(name or "").strip():
        raise checkpoint_error(field, name, "no checkpoint file given", expects)
    if path.is_dir():
        raise checkpoint_error(field, path, "is a folder, not a checkpoint file", expects)
    if not path.is_file():
        raise checkpoint_error(field, path, "no such checkpoint file", expects)
    return path.resolve()


def load_state_dict(path: Path, field: str, expects: str, mmap: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of an original checkpoint: a plain state dict, or one under ``model`` /
    ``state_dict`` (training checkpoints). ``mmap`` maps the file instead of reading it (cheap
    checks of a multi-GB file); legacy non-zip files are read whole."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
                raise checkpoint_error(field, path, "holds Python objects other than weights, and is refused "
                                       f"(torch.load(weights_only=True): {text})", expects) from None
            raise checkpoint_error(field, path, f"is not a PyTorch checkpoint ({text})", expects) from None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises anything (IndexError, KeyError ...) on junk
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise checkpoint_error(field, path, f"is not a PyTorch checkpoint ({type(exc).__name__}: {text})",
                               expects) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise checkpoint_error(field, path, "does not hold a state dict (a mapping of parameter names to "
                               "tensors)", expects)
    return obj


__all__ = ["CheckpointError", "checkpoint_error", "checkpoint_path", "load_state_dict"]
