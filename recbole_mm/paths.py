"""Where recbole-mm writes its artefacts and caches: one place, under the working directory's ``saved/``.

RecBole writes ``saved/`` (checkpoints), ``log/`` and ``log_tensorboard/`` relative to the working
directory; recbole-mm's caches follow the same rule, so that nothing is ever written inside an
installed package (RecBole's bundled ``ml-100k`` lives in ``site-packages``). A path set explicitly
in the config is used as given, unless it lies inside an installed package, which is refused.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from recbole_mm.errors import ConfigError

SAVED = "saved"


def saved_dir(*parts: str) -> Path:
    """``saved/<parts...>`` under the current working directory."""
    return Path(os.getcwd()) / SAVED / Path(*parts) if parts else Path(os.getcwd()) / SAVED


def _package_roots() -> list[Path]:
    roots = set()
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(Path(path).resolve())
    import recbole

    roots.add(Path(recbole.__file__).resolve().parent)
    return sorted(roots)


def inside_installed_package(path: str | os.PathLike) -> bool:
    """True when ``path`` lies in site-packages (or in the installed RecBole package)."""
    resolved = Path(path).resolve()
    return any(resolved == root or root in resolved.parents for root in _package_roots())


def _checked(path: str | os.PathLike, key: str) -> Path:
    if inside_installed_package(path):
        raise ConfigError(f"{key}={path} lies inside an installed package; set {key} to a folder of your own "
                         f"(or leave it unset: the default is {saved_dir()}/...)")
    return Path(path)


def embedding_cache_dir(config) -> Path:
    """VLM4Rec's text/image vector caches: ``embedding_cache_dir``, default ``saved/vlm4rec_cache/<dataset>``."""
    if config["embedding_cache_dir"]:
        return _checked(config["embedding_cache_dir"], "embedding_cache_dir")
    return saved_dir("vlm4rec_cache", config["dataset"])


def description_dir(config, tag: str = "descriptions") -> Path:
    """Folder of ``<dataset>.<tag>.jsonl``: ``description_dir`` if set; else the dataset folder when a
    cache is already there (written by ``python -m recbole_mm.lmm.describer --data_path=...``) and
    that folder is not inside an installed package; else ``saved/descriptions/<dataset>``."""
    if config["description_dir"]:
        return _checked(config["description_dir"], "description_dir")
    data_path = Path(config["data_path"])
    if (data_path / f"{config['dataset']}.{tag}.jsonl").is_file() and not inside_installed_package(data_path):
        return data_path
    return saved_dir("descriptions", config["dataset"])


def artifacts_dir(config) -> Path:
    """Stage artefacts / built small models (``artifacts_dir``, relative paths under the working directory)."""
    return _checked(config["artifacts_dir"], "artifacts_dir")
