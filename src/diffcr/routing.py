"""Token routing for one block: score, pick the top-k per sample, run the block on them, scatter back.

Mixture-of-Depths routing (Raposo et al. 2024) as DiffCR applies it to DiT blocks (You et al., CVPR 2025).
Pure torch: the block itself is passed in as a function, so this file knows no model family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# block_fn(tokens, mlp_gate, kept_idx) -> block output for `tokens`; mlp_gate is (B, k, 1) or None; kept_idx is
# (B, k), or None when every token runs (a block with positions outside its tokens, e.g. rotary tables, needs it)
BlockFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
# bypass_fn(bypassed tokens (B, m, C)) -> their update (B, m, C): what a bypassed token still gets, e.g. the
# block's cross-attention to the caption (`DiffCRConfig.route_cross_attention=False`)
BypassFn = Callable[[torch.Tensor], torch.Tensor]


def select_tokens(router_logits: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Per-sample top-`num_kept` token indices, sorted ascending (spatial order kept).

    Args:
        router_logits: (B, N) scores (higher = more worth computing).

    Returns:
        kept_idx: (B, num_kept) int64, unique and ascending in each row.
    """
    top = torch.topk(router_logits, num_kept, dim=1, sorted=False).indices  # (B, k)
    kept_idx, _ = torch.sort(top, dim=1)  # (B, k)
    return kept_idx


def complement_tokens(kept_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, k) kept indices -> (B, N - k) the other tokens' indices, ascending in each row."""
    batch_size, num_kept = kept_idx.shape
    kept = torch.zeros(batch_size, num_tokens, dtype=torch.uint8, device=kept_idx.device)  # (B, N)
    kept.scatter_(1, kept_idx, 1)
    # a stable sort puts the N - k bypassed tokens (0) first, in index order; static shapes (no nonzero), so a
    # compiled forward does not break on a data-dependent size
    order = torch.sort(kept, dim=1, stable=True).indices  # (B, N)
    return order[:, : num_tokens - num_kept]  # (B, N - k)


def flat_index(kept_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, k) per-sample token indices -> (B * k,) row indices into the tokens viewed as (B * N, C)."""
    batch_size = kept_idx.shape[0]
    offsets = torch.arange(batch_size, device=kept_idx.device) * num_tokens  # (B,)
    return (kept_idx + offsets.unsqueeze(1)).reshape(-1)  # (B * k,)


# Gather and scatter go through row indices of a (B * N, C) view: on CPU, `torch.gather`/`torch.scatter` with an
# index expanded over channels cost 10-15x more than `index_select`/`index_copy_` of whole rows (measured with
# benchmarks/profile_block.py), about 0.5 ms a block at 256 tokens x 4, a few % of a routed block.
def gather_tokens(tokens: torch.Tensor, kept_idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, C) x (B, k) -> (B, k, C); `rows` is `flat_index(kept_idx, N)` when the caller has it."""
    batch_size, num_tokens, channels = tokens.shape
    rows = flat_index(kept_idx, num_tokens) if rows is None else rows  # (B * k,)
    kept_rows = tokens.reshape(batch_size * num_tokens, channels).index_select(0, rows)  # (B * k, C)
    return kept_rows.view(batch_size, kept_idx.shape[1], channels)  # (B, k, C)


def scatter_tokens(
    tokens: torch.Tensor, kept_idx: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """A copy of `tokens` (B, N, C) with rows `kept_idx` (B, k) replaced by `values` (B, k, C)."""
    batch_size, num_tokens, channels = tokens.shape
    rows = flat_index(kept_idx, num_tokens) if rows is None else rows  # (B * k,)
    # under autocast a block may return another dtype than it got; widening keeps bypassed tokens exact
    dtype = torch.promote_types(tokens.dtype, values.dtype)
    out = tokens.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)  # (B, N, C), a fresh copy
    return copy_rows(out, rows, values)


