"""PRIME's switches towards the reference code (issue 22): retriever selection metric, the ranker's
prefix filter, negative-sampling counts, optimizer settings, and the prime-reference preset."""

import os
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from recbole_mm.errors import ConfigError
from recbole_mm.trainer.prime import popularity_counts, prefix_filter
from test_prime import _prime_config, _prime_loaders
from test_runs import _user_sequences


def _prime_model_config(data_path, name, tmp_path, **extra):
    from recbole_mm.config import Config
    from recbole_mm.model.prime import retriever_config

    config = Config("PRIME", name, config_dict={**_prime_config(data_path, tmp_path), **extra})
    return retriever_config(config)


def test_retriever_selects_on_recall_at_n_candidates_by_default(tiny_dataset, tmp_path):
    data_path, name = tiny_dataset
    rconf = _prime_model_config(data_path, name, tmp_path, n_candidates=7, topk=[1, 5], valid_metric="NDCG@5")
    assert rconf["valid_metric"] == "Recall@7" and 7 in rconf["topk"] and {1, 5} <= set(rconf["topk"])
    rconf = _prime_model_config(data_path, name, tmp_path, retriever_valid_metric="MRR@5",
                                metrics=["Recall", "NDCG"])
    assert rconf["valid_metric"] == "MRR@5" and "MRR" in rconf["metrics"]
    # retriever_config, the retriever's own overrides, still wins
    rconf = _prime_model_config(data_path, name, tmp_path, retriever_config={"valid_metric": "NDCG@5", "epochs": 1})
    assert rconf["valid_metric"] == "NDCG@5"
    with pytest.raises(ConfigError, match="retriever_valid_metric='Recall@x'"):
        _prime_model_config(data_path, name, tmp_path, retriever_valid_metric="Recall@x")


def test_prefix_filter_by_hand():
    # user 1: histories 1..5 -> keeps 4, 5; user 2: 1..2 (none >= 4) -> keeps its longest (2); user 3: 4 -> keeps it
    users = torch.tensor([1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    lengths = torch.tensor([1, 2, 3, 4, 5, 1, 2, 1, 2, 3, 4])
    keep = prefix_filter(users, lengths, 4)
    assert keep.tolist() == [False, False, False, True, True, False, True, False, False, False, True]
    assert prefix_filter(users, lengths, 1).all()


def _train_lengths(data_path, name):
    """Training items per user (all but the last two) from the .inter file, in RecBole's user order."""
    seqs = _user_sequences(data_path, name, with_time=True)
    return {u: [i for i, _ in sorted(s, key=lambda p: p[1])][:-2] for u, s in seqs.items()}


def test_ranker_min_history_prompt_count_matches_hand_count(tiny_dataset, tmp_path):
    data_path, name = tiny_dataset
    _, train_data, valid_data, trainer = _prime_loaders(data_path, name, tmp_path, False)
    trainer.config["ranker_train_examples"] = None
    trainer.model.max_history = 50  # whole prefixes (MAX_ITEM_LIST_LENGTH 10 still caps them, above m)
    train = _train_lengths(data_path, name)
    for m in (1, 4, 6):
        trainer.config["ranker_min_history"] = m
        examples = trainer.training_examples(train_data, valid_data)
        # a user with n training items has prefixes with 1..n-1 history items
        expected = sum(max(1, (len(s) - 1) - (m - 1)) if m > 1 else len(s) - 1 for s in train.values())
        assert len(examples) == expected, m
        if m > 1:
            short = sum(1 for s in train.values() if len(s) - 1 < m)
            n_short = sum(1 for h in examples.histories if len(h) < m)
            assert n_short == short  # one prompt (its longest prefix) per user without a long enough one
    assert trainer.config["ranker_min_history"] == 6 and expected < sum(len(s) - 1 for s in train.values())


def test_reference_popularity_counts_match_the_inter_file(tiny_dataset, tmp_path):
    from recbole_mm.sampler.ranker_negatives import RankerNegativeSampler

    data_path, name = tiny_dataset
    dataset, train_data, valid_data, trainer = _prime_loaders(data_path, name, tmp_path, False)
    counts = popularity_counts(train_data._dataset, valid_data._dataset, "item_id_list", "item_length", "item_id")
    seqs = _user_sequences(data_path, name, with_time=True)
    hand = Counter()
    for s in seqs.values():
        hand.update(i for i, _ in sorted(s, key=lambda p: p[1])[:-1])  # training sequence + validation item
    tokens = dataset.field2id_token["item_id"]
    assert counts[0] == 0
    assert [int(c) for c in counts[1:]] == [hand[tokens[i]] + 1 for i in range(1, len(tokens))]
    sampler = RankerNegativeSampler(train_data._dataset, counts=counts.numpy())
    np.testing.assert_allclose(sampler.prob, counts.numpy() / counts.sum())
    assert (sampler.prob[1:] > 0).all()  # every item can be drawn
    trainer.config["ranker_negative_counts"] = "train_valid"
    with pytest.raises(ConfigError, match="ranker_negative_counts='train_valid'"):
        trainer.training_examples(train_data, valid_data)


def test_make_optimizer_settings():
    from recbole_mm.trainer.ranker import make_optimizer

    p = [torch.nn.Parameter(torch.ones(3))]
    opt = make_optimizer(p, "adamw", 1e-3, 0.01)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="ranker_optimizer='sgd'"):
        make_optimizer(p, "sgd", 1e-3, 0.0)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs bitsandbytes"):
            make_optimizer(p, "adamw_8bit", 1e-3, 0.0)


def test_ranker_clips_gradients_at_ranker_max_grad_norm(monkeypatch, tiny_dataset, tmp_path):
    """One ranker step under the preset's ranker settings: the clip norm and weight decay reach torch."""
    from recbole_mm.trainer.ranker import RankerTrainer

    data_path, name = tiny_dataset
    _, train_data, valid_data, trainer = _prime_loaders(data_path, name, tmp_path, False)
    trainer.config["ranker_max_grad_norm"] = 5.0
    trainer.config["ranker_weight_decay"] = 0.01
    ranker = trainer.build_ranker(train_data._dataset)
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: seen.append(norm) or real(params, norm))
    rt = RankerTrainer(ranker, trainer.config, str(tmp_path))
    assert rt.optimizer.param_groups[0]["weight_decay"] == 0.01
    train = trainer.training_examples(train_data, valid_data).subset(range(4))
    rt.fit(train, trainer.validation_examples(valid_data, users=4))
    assert seen and set(seen) == {5.0}


