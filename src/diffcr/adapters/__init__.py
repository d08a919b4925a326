"""Model families DiffCR knows, behind a registry keyed by the model's class name.

Surgery finds models and blocks by class *name*, so `import diffcr` never imports diffusers.
"""

from __future__ import annotations

from diffcr.adapters.base import Adapter
from diffcr.adapters.dit import DIT_ADAPTER
from diffcr.adapters.flux import FLUX_ADAPTER
from diffcr.adapters.pixart import PIXART_ADAPTER
from diffcr.adapters.sd3 import SD3_ADAPTER

ADAPTERS: dict[str, Adapter] = {
    "PixArtTransformer2DModel": PIXART_ADAPTER,
    "DiTTransformer2DModel": DIT_ADAPTER,
    "SD3Transformer2DModel": SD3_ADAPTER,
    "FluxTransformer2DModel": FLUX_ADAPTER,
}


def get_adapter(model) -> Adapter:
    """The adapter for `model`'s class.

    Raises:
        TypeError: the class is not supported; the message names the supported classes.
    """
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise TypeError(
        f"diffcr does not support {type(model).__name__}; supported model classes: {', '.join(sorted(ADAPTERS))} "
        "(diffusers transformers, e.g. PixArtTransformer2DModel.from_pretrained(..., subfolder='transformer'))"
    )


__all__ = ["ADAPTERS", "Adapter", "get_adapter"]
