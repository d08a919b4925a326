"""`diffcr evaluate`: a text-to-image DiffCR artifact against its dense pipeline, measured in one run."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import DTYPE_HELP, TRANSFORMER_HELP, TRANSFORMER_SUBFOLDER_HELP, friendly_errors


@app.command()
@friendly_errors
def evaluate(
    base: str = typer.Option(..., help="a diffusers PixArt pipeline folder or repo id"),
    artifact: Path = typer.Option(..., help="a compress run's artifact/ or model/ folder"),
    prompt: str = typer.Option(None, help="one prompt"),
    prompts: Path = typer.Option(None, help="a text file, one prompt a line"),
    out: Path = typer.Option(Path("runs/evaluate"), help="folder for t2i_assessment.json, pairs.png, samples.npz"),
    num: int = typer.Option(2, help="images per prompt"),
    steps: int = typer.Option(20),
    guidance_scale: float = typer.Option(4.5),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(4),
    reference: Path = typer.Option(None, help="a folder of real images: FID of dense and of DiffCR against it"),
    features: str = typer.Option("inception", help="FID features: 'inception' or 'clip:PATH' (a local CLIP model)"),
    clip: Path = typer.Option(None, help="a local CLIP model folder: CLIP score of dense and of DiffCR"),
    transformer: str = typer.Option(None, help=TRANSFORMER_HELP),
    transformer_subfolder: str = typer.Option("transformer", help=TRANSFORMER_SUBFOLDER_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP + " (dense and DiffCR alike)"),
    timing_rounds: int = typer.Option(
        1, help="time every batch pair this many times (images from the first): the speedup, a median of more pairs"
    ),
) -> None:
    """Latency per image, peak memory, PSNR/SSIM vs dense, FID and CLIP score: dense and DiffCR side by side."""
    from diffcr.checkpoint import check_writable_dir
    from diffcr.data.latent_cache import resolve_pipeline_dtype
    from diffcr.t2i_assess import assess_text_to_image, feature_extractor
    from diffcr.text_to_image import PromptSampleConfig, read_prompts

    texts = read_prompts(prompt, prompts)
    torch_dtype = resolve_pipeline_dtype(dtype)
    cfg = PromptSampleConfig(
        steps=steps, guidance_scale=guidance_scale, num_per_prompt=num, seed=seed, batch_size=batch_size
    )
    if timing_rounds < 1:
        raise typer.BadParameter(f"{timing_rounds} must be >= 1", param_hint="--timing-rounds")
    check_writable_dir(out, "--out")
    if reference is not None:
        feature_extractor(features)  # a bad --features fails now, not after sampling
    source = {"transformer": transformer, "transformer_subfolder": transformer_subfolder, "torch_dtype": torch_dtype}
    result = assess_text_to_image(
        base, artifact, texts, cfg, out, reference, features, clip, source=source, timing_rounds=timing_rounds
    )
    latency = result["latency_per_image_s"]
    typer.echo(
        f"latency per image: dense {latency['dense']:.3f} s, DiffCR {latency['diffcr']:.3f} s "
        f"({result['speedup']:.2f}x, FLOP-ideal {result['flop_ratio']:.2f}x); "
        f"peak memory DiffCR/dense {result['memory_vs_dense']:.2f}; "
        f"PSNR vs dense {result['psnr_vs_dense_db']:.1f} dB, SSIM {result['ssim_vs_dense']:.3f} "
        f"({result['timed_batches']} timed batch pairs)"
    )
    for key in ("fid", "clip_score"):
        if key in result:
            typer.echo(f"{key}: dense {result[key]['dense']:.3f}, DiffCR {result[key]['diffcr']:.3f}")
    typer.echo(f"-> {out / 't2i_assessment.json'} and {out / 'pairs.png'}")
