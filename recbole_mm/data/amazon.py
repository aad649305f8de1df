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
``<name>.items.jsonl`` (``item_id`` = the token RecBole reads, ``raw_item_id`` where sanitising
changed the ASIN, raw ``title``, ``price``, ``brand``, ``categories`` flattened as
``"Beauty > Makeup > Eyes"`` with several paths joined by ``" | "``, ``description``, ``imUrl``)
and ``<name>.meta.json``. Images are fetched afterwards with :mod:`recbole_mm.data.images`.

Exact duplicate interactions (same user, item, rating and time) are dropped before the k-core and
counted in ``meta.json`` (``duplicates_dropped``). A rating or price that is not a finite number
(``nan``, ``inf``) or a time that is not whole seconds within +-2**53 stops the conversion with
an error naming the file, line, field and value; a missing rating is allowed (empty cell). The
dataset folder is written as a whole (:func:`recbole_mm.files.staged_folder`) or not at all.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from recbole_mm.errors import DataFormatError
from recbole_mm.data.atomic_files import check_output_folder, sanitize_text, write_atomic
from recbole_mm.files import decode_utf8, fix_surrogates, json_object_line, staged_folder, unparsable_line, write_json, write_jsonl

_WHOLE = re.compile(r"[-+]?\d{1,18}")
_MAX_TIME = 2 ** 53  # whole seconds exact in a float64


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


def _unix_time(value: Any, *, file: Path, row: int, field: str) -> int:
    """Whole seconds from an int, a finite float or their text; clear errors otherwise."""
    t: Any = value
    if isinstance(value, str):
        v = value.strip()
        try:
            t = int(v) if _WHOLE.fullmatch(v) else float(v)
        except ValueError:
            t = None
    if isinstance(t, float) and math.isfinite(t):
        t = int(t)
    if isinstance(t, bool) or not isinstance(t, int) or not -_MAX_TIME <= t <= _MAX_TIME:
        raise DataFormatError("not a Unix time (whole seconds since 1970, within +-2**53)", file=file,
                              row=row, field=field, value=value, hint="fix the value or remove the row")
    return t


def _finite(value: Any, *, file: Path, row: int, field: str, what: str = "row") -> float:
    """A finite float; ``nan``/``inf``/text/too large raise an error naming the value."""
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DataFormatError("not a number", file=file, row=row, field=field, value=value,
                              hint=f"fix the value or remove the {what}") from None
    if not math.isfinite(x):
        raise DataFormatError("not a finite number", file=file, row=row, field=field, value=value,
                              hint=f"fix the value or remove the {what}")
    return x


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
    """``(user, item, rating, unix_time)`` rows from a reviews JSON-lines or a ratings CSV file.

    Ids are kept as written (sanitising, and the check that it merges no two ids, happen when the
    atomic files are written). A missing rating (JSON) is ``None``; a rating that is not a finite
    number, or a time that is not whole seconds, is an error naming the line.
    """
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
            r = _finite(rating, file=path, row=i, field="rating")
            t = _unix_time(ts, file=path, row=i, field="timestamp")
        else:
            rec = json_object_line(line, path, i, "each line must be one JSON review")
            for key in ("reviewerID", "asin", "unixReviewTime"):
                if rec.get(key) in (None, ""):
                    raise DataFormatError("missing field", file=path, row=i, field=key, value=line)
                if key != "unixReviewTime" and not isinstance(rec[key], (str, int)):
                    raise DataFormatError("not a string id", file=path, row=i, field=key, value=rec[key])
            user, item = str(rec["reviewerID"]), str(rec["asin"])
            t = _unix_time(rec["unixReviewTime"], file=path, row=i, field="unixReviewTime")
            r = rec.get("overall")
            r = None if r is None else _finite(r, file=path, row=i, field="overall")
        if not user.strip() or not item.strip():
            raise DataFormatError("empty user or item id", file=path, row=i, value=line)
        rows.append((user, item, r, t))
    return rows


