"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): MMDiT `JointTransformerBlock`s, where image and text
tokens attend jointly and each stream has its own adaLN-Zero modulation, projections and MLP.

Routing keeps every text token and the top-k image tokens: joint attention runs over all text tokens plus the
kept image tokens, the text stream is updated from those, and bypassed image tokens pass unchanged. The last
block (`context_pre_only`) returns no text stream; SD3.5's dual attention (`attn2`, image-only) runs on the kept
image tokens. The timestep the model receives is sigma x 1000 (flow matching), so regions cut [0, 1000]."""

from diffcr.adapters.base import Adapter

SD3_ADAPTER = Adapter(name="sd3", joint_attention=True)
