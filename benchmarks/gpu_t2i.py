"""Text-to-image on a full-size random-weight PixArt-Sigma transformer: one training step and pipeline sampling,
dense vs DiffCR, measured side by side (bf16 on CUDA).

Training step: routers + ratios + LoRA-free full backward at batch 2, with the kept ratios at 0.85 (two blended
bin passes, the start of training) and at 0.55 (after the ratios have moved). Sampling: `PixArtSigmaPipeline`
with precomputed text embeddings (300 tokens), 20 DPM-Solver steps, latents out (the VAE is not timed), dense
and frozen DiffCR at kept 0.8 and 0.5. 512 px (1024 tokens) and 1024 px (4096 tokens). Prints one JSON line.

    python benchmarks/gpu_t2i.py [--sizes 512,1024] [--tiny --device cpu]   # --tiny: a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import diffcr
from diffcr.benchmark import machine_description


def transformer(tiny: bool, sample_size: int):
    from diffusers import PixArtTransformer2DModel

    if tiny:
        shape = dict(
            num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16, caption_channels=16
        )
    else:
        shape = dict(
            num_attention_heads=16,
            attention_head_dim=72,
            num_layers=28,
            cross_attention_dim=1152,
            caption_channels=4096,
        )
    return PixArtTransformer2DModel(
        in_channels=4,
        out_channels=8,
        sample_size=sample_size,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        **shape,
    )


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_times(model, device, dtype, latent: int, text_dim: int, repeats: int) -> dict:
    batch = 2
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    text = torch.randn(batch, 300, text_dim, device=device, dtype=dtype)
    t = torch.tensor([100, 700], device=device)
    routed = diffcr.apply(model, diffcr.DiffCRConfig(timestep_regions=4)).train()
    results = {}
    for name, kept in (("dense", None), ("kept_0.85", 0.85), ("kept_0.55", 0.55)):
        with torch.no_grad():
            routed.diffcr.kept_ratio.fill_(1.0 if kept is None else kept)

        def step():
            routed.zero_grad(set_to_none=True)
            out = routed(
                x, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
            ).sample
            (out.float().pow(2).mean() + diffcr.ratio_loss(routed)).backward()

        results[name] = timed(step, device, repeats)
    diffcr.remove(routed)
    return results


def sampling_times(model, device, dtype, latent: int, text_dim: int, repeats: int) -> dict:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model.eval(),
                               scheduler=DPMSolverMultistepScheduler())  # fmt: skip
    embeds = torch.randn(1, 300, text_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 300, device=device)
    pixels = latent * 8

    pipe.set_progress_bar_config(disable=True)
    call = {
        "prompt_embeds": embeds,
        "prompt_attention_mask": mask,
        "negative_prompt": None,
        "negative_prompt_embeds": torch.zeros_like(embeds),
        "negative_prompt_attention_mask": mask,
        "num_inference_steps": 20,
        "height": pixels,
        "width": pixels,
        "output_type": "latent",
        "use_resolution_binning": False,
    }

    def sample():
        with torch.no_grad():
            pipe(**call)

    results = {"dense": timed(sample, device, repeats)}
    for kept in (0.8, 0.5):
        diffcr.apply(model, diffcr.DiffCRConfig(timestep_regions=1, init_kept_ratio=kept))
        diffcr.freeze(model)
        results[f"kept_{kept}"] = timed(sample, device, repeats)
        diffcr.remove(model)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024", help="image sizes in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny transformer (CPU smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --tiny --device cpu for a smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"machine": machine_description(), "dtype": str(dtype), "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        latent = size // 8
        torch.manual_seed(0)
        model = transformer(args.tiny, latent).to(device=device, dtype=dtype)
        text_dim = model.config.caption_channels
        train = train_step_times(model, device, dtype, latent, text_dim, args.repeats)
        sample = sampling_times(model, device, dtype, latent, text_dim, args.repeats)
        report["sizes"][size] = {
            "tokens": (latent // 2) ** 2,
            "train_step_s": train,
            "train_step_vs_dense": {k: round(v / train["dense"], 3) for k, v in train.items()},
            "sampling_s": sample,
            "sampling_speedup": {k: round(sample["dense"] / v, 3) for k, v in sample.items()},
        }
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
