"""Recipe of the shipped base model: a class-conditional diffusers `DiTTransformer2DModel` in pixel space.

1x32x32 images, patch 2 (256 image tokens), 8 blocks of width 128 (4 heads x 32), adaLN-Zero, 10 classes plus
the null class used for classifier-free guidance: 3.8M parameters. It is trained by `diffcr pretrain`; the
trained weights ship in `diffcr/models/base/` as an ordinary diffusers folder, so the loading path is the
same `from_pretrained` users call on hub weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

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


DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # the second: older diffusers DiT folders
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
EXPECTED_FOLDER = (
    f"a diffusers DiTTransformer2DModel folder (config.json + {WEIGHTS_NAME}), e.g. the model/ folder "
    "`diffcr pretrain` writes"
)
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_base_folder(folder: Path) -> None:
    """Refuse a local folder that is not a class-conditional diffusers DiT with safetensors weights.

    Raises:
        ValueError: the folder, its config.json or its weights are not what `load_base_model` reads; the message
            names the folder and what was expected.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"base model folder {str(folder)!r} has no config.json; expected {EXPECTED_FOLDER}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); expected {EXPECTED_FOLDER}") from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_file} holds a {type(config).__name__}, not a JSON object; expected {EXPECTED_FOLDER}"
        )
    class_name = config.get("_class_name")
    if class_name is not None and class_name not in DIT_CLASS_NAMES:
        raise ValueError(
            f"base model folder {str(folder)!r} holds a {class_name}, not a DiT; expected {EXPECTED_FOLDER}"
        )
    if not isinstance(config.get("num_embeds_ada_norm"), int) or isinstance(config.get("num_embeds_ada_norm"), bool):
        raise ValueError(
            f"{config_file} has no integer num_embeds_ada_norm (got {config.get('num_embeds_ada_norm')!r}): diffcr "
            "needs a class-conditional DiT, whose config gives its number of classes there"
        )
    if not (folder / WEIGHTS_NAME).is_file() and not (folder / f"{WEIGHTS_NAME}.index.json").is_file():
        pickled = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.bin"))
        if pickled:
            raise ValueError(
                f"base model folder {str(folder)!r} holds only pickled weights ({', '.join(pickled)}); diffcr reads "
                f"only safetensors, because unpickling can run code. Convert it once, in a trusted environment: "
                f"DiTTransformer2DModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
            )
        raise ValueError(
            f"base model folder {str(folder)!r} has no weights ({WEIGHTS_NAME}); expected {EXPECTED_FOLDER}"
        )


def load_base_model(path: str | Path | None = None):
    """Load a base DiT with diffusers `from_pretrained` (a local folder or a hub repo id).

    Only safetensors weights are read. The folder is checked first, so that a wrong folder gives a message
    that names it instead of a traceback from deep inside diffusers.

    Args:
        path: None or "default" for the shipped model, else a folder / repo id holding a DiT transformer
            (either at its root or in a `transformer` subfolder).

    Raises:
        FileNotFoundError: the shipped model is missing (a source checkout that has not pretrained yet), or
            `path` is neither an existing folder nor a hub repo id.
        ValueError: the folder is not a class-conditional DiT with safetensors weights, its weights cannot be
            loaded, or they hold NaN / infinite values.

    Example:
        >>> model = load_base_model()  # the shipped base  # doctest: +SKIP
    """
    from diffusers import DiTTransformer2DModel

    if path is None or str(path) == "default":
        if not (SHIPPED_BASE_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"no shipped base model at {SHIPPED_BASE_DIR}; run `diffcr pretrain` or pass --base DIR"
            )
        path = SHIPPED_BASE_DIR
    local = Path(path)
    subfolder = None
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"base model {str(path)!r} is a file, not a folder; expected {EXPECTED_FOLDER}")
        if not (local / "config.json").is_file() and (local / "transformer").is_dir():
            subfolder = "transformer"  # a pipeline folder: its DiT lives in transformer/
        check_base_folder(local / subfolder if subfolder else local)
    elif not REPO_ID.fullmatch(str(path)):
        raise FileNotFoundError(
            f"base model folder {str(path)!r} does not exist (and is not a hub repo id like 'owner/name'); "
            f"pass {EXPECTED_FOLDER}, or 'default' for the shipped model"
        )
    try:
        model = DiTTransformer2DModel.from_pretrained(str(path), subfolder=subfolder, use_safetensors=True)
    except Exception as err:  # diffusers and huggingface_hub raise many types; the input is what is wrong
        where = (
            f"folder {str(path)!r}"
            if local.exists()
            else f"{str(path)!r}: there is no such local folder, and no hub repo of that id could be read"
        )
        raise ValueError(
            f"cannot load the base model from {where}: {type(err).__name__}: {str(err)[:500]}; "
            f"expected {EXPECTED_FOLDER}"
        ) from err
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise ValueError(
            f"the base model {str(path)!r} has NaN or infinite weights ({bad[:4]}); use a sound checkpoint"
        )
    return model
