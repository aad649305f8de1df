"""PRIME: the two-stage ranking composition, a short end-to-end run, resume of finished stages."""

import os

import pytest
import torch

from conftest import tiny_config
from recbole_mm.model.prime import PRIME
from recbole_mm.quick_start import run_recbole_mm


def test_compose_puts_ranked_candidates_first_then_retriever_order():
    scores = torch.tensor([[-torch.inf, 5.0, 4.0, 3.0, 2.0, 1.0],
                           [-torch.inf, 1.0, 2.0, 3.0, 4.0, 5.0]])
    candidates = torch.tensor([[1, 2, 3], [5, 4, 3]])
    rows = torch.tensor([0])  # only row 0 is reranked; row 1 keeps the retriever's order
    ranker = torch.tensor([[0.1, 0.9, -3.0]])  # ranker prefers item 2, then 1, then 3
    out = PRIME.compose(scores, candidates, rows, ranker)
    assert torch.argsort(out[0], descending=True)[:5].tolist() == [2, 1, 3, 4, 5]
    assert torch.argsort(out[1], descending=True)[:5].tolist() == [5, 4, 3, 2, 1]
    assert out[0, 0] == -torch.inf and out[1, 0] == -torch.inf


def _prime_config(data_path, tmp_path):
    return tiny_config(
        data_path,
        MAX_ITEM_LIST_LENGTH=10,
        load_col={"inter": ["user_id", "item_id", "timestamp"]},
        retriever_config={"epochs": 1, "hidden_size": 16, "train_batch_size": 64},
        ranker_model="small",
        ranker_small={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
        n_candidates=6,
        topk=[1, 5, 6],
        valid_metric="NDCG@5",
        max_history_items=4,
        attr_max_tokens=8,
        image_min_pixels=784,
        image_max_pixels=784,
        ranker_train_examples=12,
        ranker_valid_users=6,
        ranker_batch_size=2,
        ranker_grad_accum=2,
        ranker_eval_batch_size=8,
        ranker_warmup_steps=1,
        ranker_valid_every=2,
        ranker_patience=2,
        artifacts_dir=str(tmp_path / "artifacts"),
        preference_optimization=False,  # stage 3 has its own tests (test_preference.py)
    )


def test_prime_end_to_end_and_resume(tiny_dataset, tmp_path):
    data_path, name = tiny_dataset
    cfg = _prime_config(data_path, tmp_path)
    first = run_recbole_mm("PRIME", name, config_dict=cfg)
    for key in ("test_result", "retriever_test_result", "retriever_valid_result", "best_valid_result"):
        assert set(first[key]) >= {"ndcg@5", "recall@5", "mrr@5"}, key
        assert all(0.0 <= v <= 1.0 for v in first[key].values())
    stages = first["stages"]
    assert {"retriever", "ranker", "evaluate_valid", "evaluate_test"} <= set(stages)
    assert "preference" not in stages  # the "w/o preference optimization" ablation
    assert stages["ranker"]["train_prompts"] == 12 and 0 < stages["ranker"]["trainable_share"] < 1
    assert first["saved_model_file"] == first["manifest_file"] and os.path.isfile(first["manifest_file"])
    for role, path in first["artifacts"].items():
        if role == "ranker_adapter":  # peft's folder; safetensors, no pickle
            assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        else:
            assert os.path.isfile(path) and torch.load(path, weights_only=True)
    # the ranker only reorders the top-k: recall at the candidate cutoff cannot change
    assert first["test_result"]["recall@6"] == first["retriever_test_result"]["recall@6"]
    # reported cutoffs do not change trained weights: a re-run with another topk reuses both stages
    second = run_recbole_mm("PRIME", name, config_dict={**cfg, "topk": [1, 3, 5, 6]})
    assert second["stages"]["retriever"].get("reused") and second["stages"]["ranker"].get("reused")
    assert {k: v for k, v in second["test_result"].items() if k in first["test_result"]} == first["test_result"]
    assert {k: v for k, v in second["retriever_test_result"].items()
            if k in first["retriever_test_result"]} == first["retriever_test_result"]
    assert "ndcg@3" in second["test_result"]


def _stage_file(artifacts, stage, name):
    (folder,) = [f for f in os.listdir(artifacts) if f.startswith(stage + "-")]
    return os.path.join(artifacts, folder, name)


def test_stage2_adapter_does_not_depend_on_stage1_running_in_the_same_process(tiny_dataset, tmp_path):
    import shutil

    data_path, name = tiny_dataset
    cfg = _prime_config(data_path, tmp_path)
    artifacts = cfg["artifacts_dir"]
    first = run_recbole_mm("PRIME", name, config_dict=cfg)  # stage 1 trains here, then stage 2
    assert not first["stages"]["retriever"].get("reused")
    from safetensors.torch import load_file

    weights = os.path.join("adapter", "adapter_model.safetensors")  # peft's format, the only adapter file
    assert not os.path.exists(_stage_file(artifacts, "ranker", "adapter.pth"))
    adapter = load_file(_stage_file(artifacts, "ranker", weights))
    shutil.rmtree(os.path.dirname(_stage_file(artifacts, "ranker", "adapter")))
    second = run_recbole_mm("PRIME", name, config_dict=cfg)  # stage 1 reused, stage 2 trained again
    assert second["stages"]["retriever"].get("reused") and not second["stages"]["ranker"].get("reused")
    assert second["stages"]["ranker"]["key"] == first["stages"]["ranker"]["key"]
    again = load_file(_stage_file(artifacts, "ranker", weights))
    assert adapter.keys() == again.keys() and adapter
    for key in adapter:
        torch.testing.assert_close(again[key], adapter[key], rtol=0, atol=0)
    assert second["test_result"] == first["test_result"]


def _earlier_minus_answer(seqs, users, items, uid, ts, answer):
    """Ground truth from the .inter file: the user's items before time ``ts``, minus the answer."""
    seq = seqs[users[uid]]
    return {i for i, t in seq if t < ts} - {items[answer]}


def _prime_loaders(data_path, name, tmp_path, mask):
    from recbole_mm.config import Config
    from recbole_mm.trainer.prime import PRIMETrainer
    from recbole_mm.utils import create_dataset, data_preparation

    config = Config("PRIME", name, config_dict={**_prime_config(data_path, tmp_path), "mask_history": mask,
                                                "n_candidates": 10})
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    trainer = PRIMETrainer(config, PRIME(config, train_data._dataset))
    return dataset, train_data, valid_data, trainer


@pytest.mark.parametrize("mask", [False, True])
def test_ranker_validation_candidates_follow_mask_history(tiny_dataset, tmp_path, mask):
    from test_runs import _user_sequences

    from recbole_mm.trainer.prime import prime_stage_keys

    data_path, name = tiny_dataset
    dataset, _, valid_data, trainer = _prime_loaders(data_path, name, tmp_path, mask)
    examples = trainer.validation_examples(valid_data, users=None)
    feat = valid_data._dataset.inter_feat
    seqs = _user_sequences(data_path, name, with_time=True)
    users, items = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    earlier_candidates = repeated_answer_found = 0
    rows = torch.randperm(len(feat), generator=torch.Generator().manual_seed(trainer.config["seed"] + 1))
    for r, j in enumerate(rows.tolist()):
        answer = int(feat["item_id"][j])
        earlier = _earlier_minus_answer(seqs, users, items, int(feat["user_id"][j]), float(feat["timestamp"][j]),
                                        answer)
        cands = {items[i] for i in examples.candidates[r].tolist()}
        earlier_candidates += len(cands & earlier)
        repeated_answer_found += examples.answer_pos[r] >= 0 and items[answer] in {i for i, _ in seqs[users[int(
            feat["user_id"][j])]] if _ < float(feat["timestamp"][j])}
    assert (earlier_candidates == 0) == mask
    if mask:
        assert repeated_answer_found > 0  # an answer that repeats an earlier item stays a candidate
    assert "mask_history" in prime_stage_keys().stage_keys("ranker")  # the adapter's early stopping depends on it
