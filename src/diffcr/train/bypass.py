"""Random token bypass while pretraining: in each step some blocks compute only a random subset of the image
tokens and pass the others through unchanged, exactly as a DiffCR-routed block does.

The idea is TREAD's (Krause et al., "TREAD: Token Routing for Efficient Architecture-agnostic Diffusion
Training", 2025): random routing during training. Here it serves DiffCR: a base that has learned to do without
some blocks for some tokens loses less when DiffCR's routers later remove that compute. The routing is diffcr's
own (`diffcr.apply` with a fixed schedule and random scores), so the bypass the base learns is the one DiffCR
runs; `diffcr.remove` takes it off again, and the saved base is a plain model with its own state-dict keys.

Everything random is drawn from a generator seeded by (seed, step), like the rest of a training step, so a
resumed run routes exactly as the uninterrupted one.
"""

from __future__ import annotations

import types

import torch

# the kept ratios a bypassing block draws from, uniformly: DiffCR's default bins below 1.0
BYPASS_KEPT_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

# a stream of its own, so that drawing the bypass leaves the step's batch, timesteps and noise as they were
_STREAM = 7_919


class TokenBypass:
    """Random bypass on `model` (DiffCR attached by `attach`, taken off by `detach`).

    Args:
        probability: the chance that a block bypasses tokens, drawn for each (block, timestep region) per step.
        seed: the run's seed.
    """

    def __init__(self, model, probability: float, seed: int):
        self.model = model
        self.probability = probability
        self.seed = seed
        self._scores: torch.Generator | None = None

    @classmethod
    def attach(cls, model, config, probability: float, seed: int) -> TokenBypass:
        """Attach DiffCR with `config` (its routers and kept ratios never train) and random router scores."""
        import diffcr

        diffcr.apply(model, config)
        controller = model.diffcr
        controller.requires_grad_(False)
        bypass = cls(model, probability, seed)

        def random_logits(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
            return torch.rand(tokens.shape[:2], generator=bypass._scores).to(tokens.device)  # (B, N)

        controller.router_logits = types.MethodType(random_logits, controller)
        return bypass

    def draw(self, step: int) -> list[list[float]]:
        """Fix step `step`'s schedule (blocks x regions) and its score stream; returns the schedule."""
        # within int64 for every seed `TrainConfig` allows (below 2**32)
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * _STREAM + 1) % 2**63)
        controller = self.model.diffcr
        shape = (controller.num_layers, controller.config.timestep_regions)
        bypassing = torch.rand(shape, generator=generator) < self.probability  # (L, R)
        choice = torch.randint(len(BYPASS_KEPT_RATIOS), shape, generator=generator)  # (L, R)
        schedule = [
            [BYPASS_KEPT_RATIOS[c] if b else 1.0 for b, c in zip(row_b, row_c)]
            for row_b, row_c in zip(bypassing.tolist(), choice.tolist())
        ]
        controller.frozen_schedule = schedule
        self._scores = generator
        return schedule

    def detach(self):
        """Take the routing off: the model is the plain base again. Returns it."""
        import diffcr

        return diffcr.remove(self.model)
