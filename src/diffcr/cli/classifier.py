"""`diffcr train-classifier`: the digit classifier that judges samples (accuracy, feature FID)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command("train-classifier")
@friendly_errors
def train_classifier_command(
    out: Path = typer.Option(Path("runs/classifier"), help="folder for classifier.safetensors + classifier.json"),
    data: str = typer.Option("mnist5k", help="'mnist5k' (bundled) or an image folder with one subfolder per class"),
    epochs: int = typer.Option(20),
    seed: int = typer.Option(0),
) -> None:
    """Train the classifier on the train split and report its held-out accuracy."""
    import time

    import torch

    from diffcr.data import load_dataset
    from diffcr.models.classifier import save_classifier, train_classifier

    torch.set_num_threads(2)
    train_set, heldout = load_dataset(data)
    start = time.perf_counter()
    model, accuracy = train_classifier(train_set, heldout, epochs=epochs, seed=seed)
    seconds = time.perf_counter() - start
    save_classifier(
        model,
        out,
        {
            "heldout_accuracy": accuracy,
            "epochs": epochs,
            "seed": seed,
            "data": data,
            "train_images": len(train_set),
            "heldout_images": len(heldout),
            "train_seconds": round(seconds, 1),
        },
    )
    typer.echo(f"held-out accuracy {accuracy:.2%} ({len(heldout)} images), {seconds:.0f} s; saved to {out}")
