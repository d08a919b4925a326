"""A user's own data: an image folder with one subfolder per class (`root/<class>/<image>`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffcr.data.dataset import ImageDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_IMAGE_SIZE = 1024  # the side images are resized to; a pixel-space DiT larger than this is not what this is for
# an image counts as colour when its channels differ by more than this (of 255) on average: grey images saved
# as RGB, or JPEG noise, stay grey
COLOUR_TOLERANCE = 2.0


def _read_image(file: Path, image_size: int) -> tuple[np.ndarray, bool]:
    """One image resized to image_size x image_size: ((H, W, C) float32 in [0, 255] with C 1 or 3, has colour).

    16-bit images keep their full range (divided by 257 to the 8-bit scale): reading them as 8-bit would clip
    everything above 255 of 65535 to white.
    """
    from PIL import Image

    with Image.open(file) as img:
        img.load()  # decode now, so that a truncated file fails here, with its name
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            grey = np.asarray(img, dtype=np.float64)
            if grey.size and (grey.min() < 0 or grey.max() > 65535):
                raise ValueError(
                    f"32-bit integer pixels {grey.min():g}..{grey.max():g} are outside 0..65535; "
                    "save the image as 8-bit or 16-bit"
                )
            planes, colour = [grey / 257.0], False
        elif img.mode == "F":
            raise ValueError("floating-point pixels have no fixed range; save the image as 8-bit or 16-bit")
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
            spread = np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean() if rgb.size else 0.0
            colour = bool(spread > COLOUR_TOLERANCE)
            planes = [rgb[..., i] for i in range(3)] if colour else [np.asarray(img.convert("L"), dtype=np.float32)]
    resized = [
        np.asarray(Image.fromarray(plane.astype(np.float32)).resize((image_size, image_size), Image.BICUBIC))
        for plane in planes
    ]
    return np.clip(np.stack(resized, axis=2), 0.0, 255.0), colour


def _to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, 1 or 3) -> (H, W, channels): ITU-R 601 luma (as PIL's "L") or a grey image repeated."""
    if array.shape[2] == channels:
        return array
    if channels == 1:
        return (array @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    return np.repeat(array, 3, axis=2)


def load_image_folder(root: str | Path, image_size: int = 32, channels: int | None = 1):
    """Load `root/<class name>/<image file>` into an `ImageDataset` (classes sorted by name).

    Images are converted to grayscale (channels=1) or RGB (channels=3), resized to image_size x image_size
    and scaled to [-1, 1]. 8-bit and 16-bit images are read at their full range. Hidden folders and files
    (names starting with ".") are skipped.

    Args:
        root: the folder.
        image_size: side of the square images, 1..1024.
        channels: 1, 3, or None to keep the images' own: 3 when any image has colour, else 1.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: not a folder, no class subfolders, an empty class, or an image that cannot be read, is too
            large to decode safely, or has an unsupported pixel format (the file is named).

    Example:
        >>> ds = load_image_folder("my_images", image_size=32, channels=None)  # doctest: +SKIP
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size!r} must be a whole number in [1, {MAX_IMAGE_SIZE}]")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels!r} must be 1 (grayscale), 3 (RGB) or None (as the images are)")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(
            f"data folder {str(root)!r} does not exist; pass a folder with one subfolder per class, "
            "or omit --data to use the bundled MNIST-5k digits"
        )
    if not root.is_dir():
        raise ValueError(
            f"data {str(root)!r} is a file, not a folder; pass a folder with one subfolder per class "
            "(root/<class>/<image>)"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"data folder {str(root)!r} has no class subfolders (expected root/<class>/<image>)")
    arrays, labels, colour_file = [], [], None
    for class_id, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
        )
        if not files:
            raise ValueError(f"class folder {str(class_dir)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            try:
                array, colour = _read_image(file, image_size)
            except Image.DecompressionBombError as err:
                raise ValueError(
                    f"image {str(file)!r} is too large to decode safely ({err}); resize it, or remove it from "
                    "the folder"
                ) from err
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                raise ValueError(f"cannot read image {str(file)!r}: {err}") from err
            if colour and colour_file is None:
                colour_file = file
            arrays.append(array)
            labels.append(class_id)
    if channels is None:
        channels = 3 if colour_file is not None else 1
    images = [torch.from_numpy(_to_channels(array, channels).copy()).permute(2, 0, 1) for array in arrays]
    stacked = torch.stack(images).float() / 127.5 - 1.0  # (n, C, H, W) in [-1, 1]
    dataset = ImageDataset(stacked.contiguous(), torch.tensor(labels), tuple(p.name for p in class_dirs))
    return dataset
