"""Converter for the original Amazon 2014 product data (McAuley et al.) to a multimodal atomic dataset.

Inputs (https://jmcauley.ucsd.edu/data/amazon/ 2014 release):

- interactions: ``reviews_<Category>_5.json.gz`` (one JSON object per line with ``reviewerID``,
  ``asin``, ``overall``, ``unixReviewTime``) or ``ratings_<Category>.csv`` (``user,item,rating,
  timestamp``, no header); plain or gzip-compressed;
- metadata: ``meta_<Category>.json.gz``: one *Python dict literal* per line (single quotes), parsed
  with :func:`ast.literal_eval` (never ``eval``), fields ``asin``, ``title``, ``price``, ``brand``,
  ``categories`` (list of category paths), ``imUrl``, ``description``.

Output ``<out>/<name>/``: ``<name>.inter`` (``user_id, item_id, rating, timestamp``; iterative
5-core; each user's rows in chronological order, ties kept in file order), ``<name>.item``,
``<name>.items.jsonl`` (raw ``title``, ``price``, ``brand``, ``categories`` flattened as
``"Beauty > Makeup > Eyes"`` with several paths joined by ``" | "``, ``description``, ``imUrl``)
and ``<name>.meta.json``. Images are fetched afterwards with :mod:`recbole_mm.data.images`.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from recbole_mm.data.atomic import DataFormatError, decode_utf8, write_atomic, write_json, write_jsonl


def kcore_filter(pairs: Sequence[tuple[object, object]], user_k: int = 5, item_k: int = 5) -> list[bool]:
    """Iterative k-core: mask of the ``(user, item)`` pairs kept once every remaining user has at
    least ``user_k`` and every remaining item at least ``item_k`` pairs (repeated until stable)."""
    keep = [True] * len(pairs)
    while True:
        uc = Counter(u for (u, _), k in zip(pairs, keep) if k)
        ic = Counter(i for (_, i), k in zip(pairs, keep) if k)
        changed = False
        for n, (u, i) in enumerate(pairs):
            if keep[n] and (uc[u] < user_k or ic[i] < item_k):
                keep[n] = False
                changed = True
        if not changed:
            return keep


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a plain or gzip file; bytes must be UTF-8 (clear error if not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                text = decode_utf8(raw, file=path, row=i).strip()
                if text:
                    yield i, text
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataFormatError("file not found", file=path) from None
        raise DataFormatError(f"cannot read file ({e})", file=path,
                              hint="check that the file is complete (re-download it)") from None


def read_reviews(path: str | os.PathLike) -> list[tuple[str, str, float | None, int]]:
    """``(user, item, rating, unix_time)`` rows from a reviews JSON-lines or a ratings CSV file."""
    path = Path(path)
    rows = []
    is_csv = ".csv" in path.suffixes
    for i, line in _open_lines(path):
        if is_csv:
            parts = line.split(",")
            if len(parts) != 4:
                raise DataFormatError(f"expected 4 comma-separated values user,item,rating,timestamp, "
                                      f"got {len(parts)}", file=path, row=i, value=line)
            user, item, rating, ts = parts
            field = None
            try:
                field = "rating"
                r = float(rating)
                field = "timestamp"
                t = int(float(ts))
            except ValueError:
                raise DataFormatError("not a number", file=path, row=i, field=field,
                                      value=rating if field == "rating" else ts) from None
        else:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"not valid JSON ({e.msg})", file=path, row=i, value=line,
                                      hint="each line must be one JSON review") from None
            if not isinstance(rec, dict):
                raise DataFormatError("not a JSON object", file=path, row=i, value=line)
            for key in ("reviewerID", "asin", "unixReviewTime"):
                if rec.get(key) in (None, ""):
                    raise DataFormatError("missing field", file=path, row=i, field=key, value=line)
            user, item = str(rec["reviewerID"]), str(rec["asin"])
            try:
                t = int(rec["unixReviewTime"])
            except (TypeError, ValueError):
                raise DataFormatError("not an integer Unix time", file=path, row=i, field="unixReviewTime",
                                      value=rec["unixReviewTime"]) from None
            r = rec.get("overall")
            try:
                r = None if r is None else float(r)
            except (TypeError, ValueError):
                raise DataFormatError("not a number", file=path, row=i, field="overall", value=r) from None
        if not user.strip() or not item.strip():
            raise DataFormatError("empty user or item id", file=path, row=i, value=line)
        rows.append((user.strip(), item.strip(), r, t))
    return rows


def flatten_categories(categories: object) -> str | None:
    """``[['Beauty', 'Makeup', 'Eyes'], ['Beauty', 'Tools']]`` -> ``'Beauty > Makeup > Eyes | Beauty > Tools'``."""
    if not categories:
        return None
    if isinstance(categories, str):
        return categories
    paths = []
    for p in categories:
        if isinstance(p, (list, tuple)):
            s = " > ".join(str(c) for c in p if str(c).strip())
        else:
            s = str(p)
        if s and s not in paths:
            paths.append(s)
    return " | ".join(paths) or None


def read_meta(path: str | os.PathLike, wanted: set[str] | None = None) -> dict[str, dict]:
    """ASIN -> raw attributes from a ``meta_<Category>.json.gz`` file (Python literals or JSON)."""
    path = Path(path)
    out: dict[str, dict] = {}
    for i, line in _open_lines(path):
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataFormatError("not a Python dict literal or JSON object", file=path, row=i,
                                      value=line, hint="each line must hold one product") from None
        if not isinstance(rec, dict):
            raise DataFormatError("not a dict", file=path, row=i, value=line)
        asin = rec.get("asin")
        if not asin:
            raise DataFormatError("missing field", file=path, row=i, field="asin", value=line)
        if wanted is not None and asin not in wanted:
            continue
        item: dict = {}
        if rec.get("title"):
            item["title"] = str(rec["title"])
        price = rec.get("price")
        if price not in (None, ""):
            try:
                p = float(price)
            except (TypeError, ValueError):
                raise DataFormatError("price is not a number", file=path, row=i, field="price",
                                      value=price) from None
            if math.isfinite(p):
                item["price"] = p
        if rec.get("brand"):
            item["brand"] = str(rec["brand"])
        cats = flatten_categories(rec.get("categories"))
        if cats:
            item["categories"] = cats
        if rec.get("description"):
            item["description"] = str(rec["description"])
        if rec.get("imUrl"):
            item["imUrl"] = str(rec["imUrl"])
        out[str(asin)] = item
    return out


def convert_amazon(reviews: str | os.PathLike, meta: str | os.PathLike, name: str,
                   out: str | os.PathLike = "dataset", user_k: int = 5, item_k: int = 5) -> Path:
    """Convert one Amazon 2014 category; return the dataset folder (see the module docstring)."""
    if name == "ml-100k" or not name or "/" in name or name.startswith("."):
        raise DataFormatError(f"bad dataset name '{name}'", hint="use a plain folder name such as 'beauty'")
    rows = read_reviews(reviews)
    if not rows:
        raise DataFormatError("no interactions", file=reviews)
    keep = kcore_filter([(u, i) for u, i, _, _ in rows], user_k, item_k)
    rows = [r for r, k in zip(rows, keep) if k]
    if not rows:
        raise DataFormatError(f"nothing is left after the {user_k}/{item_k}-core", file=reviews,
                              hint="use a larger file or smaller --user-k/--item-k")
    rows.sort(key=lambda r: (r[0], r[3]))  # stable: ties keep file order
    items = sorted({r[1] for r in rows})
    attrs = read_meta(meta, set(items))
    side, item_rows = [], []
    for asin in items:
        a = attrs.get(asin, {})
        side.append({"item_id": asin, **a})
        item_rows.append((asin, a.get("title"), a.get("price"), a.get("brand"), a.get("categories")))
    folder = Path(out) / name
    write_atomic(folder / f"{name}.inter",
                 [("user_id", "token"), ("item_id", "token"), ("rating", "float"), ("timestamp", "float")],
                 rows, required=["user_id", "item_id", "timestamp"], source=reviews)
    write_atomic(folder / f"{name}.item",
                 [("item_id", "token"), ("title", "token_seq"), ("price", "float"), ("brand", "token"),
                  ("categories", "token")], item_rows, required=["item_id"], source=meta)
    write_jsonl(folder / f"{name}.items.jsonl", side)
    write_json(folder / f"{name}.meta.json", {
        "name": name, "source": {"reviews": str(reviews), "meta": str(meta)},
        "filtering": f"iterative k-core: users >= {user_k}, items >= {item_k}",
        "n_users": len({r[0] for r in rows}), "n_items": len(items), "n_interactions": len(rows),
        "n_items_with_meta": sum(1 for a in items if a in attrs),
        "timestamp": "unixReviewTime (ties inside a user keep the file order)",
    })
    return folder
