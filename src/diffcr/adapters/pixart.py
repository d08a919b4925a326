"""PixArt-alpha / PixArt-Sigma (`PixArtTransformer2DModel`): adaLN-single blocks with cross-attention to
text tokens (masked by `encoder_attention_mask`). The timestep embedding reaching each block is per sample
(B, 6C), so it applies unchanged to any subset of tokens."""

from diffcr.adapters.base import Adapter

PIXART_ADAPTER = Adapter(name="pixart", has_cross_attention=True)