def test_prime_reference_preset_switches_every_option():
    from recbole_mm.config import properties_dir

    with open(os.path.join(properties_dir(), "preset", "prime-reference.yaml"), encoding="utf-8") as f:
        preset = yaml.safe_load(f)
    with open(os.path.join(properties_dir(), "model", "PRIME.yaml"), encoding="utf-8") as f:
        defaults = yaml.safe_load(f)
    assert preset["retriever_valid_metric"] == "Recall@25"
    assert preset["retriever_config"] == {"dropout_prob": 0.6, "attn_dropout_prob": 0.6, "weight_decay": 0.0,
                                          "train_batch_size": 64, "stopping_step": 10}
    for key, value in {"ranker_min_history": 4, "ranker_negative_counts": "train_valid_plus_one",
                       "ranker_optimizer": "adamw_8bit", "ranker_weight_decay": 0.01, "ranker_max_grad_norm": 5.0,
                       "ranker_valid_users": None, "ranker_batch_size": 2, "prompt_text": "reference",
                       "ranker_loss_tokens": "letter_end_newline", "pref_answer_rule": "reference",
                       "pref_step_unit": "users", "pref_batch_size": 64}.items():
        assert preset[key] == value, key
        assert key in defaults and defaults[key] != value, key  # ours stays the default
    assert preset["ranker_batch_size"] * preset["ranker_grad_accum"] == 32  # the reference's 2 x 16
    from recbole_mm.config_keys import unknown_key_messages

    assert unknown_key_messages({"prime-reference.yaml": preset}) == []


def test_gumbel_draw_order_is_the_sequential_draw_order():
    from recbole_mm.sampler.candidate_sets import gumbel_top_k

    log_probs = torch.randn(4, 20, generator=torch.Generator().manual_seed(0)).log_softmax(1)
    drawn = gumbel_top_k(log_probs, 5, torch.Generator().manual_seed(11), draw_order=True)
    sorted_ = gumbel_top_k(log_probs, 5, torch.Generator().manual_seed(11))
    # the same set; draw order = descending Gumbel key, recomputed here from the same uniforms
    u = torch.rand(log_probs.shape, generator=torch.Generator().manual_seed(11))
    keys = log_probs - torch.log(-torch.log(u))
    assert drawn.tolist() == keys.argsort(1, descending=True)[:, :5].tolist()
    assert [sorted(r) for r in drawn.tolist()] == [sorted(r) for r in sorted_.tolist()]


