"""Random routing: keep a routed model's schedule (how many tokens each block computes) but pick the tokens
at random, which isolates what the learned router itself is worth."""

from __future__ import annotations

import types

import torch


def randomize_routers(model, seed: int = 0):
    """Replace the router scores of a DiffCR model with uniform noise from a generator seeded with `seed`.

    The kept-token counts (the schedule) are untouched, so speed and FLOPs equal the learned model's. Undo by
    deleting the instance attribute: `del model.diffcr.router_logits`.
    """
    controller = model.diffcr
    generator = torch.Generator().manual_seed(seed)

    def random_logits(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        scores = torch.rand(tokens.shape[:2], generator=generator)  # (B, N)
        return scores.to(tokens.device)

    controller.router_logits = types.MethodType(random_logits, controller)
    return model
