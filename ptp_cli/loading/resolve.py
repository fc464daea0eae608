"""Finding a checkpoint: a local directory, or a hub id taken from the Hugging Face cache, else downloaded.

Built-in names (``tiny``) are not known here: ``ptp_cli.zoo`` maps them to directories first.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from ptp_cli.errors import ModelLoadError
from ptp_cli.loading.files import has_weights

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (huggingface_hub reads it once, at import)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _download_errors() -> tuple[type[Exception], ...]:
    """What a failed download raises: OSError (the hub's HTTP errors, offline mode, requests' errors, disk
    errors), ValueError (the hub's argument checks), and the base error of whichever HTTP client
    (httpx or httpx2) and Xet downloader this huggingface_hub uses."""
    from huggingface_hub import errors as hub_errors

    found: list[type[Exception]] = [OSError, ValueError]
    if xet := getattr(hub_errors, "XetDownloadError", None):
        found.append(xet)
    for client in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(client).HTTPError)
        except ImportError:
            continue
    return tuple(found)


def resolve_model(name_or_path: str, *, offline: bool | None = None) -> Path:
    """A checkpoint directory for ``name_or_path``: a local directory, or a hub id (``OpenGVLab/InternVL2-2B``)
    taken from the local Hugging Face cache, else downloaded.

    ``offline``: never touch the network (default: the HF_HUB_OFFLINE environment variable).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"--model {name_or_path} is a file; pass the checkpoint's directory")
    if not _HUB_ID.match(name_or_path):
        raise ModelLoadError(
            f"model {name_or_path!r} is neither an existing directory nor a Hugging Face hub id (owner/name)"
        )
    if offline is None:
        offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    from huggingface_hub import snapshot_download  # imports an HTTP client: only when a hub id is asked for
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    cache = _hf_cache_dir()
    try:
        local = Path(snapshot_download(name_or_path, cache_dir=cache, local_files_only=True))
        if offline or has_weights(local):  # a partial snapshot (no weights) is completed online
            return local
    except LocalEntryNotFoundError:
        pass
    advice = f"download it on a machine with internet (hf download {name_or_path}) or pass --model /path/to/checkpoint"
    if offline:
        raise ModelLoadError(
            f"model {name_or_path!r} is not in the local Hugging Face cache ({cache}) and the hub cannot be "
            f"reached (offline mode); {advice}"
        )
    try:
        return Path(snapshot_download(name_or_path, cache_dir=cache, allow_patterns=_HUB_PATTERNS))
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"model {name_or_path!r} was not found on the Hugging Face hub (a private or gated repository needs "
            "`hf auth login`)"
        ) from exc
    except _download_errors() as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot download model {name_or_path!r} from the Hugging Face hub ({reason}); {advice}") from exc
