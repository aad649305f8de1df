"""PRIME stage 3: the odds-ratio loss against hand computations, the candidate-set sampler and its
labelling rules, and short end-to-end runs (with an interrupted run that resumes)."""

import math

import pytest
import torch

from recbole_mm.model.loss import log1mexp, odds_ratio_loss, preference_loss, set_log_likelihood
from recbole_mm.sampler.candidate_sets import (BOTH, FIRST_ONLY, FORCED, SECOND_ONLY, CandidatePairs,
                                               CandidateSetSampler, gumbel_top_k, label_pairs)


def _log(probs):
    return torch.tensor(probs, dtype=torch.float64).log().unsqueeze(0)


def _hand_or(p_w, p_l):
    odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
    return math.log1p(odds_l / odds_w)  # -log sigmoid(log(odds_w / odds_l))


@pytest.mark.parametrize("mode,p_w,p_l", [("mean", 0.35, 0.15), ("product", 0.5 * 0.2, 0.2 * 0.1)])
def test_odds_ratio_loss_matches_hand_computation(mode, p_w, p_l):
    log_probs = _log([0.0, 0.5, 0.2, 0.2, 0.1])  # item 0 is padding (probability 0, log -inf)
    chosen, rejected = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    loss = odds_ratio_loss(log_probs, chosen, rejected, mode)
    assert loss.item() == pytest.approx(_hand_or(p_w, p_l), rel=1e-10)
    # swapping the sets gives the other side of the sigmoid
    swapped = odds_ratio_loss(log_probs, rejected, chosen, mode)
    assert swapped.item() == pytest.approx(_hand_or(p_l, p_w), rel=1e-10)


def test_preference_loss_is_ce_plus_beta_times_odds_ratio():
    probs = [0.0, 0.5, 0.2, 0.2, 0.1]
    logits = _log(probs).float() + 3.0  # log-softmax removes the shift
    target = torch.tensor([2])
    loss, parts = preference_loss(logits, target, torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), beta=0.2)
    hand = -math.log(0.2) + 0.2 * _hand_or(0.35, 0.15)
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert parts["ce"] == pytest.approx(-math.log(0.2), rel=1e-5)


@pytest.mark.parametrize("mode", ["mean", "product"])
def test_set_with_likelihood_close_to_one_stays_finite_and_exact(mode):
    # float32: P({1}) = 1 - 1.9e-13 rounds to exactly 1, so log(1 - P) computed naively is log 0
    logits = torch.tensor([[-torch.inf, 30.0, 0.0, 0.0]], requires_grad=True)
    log_probs = logits.log_softmax(1)
    assert torch.exp(log_probs[0, 1]).item() == 1.0  # the naive route would fail here
    log_p, log_not = set_log_likelihood(log_probs, torch.tensor([[1]]), mode)
    assert (log_p - log_not).item() == pytest.approx(30 - math.log(2), rel=1e-6)
    loss = odds_ratio_loss(log_probs, torch.tensor([[2]]), torch.tensor([[1]]), mode)
    d = -math.log(math.exp(30) + 1) - (30 - math.log(2))  # log odds({2}) - log odds({1}), by hand
    assert loss.item() == pytest.approx(-d + math.log1p(math.exp(d)), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad[:, 1:]).all()


def test_mean_likelihood_complement_matches_float64():
    torch.manual_seed(0)
    logits = torch.randn(4, 50, dtype=torch.float64) * 3
    log_probs = logits.log_softmax(1)
    sets = torch.stack([torch.randperm(50)[:5] for _ in range(4)])
    log_p, log_not = set_log_likelihood(log_probs, sets, "mean")
    p = log_probs.exp().gather(1, sets).mean(1)
    assert torch.allclose(log_p.exp(), p, rtol=1e-12)
    assert torch.allclose(log_not.exp(), 1 - p, rtol=1e-12)
    log_p, log_not = set_log_likelihood(log_probs, sets, "product")
    p = log_probs.exp().gather(1, sets).prod(1)
    assert torch.allclose(log_not.exp(), 1 - p, rtol=1e-12)


