"""Class-conditional sampling with diffusers schedulers, classifier-free guidance and per-sample seeds.

Sample i starts from noise drawn with its own seed (`seed + i`), so the same seeds give the same images
whatever the batch size or the number of processes: under `accelerate launch` each process generates its
shard of the indices and the main process puts them back in order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "dpm")
SEED_LIMIT = 2**32
MAX_SAMPLE_BATCH = 65_536
MAX_GUIDANCE_SCALE = 100.0


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: `scheduler` "ddim" or "dpm" (DPM-Solver++), `steps`, CFG `guidance_scale`
    (1.0 = no guidance), `batch_size` per forward (before the CFG doubling), base `seed`."""

    scheduler: str = "ddim"
    steps: int = 20
    guidance_scale: float = 3.0
    batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        from diffcr.models.tiny_dit import SCHEDULER_CONFIG

        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r}; choose one of {SCHEDULERS}")
        max_steps = SCHEDULER_CONFIG["num_train_timesteps"]
        limits = {
            "steps": (1, max_steps, f"a sampler cannot take more steps than the {max_steps} training timesteps"),
            "batch_size": (1, MAX_SAMPLE_BATCH, "images per forward pass"),
            "seed": (0, SEED_LIMIT - 1, "seeds are 32-bit"),
        }
        for name, (low, high, why) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} must be a whole number in [{low}, {high}]")
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is outside [{low}, {high}] ({why}); choose a value in that range")
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"guidance_scale={scale!r} must be a finite number in [1, {MAX_GUIDANCE_SCALE:g}]")
        if not 1.0 <= scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"guidance_scale={scale} must be in [1, {MAX_GUIDANCE_SCALE:g}] (1.0 = no guidance; usual values 1.5 "
                f"to 10): below 1 it steers away from the class, far above {MAX_GUIDANCE_SCALE:g} the images saturate"
            )


