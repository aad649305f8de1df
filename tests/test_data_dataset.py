"""The multimodal dataset: it builds the item store and the item vectors once, a second dataset reads the
caches (no describer, no encoder), the splits share what it built, models only read it, and the
describer's defaults come from the yaml."""

import dataclasses
import os
import json
import pickle

import numpy as np
import pytest
import torch

from conftest import tiny_config
from recbole_mm.data.dataset import MultimodalSequentialDataset
from recbole_mm.data.fixtures import FixtureSpec, make_fixture
from recbole_mm.data.item_store import ItemStore
from recbole_mm.lmm import describer as describer_module
from recbole_mm.lmm.describer import Describer, DescriberSettings, DescriptionCache
from recbole_mm.lmm.image_encoder import ImageEncoder
from recbole_mm.lmm.sentence_encoder import SentenceEncoder

SMALL_VLM = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400}
ITEMS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One generated dataset (one item without image file) and one folder for built models and caches."""
    root = tmp_path_factory.mktemp("mmdata")
    folder = make_fixture(root / "data", "mmfix", FixtureSpec(n_users=30, n_items=ITEMS, min_len=5, max_len=10, seed=5))
    (folder / "images" / "i0003.png").unlink()
    return root


def _config(root, model="VLM4Rec", **extra):
    from recbole_mm.config import Config

    settings = dict(text_encoder="small", image_encoder="small", describer_model="small", describer_small=SMALL_VLM,
                    describer_max_new_tokens=4, describer_batch_size=8, image_min_pixels=784, image_max_pixels=784,
                    artifacts_dir=str(root / "artifacts"), description_dir=str(root / "descriptions"),
                    embedding_cache_dir=str(root / "vectors"), topk=[5, 10])
    if model == "PRIME":
        settings = dict(image_min_pixels=784, image_max_pixels=784, artifacts_dir=str(root / "artifacts"), topk=[5],
                        n_candidates=5, valid_metric="NDCG@5", retriever_config={"epochs": 1})
    return Config(model, "mmfix", config_dict=tiny_config(str(root / "data"), **{**settings, **extra}))


class Calls:
    """Counts the calls of the functions and methods it wraps (the wrapped code still runs)."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.counts = monkeypatch, {}

    def count(self, owner, name, label):
        real = getattr(owner, name)
        self.counts[label] = 0

        def wrapper(*args, **kwargs):
            self.counts[label] += 1
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, wrapper)

    def reset(self):
        self.counts = dict.fromkeys(self.counts, 0)


def _calls(monkeypatch):
    calls = Calls(monkeypatch)
    calls.count(describer_module, "load_describer", "load_describer")
    calls.count(Describer, "generate", "describe")
    calls.count(SentenceEncoder, "encode", "encode_text")
    calls.count(ImageEncoder, "encode", "encode_image")
    calls.count(ItemStore, "__init__", "item_store")
    return calls


def test_the_dataset_builds_store_and_vectors_once_and_a_second_dataset_reads_the_caches(data, monkeypatch):
    from recbole_mm.utils import create_dataset

    calls = _calls(monkeypatch)
    config = _config(data, text_source="generated", fusion="concat")
    dataset = create_dataset(config)
    assert type(dataset) is MultimodalSequentialDataset
    assert calls.counts["item_store"] == 1 and calls.counts["load_describer"] == 1
    assert calls.counts["describe"] >= 1 and calls.counts["encode_text"] >= 1 and calls.counts["encode_image"] >= 1
    store = dataset.item_store
    assert len(store) == dataset.item_num and store.tokens == list(dataset.field2id_token["item_id"])
    text, image = dataset.item_vectors["text"], dataset.item_vectors["image"]
    assert text.shape == (dataset.item_num, 32) and image.shape == (dataset.item_num, 32)
    assert not text[0].any() and not image[0].any()  # [PAD]
    assert np.allclose(np.linalg.norm(text[1:], axis=1), 1.0, atol=1e-5)
    no_image = dataset.field2token_id["item_id"]["i0003"]
    assert not image[no_image].any() and np.count_nonzero(np.linalg.norm(image, axis=1)) == ITEMS - 1
    info = dataset.item_vector_info
    assert info["text"]["describer"]["generated"] == ITEMS and info["text"]["computed"] == ITEMS
    assert info["image"]["computed"] == ITEMS - 1 and info["build_s"] > 0

    # independent reference: every text row is the sentence encoder's vector of the item's cached description
    cache = DescriptionCache(data / "descriptions", "mmfix")
    descriptions = cache.texts()
    encoder = SentenceEncoder(info["text"]["encoder"], max_length=config["text_encoder_max_length"])
    tokens = [store.token(i) for i in store.item_ids()]
    expected = encoder.encode([descriptions[t].strip() for t in tokens])
    assert np.allclose(text[list(store.item_ids())], expected, atol=1e-5)

    calls.reset()
    again = create_dataset(config)
    # the image encoder only sizes its output on one blank image (ImageEncoder.output_dim)
    assert calls.counts == {"load_describer": 0, "describe": 0, "encode_text": 0, "encode_image": 1, "item_store": 1}
    assert again.item_vector_info["text"]["reused"] == ITEMS and again.item_vector_info["image"]["reused"] == ITEMS - 1
    assert again.item_vector_info["text"]["describer"]["reused"] == ITEMS
    assert np.array_equal(again.item_vectors["text"], text) and np.array_equal(again.item_vectors["image"], image)


