"""The digit classifier that judges samples: accuracy on class-conditional samples, and its penultimate
features as the embedding for FID and KID (standard Inception FID needs weights that cannot be downloaded
offline, and its features mean little on 32x32 grayscale digits).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """A small CNN on (B, 1, 32, 32) images in [-1, 1]; `features` gives (B, 128) embeddings."""

    num_features = FEATURE_DIM  # read by torchmetrics when this module is its feature extractor

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.embed = nn.Linear(64 * (image_size // 4) ** 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(images.float())  # (B, 64, H/4, W/4)
        return F.relu(self.embed(hidden.flatten(1)))  # (B, 128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)


class ClassifierFeatures(nn.Module):
    """The classifier's embedding as a torchmetrics feature extractor (FID / KID)."""

    num_features = FEATURE_DIM

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()


def _shift(images: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (background is -1)."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(images)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_classifier(
    train_set, heldout_set, epochs: int = 20, batch_size: int = 128, lr: float = 2e-3, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """Train the classifier on `train_set`; returns it and its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier(train_set.images.shape[1], train_set.num_classes, train_set.images.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(train_set) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            images = _shift(train_set.images[idx], gen)
            loss = F.cross_entropy(model(images), train_set.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    accuracy = classifier_accuracy(model, heldout_set.images, heldout_set.labels)
    logger.info("classifier held-out accuracy %.4f", accuracy)
    return model.eval(), accuracy


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(500)])
    return (predictions == labels).float().mean().item()


def save_classifier(model: DigitClassifier, folder: str | Path, card: dict) -> None:
    from diffcr.checkpoint import save_file_atomic, write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file_atomic(dict(model.state_dict()), folder / "classifier.safetensors")
    write_json_atomic(folder / "classifier.json", {"config": model.config, **card})


def load_classifier(folder: str | Path | None = None) -> DigitClassifier:
    """Load the shipped classifier (default) or one saved by `save_classifier`."""
    from safetensors.torch import load_file

    from diffcr.models.tiny_dit import SHIPPED_CLASSIFIER_DIR

    folder = Path(folder) if folder else SHIPPED_CLASSIFIER_DIR
    if not (folder / "classifier.safetensors").is_file():
        raise FileNotFoundError(f"no classifier at {folder}; train one with `diffcr train-classifier`")
    meta = json.loads((folder / "classifier.json").read_text())
    model = DigitClassifier(**meta["config"])
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    model.card = {key: value for key, value in meta.items() if key != "config"}
    return model.eval()
