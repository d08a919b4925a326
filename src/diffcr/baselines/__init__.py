"""The accelerations a user would otherwise reach for, made runnable on the same models so that
`diffcr bench` can compare DiffCR against them: token merging (tomesd), step caching (diffusers' first-block
cache), random routing at a learned schedule, and uniform-ratio routing (the paper's MoD baseline)."""

from diffcr.baselines.random_routing import randomize_routers
from diffcr.baselines.step_cache import FirstBlockCache
from diffcr.baselines.tome import apply_tome, remove_tome
from diffcr.baselines.uniform import uniform_config

__all__ = ["FirstBlockCache", "apply_tome", "randomize_routers", "remove_tome", "uniform_config"]