@pytest.mark.parametrize("model", ["VLM4Rec", "PRIME"])
def test_the_splits_share_the_store_and_vectors_without_building_them_again(data, monkeypatch, model):
    from recbole_mm.utils import create_dataset, data_preparation

    extra = {"text_source": "title"} if model == "VLM4Rec" else {}
    config = _config(data, model=model, **extra)
    dataset = create_dataset(config)
    assert isinstance(dataset, MultimodalSequentialDataset)

    def refuse(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(ItemStore, "__init__", refuse)
    monkeypatch.setattr(SentenceEncoder, "__init__", refuse)
    train, valid, test = data_preparation(config, dataset)
    for loader in (train, valid, test):
        assert loader._dataset is not dataset  # RecBole's build() made a copy per split ...
        assert loader._dataset.item_store is dataset.item_store  # ... that shares what the dataset built
        assert loader._dataset.item_vectors is dataset.item_vectors
    if model == "PRIME":  # PRIME's ranker reads the store of train_data._dataset; PRIME has no item vectors
        assert dataset.item_vectors == {}
        store = train._dataset.item_store
        side = data / "data" / "mmfix" / "mmfix.items.jsonl"
        records = {r["item_id"]: r for r in map(json.loads, side.read_text(encoding="utf-8").splitlines())}
        for i in store.item_ids():
            record = records[store.token(i)]
            assert store.attributes(i) == {k: v for k, v in record.items() if k not in ("item_id", "image")}
            assert store.image_path(i) == (side.parent / record["image"]).resolve()


def test_the_model_only_reads_the_vectors_of_its_dataset(data, monkeypatch):
    from recbole_mm.model.vlm4rec import VLM4Rec
    from recbole_mm.utils import create_dataset, data_preparation

    config = _config(data, text_source="generated", fusion="gating")
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)

    def refuse(*args, **kwargs):
        raise AssertionError("the model's __init__ must not build item vectors")

    from recbole_mm.lmm import item_vectors

    for owner, name in ((describer_module, "load_describer"), (describer_module, "generate_descriptions"),
                        (item_vectors, "build_item_vectors"), (item_vectors, "item_texts"),
                        (SentenceEncoder, "__init__"), (ImageEncoder, "__init__"), (ItemStore, "__init__")):
        monkeypatch.setattr(owner, name, refuse)
    model = VLM4Rec(config, train._dataset)
    assert torch.equal(model.text_emb, torch.as_tensor(dataset.item_vectors["text"]))
    assert torch.equal(model.image_emb, torch.as_tensor(dataset.item_vectors["image"]))
    assert model.build_info["text"]["cache"] == dataset.item_vector_info["text"]["cache"]


def test_vlm4rec_on_a_dataset_without_its_vectors_says_how_to_build_one(data):
    from recbole.data import create_dataset as recbole_create_dataset

    from recbole_mm.errors import UserError
    from recbole_mm.model.vlm4rec import VLM4Rec

    config = _config(data, text_source="title")
    plain = recbole_create_dataset(config)
    with pytest.raises(UserError, match=r"text item vectors from the dataset, but SequentialDataset has none.*"
                                        r"recbole_mm\.utils\.create_dataset"):
        VLM4Rec(config, plain)
    text_only = MultimodalSequentialDataset(config)
    config_concat = _config(data, text_source="title", fusion="concat")
    with pytest.raises(UserError, match=r"text and image item vectors.*has \['text'\]"):
        VLM4Rec(config_concat, text_only)


