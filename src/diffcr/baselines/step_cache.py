"""Step caching with diffusers' first-block cache (FBCache, after TeaCache, Liu et al. 2024): when the first
block's output residual barely changes from the previous step, the remaining blocks are skipped and their
cached residual is reused.

diffusers' pipelines drive its cache hooks through `CacheMixin.cache_context`; DiT is not a `CacheMixin`,
so `FirstBlockCache` sets the same context around our own sampling loop (one context for the CFG-doubled
batch, state reset before every sampling run).
"""

from __future__ import annotations

import contextlib


class FirstBlockCache:
    """diffusers' first-block cache attached to `model` (in place) with relative-change `threshold`."""

    def __init__(self, model, threshold: float):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        if threshold < 0:
            raise ValueError(f"threshold={threshold} must be >= 0 (0 = never skip)")
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
