"""Ranker samplers: distinct negatives, exclusions, [PAD] never drawn, popularity vs uniform,
answer shuffled in uniformly, retriever top-k."""

import numpy as np
import pytest
import torch

from recbole_mm.sampler.ranker_negatives import RankerNegativeSampler, retriever_candidates, training_candidates


class FakeDataset:
    """The two things the sampler reads from a RecBole dataset."""

    iid_field = "item_id"

    def __init__(self, counts):
        self.item_num = len(counts)
        self.inter_feat = {"item_id": torch.from_numpy(np.repeat(np.arange(len(counts)), counts))}


def check_rows(neg, answers, k, exclude=()):
    assert neg.dtype == torch.long and neg.shape == (len(answers), k)
    for r, row in enumerate(neg.tolist()):
        assert len(set(row)) == k, row
        assert answers[r] not in row and 0 not in row
        assert not set(row) & set(exclude[r] if exclude else ())


@pytest.mark.parametrize("distribution", ["popularity", "uniform"])
def test_distinct_never_answer_never_pad(distribution):
    counts = np.array([0] + [1] * 10 + [1000] * 3)  # 13 items, 3 very popular
    sampler = RankerNegativeSampler(FakeDataset(counts), distribution=distribution, seed=0)
    answers = torch.randint(1, 14, (300,), generator=torch.Generator().manual_seed(0))
    neg = sampler.sample(answers, 11)  # 12 items besides the answer: nearly the whole catalogue
    check_rows(neg, answers.tolist(), 11)
    assert sampler.sample(answers, 0).shape == (300, 0)
    with pytest.raises(ValueError, match="only 12 items left"):
        sampler.sample(answers, 13)


def test_exclusions_in_every_form():
    import scipy.sparse as sp

    counts = np.array([0] + [5] * 30)
    sampler = RankerNegativeSampler(FakeDataset(counts), seed=1)
    rng = np.random.default_rng(0)
    rows = 50
    answers = torch.from_numpy(rng.integers(1, 31, rows))
    excl = [set(rng.choice(np.arange(1, 31), size=rng.integers(0, 20), replace=False).tolist()) for _ in range(rows)]
    indptr = np.cumsum([0] + [len(e) for e in excl])
    indices = np.concatenate([sorted(e) for e in excl]).astype(np.int64)
    matrix = sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(rows, 31))
    padded = np.zeros((rows, 20), dtype=np.int64)
    for r, e in enumerate(excl):
        padded[r, :len(e)] = sorted(e)
    for form in (excl, [torch.tensor(sorted(e), dtype=torch.long) for e in excl], (indptr, indices), matrix,
                 torch.from_numpy(padded)):
        k = 9  # the most excluded row keeps 30 - 19 - 1 = 10 items
        neg = sampler.sample(answers, k, exclude=form, generator=torch.Generator().manual_seed(3))
        check_rows(neg, answers.tolist(), k, excl)
    with pytest.raises(ValueError, match="one exclusion"):
        sampler.sample(answers, 2, exclude=excl[:3])


def test_rows_that_exclude_most_of_the_popularity_mass_are_still_filled():
    counts = np.array([0, 10_000, 10_000, 10_000, 1, 1, 0, 0])  # items 6, 7 never seen in training
    sampler = RankerNegativeSampler(FakeDataset(counts), seed=0)
    answers, excl = torch.tensor([4, 5]), [{1, 2}, {1, 2, 3}]
    neg = sampler.sample(answers, 3, exclude=excl)
    check_rows(neg, [4, 5], 3, excl)
    row0 = set(neg[0].tolist())
    assert {3, 5} <= row0 and len(row0 & {6, 7}) == 1  # seen items first, then unseen ones
    assert set(neg[1].tolist()) == {4, 6, 7}


