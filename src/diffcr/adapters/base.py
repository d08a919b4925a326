"""What a model family must tell DiffCR, and the routed forward shared by diffusers' `BasicTransformerBlock`."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from diffcr.controller import EAGER, MIXED, RoutingGroup
from diffcr.ratios import num_kept_tokens
from diffcr.routing import routed_forward

ROUTABLE_BLOCKS = (
    "BasicTransformerBlock",
    "JointTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
)
# blocks that return (text stream, image stream) and take the text stream as `encoder_hidden_states` (MMDiT)
JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
ROTARY_ARGUMENT = "image_rotary_emb"  # Flux: one (cos, sin) table for text then image positions, shared by the batch


@dataclass(frozen=True)
class Adapter:
    """A model family.

    Attributes:
        name: short name ("pixart", "dit").
        default_num_train_timesteps: T when neither the config nor the model says.
        has_cross_attention: whether blocks attend to text tokens (FLOP counting).
        joint_attention: whether blocks attend over text and image tokens together, computing the text tokens
            too (MMDiT: SD3, Flux); FLOP counting then adds the text tokens' share.
        block_lists: the model's attributes holding routable blocks, in layer order.
        continuous_timesteps: the model receives a continuous timestep in [0, T] (Flux: sigma in [0, 1]), so the
            number of regions is not bounded by T.
    """

    name: str
    default_num_train_timesteps: int = 1000
    has_cross_attention: bool = False
    joint_attention: bool = False
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    continuous_timesteps: bool = False

    def blocks(self, model) -> list[torch.nn.Module]:
        blocks = [block for name in self.block_lists for block in getattr(model, name, [])]
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

    def cross_attention_flops(self, model, num_tokens: int, context_tokens: int, text_projections: bool = True) -> int:
        """FLOPs (x2) of a block's cross-attention from `num_tokens` image tokens to `context_tokens` text tokens;
        `text_projections`: count the text tokens' k, v projections (once per block call)."""
        if not (self.has_cross_attention and context_tokens and num_tokens):
            return 0
        width = self.hidden_size(model)
        flops = 2 * num_tokens * 2 * width * width  # q and out projections of the image tokens
        flops += 2 * 2 * num_tokens * context_tokens * width  # q @ k^T and attn @ v
        if text_projections:
            flops += 2 * context_tokens * 2 * width * width  # k, v of the text tokens
        return flops

    def block_flops(self, model, num_tokens: int, context_tokens: int = 0) -> int:
        """Multiply-add FLOPs (x2) of one block on `num_tokens` image tokens: projections, attention's
        quadratic term, cross-attention to `context_tokens` text tokens, and the MLP."""
        width = self.hidden_size(model)
        ff_inner = 4 * width
        flops = 2 * num_tokens * 4 * width * width  # q, k, v, out projections
        flops += 2 * 2 * num_tokens * num_tokens * width  # q @ k^T and attn @ v
        flops += 2 * num_tokens * 2 * width * ff_inner  # MLP
        flops += self.cross_attention_flops(model, num_tokens, context_tokens)
        if self.joint_attention and context_tokens:
            flops += 2 * context_tokens * 4 * width * width  # the text tokens' q, k, v, out projections
            flops += 2 * 2 * (2 * num_tokens + context_tokens) * context_tokens * width  # joint attention's rest
            flops += 2 * context_tokens * 2 * width * ff_inner  # the text tokens' MLP
        return flops


