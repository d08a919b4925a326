"""Kept for imports written before training moved into the `diffcr.train` package; use `diffcr.train`."""

from diffcr.train import *  # noqa: F401,F403
from diffcr.train import __all__  # noqa: F401
