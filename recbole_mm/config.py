"""A RecBole ``Config`` that knows recbole-mm's models and property files."""

from __future__ import annotations

import ast
import os
import re
from importlib import resources
from logging import getLogger

import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_mm.errors import ConfigError
from recbole_mm.lmm.prompts import LOSS_TOKENS, PROMPT_TEXTS, VARIANTS

logger = getLogger(__name__)


class _SafeYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python objects) with RecBole's float resolver (``1e-3`` is a float)."""


_SafeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str):
    """A setting's value from its text, without running code: a Python literal (``5``, ``1e-3``,
    ``[5, 10]``, ``{'inter': [...]}``, ``None``, ``True``), ``true``/``false``, else the text itself.

    RecBole ``eval()``s these strings; here ``__import__('os').system(...)`` stays a string.
    """
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return {"true": True, "false": False}.get(text.strip().lower(), text)
    return value if isinstance(value, (str, int, float, list, tuple, dict, bool)) or value is None else text


def load_yaml_file(path: str) -> dict:
    """A yaml config file as a dict (safe loading); malformed yaml is a one-line error with file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: bytes that are not UTF-8 at byte {e.start}; save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_SafeYamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: malformed yaml ({e.problem or e.context}); "
                          f"fix the file (settings are `key: value` lines)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: malformed yaml ({e}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected `key: value` settings, got a yaml "
                          f"{type(data).__name__}; fix the file")
    return data


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "True or False"}[t]


def check_setting_type(key: str, value, default, source: str) -> None:
    """Refuse a user value whose type cannot be what a numeric / boolean setting needs.

    Only settings whose default is an int, float or bool are checked (``None`` is let through:
    several settings use it for "off"); ``source`` says where the value came from.
    """
    if value is None or default is None:
        return
    if isinstance(default, bool):
        expected, ok = bool, isinstance(value, bool)
    elif isinstance(default, int):
        expected, ok = int, isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        expected, ok = float, isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return
    if not ok:
        note = " (expressions are not evaluated)" if isinstance(value, str) else ""
        raise ConfigError(f"{source}: {key}={value!r} is not {_type_name(expected)} "
                          f"({key} expects {expected.__name__}, like its default {default!r}){note}")


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
    raise ConfigError(f"config file {name!r} not found (and no shipped preset of that name: "
                      f"{', '.join(sorted(f[:-5] for f in os.listdir(os.path.join(properties_dir(), 'preset'))))})")


def _torchrun_env() -> tuple[int, int, int, int] | None:
    """(rank, local rank, world size, local world size) when launched by ``torchrun`` / ``accelerate
    launch`` with more than one process, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return (int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world,
            int(os.environ.get("LOCAL_WORLD_SIZE", world)))


# PRIME's switches between our behaviour and the reference code's (each also checked where it is used)
PRIME_CHOICES = {
    "ranker_optimizer": ("adamw", "adamw_8bit"),
    "ranker_negative_counts": ("train", "train_valid_plus_one"),
    "ranker_loss_tokens": LOSS_TOKENS,
    "prompt_text": PROMPT_TEXTS,
    "prompt_variant": VARIANTS,
    "pref_answer_rule": ("ours", "reference"),
    "pref_step_unit": ("prefixes", "users"),
}


