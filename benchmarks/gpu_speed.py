"""Dense vs routed latency of full-size random-weight transformers on a CUDA GPU, bf16.

PixArt-Sigma: 28 blocks of width 1152 (16 heads of 72), 300 text tokens, 1024x1024 images (128x128 latents, patch
2 = 4096 tokens), batch 1 and 8, kept ratios 0.8 and 0.5. SD3- and Flux-shaped rows use the same width and depth
(Flux: a third double-stream, the rest single-stream) with joint attention over the text tokens, at 1024 and 4096
image tokens; prints one JSON summary.

    python benchmarks/gpu_speed.py [--repeats 10] [--families pixart,sd3,flux]
"""

from __future__ import annotations

import argparse
import json

import torch

from diffcr.benchmark import machine_description, routing_speed, rows_as_dicts, speed_table_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--families", default="pixart,sd3,flux")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (see benchmarks/routing_speed.py for CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = {"width": 1152, "num_layers": 28, "heads": 16, "text_tokens": 300}
    rows = []
    plan = [
        (family, tokens)
        for family in args.families.split(",")
        for tokens in ((4096,) if family == "pixart" else (1024, 4096))
    ]
    for (family, tokens), batch in ((item, int(b)) for item in plan for b in args.batches.split(",")):
        rows += routing_speed(
            family,
            tokens,
            batch,
            kept_ratios=(0.8, 0.5),
            repeats=args.repeats,
            warmup=3,
            dtype=torch.bfloat16,
            device="cuda",
            **shape,
        )
        torch.cuda.empty_cache()
    print(speed_table_markdown(rows))
    print(json.dumps({"machine": machine_description(), "shape": shape, "dtype": "bf16", "rows": rows_as_dicts(rows)}))


if __name__ == "__main__":
    main()
