"""Load a DiffCR artifact into a diffusers PixArt pipeline in two lines, then sample dense and DiffCR from the same
seed and time both.

    python examples/pixart_text_to_image.py PIPELINE ARTIFACT "a red fox in the snow"

PIPELINE is a PixArt-Sigma (or -Alpha) pipeline folder or repo id, e.g. PixArt-alpha/PixArt-Sigma-XL-2-512-MS;
ARTIFACT is the `artifact/` folder of a `diffcr compress` run on that pipeline (see the README's "Compress your
own PixArt-Sigma").
"""

import sys
import time

import torch
from diffusers import PixArtSigmaPipeline

import diffcr


def main(base: str, artifact: str, prompt: str, steps: int = 20) -> None:
    pipe = PixArtSigmaPipeline.from_pretrained(base)
    dense_seconds, dense = timed(pipe, prompt, steps)

    diffcr.load(pipe.transformer, artifact)  # routers and learned kept ratios onto the pipeline's own transformer
    routed_seconds, routed = timed(pipe, prompt, steps)

    print(diffcr.schedule(pipe.transformer))
    print(f"dense {dense_seconds:.2f} s, DiffCR {routed_seconds:.2f} s ({dense_seconds / routed_seconds:.2f}x)")
    dense.save("dense.png")
    routed.save("diffcr.png")
    diffcr.remove(pipe.transformer)  # the pipeline is dense again, exactly


def timed(pipe, prompt: str, steps: int):
    start = time.perf_counter()
    # resolution binning snaps to PixArt's trained sizes; off, so that small test pipelines keep their size
    image = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                 use_resolution_binning=False).images[0]  # fmt: skip
    return time.perf_counter() - start, image


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
