"""Quality of samples: classifier accuracy, FID / KID in the classifier's feature space (torchmetrics), and
PSNR / SSIM of DiffCR samples against dense samples from the same noise."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def feature_fid(classifier, real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two image sets (in [-1, 1]) in the classifier's 128-d feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from diffcr.models.classifier import ClassifierFeatures

    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), reset_real_features=True)
    with torch.no_grad():
        for chunk in real.split(500):
            metric.update(chunk, real=True)
        for chunk in fake.split(500):
            metric.update(chunk, real=False)
    return float(metric.compute())


def psnr_ssim(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of `images` against `reference`, both in [-1, 1], on the [0, 1] scale."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = (images.float() + 1) / 2
    b = (reference.float() + 1) / 2
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0)
    return float(psnr.clamp(max=100).mean()), float(ssim)


@dataclass
class Quality:
    accuracy: float
    fid: float
    psnr_vs_dense: float | None = None
    ssim_vs_dense: float | None = None


def evaluate_samples(
    classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    heldout_images: torch.Tensor,
    dense_images: torch.Tensor | None = None,
) -> Quality:
    """Accuracy (the classifier agrees with the requested class), feature FID against the held-out split,
    and, when `dense_images` from the same noise are given, PSNR / SSIM against them."""
    from diffcr.models.classifier import classifier_accuracy

    quality = Quality(
        accuracy=classifier_accuracy(classifier, images, labels),
        fid=feature_fid(classifier, heldout_images, images),
    )
    if dense_images is not None:
        quality.psnr_vs_dense, quality.ssim_vs_dense = psnr_ssim(images, dense_images)
    return quality


def real_fid_floor(
    classifier, train_images: torch.Tensor, heldout_images: torch.Tensor, num: int, seed: int = 0
) -> float:
    """FID between `num` real training images and the held-out split: the best a sample set of that size
    can hope for (FID is biased upward for small sets)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_images), generator=gen)[:num]
    return feature_fid(classifier, heldout_images, train_images[idx])
