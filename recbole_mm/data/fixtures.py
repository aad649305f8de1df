"""Small synthetic multimodal datasets for tests, with images drawn by Pillow.

Every item has a colour and a shape, drawn on its image and NOT written in its title. A user's
next item has the colour that follows the current item's colour in a fixed cycle, so the colour
(visible only in the image) predicts the next item; the shape is random. Deterministic from a seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class FixtureSpec:
    """Size of a generated dataset."""

    n_users: int = 60
    n_items: int = 40
    min_len: int = 5
    max_len: int = 12
    image_size: int = 32
    seed: int = 0


def _draw(path: Path, colour: str, shape: str, size: int) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    m = size // 6
    box = (m, m, size - m, size - m)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def make_fixture(root: str | os.PathLike, name: str = "mmfix", spec: FixtureSpec = FixtureSpec(),
                 images: bool = True) -> Path:
    """Write ``root/name/`` with ``name.inter``, ``name.item``, ``name.items.jsonl`` and ``images/``.

    Returns the dataset folder. ``name.inter`` holds ``user_id, item_id, timestamp`` with strictly
    increasing timestamps inside each user.
    """
    rng = np.random.default_rng(spec.seed)
    folder = Path(root) / name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    item_colour = [colours[i % len(colours)] for i in range(spec.n_items)]
    item_shape = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(spec.n_items)]
    by_colour = {c: [i for i in range(spec.n_items) if item_colour[i] == c] for c in colours}

    items = []
    for i in range(spec.n_items):
        token = f"i{i:04d}"
        rec = {"item_id": token, "title": f"Item {i} {item_shape[i]}", "brand": f"brand{i % 5}",
               "categories": "Things > Shapes", "price": round(float(5 + (i * 7) % 40), 2)}
        if images:
            rel = f"images/{token}.png"
            _draw(folder / rel, item_colour[i], item_shape[i], spec.image_size)
            rec["image"] = rel
        items.append(rec)

    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(spec.n_users):
        length = int(rng.integers(spec.min_len, spec.max_len + 1))
        cur = int(rng.integers(spec.n_items))
        for t in range(length):
            lines.append(f"u{u:04d}\ti{cur:04d}\t{t}")
            nxt_colour = colours[(colours.index(item_colour[cur]) + 1) % len(colours)]
            cur = int(rng.choice(by_colour[nxt_colour]))
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")

    item_lines = ["item_id:token\tbrand:token\tprice:float"]
    item_lines += [f"{r['item_id']}\t{r['brand']}\t{r['price']}" for r in items]
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")
    with open(folder / f"{name}.items.jsonl", "w", encoding="utf-8") as f:
        for r in items:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return folder
