"""Small real-digit datasets for tests."""

import torch

from diffcr.data import load_mnist5k


def tiny_digits(n: int = 16):
    full = load_mnist5k()
    idx = list(range(0, 5000, 5000 // n))[:n]
    return full.subset(torch.tensor(idx))
