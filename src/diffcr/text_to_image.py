"""Text-to-image sampling through the user's own diffusers PixArt pipeline, with DiffCR applied to
`pipe.transformer` (or dense), deterministic per image whatever the batch size or process count.

Image i of a run (prompts in order, `num_per_prompt` images each) starts from the noise of its own generator
seeded `seed + i`, which is what the plain pipeline does when called with that generator: with
`artifact="none"` the images are those of `pipe(prompt, generator=torch.Generator().manual_seed(seed + i))`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSampleConfig:
    """How to sample a list of prompts.

    Args:
        steps: sampler steps (the pipeline's own scheduler).
        guidance_scale: classifier-free guidance (1.0 = none); PixArt's default is 4.5.
        negative_prompt: the unconditional text for CFG.
        num_per_prompt: images per prompt.
        seed: image i uses `seed + i`.
        height, width: pixels; None = the transformer's native size.
        batch_size: images per pipeline call. 1 (the default) gives exactly the plain pipeline's images for each
            seed; a larger batch can differ by one level in rare pixels (batched kernels sum in another order).
    """

    steps: int = 20
    guidance_scale: float = 4.5
    negative_prompt: str = ""
    num_per_prompt: int = 1
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        # the highest values stop typos (10**8) before a run that would never end
        limits = {"steps": 1000, "num_per_prompt": 10_000, "batch_size": 4096}
        for name, high in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name}={value!r} must be an integer in [1, {high}]")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be a finite number (PixArt uses 4.5)")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 0 (1.0 = no guidance)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63 - 2**32:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63 - 2**32)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8):
                raise ValueError(f"{name}={value!r} must be an integer >= 8 pixels (or None: the native size)")


def load_pipeline(base: str | Path, artifact: str | Path | None = None, **kwargs):
    """The PixArt pipeline at `base`, with a DiffCR artifact applied to its transformer.

    Args:
        base: a diffusers PixArt-Sigma / PixArt-Alpha pipeline folder or repo id.
        artifact: None / "none" for the dense pipeline; a compress run's `artifact/` (routers and ratios on the
            pipeline's own transformer, plus the run's LoRA or fine-tuned weights: `diffcr.fine_tuning`), any
            `diffcr.save` folder, or a routed model's `save_pretrained` folder such as a run's `model/` (a
            fine-tuned transformer with its artifact: it replaces the pipeline's transformer).
        **kwargs: for `load_text_to_image_pipeline`: `transformer` and `transformer_subfolder` (a transformer
            from elsewhere, e.g. PixArt-Sigma 512 px), `torch_dtype`, ...
    """
    import diffcr
    from diffcr.caption_attention import use_short_caption_attention
    from diffcr.data.latent_cache import load_text_to_image_pipeline

    pipe = load_text_to_image_pipeline(base, **kwargs)
    if artifact is None or str(artifact) == "none":
        return pipe
    if str(artifact) == "default":
        from diffcr.data.latent_cache import SHIPPED_TEXT_TO_IMAGE
        from diffcr.models.scene_pipeline import ARTIFACT_DIR

        if str(base) != SHIPPED_TEXT_TO_IMAGE:
            raise ValueError(
                f"--artifact default is the shipped text-to-image default's artifact (--base t2i), not {base}'s: "
                "pass --artifact DIR (a compress run's artifact/ or model/ folder) or --artifact none"
            )
        artifact = ARTIFACT_DIR
    folder = Path(artifact)
    if not folder.is_dir():
        raise FileNotFoundError(f"no DiffCR artifact folder at {folder}; pass --artifact DIR or none")
    if (folder / "config.json").is_file():
        transformer = diffcr.from_pretrained(folder, torch_dtype=pipe.transformer.dtype)
        check_same_architecture(transformer, pipe.transformer, folder)
        pipe.transformer = transformer.to(pipe.transformer.device)
        # the same attention kernels as the pipeline's own transformer, so that dense and routed compare fairly
        use_short_caption_attention(pipe.transformer)
    else:
        diffcr.load(pipe.transformer, folder)
    pipe.transformer.eval()
    return pipe


def pipeline_options(pipe) -> dict:
    """Call options a pipeline kind needs: PixArt's resolution binning would snap sizes to its trained aspect
    ratios (off, so that any size is what was asked), and its caption cleaning needs extra packages."""
    if type(pipe).__name__.startswith("PixArt"):
        options = {"use_resolution_binning": False, "clean_caption": False}
        if type(pipe.text_encoder).__name__ == "BertModel":
            # the default's MiniLM encoder: its captions fit in 24 tokens; PixArt's 300 would only add padding
            from diffcr.models.scene_pipeline import MAX_SEQUENCE_LENGTH

            options["max_sequence_length"] = MAX_SEQUENCE_LENGTH
        return options
    return {}


def check_same_architecture(transformer, pipeline_transformer, folder) -> None:
    """Refuse a fine-tuned transformer that is not the pipeline's own architecture (it would sample nonsense)."""
    ours = {k: v for k, v in pipeline_transformer.config.items() if not k.startswith("_")}
    theirs = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(
            f"the transformer in {folder} is not this pipeline's: it differs in {differ[:6]}; pass the artifact of "
            "a run on this pipeline"
        )


def image_seeds(num_prompts: int, cfg: PromptSampleConfig) -> list[tuple[int, int]]:
    """(prompt index, seed) of every image, in output order."""
    return [(p, cfg.seed + p * cfg.num_per_prompt + j) for p in range(num_prompts) for j in range(cfg.num_per_prompt)]


def sample_prompts(pipe, prompts: list[str], cfg: PromptSampleConfig, indices=None, progress: bool = False):
    """Images for `prompts` as uint8 (n, H, W, 3), image i from the generator seeded `cfg.seed + i`.

    Args:
        indices: which images of the run to make (default all); a process of a sharded run makes its share.
    """
    from tqdm.auto import tqdm

    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("give at least one prompt, and no empty prompt (use --negative-prompt for the CFG text)")
    plan = image_seeds(len(prompts), cfg)
    indices = list(range(len(plan))) if indices is None else list(indices)
    from diffcr.data.latent_cache import default_resolution, size_multiple

    height = cfg.height or default_resolution(pipe)
    width = cfg.width or default_resolution(pipe)
    multiple = size_multiple(pipe)
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} (VAE factor x patch), got {height}x{width}")
    images = []
    for start in tqdm(range(0, len(indices), cfg.batch_size), disable=not progress, desc="sampling"):
        chunk = indices[start : start + cfg.batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(plan[i][1]) for i in chunk]
        out = pipe(
            prompt=[prompts[plan[i][0]] for i in chunk],
            negative_prompt=cfg.negative_prompt,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=height,
            width=width,
            generator=generators,
            output_type="np",
            **pipeline_options(pipe),
        ).images  # (b, H, W, 3) floats in [0, 1]; (b, H, W, 1) from a grayscale VAE
        if out.shape[-1] == 1:  # every image of a run has three channels, whatever the VAE
            out = np.repeat(out, 3, axis=-1)
        images.append(to_uint8(out))
    if not images:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.concatenate(images)


