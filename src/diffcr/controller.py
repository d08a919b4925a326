"""`DiffCRController`: the module `apply` attaches as `model.diffcr`.

It owns every DiffCR parameter (one router per block, the layer x region kept-ratio table) and the plan of
the current forward pass: the timestep region of each sample (captured once per model call) and, per
block, which kept ratios run for which samples. Blocks hold a plain reference to it, so all DiffCR weights
live under the single `diffcr.` prefix and the base model's own state-dict keys never change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from diffcr.config import DiffCRConfig
from diffcr.ratios import bracket, clamp_straight_through, snap_to_bin, timestep_region

# `DiffCRController.compiled_key` beside the region shared by the batch: training routes eagerly under
# torch.compile (its plans hold per-step Python values); a batch that mixes regions runs every kept count of a
# block for the whole batch, each sample taking its own (static shapes, one graph for every mix)
EAGER = -1
MIXED = -2


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


def couple_regions(table: torch.Tensor, offset_lr: float = 1.0) -> torch.Tensor:
    """`table` (L, R) in value, with each layer's gradient shared by its regions.

    The gradient reaching table[l, r] is offset_lr * g[l, r] + sum over r' of g[l, r']: what a layer ratio a[l]
    plus per-region offsets o[l, r] (table = a + o), the offsets at `offset_lr` times the layer's learning rate,
    would move under plain gradient descent. Each region's ratio otherwise learns only from the samples whose
    timestep falls in it (a quarter of the batch at R = 4) and drifts on that noise; coupled, the layer's share
    learns from every sample and the regions depart from it only where their own gradients agree, more slowly
    the smaller `offset_lr` (0: the regions move together, as DiffCR-L's one ratio). At inference nothing
    changes: the table is the table.

    Example:
        >>> table = torch.zeros(1, 3, requires_grad=True)
        >>> (couple_regions(table, 0.5) * torch.tensor([[1.0, 0.0, 0.0]])).sum().backward()
        >>> table.grad.tolist()
        [[1.5, 1.0, 1.0]]
    """
    layer_sum = table.sum(dim=1, keepdim=True)  # (L, 1)
    shared = layer_sum - layer_sum.detach()  # (L, 1): zero in value, the layer's gradient to every region
    own = (offset_lr - 1.0) * (table - table.detach())  # (L, R): zero in value, scales the region's own gradient
    return table + shared + own  # (L, R): the same values, exactly


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
        # regions whose target is the top bin run dense: nothing there to learn, and one pass per block instead of
        # the two a learnable ratio blends
        self.dense_regions = frozenset(r for r, target in enumerate(config.region_targets or ()) if target >= 1.0)
        self.frozen_schedule: list[list[float]] | None = None
        self._regions: list[int] | None = None
        self._inference_plans: list[list[RoutingGroup]] | None = None
        self._used_table: torch.Tensor | None = None
        self._used: dict[int, torch.Tensor] = {}
        # what this forward runs under torch.compile: the region shared by the batch, or EAGER
        self.compiled_key = 0
        self._region_index: torch.Tensor | None = None
        # the snapped schedule as Python numbers, so that a compiled forward does not read the table's values (a
        # graph break); from the config, not the tensor, which may sit on the meta device here
        initial = snap_to_bin(min(max(config.init_kept_ratio, min(config.ratio_bins)), 1.0), config.ratio_bins)
        self._snapped_cache = [[initial] * config.timestep_regions for _ in range(num_layers)]

    def forward(self) -> torch.Tensor:
        """The kept-ratio table (L, R).

        Read through a module call, never as `self.kept_ratio` directly, so that offloading hooks (accelerate's
        `cpu_offload`, diffusers' group offloading), which move weights onto the device around module calls,
        see every read.

        With `config.region_coupling` (and more than one region), the table's value is unchanged but its
        gradient is shared along each layer: d loss / d kept_ratio[l, r] becomes
        region_offset_lr * g[l, r] + sum_r' g[l, r'], as if the table were a layer ratio plus per-region offsets
        (see `couple_regions`).
        """
        if self.config.region_coupling and self.config.timestep_regions > 1 and torch.is_grad_enabled():
            return couple_regions(self.kept_ratio, self.config.region_offset_lr)
        return self.kept_ratio

    def _apply(self, fn, recurse=True):
        # Routers and ratios stay fp32 whatever the model is cast to: a bf16 kept ratio loses updates smaller
        # than 2^-8 (the ratio lr times a small gradient) and bf16 router logits tie often at 1000+ tokens.
        # Device moves still apply.
        def keep_fp32(tensor):
            moved = fn(tensor)
            if tensor.dtype == torch.float32 and moved.dtype != torch.float32:
                return tensor.to(device=moved.device)
            return moved

        return super()._apply(keep_fp32, recurse)

    def train(self, mode: bool = True):
        # model.eval() runs eagerly before a compiled forward: the moment to read the table
        self._refresh_snapped()
        return super().train(mode)

    def __getstate__(self):
        # the last forward's plan may hold autograd graph tensors, which cannot be deep-copied or pickled
        state = dict(self.__dict__)
        state.update(_regions=None, _inference_plans=None, _used_table=None, _used={}, _region_index=None)
        return state

    # -- per model call ---------------------------------------------------------------------------------
    def begin_forward(self, timestep, batch_size: int) -> None:
        """Record each sample's timestep region (called by the model's forward pre-hook).

        Planning waits for the first block call: under offloading the ratios reach the device only then.
        Also sets `compiled_key`, all that a compiled forward reads of the regions (see `_compiled_key`).
        """
        self._used = {}
        self._inference_plans = None
        if torch.compiler.is_compiling():
            self.compiled_key = self._compiled_key(timestep, batch_size)
            return
        self._regions = self.regions_of(timestep, batch_size)
        self.compiled_key = self._key_of(self._regions, self._regions_matter(), timestep)

    def _regions_matter(self) -> bool:
        """Whether this forward's plan depends on the timestep regions."""
        if self.config.timestep_regions == 1:
            return False
        if self.training and self.frozen_schedule is None:
            return True
        schedule = self.frozen_schedule or self._snapped_cache
        return any(len(set(row)) > 1 for row in schedule)

    def _key_of(self, regions: list[int], regions_matter: bool, timestep) -> int:
        """The region every sample falls in (0 when the plan does not depend on it), or MIXED / EAGER."""
        if self.training and self.frozen_schedule is None:
            return EAGER
        if not regions_matter:
            return 0
        if len(set(regions)) == 1:
            return regions[0]
        device = timestep.device if torch.is_tensor(timestep) else None
        self._region_index = torch.tensor(regions, device=device)  # (B,), read by the mixed compiled path
        return MIXED

    def _compiled_key(self, timestep, batch_size: int) -> int:
        """Under torch.compile: what the compiled forward specialises on, so that recompiles stay bounded by the
        number of regions (each mix of regions in a batch would otherwise compile again).

        The timestep is read (a graph break, outside the block loop) only when the plan depends on it: a model
        whose schedule is the same in every region, such as a fresh one (kept 1.0) or DiffCR-L, traces into one
        graph (`fullgraph=True`, `torch.export`).
        """
        if not self._regions_matter():
            self._regions = [0] * batch_size
            return self._key_of(self._regions, False, timestep)
        return _record_regions(self, timestep, batch_size)

    def regions_of(self, timestep, batch_size: int) -> list[int]:
        """The timestep region of each sample, from the timestep values the model receives."""
        regions = self.config.timestep_regions
        if regions == 1:
            return [0] * batch_size
        if timestep is None:
            raise ValueError(
                f"DiffCR with timestep_regions={regions} needs the timestep the model receives; call the model "
                "with timestep=..., or use timestep_regions=1"
            )
        timestep = torch.as_tensor(timestep).detach().flatten()
        if timestep.numel() == 1:
            timestep = timestep.expand(batch_size)
        if timestep.numel() != batch_size:
            raise ValueError(f"timestep has {timestep.numel()} values for a batch of {batch_size}")
        timestep = timestep.cpu()
        total = self.num_train_timesteps
        if timestep.is_floating_point() and not torch.isfinite(timestep).all():
            raise ValueError(
                f"timestep holds non-finite values ({timestep.tolist()}); DiffCR picks each sample's kept ratios "
                f"from its timestep in [0, {total}], so pass finite timesteps"
            )
        if (timestep < 0).any() or (timestep > total).any():
            # a timestep past T usually means the regions were cut on the wrong range: every sample would
            # silently land in the last region
            raise ValueError(
                f"timestep values {timestep.tolist()} fall outside [0, {total}], the range DiffCR cuts into "
                f"{regions} regions; set DiffCRConfig.num_train_timesteps to the scheduler's num_train_timesteps"
            )
        return timestep_region(timestep, regions, total).tolist()

    @contextlib.contextmanager
    def replaying(self, regions: list[int] | None):
        """Run block calls with the regions of an earlier forward, and restore the current forward's state.

        Gradient checkpointing recomputes blocks in the backward pass, possibly after another forward (an EMA or
        logging step) changed the regions: the recomputation must route exactly as its own forward did, and
        must not overwrite what the newer forward recorded for the ratio loss.
        """
        saved = (self._regions, self._inference_plans, self._used_table, self._used)
        self._regions, self._inference_plans, self._used_table, self._used = regions, None, None, {}
        try:
            yield
        finally:
            self._regions, self._inference_plans, self._used_table, self._used = saved

    def _plan_inference(self, table: list[list[float]], device: torch.device) -> None:
        """Plan every block of this forward at once: one host-to-device copy, and blocks whose samples keep
        the same ratios share one plan (so a routed block call does no planning work of its own)."""
        regions = self._regions
        self._used_table = torch.tensor(table)[:, regions].to(device)  # (L, B)
        shared: dict[tuple, list[RoutingGroup]] = {}
        plans = []
        for row in table:
            kept_per_sample = tuple(row[r] for r in regions)
            if kept_per_sample not in shared:
                shared[kept_per_sample] = self._group(
                    list(kept_per_sample), lambda kept, members: [(kept, None)], device
                )
            plans.append(shared[kept_per_sample])
        self._inference_plans = plans

    def _refresh_snapped(self) -> None:
        if self.kept_ratio.device.type != "meta":
            self._snapped_cache = self.snapped_schedule()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_snapped()  # load_state_dict (diffcr.load, checkpoints) changes the table: read it now

    def _eval_schedule(self) -> list[list[float]]:
        """What eval mode runs: the frozen schedule, or the table snapped to bins, read at every eager forward
        (writes through `.data`, as EMA's `copy_to` does, leave no trace to detect a change by). A compiled forward
        does not read parameter values: it uses the table as read at the last eager forward, `model.eval()` /
        `model.train()` or `load_state_dict`."""
        if self.frozen_schedule is not None:
            return self.frozen_schedule
        if not torch.compiler.is_compiling():
            self._snapped_cache = self._snapped_from(self())  # a module call: offloading hooks see the read
        return self._snapped_cache

    def snapped_schedule(self) -> list[list[float]]:
        """The kept-ratio table snapped to the nearest bins: what eval mode and `freeze` run."""
        return self._snapped_from(self())

    def _snapped_from(self, table: torch.Tensor) -> list[list[float]]:
        bins = self.config.ratio_bins
        values = table.detach().clamp(min(bins), 1.0).tolist()
        return [
            [1.0 if region in self.dense_regions else snap_to_bin(value, bins) for region, value in enumerate(row)]
            for row in values
        ]

    # -- per block call ---------------------------------------------------------------------------------
    def layer_plan(self, layer: int, batch_size: int, device: torch.device) -> list[RoutingGroup]:
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
            if torch.compiler.is_compiling():
                return self._compiled_layer_plan(layer, batch_size, device)
            if self._inference_plans is None or regions is not self._regions:
                self._regions = regions
                self._plan_inference(self._eval_schedule(), device)
            self._used[layer] = self._used_table[layer]
            return self._inference_plans[layer]
        # training: per region, the two bins around the clamped ratio, blended with differentiable weights;
        # samples whose regions share the same two bins run together, each with its own weights
        bins = self.config.ratio_bins
        table = self()  # (L, R)
        continuous, brackets = {}, {}
        for region in sorted(set(regions)):
            if region in self.dense_regions:
                continuous[region] = torch.ones((), dtype=table.dtype, device=table.device)
                continue
            continuous[region] = clamp_straight_through(table[layer, region], min(bins), 1.0)
            brackets[region] = bracket(continuous[region], bins)
        self._used[layer] = torch.stack([continuous[r] for r in regions])  # (B,)
        bin_pairs = [
            (1.0, None) if r in self.dense_regions else (brackets[r][0][0], brackets[r][1][0]) for r in regions
        ]

        def passes_of(pair, members):
            if pair[1] is None:  # a dense region: one pass, its output as is
                return [(1.0, None)]
            weights_high = torch.stack([brackets[regions[i]][0][1] for i in members])  # (b,)
            weights_low = torch.stack([brackets[regions[i]][1][1] for i in members])  # (b,)
            return [(pair[0], weights_high), (pair[1], weights_low)]

        return self._group(bin_pairs, passes_of, device)

    def _compiled_layer_plan(self, layer: int, batch_size: int, device: torch.device) -> list[RoutingGroup]:
        """The eval plan of a compiled forward, from `compiled_key` alone (the batch shares one region)."""
        kept = self._eval_schedule()[layer][self.compiled_key]
        self._used[layer] = torch.full((batch_size,), kept, device=device)
        return [RoutingGroup(None, [(kept, None)])]

    def mixed_kept_ratios(self, layer: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
        """For a compiled forward whose batch mixes regions: block `layer`'s distinct kept ratios, and each
        sample's kept ratio (B,) as a tensor (no Python value per sample, so no recompile per mix)."""
        row = self._eval_schedule()[layer]
        per_sample = torch.tensor(row, device=device)[self._region_index.to(device)]  # (B,)
        self._used[layer] = per_sample
        return sorted(set(row), reverse=True), per_sample

    def _group(self, keys: list, passes_of, device: torch.device) -> list[RoutingGroup]:
        """One `RoutingGroup` per distinct key, in order of first appearance."""
        members: dict = {}
        for i, key in enumerate(keys):
            members.setdefault(key, []).append(i)
        if len(members) == 1:
            ((key, idx),) = members.items()
            return [RoutingGroup(None, passes_of(key, idx))]
        return [RoutingGroup(torch.tensor(idx, device=device), passes_of(key, idx)) for key, idx in members.items()]

    def router_logits(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) router logits in fp32 even under autocast: bf16 scores tie often at 1000+ tokens, and
        top-k membership must not depend on how ties break."""
        # a module call (not a read of the weight), so that offloading hooks bring the weight to the device
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return self.routers[layer](tokens.float()).squeeze(-1)

    def used_kept_ratio(self) -> torch.Tensor:
        """(num_layers, B): the kept ratio each block used for each sample in the last forward."""
        if len(self._used) != self.num_layers:
            raise RuntimeError(
                f"no complete forward pass recorded yet ({len(self._used)} of {self.num_layers} blocks ran since "
                "the last model call); run the model before asking for the ratio loss"
            )
        return torch.stack([self._used[layer] for layer in range(self.num_layers)])


@torch.compiler.disable
def _record_regions(controller: DiffCRController, timestep, batch_size: int) -> int:
    """Read the timestep's regions eagerly (a graph break) and return the key a compiled forward runs."""
    controller._regions = controller.regions_of(timestep, batch_size)
    return controller._key_of(controller._regions, True, timestep)
