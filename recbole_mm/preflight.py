"""Fail fast: resolve every stage's inputs before the first stage trains.

A PRIME run trains its retriever for minutes to hours before the ranker is loaded; a ranker model
that cannot be reached used to fail only then. :func:`preflight` checks, in seconds and before
anything is trained or written:

- the dataset's interaction file (or that RecBole will download the name itself);
- the item side file (``<name>.items.jsonl`` or RecBole's ``.item``) for models that read item
  content, and the images it names (``images/``: at least one must exist when any is named);
- every pretrained checkpoint a stage will load (PRIME's ``ranker_model``; VLM4Rec's
  ``text_encoder``, ``image_encoder`` and ``describer_model``): a local folder with ``config.json``
  or a hub id whose config resolves (only the small config file is fetched);
- PRIME's ``retriever_checkpoint`` file;
- the folders the run writes (``checkpoint_dir``, ``artifacts_dir``, caches) are writable and none
  lies inside an installed package.

Every failure is one line naming the key, the value and what to do.
"""

from __future__ import annotations

import json
import os
from logging import getLogger
from pathlib import Path

from recbole_mm.errors import ConfigError

logger = getLogger(__name__)

CONTENT_MODELS = ("PRIME", "MLLM4Rec", "VLM4Rec")


class PreflightError(ConfigError):
    """An input of a later stage is missing or unreachable; raised before anything trains."""


class CheckpointUnreachable(OSError, PreflightError):
    """A pretrained checkpoint is neither a local folder nor reachable (an ``OSError``, as the loaders raise)."""


def check_pretrained(name: str | None, key: str, trust_remote_code: bool = False) -> None:
    """``name`` (config key ``key``) is ``small``, a local checkpoint folder, or a hub id whose config loads."""
    if name in (None, "", "small"):
        return
    from recbole_mm.lmm.gguf import check_gguf_package, is_gguf_name, resolve_gguf

    if is_gguf_name(name):  # 'smollm2' or a .gguf file: the file and its reader, no hub
        resolve_gguf(str(name))
        check_gguf_package()
        return
    from recbole_mm.lmm.sentence_encoder import EncoderLoadError, pretrained_location, resolve_text_encoder

    if key == "text_encoder":
        name = resolve_text_encoder(name)
    try:
        path, kwargs, local = pretrained_location(str(name), key, trust_remote_code)
    except EncoderLoadError:
        raise CheckpointUnreachable(
            f"{key}: local checkpoint directory {name!r} was not found; point {key} at a folder with config.json "
            f"and the weights (save_pretrained layout), at a hub id, or use {key}: small (random weights)") from None
    if local:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointUnreachable(f"{key}: local checkpoint directory {name!r} has no config.json; point {key} "
                                        f"at a checkpoint folder (save_pretrained layout) or a hub id")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointUnreachable(
            f"{key}: {name!r} is neither a local folder nor reachable on the Hugging Face hub ({first}); "
            f"download it beforehand (`huggingface-cli download {name}`) and point {key} at the folder, "
            f"or use {key}: small (no download, random weights)") from None


def check_side_file(config) -> None:
    """The item side file exists; when it names images, the images folder holds at least one of them."""
    folder = Path(config["data_path"])
    name = config["dataset"]
    side, atomic = folder / f"{name}.items.jsonl", folder / f"{name}.item"
    if not side.is_file():
        if atomic.is_file():
            return
        raise PreflightError(f"{config['model']} reads item content, but {side} (and {atomic}) does not exist; "
                             f"prepare the dataset with `recbole-mm-data prepare` or `convert-amazon`")
    named = found = 0
    with open(side, encoding="utf-8") as f:
        for line in f:
            if '"image"' not in line:
                continue
            try:
                image = json.loads(line).get("image")
            except (ValueError, AttributeError):
                continue  # the item store reports bad lines with their row
            if isinstance(image, str) and image:
                named += 1
                found += (folder / image).is_file()
    if named and not found:
        raise PreflightError(f"{side} names {named} images but none exists under {folder}; download them with "
                             f"`recbole-mm-data download-images --dataset {folder}`")
    if named and found < named:
        logger.warning(f"[preflight] {named - found} of {named} images named in {side} are missing: "
                            f"those items have no image")