def to_uint8(images) -> np.ndarray:
    """Pipeline output in [0, 1] as uint8, the way diffusers' `numpy_to_pil` rounds."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def save_images(folder: str | Path, images: np.ndarray, prompts: list[str], cfg: PromptSampleConfig) -> list[Path]:
    """One PNG per image, named by prompt index and seed (those of an earlier run in the folder are replaced)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("[0-9][0-9][0-9][0-9]-seed*.png"):
        stale.unlink()
    paths = []
    for image, (prompt_idx, seed) in zip(images, image_seeds(len(prompts), cfg)):
        path = folder / f"{prompt_idx:04d}-seed{seed}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def save_npz(path: str | Path, images: np.ndarray, prompts: list[str], cfg: PromptSampleConfig) -> Path:
    """`arr_0` uint8 (n, H, W, 3) and the `prompts` of the images in the same order."""
    per_image = [prompts[p] for p, _ in image_seeds(len(prompts), cfg)]
    path = Path(path)
    np.savez(path, images, prompts=np.asarray(per_image))
    return path


def read_prompts(prompt: str | None, prompts_file: str | Path | None) -> list[str]:
    """`--prompt TEXT` or `--prompts FILE` (one prompt a line; blank lines and `#` comments skipped)."""
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts FILE")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty")
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"--prompts {path} {what}; pass a text file, one prompt a line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts
