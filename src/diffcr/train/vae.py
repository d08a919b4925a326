"""Train the text-to-image default's tiny `AutoencoderKL` on digit scenes: resumable, deterministic per step.

The loss is L1 reconstruction plus a small KL term (the latent-diffusion recipe without its adversarial and
perceptual terms, which black-and-white strokes do not need). After training, the latents' scaling factor is
set so that scaled latents of training scenes have unit standard deviation, as Stable Diffusion's VAE does.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

KL_WEIGHT = 1e-6


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "vae_checkpoint.safetensors"


def _save(run_dir: Path, vae, optimizer, step: int) -> None:
    from safetensors.torch import save_file

    from diffcr.checkpoint import write_json_atomic

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in vae.state_dict().items()}
    for index, param in enumerate(vae.parameters()):
        state = optimizer.state.get(param)
        if state:
            tensors[f"adam.{index}.exp_avg"] = state["exp_avg"].contiguous()
            tensors[f"adam.{index}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
    tmp = _checkpoint_path(run_dir).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(_checkpoint_path(run_dir))
    write_json_atomic(run_dir / "vae_state.json", {"step": step})


def _load(run_dir: Path, vae, optimizer) -> int:
    from safetensors import safe_open

    path = _checkpoint_path(run_dir)
    with safe_open(str(path), "pt") as handle:
        step = int(handle.metadata()["step"])
        keys = set(handle.keys())
        vae.load_state_dict({k[6:]: handle.get_tensor(k) for k in keys if k.startswith("model.")})
        for index, param in enumerate(vae.parameters()):
            if f"adam.{index}.exp_avg" in keys:
                optimizer.state[param] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": handle.get_tensor(f"adam.{index}.exp_avg"),
                    "exp_avg_sq": handle.get_tensor(f"adam.{index}.exp_avg_sq"),
                }
    return step


def train_scene_vae(
    run_dir: str | Path,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 100,
    progress: bool = True,
    stop_at: int | None = None,
):
    """Train the scene VAE into `run_dir` (checkpoint, metrics.jsonl) and write it to `run_dir/vae`.

    Args:
        stop_at: stop after this step (a checkpoint is written), keeping the learning-rate schedule of `steps`,
            so that `resume=True` later continues the same run; `run_dir/vae` is written only at `steps`.

    Returns:
        The `AutoencoderKL` (with its `scaling_factor` set when training finished).
    """
    from tqdm.auto import tqdm

    from diffcr.data.scenes import DigitScenes
    from diffcr.models.scene_pipeline import build_scene_vae

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = build_scene_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if resume and _checkpoint_path(run_dir).is_file():
        start = _load(run_dir, vae, optimizer)
        logger.info("resumed the VAE at step %d", start)
    elif _checkpoint_path(run_dir).is_file():
        raise FileExistsError(f"{run_dir} already holds a VAE run: pass resume=True (--resume) or another folder")
    scenes = DigitScenes("train", seed=seed)
    metrics_path = run_dir / "vae_metrics.jsonl"
    if metrics_path.is_file():  # rows past the checkpoint were not kept: they are trained again
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    metrics = open(metrics_path, "a")
    started = time.perf_counter()
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="vae")
    last = steps if stop_at is None else min(stop_at, steps)
    for step in range(start, last):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        indices = torch.randint(10**9, (batch_size,), generator=gen)
        images, _, _, _ = scenes.batch(indices)  # (b, 1, 64, 64)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)  # (b, 4, 16, 16)
        reconstruction = vae.decode(latents).sample  # (b, 1, 64, 64)
        l1 = F.l1_loss(reconstruction, images)
        kl = posterior.kl().mean()
        loss = l1 + KL_WEIGHT * kl
        # cosine decay to a tenth: the last steps polish strokes rather than move them
        progress_frac = step / max(1, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress_frac * torch.pi)).item()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        row = {"step": step + 1, "l1": l1.item(), "kl": kl.item(), "seconds": round(time.perf_counter() - started, 2)}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        bar.update(1)
        bar.set_postfix(l1=f"{l1.item():.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == last:
            _save(run_dir, vae, optimizer, step + 1)
    bar.close()
    metrics.close()
    vae.eval()
    if last < steps:
        return vae
    set_scaling_factor(vae, scenes)
    vae.save_pretrained(run_dir / "vae")
    return vae


@torch.no_grad()
def set_scaling_factor(vae, scenes, num_images: int = 512) -> float:
    """Set `vae.config.scaling_factor` to 1 / std of the latent means of `num_images` scenes."""
    images, _, _, _ = scenes.batch(torch.arange(num_images))
    latents = vae.encode(images).latent_dist.mean  # (n, 4, 16, 16)
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(factor, 5))
    return factor