def test_other_models_keep_recboles_dataset(data):
    from recbole.data.dataset import SequentialDataset

    from recbole_mm.utils import create_dataset

    for model in ("LRURec", "SASRec"):
        dataset = create_dataset(_config(data, model=model))
        assert type(dataset) is SequentialDataset and not hasattr(dataset, "item_store")


def test_the_dataset_and_its_store_pickle(data):
    from recbole_mm.utils import create_dataset

    dataset = create_dataset(_config(data, text_source="title", fusion="concat"))
    store = dataset.item_store
    assert store.image(1) is not None  # fills the image cache
    copy = pickle.loads(pickle.dumps(dataset))  # RecBole's save_dataset, spawned DataLoader workers
    assert np.array_equal(copy.item_vectors["image"], dataset.item_vectors["image"])
    assert copy.item_store.attributes(2) == store.attributes(2)
    assert copy.item_store.image(1).tobytes() == store.image(1).tobytes()
    assert len(copy.item_store._cache) == 1  # the cache was not pickled, only refilled by the call above


def test_describer_defaults_come_from_the_yaml(data, tmp_path, capsys):
    import yaml

    from recbole_mm.config import Config
    from recbole_mm.lmm.describer import CONFIG_KEYS, main

    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(DescriberSettings))
    from recbole_mm.config import properties_dir

    with open(os.path.join(properties_dir(), "model", "VLM4Rec.yaml"), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    defaults = DescriberSettings.defaults()
    assert dataclasses.asdict(defaults) == {name: raw[key] for name, key in CONFIG_KEYS.items()}
    assert DescriberSettings.from_config(Config("VLM4Rec", "ml-100k")) == defaults
    assert DescriberSettings.from_config(Config("VLM4Rec", "ml-100k", config_dict={"describer_batch_size": 2})) \
        == DescriberSettings.defaults(batch_size=2)
    with pytest.raises(TypeError, match="no fields \\['batch'\\]"):
        DescriberSettings.defaults(batch=2)

    # the command line's defaults are the yaml's too: what it writes is keyed by the same settings
    folder = data / "data" / "mmfix"
    assert main(["--dataset=mmfix", f"--data_path={folder}", "--model=small", "--limit=2",
                 f"--out_dir={tmp_path}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["generated"] == 2
    meta = DescriptionCache(tmp_path, "mmfix").meta()
    assert meta["settings"] == DescriberSettings.defaults(model="small").identity()


def test_recommender_reads_the_interactions_again_without_building_vectors(data, monkeypatch):
    from recbole_mm.lmm import item_vectors
    from recbole_mm.model.vlm4rec import VLM4Rec
    from recbole_mm.recommend import Recommender
    from recbole_mm.utils import create_dataset, data_preparation

    config = _config(data, text_source="title")
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    rec = Recommender(config, VLM4Rec(config, train._dataset), dataset)

    def refuse(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(item_vectors, "build_item_vectors", refuse)
    monkeypatch.setattr(ItemStore, "__init__", refuse)
    inter = (data / "data" / "mmfix" / "mmfix.inter").read_text(encoding="utf-8").splitlines()[1:]
    first = inter[0].split("\t")
    user, items = first[0], [row.split("\t") for row in inter if row.split("\t")[0] == first[0]]
    expected = [rec.item_id(i) for i, _ in sorted(((r[1], float(r[2])) for r in items), key=lambda x: x[1])]
    assert rec.sequences()[rec.user_id(user)] == expected
    assert rec.title(expected[0]) == dataset.item_store.attributes(expected[0])["title"]


def test_a_full_ranking_batch_over_a_gib_is_warned_about_with_a_bound(tiny_dataset, caplog):
    import logging

    from recbole_mm.config import Config
    from recbole_mm.data.preparation import create_dataset, data_preparation

    data_path, name = tiny_dataset
    for batch, warned in ((64, False), (2 ** 24, True)):  # 2^24 users x 31 items x 4 B = 1.9 GiB
        config = Config("SASRec", name, config_dict=tiny_config(data_path, eval_batch_size=batch))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="recbole_mm.data.preparation"):
            data_preparation(config, create_dataset(config))
        messages = [r.getMessage() for r in caplog.records if "full-ranking batch" in r.getMessage()]
        assert bool(messages) == warned
    assert f"eval_batch_size={2 ** 24} users x 31 items" in messages[0] and "about 2164802" in messages[0]