def test_reference_answer_rule_no_redraw_answer_replaces_first_drawn():
    from recbole_mm.sampler.candidate_sets import BOTH, FORCED, CandidateSetSampler

    logits = torch.zeros(2, 12)
    logits[:, 0] = -torch.inf
    logits[0, 7] = 40.0   # row 0: the answer 7 is (almost) certain -> in both sets
    logits[1, 9] = -60.0  # row 1: the answer 9 is (almost) never drawn -> forced at once
    log_probs = logits.log_softmax(1)
    pairs = CandidateSetSampler(k=3, max_tries=4, rule="reference").sample(
        log_probs, torch.tensor([7, 9]), torch.Generator().manual_seed(3))
    assert pairs.outcome.tolist() == [BOTH, FORCED] and pairs.tries.tolist() == [1, 1]
    # the first set as drawn (same generator state: the first draw of the call), its first item replaced
    g = torch.Generator().manual_seed(3)
    from recbole_mm.sampler.candidate_sets import gumbel_top_k

    first = gumbel_top_k(log_probs, 3, g, draw_order=True)
    assert pairs.first[1].tolist() == [9] + first[1, 1:].tolist()
    with pytest.raises(ConfigError, match="pref_answer_rule='x'"):
        CandidateSetSampler(k=3, rule="x")


def test_step_units_group_rows_by_user():
    from types import SimpleNamespace

    from recbole_mm.trainer.preference import step_units

    ds = SimpleNamespace(uid_field="user_id", inter_feat={"user_id": torch.tensor([2, 1, 2, 3, 1, 2])})
    assert [u.tolist() for u in step_units(ds, "users")] == [[1, 4], [0, 2, 5], [3]]
    assert step_units(ds, "prefixes") is None
    with pytest.raises(ConfigError, match="pref_step_unit='rows'"):
        step_units(ds, "rows")


def test_stage3_reference_steps_count_users(tiny_dataset, tmp_path):
    from recbole_mm.quick_start import run_recbole_mm
    from test_preference import _stage3_config

    data_path, name = tiny_dataset
    cfg = _stage3_config(data_path, tmp_path, pref_step_unit="users", pref_batch_size=16, pref_train_examples=None,
                         pref_answer_rule="reference", pref_valid_every=100)
    info = run_recbole_mm("PRIME", name, config_dict=cfg)["stages"]["preference"]
    train = _train_lengths(data_path, name)
    assert info["prefixes_per_epoch"] == len(train) == 50  # users
    assert info["total_steps"] == info["steps"] == 4  # ceil(50 / 16)
    assert sum(info["pairs"].values()) == sum(len(s) - 1 for s in train.values())  # every prefix, once


def test_reference_prompt_text():
    from recbole_mm.lmm.prompts import PromptSettings, build_prompt, prompt_text_settings

    item = {"attributes": {"title": "Soap"}, "image": None}
    text = "".join(p for p in build_prompt([item], [item, item], PromptSettings(
        variant="no_image", **prompt_text_settings("reference"))).parts if isinstance(p, str))
    assert text.startswith("Based on the user's browsing history and a collection of candidate items (both provided "
                           "in JSON format), recommend the most suitable item by specifying its index letter.\n\n"
                           "Browsing history:\n")
    assert "\n\nCandidate items:\n(A) " in text and "Answer with" not in text
    assert prompt_text_settings("ours") == {}
    with pytest.raises(ConfigError, match="prompt_text='paper'"):
        prompt_text_settings("paper")


def test_loss_with_newline_covers_letter_end_of_turn_and_newline(monkeypatch, tiny_dataset, tmp_path):
    from recbole_mm.lmm import candidate_ranker as ranker_module
    from recbole_mm.lmm.verbalizer import response_text

    data_path, name = tiny_dataset
    _, train_data, valid_data, trainer = _prime_loaders(data_path, name, tmp_path, False)
    trainer.config["ranker_loss_tokens"] = "letter_end_newline"
    ranker = trainer.build_ranker(train_data._dataset)
    assert ranker.loss_newline
    seen = []
    real = ranker_module.letter_labels
    monkeypatch.setattr(ranker_module, "letter_labels", lambda ids, mask, n: seen.append((ids, mask, n)) or real(ids, mask, n))
    examples = trainer.training_examples(train_data, valid_data).subset(range(2))
    loss = ranker.loss(examples.histories, examples.candidates, examples.answer_pos)
    assert torch.isfinite(loss)
    ids, mask, n = seen[0]
    tok = ranker.tokenizer
    last = int(mask[0].nonzero().max())
    letter = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[int(examples.answer_pos[0])]
    # the labelled tokens decode to exactly the response: letter, end-of-turn, newline
    assert tok.decode(ids[0, last - n + 1:last + 1]) == response_text(tok, letter) + "\n"
    trainer.config["ranker_loss_tokens"] = "letters"
    with pytest.raises(ConfigError, match="ranker_loss_tokens='letters'"):
        trainer.build_ranker(train_data._dataset)
