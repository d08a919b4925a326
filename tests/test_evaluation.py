import pytest
import torch

from diffcr.data import load_dataset
from diffcr.evaluation import feature_fid, psnr_ssim
from diffcr.models.classifier import classifier_accuracy, load_classifier


@pytest.fixture(scope="module")
def data():
    return load_dataset()


def test_shipped_classifier_is_accurate_on_heldout(data):
    _, heldout = data
    classifier = load_classifier()
    accuracy = classifier_accuracy(classifier, heldout.images, heldout.labels)
    assert accuracy >= 0.97
    assert classifier.card["heldout_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_feature_fid_orders_real_and_noise(data):
    train, heldout = data
    classifier = load_classifier()
    same = feature_fid(classifier, heldout.images, heldout.images)
    mixed = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:500]  # splits are class-sorted
    real = feature_fid(classifier, heldout.images, train.images[mixed])
    noise = feature_fid(classifier, heldout.images, torch.rand(500, 1, 32, 32) * 2 - 1)
    assert abs(same) < 1e-3
    assert real < noise / 20


def test_psnr_ssim():
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    psnr, ssim = psnr_ssim(images, images)
    assert psnr == pytest.approx(100.0) and ssim == pytest.approx(1.0, abs=1e-5)
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)
    psnr, ssim = psnr_ssim(noisy, images)
    assert 20 < psnr < 40 and ssim < 1.0
