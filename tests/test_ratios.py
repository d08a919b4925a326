import pytest
import torch

from diffcr.ratios import (
    bracket,
    clamp_straight_through,
    num_kept_tokens,
    ratio_loss_value,
    snap_to_bin,
    timestep_region,
)

BINS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@pytest.mark.parametrize(
    ("kept", "n", "expected"),
    [(1.0, 256, 256), (0.9, 256, 231), (0.7, 10, 7), (0.3, 10, 3), (0.01, 256, 3), (0.0, 256, 0), (0.5, 1, 1)],
)
def test_num_kept_is_ceil_without_float_noise(kept, n, expected):
    assert num_kept_tokens(kept, n) == expected


def test_bracket_weights_interpolate_the_ratio():
    (hi, w_hi), (lo, w_lo) = bracket(torch.tensor(0.88), BINS)
    assert (hi, lo) == (0.9, 0.8)
    assert w_hi.item() == pytest.approx(0.8) and w_lo.item() == pytest.approx(0.2)
    for value in (1.0, 0.95, 0.9, 0.55, 0.1):
        (hi, w_hi), (lo, w_lo) = bracket(torch.tensor(value), BINS)
        assert lo < hi and lo <= value <= hi
        assert (w_hi * hi + w_lo * lo).item() == pytest.approx(value)
    (hi, w_hi), (lo, _) = bracket(torch.tensor(1.0), BINS)
    assert (hi, lo, w_hi.item()) == (1.0, 0.9, 1.0)


def test_bracket_gradient_is_the_bin_difference_slope():
    theta = torch.tensor(0.85, requires_grad=True)
    (_, w_hi), (_, w_lo) = bracket(theta, BINS)
    (w_hi * 3.0 + w_lo * 1.0).backward()
    assert theta.grad.item() == pytest.approx((3.0 - 1.0) / 0.1)


def test_snap_and_clamp():
    assert snap_to_bin(0.86, BINS) == 0.9
    assert snap_to_bin(0.84, BINS) == 0.8
    assert snap_to_bin(0.85, BINS) == 0.9  # tie -> keep more
    assert snap_to_bin(0.02, BINS) == 0.1
    theta = torch.tensor([1.3, 0.05], requires_grad=True)
    clamped = clamp_straight_through(theta, 0.1, 1.0)
    assert clamped.tolist() == pytest.approx([1.0, 0.1])
    clamped.sum().backward()
    assert theta.grad.tolist() == [1.0, 1.0]


def test_timestep_region_and_loss():
    assert timestep_region(torch.tensor([0, 249, 250, 999, 1000]), 4, 1000).tolist() == [0, 0, 1, 3, 3]
    assert timestep_region(torch.tensor([0.5, 999.9]), 10, 1000).tolist() == [0, 9]
    assert ratio_loss_value(torch.tensor(0.7), 0.5).item() == pytest.approx(0.04)
