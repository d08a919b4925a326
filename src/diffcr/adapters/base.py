"""What a model family must tell DiffCR, and the routed forward shared by diffusers' `BasicTransformerBlock`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache

import torch

from diffcr.ratios import num_kept_tokens
from diffcr.routing import routed_forward

ROUTABLE_BLOCKS = ("BasicTransformerBlock",)


@dataclass(frozen=True)
class Adapter:
    """A model family.

    Attributes:
        name: short name ("pixart", "dit").
        default_num_train_timesteps: T when neither the config nor the model says.
        has_cross_attention: whether blocks attend to text tokens (FLOP counting).
    """

    name: str
    default_num_train_timesteps: int = 1000
    has_cross_attention: bool = False

    def blocks(self, model) -> list[torch.nn.Module]:
        blocks = list(getattr(model, "transformer_blocks", []))
        if not blocks:
            raise TypeError(f"{type(model).__name__} has no transformer_blocks to route")
        kinds = {getattr(type(b), "_diffcr_base_class", type(b)).__name__ for b in blocks}  # routed or not
        bad = sorted(kinds - set(ROUTABLE_BLOCKS))
        if bad:
            raise TypeError(f"{type(model).__name__} has blocks of type {bad}; diffcr routes {ROUTABLE_BLOCKS}")
        return blocks

    def hidden_size(self, model) -> int:
        return int(model.config.num_attention_heads * model.config.attention_head_dim)

    def num_train_timesteps(self, model) -> int:
        return int(getattr(model.config, "num_train_timesteps", None) or self.default_num_train_timesteps)

    def block_flops(self, model, num_tokens: int, context_tokens: int = 0) -> int:
        """Multiply-add FLOPs (x2) of one block on `num_tokens` image tokens: projections, attention's
        quadratic term, cross-attention to `context_tokens` text tokens, and the MLP."""
        width = self.hidden_size(model)
        ff_inner = 4 * width
        flops = 2 * num_tokens * 4 * width * width  # q, k, v, out projections
        flops += 2 * 2 * num_tokens * num_tokens * width  # q @ k^T and attn @ v
        flops += 2 * num_tokens * 2 * width * ff_inner  # MLP
        if self.has_cross_attention and context_tokens:
            flops += 2 * num_tokens * 2 * width * width  # q and out projections of the image tokens
            flops += 2 * context_tokens * 2 * width * width  # k, v of the text tokens
            flops += 2 * 2 * num_tokens * context_tokens * width
        return flops


def _slice_per_sample(value, sample_idx: torch.Tensor, batch_size: int):
    """Take the rows `sample_idx` of every per-sample tensor (dim 0 == batch) in an argument tree."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.index_select(0, sample_idx.to(value.device))
    if isinstance(value, dict):
        return {k: _slice_per_sample(v, sample_idx, batch_size) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_per_sample(v, sample_idx, batch_size) for v in value)
    return value


