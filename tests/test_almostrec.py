"""ALMOSTREC: what trains, what reaches the LMM, full ranking per user, an end-to-end run."""

import torch

from conftest import tiny_config
from recbole_mm.quick_start import run_recbole_mm


def _config(data_path, tmp_path, **extra):
    settings = dict(
        almost_base_config={"epochs": 1, "hidden_size": 16, "inner_size": 32},
        ranker_model="small",
        ranker_small={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
        max_history_items=4, attr_max_tokens=4,
        almost_train_examples=16, almost_valid_users=8, almost_batch_size=4, almost_grad_accum=1,
        almost_warmup_steps=1, almost_valid_every=2, almost_patience=2, almost_learning_rate=0.01,
        topk=[5, 10], valid_metric="NDCG@10", artifacts_dir=str(tmp_path / "artifacts"))
    return tiny_config(data_path, **{**settings, **extra})


def _model_and_data(tiny_dataset, tmp_path, **extra):
    from recbole_mm.config import Config
    from recbole_mm.data.preparation import create_dataset, data_preparation
    from recbole_mm.model.almostrec import ALMOSTREC

    data_path, name = tiny_dataset
    config = Config("ALMOSTREC", name, config_dict=_config(data_path, tmp_path, **extra))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, ALMOSTREC(config, train._dataset), train, valid, test


def test_only_lora_wb_wt_train_and_m_stays_bit_identical(tiny_dataset, tmp_path):
    from recbole_mm.trainer.standalone import train_and_test
    from recbole_mm.config import Config
    from recbole_mm.trainer.checkpoint import safe_load

    data_path, name = tiny_dataset
    config = Config("ALMOSTREC", name, config_dict=_config(data_path, tmp_path))
    result, trainer, model = train_and_test(config, saved=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith(("w_b.", "w_t.")) for n in trainable), trainable
    assert any("lora_" in n for n in trainable) and "w_b.weight" in trainable and "w_t.weight" in trainable
    # M after stage 2 equals the stage-1 weights bit for bit
    base_file = next((tmp_path / "artifacts").glob("base-*/base.pth"))
    stage1 = safe_load(str(base_file), map_location="cpu")
    assert torch.equal(model.item_table.detach().cpu(), stage1["item_embedding.weight"])
    for n, p in model.base.state_dict().items():
        assert torch.equal(p.cpu(), stage1[n]), n
    # one more step: gradients reach exactly the trainable parameters, never M
    model.train()
    model.zero_grad(set_to_none=True)
    from recbole.data.interaction import Interaction
    rows = trainer.training_rows(_train_loader(config))
    model.calculate_loss(Interaction({k: v[:4] for k, v in rows.items()})).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "w_b.weight" in with_grad and "w_t.weight" in with_grad and any("lora_" in n for n in with_grad)
    assert with_grad <= set(trainable)
    assert model.item_table.grad is None
    assert result["test_result"] and 0 <= result["test_result"]["ndcg@10"] <= 1


def _train_loader(config):
    from recbole_mm.data.preparation import create_dataset, data_preparation

    return data_preparation(config, create_dataset(config))[0]


def test_one_token_per_history_item_at_its_position(tiny_dataset, tmp_path):
    config, model, train, _, _ = _model_and_data(tiny_dataset, tmp_path)
    assert not model.backbone.is_vision  # 'small' is the text-only tiny causal LM for ALMOSTREC
    model.eval()
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()
        captured["mask"] = kwargs["attention_mask"].detach().clone()

    handle = model.lm.register_forward_pre_hook(grab, with_kwargs=True)
    inter = train._dataset.inter_feat[:6]
    with torch.no_grad():
        model.full_sort_predict(inter)
    handle.remove()
    seq, lengths = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
    tok, table = model.tokenizer, model.lm.get_input_embeddings().weight
    store = train._dataset.item_store
    w, b = model.w_b.weight.detach(), model.w_b.bias.detach()
    for r in range(len(seq)):
        history = seq[r, max(0, int(lengths[r]) - 4):int(lengths[r])].tolist()
        # the expected sequence, rebuilt from the store's titles and the tokenizer
        ids, slots = tok(config["almost_instruction"].format(domain=config["prompt_domain"]),
                         add_special_tokens=False)["input_ids"], []
        for item in history:
            title = store.get(item, "title") or store.token(item)
            ids = ids + tok(str(title), add_special_tokens=False)["input_ids"][:4]
            slots.append(len(ids))
            ids = ids + [-1]
        ids = ids + tok(config["almost_answer_prefix"], add_special_tokens=False)["input_ids"]
        assert int(captured["mask"][r].sum()) == len(ids)
        embeds = captured["embeds"][r]
        for p, t in enumerate(ids):
            if t >= 0:
                assert torch.equal(embeds[p], table[t]), (r, p)
        assert len(slots) == len(history)  # one token per history item
        expected = model.item_table.detach()[history] @ w.T + b
        assert torch.allclose(embeds[slots], expected, atol=1e-6)


def test_full_sort_predict_is_the_heads_output_per_user_and_batch_independent(tiny_dataset, tmp_path):
    _, model, _, _, test = _model_and_data(tiny_dataset, tmp_path)
    model.eval()
    inter = next(iter(test))[0]
    with torch.no_grad():
        batch = model.full_sort_predict(inter)
        assert batch.shape == (len(inter), model.n_items)
        for r in range(min(len(inter), 6)):
            alone = model.full_sort_predict(inter[[r]])
            assert torch.allclose(batch[r], alone[0], atol=1e-5)
            # the head on the last hidden state of this user's prompt alone
            embeds, mask, _, last = model.build_inputs(model.histories(inter[[r]]))
            hidden = model.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            head = hidden[0, int(last[0])] @ model.w_t.weight.T + model.w_t.bias
            assert torch.allclose(alone[0], head, atol=1e-5)
        # the answer's field is never read: another answer leaves the scores unchanged
        rows = test._dataset.inter_feat[:5]
        before = model.full_sort_predict(rows)
        rows.interaction[model.POS_ITEM_ID] = torch.ones_like(rows[model.POS_ITEM_ID])
        assert torch.equal(model.full_sort_predict(rows), before)


def test_end_to_end_and_the_base_stage_is_reused(tiny_dataset, tmp_path):
    data_path, name = tiny_dataset
    cfg = _config(data_path, tmp_path, almost_train_positions="last")
    first = run_recbole_mm("ALMOSTREC", name, config_dict=cfg)
    assert set(first["test_result"]) >= {"ndcg@10", "recall@10"}
    assert "train_s_per_example" in first["stages"]["head"]
    assert first["stages"]["head"]["examples"] <= 16
    second = run_recbole_mm("ALMOSTREC", name, config_dict=cfg)
    assert second["stages"]["base"].get("reused") is True
    assert second["test_result"] == first["test_result"]


def test_benchmark_smoke_writes_the_table(tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "almostrec.py")
    spec = importlib.util.spec_from_file_location("almostrec_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke", f"--out={tmp_path / 'bench'}"])
    assert [r["label"] for r in rows] == ["SASRec", "GRU4Rec", "LRURec", "ALMOSTREC on SASRec", "ALMOSTREC on GRU4Rec"]
    for r in rows:
        assert 0 <= r["ndcg@10"] <= r["ndcg@20"] <= 1 and r["recall@10"] <= r["recall@20"]
        assert r["peak_rss_mb"] > 0
    assert all(r["train_s_per_example"] > 0 and r["eval_s_per_user"] > 0 for r in rows[3:])
    # ALMOSTREC on X reads the X row's own checkpoint, so "X alone" is the table it projects
    assert [r["base_checkpoint"] for r in rows[3:]] == [rows[0]["saved_model_file"], rows[1]["saved_model_file"]]
    assert all(os.path.isfile(r["saved_model_file"]) for r in rows[:3])
    text = (tmp_path / "bench" / "almostrec_mmfix.md").read_text()
    assert "ALMOSTREC on GRU4Rec" in text and "ndcg@20" in text