def test_log1mexp_against_float64_reference():
    x = torch.tensor([-1e-10, -1e-5, -0.5, -0.6931, -0.6932, -1.0, -20.0, -80.0])
    ref = torch.log(-torch.expm1(x.double()))
    assert torch.allclose(log1mexp(x).double(), ref, rtol=1e-5)
    assert log1mexp(torch.tensor([0.0])).item() == -math.inf
    y = x.clone().requires_grad_()
    log1mexp(y).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_gumbel_top_k_never_repeats_respects_padding_and_sampling_law():
    log_probs = torch.tensor([[-torch.inf, 0.0, 0.0, 1.0, 2.0, -torch.inf, 0.5]]).log_softmax(1)
    sets = gumbel_top_k(log_probs.expand(20000, -1), 2, torch.Generator().manual_seed(0))
    assert not (sets == 0).any() and not (sets == 5).any()  # padding and masked items never drawn
    assert (sets[:, 0] != sets[:, 1]).all()
    # items come back most probable first
    lp = log_probs[0]
    assert (lp[sets[:, 0]] >= lp[sets[:, 1]]).all()
    # inclusion probability of sampling two without replacement: p_i + sum_j p_j p_i / (1 - p_j)
    p = lp.exp().double()
    for i in (1, 3, 4, 6):
        exact = p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(len(p)) if j != i and p[j] > 0)
        seen = (sets == i).any(1).double().mean()
        assert abs(seen - exact) < 0.015, (i, float(seen), float(exact))
    with pytest.raises(ValueError, match="fewer than the set size 6"):
        gumbel_top_k(log_probs, 6)


def test_sampler_outcomes_and_forced_answer():
    sampler = CandidateSetSampler(k=3, max_tries=4)
    n = 12
    logits = torch.zeros(2, n)
    logits[:, 0] = -torch.inf
    logits[0, 7] = 40.0   # row 0: the answer 7 is (almost) certain -> in both sets
    logits[1, 9] = -60.0  # row 1: the answer 9 is (almost) never drawn -> forced
    pairs = sampler.sample(logits.log_softmax(1), torch.tensor([7, 9]), torch.Generator().manual_seed(3))
    assert pairs.outcome.tolist() == [BOTH, FORCED]
    assert pairs.tries.tolist() == [1, 4]
    assert pairs.first[1, -1] == 9 and 9 not in pairs.second[1].tolist()
    for s in (pairs.first, pairs.second):
        assert all(len(set(r)) == 3 and 0 not in r for r in s.tolist())


def test_label_pairs_follows_the_rules():
    first = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6], [1, 2, 9], [3, 1, 2]])
    second = torch.tensor([[3, 4, 5], [4, 5, 6], [1, 2, 3], [4, 5, 6], [3, 7, 8]])
    answers = torch.tensor([3, 3, 3, 9, 3])
    outcome = torch.tensor([BOTH, FIRST_ONLY, SECOND_ONLY, FORCED, BOTH])
    pairs = CandidatePairs(first, second, outcome, torch.ones(5, dtype=torch.long))
    calls = []

    def judge(rows, candidates):
        calls.append((rows.tolist(), candidates.tolist()))
        table = {  # the ranker's scores of each set it is asked about
            (1, 2, 3): [3.0, 2.0, 1.0],   # answer 3 ranked third
            (3, 4, 5): [5.0, 0.0, 0.0],   # answer 3 ranked first -> this set wins for row 0
            (3, 1, 2): [2.0, 1.0, 0.0],   # answer first, softmax share 0.67
            (3, 7, 8): [4.0, 0.0, 0.0],   # answer first too, share 0.96 -> wins the tie on rank
        }
        return torch.tensor([table[tuple(c)] for c in candidates.tolist()])

    chosen, rejected, judged = label_pairs(pairs, answers, judge)
    assert len(calls) == 1 and calls[0][0] == [0, 4, 0, 4]  # one call, both-sets rows only
    assert judged.tolist() == [0, 4]
    assert chosen.tolist() == [[3, 4, 5], [1, 2, 3], [1, 2, 3], [1, 2, 9], [3, 7, 8]]
    assert rejected.tolist() == [[1, 2, 3], [4, 5, 6], [4, 5, 6], [4, 5, 6], [3, 1, 2]]


def _stage3_config(data_path, tmp_path, **extra):
    from test_prime import _prime_config

    return {**_prime_config(data_path, tmp_path), "preference_optimization": True, "pref_batch_size": 32,
            "pref_train_examples": 96, "pref_epochs": 1, "pref_valid_every": 1, "pref_valid_users": 20,
            "pref_warmup_steps": 1, "pref_learning_rate": 0.01, "pref_beta": 0.2, **extra}


def test_stage3_end_to_end_changes_retriever_and_resumes(tiny_dataset, tmp_path):
    from recbole_mm.quick_start import run_recbole_mm

    data_path, name = tiny_dataset
    cfg = _stage3_config(data_path, tmp_path)
    first = run_recbole_mm("PRIME", name, config_dict=cfg)
    info = first["stages"]["preference"]
    assert info["steps"] == 3 and info["total_steps"] == 3 and info["prefixes_per_epoch"] == 96
    assert sum(info["pairs"].values()) == 96
    assert info["ranker_prompts"] == 2 * info["pairs"]["both"]
    for key in ("test_result", "retriever_test_result"):
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in first[key].values())
    before = torch.load(first["artifacts"]["retriever"], weights_only=True)
    after = torch.load(first["artifacts"]["retriever_refined"], weights_only=True)
    # stage 3 starts from stage 1's weights and keeps a changed retriever only if validation improved
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    start = info["history"][0]["score"]
    assert info["best_valid_score"] >= start
    assert changed == (info["best_valid_score"] > start)
    second = run_recbole_mm("PRIME", name, config_dict=cfg)
    assert second["stages"]["preference"]["reused"]
    assert second["test_result"] == first["test_result"]


