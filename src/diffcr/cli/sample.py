"""`diffcr sample`: class-conditional samples from a base model, with or without a DiffCR artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command()
@friendly_errors
def sample(
    base: str = typer.Option("default", help="base model: 'default' (shipped) or a diffusers folder / repo id"),
    artifact: str = typer.Option("default", help="DiffCR artifact folder, 'default' (shipped) or 'none' (dense)"),
    classes: str = typer.Option("0-9", help="class ids, e.g. '0-9' or '1,3,5'"),
    num: int = typer.Option(8, help="images per class"),
    seed: int = typer.Option(0, help="image i uses seed + i, whatever the batch size or process count"),
    scheduler: str = typer.Option("ddim", help="ddim or dpm (DPM-Solver++)"),
    steps: int = typer.Option(20),
    guidance_scale: float = typer.Option(3.0),
    batch_size: int = typer.Option(50),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid (one row per class)"),
    npz: Path = typer.Option(None, help="also write arr_0 (n, H, W, C) uint8 and labels to this .npz"),
    threads: int = typer.Option(2, help="CPU threads per process"),
) -> None:
    """Sample images; under `accelerate launch` each process makes its shard of the seeds."""
    import torch
    from accelerate import Accelerator

    from diffcr.models import null_class_id
    from diffcr.sampling import (
        SampleConfig,
        class_labels,
        image_grid,
        parse_classes,
        sample_sharded,
        save_npz,
        save_png,
    )
    from diffcr.training import load_compressed

    torch.set_num_threads(threads)
    cfg = SampleConfig(
        scheduler=scheduler, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, seed=seed
    )
    model = load_compressed(base, artifact)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    class_ids = parse_classes(classes, null_class_id(model))
    labels = class_labels(class_ids, num)
    images = sample_sharded(model, labels, cfg, null_class_id(model), accelerator, progress=True)
    if images is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, image_grid(images, columns=num))
    if npz is not None:
        save_npz(npz, images, labels)
    typer.echo(f"{len(images)} images -> {out}" + (f" and {npz}" if npz else ""))
