"""Datasets: the bundled MNIST-5k digits and user image folders."""

from diffcr.data.folder import load_image_folder
from diffcr.data.mnist import load_dataset, load_mnist5k, split_train_heldout

__all__ = ["load_dataset", "load_image_folder", "load_mnist5k", "split_train_heldout"]