def initial_noise(indices: list[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(len(indices), *shape) noise; row j depends only on seed + indices[j]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices]
    return torch.stack(rows)


def model_image_shape(model) -> tuple[int, int, int]:
    config = model.config
    return (config.in_channels, config.sample_size, config.sample_size)


@torch.no_grad()
def denoise(
    model, noise: torch.Tensor, labels: torch.Tensor, cfg: SampleConfig, null_class: int, step_callback=None
) -> torch.Tensor:
    """Run the sampler from `noise` (B, C, H, W) for class `labels` (B,). Returns images in [-1, 1].

    `step_callback(step_idx, timestep)` is called before each model evaluation (used for router maps).
    """
    from diffcr.models.tiny_dit import build_scheduler

    scheduler = build_scheduler(cfg.scheduler)
    scheduler.set_timesteps(cfg.steps)
    device = next(model.parameters()).device
    sample = noise.to(device) * scheduler.init_noise_sigma
    labels = labels.to(device)
    guided = cfg.guidance_scale != 1.0
    model_labels = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
    for step_idx, timestep in enumerate(scheduler.timesteps):
        if step_callback is not None:
            step_callback(step_idx, int(timestep))
        model_input = torch.cat([sample, sample]) if guided else sample  # (2B or B, C, H, W)
        model_input = scheduler.scale_model_input(model_input, timestep)
        timesteps = torch.full((model_input.shape[0],), int(timestep), device=device, dtype=torch.long)
        out = model(model_input, timestep=timesteps, class_labels=model_labels).sample
        prediction = out[:, : sample.shape[1]]  # drop learned-sigma channels, if any
        if guided:
            cond, uncond = prediction.chunk(2)
            prediction = uncond + cfg.guidance_scale * (cond - uncond)
        sample = scheduler.step(prediction, timestep, sample).prev_sample
    return sample.clamp(-1, 1).float().cpu()


def sample_images(
    model,
    labels: torch.Tensor,
    cfg: SampleConfig,
    null_class: int,
    indices: list[int] | None = None,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Sample one image per label; image j uses seed `cfg.seed + indices[j]` (default indices 0..n-1).

    Returns:
        (n, C, H, W) float images in [-1, 1].
    """
    from tqdm.auto import tqdm

    indices = list(range(len(labels))) if indices is None else list(indices)
    shape = model_image_shape(model)
    chunks = []
    was_training = model.training
    model.eval()
    with tqdm(total=len(indices), desc=desc, disable=not progress, unit="img") as bar:
        for start in range(0, len(indices), cfg.batch_size):
            batch_idx = indices[start : start + cfg.batch_size]
            noise = initial_noise(batch_idx, shape, cfg.seed)
            chunks.append(denoise(model, noise, labels[start : start + cfg.batch_size], cfg, null_class))
            bar.update(len(batch_idx))
    model.train(was_training)
    images = torch.cat(chunks) if chunks else torch.empty(0, *shape)
    if not torch.isfinite(images).all():
        raise ValueError(
            "sampling produced NaN or infinite values: the model's weights (or its DiffCR artifact) are not "
            "sound for this sampler; check them, or try --scheduler ddim and a lower --guidance-scale"
        )
    return images


def class_labels(classes: list[int], per_class: int) -> torch.Tensor:
    """Labels in class-major order: per_class images of classes[0], then classes[1], ..."""
    return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)


def interleaved_class_labels(classes: list[int], per_class: int) -> torch.Tensor:
    """Labels in round-robin order (classes[0], classes[1], ..., classes[0], ...), so that any run of
    consecutive samples, such as a sampling batch, mixes the classes."""
    return torch.tensor(list(classes) * per_class, dtype=torch.long)


def parse_classes(text: str, num_classes: int) -> list[int]:
    """ "0-9" or "1,3,5" or "7" -> list of class ids; raises ValueError naming the bad part."""
    classes: list[int] = []
    usage = "use e.g. '0-9' or '1,3,5'"
    if not str(text).strip():
        raise ValueError(f"classes is empty: {usage} (ids 0..{num_classes - 1})")
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part.lstrip("-"):
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError(
                        f"classes {text!r}: the range {part!r} is empty; write it low-high, e.g. '{hi}-{lo}'"
                    )
                if hi - lo >= num_classes:
                    raise ValueError(f"classes {text!r}: the range {part!r} is outside 0..{num_classes - 1}")
                classes.extend(range(lo, hi + 1))
            else:
                classes.append(int(part))
        except ValueError as err:
            if str(err).startswith("classes "):
                raise
            raise ValueError(f"cannot read classes {text!r} at {part!r}: {usage}") from err
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside 0..{num_classes - 1}; {usage}")
    return classes


def sample_sharded(
    model, labels: torch.Tensor, cfg: SampleConfig, null_class: int, accelerator=None, progress: bool = False
) -> torch.Tensor | None:
    """Sample all `labels` across the processes of `accelerator` (each takes every world-th index).

    Returns the full (n, C, H, W) set, in index order, on the main process; None on the others.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return sample_images(model, labels, cfg, null_class, progress=progress)
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(labels), world))
    images = sample_images(
        model, labels[mine], cfg, null_class, indices=mine, progress=progress and accelerator.is_main_process
    )
    gathered = gather_object([(i, images[j].numpy()) for j, i in enumerate(mine)])
    if not accelerator.is_main_process:
        return None
    ordered = sorted(gathered, key=lambda pair: pair[0])
    return torch.from_numpy(np.stack([array for _, array in ordered]))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> (n, H, W, C) uint8, the layout FID evaluators read."""
    scaled = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


def save_npz(path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write `arr_0` (n, H, W, C) uint8 and `labels` (n,), atomically."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, arr_0=to_uint8(images), labels=labels.numpy())
    os.replace(tmp, path)


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> one uint8 (rows*H, columns*W, C) grid with 2-pixel gaps."""
    return array_grid(to_uint8(images), columns)


def array_grid(arrays: np.ndarray, columns: int) -> np.ndarray:
    """(n, H, W, C) uint8 -> one uint8 grid, `columns` images a row, with 2-pixel white gaps."""
    n, height, width, channels = arrays.shape
    rows = -(-n // columns)
    gap = 2
    grid = np.full((rows * (height + gap) + gap, columns * (width + gap) + gap, channels), 255, np.uint8)
    for i, array in enumerate(arrays):
        r, c = divmod(i, columns)
        top, left = gap + r * (height + gap), gap + c * (width + gap)
        grid[top : top + height, left : left + width] = array
    return grid


def save_png(path, grid: np.ndarray) -> None:
    """Write the grid atomically (a temporary file renamed into place), in the format of `path`'s suffix."""
    import os
    from pathlib import Path

    from PIL import Image

    path = Path(path)
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=image_format(path))
    os.replace(tmp, path)


def image_format(path) -> str:
    """The PIL format that writes `path` (by its suffix); raises ValueError naming the suffixes that work."""
    from pathlib import Path

    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(
            f"cannot write an image to {str(path)!r}: unknown suffix {suffix!r}; use .png (or .jpg, .webp)"
        )
    return fmt