def test_stage3_updates_weights_and_resumes_after_interruption(tiny_dataset, tmp_path, monkeypatch):
    from recbole_mm.quick_start import run_recbole_mm
    from recbole_mm.trainer import preference, prime

    data_path, name = tiny_dataset
    cfg = _stage3_config(data_path, tmp_path, pref_patience=100)
    steps, validations = [], []
    real_step, real_validate = preference.PreferenceTrainer.step_loss, prime.PRIMETrainer.preference_validation

    def counting_step(self, feat, generator, masked=None):
        steps.append(len(feat))
        return real_step(self, feat, generator, masked)

    def validate_then_crash(self, valid_data):
        validations.append(1)
        if len(validations) == 3:  # after step 1 was validated and saved, during step 2's
            raise KeyboardInterrupt("simulated interruption")
        result = real_validate(self, valid_data)
        return {**result, "score": float(len(validations))}  # always "improving": weights are kept

    monkeypatch.setattr(preference.PreferenceTrainer, "step_loss", counting_step)
    monkeypatch.setattr(prime.PRIMETrainer, "preference_validation", validate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_recbole_mm("PRIME", name, config_dict=cfg)
    assert len(steps) == 2
    # the engine's checkpoint of step 1 (the last validated one), loadable weights-only
    (saved,) = [p for p in (tmp_path / "artifacts").glob("preference-*/checkpoints/checkpoint-*")]
    assert saved.name == "checkpoint-1"
    state = torch.load(saved / "stage_state.pth", weights_only=True)
    assert [h["step"] for h in state["history"]] == [0, 1] and state["stage"]["ranker_prompts"] >= 0
    steps.clear()
    validations[:] = [1, 1, 1]  # no further crash; scores go on improving (4, 5)
    result = run_recbole_mm("PRIME", name, config_dict=cfg)
    assert len(steps) == 2  # steps 2 and 3 only
    info = result["stages"]["preference"]
    assert info["steps"] == 3 and [h["step"] for h in info["history"]] == [0, 1, 2, 3]
    before = torch.load(result["artifacts"]["retriever"], weights_only=True)
    after = torch.load(result["artifacts"]["retriever_refined"], weights_only=True)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_stage3_candidate_sets_never_hold_earlier_items_under_mask_history(tiny_dataset, tmp_path, monkeypatch):
    from test_prime import _earlier_minus_answer, _prime_loaders
    from test_runs import _user_sequences

    from recbole_mm.trainer import preference, prime

    data_path, name = tiny_dataset
    dataset, train_data, _, trainer = _prime_loaders(data_path, name, tmp_path, mask=True)
    seen = []

    class Stop(Exception):
        pass

    def capture(self, log_probs, answers, generator):
        seen.append(log_probs.clone())
        raise Stop

    monkeypatch.setattr(preference.CandidateSetSampler, "sample", capture)
    cfg = trainer.config
    pref = preference.PreferenceTrainer(trainer.model, cfg, str(tmp_path / "pref"), validate=lambda: {"score": 0.0})
    real_step = pref.step_loss
    batches = []
    pref.step_loss = lambda feat, generator, masked=None: (batches.append(feat), real_step(feat, generator, masked))[1]
    with pytest.raises(Stop):
        pref.fit(train_data._dataset, "cpu", history=train_data.prefix_history, positions=train_data.prefix_positions)
    (feat,), (log_probs,) = batches, seen
    seqs = _user_sequences(data_path, name, with_time=True)
    users, items = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    repeats = 0
    for r in range(len(feat)):
        answer = int(feat["item_id"][r])
        earlier = _earlier_minus_answer(seqs, users, items, int(feat["user_id"][r]), float(feat["timestamp"][r]),
                                        answer)
        blocked = {items[i] for i in torch.nonzero(torch.isinf(log_probs[r])).squeeze(1).tolist() if i}
        assert blocked == earlier  # exactly the prefix's earlier items: never the answer, never a later item
        repeats += items[answer] in {i for i, t in seqs[users[int(feat["user_id"][r])]] if t < float(feat["timestamp"][r])}
    assert repeats > 0 and "mask_history" in prime.prime_stage_keys().stage_keys("preference")
