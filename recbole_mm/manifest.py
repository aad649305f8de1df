"""Run manifests: one small weights-only file from which any trained run reloads.

A run (``run_recbole_mm``) writes ``<checkpoint_dir>/<Model>-<time>-<pid>-<hex>.manifest.pth``: the
config as plain data, the dataset's fingerprint (names, sizes, times of its atomic files) and the
artefacts the trained model is made of, each with its SHA-256 (files) or its file list and sizes
(folders): RecBole checkpoints, PRIME's stage files (retriever, refined retriever, LoRA adapter, the
locally built ranker backbone), VLM4Rec's embedding caches. :func:`load_manifest` checks every
artefact and the data before building anything, and names the one that is missing or has changed.
"""

from __future__ import annotations

import hashlib
import os

from recbole_mm.errors import CheckpointError

MANIFEST_FORMAT = "recbole-mm-manifest"
MANIFEST_VERSION = 1
# settings that are paths: stored absolute, so that the run reloads from any working folder
PATH_KEYS = ("data_path", "checkpoint_dir", "artifacts_dir", "embedding_cache_dir", "description_dir",
             "retriever_checkpoint")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_listing(path: str) -> dict:
    """Relative name -> size of every file under ``path`` (a model folder: weights, tokenizer, ...)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if name.startswith(".") or name.endswith(".part"):
                continue
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return dict(sorted(out.items()))


# folders up to this size (a LoRA adapter, the small local backbone) also get a content digest
FOLDER_DIGEST_MAX_BYTES = 64 * 2 ** 20


def folder_sha256(path: str) -> str:
    """SHA-256 over the names and contents of the files of ``folder_listing(path)``."""
    digest = hashlib.sha256()
    for name in folder_listing(path):
        digest.update(name.encode("utf-8") + b"\0" + file_sha256(os.path.join(path, name)).encode("ascii"))
    return digest.hexdigest()


def artefact_entry(path: str) -> dict:
    """What a manifest stores about one artefact: absolute path, kind and digest (a folder: its file
    list and sizes, and the SHA-256 of its contents when it is small, as a LoRA adapter)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        files = folder_listing(path)
        entry = {"path": path, "kind": "folder", "files": files}
        if sum(files.values()) <= FOLDER_DIGEST_MAX_BYTES:
            entry["sha256"] = folder_sha256(path)
        return entry
    return {"path": path, "kind": "file", "size": os.path.getsize(path), "sha256": file_sha256(path)}


def run_artefacts(result: dict, trainer, model) -> dict[str, str]:
    """Role -> path of everything a trained run's model is rebuilt from."""
    roles: dict[str, str] = {}
    checkpoint = result.get("saved_model_file")
    if checkpoint and os.path.isfile(checkpoint):
        roles["checkpoint"] = checkpoint
    for role, path in (getattr(trainer, "artifacts", None) or {}).items():  # PRIME's stage files
        roles[role] = path
    ranker = getattr(model, "ranker", None)
    if ranker is not None:  # a local backbone folder (PRIME's 'small' model): part of the model
        peft_config = getattr(ranker.model, "peft_config", {}).get("default")
        base = getattr(peft_config, "base_model_name_or_path", None)
        if base and os.path.isdir(base):
            roles["ranker_backbone"] = base
    for kind in ("text", "image"):  # VLM4Rec's item vectors
        cache = ((getattr(model, "build_info", None) or {}).get(kind) or {}).get("cache")
        if cache and os.path.isfile(cache):
            roles[f"{kind}_embeddings"] = cache
    return roles


def write_manifest(config, result: dict, trainer, model) -> str:
    """Write the run's manifest next to its checkpoints; returns its path."""
    from recbole_mm.files import dataset_fingerprint
    from recbole_mm.trainer.checkpoint import atomic_save, plain_config
    from recbole_mm.trainer.mixin import checkpoint_name

    folder = config["checkpoint_dir"] or "saved"
    os.makedirs(folder, exist_ok=True)
    path = os.path.abspath(os.path.join(folder, checkpoint_name(config["model"])[:-len(".pth")] + ".manifest.pth"))
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "model": config["model"], "dataset": config["dataset"],
        "config": plain_config(config), "external_config": _absolute_paths(plain_config(config, external_only=True), config),
        "dataset_fingerprint": dataset_fingerprint(config),
        "artifacts": {role: artefact_entry(p) for role, p in run_artefacts(result, trainer, model).items()},
        "test_result": {k: float(v) for k, v in (result.get("test_result") or {}).items()},
    }
    atomic_save(manifest, path)
    return path


def _absolute_paths(settings: dict, config) -> dict:
    """``settings`` with every path setting of the run (set or default) made absolute."""
    for key in PATH_KEYS:
        value = config[key] if key in config else None
        if key == "data_path" and value:  # RecBole appends the dataset's name to the folder given
            value = os.path.dirname(os.path.normpath(value))
        if key in ("embedding_cache_dir", "description_dir") and key in config and not value:
            from recbole_mm.paths import description_dir, embedding_cache_dir

            # the defaults lie under this run's working folder: record where this run found them
            value = str(embedding_cache_dir(config) if key == "embedding_cache_dir"
                        else description_dir(config, config["description_tag"]))
        if isinstance(value, str) and value:
            settings[key] = os.path.abspath(value)
    return settings


