import math

import pytest
import torch
import torch.nn.functional as F

from twotower.model.loss import RetrievalLoss

# Three real items (indices 2, 3, 4) plus pad/OOV rows that must never be candidates.
TABLE = torch.tensor(
    [
        [9.0, 9.0],  # pad: would win every softmax if it were scored
        [9.0, 9.0],  # OOV
        [1.0, 0.0],  # item 2
        [0.0, 1.0],  # item 3
        [-1.0, 0.0],  # item 4
    ]
)


def item_fn(ids: torch.Tensor) -> torch.Tensor:
    return TABLE[ids]


def test_full_softmax_three_items_by_hand():
    loss_fn = RetrievalLoss(num_items=5, temperature=0.5, full_softmax=True)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([2, 4])
    # row 0 logits (items 2, 3, 4) = [2, 0, -2], target 2; row 1 = [0, 2, 0], target 4
    row0 = -2 + math.log(math.exp(2) + 1 + math.exp(-2))
    row1 = -0 + math.log(1 + math.exp(2) + 1)
    assert loss_fn(q, pos, item_fn).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_in_batch_three_items_by_hand_without_logq():
    loss_fn = RetrievalLoss(num_items=5, temperature=1.0, logq=False)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    pos = torch.tensor([3, 2, 3])  # distinct positives {2, 3}: item 4 is not a candidate
    logits, labels, n = loss_fn.logits(q, pos, item_fn)
    torch.testing.assert_close(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert labels.tolist() == [1, 0, 1] and n == 3
    expected = (2 * (-0 + math.log(math.e + 1)) + (-0 + math.log(1 + math.e))) / 3
    assert loss_fn(q, pos, item_fn).item() == pytest.approx(expected, rel=1e-6)
    # with item 4 as a sampled negative, each row's denominator gains exp(q . v4)
    neg = torch.tensor([4])
    r0 = -0 + math.log(math.e + 1 + math.exp(-1))
    r1 = -0 + math.log(1 + math.e + 1)
    expected = (r0 + r1 + r0) / 3
    assert loss_fn(q, pos, item_fn, neg).item() == pytest.approx(expected, rel=1e-6)


def test_sampled_equals_full_when_the_batch_covers_the_catalogue():
    torch.manual_seed(0)
    table = F.normalize(torch.randn(7, 4), dim=-1)
    q = F.normalize(torch.randn(10, 4), dim=-1)
    pos = torch.tensor([2, 3, 4, 5, 6, 2, 3, 4, 5, 6])
    full = RetrievalLoss(7, temperature=0.2, full_softmax=True)(q, pos, lambda i: table[i])
    sampled = RetrievalLoss(7, temperature=0.2, logq=False)(q, pos, lambda i: table[i])
    torch.testing.assert_close(full, sampled)


def test_logq_penalises_popular_items_by_exactly_log_q():
    loss_fn = RetrievalLoss(num_items=5, temperature=1.0, logq=True, num_negatives=2)
    counts = torch.tensor([0.0, 0.0, 80.0, 15.0, 5.0])  # item 2 popular, item 4 rare
    loss_fn.set_counts(counts)
    plain = RetrievalLoss(num_items=5, temperature=1.0, logq=False, num_negatives=2)
    q = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    pos = torch.tensor([2, 4])
    neg = torch.tensor([3, 3])
    with_q, _, _ = loss_fn.logits(q, pos, item_fn, neg)
    without, _, _ = plain.logits(q, pos, item_fn, neg)
    b = 2  # positives in the batch
    p = counts / counts.sum()
    q_in = 1 - (1 - p) ** b  # probability that an item is among the batch's positives
    expected_shift = torch.tensor(
        [math.log(q_in[2]), math.log(q_in[4]), math.log(2 / 3), math.log(2 / 3)]
    )
    torch.testing.assert_close(without - with_q, expected_shift.expand(2, 4))
    # relative to the rare item, the popular one loses exactly log(q_pop / q_rare)
    gap = (without[:, 0] - without[:, 1]) - (with_q[:, 0] - with_q[:, 1])
    torch.testing.assert_close(gap, torch.full((2,), math.log(q_in[2] / q_in[4])))
    assert q_in[2] > 0.95 and q_in[4] < 0.1


def test_accidental_hits_are_masked():
    loss_fn = RetrievalLoss(num_items=5, temperature=1.0, logq=False, num_negatives=3)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([2, 3])
    neg = torch.tensor([2, 4, 3])
    logits, labels, _ = loss_fn.logits(q, pos, item_fn, neg)
    # columns: in-batch [2, 3] then sampled [2, 4, 3]
    assert torch.isinf(logits[0, 2]) and torch.isinf(logits[1, 4])  # own positive re-sampled
    assert torch.isfinite(logits[0, [0, 1, 3, 4]]).all()  # item 3 is a true negative for row 0
    assert torch.isfinite(logits[1, [0, 1, 2, 3]]).all()
    assert logits[0, labels[0]] == 1.0 and logits[1, labels[1]] == 1.0  # positive itself kept
    r0 = -1 + math.log(math.e + 1 + math.exp(-1) + 1)  # candidates 2, 3, (2 masked), 4, 3
    r1 = -1 + math.log(1 + math.e + 1 + 1)  # candidates 2, 3, 2, 4, (3 masked)
    assert loss_fn(q, pos, item_fn, neg).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_pad_and_oov_never_candidates_in_full_softmax():
    loss_fn = RetrievalLoss(num_items=5, temperature=1.0, full_softmax=True)
    logits, _, _ = loss_fn.logits(torch.tensor([[1.0, 0.0]]), torch.tensor([2]), item_fn)
    assert torch.isinf(logits[0, :2]).all() and torch.isfinite(logits[0, 2:]).all()


def test_learned_temperature_gets_gradient_and_is_clamped():
    loss_fn = RetrievalLoss(num_items=5, temperature=0.5, learn_temperature=True, full_softmax=True)
    q = torch.tensor([[1.0, 0.0]])
    loss = loss_fn(q, torch.tensor([2]), item_fn)
    loss.backward()
    # sharper softmax lowers the loss of a correct ranking: d loss / d log tau > 0
    assert loss_fn.log_temperature.grad.item() > 0
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-4))
    assert loss_fn.temperature.item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="temperature"):
        RetrievalLoss(5, temperature=5.0)


