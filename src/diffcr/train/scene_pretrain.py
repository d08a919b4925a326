"""Pretrain the text-to-image default from scratch: the scene VAE first, then the PixArt transformer on its
latents with all-MiniLM-L6-v2 captions. Both stages resume from their checkpoints; `out/pipeline` is the
result, in `PixArtSigmaPipeline.save_pretrained`'s layout without the text encoder (the package provides it)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def pretrain_scene_pipeline(
    out: str | Path,
    steps: int = 3000,
    vae_steps: int = 900,
    batch_size: int = 32,
    lr: float = 6e-4,
    warmup_steps: int = 200,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 100,
    max_minutes: float | None = None,
    progress: bool = True,
    snr_gamma: float | None = None,
    snr_weighting: str = "min",
    transformer_overrides: dict | None = None,
) -> Path:
    """Train the scene VAE (`out/vae_run`) and then the transformer (`out/transformer_run`); export both to
    `out/pipeline`. Returns that folder.

    `transformer_overrides` change the transformer's config (`models.scene_pipeline.TRANSFORMER_CONFIG`), e.g.
    {"num_layers": 12, "num_attention_heads": 6, "cross_attention_dim": 192} for a deeper and wider one; a resumed
    run must pass the ones it started with (the loop refuses another architecture).
    """
    from diffusers import AutoencoderKL

    from diffcr.data.scenes import DigitScenes
    from diffcr.models.scene_pipeline import (
        build_scene_scheduler,
        build_scene_transformer,
        load_text_encoder,
        write_model_index,
    )
    from diffcr.models.tiny_dit import build_scheduler
    from diffcr.train.config import TrainConfig
    from diffcr.train.loop import train
    from diffcr.train.scene_conditioning import SceneConditioning
    from diffcr.train.vae import train_scene_vae

    out = Path(out)
    vae_dir = out / "vae_run" / "vae"
    if not (vae_dir / "config.json").is_file():
        train_scene_vae(
            out / "vae_run", steps=vae_steps, batch_size=batch_size, seed=seed, resume=resume, progress=progress
        )
    vae = AutoencoderKL.from_pretrained(vae_dir)
    tokenizer, text_encoder = load_text_encoder()
    conditioning = SceneConditioning(DigitScenes("train", seed=seed), vae, tokenizer, text_encoder)
    torch.manual_seed(seed)
    cfg = TrainConfig(
        mode="pretrain",
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every,
        seed=seed,
        max_minutes=max_minutes,
        mixed_precision="no",
        snr_gamma=snr_gamma,
        snr_weighting=snr_weighting,
    )
    run_dir = out / "transformer_run"
    resume_transformer = resume and run_dir.is_dir() and any(run_dir.glob("checkpoint-*"))
    result = train(
        run_dir,
        build_scene_transformer(**(transformer_overrides or {})),
        conditioning,
        cfg,
        scheduler=build_scheduler("ddpm"),
        resume=resume_transformer,
        progress=progress,
        run_info={"task": "t2i", "vae_steps": vae_steps},
    )
    pipeline_dir = out / "pipeline"
    result.model.eval().save_pretrained(pipeline_dir / "transformer")
    vae.save_pretrained(pipeline_dir / "vae")
    build_scene_scheduler().save_pretrained(pipeline_dir / "scheduler")
    write_model_index(pipeline_dir)
    logger.info("pretrained pipeline written to %s after %d steps", pipeline_dir, result.steps_done)
    return pipeline_dir