def is_manifest(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == MANIFEST_FORMAT


def check_manifest(manifest: dict, path: str) -> None:
    """Every artefact exists and is unchanged, and the dataset files are those of the run; else a
    one-line :class:`CheckpointError` naming the first that is not."""
    for role, entry in manifest["artifacts"].items():
        where = entry["path"]
        if entry["kind"] == "folder":
            if not os.path.isdir(where):
                raise CheckpointError(f"model file {path}: its {role} folder {where} is missing; restore it or "
                                      f"re-run the training that wrote {path}")
            if folder_listing(where) != entry["files"]:
                raise CheckpointError(f"model file {path}: its {role} folder {where} has changed since the run "
                                      f"(other files or sizes); restore it or re-run the training")
            if "sha256" in entry and folder_sha256(where) != entry["sha256"]:  # manifests before issue 13: none
                raise CheckpointError(f"model file {path}: its {role} folder {where} has changed since the run "
                                      f"(SHA-256 of its files differs), so it is not the model that was evaluated; "
                                      f"restore it or re-run the training")
            continue
        if not os.path.isfile(where):
            raise CheckpointError(f"model file {path}: its {role} file {where} is missing; restore it or re-run "
                                  f"the training that wrote {path}")
        if os.path.getsize(where) != entry["size"] or file_sha256(where) != entry["sha256"]:
            raise CheckpointError(f"model file {path}: its {role} file {where} has changed since the run "
                                  f"(SHA-256 differs), so it is not the model that was evaluated; restore it "
                                  f"or re-run the training")


def check_dataset(manifest: dict, config, path: str) -> None:
    """The dataset files have the names and sizes they had in the run (modification times are not
    compared: a copied dataset is the same data)."""
    from recbole_mm.files import dataset_fingerprint

    then = manifest["dataset_fingerprint"]["files"]
    now = dataset_fingerprint(config)["files"]
    for name in sorted(set(then) | set(now)):
        if name not in now:
            raise CheckpointError(f"model file {path}: dataset file {name} of the run is missing from "
                                  f"{config['data_path']}; point --data_path at the run's dataset")
        if name not in then:
            continue  # a file added later (e.g. a description cache) does not change what was trained on
        if now[name][0] != then[name][0]:
            raise CheckpointError(f"model file {path}: dataset file {os.path.join(config['data_path'], name)} "
                                  f"has changed since the run ({then[name][0]} -> {now[name][0]} bytes); "
                                  f"use the run's data or retrain")


def load_manifest(model_file: str, manifest: dict):
    """``(config, model, dataset, train_data, valid_data, test_data)`` of the run that wrote ``manifest``."""
    from recbole_mm.config import Config
    from recbole_mm.trainer.checkpoint import checkpoint_entries, load_model_state, safe_load
    from recbole_mm.utils import get_trainer, rebuild_data_and_model

    check_manifest(manifest, model_file)
    config = Config(model=manifest["model"], dataset=manifest["dataset"], config_dict=manifest["external_config"])
    check_dataset(manifest, config, model_file)
    model, dataset, train_data, valid_data, test_data = rebuild_data_and_model(config)
    arts = {role: entry["path"] for role, entry in manifest["artifacts"].items()}
    if "checkpoint" in arts:
        checkpoint = checkpoint_entries(safe_load(arts["checkpoint"], map_location="cpu"), arts["checkpoint"])
        load_model_state(model, checkpoint["state_dict"], arts["checkpoint"], manifest["dataset"], config["dataset"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
    retriever = arts.get("retriever_refined") or arts.get("retriever")
    if retriever:  # PRIME: the retriever's final weights, then the ranker with its adapter
        load_model_state(model.retriever, safe_load(retriever, map_location="cpu"), retriever)
    if "ranker_adapter" in arts:
        from recbole_mm.trainer.ranker_training import load_adapter

        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        ranker = trainer.build_ranker(train_data._dataset)
        adapter = arts["ranker_adapter"]
        if os.path.isfile(adapter):  # manifests before issue 13: adapter.pth, with peft's folder beside it
            adapter = arts.get("ranker_adapter_peft") or os.path.join(os.path.dirname(adapter), "adapter")
        load_adapter(ranker.model, adapter)  # peft's folder (adapter_config.json + safetensors)
        ranker.model.eval()
        model.ranker = ranker
    built = getattr(model, "build_info", None) or {}
    for kind in ("text", "image"):
        if f"{kind}_embeddings" in arts and (built.get(kind) or {}).get("computed"):
            raise CheckpointError(f"model file {model_file}: the {kind} embeddings had to be recomputed for "
                                  f"{built[kind]['computed']} items (the encoder or item text differs from the "
                                  f"run's); use the run's settings and caches or retrain")
    model.eval()
    return config, model, dataset, train_data, valid_data, test_data
