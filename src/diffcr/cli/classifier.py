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
    image_size: int = typer.Option(32, help="side of the images it judges (a multiple of 4; the digits are 32)"),
    channels: int = typer.Option(1, help="1 (grayscale) or 3 (RGB): those of the images it judges"),
) -> None:
    """Train the classifier on the train split and report its held-out accuracy."""
    import time

    import torch

    from diffcr.checkpoint import check_writable_dir
    from diffcr.cli.common import check_int
    from diffcr.data import load_dataset
    from diffcr.models.classifier import save_classifier, train_classifier

    check_int("--epochs", epochs, 1, 10_000, "passes over the training images")
    check_int("--seed", seed, 0, 2**32 - 1, "seeds are 32-bit")
    check_int("--image-size", image_size, 4, 1024, "the classifier pools twice by 2")
    if image_size % 4:
        raise ValueError(f"--image-size {image_size} must be a multiple of 4 (the classifier pools twice by 2)")
    if channels not in (1, 3):
        raise ValueError(f"--channels {channels} must be 1 (grayscale) or 3 (RGB)")
    check_writable_dir(out, "--out")
    torch.set_num_threads(2)
    train_set, heldout = load_dataset(data, image_size=image_size, channels=channels)
    if len(train_set) < CLASSIFIER_BATCH:
        raise ValueError(
            f"--data {data} has {len(train_set)} training images; the classifier trains in batches of "
            f"{CLASSIFIER_BATCH}, so give it at least that many"
        )
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


CLASSIFIER_BATCH = 128  # train_classifier's default batch size
