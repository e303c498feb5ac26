"""Unit tests of vlp.losses: hand-computed values on tiny tensors, properties, and the official TCL fixture.

Expected numbers are written from the formulas with ``math`` (never by calling the code under test).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlp.losses import (
    Temperature,
    in_batch_g2l_loss,
    info_nce,
    itm_loss,
    itm_triplets,
    mlm_loss,
    multi_positive_targets,
    patch_pooling,
    sample_negatives,
    swap_images_for_itm,
    valid_negative_mask,
)


def _nll(pos: float, logits: list[float]) -> float:
    """-log(exp(pos) / sum(exp(logits)))."""
    return -(pos - math.log(sum(math.exp(x) for x in logits)))


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


# Tiny 2-d features: q0 = e1, q1 = e2; k0 = e1, k1 = (0.6, 0.8); with tau = 0.5:
#   logits = [[2.0, 1.2], [0.0, 1.6]]
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
K = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
TAU = 0.5


# ----------------------------------------------------------------------------------------------- contrastive
def test_info_nce_hard_targets_value_and_gradient():
    q = Q.clone().requires_grad_(True)
    loss = info_nce(q, K, TAU)
    expected = (_nll(2.0, [2.0, 1.2]) + _nll(1.6, [0.0, 1.6])) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)

    # dL/dq_i = (softmax(logits_i) - onehot_i) @ K / (tau * B)
    loss.backward()
    p0, p1 = _softmax([2.0, 1.2]), _softmax([0.0, 1.6])
    g0 = [((p0[0] - 1) * 1.0 + p0[1] * 0.6) / (TAU * 2), ((p0[0] - 1) * 0.0 + p0[1] * 0.8) / (TAU * 2)]
    g1 = [(p1[0] * 1.0 + (p1[1] - 1) * 0.6) / (TAU * 2), (p1[0] * 0.0 + (p1[1] - 1) * 0.8) / (TAU * 2)]
    torch.testing.assert_close(q.grad, torch.tensor([g0, g1]), atol=1e-6, rtol=0)


def test_info_nce_queue_value_and_queue_gets_no_gradient():
    queue = torch.tensor([[-1.0, 0.0]], requires_grad=True)   # logits column: [-2, 0]
    loss = info_nce(Q, K, TAU, queue=queue)
    expected = (_nll(2.0, [2.0, 1.2, -2.0]) + _nll(1.6, [0.0, 1.6, 0.0])) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    q = Q.clone().requires_grad_(True)
    info_nce(q, K, TAU, queue=queue).backward()
    assert queue.grad is None and q.grad is not None


def test_info_nce_soft_targets_value():
    # Teacher query t0 = (0.6, 0.8), t1 = e1; keys+queue as above -> teacher logits
    #   t0: [0.6, 0.36+0.64=1.0, -0.6] / 0.5 = [1.2, 2.0, -1.2];  t1: [1, 0.6, -1] / 0.5 = [2.0, 1.2, -2.0]
    teacher = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    queue = torch.tensor([[-1.0, 0.0]])
    alpha = 0.4
    loss = info_nce(Q, K, TAU, queue=queue, teacher_query=teacher, alpha=alpha)
    student = [[2.0, 1.2, -2.0], [0.0, 1.6, 0.0]]
    teach = [[1.2, 2.0, -1.2], [2.0, 1.2, -2.0]]
    total = 0.0
    for i in range(2):
        pt = _softmax(teach[i])
        tgt = [alpha * pt[k] + (1 - alpha) * (1.0 if k == i else 0.0) for k in range(3)]
        lse = math.log(sum(math.exp(x) for x in student[i]))
        total += -sum(tgt[k] * (student[i][k] - lse) for k in range(3))
    assert loss.item() == pytest.approx(total / 2, abs=1e-6)


def test_info_nce_soft_alpha_zero_equals_hard_and_teacher_gets_no_grad():
    torch.manual_seed(1)
    q = F.normalize(torch.randn(5, 8), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(5, 8), dim=1)
    queue = F.normalize(torch.randn(7, 8), dim=1)
    teacher = F.normalize(torch.randn(5, 8), dim=1).requires_grad_(True)
    hard = info_nce(q, k, 0.07, queue=queue)
    soft0 = info_nce(q, k, 0.07, queue=queue, teacher_query=teacher, alpha=0.0)
    assert soft0.item() == pytest.approx(hard.item(), abs=1e-6)
    soft = info_nce(q, k, 0.07, queue=queue, teacher_query=teacher, alpha=0.4)
    assert abs(soft.item() - hard.item()) > 1e-3
    soft.backward()
    assert teacher.grad is None


def test_info_nce_multi_positive_ids_value():
    # Three queries, ids [7, 7, 3]: query 0 and 1 each have positives {0, 1}, query 2 has {2}. tau = 1.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ids = torch.tensor([7, 7, 3])
    loss = info_nce(q, k, 1.0, query_ids=ids)
    logits = [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, -1.0]]
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    expected = 0.0
    for row, tgt in zip(logits, targets):
        lse = math.log(sum(math.exp(x) for x in row))
        expected += -sum(t * (x - lse) for t, x in zip(tgt, row))
    assert loss.item() == pytest.approx(expected / 3, abs=1e-6)
    torch.testing.assert_close(multi_positive_targets(ids, ids), torch.tensor(targets))
    # Unique ids reduce to the one-hot loss.
    assert info_nce(q, k, 1.0, query_ids=torch.arange(3)).item() == pytest.approx(info_nce(q, k, 1.0).item(), abs=1e-6)
    # Queue entries with ids can be positives too; without queue ids they are plain negatives.
    queue = torch.tensor([[0.0, 1.0]])
    with_ids = info_nce(q, k, 1.0, query_ids=ids, queue=queue, queue_ids=torch.tensor([3]))
    row2 = [1.0, 1.0, -1.0, 1.0]
    exp2 = -0.5 * ((row2[2] - math.log(sum(map(math.exp, row2)))) + (row2[3] - math.log(sum(map(math.exp, row2)))))
    per = info_nce(q, k, 1.0, query_ids=ids, queue=queue, queue_ids=torch.tensor([3]), reduction="none")
    assert per[2].item() == pytest.approx(exp2, abs=1e-6)
    assert with_ids.item() == pytest.approx(per.mean().item(), abs=1e-7)


def test_info_nce_queue_negatives_increase_loss():
    torch.manual_seed(2)
    q, k = F.normalize(torch.randn(6, 16), dim=1), F.normalize(torch.randn(6, 16), dim=1)
    queue = F.normalize(torch.randn(32, 16), dim=1)
    base = info_nce(q, k, 0.1, reduction="none")
    more = info_nce(q, k, 0.1, queue=queue, reduction="none")
    assert bool((more > base).all())


def test_info_nce_return_logits_and_input_errors():
    queue = torch.tensor([[-1.0, 0.0]])
    _, logits = info_nce(Q, K, TAU, queue=queue, return_logits=True)
    torch.testing.assert_close(logits, torch.tensor([[2.0, 1.2, -2.0], [0.0, 1.6, 0.0]]))
    with pytest.raises(ValueError, match="teacher_query"):
        info_nce(Q, K, TAU, alpha=0.4)
    with pytest.raises(ValueError, match="keys per rank"):
        info_nce(Q, torch.randn(3, 2), TAU)
    with pytest.raises(ValueError, match="no key with the same id"):
        info_nce(Q, K, TAU, query_ids=torch.tensor([1, 2]), key_ids=torch.tensor([1, 5]))


def test_info_nce_bf16_autocast_computes_in_fp32():
    torch.manual_seed(3)
    q, k = F.normalize(torch.randn(4, 32), dim=1), F.normalize(torch.randn(4, 32), dim=1)
    ref = info_nce(q, k, 0.001)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = info_nce(q, k, 0.001)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_temperature_clamps_is_1d_and_reusable_in_one_graph():
    t = Temperature(init=0.07, min=0.001, max=0.5)
    assert t.value.shape == (1,) and t().dim() == 0
    assert t().item() == pytest.approx(0.07)
    with torch.no_grad():
        t.value.fill_(2.0)
    assert t().item() == pytest.approx(0.5) and t.value.item() == pytest.approx(0.5)   # stored value clamped
    with torch.no_grad():
        t.value.fill_(1e-6)
    assert t().item() == pytest.approx(0.001)
    with torch.no_grad():
        t.value.fill_(0.1)
    # Used twice in one graph (as CMA, IMC and LMI share it): backward must work and gradients add up.
    # loss = a / tau + b / tau with a = 1, b = 2  ->  dloss/dtau = -(1 + 2) / tau^2
    loss = torch.tensor(1.0) / t() + torch.tensor(2.0) / t()
    loss.backward()
    assert t.value.grad.item() == pytest.approx(-3.0 / 0.01, rel=1e-5)
    with pytest.raises(ValueError):
        Temperature(init=0.7, min=0.001, max=0.5)
    # Flows into info_nce: d/dtau of the loss is nonzero.
    t.value.grad = None
    info_nce(Q, K, t()).backward()
    assert t.value.grad is not None and t.value.grad.abs().item() > 0


# ------------------------------------------------------------------------------------------------- matching
def test_valid_negative_mask_ids_and_offset():
    ids = torch.tensor([5, 5, 9])
    expected = torch.tensor([[False, False, True], [False, False, True], [True, True, False]])
    assert torch.equal(valid_negative_mask(3, 3, 0, ids), expected)
    # Global layout: 2 local rows, 4 candidates, this rank's rows at columns 2, 3.
    got = valid_negative_mask(2, 4, offset=2, row_ids=torch.tensor([1, 2]), candidate_ids=torch.tensor([2, 0, 1, 2]))
    assert torch.equal(got, torch.tensor([[True, True, False, True], [False, True, True, False]]))


def test_hard_negatives_follow_softmax_and_never_hit_shared_ids():
    # Row 0 of sim_t2i over candidates 0..4 (candidate 1 shares image id 0 with row 0):
    #   logits [9, 9, 0, log 2, log 4] -> valid {2, 3, 4} with probabilities 1/7, 2/7, 4/7.
    b = 5
    ids = torch.tensor([0, 0, 1, 2, 3])
    sim = torch.zeros(b, b)
    sim[0] = torch.tensor([9.0, 9.0, 0.0, math.log(2), math.log(4)])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(b, b)
    for _ in range(1500):
        neg_img, neg_txt = sample_negatives(sim, sim, "local-hard", image_ids=ids, generator=g)
        counts[torch.arange(b), neg_img] += 1
        counts[torch.arange(b), neg_txt] += 1
    valid = valid_negative_mask(b, b, 0, ids)
    assert counts[~valid].sum() == 0                    # positives and same-image pairs never drawn
    freq = counts[0] / counts[0].sum()
    torch.testing.assert_close(freq[2:], torch.tensor([1 / 7, 2 / 7, 4 / 7]), atol=0.035, rtol=0)


def test_hard_negatives_fallback_and_errors():
    b = 4
    ids = torch.tensor([0, 1, 2, 2])
    sim = torch.zeros(b, b)
    sim[0, 2] = float("nan")
    sim[1, 3] = float("inf")
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(b, b)
    for _ in range(1200):
        neg_img, _ = sample_negatives(sim, sim, "local-hard", image_ids=ids, generator=g)
        counts[torch.arange(b), neg_img] += 1
    assert counts[~valid_negative_mask(b, b, 0, ids)].sum() == 0
    # Rows 0 and 1 fell back to uniform over their 3 valid candidates.
    for row in (0, 1):
        freq = counts[row][valid_negative_mask(b, b, 0, ids)[row]] / 1200
        torch.testing.assert_close(freq, torch.full((3,), 1 / 3), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="no valid negative"):
        sample_negatives(torch.zeros(1, 1), torch.zeros(1, 1), "local-hard")
    with pytest.raises(ValueError, match="no valid negative"):
        sample_negatives(torch.zeros(3, 3), torch.zeros(3, 3), "random", image_ids=torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="must be"):
        sample_negatives(torch.zeros(3, 4), torch.zeros(3, 4), "local-hard")


def test_random_negatives_uniform_and_respect_ids_and_global_single_process():
    ids = torch.tensor([0, 0, 1, 2])
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(4, 4)
    for _ in range(1200):
        neg_img, neg_txt = sample_negatives(None, None, "random", image_ids=ids, generator=g)
        counts[torch.arange(4), neg_img] += 1
    valid = valid_negative_mask(4, 4, 0, ids)
    assert counts[~valid].sum() == 0
    freq = counts[0][valid[0]] / 1200                    # row 0: candidates {2, 3}
    torch.testing.assert_close(freq, torch.full((2,), 0.5), atol=0.05, rtol=0)
    # global-hard in one process is local-hard: a single valid candidate per row makes the draw deterministic.
    ids2 = torch.tensor([0, 0, 1, 1])
    sim = torch.randn(4, 4)
    sim[:, :] = -1e4
    sim[0, 2] = sim[1, 3] = sim[2, 0] = sim[3, 1] = 5.0
    a, _ = sample_negatives(sim, sim, "global-hard", image_ids=ids2, generator=g)
    assert a.tolist() == [2, 3, 0, 1]


def test_itm_triplets_layout():
    image_index, text_index, labels = itm_triplets(torch.tensor([1, 0]), torch.tensor([1, 0]))
    assert image_index.tolist() == [0, 1, 1, 0, 0, 1]
    assert text_index.tolist() == [0, 1, 0, 1, 1, 0]
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]
    image_index, text_index, _ = itm_triplets(torch.tensor([0, 3]), torch.tensor([1, 0]), offset=2)
    assert image_index.tolist() == [2, 3, 0, 3, 2, 3] and text_index.tolist() == [2, 3, 2, 3, 1, 0]


def test_itm_loss_value():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, -0.5]])
    labels = torch.tensor([1, 0, 0])
    expected = (_nll(0.0, [2.0, 0.0]) + _nll(0.0, [0.0, 1.0]) + _nll(0.5, [0.5, -0.5])) / 3
    assert itm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_swap_images_for_itm():
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        index, labels = swap_images_for_itm(7, image_ids=ids, generator=g)
        assert int(labels.sum()) == 3
        pos = labels.bool()
        assert torch.equal(index[pos], torch.arange(7)[pos])
        assert bool((ids[index[~pos]] != ids[~pos]).all())
    with pytest.raises(ValueError):
        swap_images_for_itm(1)


# ------------------------------------------------------------------------------------------------------ MLM
# (the masker is vlp.data.masking.Masker: tests/test_masking.py)


def test_mlm_loss_hand_computed_ce_and_distillation():
    # One sequence of 3 positions over a vocabulary of 3; position 1 is not masked.
    logits = torch.tensor([[[1.0, 0.0, 0.0], [5.0, -5.0, 0.0], [0.0, 2.0, 1.0]]], requires_grad=True)
    labels = torch.tensor([[0, -100, 2]])
    ce = (_nll(1.0, [1.0, 0.0, 0.0]) + _nll(1.0, [0.0, 2.0, 1.0])) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(ce, abs=1e-6)

    soft = torch.tensor([[[0.0, 1.0, 0.0], [3.0, 3.0, 3.0], [1.0, 1.0, 0.0]]])
    kd = 0.0
    for pos in (0, 2):
        t = _softmax(soft[0, pos].tolist())
        row = logits[0, pos].tolist()
        lse = math.log(sum(math.exp(x) for x in row))
        kd += -sum(t[v] * (row[v] - lse) for v in range(3))
    kd /= 2                                                              # mean over MASKED positions only
    alpha = 0.4
    got = mlm_loss(logits, labels, soft_logits=soft, alpha=alpha)
    assert got.item() == pytest.approx((1 - alpha) * ce + alpha * kd, abs=1e-6)
    # The teacher's unmasked positions do not matter; alpha = 0 ignores the teacher.
    soft2 = soft.clone()
    soft2[0, 1] = torch.tensor([-9.0, 9.0, 0.0])
    assert mlm_loss(logits, labels, soft_logits=soft2, alpha=alpha).item() == pytest.approx(got.item(), abs=1e-7)
    assert mlm_loss(logits, labels, soft_logits=soft, alpha=0.0).item() == pytest.approx(ce, abs=1e-6)
    # Flat [N, V] inputs give the same number.
    assert mlm_loss(logits[0], labels[0], soft[0], alpha).item() == pytest.approx(got.item(), abs=1e-7)


def test_mlm_loss_no_masked_token_is_zero_with_graph():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 4), -100), soft_logits=torch.randn(2, 4, 7), alpha=0.4)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------- mutual information
# B = 2 samples, N = 2 locals, D = 2, tau = 0.5:
#   l0 = [e1, e2], l1 = [(0.6, 0.8), -e1];  m0 = e1, m1 = e2
#   positives  u_p(0, :) = [1, 0] / tau,  u_p(1, :) = [0.8, 0] / tau
#   negatives  sample 0: m0 . l1j = [0.6, -1] / tau;  sample 1: m1 . l0j = [0, 1] / tau
L_LOC = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
M_GLOB = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def _anchor(pos: float, negs: list[float], tau: float = 0.5) -> float:
    return _nll(pos / tau, [pos / tau] + [x / tau for x in negs])


def test_lmi_image_hand_computed():
    expected = (_anchor(1.0, [0.6, -1.0]) + _anchor(0.0, [0.6, -1.0])
                + _anchor(0.8, [0.0, 1.0]) + _anchor(0.0, [0.0, 1.0])) / 4
    assert in_batch_g2l_loss(L_LOC, M_GLOB, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_lmi_text_mask_hand_computed():
    # Local 1 of sample 1 is padding: anchor (1, 1) is dropped and l11 is no negative of sample 0.
    mask = torch.tensor([[1, 1], [1, 0]])
    s0 = (_anchor(1.0, [0.6]) + _anchor(0.0, [0.6])) / 2
    s1 = _anchor(0.8, [0.0, 1.0]) / 1
    assert in_batch_g2l_loss(L_LOC, M_GLOB, 0.5, mask).item() == pytest.approx((s0 + s1) / 2, abs=1e-6)
    per = in_batch_g2l_loss(L_LOC, M_GLOB, 0.5, mask, reduction="none")
    torch.testing.assert_close(per, torch.tensor([s0, s1]), atol=1e-6, rtol=0)


def test_lmi_padding_contributes_nothing():
    torch.manual_seed(4)
    b, n, d = 3, 5, 8
    loc = F.normalize(torch.randn(b, n, d), dim=-1)
    glob = F.normalize(torch.randn(b, d), dim=-1).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    ref = in_batch_g2l_loss(loc, glob, 0.07, mask)
    (g_ref,) = torch.autograd.grad(ref, glob)
    # Append 4 more padded locals filled with large garbage: same loss and gradient.
    pad = 10 * torch.randn(b, 4, d)
    loc2 = torch.cat([loc, pad], dim=1)
    mask2 = torch.cat([mask, torch.zeros(b, 4, dtype=mask.dtype)], dim=1)
    got = in_batch_g2l_loss(loc2, glob, 0.07, mask2)
    (g_got,) = torch.autograd.grad(got, glob)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=1e-5)
    # Overwriting already-padded locals changes nothing either.
    loc3 = loc.clone()
    loc3[2, 2:] = -loc3[2, 2:] * 3
    assert in_batch_g2l_loss(loc3, glob, 0.07, mask).item() == pytest.approx(ref.item(), abs=1e-6)


def test_lmi_small_batches_and_single_local():
    torch.manual_seed(5)
    # B = 1: no negatives -> loss 0, no crash (the official .squeeze() crashes here).
    one = in_batch_g2l_loss(torch.randn(1, 4, 8), torch.randn(1, 8), 0.1, torch.ones(1, 4))
    assert one.item() == pytest.approx(0.0, abs=1e-6)
    # N = 1 is the ordinary InfoNCE of globals against the single locals.
    loc, glob = F.normalize(torch.randn(4, 1, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    got = in_batch_g2l_loss(loc, glob, 0.1)
    assert got.item() == pytest.approx(info_nce(glob, loc[:, 0], 0.1).item(), abs=1e-5)
    # A sample with no valid local contributes 0 (no division by zero).
    mask = torch.tensor([[1], [0], [1], [1]])
    per = in_batch_g2l_loss(loc, glob, 0.1, mask, reduction="none")
    assert torch.isfinite(per).all() and per[1].item() == 0.0


def test_patch_pooling_values_and_official_grids():
    x = torch.arange(16.0).reshape(1, 16, 1)                  # 4x4 grid, row-major 0..15
    got = patch_pooling(x, n_locals=4)
    assert got.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    torch.manual_seed(6)
    for grid, kernel in ((16, 4), (24, 6)):                    # TCL pre-training 256 px, retrieval 384 px
        tokens = torch.randn(2, grid * grid, 5)
        ref = F.avg_pool2d(tokens.reshape(2, grid, grid, 5).permute(0, 3, 1, 2), kernel, stride=kernel)
        ref = ref.permute(0, 2, 3, 1).reshape(2, 16, 5)
        torch.testing.assert_close(patch_pooling(tokens, 16), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="square grid"):
        patch_pooling(torch.randn(1, 257, 4))
    with pytest.raises(ValueError, match="not a square number"):
        patch_pooling(torch.randn(1, 256, 4), n_locals=8)
    with pytest.raises(ValueError, match="equal windows"):
        patch_pooling(torch.randn(1, 100, 4), n_locals=16)


# ------------------------------------------------------------------------------------- official TCL fixture
def _fixture():
    for root in (Path(__file__).parent / "fixtures" / "official", Path("/work/shared/fixtures/official")):
        path = root / "tcl_tiny.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
    pytest.skip("tcl_tiny.pt fixture not found")


def test_official_tcl_alignment_losses_reproduced():
    """loss_ita = (LMI_text + LMI_image + i2t + t2i + i2i + t2t) / 6, each term from recorded tensors.

    The fixture records I, T (online features), and the queues after enqueue, whose first B columns are the
    momentum features I_m (view 2) and T_m; the queues before enqueue are in the state_dict. The momentum
    weights equal the online ones in this fixture (fresh copy, EMA of equal weights) and the model ran in eval
    mode, so the momentum text tokens equal the recorded online ``text_embeds``: that gives the text locals.
    The image locals need the momentum ViT on view 2, which is not recorded: a timm ViT loaded with the
    official weights recomputes it (checked first against the recorded view-1 ``image_embeds``).
    """
    data = _fixture()
    sd, rec, inp = data["state_dict"], data["records"], data["inputs"]
    temp, alpha = float(sd["temp"]), float(inp["alpha"])
    i_feat, t_feat = rec["image_feat"], rec["text_feat"]
    b = i_feat.shape[0]
    i_m, t_m = rec["image_queue_after"][:, :b].t(), rec["text_queue_after"][:, :b].t()
    q_i, q_t = sd["image_queue"].t(), sd["text_queue"].t()

    i2t = info_nce(i_feat, t_m, temp, queue=q_t, teacher_query=i_m, alpha=alpha)
    t2i = info_nce(t_feat, i_m, temp, queue=q_i, teacher_query=t_m, alpha=alpha)
    i2i = info_nce(i_feat, i_m, temp, queue=q_i)                 # IMC reuses the same function
    t2t = info_nce(t_feat, t_m, temp, queue=q_t)

    def proj(x, name):
        return F.normalize(F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"]), dim=-1)

    text_locals = proj(rec["text_embeds"][:, 1:], "text_proj_m")
    lmi_text = in_batch_g2l_loss(text_locals, t_feat, temp, inp["attention_mask"][:, 1:])
    assert lmi_text.item() == pytest.approx(rec["loss_lmi_text"].item(), abs=1e-5)

    import functools

    from timm.models.vision_transformer import VisionTransformer

    vit_cfg = data["config"]["vit"]
    vit = VisionTransformer(img_size=vit_cfg["img_size"], patch_size=vit_cfg["patch_size"],
                            embed_dim=vit_cfg["embed_dim"], depth=vit_cfg["depth"], num_heads=vit_cfg["num_heads"],
                            qkv_bias=True, num_classes=0, global_pool="",
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=vit_cfg["layer_norm_eps"]))
    vit.load_state_dict({k[len("visual_encoder_m."):]: v for k, v in sd.items()
                         if k.startswith("visual_encoder_m.")})
    vit.eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(inp["image"]), rec["image_embeds"], atol=1e-5, rtol=0)
        tokens_m = vit.forward_features(inp["image_aug"])
    torch.testing.assert_close(proj(tokens_m[:, 0], "vision_proj_m"), i_m, atol=1e-5, rtol=0)
    # 4x4 patch grid: TCL's pre-training pooling (side sqrt(4) = 2) gives 4 locals.
    image_locals = patch_pooling(proj(tokens_m[:, 1:], "vision_proj_m"), n_locals=4)
    lmi_image = in_batch_g2l_loss(image_locals, i_feat, temp)
    assert lmi_image.item() == pytest.approx(rec["loss_lmi_image"].item(), abs=1e-5)

    total = (lmi_text + lmi_image + i2t + t2i + i2i + t2t) / 6
    assert total.item() == pytest.approx(rec["loss_ita"].item(), abs=1e-5)


def test_official_tcl_masking_and_negatives_obey_the_rules():
    """The recorded official MLM masking and hard negatives satisfy the invariants our functions enforce."""
    data = _fixture()
    rec, inp, special = data["records"], data["inputs"], data["config"]["special_ids"]
    ids, masked, labels = inp["input_ids"], rec["mlm_input_ids"], rec["mlm_labels"]
    sel = labels != -100
    assert not sel[(ids == special["pad"]) | (ids == special["cls"])].any()
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(masked[~sel], ids[~sel])
    b = ids.shape[0]
    valid = valid_negative_mask(b, b)
    assert valid[torch.arange(b), rec["neg_image_for_text"]].all()
    assert valid[torch.arange(b), rec["neg_text_for_image"]].all()
