"""Flux (`FluxTransformer2DModel`): MMDiT double-stream `FluxTransformerBlock`s, then single-stream
`FluxSingleTransformerBlock`s that concatenate text and image tokens inside the block; both are routed on their
image tokens, every text token is computed.

Positions are rotary: one (cos, sin) table for text then image tokens, shared by the batch. Each sample's kept
image tokens need their own rows of it, so a routed Flux block runs sample by sample with the table cut to that
sample's rows (the selection stays per sample, as everywhere in diffcr). The model receives the timestep as sigma
in [0, 1] (it multiplies by 1000 itself), so regions cut [0, 1]."""

from diffcr.adapters.base import Adapter

FLUX_ADAPTER = Adapter(
    name="flux",
    default_num_train_timesteps=1,
    joint_attention=True,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    continuous_timesteps=True,
)
