"""Recipe of the shipped base model: a class-conditional diffusers `DiTTransformer2DModel` in pixel space.

1x32x32 images, patch 2 (256 image tokens), 8 blocks of width 128 (4 heads x 32), adaLN-Zero, 10 classes plus
the null class used for classifier-free guidance: 3.8M parameters. It is trained by `diffcr pretrain`; the
trained weights ship in `diffcr/models/base/` as an ordinary diffusers folder, so the loading path is the
same `from_pretrained` users call on hub weights.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_MODELS_DIR = Path(__file__).parent
SHIPPED_BASE_DIR = PACKAGE_MODELS_DIR / "base"
SHIPPED_ARTIFACT_DIR = PACKAGE_MODELS_DIR / "artifact"
SHIPPED_CLASSIFIER_DIR = PACKAGE_MODELS_DIR / "classifier"

BASE_MODEL_CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
}

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def build_base_model(**overrides):
    """A freshly initialised base DiT (random weights); `overrides` change `BASE_MODEL_CONFIG` entries.

    Example:
        >>> model = build_base_model(num_layers=2)
        >>> len(model.transformer_blocks)
        2
    """
    from diffusers import DiTTransformer2DModel

    config = {**BASE_MODEL_CONFIG, **overrides}
    return DiTTransformer2DModel(**config)


def build_scheduler(name: str = "ddpm", **overrides):
    """The diffusers noise scheduler for the base model: "ddpm" (training), "ddim" or "dpm" (sampling).

    DPM-Solver uses `timestep_spacing="leading"`: with the default spacing it diverged on this model.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = {**SCHEDULER_CONFIG, **overrides}
    if name == "ddpm":
        return DDPMScheduler(**config)
    if name == "ddim":
        return DDIMScheduler(**config, set_alpha_to_one=False)
    if name == "dpm":
        config.pop("clip_sample")
        return DPMSolverMultistepScheduler(**config, timestep_spacing="leading")
    raise ValueError(f"unknown scheduler {name!r}; choose one of: ddpm, ddim, dpm")


def null_class_id(model) -> int:
    """Class id that means "no class" (classifier-free guidance): diffusers uses `num_embeds_ada_norm`."""
    return int(model.config.num_embeds_ada_norm)


def load_base_model(path: str | Path | None = None):
    """Load a base DiT with diffusers `from_pretrained` (a local folder or a hub repo id).

    Args:
        path: None or "default" for the shipped model, else a folder / repo id holding a DiT transformer
            (either at its root or in a `transformer` subfolder).

    Raises:
        FileNotFoundError: the shipped model is missing (a source checkout that has not pretrained yet).
    """
    from diffusers import DiTTransformer2DModel

    if path is None or str(path) == "default":
        if not (SHIPPED_BASE_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"no shipped base model at {SHIPPED_BASE_DIR}; run `diffcr pretrain` or pass --base DIR"
            )
        path = SHIPPED_BASE_DIR
    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file() and (local / "transformer").is_dir():
        return DiTTransformer2DModel.from_pretrained(str(local), subfolder="transformer")
    return DiTTransformer2DModel.from_pretrained(str(path))
