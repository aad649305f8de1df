"""Item side information outside RecBole: internal item id -> raw attributes and image.

RecBole maps item tokens to internal ids (``dataset.field2id_token['item_id']``, index 0 is
``[PAD]``). :class:`ItemStore` reads the side file ``<name>.items.jsonl`` of the dataset folder
(one JSON object per item: ``item_id`` = the item token, raw attributes, ``image`` = a path
relative to the dataset folder) and serves, per internal id, the exact raw attribute text and the
image, loaded lazily, cached (LRU) and resized to a pixel budget.

Datasets without a side file (e.g. RecBole's bundled ``ml-100k``) fall back to the raw RecBole
atomic item file ``<name>.item`` of the same folder: its columns become attributes (header types
``name:type`` split off; ``movie_title`` / ``name`` -> ``title``, ``class`` / ``genre`` ->
``categories``, ``release_year`` -> ``year``, see :data:`ITEM_COLUMN_ALIASES`; other columns keep
their names), values are the exact cell text (``float`` columns become numbers), and there are no
images.

Images: a missing file means "no image" (``None``). A file that does not decode is reported once
(item token and file) and treated as missing. A path that leaves the dataset folder (``..``, an
absolute path, a symlink pointing outside) is refused: reported once, treated as missing.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

from recbole_mm.errors import ConfigError, DataFormatError
from recbole_mm.files import read_jsonl

logger = logging.getLogger(__name__)

#: longest side / shortest side of a served image; flatter images are padded (vision processors such
#: as Qwen2-VL's refuse ratios above 200, and a 6000x3 strip carries nothing at a few thousand pixels)
MAX_ASPECT_RATIO = 20
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 168 * 168
PAD_TOKEN = "[PAD]"

#: column name of a RecBole ``.item`` file (lower case, type removed) -> attribute name
ITEM_COLUMN_ALIASES = {
    "title": "title", "movie_title": "title", "item_title": "title", "name": "title", "item_name": "title",
    "product_name": "title", "book_title": "title",
    "categories": "categories", "category": "categories", "class": "categories", "genre": "categories",
    "genres": "categories", "item_category": "categories",
    "year": "year", "release_year": "year",
    "brand": "brand", "item_brand": "brand", "manufacturer": "brand",
    "price": "price", "item_price": "price", "sales_price": "price",
    "description": "description", "desc": "description", "item_description": "description",
}


def fit_pixels(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Size with the same aspect ratio whose area lies in ``[min_pixels, max_pixels]`` (as near as
    integer sides allow); unchanged when the area already lies there."""
    area = width * height
    if min_pixels <= area <= max_pixels:
        return width, height
    target = max_pixels if area > max_pixels else min_pixels
    scale = math.sqrt(target / area)
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    if area < min_pixels:  # rounding down may undershoot the minimum
        while w * h < min_pixels:
            w, h = (w + 1, h) if w / width <= h / height else (w, h + 1)
    return w, h


