"""Build multimodal atomic datasets from the real data in ``shared/data`` (see each ``SOURCE.md``).

Every prepared dataset ``<out>/<name>/`` holds

- ``<name>.inter`` — ``user_id:token item_id:token timestamp:float`` (+ extra columns RecBole is not
  asked to load); rows of one user are in chronological order. Where only the order is known
  (beauty, ml-1m-llamarec) and for H&M (dates only) the timestamp is the position in the user's sequence,
  strictly increasing and exact in RecBole's float32; ML-100K keeps its real Unix timestamps, rows
  written in exact chronological order (ties in file order): RecBole's float32 merges times up to
  64 s apart, and its stable sort then keeps this file order;
- ``<name>.item`` — item tokens and sanitised categorical attributes (never loaded by the shipped
  ``properties/dataset/<name>.yaml``);
- ``<name>.items.jsonl`` — one JSON object per item: ``item_id`` (the item token) and the raw
  attributes (``title``, ``brand``, ``categories``, ``description``, ``price``, ``image``, ...);
  attributes an item does not have are absent;
- ``images/`` — the images the items use (copied or hard-linked; paths in the side file are
  relative to the dataset folder);
- ``<name>.meta.json`` — provenance: sources, filtering, counts.

The datasets are already filtered (k-core) here; the yaml files do not filter again, so RecBole
loads exactly the counts printed by :mod:`recbole_mm.data.stats`.

A dataset is built in a temporary folder and published only when every file is written
(:func:`recbole_mm.files.staged_folder`): a failure leaves no new file and an existing
dataset folder untouched.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Callable, Iterable

from recbole_mm.errors import DataFormatError
from recbole_mm.data.atomic_files import check_output_folder, sanitize_text, write_atomic
from recbole_mm.files import read_jsonl, staged_folder, write_json, write_jsonl
from recbole_mm.data.amazon import kcore_filter

DEFAULT_SHARED = "../shared/data"
DEFAULT_OUT = "dataset"
INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataFormatError("input file not found", file=path,
                              hint="pass --shared pointing at the shared/data folder")
    return path


def _place_image(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` when possible (no extra space), else copy it; skip if present."""
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write(folder: Path, name: str, inter_fields, inter_rows, item_fields, item_rows,
           side: list[dict], meta: dict, extra: Callable[[Path], None] | None = None) -> Path:
    """Write every file into a temporary folder, then publish it as ``folder`` (all or nothing)."""
    for rec in side:  # the side file is keyed by the token RecBole reads
        token = sanitize_text(str(rec["item_id"]))
        if token != rec["item_id"]:
            rec["raw_item_id"], rec["item_id"] = rec["item_id"], token
    with staged_folder(folder) as tmp:
        n_inter = write_atomic(tmp / f"{name}.inter", inter_fields, inter_rows,
                               required=["user_id", "item_id", "timestamp"])
        write_atomic(tmp / f"{name}.item", item_fields, item_rows, required=["item_id"])
        write_jsonl(tmp / f"{name}.items.jsonl", side)
        if extra is not None:
            extra(tmp)
        meta = dict(meta, name=name, n_interactions=n_inter, n_items_described=len(side),
                    n_images=sum(1 for r in side if "image" in r))
        write_json(tmp / f"{name}.meta.json", meta)
    return folder


def _sequences_to_rows(seqs: Iterable[tuple[str, list[str]]]):
    """Rows ``(user, item, position)``: the position is the strictly increasing timestamp."""
    for user, items in seqs:
        for pos, item in enumerate(items):
            yield user, item, pos


