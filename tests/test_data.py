import numpy as np
import pytest
import torch
from PIL import Image

from diffcr.data import load_dataset, load_image_folder, load_mnist5k, split_train_heldout


def test_bundled_digits_are_real_and_split_fixed():
    ds = load_mnist5k()
    assert ds.images.shape == (5000, 1, 32, 32) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert torch.all(ds.images[:, :, :2, :] == -1.0)  # the padding is background
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    train, heldout = split_train_heldout(ds)
    assert len(train) == 4500 and len(heldout) == 500
    assert torch.bincount(heldout.labels).tolist() == [50] * 10
    again_train, _ = load_dataset()
    assert torch.equal(again_train.images, train.images)


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=12):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_loads_resized_and_labelled(tmp_path):
    _write_folder(tmp_path)
    ds = load_image_folder(tmp_path, image_size=8, channels=1)
    assert ds.images.shape == (6, 1, 8, 8) and ds.class_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert -1.0 <= ds.images.min() and ds.images.max() <= 1.0
    rgb = load_image_folder(tmp_path, image_size=8, channels=3)
    assert rgb.images.shape == (6, 3, 8, 8)
    train, heldout = load_dataset(str(tmp_path), image_size=8)
    assert len(train) == 4 and len(heldout) == 2


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_corrupt_image_is_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_image_folder(tmp_path)


def test_empty_class_is_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*zebra.* holds no images"):
        load_image_folder(tmp_path)


def test_folder_without_classes(tmp_path):
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path)