def copy_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write `values` (B, k, C) into the rows `rows` (B * k,) of a contiguous `out` (B, N, C), in place; returns
    `out`."""
    channels = out.shape[-1]
    out.view(-1, channels).index_copy_(0, rows, values.to(out.dtype).reshape(-1, channels))
    return out


def gate_values(kept_logits: torch.Tensor, gate: str) -> torch.Tensor:
    """The factor on each kept token's update, (B, k, 1), through which the router learns.

    "straight_through": sigmoid(l) / stop_grad(sigmoid(l)), computed as exp(logsigmoid(l) - stop_grad(...)):
    exactly 1.0 forward (no underflow to 0/0 for very negative logits) with the gradient of s / s.detach().
    "sigmoid_block" / "sigmoid_mlp": sigmoid(l), as in the paper and the authors' pseudocode.
    """
    if gate == "straight_through":
        log_scores = F.logsigmoid(kept_logits)  # (B, k)
        factor = torch.exp(log_scores - log_scores.detach())  # (B, k), == 1.0
    else:
        factor = torch.sigmoid(kept_logits)  # (B, k)
    return factor.unsqueeze(-1)  # (B, k, 1)


def routed_forward(
    tokens: torch.Tensor,
    router_logits: torch.Tensor | None,
    num_kept: int,
    block_fn: BlockFn,
    gate: str,
    as_update: bool,
    bypass_fn: BypassFn | None = None,
) -> torch.Tensor:
    """Run a block on the top-`num_kept` tokens of each sample; bypassed tokens pass through unchanged (or,
    with `bypass_fn`, get only its update).

    Args:
        tokens: (B, N, C) block input.
        router_logits: (B, N), or None when num_kept is 0 or N (no router call is needed then).
        num_kept: tokens computed per sample, 0..N.
        block_fn: the block, run on a (B, k, C) subset.
        gate: the `DiffCRConfig.gate` mode.
        as_update: return the update (output - input, zero on bypassed tokens) instead of the output,
            for blending several bins.
        bypass_fn: None (the paper: bypassed tokens are left as they are), or the update bypassed tokens get,
            run on them alone.

    Returns:
        (B, N, C): the block output, or its update.
    """
    num_tokens = tokens.shape[1]
    # 1. whole-block skip and dense pass: no router, no gather
    if num_kept == 0:
        if bypass_fn is None:
            return torch.zeros_like(tokens) if as_update else tokens
        bypass_update = bypass_fn(tokens)  # (B, N, C)
        return bypass_update if as_update else tokens + bypass_update
    if num_kept >= num_tokens:
        dense_out = block_fn(tokens, None, None)  # (B, N, C)
        return dense_out - tokens if as_update else dense_out
    # 2. pick and gather
    kept_idx = select_tokens(router_logits, num_kept)  # (B, k)
    rows = flat_index(kept_idx, num_tokens)  # (B * k,)
    kept_tokens = gather_tokens(tokens, kept_idx, rows)  # (B, k, C)
    # a straight-through gate is exactly 1, so with no gradient it is skipped (and the logits are not gathered)
    ungated = gate == "straight_through" and not torch.is_grad_enabled()
    kept_logits = None if ungated else torch.gather(router_logits, 1, kept_idx)  # (B, k)
    # 3. the block on the kept tokens alone
    mlp_gate = gate_values(kept_logits, gate) if gate == "sigmoid_mlp" else None  # (B, k, 1)
    kept_out = block_fn(kept_tokens, mlp_gate, kept_idx)  # (B, k, C)
    # 4. gate
    if gate == "sigmoid_mlp" or ungated:
        kept_update = kept_out - kept_tokens if as_update else None
    else:
        # the gate follows the block's dtype (router logits are fp32), so a bf16 model stays bf16
        kept_update = (kept_out - kept_tokens) * gate_values(kept_logits, gate).to(kept_out.dtype)  # (B, k, C)
    if as_update:
        kept_values = kept_update  # (B, k, C)
    else:
        kept_values = kept_out if kept_update is None else kept_tokens + kept_update  # (B, k, C)
    # 5. scatter back: over a copy of the input (bypassed rows as they are, or zero updates)
    if bypass_fn is None:
        base = torch.zeros_like(tokens) if as_update else tokens
        return scatter_tokens(base, kept_idx, kept_values, rows)  # (B, N, C)
    # 5'. or, when bypassed tokens get their own update, into a fresh tensor every row of which is written, so
    # nothing is copied first (on the t2i default such input copies took 3.9 of 82 ms of a routed call at kept 0.1,
    # profiled; timed, the change gained 0-2 %)
    bypass_idx = complement_tokens(kept_idx, num_tokens)  # (B, N - k)
    bypass_rows = flat_index(bypass_idx, num_tokens)  # (B * (N - k),)
    bypassed = gather_tokens(tokens, bypass_idx, bypass_rows)  # (B, N - k, C)
    bypass_update = bypass_fn(bypassed)  # (B, N - k, C)
    bypass_values = bypass_update if as_update else bypassed + bypass_update  # (B, N - k, C)
    # under autocast a block may return another dtype than it got; widening keeps every row exact
    dtype = torch.promote_types(torch.promote_types(tokens.dtype, kept_values.dtype), bypass_values.dtype)
    out = torch.empty(tokens.shape, dtype=dtype, device=tokens.device)  # (B, N, C), every row written below
    copy_rows(out, rows, kept_values)
    return copy_rows(out, bypass_rows, bypass_values)
