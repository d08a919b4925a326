"""Image-caption sources for text-to-image: a folder of images with same-stem `.txt` captions (searched
recursively; `a/0001.jpg` pairs with `a/0001.txt`, never with `b/0001.txt`), a JSONL or CSV manifest with `image`
and `caption` columns, or a `datasets` dataset saved with `save_to_disk`.

Every source yields `CaptionRecord`s in a fixed order (sorted by path for folders, file order for manifests),
so an encoded cache is deterministic and a rerun can skip the shards it already wrote.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its caption.

    Attributes:
        name: what a person can find the record by (file path or dataset row).
        caption: the text.
        image: a path to the image file, or the image itself (a PIL image, from a `datasets` dataset).
    """

    name: str
    caption: str
    image: object


@dataclass
class CaptionSource:
    """The usable records of a source, and what was skipped (name, reason)."""

    records: list[CaptionRecord]
    skipped: list[tuple[str, str]]


def read_caption_source(src: str | Path) -> CaptionSource:
    """Read the records of an image-caption source.

    Empty captions and images without a caption file are skipped and listed by name in `skipped` (the caller
    reports them); images that do not decode are found later, when they are encoded. A caption whose image is
    missing is an error: it is a caption the user wrote, and training silently without it would hide a renamed or
    lost image.

    Raises:
        FileNotFoundError: `src` does not exist.
        ValueError: the source has no usable record, a caption has no image (a `.txt` without a same-stem image in
            its folder, a manifest row whose image file does not exist; the message names them), two images would
            share one caption file (`x.png` and `x.jpg` beside `x.txt`; the message names both), or a manifest
            lacks the `image` / `caption` columns.
    """
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(
            f"caption data {str(path)!r} does not exist; pass a folder of images with same-stem .txt captions, a "
            ".jsonl or .csv manifest with image and caption columns, or a `datasets` folder (save_to_disk)"
        )
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        source = _from_datasets(path)
    elif path.is_dir():
        source = _from_folder(path)
    elif path.suffix.lower() in (".jsonl", ".csv"):
        source = _from_manifest(path)
    else:
        raise ValueError(f"{path} is not a folder, a .jsonl or a .csv manifest; see `diffcr prepare --help`")
    if not source.records:
        reasons = "; ".join(f"{name}: {why}" for name, why in source.skipped[:5])
        raise ValueError(f"{path} holds no usable image-caption pair" + (f" ({reasons})" if reasons else ""))
    return source


def _from_folder(root: Path) -> CaptionSource:
    # an image and its caption pair by their path under `root` without the suffix, so `a/0001.jpg` goes with
    # `a/0001.txt` and never with `b/0001.txt`
    images: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            images.setdefault(_pairing_key(root, path), []).append(path)
    captions = {_pairing_key(root, p): p for p in sorted(root.rglob("*.txt")) if p.is_file()}
    orphans = [str(captions[key]) for key in sorted(set(captions) - set(images))]
    refuse_captions_without_images(
        root, orphans, ".txt files with no image of the same name", "add the image or remove the caption file"
    )
    _refuse_shared_captions(root, {key: images[key] for key in captions if len(images[key]) > 1})
    records, skipped = [], []
    for key in sorted(images):
        if key not in captions:
            skipped.extend((str(image), f"image with no caption file {key}.txt") for image in images[key])
            continue
        image, caption = images[key][0], captions[key]
        text = caption.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            skipped.append((str(caption), "empty caption"))
            continue
        records.append(CaptionRecord(str(image), text, image))
    return CaptionSource(records, skipped)


def _pairing_key(root: Path, path: Path) -> str:
    """`a/0001` for `root/a/0001.jpg` and `root/a/0001.txt`: the path under `root` without its suffix."""
    return path.relative_to(root).with_suffix("").as_posix()


def _refuse_shared_captions(root: Path, shared: dict[str, list[Path]]) -> None:
    """Raise a ValueError naming (up to 10 of) the caption files that two or more images would share."""
    if not shared:
        return
    keys = sorted(shared)
    shown = "; ".join(f"{key}.txt: {', '.join(str(p) for p in shared[key])}" for key in keys[:10])
    more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
    raise ValueError(
        f"{root} has {len(keys)} caption files that more than one image would share ({shown}{more}); which image a "
        "caption describes is ambiguous: rename or remove all but one image of each"
    )


def _manifest_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err}); each line must be an object") from err
    return rows


def _from_manifest(path: Path) -> CaptionSource:
    rows = _manifest_rows(path)
    if rows and not all(isinstance(row, dict) and "image" in row and "caption" in row for row in rows):
        raise ValueError(f"{path}: every row needs an 'image' (path, relative to the manifest) and a 'caption'")
    records, skipped, missing = [], [], []
    for number, row in enumerate(rows, start=1):
        image = Path(str(row["image"]))
        image = image if image.is_absolute() else path.parent / image
        name = f"{path.name} row {number} ({image})"
        caption = str(row["caption"] or "").strip()
        if not image.is_file():
            missing.append(name)
        elif not caption:
            skipped.append((name, "empty caption"))
        else:
            records.append(CaptionRecord(str(image), caption, image))
    refuse_captions_without_images(
        path, missing, "rows whose image file does not exist", "fix their paths (relative to it) or drop the rows"
    )
    return CaptionSource(records, skipped)


def refuse_captions_without_images(source: Path, names: list[str], what: str, fix: str) -> None:
    """Raise a ValueError naming (up to 10 of) the captions in `source` that have no image."""
    if not names:
        return
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    raise ValueError(f"{source} has captions with no image ({len(names)} {what}): {shown}; {fix}")


def _from_datasets(path: Path) -> CaptionSource:
    try:
        from datasets import load_from_disk
    except ImportError as err:
        raise ValueError(
            f"{path} is a `datasets` folder: install the optional dependency (pip install datasets)"
        ) from err
    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict: the train split
        if "train" not in dataset:
            raise ValueError(f"{path} is a DatasetDict without a 'train' split (splits: {list(dataset.keys())})")
        dataset = dataset["train"]
    columns = set(dataset.column_names)
    if not {"image", "caption"} <= columns:
        raise ValueError(f"{path}: the dataset needs 'image' and 'caption' columns, it has {sorted(columns)}")
    records, skipped = [], []
    for index, row in enumerate(dataset):
        name = f"{path.name}[{index}]"
        caption = str(row["caption"] or "").strip()
        if not caption:
            skipped.append((name, "empty caption"))
        else:
            records.append(CaptionRecord(name, caption, row["image"]))
    return CaptionSource(records, skipped)
