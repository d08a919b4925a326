"""Kept-ratio arithmetic: token counts, bins, the differentiable interpolation, snapping, timestep regions.

Pure functions on torch tensors and Python numbers; nothing here knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# kept_ratio * num_tokens is computed in floating point: 0.7 * 10 = 7.000000000000001 must give 7, not 8.
_CEIL_SLACK = 1e-6


def num_kept_tokens(kept_ratio: float, num_tokens: int) -> int:
    """`min(N, ceil(kept_ratio * N))`, the number of tokens a block computes.

    Example:
        >>> num_kept_tokens(0.7, 10), num_kept_tokens(0.88, 256), num_kept_tokens(0.0, 256)
        (7, 226, 0)
    """
    if kept_ratio <= 0.0:
        return 0
    return min(num_tokens, math.ceil(kept_ratio * num_tokens - _CEIL_SLACK))


def clamp_straight_through(theta: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """`theta` clamped to [low, high] in value, with the identity's gradient.

    A plain clamp would stop every gradient once theta drifts past 1.0 (the diffusion loss pushes toward
    dense), and then the ratio loss could never pull it back.
    """
    return theta + (theta.clamp(low, high) - theta).detach()


def bracket(kept_ratio: torch.Tensor, ratio_bins: Sequence[float]):
    """The two bins around a continuous kept ratio and their interpolation weights.

    Args:
        kept_ratio: 0-dim tensor inside [min(bins), 1] (already clamped).
        ratio_bins: strictly descending bins starting at 1.0.

    Returns:
        ((bin_high, weight_high), (bin_low, weight_low)): floats for the bins, 0-dim tensors for the weights
        (differentiable in `kept_ratio`), with weight_high * bin_high + weight_low * bin_low == kept_ratio.
        At a bin exactly, that bin takes weight 1 and its lower neighbour (or, for the lowest bin, its upper
        one) weight 0: the pass still runs, because the gradient of the ratio needs both outputs.

    Example:
        >>> (hi, w_hi), (lo, w_lo) = bracket(torch.tensor(0.88), (1.0, 0.9, 0.8))
        >>> hi, lo, round(w_hi.item(), 4), round(w_lo.item(), 4)
        (0.9, 0.8, 0.8, 0.2)
    """
    value = float(kept_ratio.detach())
    upper = 0
    while upper + 2 < len(ratio_bins) and ratio_bins[upper + 1] > value:
        upper += 1
    bin_high, bin_low = ratio_bins[upper], ratio_bins[upper + 1]
    # bins as tensors of the ratio's dtype, so that a ratio exactly at a bin gets weight exactly 1
    high = torch.tensor(bin_high, dtype=kept_ratio.dtype, device=kept_ratio.device)
    low = torch.tensor(bin_low, dtype=kept_ratio.dtype, device=kept_ratio.device)
    weight_high = (kept_ratio - low) / (high - low)
    weight_low = 1.0 - weight_high
    return (bin_high, weight_high), (bin_low, weight_low)


def snap_to_bin(kept_ratio: float, ratio_bins: Sequence[float]) -> float:
    """The bin nearest to `kept_ratio` (a tie goes to the larger kept ratio: quality first).

    Example:
        >>> snap_to_bin(0.86, (1.0, 0.9, 0.8)), snap_to_bin(0.85, (1.0, 0.9, 0.8))
        (0.9, 0.9)
    """
    return min(ratio_bins, key=lambda b: (round(abs(b - kept_ratio), 9), -b))


def timestep_region(timestep: torch.Tensor, num_regions: int, num_train_timesteps: int) -> torch.Tensor:
    """`min(R - 1, floor(t * R / T))` per sample, from the raw timestep value the model receives.

    Example:
        >>> timestep_region(torch.tensor([0, 249, 250, 999, 1000]), 4, 1000).tolist()
        [0, 0, 1, 3, 3]
    """
    scaled = torch.floor(timestep.to(torch.float64) * num_regions / num_train_timesteps)
    return scaled.clamp(0, num_regions - 1).to(torch.long)


def ratio_loss_value(mean_kept_ratio: torch.Tensor, target_kept_ratio: float) -> torch.Tensor:
    """(mean kept ratio - target)^2."""
    return (mean_kept_ratio - target_kept_ratio) ** 2