# --------------------------------------------------------------------------- Amazon Beauty
def prepare_beauty(shared: str | os.PathLike = DEFAULT_SHARED, out: str | os.PathLike = DEFAULT_OUT,
                   name: str = "beauty") -> Path:
    """Amazon Beauty 2014 5-core (22,363 users / 12,101 items / 198,502 interactions).

    Tokens are the original reviewerID / ASIN. Only relative time exists: ``timestamp`` is the
    position in the user's sequence and ``rel_time`` (not loaded) the seconds since the user's
    first review. No prices, no images (absent from the source).
    """
    src = Path(shared) / "amazon_beauty_2014"
    inter_path = _need(src / "derived" / "interactions.tsv")
    items_path = _need(src / "derived" / "items.jsonl")

    rows = []
    with open(inter_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for i, r in enumerate(reader, start=2):
            try:
                rows.append((r["reviewer_id"], r["asin"], int(r["position"]), int(r["rel_time_sec"])))
            except (KeyError, TypeError, ValueError):
                raise DataFormatError("expected columns reviewer_id, asin, position, rel_time_sec",
                                      file=inter_path, row=i, value=r) from None
    side, item_rows = [], []
    for rec in read_jsonl(items_path):
        token = rec.get("asin")
        if not token:
            raise DataFormatError("item without 'asin'", file=items_path, value=rec)
        out_rec = {"item_id": token}
        if rec.get("title"):
            out_rec["title"] = rec["title"]
        if rec.get("brand"):
            out_rec["brand"] = rec["brand"]
        cats = ["Beauty"] + list(rec.get("categories") or [])
        out_rec["categories"] = " > ".join(cats)
        side.append(out_rec)
        item_rows.append((token, out_rec.get("title"), out_rec.get("brand"), out_rec["categories"]))

    meta = {
        "source": "shared/data/amazon_beauty_2014/derived/{interactions.tsv,items.jsonl} (see SOURCE.md)",
        "filtering": "none here: the source is already the standard 5-core",
        "timestamp": "position of the interaction in the user's chronological sequence (relative time only)",
        "categories": "'Beauty > ' + the S3-Rec category names kept by its attribute 5-core",
    }
    return _write(Path(out) / name, name,
                  INTER_FIELDS + [("rel_time", "float")], ((u, i, p, t) for u, i, p, t in rows),
                  [("item_id", "token"), ("title", "token_seq"), ("brand", "token"), ("categories", "token")],
                  item_rows, side, meta)


# --------------------------------------------------------------------------- MovieLens-100K
def prepare_ml100k_posters(shared: str | os.PathLike = DEFAULT_SHARED,
                           out: str | os.PathLike = DEFAULT_OUT, name: str = "ml-100k-posters") -> Path:
    """RecBole's ML-100K (943 / 1,682 / 100,000, real timestamps) plus ML-1M posters.

    The name must not be ``ml-100k``: RecBole always reads its bundled copy for that name.
    """
    if name == "ml-100k":
        raise DataFormatError("the name 'ml-100k' is reserved by RecBole (it reads its bundled copy)",
                              hint="use another name, e.g. ml-100k-posters")
    src = Path(shared) / "movielens_100k"
    posters = Path(shared) / "movielens_1m" / "raw" / "posters"
    inter_path = _need(src / "raw" / "ml-100k.inter")
    item_path = _need(src / "raw" / "ml-100k.item")
    user_path = _need(src / "raw" / "ml-100k.user")
    map_path = _need(src / "derived" / "ml100k_item_to_ml1m_poster.tsv")

    # Chronological per user; ties keep the file order, exactly as RecBole's stable sort does.
    raw = list(_read_tsv(inter_path))
    try:
        raw.sort(key=lambda r: (r["user_id:token"], float(r["timestamp:float"])))
    except (KeyError, TypeError, ValueError):
        raise DataFormatError("expected columns user_id:token, timestamp:float with numbers",
                              file=inter_path) from None
    inter_rows = [(r["user_id:token"], r["item_id:token"], r["timestamp:float"], r["rating:float"])
                  for r in raw]

    poster_of = {}
    for r in _read_tsv(map_path):
        if r["has_poster"] == "1" and r["ml1m_movie_id"]:
            poster_of[r["ml100k_item_id"]] = r["ml1m_movie_id"]
    side, item_rows, image_jobs = [], [], []
    for r in _read_tsv(item_path):
        token = r["item_id:token"]
        rec = {"item_id": token}
        if r.get("movie_title:token_seq"):
            rec["title"] = r["movie_title:token_seq"]
        if r.get("release_year:token"):
            rec["year"] = r["release_year:token"]
        if r.get("class:token_seq"):
            rec["categories"] = ", ".join(r["class:token_seq"].split())
        mid = poster_of.get(token)
        if mid and (posters / f"{mid}.jpg").is_file():
            rec["image"] = f"images/{token}.jpg"
            image_jobs.append((posters / f"{mid}.jpg", rec["image"]))
        side.append(rec)
        item_rows.append((token, r.get("movie_title:token_seq"), r.get("release_year:token"),
                          r.get("class:token_seq")))

    def extra(folder: Path) -> None:
        for s, rel in image_jobs:
            _place_image(s, folder / rel)
        rows = [(r["user_id:token"], r["age:token"], r["gender:token"], r["occupation:token"],
                 r["zip_code:token"]) for r in _read_tsv(user_path)]
        write_atomic(folder / f"{name}.user", [("user_id", "token"), ("age", "token"), ("gender", "token"),
                                                ("occupation", "token"), ("zip_code", "token")], rows,
                     required=["user_id"])

    meta = {
        "source": "shared/data/movielens_100k (RecBole atomic files) + movielens_1m/raw/posters via "
                  "derived/ml100k_item_to_ml1m_poster.tsv",
        "filtering": "none (all 943 users / 1,682 items / 100,000 ratings)",
        "timestamp": "Unix seconds as in RecBole's ml-100k; rows sorted by (user, timestamp), ties in "
                     "file order (RecBole's stable sort gives the same sequences as for its bundled ml-100k)",
    }
    return _write(Path(out) / name, name,
                  INTER_FIELDS + [("rating", "float")], inter_rows,
                  [("item_id", "token"), ("movie_title", "token_seq"), ("release_year", "token"),
                   ("class", "token_seq")], item_rows, side, meta, extra)


def _read_tsv(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


# --------------------------------------------------------------------------- MovieLens-1M
def prepare_ml1m(shared: str | os.PathLike = DEFAULT_SHARED, out: str | os.PathLike = DEFAULT_OUT,
                 name: str = "ml-1m-llamarec") -> Path:
    """ML-1M as preprocessed by LlamaRec/LRURec (6,040 / 3,416 / 999,611), titles, genres, posters.

    Only chronological order is known: ``timestamp`` is the position in the user's sequence.
    Posters exist here for the 1,400 movies ML-100K maps to (the rest were trimmed from shared/).
    """
    src = Path(shared) / "movielens_1m"
    seq_path = _need(src / "derived" / "user_sequences.tsv")
    movies_path = _need(src / "raw" / "movies.dat")
    posters = src / "raw" / "posters"

    seqs = []
    with open(seq_path, encoding="utf-8") as f:
        next(f)
        for i, line in enumerate(f, start=2):
            user, _, items = line.rstrip("\n").partition("\t")
            if not user or not items:
                raise DataFormatError("expected 'user_id<TAB>movie ids'", file=seq_path, row=i, value=line)
            seqs.append((user, items.split()))
    used = {m for _, items in seqs for m in items}

    side, item_rows, image_jobs = [], [], []
    with open(movies_path, encoding="latin-1") as f:
        for i, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("::")
            if len(parts) != 3:
                raise DataFormatError("expected MovieID::Title::Genres", file=movies_path, row=i, value=line)
            mid, title, genres = parts
            if mid not in used:
                continue
            rec = {"item_id": mid, "title": title, "categories": ", ".join(genres.split("|"))}
            if (posters / f"{mid}.jpg").is_file():
                rec["image"] = f"images/{mid}.jpg"
                image_jobs.append((posters / f"{mid}.jpg", rec["image"]))
            side.append(rec)
            item_rows.append((mid, title, genres.split("|")))
    missing = used - {r["item_id"] for r in side}
    if missing:
        raise DataFormatError(f"{len(missing)} movies of the sequences are not in movies.dat",
                              file=movies_path, value=sorted(missing)[:5])

    def extra(folder: Path) -> None:
        for s, rel in image_jobs:
            _place_image(s, folder / rel)

    meta = {
        "source": "shared/data/movielens_1m (derived/user_sequences.tsv, raw/movies.dat, raw/posters)",
        "filtering": "none here: LRURec's preprocessing already kept users and movies with >=5 ratings",
        "timestamp": "position of the interaction in the user's chronological sequence",
    }
    return _write(Path(out) / name, name, INTER_FIELDS, _sequences_to_rows(seqs),
                  [("item_id", "token"), ("title", "token_seq"), ("genres", "token_seq")],
                  item_rows, side, meta, extra)


# --------------------------------------------------------------------------- H&M
HM_USER_CORE = 5
HM_ITEM_CORE = 2


def prepare_hm(shared: str | os.PathLike = DEFAULT_SHARED, out: str | os.PathLike = DEFAULT_OUT,
               name: str = "hm", user_core: int = HM_USER_CORE, item_core: int = HM_ITEM_CORE) -> Path:
    """H&M sample: purchases of the articles that have metadata and a photo, ordered by date.

    Repeated purchases of one article by one customer on one day (several units) count once.
    Then an iterative (``user_core``, ``item_core``)-core: every customer keeps >= ``user_core``
    purchases and every article >= ``item_core`` buyers. Each customer's purchases are ordered by
    date (file order inside a day); ``timestamp`` is the position in that order (RecBole stores
    timestamps as float32, which cannot tell apart Unix seconds less than 128 s apart) and ``day``
    (not loaded) the purchase date in Unix seconds.
    """
    src = Path(shared) / "hm_fashion_sample" / "raw"
    tx_path = _need(src / "transactions_train_sample.csv")
    art_path = _need(src / "articles_train_sample.csv")
    img_root = src / "images"

    articles = {}
    with open(art_path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            aid = r.get("article_id")
            if not aid:
                raise DataFormatError("missing article_id", file=art_path, row=i, value=r)
            articles[aid] = r
    usable = {a for a in articles if (img_root / a[:3] / f"{a}.jpg").is_file()}

    raw, seen = [], set()
    with open(tx_path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            try:
                day, cust, aid = r["t_dat"], r["customer_id"], r["article_id"]
                d = date.fromisoformat(day)
            except (KeyError, TypeError, ValueError):
                raise DataFormatError("expected t_dat (YYYY-MM-DD), customer_id, article_id",
                                      file=tx_path, row=i, value=r) from None
            if aid not in usable or (cust, aid, day) in seen:
                continue
            seen.add((cust, aid, day))
            raw.append((cust, aid, d, r.get("price")))
    n_before = (len({r[0] for r in raw}), len({r[1] for r in raw}), len(raw))
    keep = kcore_filter([(r[0], r[1]) for r in raw], user_core, item_core)
    raw = [r for r, k in zip(raw, keep) if k]
    # chronological per user; stable sort keeps file order inside a day
    raw.sort(key=lambda r: (r[0], r[2]))
    position: Counter = Counter()
    rows = []
    for cust, aid, d, price in raw:
        rows.append((cust, aid, position[cust], (d - date(1970, 1, 1)).days * 86400, price))
        position[cust] += 1

    used = sorted({r[1] for r in rows})
    side, item_rows = [], []
    for aid in used:
        a = articles[aid]
        rec = {"item_id": aid}
        for key, col in (("title", "prod_name"), ("product_type", "product_type_name"),
                         ("colour", "colour_group_name"), ("department", "department_name"),
                         ("description", "detail_desc")):
            if a.get(col):
                rec[key] = a[col]
        cats = [a.get(c) for c in ("index_group_name", "product_group_name", "product_type_name")]
        if all(cats):
            rec["categories"] = " > ".join(cats)
        rec["image"] = f"images/{aid}.jpg"
        side.append(rec)
        item_rows.append((aid, a.get("prod_name"), a.get("product_type_name"), a.get("colour_group_name"),
                          a.get("department_name")))

    def extra(folder: Path) -> None:
        for aid in used:
            _place_image(img_root / aid[:3] / f"{aid}.jpg", folder / "images" / f"{aid}.jpg")

    meta = {
        "source": "shared/data/hm_fashion_sample/raw (transactions_train_sample.csv, "
                  "articles_train_sample.csv, images/)",
        "filtering": f"articles with metadata and photo; repeated (customer, article, day) counted once; "
                     f"iterative k-core: users >= {user_core}, items >= {item_core} interactions",
        "before_kcore": {"users": n_before[0], "items": n_before[1], "interactions": n_before[2]},
        "timestamp": "position of the purchase in the customer's date-ordered purchases (file order inside a day); "
                     "the date is in the unloaded column 'day' (Unix seconds)",
        "price": "normalised H&M price (in .inter column 'price', not loaded)",
    }
    return _write(Path(out) / name, name, INTER_FIELDS + [("day", "float"), ("price", "float")], rows,
                  [("item_id", "token"), ("prod_name", "token_seq"), ("product_type", "token"),
                   ("colour", "token"), ("department", "token")], item_rows, side, meta, extra)


PREPARERS: dict[str, Callable[..., Path]] = {
    "beauty": prepare_beauty,
    "ml-100k-posters": prepare_ml100k_posters,
    "ml-1m-llamarec": prepare_ml1m,
    "hm": prepare_hm,
}


# Public raw files a user with network access can download instead of the shared copy.
RAW_SOURCES = {
    "beauty": ("reviews_Beauty_5.json.gz (or ratings_Beauty.csv) and meta_Beauty.json.gz from "
               "https://jmcauley.ucsd.edu/data/amazon/ (Amazon 2014, 'Beauty' 5-core reviews and metadata)"),
}


def _raw_beauty_files(raw: Path) -> tuple[Path, Path]:
    reviews = next((raw / n for n in ("reviews_Beauty_5.json.gz", "reviews_Beauty_5.json", "ratings_Beauty.csv")
                    if (raw / n).is_file()), None)
    meta = next((raw / n for n in ("meta_Beauty.json.gz", "meta_Beauty.json") if (raw / n).is_file()), None)
    if reviews is None or meta is None:
        missing = "reviews_Beauty_5.json.gz" if reviews is None else "meta_Beauty.json.gz"
        raise DataFormatError(f"{missing} not found in the --raw folder", file=raw,
                              hint=f"download {RAW_SOURCES['beauty']}")
    return reviews, meta


def how_to_get(which: str) -> str:
    """One sentence naming the command(s) that make dataset ``which``."""
    text = f"run `recbole-mm-data prepare {which} --shared ../shared/data --out dataset`"
    if which in RAW_SOURCES:
        text += (f", or download {RAW_SOURCES[which]} into a folder and run "
                 f"`recbole-mm-data prepare {which} --raw FOLDER --out dataset`")
    return text


def prepare(which: str, shared: str | os.PathLike = DEFAULT_SHARED, out: str | os.PathLike = DEFAULT_OUT,
            raw: str | os.PathLike | None = None) -> Path:
    """Prepare one dataset by its name in :data:`PREPARERS`; return its folder.

    ``raw`` (beauty only) is a folder with the public Amazon 2014 files (:data:`RAW_SOURCES`),
    converted with :func:`recbole_mm.data.amazon.convert_amazon` (iterative 5-core) instead of
    reading the project's shared copy.
    """
    if which not in PREPARERS:
        raise DataFormatError(f"unknown dataset '{which}'", hint=f"choose one of {', '.join(PREPARERS)}")
    if raw is not None:
        if which not in RAW_SOURCES:
            raise DataFormatError(f"--raw is only supported for {', '.join(RAW_SOURCES)}, not '{which}'",
                                  hint="use --shared")
        if not Path(raw).is_dir():
            raise DataFormatError("--raw folder not found", file=raw, hint=f"download {RAW_SOURCES[which]}")
        from recbole_mm.data.amazon import convert_amazon

        reviews, meta = _raw_beauty_files(Path(raw))
        return convert_amazon(reviews, meta, which, out)
    if not Path(shared).is_dir():
        raise DataFormatError("shared data folder not found", file=shared,
                              hint=("pass --shared pointing at the shared/data folder"
                                    + (f", or --raw FOLDER holding {RAW_SOURCES[which]}" if which in RAW_SOURCES else "")))
    check_output_folder(out, which)
    return PREPARERS[which](shared, out)
