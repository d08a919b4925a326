import numpy as np
import pytest
import torch

import diffcr
from diffcr.models import build_base_model
from diffcr.sampling import (
    SampleConfig,
    class_labels,
    image_grid,
    parse_classes,
    sample_images,
    save_npz,
)


def tiny():
    torch.manual_seed(0)
    return build_base_model(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8).eval()


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_same_seeds_same_images_whatever_the_batch_size(scheduler):
    model = tiny()
    labels = class_labels([1, 4, 7], 2)
    big = sample_images(model, labels, SampleConfig(scheduler=scheduler, steps=3, batch_size=6), 10)
    small = sample_images(model, labels, SampleConfig(scheduler=scheduler, steps=3, batch_size=4), 10)
    assert big.shape == (6, 1, 8, 8)
    torch.testing.assert_close(big, small, atol=1e-5, rtol=0)
    # a subset with its own indices gives the same images
    part = sample_images(model, labels[3:5], SampleConfig(scheduler=scheduler, steps=3), 10, indices=[3, 4])
    torch.testing.assert_close(part, big[3:5], atol=1e-5, rtol=0)
    other_seed = sample_images(model, labels, SampleConfig(scheduler=scheduler, steps=3, seed=1), 10)
    assert not torch.allclose(other_seed, big)


def test_routed_sampling_differs_and_stays_in_range():
    model = tiny()
    labels = class_labels([3], 2)
    cfg = SampleConfig(steps=3)
    dense = sample_images(model, labels, cfg, 10)
    diffcr.apply(model, diffcr.DiffCRConfig(init_kept_ratio=0.5))
    routed = sample_images(model, labels, cfg, 10)
    assert torch.isfinite(routed).all() and not torch.allclose(dense, routed)
    diffcr.remove(model)
    torch.testing.assert_close(sample_images(model, labels, cfg, 10), dense, atol=0, rtol=0)


def test_parse_classes():
    assert parse_classes("0-9", 10) == list(range(10))
    assert parse_classes("1,3, 5", 10) == [1, 3, 5]
    with pytest.raises(ValueError, match="outside 0..9"):
        parse_classes("3-12", 10)
    with pytest.raises(ValueError, match="cannot read classes 'a-b'"):
        parse_classes("a-b", 10)


def test_npz_layout_and_grid(tmp_path):
    images = torch.linspace(-1, 1, 2 * 1 * 4 * 4).reshape(2, 1, 4, 4)
    save_npz(tmp_path / "s.npz", images, torch.tensor([3, 5]))
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].shape == (2, 4, 4, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_0"].min() == 0 and data["arr_0"].max() == 255
    assert data["labels"].tolist() == [3, 5]
    grid = image_grid(images, columns=2)
    assert grid.shape == (2 + 4 + 2, 2 + 2 * (4 + 2), 1)


def test_bad_sample_config():
    with pytest.raises(ValueError, match="scheduler='euler'"):
        SampleConfig(scheduler="euler")
    with pytest.raises(ValueError, match="guidance_scale=0.5"):
        SampleConfig(guidance_scale=0.5)
