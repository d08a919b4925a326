"""`diffcr prepare`: encode an image-caption dataset once with a PixArt pipeline's VAE and text encoder."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import DTYPE_HELP, TRANSFORMER_HELP, TRANSFORMER_SUBFOLDER_HELP, friendly_errors


@app.command()
@friendly_errors
def prepare(
    base: str = typer.Option(..., help="a diffusers PixArtSigmaPipeline / PixArtAlphaPipeline folder or repo id"),
    data: Path = typer.Option(
        ...,
        help="images with same-stem .txt captions beside them (subfolders searched), a .jsonl / .csv manifest "
        "(image, caption), or a datasets folder",
    ),
    out: Path = typer.Option(..., help="cache folder (safetensors shards + manifest.json); a rerun resumes"),
    resolution: int = typer.Option(None, help="square crop size in pixels (default: the transformer's native size)"),
    batch_size: int = typer.Option(8, help="images encoded at once"),
    shard_size: int = typer.Option(256, help="records per shard file"),
    transformer: str = typer.Option(None, help=TRANSFORMER_HELP),
    transformer_subfolder: str = typer.Option("transformer", help=TRANSFORMER_SUBFOLDER_HELP),
    dtype: str = typer.Option(
        "auto",
        help=DTYPE_HELP + "; what the VAE and text encoder compute in: the cache stores latents in fp32 and text "
        "embeddings in bf16 whatever it is",
    ),
) -> None:
    """Encode latents (VAE mean x scaling factor) and text embeddings once, for `diffcr compress --data CACHE`."""
    from diffcr.data.latent_cache import prepare_cache, resolve_pipeline_dtype

    manifest = prepare_cache(
        base,
        data,
        out,
        resolution=resolution,
        batch_size=batch_size,
        shard_size=shard_size,
        transformer=transformer,
        transformer_subfolder=transformer_subfolder,
        torch_dtype=resolve_pipeline_dtype(dtype),
    )
    for name, why in manifest["skipped"]:
        typer.echo(f"skipped {name}: {why}", err=True)
    typer.echo(
        f"{manifest['count']} image-caption pairs encoded at {manifest['resolution']} px into {out} "
        f"({len(manifest['shards'])} shards; latents {manifest['latent_shape']}, text {manifest['text_shape']}; "
        f"{len(manifest['skipped'])} skipped)"
    )
