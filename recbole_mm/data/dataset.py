"""Dataset classes: data that models read, built by the dataset (as RecBole-GNN builds its graphs).

:func:`~recbole_mm.data.preparation.create_dataset` picks, in this order, ``<Model>Dataset`` of this
module, :class:`MultimodalSequentialDataset` for the models that read the items' side data
(:func:`needs_multimodal_data`), else RecBole's choice.

:class:`MultimodalSequentialDataset` is RecBole's ``SequentialDataset`` plus

- ``item_store``: the :class:`~recbole_mm.data.item_store.ItemStore` of the dataset folder (raw item
  attributes, images inside the folder, resized to ``image_min_pixels`` .. ``image_max_pixels``),
  indexed by RecBole's internal item ids;
- ``item_vectors`` / ``item_vector_info``: when the model class has a ``build_item_vectors(config,
  item_store)`` hook (VLM4Rec: describer -> sentence embeddings, image embeddings), its vectors by
  kind (``{"text": [n_items, d]}``, row = internal item id) and the build statistics. The hook
  keeps its own caches (descriptions, ``.npz`` vectors), so a second dataset only reads them.

Both are built once, in ``__init__``, after RecBole has filtered and remapped the data. RecBole's
``build()`` (the train / valid / test split) and ``copy()`` copy the dataset object shallowly, so
every split and every data loader's ``_dataset`` shares the same store and vectors: nothing is built
or read again. Models take what they need from the dataset they are constructed with.
"""

from __future__ import annotations

import time
from logging import getLogger

from recbole.data.dataset import SequentialDataset
from recbole.utils import ModelType

from recbole_mm.data.item_store import ItemStore

logger = getLogger(__name__)

#: models that read the items' side data (attributes, images, item vectors) from their dataset;
#: a model class may also say so itself with ``multimodal_data = True``
MULTIMODAL_MODELS = ("PRIME", "VLM4Rec", "MLLM4Rec", "HaNoRec", "ALMOSTREC")


def needs_multimodal_data(config) -> bool:
    """Whether ``config``'s model gets a :class:`MultimodalSequentialDataset`: a sequential model named in
    :data:`MULTIMODAL_MODELS`, or whose class sets ``multimodal_data = True`` or has a
    ``build_item_vectors`` hook."""
    model_class = getattr(config, "model_class", None)
    wanted = (config["model"] in MULTIMODAL_MODELS or getattr(model_class, "multimodal_data", False)
              or callable(getattr(model_class, "build_item_vectors", None)))
    return bool(wanted) and config["MODEL_TYPE"] == ModelType.SEQUENTIAL


class MultimodalSequentialDataset(SequentialDataset):
    """RecBole's ``SequentialDataset`` that also owns the items' side data: ``item_store`` and, for a
    model with a ``build_item_vectors`` hook, ``item_vectors`` (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        started = time.perf_counter()
        self.item_store = ItemStore.from_recbole(config, self)
        store_s = time.perf_counter() - started
        self.item_vectors: dict = {}
        self.item_vector_info: dict = {}
        build = getattr(getattr(config, "model_class", None), "build_item_vectors", None)
        if callable(build):
            self.item_vectors, self.item_vector_info = build(config, self.item_store)
        shapes = {k: list(v.shape) for k, v in self.item_vectors.items()}
        logger.info(f"item store: {len(self.item_store.item_ids())} items from {self.item_store.source} "
                    f"({store_s:.2f} s); item vectors: {shapes or 'none'}")

    def __str__(self):
        vectors = ", ".join(f"{k} {v.shape[0]}x{v.shape[1]}" for k, v in self.item_vectors.items()) or "none"
        return f"{super().__str__()}\nItem side data: {self.item_store.source.name}; item vectors: {vectors}"
