"""Statistics of a prepared dataset: the columns of PRIME's Table 1 (#users, #items, #images,
#inter, density).

Counts come from ``<name>.inter`` (the prepared datasets are already filtered and their yaml files
do not filter again, so these are the counts RecBole loads). ``#images`` counts the items of the
interactions whose side-file image exists inside the dataset folder (decoded too with
``verify_images=True``).
"""

from __future__ import annotations

import os
from pathlib import Path

from recbole_mm.errors import DataFormatError
from recbole_mm.files import decode_utf8
from recbole_mm.data.atomic_files import read_header


def resolve_dataset(dir_or_name: str | os.PathLike, data_path: str | os.PathLike = "dataset") -> Path:
    """A dataset folder given as a path, or as a name under ``data_path``."""
    p = Path(dir_or_name)
    if p.is_dir():
        return p
    q = Path(data_path) / str(dir_or_name)
    if q.is_dir():
        return q
    raise DataFormatError("dataset folder not found", file=dir_or_name,
                          hint=f"give a folder or a name under {data_path}/ (prepare it first)")


def dataset_stats(dir_or_name: str | os.PathLike, data_path: str | os.PathLike = "dataset",
                  verify_images: bool = False) -> dict:
    """``{"dataset", "users", "items", "images", "inter", "density"}`` of one prepared dataset."""
    folder = resolve_dataset(dir_or_name, data_path)
    name = folder.name
    inter = folder / f"{name}.inter"
    if not inter.is_file():
        raise DataFormatError("interaction file not found", file=inter,
                              hint="a dataset folder <name>/ must hold <name>.inter")
    cols = [n for n, _ in read_header(inter)]
    for need in ("user_id", "item_id"):
        if need not in cols:
            raise DataFormatError(f"no '{need}' column", file=inter, row=1, value=cols)
    ui, ii = cols.index("user_id"), cols.index("item_id")
    users, items, n = set(), set(), 0
    with open(inter, "rb") as f:
        f.readline()
        for row, raw in enumerate(f, start=2):
            parts = decode_utf8(raw, file=inter, row=row).rstrip("\r\n").split("\t")
            if len(parts) != len(cols):
                raise DataFormatError(f"expected {len(cols)} tab-separated values, got {len(parts)}",
                                      file=inter, row=row, value=raw)
            users.add(parts[ui])
            items.add(parts[ii])
            n += 1
    images = 0
    if (folder / f"{name}.items.jsonl").is_file():
        from recbole_mm.data.item_store import ItemStore

        store = ItemStore(folder, sorted(items), extra_side_files=())
        check = (lambda i: store.image(i) is not None) if verify_images else store.has_image
        images = sum(1 for i in range(len(store)) if check(i))
    density = n / (len(users) * len(items)) if users and items else 0.0
    return {"dataset": name, "users": len(users), "items": len(items), "images": images,
            "inter": n, "density": density}


def format_stats(rows: list[dict]) -> str:
    """A Markdown table with PRIME Table 1's columns."""
    lines = ["| dataset | #users | #items | #images | #inter | density |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['users']:,} | {r['items']:,} | {r['images']:,} | "
                     f"{r['inter']:,} | {100 * r['density']:.4f}% |")
    return "\n".join(lines)
