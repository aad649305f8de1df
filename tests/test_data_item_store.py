"""ItemStore: raw text, lazy cached images, pixel budget, corrupt / missing / escaping image paths."""

import json
import logging
import os

import pytest
from PIL import Image

from recbole_mm.errors import DataFormatError
from recbole_mm.files import write_jsonl
from recbole_mm.data.fixtures import FixtureSpec, make_fixture
from recbole_mm.data.item_store import ItemStore, fit_pixels


@pytest.fixture
def fixture_folder(tmp_path):
    return make_fixture(tmp_path, spec=FixtureSpec(n_users=12, n_items=8))


def tokens(folder):
    return ["[PAD]"] + [json.loads(line)["item_id"] for line in open(folder / f"{folder.name}.items.jsonl")]


def test_text_and_lazy_cached_images(fixture_folder):
    store = ItemStore(fixture_folder, tokens(fixture_folder), cache_size=2)
    assert len(store) == 9 and store.token(1) == "i0000"
    assert store.attributes(1) == {"title": "Item 0 " + store.get(1, "title").split()[-1], "brand": "brand0",
                                   "categories": "Things > Shapes", "price": 5.0}
    assert store.attributes(0) == {} and store.image(0) is None  # [PAD]
    assert len(store._cache) == 0  # nothing loaded before it is asked for
    img = store.image(1)
    assert img.mode == "RGB" and img.size == (56, 56)  # 32x32 scaled up to the 56*56 minimum
    assert img.getpixel((28, 28)) != (255, 255, 255)
    store.image(2), store.image(3)
    assert list(store._cache) == [2, 3]  # LRU of size 2
    img.paste((0, 0, 0), (0, 0, 56, 56))
    assert store.image(2).getpixel((28, 28)) != (0, 0, 0)  # callers get copies
    with pytest.raises(IndexError):
        store.attributes(9)


def test_pixel_budget_keeps_aspect_ratio(tmp_path):
    folder = tmp_path / "big"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (800, 400), (10, 20, 30)).save(folder / "images" / "wide.png")
    Image.new("RGB", (10, 40), (10, 20, 30)).save(folder / "images" / "tall.png")
    write_jsonl(folder / "big.items.jsonl", [{"item_id": "w", "image": "images/wide.png"},
                                             {"item_id": "t", "image": "images/tall.png"}])
    store = ItemStore(folder, ["[PAD]", "w", "t"], min_pixels=32 * 32, max_pixels=100 * 100)
    w, h = store.image(1).size
    assert w * h <= 100 * 100 and abs(w / h - 2) < 0.05 and w * h > 0.95 * 100 * 100
    w, h = store.image(2).size
    assert w * h >= 32 * 32 and abs(h / w - 4) < 0.3
    assert fit_pixels(50, 50, 100, 10000) == (50, 50)
    with pytest.raises(ValueError):
        ItemStore(folder, ["w"], min_pixels=10, max_pixels=5)


def test_corrupt_missing_and_escaping_images(tmp_path, caplog):
    root = tmp_path / "data"
    folder = root / "shop"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (60, 60), (200, 0, 0)).save(folder / "images" / "ok.png")
    (folder / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (60, 60), (0, 0, 200)).save(root / "secret.png")
    os.symlink(root / "secret.png", folder / "images" / "link.png")
    os.symlink(folder / "images" / "ok.png", folder / "images" / "inside.png")
    write_jsonl(folder / "shop.items.jsonl", [
        {"item_id": "ok", "title": "Fine", "image": "images/ok.png"},
        {"item_id": "bad", "title": "Broken", "image": "images/bad.jpg"},
        {"item_id": "gone", "image": "images/none.png"},
        {"item_id": "up", "image": "../secret.png"},
        {"item_id": "abs", "image": str(root / "secret.png")},
        {"item_id": "link", "image": "images/link.png"},
        {"item_id": "inside", "image": "images/inside.png"},
        {"item_id": "plain", "title": "No image"},
        {"item_id": "not-in-recbole", "title": "filtered"},
    ])
    toks = ["[PAD]", "ok", "bad", "gone", "up", "abs", "link", "inside", "plain"]
    store = ItemStore(folder, toks)
    caplog.set_level(logging.INFO, logger="recbole_mm.data.item_store")
    for _ in range(3):
        got = {t: store.image(i) for i, t in enumerate(toks)}
    assert {t for t, im in got.items() if im is not None} == {"ok", "inside"}
    assert store.attributes(2) == {"title": "Broken"}  # text still served
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # each bad item reported exactly once
    assert any("item bad " in w and "corrupt image" in w and "images/bad.jpg" in w for w in warnings)
    for t in ("up", "abs", "link"):
        assert any(f"item {t} " in w and "refused" in w for w in warnings)
    assert any("item gone " in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert store.stats() == {"items": 8, "with_attributes": 3, "with_image_file": 3}  # ok, bad, inside


def test_captions_side_file_merges_without_overwriting(fixture_folder):
    write_jsonl(fixture_folder / "mmfix.captions.jsonl",
                [{"item_id": "i0001", "caption": "a red circle", "title": "must not win"}])
    store = ItemStore(fixture_folder, tokens(fixture_folder))
    assert store.get(2, "caption") == "a red circle" and store.get(2, "title").startswith("Item 1 ")
    assert "caption" not in store.attributes(1)


def test_missing_side_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataFormatError, match=r"x.items.jsonl: side file not found"):
        ItemStore(tmp_path / "x", ["[PAD]"])


