"""DiT (`DiTTransformer2DModel`): class-conditional adaLN-Zero blocks, no cross-attention.

`DiTTransformer2DModel.forward` reads `transformer_blocks[0].norm1` for the final layer; routed blocks keep
their class's attributes (the class is subclassed, not wrapped), so that keeps working."""

from diffcr.adapters.base import Adapter

DIT_ADAPTER = Adapter(name="dit", has_cross_attention=False)
