"""Uniform-ratio routing: every block keeps the same fraction of tokens at every timestep, and only the
routers learn (the Mixture-of-Depths baseline of DiffCR's paper)."""

from __future__ import annotations

from diffcr.config import DiffCRConfig


def uniform_config(kept_ratio: float, **overrides) -> DiffCRConfig:
    """A DiffCR config whose kept ratio is fixed at `kept_ratio` in every layer and region.

    `kept_ratio` is made a bin of its own, so training runs exactly that ratio (no blend of two bins) and the
    ratio loss is off; train it with `ratio_lr=0` so that the table stays where it starts.
    """
    if not 0.0 < kept_ratio <= 1.0:
        raise ValueError(f"kept_ratio={kept_ratio} must lie in (0, 1]")
    bins = tuple(sorted({1.0, round(float(kept_ratio), 6), 0.05}, reverse=True))
    settings = {
        "target_kept_ratio": kept_ratio,
        "timestep_regions": 1,
        "ratio_bins": bins,
        "init_kept_ratio": kept_ratio,
        "ratio_loss_weight": 0.0,
    }
    settings.update(overrides)
    return DiffCRConfig(**settings)