def check_caption_source(config) -> None:
    """MLLM4Rec's ``caption_source`` can be met before anything trains: ``generated`` needs the
    describer's ``captions`` cache, an item field must be a key of at least one item's side record."""
    from recbole_mm.paths import description_dir

    source, name, folder = config["caption_source"], config["dataset"], Path(config["data_path"])
    if source in (None, "", "none"):
        return
    if source == "generated":
        cache = Path(description_dir(config, "captions")) / f"{name}.captions.jsonl"
        if not cache.is_file() or cache.stat().st_size == 0:
            raise PreflightError(f"caption_source=generated, but there is no caption cache at {cache}; write it with "
                                 f"`python -m recbole_mm.lmm.describer --dataset={name} --data_path={folder} "
                                 f"--tag=captions`, or use caption_source: none or an item field")
        return
    side = folder / f"{name}.items.jsonl"
    if not side.is_file():
        return  # check_side_file names what is missing; the atomic .item file is checked when loaded
    key = f'"{source}"'
    with open(side, encoding="utf-8") as f:
        if any(key in line for line in f):
            return
    raise PreflightError(f"caption_source={source!r}: no item of {side} has a {source!r} field; choose an "
                         f"existing field, generated (the describer's captions) or none")


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """``folder`` (config key ``key``) can be created and written, and is not inside an installed package."""
    from recbole_mm.paths import inside_installed_package

    folder = Path(folder)
    if inside_installed_package(folder):
        raise PreflightError(f"{key}={folder} lies inside an installed package; set {key} to a folder of your own")
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"{key}={folder} cannot be written ({probe} is not a writable folder); "
                             f"choose another folder or fix its permissions")


def _description_cache_complete(config) -> bool:
    from recbole_mm.paths import description_dir

    meta = Path(description_dir(config, config["description_tag"])) / f"{config['dataset']}.{config['description_tag']}.meta.json"
    try:
        return bool(json.loads(meta.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def preflight(config) -> list[str]:
    """Run every check that applies to ``config``; return what was checked (raises :class:`PreflightError`)."""
    from recbole_mm.data.preparation import check_dataset_files

    checked = []
    try:
        check_dataset_files(config)
    except FileNotFoundError as e:
        raise PreflightError(str(e)) from None
    checked.append("dataset")
    model = config["model"]
    check_writable(config["checkpoint_dir"], "checkpoint_dir")
    checked.append("checkpoint_dir")
    trust = bool(config["trust_remote_code"]) if "trust_remote_code" in config else False
    if model in CONTENT_MODELS:
        check_writable(config["artifacts_dir"], "artifacts_dir")
        if config["dataset"] != "ml-100k" or os.path.isfile(os.path.join(config["data_path"], "ml-100k.inter")):
            check_side_file(config)
            checked.append("side file")
    if model in ("PRIME", "MLLM4Rec"):  # the same two first stages
        ckpt = config["retriever_checkpoint"]
        if ckpt and not os.path.isfile(ckpt):
            raise PreflightError(f"retriever_checkpoint={ckpt} does not exist; give the .pth file a previous run "
                                 f"saved (saved_model_file), or leave it unset to train the retriever")
        if config["ranker_model"] != "small":
            check_pretrained(config["ranker_model"], "ranker_model", trust)
        checked += ["artifacts_dir", "ranker_model"]
        if model == "MLLM4Rec":
            check_caption_source(config)
            checked.append("caption_source")
    elif model == "VLM4Rec":
        from recbole_mm.paths import embedding_cache_dir

        check_writable(embedding_cache_dir(config), "embedding_cache_dir")
        fusion = config["fusion"]
        if fusion != "image":
            check_pretrained(config["text_encoder"], "text_encoder", trust)
            checked.append("text_encoder")
            if (config["text_source"] == "generated" and config["generate_descriptions"]
                    and not _description_cache_complete(config)):
                from recbole_mm.paths import description_dir

                check_writable(description_dir(config, config["description_tag"]), "description_dir")
                check_pretrained(config["describer_model"], "describer_model", trust)
                checked.append("describer_model")
        if fusion != "text":
            if not config["image_encoder"]:
                raise PreflightError(f"fusion={fusion} needs image vectors: set image_encoder (a CLIP/SigLIP hub id "
                                     f"or folder, or small), or use fusion: text")
            check_pretrained(config["image_encoder"], "image_encoder", trust)
            checked.append("image_encoder")
    return checked
