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
    import os

    import torch
    from accelerate import Accelerator

    from diffcr.checkpoint import check_writable_file
    from diffcr.cli.common import check_int
    from diffcr.models import null_class_id
    from diffcr.sampling import (
        SampleConfig,
        class_labels,
        image_format,
        image_grid,
        parse_classes,
        sample_sharded,
        save_npz,
        save_png,
    )
    from diffcr.train import load_compressed

    # 1. every option and every output path is checked before the model is loaded or anything is written
    cfg = SampleConfig(
        scheduler=scheduler, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, seed=seed
    )
    check_int("--num", num, 1, MAX_PER_CLASS, "images per class; the grid puts them in one row")
    check_int("--threads", threads, 1, max(64, 4 * (os.cpu_count() or 1)), "CPU threads per process")
    check_writable_file(out, "--out")
    image_format(out)
    if npz is not None:
        check_writable_file(npz, "--npz")
        if npz.resolve() == out.resolve():
            raise ValueError(f"--npz and --out are the same file {out}; give them different names")

    # 2. the model, the classes it knows, the images
    torch.set_num_threads(threads)
    model = load_compressed(base, artifact)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    class_ids = parse_classes(classes, null_class_id(model))
    check_int("--num x classes", num * len(class_ids), 1, MAX_IMAGES, "images in one call")
    labels = class_labels(class_ids, num)
    images = sample_sharded(model, labels, cfg, null_class_id(model), accelerator, progress=True)
    if images is None:
        return

    # 3. both outputs, each written atomically, after every folder they need exists
    for path in (out, npz):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, image_grid(images, columns=num))
    if npz is not None:
        save_npz(npz, images, labels)
    typer.echo(f"{len(images)} images -> {out}" + (f" and {npz}" if npz else ""))


MAX_PER_CLASS = 10_000
MAX_IMAGES = 1_000_000
