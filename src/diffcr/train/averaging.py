"""A uniform average of the trained weights over the end of a run, kept with its checkpoints.

At a constant learning rate the weights of a small diffusion model wander around a better model than any one
of them; their mean over the last stretch of steps is that better model (the shipped text-to-image base is the
mean of its last six checkpoints; docs/RESULTS.md). The idea is stochastic weight averaging (Izmailov et al.,
"Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018) with a uniform window, as in
checkpoint averaging. The average is part of every checkpoint, so a resumed run ends on the same mean as one
that ran straight through.
"""

from __future__ import annotations

from pathlib import Path

import torch

AVERAGE_FILE = "average.safetensors"


def takes_sample(step: int, average_from: int, checkpoint_every: int, last_step: int) -> bool:
    """Whether the weights after `step` updates join the mean: from `average_from` on, at every checkpoint step
    (a multiple of `checkpoint_every`) and at the run's last step."""
    if not average_from or step < average_from:
        return False
    return step % checkpoint_every == 0 or step == last_step


class WeightAverage:
    """The running mean of named tensors and the steps it holds."""

    def __init__(self) -> None:
        self.mean: dict[str, torch.Tensor] = {}
        self.steps: list[int] = []

    def add(self, params: dict[str, torch.Tensor], step: int) -> None:
        count = len(self.steps) + 1
        with torch.no_grad():
            for name, param in params.items():
                value = param.detach().to("cpu", torch.float32)
                if name not in self.mean:
                    self.mean[name] = value.clone()
                else:
                    self.mean[name] += (value - self.mean[name]) / count
        self.steps.append(step)

    def copy_into(self, params: dict[str, torch.Tensor]) -> None:
        """Overwrite `params` with the mean (names must match the ones averaged)."""
        missing = set(params) ^ set(self.mean)
        if missing:
            raise ValueError(f"the weight average does not match the model: differing tensors {sorted(missing)[:8]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.mean[name].to(param.device, param.dtype))

    @classmethod
    def from_checkpoint(cls, ckpt: Path, meta: dict, start_step: int, average_from: int) -> WeightAverage:
        """The average a checkpoint holds (`meta` is its state.json), checked against the run's `average_from`."""
        from safetensors.torch import load_file

        from diffcr.checkpoint import CheckpointError

        average = cls()
        steps = meta.get("average_steps")
        if steps is None:
            if start_step >= average_from:
                raise ValueError(
                    f"cannot resume {ckpt.parent} with average_from={average_from}: {ckpt.name} (step {start_step}) "
                    "was written without a weight average, so the steps before it cannot join one. Resume without "
                    f"--average-from, or give a step after {start_step}"
                )
            return average
        if not isinstance(steps, list) or not all(isinstance(s, int) and 0 <= s <= start_step for s in steps):
            raise CheckpointError(f"{ckpt / 'state.json'} has a damaged 'average_steps' ({steps!r:.200})")
        if steps:
            path = ckpt / AVERAGE_FILE
            try:
                average.mean = load_file(str(path))
            except Exception as err:  # missing, truncated or not safetensors
                raise CheckpointError(
                    f"cannot read the weight average {path} ({type(err).__name__}: {err}); the checkpoint is "
                    "incomplete: start afresh in a new folder"
                ) from err
            if not all(torch.isfinite(tensor).all() for tensor in average.mean.values()):
                raise CheckpointError(f"the weight average {path} holds non-finite values")
        average.steps = list(steps)
        return average
