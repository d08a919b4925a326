"""`diffcr compress`: fine-tune a base with DiffCR (routers and kept ratios), on accelerate: a class-conditional
DiT on images, or a PixArt pipeline's transformer on a cache made by `diffcr prepare`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command()
@friendly_errors
def compress(
    out: Path = typer.Option(Path("runs/compress"), help="run directory"),
    base: str = typer.Option(
        "default", help="'default' (shipped DiT), a diffusers DiT folder / repo id, or a PixArt pipeline (text)"
    ),
    data: str = typer.Option(
        "mnist5k", help="'mnist5k' (bundled), an image folder with one subfolder per class, or a `prepare` cache"
    ),
    mode: str = typer.Option("full", help="what trains: routers (routers+ratios), lora, full"),
    target: float = typer.Option(0.55, help="target mean kept ratio (0.55 = 45 % compression)"),
    regions: int = typer.Option(4, help="timestep regions R (1 = DiffCR-L)"),
    gate: str = typer.Option("straight_through", help="straight_through, sigmoid_block or sigmoid_mlp"),
    ratio_loss_weight: float = typer.Option(0.3, "--lambda", help="weight of the ratio loss"),
    config: Path = typer.Option(None, help="a DiffCRConfig JSON (overrides target/regions/gate/lambda)"),
    steps: int = typer.Option(120),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-4, help="base (or LoRA) learning rate"),
    router_lr: float = typer.Option(1e-3),
    ratio_lr: float = typer.Option(1e-2),
    weight_decay: float = typer.Option(0.0, help="for base and routers; kept ratios are never decayed"),
    lora_rank: int = typer.Option(32),
    distill: bool = typer.Option(False, help="match the frozen dense model instead of the data's noise"),
    drop_prob: float = typer.Option(0.1, help="probability of dropping the class label / caption (for guidance)"),
    gradient_checkpointing: bool = typer.Option(False, help="recompute blocks in the backward pass: less memory"),
    minutes: float = typer.Option(None, help="stop after this many minutes"),
    checkpoint_every: int = typer.Option(50),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="continue the run in --out from its latest checkpoint"),
    mixed_precision: str = typer.Option("auto"),
) -> None:
    """Compress a DiT with DiffCR; writes OUT/artifact (and OUT/model for lora / full)."""
    import torch

    import diffcr
    from diffcr.checkpoint import run_lock
    from diffcr.cli.common import check_new_run_dir
    from diffcr.models.tiny_dit import SCHEDULER_CONFIG
    from diffcr.train import (
        TrainConfig,
        check_diffcr_config,
        check_mixed_precision,
        finish_compression,
        is_main_process,
        train,
    )

    # 1. every option is checked before anything is loaded or written
    if config is not None:
        diffcr_config = read_diffcr_config(config)
    else:
        diffcr_config = diffcr.DiffCRConfig(
            target_kept_ratio=target, timestep_regions=regions, gate=gate, ratio_loss_weight=ratio_loss_weight
        )
    text = is_prepared_cache(data)
    from diffcr.data.latent_cache import is_text_to_image_pipeline

    if not text and is_text_to_image_pipeline(base):
        raise ValueError(
            f"--base {base} is a text-to-image pipeline, so --data must be a cache made by `diffcr prepare --base "
            f"{base} --data IMAGES --out CACHE` ({data} is not one)"
        )
    if not text:  # train() uses the recipe's DDPM scheduler; check the config against it before loading anything
        check_diffcr_config(diffcr_config, SCHEDULER_CONFIG["num_train_timesteps"])
    cfg = TrainConfig(
        mode=mode,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        router_lr=router_lr,
        ratio_lr=ratio_lr,
        weight_decay=weight_decay,
        lora_rank=lora_rank,
        distill=distill,
        label_drop_prob=drop_prob,
        gradient_checkpointing=gradient_checkpointing,
        max_minutes=minutes,
        checkpoint_every=checkpoint_every,
        seed=seed,
        mixed_precision=mixed_precision,
    )
    if cfg.mode == "pretrain":
        raise ValueError("compress trains DiffCR: use --mode routers, lora or full (pretraining is `diffcr pretrain`)")
    check_mixed_precision(cfg.mixed_precision)
    check_new_run_dir(out, resume)

    # 2. the base model, then the data at its image size and with the images' own channels (checked against it)
    if text:
        model, train_set, scheduler = load_text_to_image(base, data)
        check_diffcr_config(diffcr_config, scheduler.config.num_train_timesteps)
    else:
        (model, train_set), scheduler = load_class_conditional(base, data), None

    # 3. train and write, holding the run folder against a second run into the same --out
    torch.manual_seed(seed)
    main = is_main_process()
    with run_lock(out) if main else contextlib.nullcontext():
        result = train(
            out,
            model,
            train_set,
            cfg,
            diffcr_config=diffcr_config,
            scheduler=scheduler,
            resume=resume,
            run_info={"base": base, "data": data},
        )
        written = finish_compression(result.model, out, mode)
    if not main:
        return
    typer.echo(str(diffcr.schedule(result.model)))
    typer.echo(
        f"compressed in {result.steps_done} steps ({result.seconds / 60:.1f} min); "
        + ", ".join(f"{k}: {v}" for k, v in written.items())
    )


def load_class_conditional(base: str, data: str):
    """(The base DiT, the images at its size with their own channels), checked against each other."""
    from diffcr.cli.common import check_base_data_fit
    from diffcr.data import load_dataset
    from diffcr.models import load_base_model

    model = load_base_model(base)
    folder = data not in (None, "mnist5k")
    train_set, _ = load_dataset(
        data, image_size=model.config.sample_size if folder else 32, channels=None if folder else 1
    )
    check_base_data_fit(model, train_set, data)
    return model, train_set


def is_prepared_cache(data: str) -> bool:
    from diffcr.data.latent_cache import MANIFEST

    return (Path(data) / MANIFEST).is_file()


def load_text_to_image(base: str, data: str):
    """(The pipeline's transformer, TextConditioning over the cache, the scheduler that defines its noising)."""
    from diffusers import DDPMScheduler

    from diffcr.data.latent_cache import LatentCaptionDataset, load_text_to_image_pipeline
    from diffcr.train.conditioning import TextConditioning

    cache = LatentCaptionDataset(data)
    pipe = load_text_to_image_pipeline(base)
    cache.check_pipeline(pipe, base)
    transformer = pipe.transformer
    # the forward process the pipeline's sampler inverts: flow matching as it is (SD3), else the same betas and
    # prediction type as a DDPM schedule (PixArt)
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        scheduler = pipe.scheduler
    else:
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    conditioning = TextConditioning(
        cache,
        use_additional_conditions=bool(transformer.config.get("use_additional_conditions")),
        # Flux's transformer takes sigma in [0, 1] (its pipeline divides by 1000)
        timestep_divisor=scheduler.config.num_train_timesteps if type(pipe).__name__ == "FluxPipeline" else 1.0,
    )
    return transformer, conditioning, scheduler


def read_diffcr_config(path: Path):
    """The `DiffCRConfig` in a JSON file, with errors that name the file."""
    import json

    import diffcr

    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"--config {path} {what}; pass a DiffCRConfig JSON file, e.g. configs/*.json")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not valid JSON ({err}); pass a DiffCRConfig JSON file") from err
    if not isinstance(payload, dict):
        raise ValueError(f"--config {path} holds a JSON {type(payload).__name__}, not an object of DiffCRConfig keys")
    try:
        return diffcr.DiffCRConfig.from_dict(payload)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--config {path}: {err}") from err
