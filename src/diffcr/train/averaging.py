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


def takes_sample(step: int, average_from: int, checkpoint_every: int) -> bool:
    """Whether the weights after `step` updates join the running mean kept with the checkpoints: from
    `average_from` on, at every multiple of `checkpoint_every`. (The weights the run ends on join the mean it
    returns, `WeightAverage.ending_with`, but not the one it keeps: a run resumed for more steps goes on as if it
    had never stopped there.)"""
    return bool(average_from) and step >= average_from and step % checkpoint_every == 0


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

    def ending_with(self, params: dict[str, torch.Tensor], step: int) -> WeightAverage:
        """The mean a run ending at `step` returns: this one, with the last weights added unless they are in it."""
        final = WeightAverage()
        final.mean = {name: value.clone() for name, value in self.mean.items()}
        final.steps = list(self.steps)
        if step not in final.steps:
            final.add(params, step)
        return final

    def check_fits(self, params: dict[str, torch.Tensor], where: str) -> None:
        """Refuse a mean whose tensors are not the model's trainable ones (names and shapes)."""
        if not self.steps:
            return
        differ = sorted(set(params) ^ set(self.mean))
        differ += sorted(n for n in set(params) & set(self.mean) if params[n].shape != self.mean[n].shape)
        if differ:
            raise ValueError(f"the weight average in {where} does not match this model/mode: tensors {differ[:8]}")

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

        from diffcr.checkpoint import CheckpointError, _older_checkpoints_hint

        average = cls()
        steps = meta.get("average_steps")
        if steps is None:
            if start_step >= average_from:
                # only a run written before weight averaging existed gets here: average_from may not change on resume
                raise ValueError(
                    f"cannot resume {ckpt.parent} with average_from={average_from}: {ckpt.name} (step {start_step}) "
                    "was written without a weight average, so the steps before it cannot join one. Resume without "
                    f"--average-from, or give a step after {start_step}"
                )
            return average
        hint = _older_checkpoints_hint(ckpt.parent, exclude=ckpt.name)
        well_formed = isinstance(steps, list) and all(isinstance(s, int) for s in steps)
        if not well_formed or steps != sorted(set(steps)) or any(not average_from <= s <= start_step for s in steps):
            raise CheckpointError(f"{ckpt / 'state.json'} has a damaged 'average_steps' ({steps!r:.200}): {hint}")
        if steps:
            path = ckpt / AVERAGE_FILE
            try:
                average.mean = load_file(str(path))
            except Exception as err:  # missing, truncated or not safetensors
                raise CheckpointError(
                    f"cannot read the weight average {path} ({type(err).__name__}: {err}): {hint}"
                ) from err
            if not all(torch.isfinite(tensor).all() for tensor in average.mean.values()):
                raise CheckpointError(f"the weight average {path} holds non-finite values: {hint}")
        average.steps = list(steps)
        return average
