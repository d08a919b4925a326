"""The labelled image set every class-conditional data source returns (the bundled digits, a user's folder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageDataset:
    """Images in [-1, 1] with integer class labels.

    Attributes:
        images: (n, C, H, W) float32 in [-1, 1].
        labels: (n,) int64 class ids in [0, num_classes).
        class_names: name of each class id.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names)
