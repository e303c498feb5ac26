"""IPOT (vlp.losses.optimal_transport, UNITER's WRA) against hand values and POT's exact solver ``ot.emd2``.

POT's own proximal solver (``ot.solve_batch(method="proximal")``) has a sign error in POT 0.9.7 (POT #842), so the
reference is the exact optimum: IPOT's proximal term vanishes at convergence, and its cost approaches the exact one
as beta shrinks and the iterations grow.
"""

import math

import numpy as np
import pytest
import torch

from vlp.losses.optimal_transport import cosine_cost, ipot_plan, ot_distance, wra_loss

ot = pytest.importorskip("ot")


def problem(seed: int, m: int | None = None, n: int | None = None, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    m = m or int(torch.randint(2, 8, (1,), generator=g))
    n = n or int(torch.randint(2, 8, (1,), generator=g))
    return torch.randn(1, m, d, generator=g, dtype=torch.float64), torch.randn(1, n, d, generator=g,
                                                                                 dtype=torch.float64)


def exact(x, y) -> float:
    c = cosine_cost(x, y)[0].numpy()
    m, n = c.shape
    return float(ot.emd2(np.full(m, 1.0 / m), np.full(n, 1.0 / n), c))


def ones(b, k):
    return torch.ones(b, k, dtype=torch.bool)


def test_cosine_cost_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]])
    expected = torch.tensor([[[0.0, 2.0, 1 - 1 / math.sqrt(2)], [1.0, 1.0, 1 - 1 / math.sqrt(2)]]])
    torch.testing.assert_close(cosine_cost(x, y), expected)


def test_one_by_one_and_a_permutation_by_hand():
    # one token each side: all mass on the single pair, D = C
    x, y = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 1.0]]])
    d, plan = ot_distance(x, y, ones(1, 1), ones(1, 1), return_plan=True)
    torch.testing.assert_close(plan, torch.ones(1, 1, 1))
    torch.testing.assert_close(d, torch.tensor([1 - 1 / math.sqrt(2)]))
    # y is a permutation of x: the optimal plan is the matching permutation / n, D = 0
    x = torch.eye(3).unsqueeze(0)
    y = x[:, [2, 0, 1]]
    d, plan = ot_distance(x, y, ones(1, 3), ones(1, 3), beta=0.1, iterations=300, return_plan=True)
    match = torch.zeros(3, 3)
    match[[0, 1, 2], [1, 2, 0]] = 1 / 3
    torch.testing.assert_close(plan[0], match, atol=1e-5, rtol=0)
    assert abs(float(d)) < 1e-5


@pytest.mark.parametrize("seed", range(12))
def test_ipot_approaches_the_exact_optimum(seed):
    x, y = problem(seed)
    e = exact(x, y)
    m, n = x.shape[1], y.shape[1]
    default = float(ot_distance(x.float(), y.float(), ones(1, m), ones(1, n)))  # UNITER: beta 0.5, 50 iterations
    assert abs(default - e) < 5e-3, (default, e)  # the column marginals are met only approximately
    tight = float(ot_distance(x.float(), y.float(), ones(1, m), ones(1, n), beta=0.1, iterations=300))
    assert abs(tight - e) < 1e-5, (tight, e)


def test_the_plan_has_uniform_marginals():
    x, y = problem(3, 5, 7)
    _, plan = ot_distance(x.float(), y.float(), ones(1, 5), ones(1, 7), return_plan=True)
    torch.testing.assert_close(plan.sum(2), torch.full((1, 5), 1 / 5))  # exact after the last sigma update
    torch.testing.assert_close(plan.sum(1), torch.full((1, 7), 1 / 7), atol=1e-4, rtol=0)
    assert (plan >= 0).all()


def test_padding_is_ignored_and_pairs_are_independent():
    """A batch of two padded problems (garbage in the padding) = each problem alone, trimmed."""
    (x1, y1), (x2, y2) = problem(5, 3, 6), problem(6, 5, 2)
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 100
    y = torch.randn(2, 6, 8, dtype=torch.float64) * 100
    x[0, :3], y[0, :6], x[1, :5], y[1, :2] = x1[0], y1[0], x2[0], y2[0]
    xm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ym = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    d, plan = ot_distance(x.float(), y.float(), xm, ym, return_plan=True)
    alone = torch.cat([ot_distance(x1.float(), y1.float(), ones(1, 3), ones(1, 6)),
                       ot_distance(x2.float(), y2.float(), ones(1, 5), ones(1, 2))])
    torch.testing.assert_close(d, alone)
    assert plan[0, 3:].abs().sum() == 0 and plan[1, :, 2:].abs().sum() == 0


def test_the_gradient_flows_through_the_cost_only():
    x, y = problem(7, 4, 5)
    x, y = x.float().requires_grad_(), y.float().requires_grad_()
    d, plan = ot_distance(x, y, ones(1, 4), ones(1, 5), return_plan=True)
    d.sum().backward()
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    (cosine_cost(x2, y2) * plan).sum().backward()  # the plan as a constant
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad)
    assert not plan.requires_grad


def test_fp32_and_no_nan_on_degenerate_pairs():
    # a small beta with many iterations underflows entries of the fp32 plan: never NaN
    x, y = problem(6, 4, 5)
    assert torch.isfinite(ot_distance(x.float(), y.float(), ones(1, 4), ones(1, 5), beta=0.05, iterations=800)).all()
    x = torch.randn(3, 4, 8).half()
    y = torch.randn(3, 5, 8).half()
    xm = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])  # sample 1: no text token at all
    ym = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])  # sample 2: no region
    d = ot_distance(x, y, xm, ym)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert d[1] == 0 and d[2] == 0
    with pytest.raises(ValueError):
        ipot_plan(torch.zeros(1, 2, 2), ones(1, 2), ones(1, 2), beta=0.0)


def test_wra_loss_by_hand_and_without_nan():
    d = torch.tensor([0.2, 0.9, 0.4, 0.7])
    torch.testing.assert_close(wra_loss(d, torch.tensor([1, 0, 1, 0])), torch.tensor((0.2 + 0.4 - 0.9 - 0.7) / 4))
    torch.testing.assert_close(wra_loss(d, torch.ones(4, dtype=torch.long)), d.sum() / 4)  # no negative
    torch.testing.assert_close(wra_loss(d, torch.zeros(4, dtype=torch.long)), -d.sum() / 4)  # no positive
    empty = wra_loss(torch.zeros(0, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_fp32_under_autocast():
    x, y = problem(9, 4, 6)
    ref = ot_distance(x.float(), y.float(), ones(1, 4), ones(1, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = ot_distance(x.float(), y.float(), ones(1, 4), ones(1, 6))
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, ref)
