"""The embedded default: a tiny class-conditional DiT on 32x32 digits, and the classifier that judges it."""

from diffcr.models.tiny_dit import (
    BASE_MODEL_CONFIG,
    SHIPPED_ARTIFACT_DIR,
    SHIPPED_BASE_DIR,
    build_base_model,
    build_scheduler,
    load_base_model,
    null_class_id,
)

__all__ = [
    "BASE_MODEL_CONFIG",
    "SHIPPED_ARTIFACT_DIR",
    "SHIPPED_BASE_DIR",
    "build_base_model",
    "build_scheduler",
    "load_base_model",
    "null_class_id",
]
