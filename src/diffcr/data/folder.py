"""A user's own data: an image folder with one subfolder per class (`root/<class>/<image>`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image_folder(root: str | Path, image_size: int = 32, channels: int = 1):
    """Load `root/<class name>/<image file>` into an `ImageDataset` (classes sorted by name).

    Images are converted to grayscale (channels=1) or RGB (channels=3), resized to image_size x image_size
    and scaled to [-1, 1].

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no class subfolders, an empty class, or an image that cannot be read (named).
    """
    from PIL import Image, UnidentifiedImageError

    from diffcr.data.mnist import ImageDataset

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {str(root)!r} does not exist; pass a folder with one subfolder per class, "
            "or omit --data to use the bundled MNIST-5k digits"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"data folder {str(root)!r} has no class subfolders (expected root/<class>/<image>)")
    mode = {1: "L", 3: "RGB"}[channels]
    images, labels = [], []
    for class_id, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {str(class_dir)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((image_size, image_size), Image.BICUBIC)
                    array = np.asarray(img, dtype=np.float32)
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise ValueError(f"cannot read image {str(file)!r}: {err}") from err
            if array.ndim == 2:
                array = array[:, :, None]
            images.append(torch.from_numpy(array).permute(2, 0, 1))  # (C, H, W)
            labels.append(class_id)
    stacked = torch.stack(images) / 127.5 - 1.0
    return ImageDataset(stacked.contiguous(), torch.tensor(labels), tuple(p.name for p in class_dirs))
