"""Step caching with diffusers' first-block cache (FBCache, after TeaCache, Liu et al. 2024): when the first
block's output residual barely changes from the previous step, the remaining blocks are skipped and their
cached residual is reused.

diffusers' pipelines drive its cache hooks through `CacheMixin.cache_context`; DiT is not a `CacheMixin`,
so `FirstBlockCache` sets the same context around our own sampling loop (one context for the CFG-doubled
batch, state reset before every sampling run).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch


def register_routed_blocks_for_cache(model: torch.nn.Module) -> None:
    """Let diffusers' block hooks (the first-block cache) attach to the routed blocks of `model`.

    diffusers looks up a block's metadata (where its hidden states are in the arguments and the output) by the
    block's exact class, and a routed block is a subclass that `diffcr.apply` generates, which it does not know.
    The routed subclass takes the same arguments and returns the same outputs as its base class, so it is
    registered with a copy of the base class's metadata. Only the block lists diffusers' hooks attach to are
    looked at (as `apply_first_block_cache` finds them); blocks that are not routed are left alone.
    """
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for name, blocks in model.named_children():
        if name not in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS or not isinstance(blocks, torch.nn.ModuleList):
            continue
        for block in blocks:
            base_cls = getattr(type(block), "_diffcr_base_class", None)
            if base_cls is None:
                continue
            base_metadata = TransformerBlockRegistry.get(base_cls)
            metadata = dataclasses.replace(base_metadata, _cached_parameter_indices=None)
            TransformerBlockRegistry.register(type(block), metadata)
            # the routed forward is (hidden_states, *args, **kwargs): argument positions come from the base's
            metadata._cls = base_cls


class FirstBlockCache:
    """diffusers' first-block cache attached to `model` (in place) with relative-change `threshold`; `model`
    may be routed by DiffCR (the two compose: the cache skips steps, routing skips tokens in the steps run)."""

    def __init__(self, model, threshold: float):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        if threshold < 0:
            raise ValueError(f"threshold={threshold} must be >= 0 (0 = never skip)")
        register_routed_blocks_for_cache(model)
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
        self.model = model
        self.threshold = threshold

    def _set_context(self, name: str | None) -> None:
        try:
            from diffusers.hooks.hooks import CacheContext, _set_cache_context
        except ImportError:  # diffusers before cache contexts became objects
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(self.model)._set_context(name)
            return
        _set_cache_context(self.model, CacheContext(name) if name is not None else None)

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)

    @contextlib.contextmanager
    def sampling_run(self):
        """Wrap one whole sampling run: fresh cache state, one context for every step."""
        self.reset()
        self._set_context("cfg")
        try:
            yield self.model
        finally:
            self._set_context(None)
