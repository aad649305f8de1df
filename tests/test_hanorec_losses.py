"""HaNoRec's numerics against hand computations (numbers worked out in the comments)."""

import logging
import math

import pytest
import torch

from recbole_mm.model.hanorec_losses import (Responsiveness, dpo_loss, fuse_embeddings, hanorec_betas, hars_deltas,
                                             hars_lambda, reward_gaps)


def test_dpo_loss_with_a_beta_per_pair():
    # pair 1: margin = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1; beta 0.1 -> -log sigmoid(0.1) = log(1 + e^-0.1)
    # pair 2: margin = (-3 - -2) - (-1 - -2) = -1 - 1 = -2; beta 0.5 -> -log sigmoid(-1) = log(1 + e^1)
    loss = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                    torch.tensor([-1.5, -2.0]), torch.tensor([0.1, 0.5]))
    assert loss.tolist() == pytest.approx([0.6443966600735709, 1.3132616875182228], abs=1e-6)
    # one beta for every pair: pair 2 with beta 0.1 -> log(1 + e^0.2) = 0.7981388693815918
    same = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                    torch.tensor([-1.5, -2.0]), 0.1)
    assert same.tolist() == pytest.approx([0.6443966600735709, 0.7981388693815918], abs=1e-6)
    # the reward gap of Eq. 7 is beta0 * margin, detached
    gaps = reward_gaps(torch.tensor([-1.0, -3.0], requires_grad=True), torch.tensor([-2.0, -1.0]),
                       torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]), 0.1)
    assert gaps.tolist() == pytest.approx([0.1, -0.2]) and not gaps.requires_grad


def test_hars_lambda_by_hand():
    # deltas 0, 1, 2: mean 1; lambda = sigmoid(d) / sigmoid(1) = 0.5/0.7310586, 1, 0.8807971/0.7310586
    lam = hars_lambda(torch.tensor([0.0, 1.0, 2.0]))
    assert lam.tolist() == pytest.approx([0.6839397205857212, 1.0, 1.204824214809825], abs=1e-9)


def test_hars_deltas_by_hand():
    # items (row 0 = padding): 1 = (1,0), 2 = (0,1), 3 = (1,1)/sqrt2, 4 = (1,-1)/sqrt2; K = 2
    # chosen 1: similarities to 2, 3, 4 = 0, .7071, .7071 -> top 2 (.7071, .7071) -> softmax (.5, .5)
    # rejected 2: similarities to 1, 3, 4 = 0, .7071, -.7071 -> top 2 (.7071, 0) -> softmax (a, 1-a),
    #   a = sigmoid(.7071) = .6697615; Delta = ||(.5 - a, a - .5)|| = (a - .5) * sqrt2 = .2400791
    # chosen 3 vs rejected 3's mirror 4: 3 -> (1: .7071, 2: .7071, 4: 0), 4 -> (1: .7071, 2: -.7071, 3: 0)
    #   softmaxes (.5, .5) and (a, 1-a): the same Delta
    r = 1 / math.sqrt(2)
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [r, r], [r, -r]])
    deltas = hars_deltas(emb, torch.tensor([1, 3, 1]), torch.tensor([2, 4, 1]), k=2)
    assert deltas.tolist() == pytest.approx([0.24007908542722733, 0.24007908542722733, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="hars_top_k"):
        hars_deltas(emb, torch.tensor([1]), torch.tensor([2]), k=4)


def test_fuse_embeddings_normalises_each_modality():
    text = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    image = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    assert fuse_embeddings(text, image).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert fuse_embeddings(text).tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_responsiveness_by_hand(caplog):
    eta = Responsiveness()
    # gaps 1, 2, 3, 6: mean 3 -> normalised 1/3, 2/3, 1, 2 -> without min and max: 2/3, 1 -> mean 5/6;
    # running mean gap (this batch) 3 -> eta = sigmoid(5/6) / sigmoid(3)
    assert eta(torch.tensor([1.0, 2.0, 3.0, 6.0])) == pytest.approx(0.7317638221926474, abs=1e-9)
    # zero variance 2, 2, 2: normalised 1, 1, 1 -> trimmed mean 1; running mean (3 + 2) / 2 = 2.5
    assert eta(torch.tensor([2.0, 2.0, 2.0])) == pytest.approx(0.7910675210508382, abs=1e-9)
    assert eta.running_mean == pytest.approx(2.5)
    # a batch of 2 cannot drop two extremes: eta = 1, said in the log, running mean untouched
    with caplog.at_level(logging.INFO, logger="recbole_mm.model.hanorec_losses"):
        assert eta(torch.tensor([5.0, -1.0])) == 1.0
    assert "needs >= 3" in caplog.text and eta.running_mean == pytest.approx(2.5)


def test_responsiveness_of_zero_gaps_and_zero_mean():
    fresh = Responsiveness()
    # first step: policy == reference, every gap 0 -> normalised 0 -> sigmoid(0) / sigmoid(0) = 1
    assert fresh(torch.zeros(4)) == pytest.approx(1.0)
    # mean 0 but not all 0: -1, 0, 1 are divided by their mean |R| 2/3 -> -1.5, 0, 1.5 -> trimmed 0;
    # running mean (0 + 0) / 2 = 0 -> eta = 1
    assert fresh(torch.tensor([-1.0, 0.0, 1.0])) == pytest.approx(1.0)
    state = fresh.state()
    other = Responsiveness()
    other.load(state)
    assert other.running_mean == fresh.running_mean and other.batches == 2


def test_betas_combine_beta0_eta_and_lambda():
    assert hanorec_betas(0.1, 0.5, torch.tensor([2.0, 1.0])).tolist() == pytest.approx([0.1, 0.05])
    assert hanorec_betas(0.1, 0.5, None) == 0.1
