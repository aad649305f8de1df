"""HaNoRec: the unobserved sampler, stage keys, AUC, per-user prompts in predict, the DPO stage's
reference / policy, and end-to-end runs on the generated fixture under both protocols."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config


# ------------------------------------------------------------------------------------- sampler
def test_unobserved_sampler_never_draws_an_observed_item():
    from recbole_mm.errors import ConfigError
    from recbole_mm.sampler.preference_pairs import UnobservedSampler, observed_matrix

    g = torch.Generator().manual_seed(0)
    n_users, n_items = 20, 40
    users = torch.randint(0, n_users, (40,), generator=g)
    seqs = torch.randint(0, n_items, (40, 6), generator=g)  # 0 = padding
    targets = torch.randint(1, n_items, (40,), generator=g)
    seen = observed_matrix(n_users, n_items, users, [seqs, targets])
    assert seen[users[0], targets[0]] and seen[users[3], seqs[3, 5]] and seen[:, 0].all()
    sampler = UnobservedSampler(seen, chunk=7)
    ask = torch.arange(n_users).repeat(50)
    drawn = sampler.sample(ask, 5, torch.Generator().manual_seed(1))
    assert drawn.shape == (len(ask), 5)
    assert not seen[ask.unsqueeze(1).expand_as(drawn), drawn].any()          # never observed, never padding
    assert all(len(set(row)) == 5 for row in drawn.tolist())                    # distinct within a row
    assert len(set(drawn[ask == 0].flatten().tolist())) == int((~seen[0]).sum())  # uniform: every free item appears
    full = torch.ones((1, 5), dtype=torch.bool)
    full[0, 1] = False
    with pytest.raises(ConfigError, match="unobserved items"):
        UnobservedSampler(full).sample(torch.tensor([0]), 2)


# ----------------------------------------------------------------------------- keys and AUC
def test_every_hanorec_key_is_classified():
    import yaml
    from importlib import resources

    from recbole_mm.trainer.hanorec import hanorec_stage_keys

    keys = hanorec_stage_keys()
    shipped = set()
    for name in ("_lmm", "HaNoRec"):
        with resources.files("recbole_mm.properties").joinpath("model", f"{name}.yaml").open() as f:
            shipped |= set(yaml.safe_load(f))
    assert set(keys.keys) == shipped
    assert keys.unclassified() == [], "declare these keys: a stage rule, every_stage or evaluation-only"
    expected = {"retriever_config": "retriever", "ranker_learning_rate": "ranker", "lora_r": "ranker",
                "hanorec_length_normalise": "ranker", "max_history_items": "ranker", "image_max_pixels": "ranker",
                "dpo_beta": "dpo", "hars": "dpo", "hars_top_k": "dpo", "nodo_sigma": "dpo", "hanorec_stages": "dpo",
                "text_encoder": "dpo", "image_encoder": "dpo", "n_candidates": "*", "hanorec_history_cap": None,
                "ranker_eval_batch_size": None}
    assert {k: keys.classify(k) for k in expected} == expected


def test_pair_auc_by_hand():
    from recbole_mm.trainer.hanorec import pair_auc

    inf = -math.inf
    # user 0: target (item 1) 0.5 vs 0.2, 0.9, 0.5 -> 1 + 0 + 0.5 = 1.5 of 3; user 1: target (item 3) 2.0 vs 1.0 -> 1 of 1
    scores = torch.tensor([[inf, 0.5, 0.2, 0.9, 0.5], [inf, inf, 1.0, 2.0, inf]])
    assert pair_auc(scores, torch.tensor([0, 1]), torch.tensor([1, 3])) == (2.5, 4)


def test_predict_scores_each_users_candidates_in_one_prompt(tiny_dataset, tmp_path):
    from recbole.data.interaction import Interaction

    from recbole_mm.config import Config
    from recbole_mm.data.preparation import create_dataset, data_preparation
    from recbole_mm.model.hanorec import HaNoRec

    data_path, name = tiny_dataset
    config = Config("HaNoRec", name, config_dict=_config(data_path, tmp_path, hars=False))
    train, _, _ = data_preparation(config, create_dataset(config))
    model = HaNoRec(config, train._dataset)
    calls = []

    class Recorder:  # stands in for the title scorer: score = item id, records every prompt
        def score_in_batches(self, histories, candidates, batch_size=None):
            calls.append((histories, candidates.tolist()))
            return candidates.float()

    model.ranker = Recorder()
    seq = torch.tensor([[3, 4, 0], [5, 6, 7]])
    # RecBole's sampled layout: the positives first, then the negatives block by block
    rows = {"user_id": torch.tensor([1, 2, 1, 2, 1, 2]), "item_id": torch.tensor([9, 8, 11, 12, 13, 14]),
            "item_id_list": seq.repeat(3, 1), "item_length": torch.tensor([2, 3]).repeat(3)}
    scores = model.predict(Interaction(rows))
    assert scores.tolist() == [9.0, 8.0, 11.0, 12.0, 13.0, 14.0]
    assert sorted((h[0], sorted(c[0])) for h, c in calls) == [([3, 4], [9, 11, 13]), ([5, 6, 7], [8, 12, 14])]
    # the listing order comes from seed and user, not from the rows (where the target is always first)
    firsts = {model.candidate_order(u, 10)[0].item() for u in range(30)}
    assert len(firsts) > 1


# ------------------------------------------------------------------------------- DPO stage
class _Store:
    def attributes(self, item_id):
        return {"title": ["", "The Matrix (1999)", "Up (2009)", "Men in Black (1997)", "Mad Max (1979)",
                          "Titanic (1997)", "Flipped (2010)"][item_id]}


def test_dpo_reference_is_the_sft_model_and_noise_reaches_the_policy_only(tmp_path):
    from recbole_mm.lmm.backbone import BackboneSettings, load_backbone
    from recbole_mm.lmm.prompts import PromptSettings, TitleListTemplate
    from recbole_mm.lmm.tiny_models import build_tiny_causal_lm
    from recbole_mm.lmm.title_scorer import TitleScorer
    from recbole_mm.trainer.hanorec import DPOStage, HaNoRecTrainer
    from recbole_mm.trainer.ranker_training import RankerExamples

    texts = [_Store().attributes(i)["title"] for i in range(1, 7)]
    folder = build_tiny_causal_lm(str(tmp_path / "lm"), texts, hidden_size=32, num_layers=1, num_heads=2,
                                  vocab_size=300, seed=0)
    bb = load_backbone(BackboneSettings(name_or_path=folder, quantization="none", dtype="float32", lora_r=4,
                                        lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():  # an "SFT" adapter that changes the model
        for n, p in bb.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    scorer = TitleScorer(bb, _Store(), TitleListTemplate(PromptSettings(max_history=3, attr_max_tokens=8,
                                                                        variant="title_only")))
    examples = RankerExamples([[1, 2], [3], [4, 5], [6]], torch.tensor([[3, 4, 5], [1, 2, 6], [1, 2, 3], [4, 5, 1]]),
                              torch.tensor([0, 2, 1, 0]))
    bb.model.eval()
    with torch.no_grad():
        sft_scores = scorer.score(examples.histories, examples.candidates)
    config = {"seed": 0, "reproducibility": True, "dpo_beta": 0.1, "nodo": False, "nodo_sigma": 0.1,
              "ranker_eval_batch_size": 2}
    owner = SimpleNamespace(model=SimpleNamespace(ranker=scorer), config=config, device="cpu")
    HaNoRecTrainer.start_policy(owner)
    model = bb.model
    model.eval()
    with torch.no_grad():
        policy_scores = scorer.score(examples.histories, examples.candidates)
        with model.disable_adapter():
            reference_scores = scorer.score(examples.histories, examples.candidates)
    assert torch.allclose(policy_scores, sft_scores, atol=1e-4)       # fresh adapter: policy = SFT model
    assert torch.allclose(reference_scores, sft_scores, atol=1e-4)    # reference = the merged SFT model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    rows = torch.arange(4)
    pairs = {"examples": examples, "chosen": examples.candidates[rows, examples.answer_pos],
             "rejected": examples.candidates[rows, (examples.answer_pos + 1) % 3]}
    model.train()
    plain = DPOStage(scorer, pairs, examples, config, lambdas=None)
    loss, extras = plain.loss(rows, 0)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)       # policy == reference: margin 0
    assert extras["beta"] == pytest.approx(0.1)
    noisy = DPOStage(scorer, pairs, examples, {**config, "nodo": True}, lambdas=torch.tensor([0.5, 1.0, 1.5, 2.0]))
    noisy_loss, noisy_extras = noisy.loss(rows, 0)
    assert abs(float(noisy_loss) - math.log(2)) > 1e-4                 # NoDO moved the policy's likelihoods
    noisy_loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} <= trainable
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert noisy_extras["beta"] == pytest.approx(0.1 * noisy_extras["eta"] * 1.25, rel=1e-5)
    with torch.no_grad(), model.disable_adapter():                    # the reference was never perturbed
        assert torch.equal(scorer.score(examples.histories, examples.candidates), reference_scores)
    model.eval()
    with torch.no_grad():                                             # eval: no noise
        assert torch.allclose(scorer.score(examples.histories, examples.candidates), policy_scores, atol=1e-6)
    # a few optimizer steps on the pairs: the policy comes to prefer the chosen titles (loss < log 2)
    model.train()
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    for step in range(20):
        optimizer.zero_grad()
        loss, extras = plain.loss(rows, step)
        loss.backward()
        optimizer.step()
    final, extras = plain.loss(rows, 20)
    assert float(final) < math.log(2) - 0.1 and extras["reward_acc"] >= 0.75


# ------------------------------------------------------------------------------- end to end
def _config(data_path, tmp_path, sampled=True, **extra):
    protocol = (dict(eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni9"},
                     metrics=["Hit", "NDCG"], topk=[3], valid_metric="NDCG@3", n_candidates=10) if sampled
                else dict(topk=[5, 10], valid_metric="NDCG@10", n_candidates=5))
    return tiny_config(
        data_path, ranker_model="small",
        ranker_small={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
        retriever_config={"epochs": 1, "hidden_size": 16}, text_encoder="small",
        max_history_items=4, attr_max_tokens=6, ranker_train_examples=16, ranker_valid_users=8, ranker_batch_size=4,
        ranker_grad_accum=1, ranker_warmup_steps=1, ranker_valid_every=2, ranker_learning_rate=0.01,
        dpo_train_examples=16, dpo_batch_size=4, dpo_grad_accum=1, dpo_warmup_steps=1, dpo_valid_every=2,
        dpo_learning_rate=0.01, hars_top_k=5, artifacts_dir=str(tmp_path / "artifacts"),
        embedding_cache_dir=str(tmp_path / "vectors"), **{**protocol, **extra})


def test_end_to_end_sampled_protocol_with_auc_and_stage_reuse(tiny_dataset, tmp_path):
    from recbole_mm.quick_start import run_recbole_mm

    data_path, name = tiny_dataset
    first = run_recbole_mm(model="HaNoRec", dataset=name, config_dict=_config(data_path, tmp_path))
    test = first["test_result"]
    assert set(test) == {"hit@3", "ndcg@3", "auc"} and all(0 <= v <= 1 for v in test.values())
    assert "retriever" not in first["stages"] and {"ranker", "dpo"} <= set(first["stages"])
    assert first["stages"]["dpo"]["hars"] and first["stages"]["dpo"]["nodo"] and first["stages"]["dpo"]["pairs"] == 16
    # same settings: both stages reused, same results; another NoDO sigma and dpo_keep retrain DPO only,
    # and dpo_keep: last runs every step (16 pairs / 4 per step), whatever validation says
    again = run_recbole_mm(model="HaNoRec", dataset=name, config_dict=_config(data_path, tmp_path))
    assert again["stages"]["ranker"].get("reused") and again["stages"]["dpo"].get("reused")
    assert again["test_result"] == test
    other = run_recbole_mm(model="HaNoRec", dataset=name,
                           config_dict=_config(data_path, tmp_path, nodo_sigma=0.05, dpo_keep="last", dpo_patience=1))
    assert other["stages"]["ranker"].get("reused") and not other["stages"]["dpo"].get("reused")
    assert other["stages"]["dpo"]["steps"] == 4
    # SFT only: no DPO stage
    sft = run_recbole_mm(model="HaNoRec", dataset=name, config_dict=_config(data_path, tmp_path, hanorec_stages="sft"))
    assert "dpo" not in sft["stages"] and sft["stages"]["ranker"].get("reused")


def test_end_to_end_full_ranking_reranks_the_retrievers_top_k(tiny_dataset, tmp_path):
    from recbole_mm.quick_start import run_recbole_mm

    data_path, name = tiny_dataset
    result = run_recbole_mm(model="HaNoRec", dataset=name,
                            config_dict=_config(data_path, tmp_path, sampled=False, nodo=False))
    assert {"retriever", "ranker", "dpo"} <= set(result["stages"])
    assert result["test_result"]["ndcg@10"] >= 0 and result["retriever_test_result"]
    assert "auc" not in result["test_result"]


def test_bad_settings_are_one_line_errors(tiny_dataset, tmp_path):
    from recbole_mm.errors import ConfigError, UserError
    from recbole_mm.quick_start import run_recbole_mm

    data_path, name = tiny_dataset
    with pytest.raises(ConfigError, match="hanorec_stages"):
        run_recbole_mm(model="HaNoRec", dataset=name, config_dict=_config(data_path, tmp_path, hanorec_stages="dpo"))
    with pytest.raises(ConfigError, match="dpo_keep='final'"):
        run_recbole_mm(model="HaNoRec", dataset=name, config_dict=_config(data_path, tmp_path, dpo_keep="final"))
    with pytest.raises(UserError, match="hanorec_history_cap=6"):
        run_recbole_mm(model="HaNoRec", dataset=name, config_dict=_config(data_path, tmp_path, hanorec_history_cap=6))


# ------------------------------------------------------------------------------- benchmark
def _bench():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "hanorec.py")
    spec = importlib.util.spec_from_file_location("hanorec_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_truncate_keeps_each_users_last_interactions(tmp_path):
    src = tmp_path / "src" / "toy"
    src.mkdir(parents=True)
    rows = [("u1", f"i{t}", t) for t in (5, 1, 3, 2, 4)] + [("u2", "i9", 0), ("u2", "i8", 0), ("u2", "i7", 1)]
    (src / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                   + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    (src / "toy.item").write_text("item_id:token\ttitle:token_seq\n")
    name = _bench().truncate(str(tmp_path / "src"), "toy", 2, str(tmp_path / "out"))
    assert name == "toy-last2"
    lines = (tmp_path / "out" / name / f"{name}.inter").read_text().splitlines()
    # u1 by time: i1 i2 i3 i4 i5 -> i4 i5; u2: i9, i8 (tie, file order), i7 -> i8 i7
    assert [tuple(line.split("\t")[:2]) for line in lines[1:]] == [("u1", "i4"), ("u1", "i5"), ("u2", "i8"), ("u2", "i7")]
    assert (tmp_path / "out" / name / f"{name}.item").is_symlink()
    sampled = _bench().truncate(str(tmp_path / "src"), "toy", 2, str(tmp_path / "out"), users=1)
    assert sampled == "toy-last2-u1"
    assert len((tmp_path / "out" / sampled / f"{sampled}.inter").read_text().splitlines()) == 3


def test_benchmark_smoke_writes_the_table(tmp_path):
    rows = _bench().main(["--smoke", f"--out={tmp_path / 'bench'}", "--rows=SFT only,full,SASRec"])
    assert [r["label"] for r in rows] == ["SFT only", "full", "SASRec"]
    assert all(0 <= r["ndcg@3"] <= 1 for r in rows) and rows[1]["auc"] is not None
    assert rows[1]["stages"]["ranker"]["reused"] and not rows[1]["stages"]["dpo"]["reused"]
    text = (tmp_path / "bench" / "hanorec_mmfix-last6_sampled.md").read_text()
    assert "| full |" in text and "git_commit" in text and "loadavg_start" in text
    # a rerun reuses the finished rows (row.json) instead of training again
    again = _bench().main(["--smoke", f"--out={tmp_path / 'bench'}", "--rows=SFT only,SASRec"])
    assert again[0]["wall_s"] == rows[0]["wall_s"] and again[1]["wall_s"] == rows[2]["wall_s"]
