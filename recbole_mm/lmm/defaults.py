"""The shipped defaults of LMM recommenders: ``properties/model/_lmm.yaml`` (keys every LMM model
shares) with a model's own ``properties/model/<Model>.yaml`` on top.

The yaml files are the one place defaults live: :class:`~recbole_mm.lmm.backbone.BackboneSettings`
and :class:`~recbole_mm.lmm.prompts.PromptSettings` read theirs from here, and
:class:`recbole_mm.config.Config` layers the same files for every model class that declares
``properties_base = "_lmm"``.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from logging import getLogger

import yaml

from recbole_mm.errors import ConfigError

logger = getLogger(__name__)

#: name of the base yaml (``properties/model/_lmm.yaml``) that LMM model classes declare as ``properties_base``
LMM_BASE = "_lmm"


@functools.lru_cache(maxsize=None)
def _property_yaml(relative: str) -> dict:
    path = resources.files("recbole_mm.properties").joinpath(*relative.split("/"))
    if not path.is_file():
        raise ConfigError(f"no shipped property file properties/{relative}; check the name")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"properties/{relative}: expected `key: value` settings; fix the file")
    return data


def _model_yaml(name: str) -> dict:
    return _property_yaml(f"model/{name}.yaml")


def model_yaml(name: str) -> dict:
    """The settings of one shipped ``properties/model/<name>.yaml`` (a copy)."""
    return copy.deepcopy(_model_yaml(name))


def overall_yaml() -> dict:
    """The settings of ``properties/overall.yaml`` (recbole-mm's protocol keys; a copy)."""
    return copy.deepcopy(_property_yaml("overall.yaml"))


def shipped_defaults(model: str | None = None, base: str = LMM_BASE) -> dict:
    """The LMM base yaml's settings, with ``model``'s yaml on top when given (a copy)."""
    merged = model_yaml(base)
    if model:
        merged.update(model_yaml(model))
    return merged


def lmm_default(key: str):
    """One default of the LMM base yaml (``properties/model/_lmm.yaml``)."""
    defaults = _model_yaml(LMM_BASE)
    if key not in defaults:
        raise KeyError(f"{key!r} is not a key of properties/model/{LMM_BASE}.yaml")
    return copy.deepcopy(defaults[key])
