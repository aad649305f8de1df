"""Model classes by name: recbole-mm's first, then RecBole's (imported on demand)."""

from __future__ import annotations

import difflib
import importlib
import os

from recbole_mm.errors import ConfigError, UserError

# name -> module that defines the class of that name. Modules are imported on demand so that
# heavy dependencies stay behind the models that need them.
MODELS = {
    "ALMOSTREC": "recbole_mm.model.almostrec",
    "HaNoRec": "recbole_mm.model.hanorec",
    "LRURec": "recbole_mm.model.lrurec",
    "MLLM4Rec": "recbole_mm.model.mllm4rec",
    "PRIME": "recbole_mm.model.prime",
    "VLM4Rec": "recbole_mm.model.vlm4rec",
}


_RECBOLE_SUBMODULES = (
    "sequential_recommender",
    "general_recommender",
    "context_aware_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


def recbole_model_names() -> list[str]:
    """Names of RecBole's built-in models (from its shipped property files, no imports)."""
    import recbole

    folder = os.path.join(os.path.dirname(recbole.__file__), "properties", "model")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def get_model(model_name: str):
    """Return the model class called ``model_name``: recbole-mm's first, then RecBole's."""
    if model_name in MODELS:
        return getattr(importlib.import_module(MODELS[model_name]), model_name)
    import recbole

    model_dir = os.path.join(os.path.dirname(recbole.__file__), "model")
    for sub in _RECBOLE_SUBMODULES:
        if not os.path.isfile(os.path.join(model_dir, sub, f"{model_name.lower()}.py")):
            continue
        try:
            module = importlib.import_module(f"recbole.model.{sub}.{model_name.lower()}")
        except ModuleNotFoundError as err:
            raise UserError(f"RecBole model {model_name} needs the package {err.name!r}: "
                              f"pip install {err.name}") from None
        if hasattr(module, model_name):
            return getattr(module, model_name)
    known = sorted(MODELS) + recbole_model_names()
    close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"Unknown model {model_name!r}.{hint}\n"
        f"recbole-mm models: {', '.join(sorted(MODELS))}\n"
        f"RecBole models: {', '.join(recbole_model_names())}")
