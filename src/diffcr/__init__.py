"""diffcr: learned, layer- and timestep-adaptive token routing that makes Diffusion Transformers faster.

An implementation of DiffCR (You et al., "Layer- and Timestep-Adaptive Differentiable Token Compression
Ratios for Efficient Diffusion Transformers", CVPR 2025). `import diffcr` does not import diffusers.

Example:
    >>> import diffcr
    >>> from diffcr.models import build_base_model
    >>> model = diffcr.apply(build_base_model(num_layers=2), diffcr.DiffCRConfig(target_kept_ratio=0.8))
    >>> _ = diffcr.freeze(model)
    >>> diffcr.schedule(model).mean_kept_ratio
    1.0
"""

from diffcr.api import (
    Schedule,
    apply,
    freeze,
    from_pretrained,
    get_config,
    is_applied,
    is_frozen,
    load,
    mean_kept_ratio_used,
    parameter_groups,
    ratio_loss,
    read_artifact,
    remove,
    save,
    schedule,
)
from diffcr.config import DiffCRConfig

__version__ = "0.1.0"

__all__ = [
    "DiffCRConfig",
    "Schedule",
    "apply",
    "freeze",
    "from_pretrained",
    "get_config",
    "is_applied",
    "is_frozen",
    "load",
    "mean_kept_ratio_used",
    "parameter_groups",
    "ratio_loss",
    "read_artifact",
    "remove",
    "save",
    "schedule",
]
