"""Grow a PixArt transformer deeper without changing what it computes, or drop blocks it does not need.

Each new block is a copy of the block before it with its three output projections (self-attention,
cross-attention, MLP) set to zero: in PixArt's adaLN-single blocks every branch adds its output to the residual
stream, so a block whose outputs are zero passes its input through unchanged, and the grown model starts as the
source model. Training then moves the copies away from the identity. This is progressive stacking in the spirit
of Net2Net (Chen et al., "Net2Net: Accelerating Learning via Knowledge Transfer", ICLR 2016): the shipped
text-to-image transformer grew from 8 to 12 blocks this way, and lost the four copies again when they turned out
to add nothing (`drop_blocks`; docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# the projections whose outputs a block adds to the residual stream (diffusers' BasicTransformerBlock)
OUTPUT_PROJECTIONS = ("attn1.to_out.0.", "attn2.to_out.0.", "ff.net.2.")


def growth_plan(num_layers: int, grown_layers: int) -> list[tuple[int, bool]]:
    """The grown model's blocks as (source block, whether it is a new identity copy), in order.

    The `grown_layers - num_layers` copies are spread evenly: copy k follows source block
    floor(((k + 1) * num_layers - 1) / copies), so 8 -> 12 copies blocks 1, 3, 5 and 7, and 8 -> 16 every block.
    """
    if grown_layers <= num_layers:
        raise ValueError(f"growing {num_layers} blocks to {grown_layers}: give more blocks than the model has")
    copies = grown_layers - num_layers
    after = [((k + 1) * num_layers - 1) // copies for k in range(copies)]
    plan = []
    for block in range(num_layers):
        plan.append((block, False))
        plan.extend((block, True) for _ in range(after.count(block)))
    return plan


def grow_depth(transformer, grown_layers: int):
    """A copy of the PixArt `transformer` with `grown_layers` blocks that computes what it computes.

    Raises:
        ValueError: `grown_layers` is not more than the transformer's blocks, or the model is not a PixArt-style
            transformer with `transformer_blocks` whose outputs go through the projections above.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks: only PixArt transformers grow")
    plan = growth_plan(len(blocks), grown_layers)
    config = dict(transformer.config)
    config["num_layers"] = grown_layers
    grown = type(transformer).from_config(config)
    source = transformer.state_dict()
    state = {name: value for name, value in source.items() if not name.startswith("transformer_blocks.")}
    for index, (block, is_copy) in enumerate(plan):
        prefix = f"transformer_blocks.{block}."
        for name, value in source.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            value = value.clone()
            if is_copy and rest.startswith(OUTPUT_PROJECTIONS):
                value.zero_()
            state[f"transformer_blocks.{index}.{rest}"] = value
    for index, (_, is_copy) in enumerate(plan):
        missing = [p for p in OUTPUT_PROJECTIONS if is_copy and f"transformer_blocks.{index}.{p}weight" not in state]
        if missing:
            raise ValueError(
                f"{type(transformer).__name__}'s blocks lack the output projections {missing}: a copy could not "
                "start as the identity"
            )
    grown.load_state_dict(state, strict=True)
    return grown.to(next(transformer.parameters()).dtype)


def check_grown_matches(transformer, grown, atol: float = 0.0) -> None:
    """Raise unless `grown` gives `transformer`'s output on one random input (a self-check after growing)."""
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    size = config.sample_size
    latents = torch.randn(2, config.in_channels, size, size, generator=generator)
    caption = torch.randn(2, 4, config.caption_channels, generator=generator)
    timestep = torch.tensor([10, 900])
    no_micro_conditions = {"resolution": None, "aspect_ratio": None}
    kwargs = {"encoder_hidden_states": caption, "timestep": timestep, "added_cond_kwargs": no_micro_conditions}
    with torch.no_grad():
        want = transformer.eval()(latents, **kwargs).sample
        got = grown.eval()(latents, **kwargs).sample
    if not torch.allclose(want, got, rtol=0, atol=atol):
        raise RuntimeError(f"the grown transformer differs from its source by {(want - got).abs().max():.3g}")


def drop_blocks(transformer, dropped: Sequence[int]):
    """A copy of the PixArt `transformer` without the blocks `dropped` (0-based), the others in their order, on
    the source's device and dtype.

    The inverse of growing: a block whose removal costs nothing measurable is compute the model spends for
    nothing. The shipped text-to-image transformer's four grown copies were such blocks: without them it drew as
    many digits right on 200 images (docs/RESULTS.md), so they were dropped again.

    Example:
        >>> smaller = drop_blocks(transformer, [2, 5, 8, 11])  # a 12-block transformer -> 8 blocks

    Raises:
        ValueError: no block or every block is dropped, an index is out of range or given twice, or the model
            has no `transformer_blocks`.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(
            f"{type(transformer).__name__} has no transformer_blocks: only PixArt transformers lose blocks"
        )
    num_layers = len(blocks)
    dropped = list(dropped)
    bad = [b for b in dropped if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < num_layers]
    if bad:
        raise ValueError(
            f"blocks {bad} to drop are not block indices of a {num_layers}-block transformer (0-{num_layers - 1})"
        )
    if len(set(dropped)) != len(dropped):
        raise ValueError(f"blocks to drop {dropped} name a block twice; give each once")
    if not dropped or len(dropped) >= num_layers:
        raise ValueError(f"dropping {len(dropped)} of {num_layers} blocks: drop at least one and keep at least one")
    kept = [b for b in range(num_layers) if b not in dropped]
    config = dict(transformer.config)
    config["num_layers"] = len(kept)
    smaller = type(transformer).from_config(config)
    state = {}
    for name, value in transformer.state_dict().items():
        if not name.startswith("transformer_blocks."):
            state[name] = value.clone()
            continue
        _, block, rest = name.split(".", 2)
        if int(block) in kept:
            state[f"transformer_blocks.{kept.index(int(block))}.{rest}"] = value.clone()
    smaller.load_state_dict(state, strict=True)
    source = next(transformer.parameters())
    return smaller.to(device=source.device, dtype=source.dtype)
