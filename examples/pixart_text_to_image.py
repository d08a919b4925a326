"""Load a DiffCR run into a diffusers PixArt pipeline in two lines, then sample dense and DiffCR from the same seed
and time both.

    python examples/pixart_text_to_image.py PIPELINE ARTIFACT "a red fox in the snow" [--transformer T]

PIPELINE is a PixArt-Sigma (or -Alpha) pipeline folder or repo id, e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, or
PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers with --transformer PixArt-alpha/PixArt-Sigma-XL-2-512-MS (that repo
holds only the 512 px transformer; PixArt pairs it with this pipeline's VAE and T5). ARTIFACT is the `artifact/`
folder of a `diffcr compress` run on that pipeline, in any --mode: it holds the routers and kept ratios, and
`diffcr.load` also applies the run's LoRA (--mode lora) or its fine-tuned weights (--mode full, read from the run's
`model/` folder beside it). The pipeline is loaded in bf16 on a GPU (fp32 on a CPU), as `diffcr sample` does by
default; a short warm-up call runs before each timing. See the README's "Compress your own PixArt-Sigma".
"""

import argparse
import time

import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel

import diffcr


def main(base: str, artifact: str, prompt: str, steps: int = 20, transformer: str | None = None) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16: about twice fp32's speed on a GPU
    parts = {}
    if transformer is not None:  # PixArt's own way to pair the 512 px transformer with a pipeline
        parts["transformer"] = PixArtTransformer2DModel.from_pretrained(
            transformer, subfolder="transformer", torch_dtype=dtype
        )
    # the class model_index.json names: PixArtSigmaPipeline or PixArtAlphaPipeline
    pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype, **parts).to(device)
    generate(pipe, prompt, min(steps, 2))  # warm-up: CUDA context, kernels and allocator, outside the timings
    dense_seconds, dense = timed(pipe, prompt, steps)

    diffcr.load(pipe.transformer, artifact)  # the trained model: routers, kept ratios and the run's fine-tuning
    generate(pipe, prompt, min(steps, 2))  # the routed blocks' own kernels, warmed up the same way
    routed_seconds, routed = timed(pipe, prompt, steps)

    print(diffcr.schedule(pipe.transformer))
    print(f"dense {dense_seconds:.2f} s, DiffCR {routed_seconds:.2f} s ({dense_seconds / routed_seconds:.2f}x)")
    dense.save("dense.png")
    routed.save("diffcr.png")


def generate(pipe, prompt: str, steps: int):
    # resolution binning snaps to PixArt's trained sizes; off, so that small test pipelines keep their size
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                use_resolution_binning=False).images[0]  # fmt: skip


def timed(pipe, prompt: str, steps: int):
    start = time.perf_counter()
    image = generate(pipe, prompt, steps)  # a PIL image: the GPU has finished when it is returned
    return time.perf_counter() - start, image


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("artifact")
    parser.add_argument("prompt")
    parser.add_argument("--transformer", help="a transformer repo or folder with a transformer/ subfolder")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(args.pipeline, args.artifact, args.prompt, steps=args.steps, transformer=args.transformer)
