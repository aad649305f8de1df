"""ALMOSTREC: what trains, what reaches the LMM, full ranking per user, an end-to-end run."""

import torch

from conftest import tiny_config
from recbole_mm.quick_start import run_recbole_mm


def _config(data_path, tmp_path, **extra):
    return tiny_config(
        data_path,
        almost_base_config={"epochs": 1, "hidden_size": 16, "inner_size": 32},
        ranker_model="small",
        ranker_small={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
        max_history_items=4, attr_max_tokens=4,
        almost_train_examples=16, almost_valid_users=8, almost_batch_size=4, almost_grad_accum=1,
        almost_warmup_steps=1, almost_valid_every=2, almost_patience=2, almost_learning_rate=0.01,
        topk=[5, 10], valid_metric="NDCG@10", artifacts_dir=str(tmp_path / "artifacts"), **extra)


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