def _is_file(path: Path) -> bool:
    """``path.is_file()``, ``False`` for paths the OS cannot even look up (name too long, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


class ItemStore:
    """Raw attributes and images of a dataset's items, indexed by RecBole internal item id.

    Args:
        folder: the dataset folder ``<data_path>/<name>`` holding ``<name>.items.jsonl``.
        item_tokens: the token of each internal id (``dataset.field2id_token['item_id']``).
        min_pixels, max_pixels: pixel budget of served images (aspect ratio kept).
        cache_size: number of resized images kept in memory.
        extra_side_files: tags of further JSON-lines side files ``<name>.<tag>.jsonl`` (e.g.
            generated ``captions``) whose fields are merged into the attributes when present;
            the original attributes win on a clash.
        item_id_field, field_separator, encoding: how to read the RecBole ``<name>.item`` file,
            used only when there is no side file (:meth:`from_recbole` takes them from the config).
    """

    def __init__(self, folder: str | os.PathLike, item_tokens: Sequence[str], *,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 cache_size: int = 4096, extra_side_files: Iterable[str] = ("captions",),
                 item_id_field: str = "item_id", field_separator: str = "\t", encoding: str = "utf-8"):
        if not 1 <= min_pixels <= max_pixels:
            raise ConfigError(f"need 1 <= min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.folder = Path(folder)
        self.name = self.folder.name
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.cache_size = int(cache_size)
        side = self.folder / f"{self.name}.items.jsonl"
        atomic = self.folder / f"{self.name}.item"
        if not side.is_file() and not atomic.is_file():
            raise DataFormatError("side file not found", file=side,
                                  hint="prepare the dataset with recbole-mm-data (it writes <name>.items.jsonl), "
                                       f"or provide a RecBole item file {atomic.name}")
        self.tokens = [str(t) for t in item_tokens]
        index = {t: i for i, t in enumerate(self.tokens)}
        self._attrs: list[dict | None] = [None] * len(self.tokens)
        self._image_rel: list[str | None] = [None] * len(self.tokens)
        #: where the attributes come from: the side file, or the RecBole ``.item`` file (no images)
        self.source = side if side.is_file() else atomic
        records = (read_jsonl(side) if side.is_file()
                   else read_atomic_items(atomic, item_id_field, field_separator=field_separator, encoding=encoding))
        for row, rec in enumerate(records, start=1):
            token = rec.get("item_id")
            if token is None:
                raise DataFormatError("record without 'item_id'", file=side, row=row, value=rec)
            i = index.get(str(token))
            if i is None:  # item filtered out by RecBole
                continue
            image = rec.pop("image", None)
            if image is not None and not isinstance(image, str):
                raise DataFormatError("'image' must be a path string", file=side, row=row,
                                      field="image", value=image)
            rec.pop("item_id")
            self._attrs[i] = rec
            self._image_rel[i] = image or None
        for tag in extra_side_files:
            path = self.folder / f"{self.name}.{tag}.jsonl"
            if not path.is_file():
                continue
            for rec in read_jsonl(path):
                i = index.get(str(rec.get("item_id")))
                if i is None or i == 0 and self.tokens[0] == PAD_TOKEN:
                    continue
                base = self._attrs[i] if self._attrs[i] is not None else {}
                self._attrs[i] = {**{k: v for k, v in rec.items() if k != "item_id"}, **base}
        self._root = self.folder.resolve()
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._bad: set[int] = set()
        self._padded: set[int] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # a dataset that owns the store is pickled by RecBole's save_dataset / save_dataloaders and by
        # DataLoader workers started with spawn: the lock cannot be pickled, the image cache need not be
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def from_recbole(cls, config: Any, dataset: Any, **kwargs: Any) -> "ItemStore":
        """Store for a RecBole ``Config`` + ``Dataset`` pair (folder = ``config['data_path']``).

        The pixel budget is read from the config keys ``image_min_pixels`` / ``image_max_pixels``
        when set; keyword arguments win over the config.
        """
        for key, arg in (("image_min_pixels", "min_pixels"), ("image_max_pixels", "max_pixels")):
            value = config[key] if key in config else None
            if value is not None:
                kwargs.setdefault(arg, int(value))
        field = config["ITEM_ID_FIELD"] or "item_id"
        kwargs.setdefault("item_id_field", field)
        for key in ("field_separator", "encoding"):
            value = config[key] if key in config else None
            if value:
                kwargs.setdefault(key, value)
        return cls(config["data_path"], list(dataset.field2id_token[field]), **kwargs)

    def __len__(self) -> int:
        return len(self.tokens)

    def _index(self, item_id: Any) -> int:
        i = int(item_id)
        if not 0 <= i < len(self.tokens):
            raise IndexError(f"item id {i} out of range 0..{len(self.tokens) - 1}")
        return i

    def item_ids(self) -> range:
        """The internal ids of the real items (every id but RecBole's ``[PAD]`` at 0)."""
        return range(1 if self.tokens and self.tokens[0] == PAD_TOKEN else 0, len(self.tokens))

    def token(self, item_id: Any) -> str:
        """The original item token of an internal id."""
        return self.tokens[self._index(item_id)]

    def attributes(self, item_id: Any) -> dict:
        """The raw attributes (exact text from the side file), ``{}`` for ``[PAD]`` / unknown items."""
        a = self._attrs[self._index(item_id)]
        return dict(a) if a else {}

    def get(self, item_id: Any, key: str, default: Any = None) -> Any:
        """One raw attribute of an item, or ``default``."""
        a = self._attrs[self._index(item_id)]
        return a.get(key, default) if a else default

    def image_path(self, item_id: Any) -> Path | None:
        """The item's image file inside the dataset folder, or ``None`` (no image / refused path)."""
        i = self._index(item_id)
        rel = self._image_rel[i]
        if rel is None:
            return None
        if os.path.isabs(rel) or Path(rel).drive:
            self._report(i, rel, "absolute image path refused (must be relative to the dataset folder)")
            return None
        try:
            path = (self.folder / rel).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # symlink loop, NUL byte, over-long name
            self._report(i, rel[:200], f"unusable image path, treated as missing ({type(e).__name__}: {str(e)[:120]})")
            return None
        if not path.is_relative_to(self._root):
            self._report(i, rel, "image path outside the dataset folder refused")
            return None
        return path

    def has_image(self, item_id: Any) -> bool:
        """Whether the item has an image file that exists (does not decode it)."""
        p = self.image_path(item_id)
        return p is not None and _is_file(p)

    def image(self, item_id: Any):
        """The item's image as an RGB ``PIL.Image`` resized to the pixel budget, or ``None``."""
        i = self._index(item_id)
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                img = self._cache[i]
                return None if img is None else img.copy()
            if i in self._bad:
                return None
        img = self._load(i)
        with self._lock:
            if img is None:
                self._bad.add(i)
                return None
            self._cache[i] = img
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return img.copy()

    def images(self, item_ids: Iterable[Any]) -> list:
        """:meth:`image` for each id (``None`` where there is no usable image)."""
        return [self.image(i) for i in item_ids]

    def _load(self, i: int):
        path = self.image_path(i)
        if path is None:
            return None
        if not _is_file(path):
            self._report(i, self._image_rel[i][:200], "image file not found, treated as missing", level=logging.INFO)
            return None
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
                img = im.convert("RGB")
        except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ...)
            self._report(i, self._image_rel[i], f"corrupt image, treated as missing ({type(e).__name__}: {e})")
            return None
        img = self._pad_flat(i, img)
        size = fit_pixels(img.width, img.height, self.min_pixels, self.max_pixels)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        return img

    def _pad_flat(self, i: int, img):
        """``img`` centred on a black canvas whose aspect ratio is at most :data:`MAX_ASPECT_RATIO`
        (logged once per item); other images unchanged."""
        w, h = img.size
        if max(w, h) <= MAX_ASPECT_RATIO * min(w, h):
            return img
        from PIL import Image

        size = (w, math.ceil(w / MAX_ASPECT_RATIO)) if w > h else (math.ceil(h / MAX_ASPECT_RATIO), h)
        canvas = Image.new("RGB", size)
        canvas.paste(img, ((size[0] - w) // 2, (size[1] - h) // 2))
        with self._lock:
            first = i not in self._padded
            self._padded.add(i)
        if first:
            logger.warning("item %s (id %d): image of %dx%d pixels (aspect ratio above %d) padded to %dx%d: %s",
                           self.tokens[i], i, w, h, MAX_ASPECT_RATIO, size[0], size[1], self._image_rel[i])
        return canvas

    def _report(self, i: int, rel: str | None, what: str, level: int = logging.WARNING) -> None:
        with self._lock:
            if i in self._bad:
                return
            self._bad.add(i)
        logger.log(level, "item %s (id %d): %s: %s", self.tokens[i], i, what, rel)

    def embeddings(self, tag: str):
        """Precomputed item vectors from ``<name>.<tag>.npz`` (arrays ``item_id``: tokens and
        ``embedding``: ``[n, dim]``), aligned to internal ids: ``(matrix [len(self), dim] float32,
        mask [len(self)] bool)``; rows of items without a vector are zero and ``False`` in the mask."""
        import numpy as np

        path = self.folder / f"{self.name}.{tag}.npz"
        if not path.is_file():
            raise DataFormatError("embedding file not found", file=path,
                                  hint="write arrays 'item_id' and 'embedding' with numpy.savez")
        with np.load(path, allow_pickle=False) as z:
            if "item_id" not in z or "embedding" not in z:
                raise DataFormatError("needs arrays 'item_id' and 'embedding'", file=path, value=list(z.keys()))
            ids, emb = z["item_id"], z["embedding"]
        if emb.ndim != 2 or len(ids) != len(emb):
            raise DataFormatError(f"'embedding' must be [len(item_id), dim], got {emb.shape} for "
                                  f"{len(ids)} ids", file=path)
        index = {t: i for i, t in enumerate(self.tokens)}
        out = np.zeros((len(self.tokens), emb.shape[1]), dtype=np.float32)
        mask = np.zeros(len(self.tokens), dtype=bool)
        for token, vec in zip(ids, emb):
            i = index.get(str(token))
            if i is not None and not (i == 0 and self.tokens[0] == PAD_TOKEN):
                out[i], mask[i] = vec, True
        return out, mask

    def stats(self) -> dict:
        """Counts: items, items with attributes, items whose image file exists."""
        ids = self.item_ids()
        return {"items": len(ids), "with_attributes": sum(1 for i in ids if self._attrs[i]),
                "with_image_file": sum(1 for i in ids if self.has_image(i))}


def read_atomic_items(path: str | os.PathLike, item_id_field: str = "item_id", *, field_separator: str = "\t",
                      encoding: str = "utf-8") -> Iterable[dict]:
    """Records ``{"item_id": token, <attribute>: raw text, ...}`` of a RecBole ``.item`` atomic file.

    The file is read the way RecBole reads it (pandas, same separator, encoding and quoting) so that
    the tokens match RecBole's; header types are split off (``movie_title:token_seq`` ->
    ``movie_title``) and columns renamed by :data:`ITEM_COLUMN_ALIASES` (the first column to claim a
    name gets it; a later one keeps its own name). Cells keep their exact text (``token_seq`` values
    are not split); ``float`` cells become numbers; empty cells are dropped.
    """
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, delimiter=field_separator, dtype=str, keep_default_na=False, na_filter=False,
                            encoding=encoding, engine="python")
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataFormatError(f"cannot read the RecBole item file ({type(e).__name__}: {e})", file=path,
                              hint=f"it must be '{field_separator}'-separated text in {encoding}") from None
    columns = [str(c) for c in table.columns]
    names = [c.split(":", 1)[0] for c in columns]
    types = [c.split(":", 1)[1] if ":" in c else "token" for c in columns]
    if item_id_field in names:
        id_col = names.index(item_id_field)
    elif names:
        id_col = 0
        logger.warning("%s: no column named %r, using the first column %r as the item token",
                       path, item_id_field, names[0])
    else:
        raise DataFormatError("item file without columns", file=path)
    targets: dict[int, str] = {}
    taken = {"item_id", "image"}
    for j, name in enumerate(names):  # aliases first, so that an exact 'title' column beats 'name'
        if j == id_col:
            continue
        alias = ITEM_COLUMN_ALIASES.get(name.lower())
        if alias is not None and alias not in taken and (alias == name.lower() or alias not in names):
            targets[j] = alias
            taken.add(alias)
    for j, name in enumerate(names):
        if j != id_col and j not in targets:
            key = name if name not in taken else f"{name}_{j}"
            targets[j] = key
            taken.add(key)
    values = table.to_numpy(dtype=object)
    for row in values:
        rec: dict[str, Any] = {"item_id": str(row[id_col])}
        for j, key in targets.items():
            cell = row[j]
            if cell is None or cell == "":
                continue
            if types[j] == "float":
                try:
                    cell = float(cell)
                except ValueError:
                    pass
                else:
                    if not math.isfinite(cell):
                        continue
            rec[key] = cell
        yield rec