class Config(RecBoleConfig):
    """RecBole's ``Config`` with these changes, each small and named:

    - a config file may be named by a shipped preset (``--config_files=prime-cpu``);
    - model names resolve through :func:`recbole_mm.model.registry.get_model` (plugin first, then RecBole);
    - our ``overall.yaml``, ``model/<base>.yaml`` (when the model class declares
      ``properties_base``, e.g. ``"_lmm"`` for LMM recommenders), ``model/<Model>.yaml`` and
      ``dataset/<name>.yaml`` are layered on top of RecBole's internal defaults (so user files, ``config_dict`` and the command line still win);
    - command-line overrides come from ``argv`` (a list of ``--key=value``), not from ``sys.argv``,
      so that library calls (tests, tuning) are not influenced by the host process's arguments;
    - values are parsed, never evaluated (:func:`parse_value`, :func:`load_yaml_file`), and bad
      settings are one-line :class:`~recbole_mm.errors.ConfigError` s: wrong types for numeric /
      boolean settings, ``topk`` without the k of ``valid_metric``, PRIME's ``n_candidates`` and
      ``retriever``, KD_DAGFM's ``teacher`` (which RecBole ``eval()``s).
    - unknown keys in any source warn with the closest known key (``strict_config: True``: error).

    Context-aware (CTR) models keep RecBole's quick-start protocol for them (labeled evaluation,
    ``AUC`` / ``LogLoss``), which our ranking defaults would otherwise replace.

    A CE-loss model gets ``train_neg_sample_args: None`` unless the user set it, which is what
    RecBole requires for CE and what its own quick-start examples write by hand.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, argv=None,
                 distributed: dict | bool | None = None):
        self._argv = list(argv or [])
        # a process of a distributed run (``local_rank``, ``world_size``, ``nproc``, ``offset``, ``ip``,
        # ``port``; see recbole_mm.quick_start.run), or False: one process even under torchrun. Kept out of
        # config_dict, so that checkpoints and stage keys do not hold them.
        self._distributed = distributed
        files = [resolve_config_file(f) for f in config_file_list or []]
        super().__init__(model, dataset, files or None, config_dict)
        self._check_unknown_keys(files)

    def for_model(self, model: str, config_dict: dict) -> "Config":
        """A config for another model on the same dataset (a sub-model, e.g. PRIME's retriever),
        built from ``config_dict`` and that model's own property files."""
        return type(self)(model=model, dataset=self.dataset, config_dict=config_dict, distributed=False)

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

    # Values are parsed, never evaluated: RecBole eval()s override strings and reads yaml with
    # FullLoader; here literals and safe yaml only (see :func:`parse_value`, :func:`load_yaml_file`).
    def _build_yaml_loader(self):
        return _SafeYamlLoader

    def _convert_config_dict(self, config_dict):
        return {key: parse_value(value) if isinstance(value, str) else value for key, value in config_dict.items()}

    def _load_config_files(self, file_list):
        merged = {}
        for path in file_list or []:
            merged.update(load_yaml_file(path))
        return merged

    def _load_cmd_line(self):
        cmd = {}
        for arg in self._argv:
            if not arg.startswith("--") or "=" not in arg:
                raise ConfigError(f"command-line override {arg!r} is not of the form --key=value")
            key, value = arg[2:].split("=", 1)
            if key in cmd and cmd[key] != value:
                raise ConfigError(f"command-line override --{key} is given twice with different values")
            cmd[key] = value
        return self._convert_config_dict(cmd)

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise ConfigError("no model given: pass --model=NAME (or `model:` in a config file)")
        if isinstance(model, str):
            from recbole_mm.model.registry import get_model

            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self._update_internal_config_dict(_property_file("overall.yaml"))
        if model_class.type in (ModelType.CONTEXT, ModelType.DECISIONTREE):
            # CTR models keep RecBole's own protocol (labeled evaluation, AUC / LogLoss): our
            # overall.yaml's ranking metrics do not apply to them
            import recbole

            quick = os.path.join(os.path.dirname(recbole.__file__), "properties", "quick_start_config")
            self._update_internal_config_dict(os.path.join(quick, "context-aware.yaml"))
            if dataset == "ml-100k":
                self._update_internal_config_dict(os.path.join(quick, "context-aware_ml-100k.yaml"))
        base = getattr(model_class, "properties_base", None)
        if base:  # e.g. "_lmm": the keys every LMM model shares, under the model's own yaml
            path = _property_file("model", f"{base}.yaml")
            if path is None:
                raise ConfigError(f"{model}.properties_base={base!r}: no properties/model/{base}.yaml is shipped")
            self._update_internal_config_dict(path)
        path = _property_file("model", f"{model}.yaml")
        if path:
            self._update_internal_config_dict(path)
        path = _property_file("dataset", f"{dataset}.yaml")
        if path:
            keys = self._update_internal_config_dict(path) or {}
            self.parameters["Dataset"] += [k for k in keys if k not in self.parameters["Dataset"]]

    def _init_device(self):
        """RecBole's device set-up, except for a distributed run (``local_rank`` set by
        :func:`recbole_mm.quick_start.run`, or a ``torchrun`` environment).

        RecBole 1.2.1 hard-codes the ``nccl`` backend, asserts one ``gpu_id`` per process and calls
        ``torch.cuda.set_device``, so its distributed path cannot run without GPUs. Here the
        backend is ``nccl`` when CUDA is present and ``gpu_id`` names GPUs (RecBole's behaviour, one
        GPU per local rank, ``gpu_id`` still checked), else ``gloo`` on the CPU: the same data
        sharding, DDP and gathering then run, and are tested, on a CPU machine. A process group
        that already exists (a PRIME retriever's config built inside a distributed run) is reused.
        """
        cfg = self.final_config_dict
        if isinstance(self._distributed, dict):
            cfg.update(self._distributed)
        elif self._distributed is None and "local_rank" not in cfg and _torchrun_env() is not None:
            rank, local_rank, world_size, local_world_size = _torchrun_env()
            cfg.update(local_rank=local_rank, world_size=world_size, nproc=local_world_size,
                       offset=rank - local_rank, _init_method="env://")
        if "local_rank" not in cfg or self._distributed is False:
            return super()._init_device()
        import datetime

        import torch
        import torch.distributed as dist

        gpu_id = ",".join(map(str, cfg["gpu_id"])) if isinstance(cfg["gpu_id"], tuple) else str(cfg["gpu_id"])
        cfg["gpu_id"] = gpu_id
        local_rank, rank = int(cfg["local_rank"]), int(cfg["local_rank"]) + int(cfg.get("offset") or 0)
        init_method = cfg.pop("_init_method", None)  # env:// under torchrun
        if init_method is None:  # as RecBole, before CUDA is asked; torchrun leaves the GPUs as they are
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
        cuda = len(gpu_id) > 0 and torch.cuda.is_available()
        if cuda:
            if init_method is None:
                if len(gpu_id.split(",")) < int(cfg["nproc"]):
                    raise ConfigError(f"gpu_id={gpu_id!r} names {len(gpu_id.split(','))} GPUs for nproc={cfg['nproc']} "
                                      f"processes; give one GPU per process (e.g. --gpu_id='0,1,2,3')")
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        init_method = init_method or f"tcp://{cfg['ip']}:{cfg['port']}"
        if not dist.is_initialized():
            # a long timeout: in a PRIME run the other ranks wait while rank 0 trains a stage alone
            dist.init_process_group(backend="nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                                    world_size=int(cfg["world_size"]), timeout=datetime.timedelta(hours=24))
        cfg["device"], cfg["single_spec"] = device, False
        if local_rank != 0 or rank != 0:  # RecBole's rule: only the first process logs and shows progress
            cfg["state"], cfg["show_progress"], cfg["verbose"] = "error", False, False

    def _source(self, key: str) -> str:
        if key in self.cmd_config_dict:
            return "command line"
        if key in self.variable_config_dict:
            return "config_dict"
        return "config file"

    def _check_settings(self):
        """Types of the user's numeric/boolean settings, and settings that would fail only after training."""
        cfg = self.final_config_dict
        for key, value in self.external_config_dict.items():
            check_setting_type(key, value, self.internal_config_dict.get(key), self._source(key))
        if self.model == "KD_DAGFM" and cfg.get("teacher") not in ("CrossNet", "CIN"):
            # RecBole eval()s this setting to pick the teacher class
            raise ConfigError(f"{self._source('teacher')}: teacher={cfg.get('teacher')!r} is not one of "
                              f"'CrossNet', 'CIN' (KD_DAGFM's teacher networks)")
        if self.model == "PRIME":
            n = cfg.get("n_candidates")
            if not isinstance(n, int) or not 1 <= n <= 26:
                raise ConfigError(f"n_candidates={n!r}: PRIME's ranker letters its candidates A..Z, so "
                                  f"n_candidates must be an integer from 1 to 26")
            for key, choices in PRIME_CHOICES.items():  # a typo would otherwise fail after stage 1 trained
                if cfg.get(key) is not None and cfg.get(key) not in choices:
                    raise ConfigError(f"{self._source(key)}: {key}={cfg.get(key)!r}: choose one of {choices}")
            from recbole_mm.model.registry import get_model

            retriever = get_model(str(cfg.get("retriever")))
            if getattr(retriever, "type", None) != ModelType.SEQUENTIAL:
                raise ConfigError(f"retriever={cfg.get('retriever')!r} is not a sequential model "
                                  f"({getattr(retriever, 'type', 'unknown type')}); PRIME's retriever "
                                  f"ranks from the user's history: use e.g. LRURec or SASRec")

    def _check_topk(self):
        cfg = self.final_config_dict
        topk, metric = cfg["topk"], str(cfg["valid_metric"])
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in topk):
            raise ConfigError(f"{self._source('topk')}: topk={topk!r} must be a positive integer or a list of them")
        name, _, k = metric.partition("@")
        if not k or not str(cfg.get("eval_type")).endswith("RANKING"):
            return
        if not k.isdigit():
            raise ConfigError(f"valid_metric={metric!r}: the part after '@' must be an integer k (e.g. NDCG@10)")
        if int(k) not in topk:
            raise ConfigError(f"valid_metric={metric!r} needs k={k} in topk={topk}; add it "
                              f"(e.g. --topk={sorted(set(topk) | {int(k)})}) or choose a valid_metric whose k is in topk")
        if name.lower() not in [str(m).lower() for m in cfg["metrics"]]:
            raise ConfigError(f"valid_metric={metric!r} is not among metrics={cfg['metrics']}; add "
                              f"{name} to metrics or choose another valid_metric")

    def _set_default_parameters(self):
        cfg = self.final_config_dict
        self._check_settings()
        if (cfg.get("MODEL_TYPE") == ModelType.SEQUENTIAL and cfg.get("loss_type") == "CE"
                and "train_neg_sample_args" not in self.external_config_dict):
            cfg["train_neg_sample_args"] = None
        if cfg.get("train_positions", "last") not in ("last", "all"):
            raise ConfigError(f"train_positions must be 'last' or 'all', not {cfg['train_positions']!r}")
        if cfg.get("train_positions") == "all" and not getattr(self.model_class, "supports_all_positions", False):
            raise ConfigError(
                f"train_positions='all' (one sequence per user, loss at every position) is not supported "
                f"by {self.model}; use train_positions='last' (RecBole's prefix samples)")
        try:
            super()._set_default_parameters()
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:  # RecBole's checks of settings
            raise ConfigError(f"settings refused by RecBole: {e}") from None
        self._check_topk()
