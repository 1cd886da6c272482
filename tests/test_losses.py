"""Losses: values on hand cases, scale invariance, gradients that point the right way."""

from __future__ import annotations

import pytest
import torch

from qscore.train.losses import eps_mse, l1_loss, plcc_loss, plcc_rank_loss, rank_loss


def test_plcc_loss_is_one_minus_pearson_and_scale_invariant():
    torch.manual_seed(0)
    t = torch.randn(16)
    p = t + 0.5 * torch.randn(16)
    r = torch.corrcoef(torch.stack([p, t]))[0, 1]
    assert plcc_loss(p, t).item() == pytest.approx(1 - r.item(), abs=1e-5)
    assert plcc_loss(7 * p + 3, t).item() == pytest.approx(plcc_loss(p, t).item(), abs=1e-5)
    assert plcc_loss(2 * t - 1, t).item() == pytest.approx(0.0, abs=1e-5)
    assert plcc_loss(-t, t).item() == pytest.approx(2.0, abs=1e-5)


def test_rank_loss_zero_iff_order_right_and_scale_invariant():
    t = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert rank_loss(t ** 3, t).item() == 0.0  # any increasing map
    swapped = torch.tensor([0.1, 0.3, 0.5, 0.9])  # items 1 and 2 swapped
    loss = rank_loss(swapped, t)
    assert loss.item() > 0
    assert rank_loss(100 * swapped, t).item() == pytest.approx(loss.item(), rel=1e-5)
    # tied targets contribute no pair
    assert rank_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == 0.0


def test_plcc_rank_sum_and_gradient_direction():
    t = torch.tensor([0.0, 1.0, 2.0, 3.0])
    p = torch.tensor([0.3, 0.1, 0.5, 0.2], requires_grad=True)
    loss = plcc_rank_loss(p, t)
    assert loss.item() == pytest.approx((plcc_loss(p, t) + 0.3 * rank_loss(p, t)).item())
    loss.backward()
    with torch.no_grad():
        better = p - 0.05 * p.grad
    assert plcc_rank_loss(better, t).item() < loss.item()


def test_l1_and_eps_mse():
    a, b = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert l1_loss(a, 3 * b).item() == 3.0
    assert eps_mse(a, 2 * b).item() == 4.0
    assert eps_mse(a.half(), b.half()).dtype == torch.float32


def test_dice_loss_is_zero_on_a_match_and_near_one_on_disjoint_masks():
    from qscore.train.losses import dice_loss

    empty = torch.zeros(2, 1, 8, 8)
    left, right = empty.clone(), empty.clone()
    left[..., :4], right[..., 4:] = 1, 1
    assert float(dice_loss(empty, empty)) == 0.0  # an authentic image predicted clean
    assert float(dice_loss(left, left)) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(left, right)) > 0.95
