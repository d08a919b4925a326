"""Why routing falls short of its FLOP-ideal speedup on small problems: time one block dense on all tokens,
dense on only the kept tokens, and routed (same kept count), then list where a routed block spends its time.

If "routed" is close to "dense on kept tokens", routing's own overhead (router, top-k, gather, scatter) is
small and the gap to the ideal comes from block costs that do not shrink with the token count.

    python benchmarks/profile_block.py [--family dit] [--tokens 256] [--batch 1] [--kept 0.3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import diffcr
from diffcr.benchmark import random_transformer
from diffcr.ratios import num_kept_tokens


def median_ms(fn, repeats: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="dit")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kept", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, make_inputs = random_transformer(args.family, args.tokens)
    inputs = make_inputs(args.batch)
    routed = copy.deepcopy(dense)
    bins = tuple(sorted({1.0, args.kept, 0.05}, reverse=True))
    diffcr.apply(routed, diffcr.DiffCRConfig(timestep_regions=1, ratio_bins=bins, init_kept_ratio=args.kept))
    diffcr.freeze(routed)
    kept_tokens = num_kept_tokens(args.kept, args.tokens)
    width = dense.config.num_attention_heads * dense.config.attention_head_dim
    block_kwargs = {}
    if args.family == "dit":
        block_kwargs = {"timestep": inputs["timestep"], "class_labels": inputs["class_labels"]}
    else:
        with torch.inference_mode():
            timestep, _ = dense.adaln_single(inputs["timestep"], inputs["added_cond_kwargs"], batch_size=args.batch)
            context = dense.caption_projection(inputs["encoder_hidden_states"])
        block_kwargs = {"timestep": timestep, "encoder_hidden_states": context}
    all_tokens = torch.randn(args.batch, args.tokens, width)
    kept_only = torch.randn(args.batch, kept_tokens, width)
    block = dense.transformer_blocks[0]
    routed_block = routed.transformer_blocks[0]
    with torch.inference_mode():
        routed(**inputs)  # plans the routed model's forward, as in sampling
        rows = {
            f"dense block, {args.tokens} tokens": median_ms(lambda: block(all_tokens, **block_kwargs)),
            f"dense block, {kept_tokens} tokens": median_ms(lambda: block(kept_only, **block_kwargs)),
            f"routed block, {kept_tokens} of {args.tokens}": median_ms(
                lambda: routed_block(all_tokens, **block_kwargs)
            ),
            "whole model, dense": median_ms(lambda: dense(**inputs), repeats=7),
            "whole model, routed": median_ms(lambda: routed(**inputs), repeats=7),
        }
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(20):
                routed_block(all_tokens, **block_kwargs)
    for name, ms in rows.items():
        print(f"{name:40s} {ms:8.2f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