def test_an_unknown_embedding_field_is_one_line_naming_it(tiny_dataset, tmp_path):
    import pytest

    from recbole_mm.errors import ConfigError

    with pytest.raises(ConfigError, match="almost_embedding_field='nope'"):
        _model_and_data(tiny_dataset, tmp_path, almost_embedding_field="nope")


# ------------------------------------------------------------------------------ with images
def _vision_model(tiny_dataset, tmp_path, **extra):
    """ALMOSTREC on the tiny Qwen2-VL (almost_images: true), each item's image at 56x56 (4 tokens)
    to 84x84 pixels."""
    settings = {"almost_images": True, "image_min_pixels": 56 * 56, "image_max_pixels": 84 * 84, **extra}
    return _model_and_data(tiny_dataset, tmp_path, **settings)


def _qwen2_vl_size(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 84 * 84):
    """Qwen2-VL's resize rule (its model card): each side rounded to a multiple of ``factor`` (two
    14-pixel patches, merged 2x2 into one token), then scaled into [min_pixels, max_pixels]."""
    import math

    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _language_model(model):
    return model.lm.get_base_model().model.language_model


def test_with_images_each_behaviour_token_follows_its_image_and_title_tokens(tiny_dataset, tmp_path):
    config, model, train, _, _ = _vision_model(tiny_dataset, tmp_path)
    assert model.backbone.is_vision and model.use_images
    store = train._dataset.item_store
    inter = train._dataset.inter_feat[:8]
    seq, lengths = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
    histories = [seq[r, max(0, int(lengths[r]) - 4):int(lengths[r])].tolist() for r in range(len(seq))]
    # one item loses its image (the file is gone): it shows its title and behaviour token only
    without = histories[-1][-1]
    store.image_path(without).unlink()
    assert store.image(without) is None
    assert any(without in h and len(set(h)) > 1 for h in histories)
    model.eval()
    captured = {}

    def grab_ids(module, args, kwargs):
        captured["ids"], captured["mask"] = kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()

    def grab_embeds(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handles = [model.lm.get_base_model().register_forward_pre_hook(grab_ids, with_kwargs=True),
               _language_model(model).register_forward_pre_hook(grab_embeds, with_kwargs=True)]
    with torch.no_grad():
        model.full_sort_predict(inter)
    for h in handles:
        h.remove()
    tok, table = model.tokenizer, model.lm.get_input_embeddings().weight
    start, pad_id, end = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    w, b = model.w_b.weight.detach(), model.w_b.bias.detach()
    for r, history in enumerate(histories):
        # the expected sequence, rebuilt from the store's titles and images, the tokenizer and
        # Qwen2-VL's resize rule (28-pixel cells of 2x2 merged 14-pixel patches = one token each)
        ids = tok(config["almost_instruction"].format(domain=config["prompt_domain"]),
                  add_special_tokens=False)["input_ids"]
        slots, image_spans = [], []
        for item in history:
            img = store.image(item)
            if img is not None:
                h, w_px = _qwen2_vl_size(img.height, img.width)
                n = (h // 28) * (w_px // 28)
                image_spans.append((len(ids) + 1, n))
                ids = ids + [start] + [pad_id] * n + [end]
            title = store.get(item, "title") or store.token(item)
            ids = ids + tok(str(title), add_special_tokens=False)["input_ids"][:4]
            slots.append(len(ids))  # right after the title tokens (and the image before them)
            ids = ids + [-1]
        ids = ids + tok(config["almost_answer_prefix"], add_special_tokens=False)["input_ids"]
        assert int(captured["mask"][r].sum()) == len(ids)
        got = captured["ids"][r, :len(ids)].tolist()
        assert [g for g, e in zip(got, ids) if e >= 0] == [e for e in ids if e >= 0]
        assert len(image_spans) == sum(store.image(i) is not None for i in history)
        embeds = captured["embeds"][r]
        expected = model.item_table.detach()[history] @ w.T + b
        assert torch.allclose(embeds[slots], expected, atol=1e-6)  # one behaviour token per item, at its slot
        for p, t in enumerate(ids):
            if t >= 0 and t != pad_id:
                assert torch.equal(embeds[p], table[t]), (r, p)
        for first, n in image_spans:  # the vision tower's output replaced every image placeholder
            assert not torch.isclose(embeds[first:first + n], table[pad_id].expand(n, -1)).all(dim=1).any()
    assert any(without in h for h in histories) and store.image(without) is None


def test_with_images_another_image_changes_scores_and_batches_are_independent(tiny_dataset, tmp_path):
    from PIL import Image

    # no cache of processed images: the store's image is read on every call
    _, model, _, _, test = _vision_model(tiny_dataset, tmp_path, almost_image_cache=0)
    model.eval()
    inter = next(iter(test))[0][:10]
    histories = model.histories(inter)
    with torch.no_grad():
        batch = model.full_sort_predict(inter)
        assert batch.shape == (len(inter), model.n_items) and torch.isfinite(batch).all()
        for r in range(len(inter)):
            alone = model.full_sort_predict(inter[[r]])
            assert torch.allclose(batch[r], alone[0], atol=1e-5), r
        # another picture for one item: the rows that show it score differently, the others do not
        item = histories[0][-1]
        store, original = model.store, model.store.image

        def image(i):
            return Image.new("RGB", original(i).size, (255, 255, 255)) if i == item else original(i)

        store.image = image
        try:
            changed = model.full_sort_predict(inter)
        finally:
            del store.image
    shows = torch.tensor([item in h for h in histories])
    assert shows.any() and not shows.all()
    assert ((changed - batch).abs().amax(1)[shows] > 1e-4).all()
    assert torch.allclose(changed[~shows], batch[~shows], atol=1e-5)


def test_cached_image_segments_equal_the_processors_batch(tiny_dataset, tmp_path):
    _, model, _, _, test = _vision_model(tiny_dataset, tmp_path, almost_image_cache=5)
    inter = next(iter(test))[0][:6]
    histories = model.histories(inter)
    first, _, _ = model.build_image_inputs(histories)
    assert 0 < len(model._image_cache) <= 5
    again, _, _ = model.build_image_inputs(histories)  # partly from the cache
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # the pixels equal one processor call over every shown image, in order (as PRIME's encode does)
    shown = [img for row in model.item_images(histories) for img in row if img is not None]
    batch = model.processor(text=[model._image_text] * len(shown), images=shown, return_tensors="pt")
    assert torch.equal(first["pixel_values"], batch["pixel_values"])
    assert torch.equal(first["image_grid_thw"], batch["image_grid_thw"])
    assert int((first["input_ids"] == model.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == int(
        (batch["input_ids"] == model.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    model.image_cache_size = 0
    cold, _, _ = model.build_image_inputs(histories)
    assert all(torch.equal(first[k], cold[k]) for k in first)


def test_end_to_end_with_images_trains_lora_wb_wt_and_m_stays_bit_identical(tiny_dataset, tmp_path):
    from recbole_mm.config import Config
    from recbole_mm.trainer.checkpoint import safe_load
    from recbole_mm.trainer.standalone import train_and_test

    data_path, name = tiny_dataset
    config = Config("ALMOSTREC", name, config_dict=_config(data_path, tmp_path, almost_images=True,
                                                           almost_train_positions="last"))
    result, trainer, model = train_and_test(config, saved=True)
    assert model.use_images and model.backbone.is_vision
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith(("w_b.", "w_t.")) for n in trainable), trainable
    assert not any("visual" in n for n in trainable) and any("lora_" in n for n in trainable)
    stage1 = safe_load(str(next((tmp_path / "artifacts").glob("base-*/base.pth"))), map_location="cpu")
    for n, p in model.base.state_dict().items():
        assert torch.equal(p.cpu(), stage1[n]), n
    assert set(result["test_result"]) >= {"ndcg@10", "recall@10"} and 0 <= result["test_result"]["ndcg@10"] <= 1
    head = result["stages"]["head"]
    assert head["examples"] <= 16 and head["steps"] > 0 and head["key"]


def test_almost_images_settings(tiny_dataset, tmp_path):
    import pytest

    from recbole_mm.errors import ConfigError
    from recbole_mm.lmm.tiny_models import build_tiny_causal_lm, build_tiny_vlm
    from recbole_mm.model.almostrec import images_mode

    assert [images_mode(v) for v in ("auto", "AUTO", True, "true", False, "False")] == [
        "auto", "auto", True, True, False, False]
    with pytest.raises(ConfigError, match="almost_images='sometimes'"):
        _model_and_data(tiny_dataset, tmp_path, almost_images="sometimes")
    # a backbone without a vision tower: auto is the text path, true is an error naming the model
    folder = build_tiny_causal_lm(str(tmp_path / "lm"), ["a title", "another title"], hidden_size=32,
                                  num_layers=1, num_heads=2, vocab_size=300)
    _, model, _, _, _ = _model_and_data(tiny_dataset, tmp_path, ranker_model=folder)
    assert not model.use_images
    with pytest.raises(ConfigError, match=r"almost_images=true: ranker_model=.*has no vision tower"):
        _model_and_data(tiny_dataset, tmp_path, ranker_model=folder, almost_images=True)
    # small with almost_images: false (or auto) is the text-only tiny LM; a vision backbone given by
    # its folder with almost_images: false takes the text path (inputs_embeds, no image)
    _, model, _, _, _ = _vision_model(tiny_dataset, tmp_path, almost_images=False)
    assert not model.backbone.is_vision
    vlm = build_tiny_vlm(str(tmp_path / "vlm"), ["a title", "another title"], hidden_size=32, num_layers=1,
                         num_heads=2, vocab_size=300)
    _, model, _, _, test = _vision_model(tiny_dataset, tmp_path, ranker_model=vlm, almost_images=False)
    assert model.backbone.is_vision and not model.use_images
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.full_sort_predict(next(iter(test))[0][:3])).all()


def test_every_key_of_almostrec_is_classified():
    import yaml

    from recbole_mm.trainer.almostrec import almostrec_stage_keys
    from recbole_mm.trainer.stage_store import EVERY_STAGE, StageKeys

    keys = almostrec_stage_keys()
    folder = __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.dirname(
        __import__("os").path.abspath(__file__))), "properties", "model")
    shipped = {}
    for name in ("_lmm", "ALMOSTREC"):
        with open(f"{folder}/{name}.yaml", encoding="utf-8") as f:
            shipped.update(yaml.safe_load(f))
    assert set(keys.keys) == set(shipped)
    assert keys.unclassified() == [], "declare these keys: a stage rule, every_stage or evaluation-only"
    # the embedding model retrains on its own settings only (and the seed); the head's and the
    # backbone's settings never retrain it; evaluation-only settings key neither stage
    assert keys.stage_keys("base") == ["almost_base_checkpoint", "almost_base_config", "almost_base_model", "seed"]
    head = set(keys.stage_keys("head"))
    assert {"almost_images", "almost_learning_rate", "almost_embedding_field", "lora_r", "ranker_model",
            "image_max_pixels", "max_history_items", "attr_max_tokens", "seed"} <= head
    assert not head & {"almost_base_model", "almost_eval_batch_size", "almost_log_every", "artifacts_dir", "topk"}
    evaluation_only = ("almost_eval_batch_size", "almost_log_every", "almost_image_cache", "artifacts_dir")
    assert {k: keys.classify(k) for k in evaluation_only} == dict.fromkeys(evaluation_only)
    # a new key nobody declared keys both stages: it retrains the base rather than reusing it
    bigger = StageKeys(keys.stages, keys.rules, [*keys.keys, "brand_new", "almost_new"], keys.every_stage,
                       keys.evaluation_only, keys.inputs)
    assert bigger.classify("brand_new") == EVERY_STAGE and "brand_new" in bigger.stage_keys("base")
    assert bigger.classify("almost_new") == "head"
