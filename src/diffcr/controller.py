"""`DiffCRController`: the module `apply` attaches as `model.diffcr`.

It owns every DiffCR parameter (one router per block, the layer x region kept-ratio table) and the plan of
the current forward pass: the timestep region of each sample (captured once per model call) and, per
block, which kept ratios run for which samples. Blocks hold a plain reference to it, so all DiffCR weights
live under the single `diffcr.` prefix and the base model's own state-dict keys never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffcr.config import DiffCRConfig
from diffcr.ratios import bracket, clamp_straight_through, snap_to_bin, timestep_region


@dataclass
class RoutingGroup:
    """Samples of one block call that share their kept ratios.

    Attributes:
        sample_idx: (b,) indices into the batch, or None for the whole batch.
        passes: [(kept_ratio bin, weight)]: one pass with weight None (output used as is), or two passes
            whose updates are blended with differentiable per-sample weights (b,).
    """

    sample_idx: torch.Tensor | None
    passes: list[tuple[float, torch.Tensor | None]]


class DiffCRController(nn.Module):
    """Routers and learnable kept ratios for `num_layers` blocks of width `hidden_size`."""

    def __init__(self, config: DiffCRConfig, num_layers: int, hidden_size: int, num_train_timesteps: int):
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_train_timesteps = num_train_timesteps
        self.routers = nn.ModuleList(nn.Linear(hidden_size, 1, bias=False) for _ in range(num_layers))
        # kept_ratio[l, r]: the learnable kept ratio of block l in timestep region r
        self.kept_ratio = nn.Parameter(torch.full((num_layers, config.timestep_regions), config.init_kept_ratio))
        self.frozen_schedule: list[list[float]] | None = None
        self._regions: list[int] | None = None
        self._inference_plans: list[list[RoutingGroup]] | None = None
        self._used_table: torch.Tensor | None = None
        self._used: dict[int, torch.Tensor] = {}

    def __getstate__(self):
        # the last forward's plan may hold autograd graph tensors, which cannot be deep-copied or pickled
        state = dict(self.__dict__)
        state.update(_regions=None, _inference_plans=None, _used_table=None, _used={})
        return state

    # -- per model call ---------------------------------------------------------------------------------
    def begin_forward(self, timestep, batch_size: int) -> None:
        """Record each sample's timestep region (called by the model's forward pre-hook)."""
        regions = self.config.timestep_regions
        if regions == 1:
            self._regions = [0] * batch_size
        elif timestep is None:
            raise ValueError(
                f"DiffCR with timestep_regions={regions} needs the timestep the model receives; call the model "
                "with timestep=..., or use timestep_regions=1"
            )
        else:
            timestep = torch.as_tensor(timestep).flatten()
            if timestep.numel() == 1:
                timestep = timestep.expand(batch_size)
            if timestep.numel() != batch_size:
                raise ValueError(f"timestep has {timestep.numel()} values for a batch of {batch_size}")
            self._regions = timestep_region(timestep.detach().cpu(), regions, self.num_train_timesteps).tolist()
        self._used = {}
        self._inference_plans = None
        if self.frozen_schedule is not None or not self.training:
            self._plan_inference(self.frozen_schedule or self.snapped_schedule())

    def _plan_inference(self, table: list[list[float]]) -> None:
        """Plan every block of this forward at once: one host-to-device copy, and blocks whose samples keep
        the same ratios share one plan (so a routed block call does no planning work of its own)."""
        regions = self._regions
        self._used_table = torch.tensor(table)[:, regions].to(self.kept_ratio.device)  # (L, B)
        shared: dict[tuple, list[RoutingGroup]] = {}
        plans = []
        for row in table:
            kept_per_sample = tuple(row[r] for r in regions)
            if kept_per_sample not in shared:
                shared[kept_per_sample] = self._group(list(kept_per_sample), lambda kept, members: [(kept, None)])
            plans.append(shared[kept_per_sample])
        self._inference_plans = plans

    def snapped_schedule(self) -> list[list[float]]:
        """The kept-ratio table snapped to the nearest bins: what eval mode and `freeze` run."""
        bins = self.config.ratio_bins
        low = min(bins)
        table = self.kept_ratio.detach().clamp(low, 1.0).tolist()
        return [[snap_to_bin(value, bins) for value in row] for row in table]

    # -- per block call ---------------------------------------------------------------------------------
    def layer_plan(self, layer: int, batch_size: int) -> list[RoutingGroup]:
        """Which kept ratios block `layer` runs for which samples; records the ratios used for the loss."""
        regions = self._regions
        if regions is None or len(regions) != batch_size:
            if self.config.timestep_regions != 1:
                raise RuntimeError(
                    "DiffCR blocks were called without the model's forward (no timestep captured) or with a "
                    f"different batch size ({batch_size} vs {None if regions is None else len(regions)})"
                )
            regions = [0] * batch_size
        if self.frozen_schedule is not None or not self.training:
            if self._inference_plans is None or regions is not self._regions:
                self._regions = regions
                self._plan_inference(self.frozen_schedule or self.snapped_schedule())
            self._used[layer] = self._used_table[layer]
            return self._inference_plans[layer]
        # training: per region, the two bins around the clamped ratio, blended with differentiable weights;
        # samples whose regions share the same two bins run together, each with its own weights
        bins = self.config.ratio_bins
        continuous, brackets = {}, {}
        for region in sorted(set(regions)):
            continuous[region] = clamp_straight_through(self.kept_ratio[layer, region], min(bins), 1.0)
            brackets[region] = bracket(continuous[region], bins)
        self._used[layer] = torch.stack([continuous[r] for r in regions])  # (B,)
        bin_pairs = [(brackets[r][0][0], brackets[r][1][0]) for r in regions]

        def passes_of(pair, members):
            weights_high = torch.stack([brackets[regions[i]][0][1] for i in members])  # (b,)
            weights_low = torch.stack([brackets[regions[i]][1][1] for i in members])  # (b,)
            return [(pair[0], weights_high), (pair[1], weights_low)]

        return self._group(bin_pairs, passes_of)

    def _group(self, keys: list, passes_of) -> list[RoutingGroup]:
        """One `RoutingGroup` per distinct key, in order of first appearance."""
        members: dict = {}
        for i, key in enumerate(keys):
            members.setdefault(key, []).append(i)
        if len(members) == 1:
            ((key, idx),) = members.items()
            return [RoutingGroup(None, passes_of(key, idx))]
        device = self.kept_ratio.device
        return [RoutingGroup(torch.tensor(idx, device=device), passes_of(key, idx)) for key, idx in members.items()]

    def router_logits(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) router logits in fp32 even under autocast: bf16 scores tie often at 1000+ tokens, and
        top-k membership must not depend on how ties break."""
        weight = self.routers[layer].weight  # (1, C)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return torch.nn.functional.linear(tokens.float(), weight.float()).squeeze(-1)

    def used_kept_ratio(self) -> torch.Tensor:
        """(num_layers, B): the kept ratio each block used for each sample in the last forward."""
        if len(self._used) != self.num_layers:
            raise RuntimeError(
                f"no complete forward pass recorded yet ({len(self._used)} of {self.num_layers} blocks ran since "
                "the last model call); run the model before asking for the ratio loss"
            )
        return torch.stack([self._used[layer] for layer in range(self.num_layers)])