def flatten_categories(categories: object) -> str | None:
    """``[['Beauty', 'Makeup', 'Eyes'], ['Beauty', 'Tools']]`` -> ``'Beauty > Makeup > Eyes | Beauty > Tools'``.

    A string is kept as it is; anything but a string or a list of paths (lists of names) raises
    ``TypeError``.
    """
    if categories is None or categories == "" or categories == []:
        return None
    if isinstance(categories, str):
        return categories
    if not isinstance(categories, (list, tuple)):
        raise TypeError("expected a list of category paths")
    paths = []
    for p in categories:
        names = p if isinstance(p, (list, tuple)) else [p]
        if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in names):
            raise TypeError("expected a list of category paths (lists of names)")
        s = " > ".join(str(c) for c in names if str(c).strip())
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
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError, MemoryError):
                raise unparsable_line(e, line, path, i, "a Python dict literal or JSON object",
                                 "each line must hold one product") from None
        if not isinstance(rec, dict):
            raise DataFormatError("not a dict", file=path, row=i, value=line)
        asin = rec.get("asin")
        if not asin:
            raise DataFormatError("missing field", file=path, row=i, field="asin", value=line)
        if not isinstance(asin, (str, int)) or isinstance(asin, bool):
            raise DataFormatError("not a string id", file=path, row=i, field="asin", value=asin)
        asin = str(asin)
        if wanted is not None and asin not in wanted:
            continue
        item: dict = {}
        if rec.get("title"):
            item["title"] = fix_surrogates(str(rec["title"]))
        price = rec.get("price")
        if price not in (None, ""):
            item["price"] = _finite(price, file=path, row=i, field="price", what="price")
        if rec.get("brand"):
            item["brand"] = fix_surrogates(str(rec["brand"]))
        try:
            cats = flatten_categories(rec.get("categories"))
        except TypeError as e:
            raise DataFormatError(str(e), file=path, row=i, field="categories", value=rec.get("categories"),
                                  hint="write categories as [['Beauty', 'Makeup'], ...] or remove them") from None
        if cats:
            item["categories"] = fix_surrogates(cats)
        if rec.get("description"):
            item["description"] = fix_surrogates(str(rec["description"]))
        if rec.get("imUrl"):
            item["imUrl"] = str(rec["imUrl"])
        out[asin] = item
    return out


def drop_duplicates(rows: Sequence[tuple]) -> tuple[list[tuple], int]:
    """Rows without exact repeats (first kept, order kept) and how many were dropped."""
    seen: set = set()
    out = []
    for r in rows:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out, len(rows) - len(out)


def convert_amazon(reviews: str | os.PathLike, meta: str | os.PathLike, name: str,
                   out: str | os.PathLike = "dataset", user_k: int = 5, item_k: int = 5) -> Path:
    """Convert one Amazon 2014 category; return the dataset folder (see the module docstring)."""
    folder = check_output_folder(out, name)
    rows, duplicates = drop_duplicates(read_reviews(reviews))
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
        token = sanitize_text(asin)
        side.append({"item_id": token, **({"raw_item_id": asin} if token != asin else {}), **a})
        item_rows.append((asin, a.get("title"), a.get("price"), a.get("brand"), a.get("categories")))
    with staged_folder(folder) as tmp:
        write_atomic(tmp / f"{name}.inter",
                     [("user_id", "token"), ("item_id", "token"), ("rating", "float"), ("timestamp", "float")],
                     rows, required=["user_id", "item_id", "timestamp"], source=reviews)
        write_atomic(tmp / f"{name}.item",
                     [("item_id", "token"), ("title", "token_seq"), ("price", "float"), ("brand", "token"),
                      ("categories", "token")], item_rows, required=["item_id"], source=meta)
        write_jsonl(tmp / f"{name}.items.jsonl", side)
        write_json(tmp / f"{name}.meta.json", {
            "name": name, "source": {"reviews": str(reviews), "meta": str(meta)},
            "filtering": f"exact duplicate rows dropped; iterative k-core: users >= {user_k}, items >= {item_k}",
            "duplicates_dropped": duplicates,
            "n_users": len({r[0] for r in rows}), "n_items": len(items), "n_interactions": len(rows),
            "n_items_with_meta": sum(1 for a in items if a in attrs),
            "timestamp": "unixReviewTime (ties inside a user keep the file order)",
        })
    return folder
