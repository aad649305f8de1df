"""Unknown configuration keys: a warning naming the closest known key, or an error with ``strict_config``.

RecBole accepts any key silently, so ``--epoch=1`` (for ``epochs``) trains for the default 300
epochs. The known keys are every key of RecBole's and recbole-mm's property files plus every key
their source code reads as ``config["key"]`` (collected once per process, no imports).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import warnings

import yaml

# keys set on the command line / in code that no property file lists
EXTRA_KEYS = {"model", "dataset", "config_files", "config_file_list", "result_file", "resume", "params_file",
              "strict_config", "local_rank", "nproc", "world_size", "offset", "ip", "port", "single_spec",
              "device", "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "is_eval", "train_neg_sample_args",
              "valid_neg_sample_args", "test_neg_sample_args", "eval_neg_sample_args"}

_KEY_IN_CODE = re.compile(r"""config\[\s*['"]([A-Za-z_][A-Za-z0-9_]*)['"]\s*\]""")


class UnknownConfigKeyWarning(UserWarning):
    """A configuration key that neither RecBole nor recbole-mm reads."""


def _yaml_keys(folder: str) -> set[str]:
    keys: set[str] = set()
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".yaml") and name != "url.yaml":
                try:
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        data = yaml.safe_load(f)
                except (OSError, yaml.YAMLError):
                    continue
                if isinstance(data, dict):
                    keys.update(str(k) for k in data)
    return keys


def _code_keys(folder: str) -> set[str]:
    keys: set[str] = set()
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                    keys.update(_KEY_IN_CODE.findall(f.read()))
    return keys


@functools.lru_cache(maxsize=1)
def known_keys() -> frozenset[str]:
    """Every key RecBole or recbole-mm knows (property files and ``config["..."]`` reads)."""
    import recbole

    import recbole_mm
    from recbole_mm.config import properties_dir

    recbole_dir = os.path.dirname(recbole.__file__)
    ours = os.path.dirname(recbole_mm.__file__)
    return frozenset(EXTRA_KEYS | _yaml_keys(os.path.join(recbole_dir, "properties")) | _yaml_keys(properties_dir())
                     | _code_keys(recbole_dir) | _code_keys(ours))


def unknown_key_messages(sources: dict[str, dict]) -> list[str]:
    """One message per unknown key: ``sources`` maps a source's name (file, command line) to its dict."""
    known = known_keys()
    messages = []
    for source, values in sources.items():
        for key in values or {}:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "no known key is close to it"
            messages.append(f"unknown config key '{key}' ({source}): {hint}")
    return messages


def check_keys(sources: dict[str, dict], strict: bool) -> None:
    """Warn for each unknown key; with ``strict`` raise a ``ConfigError`` listing them all instead."""
    messages = unknown_key_messages(sources)
    if not messages:
        return
    if strict:
        from recbole_mm.errors import ConfigError

        raise ConfigError("; ".join(messages) + " (strict_config: True; fix or remove the keys)")
    for message in messages:
        warnings.warn(message + " (it is ignored; strict_config: True makes this an error)",
                      UnknownConfigKeyWarning, stacklevel=3)
