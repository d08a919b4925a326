"""`diffcr pretrain`: train the base DiT from scratch (the recipe of the shipped model)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@dataclass(frozen=True)
class _RunOptions:
    """The training options both tasks share."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    minutes: float | None
    checkpoint_every: int
    seed: int
    resume: bool
    snr_gamma: float | None
    snr_weighting: str | None
    average_from: int
    lr_schedule: str


@app.command()
@friendly_errors
def pretrain(
    task: str = typer.Option(
        "class",
        help="'class': the class-conditional DiT on digits; 't2i': the text-to-image default (scene VAE, then "
        "PixArt transformer on digit scenes)",
    ),
    out: Path = typer.Option(Path("runs/pretrain"), help="run directory (checkpoints, metrics, model/)"),
    data: str = typer.Option("mnist5k", help="'mnist5k' (bundled) or an image folder with one subfolder per class"),
    steps: int = typer.Option(
        6000, help="optimizer steps; --task t2i with --init-from: 0 writes its transformer (grown or pruned) untrained"
    ),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(200),
    minutes: float = typer.Option(None, help="stop after this many minutes (a checkpoint is written)"),
    checkpoint_every: int = typer.Option(100),
    seed: int = typer.Option(0),
    num_layers: int = typer.Option(
        None,
        help="depth of the DiT or PixArt transformer (default 8); with --init-from, the depth to grow its "
        "transformer to",
    ),
    width: int = typer.Option(
        None,
        help="--task t2i: the transformer's width, a multiple of 32 (heads of 32 channels; the shipped one: 128)",
    ),
    image_size: int = typer.Option(32, help="side of the square images (an image folder is resized to it)"),
    channels: int = typer.Option(
        None, help="1 (grayscale) or 3 (RGB); default: as the images are (3 when any image has colour)"
    ),
    resume: bool = typer.Option(False, help="continue the run in --out from its latest checkpoint"),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), no, bf16, fp16"),
    vae_steps: int = typer.Option(900, help="--task t2i: optimizer steps of the scene VAE (trained first)"),
    snr_gamma: float = typer.Option(
        None,
        help="loss weighting's gamma (default: none for --task class, 10 for --task t2i); may change on --resume",
    ),
    snr_weighting: str = typer.Option(
        None,
        help="with --snr-gamma: 'min' (min-SNR; the default for --task class) or 'inverse' (clamp(1/SNR, 1, gamma): "
        "noisy steps count as an x0 loss; the default for --task t2i)",
    ),
    text_encoder_layers: int = typer.Option(
        None,
        help="--task t2i: how many of all-MiniLM-L6-v2's 6 layers give the caption states (default 3, as the shipped "
        "pipeline; a resumed run keeps its own)",
    ),
    init_from: Path = typer.Option(
        None,
        help="--task t2i: a pipeline folder (OUT/pipeline of an earlier run) whose VAE is kept and whose transformer "
        "training starts from; with --num-layers above its depth, the transformer grows deeper first (new blocks "
        "start as the identity)",
    ),
    drop_blocks: str = typer.Option(
        None,
        help="--task t2i, with --init-from: blocks (0-based, e.g. '2,5,8,11') its transformer loses before training "
        "(--steps 0: written untrained, as the shipped transformer lost its four grown copies)",
    ),
    token_bypass: float = typer.Option(
        None,
        help="--task t2i: the chance that a block routes a random subset of tokens past itself, per block, timestep "
        "region and step (random token bypass; 0 = dense): a base that learns to do without some blocks for some "
        "tokens might lose less under DiffCR (measured on the shipped base: it cost dense accuracy; docs/RESULTS.md)",
    ),
    focus_digits: str = typer.Option(
        None, help="--task t2i: digits, e.g. '8,9', whose two-digit scenes --focus-fraction over-samples"
    ),
    focus_fraction: float = typer.Option(
        None, help="--task t2i: the fraction of every batch that are two-digit scenes holding a --focus-digits digit"
    ),
    lr_schedule: str = typer.Option(
        "constant", help="'constant' after the warmup, or 'cosine': the learning rate decays to 0 at the last step"
    ),
    average_from: int = typer.Option(
        0,
        help="write the mean of the weights at every checkpoint step from this step on, and at the last step, "
        "instead of the last weights (0: no average); the shipped text-to-image transformer is such a mean",
    ),
) -> None:
    """Pretrain a base model from scratch: the class-conditional DiT (written to OUT/model) or, with --task t2i,
    the text-to-image default's VAE and transformer (written to OUT/pipeline)."""
    from diffcr.cli.common import check_int

    if task not in ("class", "t2i"):
        raise ValueError(f"--task {task!r} must be 'class' or 't2i'")
    if num_layers is not None:
        check_int("--num-layers", num_layers, 1, 64, "deeper would not train on this recipe's budget")
    run = _RunOptions(
        steps,
        batch_size,
        lr,
        warmup_steps,
        minutes,
        checkpoint_every,
        seed,
        resume,
        snr_gamma,
        snr_weighting,
        average_from,
        lr_schedule,
    )
    if task == "t2i":
        _pretrain_t2i(
            out,
            num_layers,
            width,
            vae_steps,
            text_encoder_layers,
            (init_from, _parse_blocks(drop_blocks)),
            (token_bypass or 0.0, _parse_digits(focus_digits), focus_fraction or 0.0),
            run,
        )
        return
    # 1. every option is checked before anything is loaded or written
    _refuse_t2i_only(
        {"--width": width, "--text-encoder-layers": text_encoder_layers, "--init-from": init_from,
         "--drop-blocks": drop_blocks, "--token-bypass": token_bypass, "--focus-digits": focus_digits,
         "--focus-fraction": focus_fraction}
    )  # fmt: skip
    _pretrain_class(out, data, 8 if num_layers is None else num_layers, image_size, channels, mixed_precision, run)


