"""PRIME: the two-stage ranking composition, a short end-to-end run, resume of finished stages."""

import os

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
    assert first["saved_model_file"] is None
    for path in first["artifacts"].values():
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