def test_negatives_are_uniform_over_real_items():
    loss_fn = RetrievalLoss(num_items=6, num_negatives=4000)
    neg = loss_fn.sample_negatives(torch.Generator().manual_seed(0))
    assert neg.min() == 2 and neg.max() == 5
    counts = torch.bincount(neg, minlength=6)[2:].float()
    assert (counts / 4000 - 0.25).abs().max() < 0.03
    assert RetrievalLoss(6, full_softmax=True, num_negatives=5).sample_negatives() is None


def test_set_counts_checks_size():
    with pytest.raises(ValueError, match="entries"):
        RetrievalLoss(5).set_counts([1, 2, 3])


def test_seen_items_are_excluded_from_full_softmax_by_hand():
    loss_fn = RetrievalLoss(num_items=5, temperature=0.5, full_softmax=True)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([2, 4])
    # row 0 has seen item 4 (masked) and its own positive 2 (listed, but never masked);
    # row 1 has seen item 3
    exclude = (torch.tensor([0, 0, 1]), torch.tensor([4, 2, 3]))
    logits, _, _ = loss_fn.logits(q, pos, item_fn, exclude=exclude)
    assert torch.isinf(logits[0, 4]) and torch.isinf(logits[1, 3])
    assert torch.isfinite(logits[0, [2, 3]]).all() and torch.isfinite(logits[1, [2, 4]]).all()
    # row 0 logits (items 2, 3) = [2, 0]; row 1 (items 2, 4) = [0, 0], target 4
    row0 = -2 + math.log(math.exp(2) + 1)
    row1 = -0 + math.log(1 + 1)
    loss = loss_fn(q, pos, item_fn, exclude=exclude)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_seen_items_are_excluded_from_in_batch_and_sampled_candidates():
    loss_fn = RetrievalLoss(num_items=5, temperature=1.0, logq=False, num_negatives=3)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([2, 3])
    neg = torch.tensor([4, 3, 4])  # item 4 drawn twice: both copies must go for row 0
    exclude = (torch.tensor([0, 0, 1]), torch.tensor([3, 4, 2]))
    logits, labels, _ = loss_fn.logits(q, pos, item_fn, neg, exclude=exclude)
    # columns: in-batch [2, 3] then sampled [4, 3, 4]
    finite = torch.isfinite(logits)
    assert finite[0].tolist() == [True, False, False, False, False]
    assert finite[1].tolist() == [False, True, True, False, True]  # sampled 3 = accidental hit
    r0 = 0.0  # only its positive is left: log(e / e)
    r1 = -1 + math.log(math.e + 1 + 1)  # candidates 3 (positive), 4, 4
    loss = loss_fn(q, pos, item_fn, neg, exclude=exclude)
    assert loss.item() == pytest.approx((r0 + r1) / 2, rel=1e-6, abs=1e-7)


def test_dense_auxiliary_targets_add_their_weighted_log_likelihood():
    loss_fn = RetrievalLoss(num_items=5, temperature=1.0, full_softmax=True)
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([2])
    aux = torch.tensor([[3, 0]])  # one later item (3), one missing slot (0 = ignored)
    # logits (items 2, 3, 4) = [1, 0, -1]
    log_z = math.log(math.e + 1 + math.exp(-1))
    main = -1 + log_z
    aux_term = -0 + log_z
    loss = loss_fn(q, pos, item_fn, aux_ids=aux, aux_weight=0.5)
    assert loss.item() == pytest.approx(main + 0.5 * aux_term / 2, rel=1e-6)
    assert loss_fn(q, pos, item_fn, aux_ids=aux, aux_weight=0.0).item() == pytest.approx(main)
    with pytest.raises(ValueError, match="full_softmax"):
        RetrievalLoss(5)(q, pos, item_fn, aux_ids=aux, aux_weight=0.5)