def _refuse_t2i_only(options: dict) -> None:
    """A ValueError naming the first text-to-image option given (not None) to --task class."""
    for name, value in options.items():
        if value is not None:
            raise ValueError(f"{name} belongs to --task t2i (the text-to-image transformer); leave it out here")


def _pretrain_class(out, data, num_layers, image_size, channels, mixed_precision, run: _RunOptions):
    import contextlib

    import torch

    from diffcr.checkpoint import check_writable_dir, run_lock
    from diffcr.cli.common import check_int, check_new_run_dir
    from diffcr.data import load_dataset
    from diffcr.models import BASE_MODEL_CONFIG, build_base_model
    from diffcr.train import TrainConfig, check_mixed_precision, export_model, is_main_process, train

    cfg = TrainConfig(
        mode="pretrain",
        steps=run.steps,
        batch_size=run.batch_size,
        lr=run.lr,
        warmup_steps=run.warmup_steps,
        checkpoint_every=run.checkpoint_every,
        seed=run.seed,
        max_minutes=run.minutes,
        mixed_precision=mixed_precision,
        snr_gamma=run.snr_gamma,
        snr_weighting=run.snr_weighting or "min",
        average_from=run.average_from,
        lr_schedule=run.lr_schedule,
    )
    patch = BASE_MODEL_CONFIG["patch_size"]
    check_int("--image-size", image_size, 2 * patch, 256, "a pixel-space DiT; every image is a token grid")
    if image_size % patch:
        raise ValueError(f"--image-size {image_size} must be a multiple of the patch size {patch}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"--channels {channels} must be 1 (grayscale) or 3 (RGB), or left out to follow the images")
    check_mixed_precision(cfg.mixed_precision)
    check_new_run_dir(out, run.resume)
    check_writable_dir(out / "model", "--out/model")

    # 2. the data decides the model's shape: channels, size and number of classes
    train_set, _ = load_dataset(data, image_size=image_size, channels=channels)
    torch.manual_seed(run.seed)
    model = build_base_model(
        num_layers=num_layers,
        in_channels=train_set.images.shape[1],
        out_channels=train_set.images.shape[1],
        sample_size=train_set.images.shape[-1],
        num_embeds_ada_norm=train_set.num_classes,
    )

    # 3. train and export, holding the run folder against a second run into the same --out
    main = is_main_process()
    with run_lock(out) if main else contextlib.nullcontext():
        result = train(out, model, train_set, cfg, resume=run.resume, run_info={"data": data})
        if not main:
            return
        export_model(result.model, out / "model")
    typer.echo(
        f"pretrained {result.steps_done} steps in {result.seconds / 60:.1f} min; model: {out / 'model'}"
        f"{_averaged(result.averaged_steps)}"
    )


def _pretrain_t2i(out, num_layers, width, vae_steps, text_encoder_layers, start, bypass_and_focus, run):
    from diffcr.cli.common import check_int, check_new_run_dir
    from diffcr.models.scene_pipeline import PRETRAIN_SNR_GAMMA, PRETRAIN_SNR_WEIGHTING, check_text_encoder_layers
    from diffcr.train import TrainConfig
    from diffcr.train.scene_pretrain import pretrain_scene_pipeline

    # the plain MSE never taught the transformer which digit a caption names (docs/RESULTS.md)
    run = replace(
        run,
        snr_gamma=PRETRAIN_SNR_GAMMA if run.snr_gamma is None else run.snr_gamma,
        snr_weighting=run.snr_weighting or PRETRAIN_SNR_WEIGHTING,
    )
    token_bypass, focus_digits, focus_fraction = bypass_and_focus
    init_from, drop_blocks = start
    if run.steps == 0 and (init_from is None or run.resume or run.average_from):
        raise ValueError(
            "--steps 0 writes the transformer of --init-from as it starts (grown by --num-layers or with "
            "--drop-blocks), without training: give --init-from, and leave out --resume and --average-from"
        )
    if run.steps == 0 and (token_bypass or focus_digits or focus_fraction):
        raise ValueError("--token-bypass and --focus-* shape training, and --steps 0 trains nothing: leave them out")
    if drop_blocks and init_from is None and not run.resume:  # a resumed run knows its init_from
        raise ValueError(
            f"--drop-blocks {','.join(map(str, drop_blocks))} drops blocks of --init-from's transformer: give "
            "--init-from"
        )
    TrainConfig(
        mode="pretrain",
        steps=run.steps or 1,  # 0: no training (checked above)
        batch_size=run.batch_size,
        lr=run.lr,
        warmup_steps=run.warmup_steps,
        seed=run.seed,
        snr_gamma=run.snr_gamma,
        snr_weighting=run.snr_weighting,
        token_bypass=token_bypass,
        average_from=run.average_from,
        lr_schedule=run.lr_schedule,
    )
    if not 0.0 <= focus_fraction <= 1.0:
        raise ValueError(f"--focus-fraction {focus_fraction} must be in [0, 1]")
    if focus_fraction and not focus_digits:
        raise ValueError("--focus-fraction needs --focus-digits (which digits' two-digit scenes to over-sample)")
    check_int("--vae-steps", vae_steps, 1, 10**6, "the shipped VAE took 900")
    if text_encoder_layers is not None:
        check_text_encoder_layers(text_encoder_layers)
    if init_from is not None and width is not None:
        raise ValueError(
            f"--init-from {init_from} gives the transformer, architecture included: leave out --width (--num-layers "
            "may grow it deeper)"
        )
    overrides = {} if num_layers is None else {"num_layers": num_layers}
    if width is not None:
        check_int("--width", width, 32, 2048, "the shipped transformer is 128 wide")
        if width % 32:
            raise ValueError(f"--width {width} must be a multiple of 32: the transformer's heads are 32 wide")
        overrides |= {"num_attention_heads": width // 32, "cross_attention_dim": width}
    if not run.resume:
        check_new_run_dir(out, run.resume)
    folder = pretrain_scene_pipeline(
        out,
        steps=run.steps,
        vae_steps=vae_steps,
        batch_size=run.batch_size,
        lr=run.lr,
        warmup_steps=run.warmup_steps,
        seed=run.seed,
        resume=run.resume,
        checkpoint_every=run.checkpoint_every,
        max_minutes=run.minutes,
        snr_gamma=run.snr_gamma,
        snr_weighting=run.snr_weighting,
        transformer_overrides=overrides,
        text_encoder_layers=text_encoder_layers,
        init_from=init_from,
        drop_blocks=drop_blocks,
        token_bypass=token_bypass,
        focus_digits=focus_digits,
        focus_fraction=focus_fraction,
        average_from=run.average_from,
        lr_schedule=run.lr_schedule,
    )
    done = (
        "wrote the starting transformer untrained (--steps 0)"
        if run.steps == 0
        else "pretrained the text-to-image default"
    )
    typer.echo(f"{done}; pipeline: {folder} (load it with --base {folder})")


def _averaged(steps: tuple[int, ...]) -> str:
    if not steps:
        return ""
    return f" (the mean of the weights at steps {steps[0]}-{steps[-1]}, {len(steps)} checkpoints)"


def _parse_blocks(text: str | None) -> tuple[int, ...]:
    """'2,5,8,11' -> (2, 5, 8, 11); None -> ()."""
    if text is None:
        return ()
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ValueError(f"--drop-blocks {text!r} must be block indices (0-based) separated by commas, e.g. '2,5,8,11'")
    return tuple(sorted(int(part) for part in parts))  # a repeated block stays, for drop_blocks to name


def _parse_digits(text: str | None) -> tuple[int, ...]:
    """'8,9' -> (8, 9); None -> ()."""
    if text is None:
        return ()
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and len(part) == 1 for part in parts):
        raise ValueError(f"--focus-digits {text!r} must be digits 0-9 separated by commas, e.g. '8,9'")
    return tuple(sorted({int(part) for part in parts}))