def test_from_recbole(fixture_folder):
    from recbole.config import Config
    from recbole.data import create_dataset

    config = Config(model="SASRec", dataset="mmfix", config_dict={
        "data_path": str(fixture_folder.parent), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "train_neg_sample_args": None, "image_max_pixels": 40 * 40, "image_min_pixels": 16 * 16,
        "show_progress": False, "save_dataset": False})
    dataset = create_dataset(config)
    store = ItemStore.from_recbole(config, dataset)
    tok = dataset.field2id_token["item_id"]
    assert store.tokens == list(tok) and store.tokens[0] == "[PAD]"
    for i in range(1, len(tok)):
        n = int(tok[i][1:])
        assert store.get(i, "title").startswith(f"Item {n} ")
        assert store.image(i).size == (32, 32)  # already inside [16*16, 40*40]
    assert ItemStore.from_recbole(config, dataset, max_pixels=20 * 20).image(1).size == (20, 20)


def test_embeddings_aligned_to_internal_ids(fixture_folder):
    import numpy as np

    np.savez(fixture_folder / "mmfix.clip.npz", item_id=np.array(["i0003", "i0000", "unknown"]),
             embedding=np.arange(6, dtype=np.float32).reshape(3, 2))
    store = ItemStore(fixture_folder, ["[PAD]", "i0000", "i0001", "i0002", "i0003"])
    emb, mask = store.embeddings("clip")
    assert emb.shape == (5, 2) and mask.tolist() == [False, True, False, False, True]
    assert emb[1].tolist() == [2, 3] and emb[4].tolist() == [0, 1] and emb[2].tolist() == [0, 0]
    with pytest.raises(DataFormatError, match="embedding file not found"):
        store.embeddings("nope")


def test_fallback_to_recbole_item_file(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "shop.item").write_text(
        "item_id:token\tname:token_seq\tgenre:token_seq\tprice:float\tyear:token\tcolor:token\timage:token\n"
        "a\tRed  lipstick {x}\tMakeup Lips\t12.5\t2001\tred\tpics/a.jpg\n"
        "b\tCream\t\t\t\t\t\n"
        "c\tFiltered out\tX\t1\t1\tx\t\n", encoding="utf-8")
    store = ItemStore(folder, ["[PAD]", "b", "a"])
    assert store.source.name == "shop.item"
    assert store.attributes(2) == {"title": "Red  lipstick {x}", "categories": "Makeup Lips", "price": 12.5,
                                   "year": "2001", "color": "red", "image_6": "pics/a.jpg"}
    assert store.attributes(1) == {"title": "Cream"}  # empty cells dropped
    assert store.image(2) is None and store.stats() == {"items": 2, "with_attributes": 2, "with_image_file": 0}
    # the side file wins when both exist
    write_jsonl(folder / "shop.items.jsonl", [{"item_id": "a", "title": "From side file"}])
    assert ItemStore(folder, ["[PAD]", "b", "a"]).attributes(2) == {"title": "From side file"}


def test_item_file_columns_named_title_and_name(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "x.item").write_text("name:token\titem_id:token\ttitle:token_seq\nN\t1\tT\n", encoding="utf-8")
    assert ItemStore(folder, ["[PAD]", "1"]).attributes(1) == {"name": "N", "title": "T"}


def test_from_recbole_bundled_ml_100k():
    """RecBole's own ml-100k (shipped with the package) has no side file: the .item file is used."""
    from recbole_mm.config import Config
    from recbole_mm.utils import create_dataset

    config = Config("SASRec", "ml-100k", config_dict={
        "load_col": {"inter": ["user_id", "item_id"]}, "show_progress": False, "save_dataset": False,
        "state": "ERROR"})
    dataset = create_dataset(config)
    store = ItemStore.from_recbole(config, dataset)
    tok = list(dataset.field2id_token["item_id"])
    assert store.tokens == tok and store.source.name == "ml-100k.item"
    assert store.attributes(tok.index("1")) == {"title": "Toy Story", "year": "1995",
                                                "categories": "Animation Children's Comedy"}
    assert store.get(tok.index("2"), "title") == "GoldenEye"
    assert store.image(tok.index("1")) is None and store.attributes(0) == {}
    assert store.stats() == {"items": len(tok) - 1, "with_attributes": len(tok) - 1, "with_image_file": 0}
