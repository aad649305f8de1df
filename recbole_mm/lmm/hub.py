"""Where a pretrained model comes from: a local folder or a Hugging Face hub id (offline-aware)."""

from __future__ import annotations

import os
from typing import NamedTuple


class Location(NamedTuple):
    """A resolved model name: ``path`` (folder or hub id), ``from_pretrained`` keyword arguments,
    whether it is a local folder, and whether the name looks like a path that does not exist."""

    path: str
    kwargs: dict
    local: bool
    missing_folder: bool


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` asks for no network."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def looks_local(name: str) -> bool:
    """Whether ``name`` reads as a filesystem path rather than a hub id (``owner/model``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def locate(name: str, trust_remote_code: bool = False) -> Location:
    """Resolve ``name`` for ``from_pretrained``: a local folder wins; otherwise a hub id, read from
    the local cache only when offline; ``trust_remote_code`` is passed through (off by default)."""
    path = os.path.expanduser(str(name))
    local = os.path.isdir(path)
    kwargs: dict = {"trust_remote_code": bool(trust_remote_code)}
    if not local and offline_mode():
        kwargs["local_files_only"] = True
    return Location(path if local else str(name), kwargs, local, not local and looks_local(str(name)))
