"""A RecBole ``Config`` that knows recbole-mm's models and property files."""

from __future__ import annotations

import os
from importlib import resources

from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType


def properties_dir() -> str:
    """Folder of the property files shipped with the package (``properties/`` in the source tree)."""
    return str(resources.files("recbole_mm.properties"))


def _property_file(*parts: str) -> str | None:
    path = os.path.join(properties_dir(), *parts)
    return path if os.path.isfile(path) else None


def resolve_config_file(name: str) -> str:
    """A config file path, or the name of a shipped preset (``properties/preset/<name>.yaml``)."""
    if os.path.isfile(name):
        return name
    preset = _property_file("preset", f"{name}.yaml") or _property_file("preset", name)
    if preset:
        return preset
    raise FileNotFoundError(f"config file {name!r} not found (and no shipped preset of that name: "
                            f"{', '.join(sorted(f[:-5] for f in os.listdir(os.path.join(properties_dir(), 'preset'))))})")


class Config(RecBoleConfig):
    """RecBole's ``Config`` with these changes, each small and named:

    - a config file may be named by a shipped preset (``--config_files=prime-cpu``);
    - model names resolve through :func:`recbole_mm.utils.get_model` (plugin first, then RecBole);
    - our ``overall.yaml``, ``model/<Model>.yaml`` and ``dataset/<name>.yaml`` are layered on top of
      RecBole's internal defaults (so user files, ``config_dict`` and the command line still win);
    - command-line overrides come from ``argv`` (a list of ``--key=value``), not from ``sys.argv``,
      so that library calls (tests, tuning) are not influenced by the host process's arguments;
    - unknown keys in any source warn with the closest known key (``strict_config: True``: error).

    A CE-loss model gets ``train_neg_sample_args: None`` unless the user set it, which is what
    RecBole requires for CE and what its own quick-start examples write by hand.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, argv=None):
        self._argv = list(argv or [])
        files = [resolve_config_file(f) for f in config_file_list or []]
        super().__init__(model, dataset, files or None, config_dict)
        self._check_unknown_keys(files)

    def _check_unknown_keys(self, files):
        """Unknown keys in the files, ``config_dict`` or command line: warn (``strict_config``: error)."""
        from recbole_mm.config_keys import check_keys

        sources = {}
        for path in files:
            single = self._load_config_files([path])
            sources[f"config file {path}"] = single
        sources["config_dict"] = self.variable_config_dict
        sources["command line"] = self.cmd_config_dict
        check_keys(sources, strict=bool(self.final_config_dict.get("strict_config")))

    def _load_cmd_line(self):
        cmd = {}
        for arg in self._argv:
            if not arg.startswith("--") or "=" not in arg:
                raise ValueError(f"command-line override {arg!r} is not of the form --key=value")
            key, value = arg[2:].split("=", 1)
            if key in cmd and cmd[key] != value:
                raise ValueError(f"command-line override --{key} is given twice with different values")
            cmd[key] = value
        return self._convert_config_dict(cmd)

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError("no model given: pass --model=NAME (or `model:` in a config file)")
        if isinstance(model, str):
            from recbole_mm.utils import get_model

            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        for path in (_property_file("overall.yaml"), _property_file("model", f"{model}.yaml")):
            if path:
                self._update_internal_config_dict(path)
        path = _property_file("dataset", f"{dataset}.yaml")
        if path:
            keys = self._update_internal_config_dict(path) or {}
            self.parameters["Dataset"] += [k for k in keys if k not in self.parameters["Dataset"]]

    def _set_default_parameters(self):
        cfg = self.final_config_dict
        if (cfg.get("MODEL_TYPE") == ModelType.SEQUENTIAL and cfg.get("loss_type") == "CE"
                and "train_neg_sample_args" not in self.external_config_dict):
            cfg["train_neg_sample_args"] = None
        if cfg.get("train_positions", "last") not in ("last", "all"):
            raise ValueError(f"train_positions must be 'last' or 'all', not {cfg['train_positions']!r}")
        if cfg.get("train_positions") == "all" and not getattr(self.model_class, "supports_all_positions", False):
            raise ValueError(
                f"train_positions='all' (one sequence per user, loss at every position) is not supported "
                f"by {self.model}; use train_positions='last' (RecBole's prefix samples)")
        super()._set_default_parameters()