def _slice_per_sample(value, sample_idx: torch.Tensor, batch_size: int, keep=None):
    """Take the rows `sample_idx` of every per-sample tensor (dim 0 == batch) in an argument tree; `keep` (a
    table shared by the batch, such as a rotary table) is left whole."""
    if keep is not None and value is keep:
        return value
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.index_select(0, sample_idx.to(value.device))
    if isinstance(value, dict):
        return {k: _slice_per_sample(v, sample_idx, batch_size, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_per_sample(v, sample_idx, batch_size, keep) for v in value)
    return value


def _per_sample(plan: list, batch_size: int, device) -> list:
    """The plan's groups split into one group per sample, each pass's weight taken for that sample."""
    groups = []
    for group in plan:
        members = range(batch_size) if group.sample_idx is None else group.sample_idx.tolist()
        for position, sample in enumerate(members):
            passes = [
                (kept, None if weight is None else weight[position : position + 1]) for kept, weight in group.passes
            ]
            groups.append(RoutingGroup(torch.tensor([sample], device=device), passes))
    return groups


def _with_rotary_rows(block, args: tuple, kwargs: dict, kept_idx: torch.Tensor, text_len: int, rotary):
    """The block's arguments with the rotary table cut to the rows of the text tokens and one sample's kept image
    tokens (text rows first, as the table is laid out)."""
    if kept_idx.shape[0] != 1:
        raise RuntimeError("a rotary table follows the kept tokens of one sample at a time")
    cos, sin = rotary
    rows = torch.cat([torch.arange(text_len, device=cos.device), text_len + kept_idx[0].to(cos.device)])
    table = (cos.index_select(0, rows), sin.index_select(0, rows))  # (T + k, D) each
    if ROTARY_ARGUMENT in kwargs:
        return args, {**kwargs, ROTARY_ARGUMENT: table}
    position = type(block)._diffcr_argument_positions[ROTARY_ARGUMENT]
    return (*args[:position], table, *args[position + 1 :]), kwargs


def argument_positions(forward) -> dict[str, int]:
    """Each parameter's index among a block forward's arguments after (self, hidden_states)."""
    return {name: index for index, name in enumerate(list(inspect.signature(forward).parameters)[2:])}


def _argument(block, args: tuple, kwargs: dict, name: str):
    """A block argument passed by name or by position (gradient checkpointing passes them by position), or None.

    Read through positions computed once per block class: binding a signature at every call costs time, and
    under torch.compile it would be traced at every compile.
    """
    if name in kwargs:
        return kwargs[name]
    position = type(block)._diffcr_argument_positions.get(name)
    return args[position] if position is not None and position < len(args) else None


def check_cross_attention_bypass(blocks) -> None:
    """Refuse `route_cross_attention=False` on blocks whose cross-attention it cannot run on bypassed tokens:
    only adaLN-single blocks (PixArt) attend to the caption from the raw tokens, with no norm of their own."""
    bad = [
        i
        for i, block in enumerate(blocks)
        if type(block).__name__ != "BasicTransformerBlock"
        or getattr(block, "attn2", None) is None
        or getattr(block, "norm_type", None) != "ada_norm_single"
    ]
    if bad:
        raise ValueError(
            f"route_cross_attention=False gives bypassed tokens the block's cross-attention, which blocks {bad[:6]} "
            "do not have in the form it needs (PixArt's adaLN-single blocks with cross-attention); use "
            "route_cross_attention=True (the paper: bypassed tokens skip the whole block; on the command line, leave "
            "out --no-route-cross-attention)"
        )


def _cross_attention_update(block, args: tuple, kwargs: dict):
    """The block's cross-attention update alone, as a function of the tokens it runs on (PixArt's adaLN-single
    block adds attn2 of its raw hidden states, with no norm before it)."""
    context = _argument(block, args, kwargs, "encoder_hidden_states")  # (b, T, C)
    context_mask = _argument(block, args, kwargs, "encoder_attention_mask")  # (b, 1, T) bias, or None
    extra = dict(_argument(block, args, kwargs, "cross_attention_kwargs") or {})
    extra.pop("gligen", None)  # the block itself pops it before attn2

    def update(tokens: torch.Tensor) -> torch.Tensor:
        return block.attn2(tokens, encoder_hidden_states=context, attention_mask=context_mask, **extra)

    return update


def routed_block_call(block, base_forward, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
    """The forward of a routed block: the model's own block forward on the kept image tokens.

    A joint (MMDiT) block also takes and returns the text stream: it runs on all text tokens and the kept image
    tokens, so the text stream is updated from the kept image tokens; bypassed image tokens pass unchanged.

    Args:
        block: the block (its class swapped by `apply`), holding `_diffcr_controller` and `_diffcr_layer`.
        base_forward: the block class's original forward.
        hidden_states: (B, N, C) image tokens.
        args, kwargs: the rest of the block's arguments, positional (gradient checkpointing) or named.
    """
    controller = block._diffcr_controller
    if torch.compiler.is_compiling() and controller.compiled_key == EAGER:
        return _eager_routed_block_call(block, base_forward, hidden_states, args, kwargs)
    # regional compilation (`block.compile()`) compiles the block's own computation, whatever it runs on
    base_forward = block.__dict__.get("_diffcr_compiled_forward", base_forward)
    if torch.compiler.is_compiling() and controller.compiled_key == MIXED:
        return _mixed_regions_call(block, base_forward, hidden_states, args, kwargs)
    # 1. the plan: which kept ratios run for which samples
    plan = controller.layer_plan(block._diffcr_layer, hidden_states.shape[0], hidden_states.device)
    return _run_plan(block, base_forward, hidden_states, args, kwargs, plan)


def _mixed_regions_call(block, base_forward, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
    """A compiled forward whose batch mixes timestep regions: each of the block's kept ratios runs for the
    whole batch, and each sample takes the output of its own. Exact (samples are independent in a block),
    with static shapes, so one graph serves every mix; it costs one pass per distinct ratio of the block."""
    controller = block._diffcr_controller
    kept_ratios, per_sample = controller.mixed_kept_ratios(block._diffcr_layer, hidden_states.device)
    result = None
    for kept in kept_ratios:
        output = _run_plan(block, base_forward, hidden_states, args, kwargs, [RoutingGroup(None, [(kept, None)])])
        result = output if result is None else _where_sample(per_sample == kept, output, result)
    return result


def _where_sample(chosen: torch.Tensor, output, other):
    """Per sample (chosen: (B,) bool), `output` where chosen else `other`; tuples (text, image) element-wise."""
    if isinstance(output, tuple):
        return tuple(_where_sample(chosen, a, b) for a, b in zip(output, other))
    if output is None:
        return None
    return torch.where(chosen.view(-1, *([1] * (output.dim() - 1))), output, other)


def _run_plan(block, base_forward, hidden_states: torch.Tensor, args: tuple, kwargs: dict, plan: list):
    """The routed block call for a given plan (see `routed_block_call`)."""
    controller = block._diffcr_controller
    layer = block._diffcr_layer
    batch_size, num_tokens, _ = hidden_states.shape
    kept_counts = {num_kept_tokens(kept, num_tokens) for group in plan for kept, _ in group.passes}
    if kept_counts == {num_tokens} and all(w is None for group in plan for _, w in group.passes):
        return base_forward(block, hidden_states, *args, **kwargs)  # dense: zero overhead
    if _argument(block, args, kwargs, "attention_mask") is not None:
        raise NotImplementedError("DiffCR routing does not support a self-attention mask over image tokens")
    joint = type(block)._diffcr_base_class.__name__ in JOINT_BLOCKS
    text_in = _argument(block, args, kwargs, "encoder_hidden_states") if joint else None  # (B, T, C)
    rotary = _argument(block, args, kwargs, ROTARY_ARGUMENT)
    if rotary is not None and kept_counts - {0, num_tokens}:
        # the rotary table is shared by the batch, but each sample keeps its own tokens: run sample by sample,
        # each with the table's rows of its text and kept image tokens (see docs/METHOD.md, section 6b)
        plan = _per_sample(plan, batch_size, hidden_states.device)
    # 2. router logits, once for the whole batch, only if some pass routes
    router_logits = None
    if kept_counts - {0, num_tokens}:
        router_logits = controller.router_logits(layer, hidden_states)  # (B, N), fp32
    gate = controller.config.gate
    route_cross = controller.config.route_cross_attention
    outputs, texts, order = [], [], []
    for group in plan:
        # 3. this group's samples and their per-sample arguments
        if group.sample_idx is None:
            tokens, group_args, group_kwargs, logits = hidden_states, args, kwargs, router_logits
        else:
            idx = group.sample_idx
            tokens = hidden_states.index_select(0, idx)  # (b, N, C)
            group_args = _slice_per_sample(args, idx, batch_size, keep=rotary)
            group_kwargs = _slice_per_sample(kwargs, idx, batch_size, keep=rotary)
            logits = None if router_logits is None else router_logits.index_select(0, idx)  # (b, N)
            order.append(idx)

        text_outputs: dict[int, torch.Tensor | None] = {}  # num_kept -> the text stream that pass returned
        bypass_fn = None if route_cross else _cross_attention_update(block, group_args, group_kwargs)

        def block_fn(kept_tokens, mlp_gate, kept_idx, _args=group_args, _kwargs=group_kwargs, _texts=text_outputs):
            if rotary is not None and kept_idx is not None:
                _args, _kwargs = _with_rotary_rows(block, _args, _kwargs, kept_idx, text_in.shape[1], rotary)
            if mlp_gate is None:
                out = base_forward(block, kept_tokens, *_args, **_kwargs)
            else:
                block.ff._diffcr_mlp_gate = mlp_gate  # read by `mlp_gate_hook`
                try:
                    out = base_forward(block, kept_tokens, *_args, **_kwargs)
                finally:
                    block.ff._diffcr_mlp_gate = None
            if not joint:
                return out
            _texts[kept_tokens.shape[1]] = out[0]  # (b, T, C), or None from the last block of SD3
            return out[1]

        # 4. one pass at a bin, or two passes blended by the interpolation weights
        if len(group.passes) == 1 and group.passes[0][1] is None:
            kept = group.passes[0][0]
            out = routed_forward(
                tokens, logits, num_kept_tokens(kept, num_tokens), block_fn, gate, as_update=False, bypass_fn=bypass_fn
            )
        else:
            out = tokens
            for kept, weight in group.passes:
                update = routed_forward(
                    tokens,
                    logits,
                    num_kept_tokens(kept, num_tokens),
                    block_fn,
                    gate,
                    as_update=True,
                    bypass_fn=bypass_fn,
                )  # (b, N, C)
                out = out + weight.to(update).view(-1, 1, 1) * update  # weight (b,) per sample
        outputs.append(out)
        if joint:
            texts.append(_blend_text(group, num_tokens, text_outputs, _text_input(text_in, group)))
    # 5. put the groups back in batch order
    inverse = None if len(outputs) == 1 else torch.argsort(torch.cat(order))
    image = _in_batch_order(outputs, inverse)  # (B, N, C)
    return (_in_batch_order(texts, inverse), image) if joint else image


# under whole-model torch.compile, training and batches that mix timestep regions route eagerly: their plans
# hold per-sample Python values that would each compile the forward again
_eager_routed_block_call = torch.compiler.disable(routed_block_call)


def _in_batch_order(parts: list, inverse: torch.Tensor | None):
    """Groups' outputs (grouped order) back in batch order; None stays None (SD3's last block has no text)."""
    if inverse is None or parts[0] is None:
        return parts[0]
    return torch.cat(parts).index_select(0, inverse)


def _text_input(text: torch.Tensor, group) -> torch.Tensor:
    """The text stream a joint block received (B, T, C), for this group's samples: (b, T, C)."""
    return text if group.sample_idx is None else text.index_select(0, group.sample_idx.to(text.device))


def _blend_text(group, num_tokens: int, text_outputs: dict, text_in: torch.Tensor):
    """The text stream of a joint block's group: the pass's own, or the passes' blend by their weights.

    A pass with no kept image token skips the block (METHOD section 1), so its text stream is the input's.
    """
    if len(group.passes) == 1 and group.passes[0][1] is None:
        return text_outputs.get(num_kept_tokens(group.passes[0][0], num_tokens), text_in)
    if any(text_outputs.get(num_kept_tokens(kept, num_tokens), text_in) is None for kept, _ in group.passes):
        return None
    blended = text_in
    for kept, weight in group.passes:
        text = text_outputs.get(num_kept_tokens(kept, num_tokens), text_in)  # (b, T, C)
        blended = blended + weight.to(text).view(-1, 1, 1) * (text - text_in)
    return blended


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
    state = self.__getstate__()
    # a compiled function cannot be pickled (torch drops its own `_compiled_call_impl` the same way)
    state.pop("_diffcr_compiled_forward", None)
    return (rebuild_routed, (base_cls, type(self)._diffcr_factory), state)


def compile_routed(self, *args, **kwargs):
    """Regional compilation of a routed block (`block.compile()`, diffusers' `compile_repeated_blocks`).

    Compiles the block's own computation on whatever tokens it runs (all, or the kept ones) and leaves
    routing (planning, top-k, gather, scatter) eager, so `fullgraph=True` holds and each distinct kept count
    adds at most one graph. The arguments are those of `torch.compile`.
    """
    compiled = torch.compile(type(self)._diffcr_base_class.forward, *args, **kwargs)

    def forward_on_any_token_count(block, hidden_states, *block_args, **block_kwargs):
        # the token and batch counts vary with the kept ratio and the routing group: traced as sizes from the
        # start, so that every block of a class shares its graphs instead of exhausting dynamo's recompile limit
        # (blocks share the forward's code object, and thus one cache)
        torch._dynamo.maybe_mark_dynamic(hidden_states, 0)
        torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
        rotary = block_kwargs.get(ROTARY_ARGUMENT)
        if rotary is not None:  # Flux: the rows of the text and kept tokens
            for table in rotary:
                torch._dynamo.maybe_mark_dynamic(table, 0)
        return compiled(block, hidden_states, *block_args, **block_kwargs)

    functools.update_wrapper(forward_on_any_token_count, compiled)
    self.__dict__["_diffcr_compiled_forward"] = forward_on_any_token_count
    self.__dict__["_diffcr_compile_arguments"] = (args, kwargs)


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
                "compile": compile_routed,
                "_diffcr_argument_positions": argument_positions(base_forward),
            },
        )
    return _ROUTED_CLASSES[block_cls]
