"""Preparation commands on the real data in ../shared/data (skipped when it is absent).

Each prepared dataset must load in RecBole with the expected counts, and the item store must serve
its text and images.
"""

import os
from pathlib import Path

import pytest

from recbole_mm.data.cli import main
from recbole_mm.data.item_store import ItemStore
from recbole_mm.data.stats import dataset_stats

SHARED = Path(os.environ.get("RECBOLE_MM_SHARED", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
PROPS = Path(__file__).resolve().parents[1] / "properties" / "dataset"
pytestmark = pytest.mark.skipif(not (SHARED / "amazon_beauty_2014").is_dir(),
                                reason=f"real data not found at {SHARED}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepare each dataset at most once per test module."""
    out = tmp_path_factory.mktemp("prepared")
    done = {}

    def get(name):
        if name not in done:
            from recbole_mm.data.prepare import prepare

            done[name] = prepare(name, SHARED, out)
        return done[name]

    return get


def load_recbole(name, data_path):
    from recbole.config import Config
    from recbole.data import create_dataset

    config = Config(model="SASRec", dataset=name, config_file_list=[str(PROPS / f"{name}.yaml")],
                    config_dict={"data_path": str(data_path), "train_neg_sample_args": None,
                                 "show_progress": False, "save_dataset": False})
    return config, create_dataset(config)


def recbole_sequences(ds):
    """Each user's items in the order RecBole's sequential augmentation sorts them (float32 time)."""
    from recbole.data.dataset import Dataset

    Dataset._change_feat_format(ds)  # to Interaction, without the augmentation
    ds.sort(by=[ds.uid_field, ds.time_field])
    users = ds.id2token(ds.uid_field, ds.inter_feat[ds.uid_field].numpy())
    items = ds.id2token(ds.iid_field, ds.inter_feat[ds.iid_field].numpy())
    seqs = {}
    for u, i in zip(users, items):
        seqs.setdefault(str(u), []).append(str(i))
    return seqs


def file_sequences(folder):
    seqs = {}
    with open(folder / f"{folder.name}.inter", encoding="utf-8") as f:
        next(f)
        for line in f:
            u, i = line.split("\t")[:2]
            seqs.setdefault(u, []).append(i)
    return seqs


@pytest.mark.parametrize("name, counts, images", [
    ("beauty", (22363, 12101, 198502), 0),
    ("ml-100k-posters", (943, 1682, 100000), 1415),
    ("hm", (411, 1527, 5175), 1527),
])
def test_prepare_loads_with_expected_counts(prepared, name, counts, images):
    folder = prepared(name)
    config, ds = load_recbole(name, folder.parent)
    assert (ds.user_num - 1, ds.item_num - 1, ds.inter_num) == counts
    assert set(ds.inter_feat.columns) == {"user_id", "item_id", "timestamp"}  # no item text in batches
    assert recbole_sequences(ds) == file_sequences(folder)
    store = ItemStore.from_recbole(config, ds)
    assert store.stats()["with_image_file"] == images
    titled = [i for i in range(1, len(store)) if store.get(i, "title")]
    assert len(titled) >= 0.99 * (len(store) - 1)
    if images:
        i = next(i for i in range(1, len(store)) if store.has_image(i))
        w, h = store.image(i).size
        assert 56 * 56 <= w * h <= 168 * 168


def test_prepare_cli_prints_stats(tmp_path, capsys):
    assert main(["prepare", "hm", "--shared", str(SHARED), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'hm'}" in out and "| hm | 411 | 1,527 | 1,527 | 5,175 | 0.8246% |" in out


def test_beauty_order_and_text(prepared):
    folder = prepared("beauty")
    lines = (folder / "beauty.inter").read_text().splitlines()
    first = [line.split("\t")[:3] for line in lines[1:6]]
    # SOURCE.md: user A1YJEY40YUW4SE's chronological sequence
    assert first == [["A1YJEY40YUW4SE", a, str(k)] for k, a in
                     enumerate(["B004756YJA", "B004ZT0SSG", "B0020YLEYK", "7806397051", "B002WLWX82"])]
    config, ds = load_recbole("beauty", folder.parent)
    store = ItemStore.from_recbole(config, ds)
    i = ds.token2id("item_id", "B004756YJA")
    assert store.attributes(i) == {"title": "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce",
                                   "brand": "OPI", "categories": "Beauty > Makeup > Nails > Nail Polish"}


def test_ml1m_counts_without_recbole(tmp_path):
    folder = tmp_path / "ml-1m-llamarec"
    main(["prepare", "ml-1m-llamarec", "--shared", str(SHARED), "--out", str(tmp_path)])
    s = dataset_stats(folder)
    assert (s["users"], s["items"], s["inter"], s["images"]) == (6040, 3416, 999611, 1400)


def test_ml100k_name_is_refused(tmp_path, capsys):
    from recbole_mm.data.prepare import prepare_ml100k_posters

    with pytest.raises(ValueError, match="reserved by RecBole"):
        prepare_ml100k_posters(SHARED, tmp_path, name="ml-100k")
    assert main(["prepare", "hm", "--shared", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "shared data folder not found" in capsys.readouterr().err