def test_popularity_vs_uniform_frequencies():
    counts = np.array([0, 1, 2, 4, 8, 16, 32, 0, 1])
    data = FakeDataset(counts)
    answers = torch.full((40_000,), 8)  # item 8 is the answer: never drawn
    pop = RankerNegativeSampler(data, "popularity", seed=0).sample(answers, 1).reshape(-1)
    freq = np.bincount(pop.numpy(), minlength=9) / len(pop)
    expected = np.array([0, 1, 2, 4, 8, 16, 32, 0, 0]) / 63
    assert freq[0] == freq[7] == freq[8] == 0
    assert np.abs(freq - expected).max() < 0.01  # binomial sd < 0.0025
    sq = RankerNegativeSampler(data, "popularity", alpha=0.5, seed=0).sample(answers, 1).reshape(-1)
    freq = np.bincount(sq.numpy(), minlength=9) / len(sq)
    w = np.sqrt([0, 1, 2, 4, 8, 16, 32, 0, 0])
    assert np.abs(freq - w / w.sum()).max() < 0.01
    uni = RankerNegativeSampler(data, "uniform", seed=0).sample(answers, 1).reshape(-1)
    freq = np.bincount(uni.numpy(), minlength=9) / len(uni)
    assert freq[0] == freq[8] == 0 and np.abs(freq[1:8] - 1 / 7).max() < 0.01  # unseen item 7 too
    # the same seed gives the same draws; the sampler's own generator moves on
    a = RankerNegativeSampler(data, seed=5)
    assert torch.equal(a.sample(answers[:50], 3), RankerNegativeSampler(data, seed=5).sample(answers[:50], 3))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(a.sample(answers[:50], 3, generator=g1), a.sample(answers[:50], 3, generator=g2))
    np.random.seed(7)  # RecBole's init_seed: samplers built without a seed are reproducible
    first = RankerNegativeSampler(data).sample(answers[:50], 3)
    np.random.seed(7)
    assert torch.equal(first, RankerNegativeSampler(data).sample(answers[:50], 3))
    with pytest.raises(ValueError, match="distribution"):
        RankerNegativeSampler(data, "zipf")


def test_with_a_recbole_dataset(tiny_dataset):
    from conftest import tiny_config
    from recbole_mm.config import Config
    from recbole_mm.utils import create_dataset, data_preparation

    data_path, name = tiny_dataset
    config = Config("SASRec", name, config_dict=tiny_config(data_path))
    train = data_preparation(config, create_dataset(config))[0]._dataset
    sampler = RankerNegativeSampler(train, seed=0)
    counts = np.bincount(train.inter_feat["item_id"].numpy(), minlength=train.item_num)
    assert sampler.prob[0] == 0 and np.allclose(sampler.prob, counts / counts.sum())
    answers = train.inter_feat["item_id"]
    history = train.inter_feat["item_id_list"]
    neg = sampler.sample(answers, 10, exclude=history)
    check_rows(neg, answers.tolist(), 10, [set(h) for h in history.tolist()])
    assert sampler.sampling(5).shape == (5,)  # RecBole's AbstractSampler entry point


def test_training_candidates_answer_position():
    b, k = 20_000, 4
    answers = torch.arange(1, b + 1) * 10
    negatives = answers.unsqueeze(1) + torch.arange(1, k + 1)
    cands, pos = training_candidates(answers, negatives, torch.Generator().manual_seed(0))
    assert cands.shape == (b, k + 1) and pos.shape == (b,) and pos.dtype == torch.long
    assert torch.equal(cands[torch.arange(b), pos], answers)
    assert torch.equal(cands.sort(1).values, torch.cat([answers.unsqueeze(1), negatives], 1))  # same items
    share = torch.bincount(pos, minlength=k + 1).float() / b
    assert (share - 1 / (k + 1)).abs().max() < 0.015
    # negatives are shuffled as well: the first negative is not always right after the answer
    first_neg_pos = (cands == negatives[:, :1]).long().argmax(1)
    assert (torch.bincount(first_neg_pos, minlength=k + 1).float() / b - 1 / (k + 1)).abs().max() < 0.015
    again, pos2 = training_candidates(answers, negatives, torch.Generator().manual_seed(0))
    assert torch.equal(again, cands) and torch.equal(pos, pos2)
    with pytest.raises(ValueError):
        training_candidates(answers, negatives[:5])


def test_retriever_candidates_top_k():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=g)
    scores[:, 0] = 100.0  # [PAD] scored highest must still never come back
    got = retriever_candidates(scores, 10)
    ref = scores[:, 1:].argsort(1, descending=True)[:, :10] + 1
    assert torch.equal(got, ref)
    assert scores[0, 0] == 100.0  # input untouched
    rows = torch.arange(64).repeat_interleave(3)
    items = ref[:, :3].reshape(-1)  # exclude each row's current top-3
    got = retriever_candidates(scores, 10, exclude_index=(rows, items))
    assert torch.equal(got, scores[:, 1:].argsort(1, descending=True)[:, 3:13] + 1)
    got = retriever_candidates(scores, 10, exclude_index=torch.stack([rows, items]))
    assert torch.equal(got, scores[:, 1:].argsort(1, descending=True)[:, 3:13] + 1)
    assert retriever_candidates(scores, 49).shape == (64, 49) and 0 not in retriever_candidates(scores, 49)
    with pytest.raises(ValueError):
        retriever_candidates(scores, 50)
    # a row with everything excluded still never returns [PAD]
    tiny = torch.tensor([[5.0, 1.0, 2.0]])
    assert sorted(retriever_candidates(tiny, 2, exclude_index=([0, 0], [1, 2]))[0].tolist()) == [1, 2]