@cache
def _signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def routed_block_call(block, base_forward, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
    """The forward of a routed `BasicTransformerBlock`: the model's own block forward on the kept tokens.

    Args:
        block: the block (its class swapped by `apply`), holding `_diffcr_controller` and `_diffcr_layer`.
        base_forward: the block class's original forward.
        hidden_states: (B, N, C) image tokens.
        args, kwargs: the rest of the block's arguments, positional (gradient checkpointing) or named.
    """
    controller = block._diffcr_controller
    layer = block._diffcr_layer
    batch_size, num_tokens, _ = hidden_states.shape
    # 1. the plan: which kept ratios run for which samples
    plan = controller.layer_plan(layer, batch_size, hidden_states.device)
    kept_counts = {num_kept_tokens(kept, num_tokens) for group in plan for kept, _ in group.passes}
    if kept_counts == {num_tokens} and all(w is None for group in plan for _, w in group.passes):
        return base_forward(block, hidden_states, *args, **kwargs)  # dense: zero overhead
    bound = _signature(base_forward).bind(block, hidden_states, *args, **kwargs)
    if bound.arguments.get("attention_mask") is not None:
        raise NotImplementedError("DiffCR routing does not support a self-attention mask over image tokens")
    # 2. router logits, once for the whole batch, only if some pass routes
    router_logits = None
    if kept_counts - {0, num_tokens}:
        router_logits = controller.router_logits(layer, hidden_states)  # (B, N), fp32
    gate = controller.config.gate
    outputs, order = [], []
    for group in plan:
        # 3. this group's samples and their per-sample arguments
        if group.sample_idx is None:
            tokens, group_args, group_kwargs, logits = hidden_states, args, kwargs, router_logits
        else:
            idx = group.sample_idx
            tokens = hidden_states.index_select(0, idx)  # (b, N, C)
            group_args = _slice_per_sample(args, idx, batch_size)
            group_kwargs = _slice_per_sample(kwargs, idx, batch_size)
            logits = None if router_logits is None else router_logits.index_select(0, idx)  # (b, N)
            order.append(idx)

        def block_fn(kept_tokens, mlp_gate, _args=group_args, _kwargs=group_kwargs):
            if mlp_gate is None:
                return base_forward(block, kept_tokens, *_args, **_kwargs)
            block.ff._diffcr_mlp_gate = mlp_gate  # read by `mlp_gate_hook`
            try:
                return base_forward(block, kept_tokens, *_args, **_kwargs)
            finally:
                block.ff._diffcr_mlp_gate = None

        # 4. one pass at a bin, or two passes blended by the interpolation weights
        if len(group.passes) == 1 and group.passes[0][1] is None:
            kept = group.passes[0][0]
            out = routed_forward(tokens, logits, num_kept_tokens(kept, num_tokens), block_fn, gate, as_update=False)
        else:
            out = tokens
            for kept, weight in group.passes:
                update = routed_forward(
                    tokens, logits, num_kept_tokens(kept, num_tokens), block_fn, gate, as_update=True
                )  # (b, N, C)
                out = out + weight.to(update).view(-1, 1, 1) * update  # weight (b,) per sample
        outputs.append(out)
    if len(outputs) == 1:
        return outputs[0]
    # 5. put the groups back in batch order
    stacked = torch.cat(outputs)  # (B, N, C), grouped order
    inverse = torch.argsort(torch.cat(order))
    return stacked.index_select(0, inverse)


def mlp_gate_hook(module, inputs, output):
    """Forward hook on a block's `ff` for the "sigmoid_mlp" gate: scale the MLP update by the router score."""
    mlp_gate = getattr(module, "_diffcr_mlp_gate", None)  # (B, k, 1), set around the routed block call
    if mlp_gate is None:
        return output
    return output * mlp_gate.to(output.dtype)


_ROUTED_CLASSES: dict[type, type] = {}


def rebuild_routed(base_cls: type, make_routed):
    """Unpickling: an empty instance of the routed subclass of `base_cls` (its state is set afterwards)."""
    instance = base_cls.__new__(base_cls)
    instance.__class__ = make_routed(base_cls)
    return instance


def reduce_routed(self, protocol):
    """Pickle a routed module by its base class: the generated subclass has no importable name, and is made
    again on loading."""
    base_cls = type(self)._diffcr_base_class
    return (rebuild_routed, (base_cls, type(self)._diffcr_factory), self.__getstate__())


def routed_class(block_cls: type) -> type:
    """A subclass of `block_cls` whose forward routes tokens (cached: one subclass per block class)."""
    if block_cls not in _ROUTED_CLASSES:
        base_forward = block_cls.forward

        def forward(self, hidden_states, *args, **kwargs):
            return routed_block_call(self, base_forward, hidden_states, args, kwargs)

        _ROUTED_CLASSES[block_cls] = type(
            f"DiffCR{block_cls.__name__}",
            (block_cls,),
            {
                "forward": forward,
                "_diffcr_base_class": block_cls,
                "_diffcr_factory": staticmethod(routed_class),
                "__reduce_ex__": reduce_routed,
            },
        )
    return _ROUTED_CLASSES[block_cls]
