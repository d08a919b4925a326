"""`diffcr compress`: fine-tune a base with DiffCR (routers and kept ratios), on accelerate: a class-conditional
DiT on images, or a PixArt pipeline's transformer on a cache made by `diffcr prepare`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import TRANSFORMER_HELP, TRANSFORMER_SUBFOLDER_HELP, friendly_errors

ROUTER_LR_HELP = (
    "the routers' learning rate; for runs past a few hundred steps try 1e-4: at 1e-3 the routers grew and training "
    "diverged after about 300 steps on the text-to-image default (docs/RESULTS.md)"
)

FREEZE_SCHEDULE_HELP = (
    "after this many steps the kept ratios snap to their bins and stay; the weights and routers go on training at "
    "that schedule with one pass per block instead of two (about half the step's cost); 0 = never"
)


@app.command()
@friendly_errors
def compress(
    ctx: typer.Context,
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
    route_cross_attention: bool = typer.Option(
        True,
        help="--no-route-cross-attention: tokens a block bypasses still get its cross-attention update (PixArt "
        "only; a diffcr option beyond the paper, docs/METHOD.md section 1)",
    ),
    region_targets: str = typer.Option(
        None,
        help="a kept-ratio target per timestep region, cleanest first, comma-separated (e.g. 0.45,1,0.3,0.15; a "
        "diffcr extension, docs/METHOD.md section 3); --target defaults to their mean",
    ),
    config: Path = typer.Option(
        None, help="a DiffCRConfig JSON (overrides target/regions/gate/lambda/route-cross-attention/region-targets)"
    ),
    recipe: Path = typer.Option(
        None,
        help="a training recipe JSON (DiffCR and training settings, e.g. configs/recipes/*.json); flags given "
        "on the command line override its values",
    ),
    steps: int = typer.Option(120),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-4, help="base (or LoRA) learning rate"),
    router_lr: float = typer.Option(1e-3, help=ROUTER_LR_HELP),
    ratio_lr: float = typer.Option(1e-2),
    weight_decay: float = typer.Option(0.0, help="for base and routers; kept ratios are never decayed"),
    grad_clip: float = typer.Option(1.0, help="clip the gradient norm to this (0 = no clipping; the authors: 0.01)"),
    warmup_steps: int = typer.Option(0, help="linear learning-rate warm-up over this many steps"),
    lora_rank: int = typer.Option(32),
    distill: bool = typer.Option(False, help="match the frozen dense model instead of the data's noise"),
    freeze_schedule_at: int = typer.Option(0, help=FREEZE_SCHEDULE_HELP),
    drop_prob: float = typer.Option(0.1, help="probability of dropping the class label / caption (for guidance)"),
    gradient_checkpointing: bool = typer.Option(False, help="recompute blocks in the backward pass: less memory"),
    minutes: float = typer.Option(None, help="stop after this many minutes"),
    checkpoint_every: int = typer.Option(50),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="continue the run in --out from its latest checkpoint"),
    mixed_precision: str = typer.Option(
        "auto",
        help="auto (bf16 on a CUDA GPU, none on a CPU), no, bf16 or fp16; with 'no' on a CUDA GPU, matmuls and "
        "convolutions run in TF32 (fp32 range, 10-bit mantissa: several times fp32's speed on A100 and later)",
    ),
    transformer: str = typer.Option(None, help=TRANSFORMER_HELP),
    transformer_subfolder: str = typer.Option("transformer", help=TRANSFORMER_SUBFOLDER_HELP),
) -> None:
    """Compress a DiT with DiffCR; writes OUT/artifact (and OUT/model for lora / full)."""
    import torch

    import diffcr
    from diffcr.api import check_config_fits
    from diffcr.checkpoint import run_lock
    from diffcr.cli.common import check_new_run_dir
    from diffcr.train import (
        TrainConfig,
        check_diffcr_config,
        check_mixed_precision,
        finish_compression,
        is_main_process,
        train,
    )
    from diffcr.train.timesteps import model_timestep_range

    # 1. every option is checked before anything is loaded or written; a recipe sets what no flag was given for
    diffcr_config, settings, from_recipe = _resolve_options(ctx, region_targets, config, recipe)
    text = _check_task(base, data, transformer, diffcr_config)
    cfg = TrainConfig(**settings)
    if cfg.mode == "pretrain":
        raise ValueError("compress trains DiffCR: use --mode routers, lora or full (pretraining is `diffcr pretrain`)")
    check_mixed_precision(cfg.mixed_precision)
    check_new_run_dir(out, resume)
    _allow_tf32_without_autocast(cfg)

    # 2. the base model, then the data at its image size and with the images' own channels (checked against it)
    if text:
        model, train_set, scheduler = load_text_to_image(base, data, transformer, transformer_subfolder)
        timestep_range = model_timestep_range(model, scheduler)  # Flux receives sigma: T = 1
        check_diffcr_config(diffcr_config, timestep_range.num_train_timesteps, timestep_range.continuous)
    else:
        (model, train_set), scheduler = load_class_conditional(base, data), None
    check_config_fits(model, diffcr_config)  # what apply would refuse, refused before the run folder exists

    # 3. train and write, holding the run folder against a second run into the same --out
    torch.manual_seed(cfg.seed)
    main = is_main_process()
    if main and recipe is not None:
        typer.echo(f"recipe {recipe}: " + ", ".join(f"{k}={settings[k]}" for k in from_recipe))
    run_info = {"base": base, "data": data, "transformer": transformer}
    if transformer is not None:
        run_info["transformer_subfolder"] = transformer_subfolder
    with run_lock(out) if main else contextlib.nullcontext():
        result = train(
            out,
            model,
            train_set,
            cfg,
            diffcr_config=diffcr_config,
            scheduler=scheduler,
            resume=resume,
            run_info=run_info,
        )
        written = finish_compression(result.model, out, cfg.mode)
    if not main:
        return
    typer.echo(str(diffcr.schedule(result.model)))
    typer.echo(
        f"compressed in {result.steps_done} steps ({result.seconds / 60:.1f} min); "
        + ", ".join(f"{k}: {v}" for k, v in written.items())
    )


def _resolve_options(ctx: typer.Context, region_targets: str | None, config: Path | None, recipe: Path | None):
    """(DiffCR config, training settings, the settings the recipe set): the flags given over the recipe's values,
    `--region-targets` folded into the DiffCR flags."""
    given = given_options(ctx)
    flags = {TRAIN_FIELD_OF_OPTION[name]: value for name, value in ctx.params.items() if name in TRAIN_FIELD_OF_OPTION}
    diffcr_flags = {DIFFCR_FIELD_OF_OPTION[name]: ctx.params[name] for name in DIFFCR_FIELD_OF_OPTION}
    given = _apply_region_targets(diffcr_flags, region_targets, given, config)
    return resolve_settings(config, recipe, flags, diffcr_flags, given)


def _check_task(base: str, data: str, transformer: str | None, diffcr_config) -> bool:
    """Whether this is a text-to-image run (--data a `prepare` cache), once --base, --data and --transformer are
    known to fit together; a class-conditional run's DiffCR config is checked against its DDPM scheduler here,
    before anything is loaded."""
    from diffcr.data.latent_cache import is_text_to_image_pipeline
    from diffcr.models.tiny_dit import SCHEDULER_CONFIG
    from diffcr.train import check_diffcr_config

    if is_prepared_cache(data):
        return True
    if is_text_to_image_pipeline(base):
        raise ValueError(
            f"--base {base} is a text-to-image pipeline, so --data must be a cache made by `diffcr prepare --base "
            f"{base} --data IMAGES --out CACHE` ({data} is not one)"
        )
    if transformer is not None:
        raise ValueError(
            "--transformer replaces the transformer of a text-to-image pipeline; a class-conditional --base is "
            "one model already (pass it as --base)"
        )
    check_diffcr_config(diffcr_config, SCHEDULER_CONFIG["num_train_timesteps"])
    return False


def _allow_tf32_without_autocast(cfg) -> None:
    """fp32 training on a CUDA GPU (the authors' recipe) at TF32 matmul speed; bf16 / fp16 autocast needs none."""
    import torch

    from diffcr.train import resolve_mixed_precision

    if torch.cuda.is_available() and resolve_mixed_precision(cfg.mixed_precision) == "no":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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


def load_text_to_image(base: str, data: str, transformer: str | None = None, transformer_subfolder: str | None = None):
    """(The pipeline's transformer, TextConditioning over the cache, the scheduler that defines its noising)."""
    from diffusers import DDPMScheduler

    from diffcr.data.latent_cache import LatentCaptionDataset, load_text_to_image_pipeline, pipeline_source
    from diffcr.train.conditioning import TextConditioning

    cache = LatentCaptionDataset(data)
    pipe = load_text_to_image_pipeline(base, transformer, transformer_subfolder)
    cache.check_pipeline(pipe, pipeline_source(base, transformer))
    model = pipe.transformer
    # the forward process the pipeline's sampler inverts: flow matching as it is (SD3), else the same betas and
    # prediction type as a DDPM schedule (PixArt)
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        scheduler = pipe.scheduler
    else:
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    conditioning = TextConditioning(
        cache,
        # the attribute, not the config key: diffusers decides at construction (a config without the key, as
        # PixArt-XL-2-1024-MS's, gets micro-conditions when sample_size is 128); SD3 and Flux have none
        use_additional_conditions=bool(getattr(model, "use_additional_conditions", False)),
        # Flux's transformer takes sigma in [0, 1] (its pipeline divides by 1000)
        timestep_divisor=scheduler.config.num_train_timesteps if type(pipe).__name__ == "FluxPipeline" else 1.0,
    )
    return model, conditioning, scheduler


# flags whose values a recipe may set, by the setting they fill
TRAIN_FIELD_OF_OPTION = {
    "mode": "mode",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "router_lr": "router_lr",
    "ratio_lr": "ratio_lr",
    "weight_decay": "weight_decay",
    "grad_clip": "grad_clip",
    "warmup_steps": "warmup_steps",
    "lora_rank": "lora_rank",
    "distill": "distill",
    "freeze_schedule_at": "freeze_schedule_at",
    "drop_prob": "label_drop_prob",
    "gradient_checkpointing": "gradient_checkpointing",
    "minutes": "max_minutes",
    "checkpoint_every": "checkpoint_every",
    "seed": "seed",
    "mixed_precision": "mixed_precision",
}
DIFFCR_FIELD_OF_OPTION = {
    "target": "target_kept_ratio",
    "regions": "timestep_regions",
    "gate": "gate",
    "ratio_loss_weight": "ratio_loss_weight",
    "route_cross_attention": "route_cross_attention",
    "region_targets": "region_targets",
}


def _apply_region_targets(diffcr_flags: dict, text: str | None, given: set[str], config) -> set[str]:
    """Put `--region-targets` into `diffcr_flags`; without `--target` (or `--config`) the target is their mean.
    Returns the options counted as given (a recipe's own target then gives way to that mean)."""
    targets = diffcr_flags["region_targets"] = parse_region_targets(text)
    if targets is None or "target" in given or config is not None:
        return given
    diffcr_flags["target_kept_ratio"] = sum(targets) / len(targets)
    return given | {"target"}


def parse_region_targets(text: str | None) -> tuple[float, ...] | None:
    """`--region-targets 0.45,1,0.3,0.15` as a tuple of numbers (None when not given)."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"--region-targets {text!r} must be kept ratios separated by commas, one per timestep region, cleanest "
            "first, e.g. 0.45,1,0.3,0.15"
        ) from None


DEFAULT_SOURCES = ("DEFAULT", "DEFAULT_MAP")


def given_options(ctx) -> set[str]:
    """The options a person gave (on the command line or through the environment), not left at their defaults."""
    # by name: typer ships its own copy of click, whose ParameterSource is another enum than click's
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if getattr(source, "name", "DEFAULT") not in DEFAULT_SOURCES}


def resolve_settings(config: Path | None, recipe: Path | None, flags: dict, diffcr_flags: dict, given: set[str]):
    """(The DiffCRConfig, TrainConfig keyword arguments, the training settings the recipe set) from --config,
    --recipe and the flags.

    Without a recipe, the flags (or --config, which holds target/regions/gate/lambda/route-cross-attention/
    region-targets: those flags given beside it are refused rather than ignored). With one, its values replace the
    flags' defaults, and every flag given on the command line (or --config) replaces its value.
    """
    import diffcr

    clashing = sorted(name for name in given if name in DIFFCR_FIELD_OF_OPTION) if config is not None else []
    if clashing:
        flags_given = ", ".join("--" + name.replace("_", "-") for name in clashing)
        raise ValueError(
            f"{flags_given} would be ignored beside --config {config}, which sets the whole DiffCR config: set "
            f"{', '.join(DIFFCR_FIELD_OF_OPTION[name] for name in clashing)} in that JSON, or leave out --config"
        )
    if recipe is None:
        diffcr_config = read_diffcr_config(config) if config is not None else diffcr.DiffCRConfig(**diffcr_flags)
        return diffcr_config, dict(flags), []
    from diffcr.train.recipe import Recipe

    loaded = Recipe.from_json(recipe)
    given_fields = {TRAIN_FIELD_OF_OPTION[name] for name in given if name in TRAIN_FIELD_OF_OPTION}
    settings = loaded.train_settings(flags, given_fields)
    from_recipe = sorted(set(loaded.train) - given_fields)
    if config is not None:
        return read_diffcr_config(config), settings, from_recipe
    overrides = {DIFFCR_FIELD_OF_OPTION[name]: diffcr_flags[DIFFCR_FIELD_OF_OPTION[name]]
                 for name in given if name in DIFFCR_FIELD_OF_OPTION}  # fmt: skip
    return loaded.diffcr_config(overrides), settings, from_recipe


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
