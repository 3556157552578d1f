"""Shared model loading for the GPU stages (ground, segment): device, dtype, provenance, offline checks.

Models are named by Hugging Face id (optionally with a revision) or by a local folder, and are
loaded with ``from_pretrained``. Nothing is loaded or downloaded at import time. When the Hub
is unreachable (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``, or no network) and a hub id
is not in the local cache, loading raises :class:`ModelUnavailableError` whose message names the
model and says how to supply it. The environment is read at call time (not only when
``huggingface_hub`` was imported), so a test or a worker may set ``HF_HUB_OFFLINE``/``HF_HOME`` late.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

_TRUE = {"1", "on", "yes", "true"}


class ModelUnavailableError(RuntimeError):
    """A model named in the manifest cannot be loaded here (offline and not cached, missing folder, ...)."""


# --- device / dtype ----------------------------------------------------------------------

def resolve_device(runtime_device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``. ``cuda`` without a GPU is an error."""
    name = (runtime_device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is {runtime_device!r} but no CUDA device is visible "
                           "(set runtime.device=cpu or auto)")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(runtime_dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """Compute dtype: ``auto`` -> bfloat16 on CUDA (float16 on GPUs without bf16), float32 elsewhere."""
    if isinstance(runtime_dtype, torch.dtype):
        return runtime_dtype
    device = torch.device(device)
    name = (runtime_dtype or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown runtime.dtype {runtime_dtype!r}; use auto, float32, bfloat16 or float16") from None


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for inference: autocast to ``dtype`` unless it is float32.

    Weights stay float32; autocast runs matmuls/convs in ``dtype`` and keeps the numerically
    sensitive ops (softmax, norms, sigmoid, interpolation) in float32.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- hub / local resolution ---------------------------------------------------------------

def hub_offline() -> bool:
    """True when Hub downloads are disabled (read from the environment now, and from huggingface_hub)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always present with transformers
        return False


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, resolved from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or os.path.isabs(name))


def local_model_dir(name: str) -> Path | None:
    """The folder ``name`` points to when it is a local model, else None (a hub id)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    return None


def _cached_config(name: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=str(hub_cache_dir()), revision=revision)
    except Exception:  # invalid repo id etc.: treat as not cached; the caller reports it
        return None
    return found if isinstance(found, str) else None


def _how_to_supply(name: str, field: str | None) -> str:
    target = field or "the manifest's model field"
    return (
        f"To supply it: on a machine with network run `hf download {name}` "
        f"(older huggingface_hub: `huggingface-cli download {name}`) and copy its Hugging Face cache "
        f"(HF_HOME, here {hub_cache_dir().parent}) to this machine; or save the model to a folder and "
        f"point {target} at that local folder (e.g. --set {field or '<section>.model'}=/path/to/folder). "
        "For tests and the offline sample, `lookandlearn tiny-models DIR` writes tiny RANDOM models."
    )


def _unavailable(name: str, revision: str | None, field: str | None, why: str) -> ModelUnavailableError:
    label = f"{field}: " if field else ""
    rev = f" (revision {revision})" if revision else ""
    return ModelUnavailableError(f"{label}model {name!r}{rev} is not available: {why}. {_how_to_supply(name, field)}")


def check_model_available(name: str, revision: str | None = None, field: str | None = None) -> None:
    """Raise :class:`ModelUnavailableError` unless ``name`` can be loaded here. Loads nothing.

    Local folder: it must exist and hold a ``config.json``. Hub id: it must be in the local
    cache, unless the Hub is reachable (then the file's metadata is fetched to prove it exists).
    """
    if not name or not str(name).strip():
        raise _unavailable(str(name), revision, field, "no model name given")
    local = local_model_dir(name)
    if local is not None:
        if not (local / "config.json").is_file():
            raise _unavailable(name, None, field, f"local folder {local} has no config.json")
        return
    if _looks_like_path(name):
        raise _unavailable(name, None, field, f"local folder {name} does not exist")
    if _cached_config(name, revision):
        return
    if hub_offline():
        raise _unavailable(name, revision, field,
                           f"it is not in the local Hugging Face cache ({hub_cache_dir()}) and Hub downloads "
                           "are disabled (HF_HUB_OFFLINE=1)")
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision), timeout=15)
    except Exception as exc:  # no network, unknown repo, gated repo, bad revision ...
        raise _unavailable(name, revision, field,
                           f"it is not in the local Hugging Face cache ({hub_cache_dir()}) and the Hub "
                           f"could not provide it ({type(exc).__name__}: {exc})") from exc


def model_ref(name: str, revision: str | None = None) -> str:
    """Provenance string: ``name@revision`` for hub ids (the cached commit when no revision is given,
    else ``@main``), the absolute folder for local models."""
    local = local_model_dir(name)
    if local is not None or _looks_like_path(name):
        return str(Path(os.path.expanduser(name)).resolve())
    if revision:
        return f"{name}@{revision}"
    cached = _cached_config(name, None)
    if cached:
        parts = Path(cached).parts
        if "snapshots" in parts:
            return f"{name}@{parts[parts.index('snapshots') + 1]}"
    return f"{name}@main"


def load_pretrained(loader_cls: Any, name: str, revision: str | None = None, field: str | None = None, **kw: Any):
    """``loader_cls.from_pretrained`` for a local folder or a hub id, with a clear error when the
    model cannot be had here (see :class:`ModelUnavailableError`)."""
    local = local_model_dir(name)
    if local is not None:
        return loader_cls.from_pretrained(str(local), **kw)
    if _looks_like_path(name):
        raise _unavailable(name, None, field, f"local folder {name} does not exist")
    offline = hub_offline()
    cached = _cached_config(name, revision) is not None
    if offline and not cached:
        raise _unavailable(name, revision, field,
                           f"it is not in the local Hugging Face cache ({hub_cache_dir()}) and Hub downloads "
                           "are disabled (HF_HUB_OFFLINE=1)")
    kw.setdefault("cache_dir", str(hub_cache_dir()))
    if offline:
        kw.setdefault("local_files_only", True)
    try:
        return loader_cls.from_pretrained(name, revision=revision, **kw)
    except OSError as exc:
        # transformers raises OSError (EnvironmentError) for connection failures, missing repos and
        # missing files alike; say which model and how to supply it.
        why = (f"loading from the Hugging Face cache ({hub_cache_dir()}) failed" if cached
               else f"it is not in the local Hugging Face cache ({hub_cache_dir()}) and could not be downloaded")
        raise _unavailable(name, revision, field, f"{why} ({type(exc).__name__}: {exc})") from exc


__all__ = [
    "ModelUnavailableError", "resolve_device", "resolve_dtype", "autocast", "hub_offline", "hub_cache_dir",
    "local_model_dir", "check_model_available", "model_ref", "load_pretrained",
]
