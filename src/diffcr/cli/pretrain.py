"""`diffcr pretrain`: train the base DiT from scratch (the recipe of the shipped model)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command()
@friendly_errors
def pretrain(
    out: Path = typer.Option(Path("runs/pretrain"), help="run directory (checkpoints, metrics, model/)"),
    data: str = typer.Option("mnist5k", help="'mnist5k' (bundled) or an image folder with one subfolder per class"),
    steps: int = typer.Option(6000, help="optimizer steps"),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(200),
    minutes: float = typer.Option(None, help="stop after this many minutes (a checkpoint is written)"),
    checkpoint_every: int = typer.Option(100),
    seed: int = typer.Option(0),
    num_layers: int = typer.Option(8, help="depth of the DiT (the shipped model has 8)"),
    resume: bool = typer.Option(False, help="continue the run in --out from its latest checkpoint"),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), no, bf16, fp16"),
) -> None:
    """Pretrain the class-conditional base DiT; the trained model is written to OUT/model."""
    import torch

    from diffcr.data import load_dataset
    from diffcr.models import build_base_model
    from diffcr.training import TrainConfig, export_model, train

    train_set, _ = load_dataset(data)
    torch.manual_seed(seed)
    model = build_base_model(
        num_layers=num_layers,
        in_channels=train_set.images.shape[1],
        out_channels=train_set.images.shape[1],
        sample_size=train_set.images.shape[-1],
        num_embeds_ada_norm=train_set.num_classes,
    )
    cfg = TrainConfig(
        mode="pretrain",
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every,
        seed=seed,
        max_minutes=minutes,
        mixed_precision=mixed_precision,
    )
    result = train(out, model, train_set, cfg, resume=resume, run_info={"data": data})
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    export_model(result.model, out / "model")
    typer.echo(f"pretrained {result.steps_done} steps in {result.seconds / 60:.1f} min; model: {out / 'model'}")
