"""The CPU cross-attention kernel for short captions (`diffcr.caption_attention`), measured two ways.

1. One cross-attention call, torch's fused kernel (diffusers' `AttnProcessor2_0`) against the classic one
   (`AttnProcessor`), at several caption lengths: at the default's width (128, batch 20 x 256 image tokens, as
   sampling with guidance runs it) and at PixArt-Sigma's (1152, 2 x 1024).
2. The shipped text-to-image pipeline, dense and with a DiffCR artifact, each with diffusers' default processors and
   with `ShortCaptionAttnProcessor`: whole pipeline calls (10 prompts, DPM-Solver++ 20 steps, guidance 4.5), one
   warm-up each, then `--rounds` rounds interleaved; medians, and routed-over-dense speedups within each kernel.

    python benchmarks/caption_attention.py                       # the shipped artifact, 2 threads
    python benchmarks/caption_attention.py --artifact runs/t2i/artifact --threads 1

Median times, not minima: this machine is shared. Compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch


def kernel_table() -> list[str]:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from diffcr.benchmark import time_alternating

    lines = ["| width | batch x image tokens | caption tokens | fused (ms) | classic (ms) |", "|---|---|---|---|---|"]
    for width, heads, batch, num_tokens in ((128, 4, 20, 256), (1152, 16, 2, 1024)):
        fused = Attention(width, cross_attention_dim=width, heads=heads, dim_head=width // heads).eval()
        fused.set_processor(AttnProcessor2_0())
        classic = copy.deepcopy(fused)
        classic.set_processor(AttnProcessor())
        for caption_tokens in (8, 24, 48, 77, 300):
            hidden_states = torch.randn(batch, num_tokens, width)
            caption = torch.randn(batch, caption_tokens, width)
            caption_mask = torch.zeros(batch, 1, caption_tokens)
            caption_mask[:, :, caption_tokens // 2 :] = -10000.0  # half of it padding
            inputs = {"encoder_hidden_states": caption, "attention_mask": caption_mask}
            with torch.no_grad():
                seconds = time_alternating(
                    {name: functools.partial(module, hidden_states, **inputs) for name, module in
                     (("fused", fused), ("classic", classic))},
                    repeats=25, warmup=3,
                )  # fmt: skip
            row = [seconds["fused"] * 1000, seconds["classic"] * 1000]
            lines.append(f"| {width} | {batch} x {num_tokens} | {caption_tokens} | {row[0]:.2f} | {row[1]:.2f} |")
    return lines


def pipeline_table(artifact: str, rounds: int) -> list[str]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from diffcr.data.scenes import evaluation_prompts
    from diffcr.text_to_image import load_pipeline, pipeline_options

    prompts = [prompt for prompt, _ in evaluation_prompts()][:10]
    pipes = {}
    for kernel in ("default", "short caption"):
        for model in ("dense", "DiffCR"):
            pipe = load_pipeline("t2i", "none" if model == "dense" else artifact)
            if kernel == "default":
                for block in pipe.transformer.transformer_blocks:
                    block.attn2.set_processor(AttnProcessor2_0())
            pipe.set_progress_bar_config(disable=True)
            pipes[(kernel, model)] = pipe

    def call(pipe) -> float:
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        start = time.perf_counter()
        pipe(prompt=prompts, num_inference_steps=20, guidance_scale=4.5, generator=generators, output_type="np",
             **pipeline_options(pipe))  # fmt: skip
        return time.perf_counter() - start

    for pipe in pipes.values():
        call(pipe)
    seconds = {key: [] for key in pipes}
    for _ in range(rounds):
        for key, pipe in pipes.items():
            seconds[key].append(call(pipe))
    median = {key: statistics.median(values) for key, values in seconds.items()}
    lines = [
        "| cross-attention kernel | dense (s a batch) | DiffCR (s a batch) | speedup | speedup, median of rounds |",
        "|---|---|---|---|---|",
    ]
    for kernel in ("default", "short caption"):
        dense, routed = median[(kernel, "dense")], median[(kernel, "DiffCR")]
        # each round's dense over its DiffCR, timed a few seconds apart: robust to the machine's slow drifts
        paired = statistics.median(d / r for d, r in zip(seconds[(kernel, "dense")], seconds[(kernel, "DiffCR")]))
        lines.append(f"| {kernel} | {dense:.3f} | {routed:.3f} | {dense / routed:.2f}x | {paired:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="default", help="a DiffCR artifact for the shipped pipeline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6, help="timed pipeline calls per pipeline, interleaved")
    parser.add_argument("--skip-kernels", action="store_true", help="only the pipeline table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    if not args.skip_kernels:
        print("\n".join(kernel_table()) + "\n")
    print("\n".join(pipeline_table(args.artifact, args.rounds)))


if __name__ == "__main__":
    main()
